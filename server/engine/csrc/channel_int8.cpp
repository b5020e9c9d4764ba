// int8 weights (one float32 scale per output channel) x int8 activations (one scale per row)
// for the vocabulary projection (server/engine/channel_int8.py): W8A8Linear's arithmetic
// (engine/linear.py, oneDNN's int8 GEMM) on a kernel of our own, bit for bit.
//
// Why: a decode step's head is the largest GEMM of a small model (Gemma 3 270M: 262k x 640,
// 168 MB of int8 codes, 40 % of a 16-row step through oneDNN). With one scale per channel
// a channel's dot product is one exact integer sum over all inputs, so the kernel is nothing
// but `vpdpbusd` until one epilogue per output (the a8 kernel's per-group scales cost it a
// fifth of its time): activations as unsigned codes (code + 128, as oneDNN's "shifted" mode
// takes them), the weights signed, 4 blocks of 16 channels x 6 rows of accumulators, so one
// broadcast of a row's 4 codes feeds 4 products. The sum is corrected by 128 x the channel's
// code sum, then scaled as torch does it: (float(sum) * channel scale) * row scale.
//
// Layout (packed by channel_int8.py): output channels in tiles of 4 blocks of 16; tile t holds,
// for each quad q of 4 inputs, 4 x 64 bytes, block c's 64 bytes with lane l (bytes 4l..4l+3)
// channel 64t+16c+l's codes for those inputs: a tile is read as one sequential stream (as 4
// streams 10 KB apart, one per block, it read at ~19 GB/s a core of the ~36 a stream gets).

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "vec16.h"

namespace {

constexpr int64_t kLanes = 16;
constexpr int kTileBlocks = 4;  // blocks of 16 channels a tile: a broadcast feeds 4 products
constexpr int kTileRows = 6;    // 24 int32 accumulators, 4 weight vectors, one broadcast
constexpr int64_t kAheadTiles = 1;  // the weights stream from memory: ask for the next tile's (2: 1-row Gemma 3 head ~3.4 against ~2.0 ms)

#define RAGTUNE_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")))

// A row's codes as W8A8Linear makes them: scale = max(amax |x|, 1e-12) / 127 in float32,
// code = round half to even of float(x) / scale (a true division, as torch.div), plus 128.
RAGTUNE_VNNI void quantize_row(const void* x, bool bf16, int64_t at, int64_t inputs,
                               uint8_t* codes, float* scale) {
  __m512 top = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (int64_t i = 0; i < inputs; i += kLanes) {
    const __m512 v = ragtune::load16(x, bf16, at + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    top = _mm512_max_ps(top, _mm512_abs_ps(v));
  }
  // a NaN makes the scale NaN, as torch's amax and clamp keep it (vmaxps and fmax drop it):
  // the row's logits come out NaN and the sampler refuses the row, as on oneDNN's route
  const float row_scale =
      nan != 0 ? NAN : std::fmax(_mm512_reduce_max_ps(top), 1e-12f) / 127.0f;
  const __m512 divisor = _mm512_set1_ps(row_scale);
  const __m512i shift = _mm512_set1_epi32(128);
  for (int64_t i = 0; i < inputs; i += kLanes) {
    const __m512 q = _mm512_roundscale_ps(
        _mm512_div_ps(ragtune::load16(x, bf16, at + i), divisor),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i),
                     _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(q), shift)));
  }
  *scale = row_scale;
}

// acc += a (unsigned bytes) . b (signed bytes), 4 products a lane, in acc's own register (with
// the intrinsic GCC 12 copied each accumulator out and back around every product)
RAGTUNE_VNNI inline void dot_in_place(__m512i& acc, __m512i a, __m512i b) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
}

// one row's logits of a block: (float(sum - correction) * channel scale) * row scale, in
// W8A8Linear's order
RAGTUNE_VNNI inline void scale_out(__m512i sums, const int32_t* corrections,
                                   const float* channel_scales, float row_scale, float* out) {
  const __m512 sum = _mm512_cvtepi32_ps(_mm512_sub_epi32(sums, _mm512_loadu_si512(corrections)));
  const __m512 scaled = _mm512_mul_ps(sum, _mm512_loadu_ps(channel_scales));
  _mm512_storeu_ps(out, _mm512_mul_ps(scaled, _mm512_set1_ps(row_scale)));
}

// R rows x 4 blocks of 16 outputs (of which `blocks` are real: the weights are padded to
// whole tiles): integer sums over all inputs, then the epilogue. The 24 accumulators are named
// variables: as an array GCC 12 kept them in memory, a load and a store around each product.
#define RAGTUNE_ROW_SUMS(r)                                                           \
  __m512i sum##r##0 = _mm512_setzero_si512(), sum##r##1 = _mm512_setzero_si512(),     \
          sum##r##2 = _mm512_setzero_si512(), sum##r##3 = _mm512_setzero_si512();
#define RAGTUNE_ROW_DOTS(r)                                                           \
  if constexpr (R > r) {                                                              \
    const __m512i quad =                                                              \
        _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(codes + r * inputs + 4 * q)); \
    dot_in_place(sum##r##0, quad, w0);                                                \
    dot_in_place(sum##r##1, quad, w1);                                                \
    dot_in_place(sum##r##2, quad, w2);                                                \
    dot_in_place(sum##r##3, quad, w3);                                                \
  }
#define RAGTUNE_ROW_OUT(r)                                                                 \
  if constexpr (R > r) {                                                                   \
    const __m512i row_sums[kTileBlocks] = {sum##r##0, sum##r##1, sum##r##2, sum##r##3};    \
    for (int c = 0; c < blocks; ++c) {                                                     \
      scale_out(row_sums[c], corrections + c * kLanes, channel_scales + c * kLanes,         \
                row_scales[r], out + r * outputs + c * kLanes);                             \
    }                                                                                      \
  }

template <int R>
RAGTUNE_VNNI void tile(const uint8_t* codes, const float* row_scales, int64_t inputs,
                       const int8_t* weights, int blocks, const int32_t* corrections,
                       const float* channel_scales, const int8_t* ahead, int ahead_blocks,
                       bool into_l2, float* out, int64_t outputs) {
  RAGTUNE_ROW_SUMS(0)
  RAGTUNE_ROW_SUMS(1)
  RAGTUNE_ROW_SUMS(2)
  RAGTUNE_ROW_SUMS(3)
  RAGTUNE_ROW_SUMS(4)
  RAGTUNE_ROW_SUMS(5)
  for (int64_t q = 0; q < inputs / 4; ++q) {
    const int64_t at = 64 * kTileBlocks * q;
    for (int c = 0; c < ahead_blocks; ++c) {
      if (into_l2) {
        _mm_prefetch(ahead + at + 64 * c, _MM_HINT_T1);
      } else {
        _mm_prefetch(ahead + at + 64 * c, _MM_HINT_T0);
      }
    }
    const __m512i w0 = _mm512_loadu_si512(weights + at);
    const __m512i w1 = _mm512_loadu_si512(weights + at + 64);
    const __m512i w2 = _mm512_loadu_si512(weights + at + 128);
    const __m512i w3 = _mm512_loadu_si512(weights + at + 192);
    RAGTUNE_ROW_DOTS(0)
    RAGTUNE_ROW_DOTS(1)
    RAGTUNE_ROW_DOTS(2)
    RAGTUNE_ROW_DOTS(3)
    RAGTUNE_ROW_DOTS(4)
    RAGTUNE_ROW_DOTS(5)
  }
  RAGTUNE_ROW_OUT(0)
  RAGTUNE_ROW_OUT(1)
  RAGTUNE_ROW_OUT(2)
  RAGTUNE_ROW_OUT(3)
  RAGTUNE_ROW_OUT(4)
  RAGTUNE_ROW_OUT(5)
}

#undef RAGTUNE_ROW_SUMS
#undef RAGTUNE_ROW_DOTS
#undef RAGTUNE_ROW_OUT

using Tile = void (*)(const uint8_t*, const float*, int64_t, const int8_t*, int,
                      const int32_t*, const float*, const int8_t*, int, bool, float*, int64_t);

constexpr Tile kTiles[kTileRows + 1] = {nullptr, tile<1>, tile<2>, tile<3>,
                                        tile<4>,  tile<5>, tile<6>};

}  // namespace

extern "C" {

// out[rows, outputs] (float32) = x[rows, inputs] @ W^T as W8A8Linear computes it; x bf16 (1)
// or float32 (0), rows x_stride elements apart; weights packed as above; corrections[o] =
// 128 * sum of channel o's codes (weights, corrections and scales padded with zeros to a
// multiple of 64 outputs); inputs a multiple of 16, outputs of 16.
void channel_int8_linear(const void* x, int x_bf16, int64_t rows, int64_t x_stride,
                         int64_t inputs, const int8_t* weights, const int32_t* corrections,
                         const float* channel_scales, int64_t outputs, float* out,
                         int threads) {
  // reused across calls; read through these pointers by the team below (a thread_local
  // named inside the parallel region would be each worker's own, empty)
  thread_local std::vector<uint8_t> codes_buffer;
  thread_local std::vector<float> scales_buffer;
  codes_buffer.resize(rows * inputs);
  scales_buffer.resize(rows);
  uint8_t* const codes = codes_buffer.data();
  float* const row_scales = scales_buffer.data();
  for (int64_t r = 0; r < rows; ++r) {
    quantize_row(x, x_bf16 != 0, r * x_stride, inputs, codes + r * inputs, row_scales + r);
  }
  const int64_t blocks = outputs / kLanes;
  const int64_t tiles = (blocks + kTileBlocks - 1) / kTileBlocks;
  const int64_t tile_bytes = kTileBlocks * inputs * kLanes;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t block = t * kTileBlocks;
    const int count = blocks - block < kTileBlocks ? static_cast<int>(blocks - block) : kTileBlocks;
    const int8_t* tile_weights = weights + t * tile_bytes;
    // a later tile's weights, asked for while these are multiplied: spread over the row
    // tiles (with 16 rows each asks for one block), so memory works all along
    const bool later = t + kAheadTiles < tiles;
    const int64_t row_tiles = (rows + kTileRows - 1) / kTileRows;
    const int per_row_tile = static_cast<int>((kTileBlocks + row_tiles - 1) / row_tiles);
    const int64_t column = block * kLanes;
    for (int64_t row0 = 0, i = 0; row0 < rows; row0 += kTileRows, ++i) {
      const int n = rows - row0 < kTileRows ? static_cast<int>(rows - row0) : kTileRows;
      const int64_t first = i * per_row_tile;
      const int ahead_blocks =
          later && first < kTileBlocks
              ? static_cast<int>(std::min<int64_t>(per_row_tile, kTileBlocks - first))
              : 0;
      kTiles[n](codes + row0 * inputs, row_scales + row0, inputs, tile_weights, count,
                corrections + column, channel_scales + column,
                tile_weights + kAheadTiles * tile_bytes + 64 * first, ahead_blocks,
                row_tiles > 1, out + row0 * outputs + column, outputs);
    }
  }
}

}  // extern "C"

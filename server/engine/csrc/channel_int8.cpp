// int8 weights (one float32 scale per output channel) x int8 activations (one scale per row)
// for the vocabulary projection (server/engine/channel_int8.py): W8A8Linear's arithmetic
// (engine/linear.py, oneDNN's int8 GEMM) on a kernel of our own, bit for bit.
//
// Why: a decode step's head is the largest GEMM of a small model (Gemma 3 270M: 262k x 640,
// 168 MB of int8 codes, 40 % of a 16-row step through oneDNN). With one scale per channel
// a channel's dot product is one exact integer sum over all inputs, so the kernel is nothing
// but `vpdpbusd` until one epilogue per output. `vpdpbusd` multiplies unsigned by signed
// bytes: the weights are stored unsigned (code + 128) and the activations stay signed, so a
// row's 4 codes come into each product as an embedded broadcast (no broadcast instruction)
// and the +128 comes off once per row (128 x the row's code sum) instead of once per channel.
// The sum is exact whatever the order, then scaled as torch does it:
// (float(sum) * channel scale) * row scale.
//
// Every row of a batch (up to 16 at a time) takes its products from the same weight vector,
// so the weights stream from memory once a step, one block of 16 channels after another
// (Gemma 3 at 16 rows: with 6-row tiles the weights went through the core three times and
// the head took 5.1 ms; the products alone need ~3.5).
//
// Layout (packed by channel_int8.py): [outputs / 16, inputs / 4, 16 lanes, 4]: block b's
// quad q (inputs 4q..4q+3) is one 64-byte vector, lane l holding channel 16b+l's 4 codes,
// read in order: each thread's blocks are one sequential stream.

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "vec16.h"

namespace {

constexpr int64_t kLanes = 16;
constexpr int kGroupRows = 16;          // rows a pass over a block: 16 accumulators
constexpr int64_t kAheadBytes = 16384;  // weights asked for this far ahead of the products
constexpr int64_t kChunkBytes = 256 * 1024;  // more rows: codes that stay in L2 while all tiles pass

#define RAGTUNE_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")))

// A row's codes as W8A8Linear makes them: scale = max(amax |x|, 1e-12) / 127 in float32,
// code = round half to even of float(x) / scale (a true division, as torch.div); and
// 128 x the codes' sum, what the unsigned weights add to each of the row's sums.
RAGTUNE_VNNI void quantize_row(const void* x, bool bf16, int64_t at, int64_t inputs,
                               int8_t* codes, float* scale, int32_t* correction) {
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
  __m512i total = _mm512_setzero_si512();
  for (int64_t i = 0; i < inputs; i += kLanes) {
    const __m512 q = _mm512_roundscale_ps(
        _mm512_div_ps(ragtune::load16(x, bf16, at + i), divisor),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // as bytes (a NaN row's codes are whatever vpmovdb makes of them: its logits are NaN)
    const __m128i bytes = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), bytes);
    total = _mm512_add_epi32(total, _mm512_cvtepi8_epi32(bytes));
  }
  *scale = row_scale;
  *correction = 128 * _mm512_reduce_add_epi32(total);
}

// acc += weights (unsigned bytes) . the 4 signed codes at `quad`, broadcast to every lane,
// in acc's own register (with the intrinsic GCC 12 copied each accumulator out and back)
RAGTUNE_VNNI inline void dot_in_place(__m512i& acc, __m512i weights, const int8_t* quad) {
  asm("vpdpbusd %2%{1to16%}, %1, %0"
      : "+v"(acc)
      : "v"(weights), "m"(*reinterpret_cast<const int32_t*>(quad)));
}

// one row's 16 logits: (float(sum - correction) * channel scale) * row scale, in
// W8A8Linear's order
RAGTUNE_VNNI inline void scale_out(__m512i sums, int32_t correction, __m512 channel_scales,
                                   float row_scale, float* out) {
  const __m512 sum = _mm512_cvtepi32_ps(_mm512_sub_epi32(sums, _mm512_set1_epi32(correction)));
  _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_mul_ps(sum, channel_scales),
                                      _mm512_set1_ps(row_scale)));
}

// R rows (1..16) x one block of 16 channels, over all inputs two quads at a time. With 8
// rows or fewer each row keeps a second accumulator for the odd quads (s8..s15), so one
// row still has two chains of products in flight. Named variables: as an array GCC 12 kept
// the accumulators in memory, a load and a store around each product.
#define RAGTUNE_PAIR(r, odd)                                          \
  if constexpr (R > r) {                                              \
    dot_in_place(s##r, w0, codes + r * inputs + 4 * q);               \
    if constexpr (R > 8) {                                            \
      dot_in_place(s##r, w1, codes + r * inputs + 4 * q + 4);         \
    } else {                                                          \
      dot_in_place(odd, w1, codes + r * inputs + 4 * q + 4);          \
    }                                                                 \
  }
#define RAGTUNE_HIGH(r)                                               \
  if constexpr (R > r) {                                              \
    dot_in_place(s##r, w0, codes + r * inputs + 4 * q);               \
    dot_in_place(s##r, w1, codes + r * inputs + 4 * q + 4);           \
  }
#define RAGTUNE_OUT(r, odd)                                                                   \
  if constexpr (R > r) {                                                                      \
    scale_out(R > 8 ? s##r : _mm512_add_epi32(s##r, odd), corrections[r], scales, row_scales[r], \
              out + r * outputs);                                                             \
  }
#define RAGTUNE_OUT_HIGH(r)                                                       \
  if constexpr (R > r) {                                                          \
    scale_out(s##r, corrections[r], scales, row_scales[r], out + r * outputs);    \
  }

template <int R>
RAGTUNE_VNNI void block_rows(const int8_t* codes, const float* row_scales,
                             const int32_t* corrections, int64_t inputs, const uint8_t* weights,
                             const float* channel_scales, float* out,
                             int64_t outputs) {
  __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0,
          s7 = s0, s8 = s0, s9 = s0, s10 = s0, s11 = s0, s12 = s0, s13 = s0, s14 = s0, s15 = s0;
  for (int64_t q = 0; q < inputs / 4; q += 2) {
    const uint8_t* at = weights + 64 * q;
    _mm_prefetch(reinterpret_cast<const char*>(at + kAheadBytes), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(at + kAheadBytes + 64), _MM_HINT_T0);
    const __m512i w0 = _mm512_loadu_si512(at);
    const __m512i w1 = _mm512_loadu_si512(at + 64);
    RAGTUNE_PAIR(0, s8)
    RAGTUNE_PAIR(1, s9)
    RAGTUNE_PAIR(2, s10)
    RAGTUNE_PAIR(3, s11)
    RAGTUNE_PAIR(4, s12)
    RAGTUNE_PAIR(5, s13)
    RAGTUNE_PAIR(6, s14)
    RAGTUNE_PAIR(7, s15)
    if constexpr (R > 8) {
      RAGTUNE_HIGH(8)
      RAGTUNE_HIGH(9)
      RAGTUNE_HIGH(10)
      RAGTUNE_HIGH(11)
      RAGTUNE_HIGH(12)
      RAGTUNE_HIGH(13)
      RAGTUNE_HIGH(14)
      RAGTUNE_HIGH(15)
    }
  }
  const __m512 scales = _mm512_loadu_ps(channel_scales);
  RAGTUNE_OUT(0, s8)
  RAGTUNE_OUT(1, s9)
  RAGTUNE_OUT(2, s10)
  RAGTUNE_OUT(3, s11)
  RAGTUNE_OUT(4, s12)
  RAGTUNE_OUT(5, s13)
  RAGTUNE_OUT(6, s14)
  RAGTUNE_OUT(7, s15)
  if constexpr (R > 8) {
    RAGTUNE_OUT_HIGH(8)
    RAGTUNE_OUT_HIGH(9)
    RAGTUNE_OUT_HIGH(10)
    RAGTUNE_OUT_HIGH(11)
    RAGTUNE_OUT_HIGH(12)
    RAGTUNE_OUT_HIGH(13)
    RAGTUNE_OUT_HIGH(14)
    RAGTUNE_OUT_HIGH(15)
  }
}

#undef RAGTUNE_PAIR
#undef RAGTUNE_HIGH
#undef RAGTUNE_OUT
#undef RAGTUNE_OUT_HIGH

// For more than 16 rows (a larger batch, a prompt's logprobs) the products, not memory, set
// the pace: 6 rows x 4 blocks of accumulators take one broadcast of a row's codes into 4
// products (with 16 rows a pass the embedded broadcasts cost ~7 % more per product; with
// 64 rows 35 %). The 4 blocks' weights (4 streams, `inputs` x 16 bytes apart) stay in the
// core's caches across a chunk's row tiles.
constexpr int kTileBlocks = 4;
constexpr int kTileRows = 6;  // 24 accumulators, 4 weight vectors, one broadcast

RAGTUNE_VNNI inline void dot_registers(__m512i& acc, __m512i weights, __m512i quad) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(weights), "v"(quad));
}

#define RAGTUNE_TILE_SUMS(r)                                                      \
  __m512i t##r##0 = _mm512_setzero_si512(), t##r##1 = t##r##0, t##r##2 = t##r##0, \
          t##r##3 = t##r##0;
#define RAGTUNE_TILE_DOTS(r)                                                              \
  if constexpr (R > r) {                                                                  \
    const __m512i quad =                                                                  \
        _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(codes + r * inputs + 4 * q)); \
    dot_registers(t##r##0, w0, quad);                                                     \
    dot_registers(t##r##1, w1, quad);                                                     \
    dot_registers(t##r##2, w2, quad);                                                     \
    dot_registers(t##r##3, w3, quad);                                                     \
  }
#define RAGTUNE_TILE_OUT(r)                                                                \
  if constexpr (R > r) {                                                                   \
    const __m512i row_sums[kTileBlocks] = {t##r##0, t##r##1, t##r##2, t##r##3};            \
    for (int c = 0; c < blocks; ++c) {                                                     \
      scale_out(row_sums[c], corrections[r], _mm512_loadu_ps(channel_scales + c * kLanes), \
                row_scales[r], out + r * outputs + c * kLanes);                            \
    }                                                                                      \
  }

// R rows x `blocks` (1..4) consecutive blocks (a missing block reads the first block's
// weights again and is not written); `ahead` (or null) a block of the next tile, asked for
// into L2 meanwhile
template <int R>
RAGTUNE_VNNI void tile_rows(const int8_t* codes, const float* row_scales,
                            const int32_t* corrections, int64_t inputs, const uint8_t* weights,
                            int blocks, const float* channel_scales, const uint8_t* ahead,
                            float* out, int64_t outputs) {
  const int64_t block_bytes = inputs * kLanes;
  const uint8_t* b0 = weights;
  const uint8_t* b1 = blocks > 1 ? weights + block_bytes : weights;
  const uint8_t* b2 = blocks > 2 ? weights + 2 * block_bytes : weights;
  const uint8_t* b3 = blocks > 3 ? weights + 3 * block_bytes : weights;
  RAGTUNE_TILE_SUMS(0)
  RAGTUNE_TILE_SUMS(1)
  RAGTUNE_TILE_SUMS(2)
  RAGTUNE_TILE_SUMS(3)
  RAGTUNE_TILE_SUMS(4)
  RAGTUNE_TILE_SUMS(5)
  for (int64_t q = 0; q < inputs / 4; ++q) {
    if (ahead != nullptr) _mm_prefetch(reinterpret_cast<const char*>(ahead + 64 * q), _MM_HINT_T1);
    const __m512i w0 = _mm512_loadu_si512(b0 + 64 * q);
    const __m512i w1 = _mm512_loadu_si512(b1 + 64 * q);
    const __m512i w2 = _mm512_loadu_si512(b2 + 64 * q);
    const __m512i w3 = _mm512_loadu_si512(b3 + 64 * q);
    RAGTUNE_TILE_DOTS(0)
    RAGTUNE_TILE_DOTS(1)
    RAGTUNE_TILE_DOTS(2)
    RAGTUNE_TILE_DOTS(3)
    RAGTUNE_TILE_DOTS(4)
    RAGTUNE_TILE_DOTS(5)
  }
  RAGTUNE_TILE_OUT(0)
  RAGTUNE_TILE_OUT(1)
  RAGTUNE_TILE_OUT(2)
  RAGTUNE_TILE_OUT(3)
  RAGTUNE_TILE_OUT(4)
  RAGTUNE_TILE_OUT(5)
}

#undef RAGTUNE_TILE_SUMS
#undef RAGTUNE_TILE_DOTS
#undef RAGTUNE_TILE_OUT

using TileRows = void (*)(const int8_t*, const float*, const int32_t*, int64_t, const uint8_t*,
                          int, const float*, const uint8_t*, float*, int64_t);

constexpr TileRows kTileRowKernels[kTileRows + 1] = {nullptr,      tile_rows<1>, tile_rows<2>,
                                                     tile_rows<3>, tile_rows<4>, tile_rows<5>,
                                                     tile_rows<6>};

using BlockRows = void (*)(const int8_t*, const float*, const int32_t*, int64_t, const uint8_t*,
                           const float*, float*, int64_t);

constexpr BlockRows kBlockRows[kGroupRows + 1] = {
    nullptr,         block_rows<1>,  block_rows<2>,  block_rows<3>,  block_rows<4>,
    block_rows<5>,   block_rows<6>,  block_rows<7>,  block_rows<8>,  block_rows<9>,
    block_rows<10>,  block_rows<11>, block_rows<12>, block_rows<13>, block_rows<14>,
    block_rows<15>,  block_rows<16>};

}  // namespace

extern "C" {

// out[rows, outputs] (float32) = x[rows, inputs] @ W^T as W8A8Linear computes it; x bf16 (1)
// or float32 (0), rows x_stride elements apart; weights packed as above (codes + 128);
// inputs a multiple of 16 (whole 2-quad steps), outputs of 16.
void channel_int8_linear(const void* x, int x_bf16, int64_t rows, int64_t x_stride,
                         int64_t inputs, const uint8_t* weights, const float* channel_scales,
                         int64_t outputs, float* out, int threads) {
  // reused across calls; read through these pointers by the team below (a thread_local
  // named inside the parallel region would be each worker's own, empty)
  if (rows <= 0) return;
  thread_local std::vector<int8_t> codes_buffer;
  thread_local std::vector<float> scales_buffer;
  thread_local std::vector<int32_t> corrections_buffer;
  codes_buffer.resize(rows * inputs);
  scales_buffer.resize(rows);
  corrections_buffer.resize(rows);
  int8_t* const codes = codes_buffer.data();
  float* const row_scales = scales_buffer.data();
  int32_t* const corrections = corrections_buffer.data();
  for (int64_t r = 0; r < rows; ++r) {
    quantize_row(x, x_bf16 != 0, r * x_stride, inputs, codes + r * inputs, row_scales + r,
                 corrections + r);
  }
  const int64_t blocks = outputs / kLanes;
  const int64_t block_bytes = inputs * kLanes;
  if (rows <= kGroupRows) {
    // static: each thread's blocks are consecutive, one sequential stream of weights
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; ++b) {
      kBlockRows[rows](codes, row_scales, corrections, inputs, weights + b * block_bytes,
                       channel_scales + b * kLanes, out + b * kLanes, outputs);
    }
    return;
  }
  // Rows in chunks: a chunk's codes stay in the core's caches while every tile passes (all
  // of a long prompt's rows at once would be read from further out for each tile).
  const int64_t tiles = (blocks + kTileBlocks - 1) / kTileBlocks;
  const int64_t chunk_rows = std::max<int64_t>(kTileRows, kChunkBytes / inputs);
#pragma omp parallel num_threads(threads)
  for (int64_t chunk = 0; chunk < rows; chunk += chunk_rows) {
    const int64_t chunk_end = std::min(rows, chunk + chunk_rows);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t block = t * kTileBlocks;
      const int count = static_cast<int>(std::min<int64_t>(kTileBlocks, blocks - block));
      // the next tile's blocks asked for one a row tile, while this one's products run
      const int64_t next_blocks = std::min<int64_t>(kTileBlocks, blocks - block - kTileBlocks);
      for (int64_t row0 = chunk, i = 0; row0 < chunk_end; row0 += kTileRows, ++i) {
        const int n = static_cast<int>(std::min<int64_t>(kTileRows, chunk_end - row0));
        const uint8_t* ahead =
            i < next_blocks ? weights + (block + kTileBlocks + i) * block_bytes : nullptr;
        kTileRowKernels[n](codes + row0 * inputs, row_scales + row0, corrections + row0, inputs,
                           weights + block * block_bytes, count, channel_scales + block * kLanes,
                           ahead, out + row0 * outputs + block * kLanes, outputs);
      }
    }
  }
}

}  // extern "C"

// int4 (or int8) weights x int8 activations for decode rows on x86 CPUs (engine.weights:
// w4a8, w8a8g).
//
// Why: torch's int4 CPU kernel makes one pass over the weights per row, so a 16-row decode
// step reads them 16 times; here each weight block is read once and multiplied with every
// row while it sits in registers. The activations are quantized to int8 in blocks of 32
// (one scale per block, as llama.cpp's Q8_1 for its Q4_1 dot products), so each group's
// dot product is an exact integer sum (AVX-512 VNNI `vpdpbusd`; AVX2 `vpmaddubsw` pairs,
// which cannot saturate with 4-bit codes); the group scales then apply in float32 with one
// fixed order of operations per row. A row's result therefore depends on that row alone,
// whatever the row count, thread count or instruction set (both paths give the same bits).
//
// Layout (packed by server/engine/w4a8.py): the output channels in blocks of 16; for block
// b and group g, 256 bytes: 4 vectors of 64 bytes, lane l (bytes 4l..4l+3) holding channel
// 16b+l's codes for inputs 32g+8v+p (low nibble) and 32g+8v+4+p (high nibble), p = 0..3.
// 8-bit codes: 512 bytes, 8 vectors of 64 bytes, vector q's lane l holding channel 16b+l's
// codes for inputs 32g+4q+p. params[b][g] = 16 float16 scales, then 16 float16 offsets (as
// GGUF's Q4_1 stores them: 64 bytes a group of 16 channels, a sixth of the 4-bit block's
// bytes where float32 took a third): w = code * scale + offset.

#include <cpuid.h>
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels.h"
#include "lora_rows.h"
#include "norm_row.h"
#include "vec16.h"
#include "vec8.h"

namespace {

using ragtune::load8;
using ragtune::store8;
using ragtune::store16;

constexpr int64_t kGroup = 32;
constexpr int64_t kLanes = 16;

// 8 float16 values as float32 (F16C, on every AVX2 CPU)
__attribute__((target("avx2,fma,f16c"))) inline __m256 half8(const uint16_t* x) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
}

// 16 float16 values as float32 (a group's scales or offsets for a block of 16 channels)
__attribute__((target("avx512f,avx2,fma,f16c"))) inline __m512 half16(const uint16_t* x) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
}

// acc + a group's exact integer sums scaled: (sums * (scale * row_scale)) + offset *
// row_scaled_sum, in this order in every 16-lane path (VNNI, AMX), so they give the same bits
__attribute__((target("avx512f,avx2,fma"))) inline __m512 add_group(
    __m512 acc, __m512 sums, __m512 scale, __m512 offset, float row_scale, float row_sum) {
  acc = _mm512_fmadd_ps(sums, _mm512_mul_ps(scale, _mm512_set1_ps(row_scale)), acc);
  return _mm512_fmadd_ps(offset, _mm512_set1_ps(row_sum), acc);
}

// Rows' activations as int8 codes in blocks of 32, each block's scale and scale * sum of codes.
struct QuantizedRows {
  std::vector<int8_t> codes;
  std::vector<float> scales;
  std::vector<float> scaled_sums;
};

// Buffers for `rows` rows; rows past the last are zeros up to a multiple of 16 (the AMX path
// reads whole tiles). The rows themselves are filled by quantize_row, in the GEMM's team.
void size_rows(int64_t rows, int64_t inputs, QuantizedRows& out) {
  const int64_t groups = inputs / kGroup;
  const int64_t padded = (rows + 15) / 16 * 16;
  out.codes.resize(padded * inputs);
  out.scales.resize(padded * groups);
  out.scaled_sums.resize(padded * groups);
  std::memset(out.codes.data() + rows * inputs, 0, (padded - rows) * inputs);
  std::fill(out.scales.begin() + rows * groups, out.scales.end(), 0.0f);
  std::fill(out.scaled_sums.begin() + rows * groups, out.scaled_sums.end(), 0.0f);
}

// A group's scale = amax / 127 and codes = round(x * (127 / amax)): the same values whatever
// the vector width below (max and the integer sum are exact; each code its own product).
__attribute__((target("avx2,fma"))) void quantize_row_avx2(const void* x, bool bf16, int64_t at,
                                                           int64_t inputs, int8_t* codes,
                                                           float* scales, float* scaled_sums) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t g = 0; g < inputs / kGroup; ++g) {
    __m256 v[4];
    __m256 top = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      v[j] = load8(x, bf16, at + g * kGroup + 8 * j);
      top = _mm256_max_ps(top, _mm256_and_ps(v[j], magnitude));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    const float amax = _mm_cvtss_f32(m4);
    const float scale = amax / 127.0f;
    const __m256 inverse = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    __m256i q[4];
    __m256i total = _mm256_setzero_si256();
    for (int j = 0; j < 4; ++j) {
      const __m256 scaled = _mm256_mul_ps(v[j], inverse);
      q[j] = _mm256_cvtps_epi32(
          _mm256_round_ps(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      total = _mm256_add_epi32(total, q[j]);
    }
    const __m256i packed = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])),
        order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + g * kGroup), packed);
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
    s4 = _mm_hadd_epi32(s4, s4);
    s4 = _mm_hadd_epi32(s4, s4);
    scales[g] = scale;
    scaled_sums[g] = scale * static_cast<float>(_mm_cvtsi128_si32(s4));
  }
}

// The same on AVX-512: a group in two vectors of 16 (half the instructions)
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))) void quantize_row_avx512(
    const void* x, bool bf16, int64_t at, int64_t inputs, int8_t* codes, float* scales,
    float* scaled_sums) {
  for (int64_t g = 0; g < inputs / kGroup; ++g) {
    const __m512 low = ragtune::load16(x, bf16, at + g * kGroup);
    const __m512 high = ragtune::load16(x, bf16, at + g * kGroup + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(low), _mm512_abs_ps(high)));
    const float scale = amax / 127.0f;
    const __m512 inverse = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    const __m512i q_low = _mm512_cvtps_epi32(_mm512_roundscale_ps(
        _mm512_mul_ps(low, inverse), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const __m512i q_high = _mm512_cvtps_epi32(_mm512_roundscale_ps(
        _mm512_mul_ps(high, inverse), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + g * kGroup), _mm512_cvtsepi32_epi8(q_low));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + g * kGroup + 16),
                     _mm512_cvtsepi32_epi8(q_high));
    scales[g] = scale;
    scaled_sums[g] =
        scale * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q_low, q_high)));
  }
}

// row r of x (x_stride elements apart) into `out`
inline void quantize_row(const void* x, bool bf16, int64_t r, int64_t x_stride, int64_t inputs,
                         bool avx512, QuantizedRows& out) {
  const int64_t groups = inputs / kGroup;
  (avx512 ? quantize_row_avx512 : quantize_row_avx2)(
      x, bf16, r * x_stride, inputs, out.codes.data() + r * inputs,
      out.scales.data() + r * groups, out.scaled_sums.data() + r * groups);
}

// The group's codes as 8 vectors of quads (quad q: inputs 4q..4q+3 of the group, lane l
// holding channel l's four codes): 4-bit codes unpack from 4 vectors of nibbles, 8-bit
// codes are 8 vectors as stored. `Half` picks the 32-byte half of each vector (AVX2).
template <int Bits>
constexpr int64_t kGroupBytes = Bits == 4 ? 256 : 512;

// A later block's weights, asked for group by group while this block's are multiplied. The
// weights stream from memory once per call (a step's ~50 MB never stay in cache), and in
// blocks of a few KB, about a page: the hardware prefetchers restart at every page and left
// the kernel waiting on memory at 12-16 GB/s of the machine's ~45 (EPYC, AVX-512: a 16-row
// SmolLM2 layer's four GEMMs took 214 µs from memory, 124 in cache; 155 with this).
struct Ahead {
  const uint8_t* block = nullptr;  // null: nothing to ask for (another row tile asked)
  const uint16_t* params = nullptr;
};

constexpr Ahead kNothingAhead{};

constexpr int64_t kAheadBlocks = 2;  // 1 and 4 measured within noise of 2

// block b's Ahead: the block kAheadBlocks later, if there is one
inline Ahead ahead_of(int64_t b, int64_t blocks, const uint8_t* packed, const uint16_t* params,
                      int64_t groups, int64_t group_bytes) {
  const int64_t later = b + kAheadBlocks;
  if (later >= blocks) return kNothingAhead;
  return {packed + later * groups * group_bytes, params + later * groups * 2 * kLanes};
}

template <int Bits>
inline void prefetch_group(const Ahead& ahead, int64_t g) {
  if (ahead.block == nullptr) return;
  const char* codes = reinterpret_cast<const char*>(ahead.block + g * kGroupBytes<Bits>);
  for (int64_t line = 0; line < kGroupBytes<Bits>; line += 64) {
    _mm_prefetch(codes + line, _MM_HINT_T0);
  }
  _mm_prefetch(reinterpret_cast<const char*>(ahead.params + g * 32), _MM_HINT_T0);
}

// out[i] = residual[i] + out[i] for n values (a multiple of 8), each sum in float32 rounded
// once to the rows' dtype: torch's `x + y` on two bf16 or float32 rows, bit for bit
__attribute__((target("avx2,fma"))) void add_residual(const void* residual, void* out, int64_t n,
                                                      bool bf16) {
  for (int64_t i = 0; i < n; i += 8) {
    store8(out, bf16, i, _mm256_add_ps(load8(residual, bf16, i), load8(out, bf16, i)));
  }
}

// AVX2: a block's 16 lanes as two halves of 8; pairs of u8 x s8 products summed in int16
// (8 quads of 4-bit codes times int8: at most 8 * 2 * 15 * 127 = 30,480, no saturation).
// 8-bit codes go through the same path as their two nibbles: sum = 16 * high + low.
template <int Bits>
__attribute__((target("avx2,fma"))) inline __m256i group_sums_avx2(const uint8_t* codes,
                                                                   int half,
                                                                   const int32_t* quads) {
  const __m256i nibble = _mm256_set1_epi8(0x0f);
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (Bits == 4) {
    __m256i pairs = _mm256_setzero_si256();
    for (int v = 0; v < 4; ++v) {
      const __m256i raw =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 64 * v + 32 * half));
      const __m256i low = _mm256_and_si256(raw, nibble);
      const __m256i high = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nibble);
      pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(low, _mm256_set1_epi32(quads[2 * v])));
      pairs = _mm256_add_epi16(pairs,
                               _mm256_maddubs_epi16(high, _mm256_set1_epi32(quads[2 * v + 1])));
    }
    return _mm256_madd_epi16(pairs, ones);
  } else {
    __m256i low_pairs = _mm256_setzero_si256();
    __m256i high_pairs = _mm256_setzero_si256();
    for (int q = 0; q < 8; ++q) {
      const __m256i raw =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 64 * q + 32 * half));
      const __m256i quad = _mm256_set1_epi32(quads[q]);
      low_pairs = _mm256_add_epi16(low_pairs,
                                   _mm256_maddubs_epi16(_mm256_and_si256(raw, nibble), quad));
      high_pairs = _mm256_add_epi16(
          high_pairs,
          _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(raw, 4), nibble), quad));
    }
    return _mm256_add_epi32(_mm256_slli_epi32(_mm256_madd_epi16(high_pairs, ones), 4),
                            _mm256_madd_epi16(low_pairs, ones));
  }
}

template <int Bits, int Rows>
__attribute__((target("avx2,fma,f16c"))) void tile_avx2(const QuantizedRows& a, int64_t row0,
                                                   int64_t inputs, const uint8_t* block,
                                                   const uint16_t* params, int64_t outputs,
                                                   int64_t column, void* out, bool bf16,
                                                   const Ahead& ahead) {
  const int64_t groups = inputs / kGroup;
  for (int half = 0; half < 2; ++half) {
    __m256 acc[Rows];
    for (int r = 0; r < Rows; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      if (half == 0) prefetch_group<Bits>(ahead, g);
      const uint8_t* codes = block + g * kGroupBytes<Bits>;
      const __m256 scale = half8(params + g * 32 + half * 8);
      const __m256 offset = half8(params + g * 32 + 16 + half * 8);
      for (int r = 0; r < Rows; ++r) {
        const int64_t row = row0 + r;
        const int32_t* quads =
            reinterpret_cast<const int32_t*>(a.codes.data() + row * inputs + g * kGroup);
        const __m256 sums = _mm256_cvtepi32_ps(group_sums_avx2<Bits>(codes, half, quads));
        const __m256 row_scale = _mm256_mul_ps(scale, _mm256_set1_ps(a.scales[row * groups + g]));
        acc[r] = _mm256_fmadd_ps(sums, row_scale, acc[r]);
        acc[r] = _mm256_fmadd_ps(offset, _mm256_set1_ps(a.scaled_sums[row * groups + g]), acc[r]);
      }
    }
    for (int r = 0; r < Rows; ++r) {
      store8(out, bf16, (row0 + r) * outputs + column + half * 8, acc[r]);
    }
  }
}

// AVX-512 VNNI: a block's 16 lanes in one register, vpdpbusd sums 4 products per lane exactly
// (in int32, without saturation, for 8-bit codes too).
template <int Bits, int Rows>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c"))) void tile_vnni(
    const QuantizedRows& a, int64_t row0, int64_t inputs, const uint8_t* block,
    const uint16_t* params, int64_t outputs, int64_t column, void* out, bool bf16,
    const Ahead& ahead) {
  const int64_t groups = inputs / kGroup;
  const __m512i nibble = _mm512_set1_epi8(0x0f);
  __m512 acc[Rows];
  for (int r = 0; r < Rows; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    prefetch_group<Bits>(ahead, g);
    const uint8_t* codes = block + g * kGroupBytes<Bits>;
    __m512i w[8];
    if constexpr (Bits == 4) {
      for (int v = 0; v < 4; ++v) {
        const __m512i raw = _mm512_loadu_si512(codes + 64 * v);
        w[2 * v] = _mm512_and_si512(raw, nibble);
        w[2 * v + 1] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nibble);
      }
    } else {
      for (int q = 0; q < 8; ++q) w[q] = _mm512_loadu_si512(codes + 64 * q);
    }
    const __m512 scale = half16(params + g * 32);
    const __m512 offset = half16(params + g * 32 + 16);
    for (int r = 0; r < Rows; ++r) {
      const int64_t row = row0 + r;
      const int32_t* quads =
          reinterpret_cast<const int32_t*>(a.codes.data() + row * inputs + g * kGroup);
      __m512i even = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], _mm512_set1_epi32(quads[0]));
      __m512i odd = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[1], _mm512_set1_epi32(quads[1]));
      for (int q = 2; q < 8; q += 2) {
        even = _mm512_dpbusd_epi32(even, w[q], _mm512_set1_epi32(quads[q]));
        odd = _mm512_dpbusd_epi32(odd, w[q + 1], _mm512_set1_epi32(quads[q + 1]));
      }
      const __m512 sums = _mm512_cvtepi32_ps(_mm512_add_epi32(even, odd));
      acc[r] = add_group(acc[r], sums, scale, offset, a.scales[row * groups + g],
                         a.scaled_sums[row * groups + g]);
    }
  }
  for (int r = 0; r < Rows; ++r) store16(out, bf16, (row0 + r) * outputs + column, acc[r]);
}

using Tile = void (*)(const QuantizedRows&, int64_t, int64_t, const uint8_t*, const uint16_t*,
                      int64_t, int64_t, void*, bool, const Ahead&);

constexpr int kMaxTile = 8;

// tiles[isa is VNNI][bits is 8][rows]
template <int Bits>
constexpr Tile kAvx2Tiles[kMaxTile + 1] = {
    nullptr,           tile_avx2<Bits, 1>, tile_avx2<Bits, 2>, tile_avx2<Bits, 3>,
    tile_avx2<Bits, 4>, tile_avx2<Bits, 5>, tile_avx2<Bits, 6>, tile_avx2<Bits, 7>,
    tile_avx2<Bits, 8>};
template <int Bits>
constexpr Tile kVnniTiles[kMaxTile + 1] = {
    nullptr,           tile_vnni<Bits, 1>, tile_vnni<Bits, 2>, tile_vnni<Bits, 3>,
    tile_vnni<Bits, 4>, tile_vnni<Bits, 5>, tile_vnni<Bits, 6>, tile_vnni<Bits, 7>,
    tile_vnni<Bits, 8>};

// AMX-INT8 (Sapphire Rapids and later), for steps of kAmxFrom rows or more: 16 rows at once
// and a group's 16 x 16 x 32 products in one tdpbsud, activations (signed) as the A tile
// straight from the quantized rows, a block's group of codes (unsigned) as the B tile (the
// 8-bit layout already is AMX's; 4-bit codes unpacked as for VNNI). The integer sums are the
// VNNI path's and the float32 epilogue is the same per row, in the same order: the same bits.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

constexpr int64_t kAmxRows = 16;
constexpr int64_t kAmxFrom = 12;  // rows in a call from which AMX beats VNNI (9: -20 %, 16: +17 %)

#define RAGTUNE_AMX_TARGET \
  __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

// a group's 4-bit codes as AMX's B tile (8 quads x 16 channels x 4 bytes), as tile_vnni's w[]
RAGTUNE_AMX_TARGET inline void unpack_group(const uint8_t* codes, uint8_t* tile) {
  const __m512i nibble = _mm512_set1_epi8(0x0f);
  for (int v = 0; v < 4; ++v) {
    const __m512i raw = _mm512_loadu_si512(codes + 64 * v);
    _mm512_store_si512(tile + 128 * v, _mm512_and_si512(raw, nibble));
    _mm512_store_si512(tile + 128 * v + 64, _mm512_and_si512(_mm512_srli_epi16(raw, 4), nibble));
  }
}

// A group's products for 16 rows into C tile 2 or 3, then stored as int32 [16][16] (GCC's
// tile intrinsics take the tile number as a literal: one function each). The tile unit works
// while the vector units scale the previous group's sums: tile stores and vector stores are
// not forwarded to the other unit's loads, so each side reads what the other wrote one group
// earlier.
#define RAGTUNE_GROUP_PRODUCTS(name, acc)                                                    \
  RAGTUNE_AMX_TARGET inline void name(const int8_t* rows, int64_t inputs, const uint8_t* b, \
                                      int32_t* sums) {                                      \
    _tile_loadd(0, rows, inputs);                                                           \
    _tile_loadd(1, b, 64);                                                                  \
    _tile_zero(acc);                                                                        \
    _tile_dpbsud(acc, 0, 1);                                                                \
    _tile_stored(acc, sums, 64);                                                            \
  }
RAGTUNE_GROUP_PRODUCTS(group_products_even, 2)
RAGTUNE_GROUP_PRODUCTS(group_products_odd, 3)
#undef RAGTUNE_GROUP_PRODUCTS

template <int Bits>
RAGTUNE_AMX_TARGET void tile_amx(const QuantizedRows& a, int64_t row0, int64_t count,
                                 int64_t inputs, const uint8_t* block, const uint16_t* params,
                                 int64_t outputs, int64_t column, void* out, bool bf16,
                                 const Ahead& ahead) {
  const int64_t groups = inputs / kGroup;
  alignas(64) int32_t sums[2][kAmxRows][kLanes];
  alignas(64) uint8_t unpacked[2][8 * 64];
  __m512 acc[kAmxRows];
  for (int r = 0; r < kAmxRows; ++r) acc[r] = _mm512_setzero_ps();
  const int8_t* rows = a.codes.data() + row0 * inputs;
  if constexpr (Bits == 4) unpack_group(block, unpacked[0]);
  for (int64_t g = 0; g <= groups; ++g) {
    if (g < groups) {
      prefetch_group<Bits>(ahead, g);
      const uint8_t* b = Bits == 4 ? unpacked[g & 1] : block + g * kGroupBytes<Bits>;
      if (g & 1) {
        group_products_odd(rows + g * kGroup, inputs, b, &sums[1][0][0]);
      } else {
        group_products_even(rows + g * kGroup, inputs, b, &sums[0][0][0]);
      }
      if constexpr (Bits == 4) {
        if (g + 1 < groups) unpack_group(block + (g + 1) * kGroupBytes<4>, unpacked[(g + 1) & 1]);
      }
    }
    if (g == 0) continue;
    const int64_t done = g - 1;  // scale the group before this one, in tile_vnni's order
    const __m512 scale = half16(params + done * 32);
    const __m512 offset = half16(params + done * 32 + 16);
    for (int r = 0; r < kAmxRows; ++r) {
      const int64_t row = row0 + r;
      const __m512 total = _mm512_cvtepi32_ps(_mm512_load_si512(sums[done & 1][r]));
      acc[r] = add_group(acc[r], total, scale, offset, a.scales[row * groups + done],
                         a.scaled_sums[row * groups + done]);
    }
  }
  for (int r = 0; r < count; ++r) store16(out, bf16, (row0 + r) * outputs + column, acc[r]);
}

constexpr TileConfig tile_config() {
  TileConfig config{};
  config.colsb[0] = kGroup, config.rows[0] = kAmxRows;  // A: 16 rows x 32 int8
  config.colsb[1] = 64, config.rows[1] = kGroup / 4;    // B: 8 quads x 16 channels x 4
  config.colsb[2] = 64, config.rows[2] = kAmxRows;      // C: 16 rows x 16 int32, twice
  config.colsb[3] = 64, config.rows[3] = kAmxRows;
  return config;
}

// A constant in memory: built on the stack, GCC dropped the stores ldtilecfg reads (it does
// not see the instruction read them) and the CPU faulted on the leftover bytes.
const TileConfig kTileConfig = tile_config();

__attribute__((target("amx-tile"))) void configure_tiles() { _tile_loadconfig(&kTileConfig); }

__attribute__((target("amx-tile"))) void release_tiles() { _tile_release(); }

// whether this CPU has AMX-INT8 and the kernel let this process use its tile registers
bool has_amx() {
  static const bool amx = [] {
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool tile = (edx >> 24) & 1, int8 = (edx >> 25) & 1;
    if (!tile || !int8) return false;
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return amx;
}

bool has_vnni() {
  static const bool vnni = __builtin_cpu_supports("avx512f") &&
                           __builtin_cpu_supports("avx512bw") &&
                           __builtin_cpu_supports("avx512vl") &&
                           __builtin_cpu_supports("avx512vnni");
  return vnni;
}

}  // namespace

extern "C" {

// 3: AMX-INT8 (and AVX-512 VNNI), 2: AVX-512 VNNI, 1: AVX2, 0: neither (the caller must not
// use this kernel)
int a8_isa() {
  if (has_vnni()) return has_amx() ? 3 : 2;
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                 __builtin_cpu_supports("f16c")
             ? 1
             : 0;
}

// out[rows, outputs] = x[rows, inputs] @ W^T; x (rows x_stride elements apart) and out
// bf16 (1) or float32 (0); bits: 4 (nibbles) or 8 (bytes); isa: 0 the best this CPU has,
// else as a8_isa numbers it. With a row_slot (else null), each row's LoRA delta is added
// after, as lora_rows would (x and out of one dtype). With norm_weight (else null), x's
// rows go through RMSNorm first (rms_norm_rows' arithmetic: the same bits as that call
// before this one); with out_norm_weight (else null), the product's rows go through RMSNorm
// (Gemma 3's norms after attention and after the MLP); with residual (else null; [rows,
// outputs], out's dtype), out is residual + that, rounded as torch adds two rows of that
// dtype: a decoder layer's norms, projection and residual add in one call.
void a8_linear(const void* x, int x_bf16, int64_t rows, int64_t x_stride, int64_t inputs,
               const uint8_t* packed, const uint16_t* params, int64_t outputs, void* out,
               int out_bf16, int threads, int isa, int bits, const int32_t* row_slot,
               const int8_t* const* a_codes, const float* const* a_scales,
               const int8_t* const* bt, const float* const* b_scales, const int32_t* widths,
               const float* norm_weight, float eps, const float* out_norm_weight,
               float out_eps, const void* residual) {
  thread_local QuantizedRows quantized;  // reused across calls; shared by the team below
  QuantizedRows& a = quantized;
  if (norm_weight != nullptr) {
    thread_local std::vector<uint8_t> normed;  // the rows after their norm
    normed.resize(rows * inputs * (x_bf16 != 0 ? 2 : 4));
    void* rows_out = normed.data();
    ragtune::norm_rows(x, x_bf16 != 0, rows, x_stride, inputs, norm_weight, eps, rows_out,
                       threads);
    x = rows_out;
    x_stride = inputs;
  }
  size_rows(rows, inputs, a);
  const int chosen = isa == 0 ? a8_isa() : isa;
  const bool vnni = chosen >= 2;
  // fewer rows: VNNI is faster (measured); has_amx() asks for the tile registers first
  const bool amx = chosen == 3 && rows >= kAmxFrom && has_amx();
  const Tile* tiles = bits == 8 ? (vnni ? kVnniTiles<8> : kAvx2Tiles<8>)
                                : (vnni ? kVnniTiles<4> : kAvx2Tiles<4>);
  const int64_t group_bytes = bits == 8 ? kGroupBytes<8> : kGroupBytes<4>;
  const int64_t blocks = outputs / kLanes;
  const int64_t groups = inputs / kGroup;
  const bool bf16 = out_bf16 != 0;
  // LoRA rows: with fewer slots' row sets than threads (one row at c=1) each thread adds the
  // deltas of the outputs it just computed, in the same team (no second one, no barrier
  // between); else every set over all outputs in a team of its own after (one thread a set)
  const ragtune::LoraTables tables{row_slot, a_codes, a_scales, bt, b_scales, widths};
  const std::vector<ragtune::RowSet> sets =
      row_slot != nullptr ? ragtune::lora_row_sets(rows, tables) : std::vector<ragtune::RowSet>{};
  const bool lora_inside = !sets.empty() && static_cast<int64_t>(sets.size()) < threads;
  const bool lora_wide = ragtune::lora_wide(vnni ? 2 : 1, inputs, outputs);
  // one team for the rows' quantization (16 rows of 1,536: ~5 µs on one thread) and the
  // products; the first loop's barrier has every row quantized before a tile reads it
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) quantize_row(x, x_bf16 != 0, r, x_stride, inputs, vnni, a);
    // each thread's blocks, contiguous (its LoRA deltas cover the same outputs)
    const int64_t team = omp_get_num_threads(), per = (blocks + team - 1) / team;
    const int64_t first = std::min(blocks, omp_get_thread_num() * per);
    const int64_t last = std::min(blocks, first + per);
    if (amx) {
      configure_tiles();  // per thread: a tile configuration is thread state
      for (int64_t b = first; b < last; ++b) {
        const uint8_t* block = packed + b * groups * group_bytes;
        const uint16_t* block_params = params + b * groups * 2 * kLanes;
        const Ahead ahead = ahead_of(b, blocks, packed, params, groups, group_bytes);
        for (int64_t row0 = 0; row0 < rows; row0 += kAmxRows) {
          const int64_t count = rows - row0 < kAmxRows ? rows - row0 : kAmxRows;
          (bits == 8 ? tile_amx<8> : tile_amx<4>)(a, row0, count, inputs, block, block_params,
                                                  outputs, b * kLanes, out, bf16,
                                                  row0 == 0 ? ahead : kNothingAhead);
        }
      }
      release_tiles();
    } else {
      for (int64_t b = first; b < last; ++b) {
        const uint8_t* block = packed + b * groups * group_bytes;
        const uint16_t* block_params = params + b * groups * 2 * kLanes;
        const Ahead ahead = ahead_of(b, blocks, packed, params, groups, group_bytes);
        for (int64_t row0 = 0; row0 < rows; row0 += kMaxTile) {
          const int64_t count = rows - row0 < kMaxTile ? rows - row0 : kMaxTile;
          tiles[count](a, row0, inputs, block, block_params, outputs, b * kLanes, out, bf16,
                       row0 == 0 ? ahead : kNothingAhead);
        }
      }
    }
    if (lora_inside) {
      ragtune::add_lora_sets(sets, lora_wide, x, x_bf16 != 0, x_stride, inputs, outputs, out,
                             tables, first * kLanes, last * kLanes);
    }
  }
  if (!sets.empty() && !lora_inside) {
    ragtune::add_lora_rows(x, x_bf16 != 0, rows, x_stride, inputs, outputs, out, tables,
                           threads, vnni ? 2 : 1);
  }
  if (out_norm_weight != nullptr) {  // in place
    ragtune::norm_rows(out, bf16, rows, outputs, outputs, out_norm_weight, out_eps, out, threads);
  }
  if (residual != nullptr) add_residual(residual, out, rows * outputs, bf16);
}

}  // extern "C"

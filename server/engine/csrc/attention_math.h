// Shared by decode attention (attention_rows.cpp) and prompt attention (attention_prompt.cpp):
// Hugging Face's eager softmax on 8 float lanes, bf16 rounding, and AVX-512 BF16 pair
// products. One copy, so a prompt row and a decode row over the same keys come out the same
// bits (the prompt kernel's contract).
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "vec8.h"

namespace ragtune {

// e^x for x <= 0: Cephes' single-precision polynomial (about 1 ulp)
__attribute__((target("avx2,fma"))) inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_floor_ps(
      _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i two_n =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(two_n));
}

// x rounded to bf16 (nearest even) and widened back, where the compute dtype is bf16
__attribute__((target("avx2,fma"))) inline __m256 round8(__m256 x, bool bf16) {
  if (!bf16) return x;
  __m256i bits = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  bits = _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
  return _mm256_castsi256_ps(_mm256_and_si256(bits, _mm256_set1_epi32(-65536)));
}

__attribute__((target("avx2,fma"))) inline float max8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// scores [G][padded] -> probabilities in place: times the scale, rounded to the compute
// dtype, plus the bias (keys past `length` masked), then softmax in float32, rounded
__attribute__((target("avx2,fma"))) inline void softmax_rows(float* scores, int G, int64_t padded,
                                                      const float* bias, int64_t length,
                                                      float scale_by, bool bf16) {
  const float minus_inf = -std::numeric_limits<float>::infinity();
  const __m256 scale = _mm256_set1_ps(scale_by);
  for (int g = 0; g < G; ++g) {
    float* row_scores = scores + g * padded;
    __m256 top = _mm256_set1_ps(minus_inf);
    for (int64_t t = 0; t < padded; t += 8) {
      __m256 b = _mm256_set1_ps(minus_inf);
      if (t + 8 <= length) {
        b = _mm256_loadu_ps(bias + t);
      } else {
        alignas(32) float part[8];
        for (int64_t i = 0; i < 8; ++i) part[i] = t + i < length ? bias[t + i] : minus_inf;
        b = _mm256_load_ps(part);
      }
      const __m256 raw = _mm256_mul_ps(_mm256_loadu_ps(row_scores + t), scale);
      const __m256 x = _mm256_add_ps(round8(raw, bf16), b);
      _mm256_storeu_ps(row_scores + t, x);
      top = _mm256_max_ps(top, x);
    }
    const __m256 m = _mm256_set1_ps(max8(top));
    __m256 total = _mm256_setzero_ps();
    for (int64_t t = 0; t < padded; t += 8) {
      const __m256 x = _mm256_loadu_ps(row_scores + t);
      const __m256 visible = _mm256_cmp_ps(x, _mm256_set1_ps(minus_inf), _CMP_NEQ_OQ);
      const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(x, m)), visible);
      _mm256_storeu_ps(row_scores + t, e);
      total = _mm256_add_ps(total, e);
    }
    const __m256 sum = _mm256_set1_ps(sum8(total));
    for (int64_t t = 0; t < padded; t += 8) {
      const __m256 p = _mm256_div_ps(_mm256_loadu_ps(row_scores + t), sum);
      _mm256_storeu_ps(row_scores + t, round8(p, bf16));
    }
  }
}

// The keys a row reads: up to its last visible one (bias 0 or -inf over `length` keys).
// Keys past it would add exact zeros to its sums (and -inf to its maximum), so stopping
// there gives the same bits.
inline int64_t visible_extent(const float* bias, int64_t length) {
  int64_t end = length;
  while (end > 0 && bias[end - 1] != 0.0f) --end;
  return end;
}

// ------------------------------------------------ bf16 pairs on AVX-512 BF16 (vdpbf16ps)

#define RAGTUNE_BF16_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))

// words 2i and 2i+1 of the result: a[i] and b[i] (i < 16), from a and b's low 16 words
RAGTUNE_BF16_TARGET inline __m512i interleave_low(__m512i a, __m512i b) {
  const __m512i index = _mm512_set_epi16(
      47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
      39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  return _mm512_permutex2var_epi16(a, index, b);
}

// the same from words 16..31 of a and b
RAGTUNE_BF16_TARGET inline __m512i interleave_high(__m512i a, __m512i b) {
  const __m512i index = _mm512_set_epi16(
      63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24,
      55, 23, 54, 22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
  return _mm512_permutex2var_epi16(a, index, b);
}

RAGTUNE_BF16_TARGET inline __m512 dot_pairs(__m512 acc, __m512i pairs, uint32_t weights) {
  return _mm512_dpbf16_ps(acc, (__m512bh)pairs, (__m512bh)_mm512_set1_epi32(weights));
}

inline uint32_t pair_at(const uint16_t* x, int64_t i) {
  uint32_t pair;
  std::memcpy(&pair, x + i, 4);
  return pair;
}

// f(std::integral_constant<int, G>{}) with G = n for 1..7, else 8: the attention kernels
// are templated on the query heads one task takes (their score sums live in registers)
template <typename F>
inline void with_heads(int64_t n, F&& f) {
  switch (n) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{});
  }
}

}  // namespace ragtune

// Shared by the kernels in this folder: 8 floats in and out of bf16 or float32 rows, and
// their sum.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace ragtune {

// 8 values of a bf16 (bf16 true) or float32 row from index i, as float32
__attribute__((target("avx2,fma"))) inline __m256 load8(const void* x, bool bf16, int64_t i) {
  if (!bf16) return _mm256_loadu_ps(static_cast<const float*>(x) + i);
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(
      static_cast<const uint16_t*>(x) + i));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

// float32 -> bfloat16, round to nearest even (torch's conversion for finite values)
__attribute__((target("avx2,fma"))) inline void store_bf16(uint16_t* out, __m256 v) {
  __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  bits = _mm256_srli_epi32(
      _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i words = _mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), 0xd8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(words));
}

// the sum of 8 lanes, in one fixed order
__attribute__((target("avx2,fma"))) inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// 8 float32 values into a bf16 or float32 row at index i
__attribute__((target("avx2,fma"))) inline void store8(void* out, bool bf16, int64_t i,
                                                       __m256 v) {
  if (bf16) {
    store_bf16(static_cast<uint16_t*>(out) + i, v);
  } else {
    _mm256_storeu_ps(static_cast<float*>(out) + i, v);
  }
}

}  // namespace ragtune

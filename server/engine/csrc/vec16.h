// Shared by the kernels in this folder: 16 floats in and out of bf16 or float32 rows
// (AVX-512 bodies; vec8.h holds the 8-lane ones).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace ragtune {

// 16 values of a bf16 (bf16 true) or float32 row from index i, as float32
__attribute__((target("avx512f,avx512bw,avx2,fma"))) inline __m512 load16(const void* x,
                                                                          bool bf16,
                                                                          int64_t i) {
  if (!bf16) return _mm512_loadu_ps(static_cast<const float*>(x) + i);
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
      static_cast<const uint16_t*>(x) + i));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// 16 float32 values into a bf16 (round to nearest even, as vec8.h's store_bf16) or float32
// row at index i
__attribute__((target("avx512f,avx512bw,avx2,fma"))) inline void store16(void* out, bool bf16,
                                                                         int64_t i, __m512 v) {
  if (!bf16) {
    _mm512_storeu_ps(static_cast<float*>(out) + i, v);
    return;
  }
  __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_srli_epi32(
      _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + i),
                      _mm512_cvtepi32_epi16(bits));
}

}  // namespace ragtune

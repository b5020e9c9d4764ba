// Shared by the kernels in this folder: one row's RMSNorm (csrc/rms_norm.cpp says why and
// its arithmetic), for the norm kernel and for the a8 GEMM that normalizes its own input.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "vec8.h"

namespace ragtune {

// out[out_at..+features) = RMSNorm of x[at..+features) times weight (float32); x and out
// bf16 (bf16 true) or float32; features a multiple of 8
__attribute__((target("avx2,fma"))) inline void norm_row(const void* x, bool bf16, int64_t at,
                                                         int64_t features, const float* weight,
                                                         float eps, void* out, int64_t out_at) {
  __m256 squares = _mm256_setzero_ps();
  for (int64_t j = 0; j < features; j += 8) {
    const __m256 v = load8(x, bf16, at + j);
    squares = _mm256_fmadd_ps(v, v, squares);
  }
  const float scale = 1.0f / std::sqrt(sum8(squares) / static_cast<float>(features) + eps);
  const __m256 s = _mm256_set1_ps(scale);
  for (int64_t j = 0; j < features; j += 8) {
    const __m256 y = _mm256_mul_ps(_mm256_mul_ps(load8(x, bf16, at + j), s),
                                   _mm256_loadu_ps(weight + j));
    store8(out, bf16, out_at + j, y);
  }
}

// Rows of this many values or more normalize on the whole team; fewer cost less than waking it
constexpr int64_t kNormParallelFrom = 32768;

// out[rows, features] (contiguous) = norm_row of each of x's rows (x_stride apart); out may
// be x itself (norm_row reads a value before writing it)
inline void norm_rows(const void* x, bool bf16, int64_t rows, int64_t x_stride,
                      int64_t features, const float* weight, float eps, void* out,
                      int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) \
    if (rows * features >= kNormParallelFrom)
  for (int64_t r = 0; r < rows; ++r) {
    norm_row(x, bf16, r * x_stride, features, weight, eps, out, r * features);
  }
}

}  // namespace ragtune

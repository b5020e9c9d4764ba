// RMSNorm of every row in one call (server/engine/rms_norm.py).
//
// Why: torch has no fused RMSNorm on a CPU; the compact forward ran it as LayerNorm over
// [x, -x] (a concatenation, LayerNorm, a slice), which at 16 bf16 rows of 576 cost ~50 µs a
// norm, 61 norms a SmolLM2 step. Here: the sum of squares in float32 over 8 lanes (reduced
// in one fixed order), 1 / sqrt(mean + eps), x * that * weight in float32, one rounding to
// the output dtype (Gemma's arithmetic; Llama's rounds before the weight, so outputs may
// differ from it by one unit in the last place, as the LayerNorm route did). Each row on its
// own: its bits do not depend on the other rows or the thread count.

#include <immintrin.h>
#include <omp.h>

#include <cmath>
#include <cstdint>

#include "vec8.h"

namespace {

using ragtune::load8;
using ragtune::store8;
using ragtune::sum8;

__attribute__((target("avx2,fma"))) void norm_row(const void* x, bool bf16, int64_t at,
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

}  // namespace

extern "C" {

// out[outer, inner, features] (contiguous) = RMSNorm of x's rows, row (o, i) at
// o * outer_stride + i * inner_stride; x and out bf16 (1) or float32 (0); weight float32;
// features a multiple of 8.
void rms_norm_rows(const void* x, int bf16, int64_t outer, int64_t outer_stride, int64_t inner,
                   int64_t inner_stride, int64_t features, const float* weight, float eps,
                   void* out, int threads) {
  const int64_t rows = outer * inner;
  // a few rows cost less than waking the team
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * features >= 32768)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t at = (r / inner) * outer_stride + (r % inner) * inner_stride;
    norm_row(x, bf16 != 0, at, features, weight, eps, out, r * features);
  }
}

}  // extern "C"

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

#include <cstdint>

#include "kernels.h"
#include "norm_row.h"

extern "C" {

// out[outer, inner, features] (contiguous) = RMSNorm of x's rows, row (o, i) at
// o * outer_stride + i * inner_stride; x and out bf16 (1) or float32 (0); weight float32;
// features a multiple of 8.
void rms_norm_rows(const void* x, int bf16, int64_t outer, int64_t outer_stride, int64_t inner,
                   int64_t inner_stride, int64_t features, const float* weight, float eps,
                   void* out, int threads) {
  const int64_t rows = outer * inner;
#pragma omp parallel for schedule(static) num_threads(threads) \
    if (rows * features >= ragtune::kNormParallelFrom)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t at = (r / inner) * outer_stride + (r % inner) * inner_stride;
    ragtune::norm_row(x, bf16 != 0, at, features, weight, eps, out, r * features);
  }
}

}  // extern "C"

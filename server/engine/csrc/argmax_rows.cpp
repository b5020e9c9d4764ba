// Each row's greedy token and whether its logits are finite, in one pass over a step's logits
// (server/engine/sampler.py).
//
// Why: the sampler decided plain greedy rows with numpy's argmax and checked finiteness with
// torch's sum, two single-threaded passes over [rows, vocab] float32: at 16 rows of Gemma 3's
// 262k-token vocabulary 16.8 MB, ~0.5 ms of a ~17 ms step. Here one pass, rows split between
// the threads: the index of the first maximal logit (numpy's and torch's rule) and whether the
// row's sum is finite (a NaN or infinity anywhere makes it so, in any order of summation).

#include <immintrin.h>
#include <omp.h>

#include <cmath>
#include <cstdint>

namespace {

// first index of the row's largest value (NaNs never compare larger: such a row is not
// finite, and its token is refused), and its float32 sum
__attribute__((target("avx2,fma"))) void summarize_row(const float* x, int64_t n,
                                                       int64_t* index, float* sum) {
  const int64_t whole = n / 8 * 8;
  __m256 best = _mm256_set1_ps(-INFINITY);
  __m256i where = _mm256_set1_epi32(0);
  __m256i at = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 total = _mm256_setzero_ps();
  const __m256i step = _mm256_set1_epi32(8);
  for (int64_t i = 0; i < whole; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 larger = _mm256_cmp_ps(v, best, _CMP_GT_OQ);  // strictly: the first stays
    best = _mm256_blendv_ps(best, v, larger);
    where = _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(where), _mm256_castsi256_ps(at), larger));
    total = _mm256_add_ps(total, v);
    at = _mm256_add_epi32(at, step);
  }
  alignas(32) float lane_best[8];
  alignas(32) int32_t lane_where[8];
  alignas(32) float lane_total[8];
  _mm256_store_ps(lane_best, best);
  _mm256_store_si256(reinterpret_cast<__m256i*>(lane_where), where);
  _mm256_store_ps(lane_total, total);
  float top = -INFINITY, s = 0.0f;
  int64_t found = 0;
  bool any = false;
  for (int l = 0; l < 8; ++l) {
    s += lane_total[l];
    if (whole == 0) continue;
    if (!any || lane_best[l] > top || (lane_best[l] == top && lane_where[l] < found)) {
      top = lane_best[l], found = lane_where[l], any = true;
    }
  }
  for (int64_t i = whole; i < n; ++i) {  // the last few, in index order
    s += x[i];
    if (!any || x[i] > top) top = x[i], found = i, any = true;
  }
  *index = found;
  *sum = s;
}

// The same on AVX-512: 4 independent chains of 16 lanes (one chain waited on each compare and
// blend: latency-bound at the speed of numpy's single pass), masks instead of blends
__attribute__((target("avx512f,avx2,fma"))) void summarize_row512(const float* x, int64_t n,
                                                                  int64_t* index, float* sum) {
  constexpr int kChains = 4;
  const int64_t whole = n / (16 * kChains) * (16 * kChains);
  __m512 best[kChains], total[kChains];
  __m512i where[kChains], at[kChains];
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int k = 0; k < kChains; ++k) {
    best[k] = _mm512_set1_ps(-INFINITY);
    total[k] = _mm512_setzero_ps();
    where[k] = _mm512_setzero_si512();
    at[k] = _mm512_add_epi32(lanes, _mm512_set1_epi32(16 * k));
  }
  const __m512i step = _mm512_set1_epi32(16 * kChains);
  for (int64_t i = 0; i < whole; i += 16 * kChains) {
    for (int k = 0; k < kChains; ++k) {
      const __m512 v = _mm512_loadu_ps(x + i + 16 * k);
      const __mmask16 larger = _mm512_cmp_ps_mask(v, best[k], _CMP_GT_OQ);
      best[k] = _mm512_mask_mov_ps(best[k], larger, v);
      where[k] = _mm512_mask_mov_epi32(where[k], larger, at[k]);
      total[k] = _mm512_add_ps(total[k], v);
      at[k] = _mm512_add_epi32(at[k], step);
    }
  }
  float top = -INFINITY, s = 0.0f;
  int64_t found = 0;
  bool any = false;
  for (int k = 0; k < kChains; ++k) {
    alignas(64) float lane_best[16];
    alignas(64) int32_t lane_where[16];
    _mm512_store_ps(lane_best, best[k]);
    _mm512_store_si512(lane_where, where[k]);
    s += _mm512_reduce_add_ps(total[k]);
    if (whole == 0) continue;
    for (int l = 0; l < 16; ++l) {
      if (!any || lane_best[l] > top || (lane_best[l] == top && lane_where[l] < found)) {
        top = lane_best[l], found = lane_where[l], any = true;
      }
    }
  }
  for (int64_t i = whole; i < n; ++i) {  // the last few, in index order
    s += x[i];
    if (!any || x[i] > top) top = x[i], found = i, any = true;
  }
  *index = found;
  *sum = s;
}

}  // namespace

extern "C" {

// index[r] = the first index of row r's largest logit, finite[r] = 1 if the row's sum is
// finite; x [rows, n] float32, contiguous
void argmax_rows(const float* x, int64_t rows, int64_t n, int64_t* index, int32_t* finite,
                 int threads) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
#pragma omp parallel for schedule(static) num_threads(threads) if (rows > 1 && rows * n >= 65536)
  for (int64_t r = 0; r < rows; ++r) {
    float sum;
    (avx512 ? summarize_row512 : summarize_row)(x + r * n, n, index + r, &sum);
    finite[r] = std::isfinite(sum) ? 1 : 0;
  }
}

}  // extern "C"

// Decode attention for every row of a step in one call (server/engine/attention_rows.py).
//
// Why: torch ran a decode step's attention as a score GEMM, a float32 softmax and a value
// GEMM over a batch of tiny matrices (SmolLM2 at 16 rows: 48 of [3 x 64] x [64 x L]), plus
// two indexed writes for the new keys and values, every layer: 30 % of the engine's time at
// c=16, mostly fixed costs per call. Here one call per layer writes each row's new key and
// value into its slot and attends, one (row, KV head) per task.
//
// Arithmetic: Hugging Face's eager attention. Scores q.k summed in float32, times the scale,
// rounded to the compute dtype; softmax in float32 (max, exp, sum, divide), probabilities
// rounded to the compute dtype; values summed in float32 and rounded once. Keys whose bias
// is -inf are skipped: they would add exact zeros. Every sum runs in an order set by the key
// index alone (lanes by index modulo 8, keys in index order), so a row's result depends on
// its own keys and not on its neighbours, the step's longest extent, the thread count or the
// schedule. One body of 8 lanes for every CPU with AVX2: the same bits on AVX2 and AVX-512
// machines (this kernel is bound by fixed costs and memory, not by vector width).

#include <immintrin.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "vec8.h"

namespace {

using ragtune::load8;
using ragtune::store8;

constexpr int kMaxGroup = 8;  // query heads per KV head handled at once
constexpr int64_t kValueChunk = 16;  // head features summed at once in the value loop

struct Step {
  const void* q;          // [rows, heads, d]: row stride q_stride, head stride d
  int64_t q_stride;
  const void* k_new;      // [rows, kv_heads, d]: row stride k_stride (null: nothing to write)
  int64_t k_stride;
  const void* v_new;      // [rows, kv_heads, d]: row stride v_stride
  int64_t v_stride;
  const int64_t* writes;  // [rows] the position index of each row's new key and value
  void* keys_t;           // [slots, kv_heads, d, capacity]
  void* values;           // [slots, kv_heads, capacity, d]
  int64_t capacity;
  const float* bias;      // [rows, length]: 0 or -inf
  int64_t length;
  int64_t heads, kv_heads, d;
  float scale;
  void* out;  // [rows, heads * d]
  bool bf16;  // every tensor bf16, else float32
};

void write_new(const Step& s, int64_t row, int64_t h) {
  if (s.k_new == nullptr) return;
  const int64_t size = s.bf16 ? 2 : 4;
  const int64_t at = s.writes[row];
  const char* k = static_cast<const char*>(s.k_new) + (row * s.k_stride + h * s.d) * size;
  const char* v = static_cast<const char*>(s.v_new) + (row * s.v_stride + h * s.d) * size;
  char* keys = static_cast<char*>(s.keys_t) + (row * s.kv_heads + h) * s.d * s.capacity * size;
  char* values = static_cast<char*>(s.values) + ((row * s.kv_heads + h) * s.capacity + at) * s.d * size;
  for (int64_t j = 0; j < s.d; ++j) std::memcpy(keys + (j * s.capacity + at) * size, k + j * size, size);
  std::memcpy(values, v, s.d * size);
}

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

__attribute__((target("avx2,fma"))) inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) inline float max8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// scores[g][t..t+8) = q_g . key_t for G query heads; keys [d][stride] from `keys`, float32
// or bf16 (a partial last block comes zero-padded in a float32 copy: the same lane sums)
template <int G>
__attribute__((target("avx2,fma"))) void score_block(const float* query, int64_t d,
                                                     const void* keys, bool bf16, int64_t at,
                                                     int64_t stride, float* scores,
                                                     int64_t scores_stride) {
  __m256 acc[G];
  for (int g = 0; g < G; ++g) acc[g] = _mm256_setzero_ps();
  for (int64_t j = 0; j < d; ++j) {
    const __m256 key = load8(keys, bf16, at + j * stride);
    for (int g = 0; g < G; ++g) acc[g] = _mm256_fmadd_ps(_mm256_set1_ps(query[g * d + j]), key, acc[g]);
  }
  for (int g = 0; g < G; ++g) _mm256_storeu_ps(scores + g * scores_stride, acc[g]);
}

// out_g[c..c+16) = sum over visible t of p[g][t] * value_t[c..c+16), t in index order
template <int G>
__attribute__((target("avx2,fma"))) void value_chunk(const float* probs, int64_t padded,
                                                     const float* bias, int64_t length,
                                                     const void* values, bool bf16,
                                                     int64_t base, int64_t d, int64_t c,
                                                     float* sums) {
  __m256 lo[G], hi[G];
  for (int g = 0; g < G; ++g) lo[g] = hi[g] = _mm256_setzero_ps();
  for (int64_t t = 0; t < length; ++t) {
    if (bias[t] != 0.0f) continue;  // masked: weighs exactly zero
    const __m256 a = load8(values, bf16, base + t * d + c);
    const __m256 b = load8(values, bf16, base + t * d + c + 8);
    for (int g = 0; g < G; ++g) {
      const __m256 p = _mm256_set1_ps(probs[g * padded + t]);
      lo[g] = _mm256_fmadd_ps(p, a, lo[g]);
      hi[g] = _mm256_fmadd_ps(p, b, hi[g]);
    }
  }
  for (int g = 0; g < G; ++g) {
    _mm256_storeu_ps(sums + g * d + c, lo[g]);
    _mm256_storeu_ps(sums + g * d + c + 8, hi[g]);
  }
}

template <int G>
__attribute__((target("avx2,fma"))) void attend_heads(const Step& s, int64_t row, int64_t h,
                                                      int64_t first, std::vector<float>& work) {
  const int64_t d = s.d, length = s.length, group = s.heads / s.kv_heads;
  const int64_t padded = (length + 7) / 8 * 8;
  work.resize(G * padded + 2 * G * d + d * 8);
  float* scores = work.data();
  float* query = scores + G * padded;
  float* sums = query + G * d;
  float* tail = sums + G * d;
  for (int g = 0; g < G; ++g) {
    const int64_t at = row * s.q_stride + (h * group + first + g) * d;
    for (int64_t j = 0; j < d; j += 8) _mm256_storeu_ps(query + g * d + j, load8(s.q, s.bf16, at + j));
  }
  const int64_t key_base = (row * s.kv_heads + h) * d * s.capacity;
  const int64_t whole = length / 8 * 8;
  for (int64_t t = 0; t < whole; t += 8) {
    score_block<G>(query, d, s.keys_t, s.bf16, key_base + t, s.capacity, scores + t, padded);
  }
  if (whole < length) {  // the last keys, zero-padded to 8
    for (int64_t j = 0; j < d; ++j) {
      for (int64_t i = 0; i < 8; ++i) {
        const int64_t at = key_base + j * s.capacity + whole + i;
        float key = 0.0f;
        if (whole + i < length) {
          if (s.bf16) {
            const uint32_t bits = uint32_t(static_cast<const uint16_t*>(s.keys_t)[at]) << 16;
            std::memcpy(&key, &bits, 4);
          } else {
            key = static_cast<const float*>(s.keys_t)[at];
          }
        }
        tail[j * 8 + i] = key;
      }
    }
    score_block<G>(query, d, tail, false, 0, 8, scores + whole, padded);
  }
  const float* bias = s.bias + row * length;
  const float minus_inf = -std::numeric_limits<float>::infinity();
  const __m256 scale = _mm256_set1_ps(s.scale);
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
      const __m256 x = _mm256_add_ps(round8(_mm256_mul_ps(_mm256_loadu_ps(row_scores + t), scale), s.bf16), b);
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
      _mm256_storeu_ps(row_scores + t, round8(_mm256_div_ps(_mm256_loadu_ps(row_scores + t), sum), s.bf16));
    }
  }
  const int64_t value_base = (row * s.kv_heads + h) * s.capacity * d;
  for (int64_t c = 0; c < d; c += kValueChunk) {
    value_chunk<G>(scores, padded, bias, length, s.values, s.bf16, value_base, d, c, sums);
  }
  for (int g = 0; g < G; ++g) {
    const int64_t at = row * s.heads * d + (h * group + first + g) * d;
    for (int64_t j = 0; j < d; j += 8) store8(s.out, s.bf16, at + j, _mm256_loadu_ps(sums + g * d + j));
  }
}

void attend(const Step& s, int64_t row, int64_t h, std::vector<float>& work) {
  const int64_t group = s.heads / s.kv_heads;
  for (int64_t first = 0; first < group; first += kMaxGroup) {
    switch (group - first < kMaxGroup ? group - first : kMaxGroup) {
      case 1: attend_heads<1>(s, row, h, first, work); break;
      case 2: attend_heads<2>(s, row, h, first, work); break;
      case 3: attend_heads<3>(s, row, h, first, work); break;
      case 4: attend_heads<4>(s, row, h, first, work); break;
      case 5: attend_heads<5>(s, row, h, first, work); break;
      case 6: attend_heads<6>(s, row, h, first, work); break;
      case 7: attend_heads<7>(s, row, h, first, work); break;
      default: attend_heads<8>(s, row, h, first, work); break;
    }
  }
}

}  // namespace

extern "C" {

// One decode step's attention in one layer (see the top of this file). head_dim a multiple
// of 16; a row's bias -inf at its write index is not allowed (its own key is visible).
void attention_rows(const void* q, int64_t q_stride, const void* k_new, int64_t k_stride,
                    const void* v_new, int64_t v_stride, const int64_t* writes, void* keys_t, void* values,
                    int64_t capacity, const float* bias, int64_t length, int64_t rows,
                    int64_t heads, int64_t kv_heads, int64_t d, float scale, void* out,
                    int bf16, int threads) {
  const Step s{q, q_stride, k_new, k_stride, v_new, v_stride, writes, keys_t, values, capacity,
               bias, length, heads, kv_heads, d, scale, out, bf16 != 0};
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> work;
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < rows * kv_heads; ++task) {
      const int64_t row = task / kv_heads, h = task % kv_heads;
      write_new(s, row, h);
      attend(s, row, h, work);
    }
  }
}

}  // extern "C"

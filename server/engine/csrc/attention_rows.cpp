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
// index alone (lanes by index, keys in index order), so a row's result depends on its own
// keys and not on its neighbours, the step's longest extent, the thread count or the
// schedule. Two bodies: 8 float lanes on any CPU with AVX2, and bf16 pairs on AVX-512 BF16
// (below); a process uses one.

#include <immintrin.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "attention_math.h"
#include "kernels.h"
#include "vec8.h"

namespace {

using ragtune::load8;
using ragtune::store8;
using ragtune::sum8;
using ragtune::dot_pairs;
using ragtune::exp8;
using ragtune::interleave_high;
using ragtune::interleave_low;
using ragtune::max8;
using ragtune::pair_at;
using ragtune::round8;
using ragtune::softmax_rows;

constexpr int kMaxGroup = 8;  // query heads per KV head handled at once
constexpr int64_t kValueChunk = 16;  // head features summed at once in the value loop
constexpr int64_t kMaxRotatedHead = 256;  // head_dim up to which the kernel rotates q and k

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
  // rotary embedding to apply to q and the new k first (null cos: they come rotated):
  // row r's cos and signed sin at cos + r * rope_stride (the compute dtype), the first
  // rotary_dim features of a head turning
  const void* cos = nullptr;
  const void* signed_sin = nullptr;
  int64_t rope_stride = 0;
  int64_t rotary_dim = 0;
};

// Keys' rows lie `capacity` apart and a value row is one cache line or a few: too short for
// the hardware prefetchers to ramp up before each ends (a layer's keys and values come from
// memory: the step's weights evicted them). Each sweep asks for the rows a few ahead.
inline void prefetch_span(const void* start, int64_t bytes) {
  const char* p = static_cast<const char*>(start);
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(p + i, _MM_HINT_T0);
}

// One head's features rotated as LayerArithmetic._rotate does it in torch: out[i] = x[i] *
// cos[i] + x[partner] * signed_sin[i] (partner: i + half below half, i - half above it, half =
// rotary_dim / 2), each product and the sum rounded to the compute dtype, as torch's three bf16
// ops round them (no fused multiply-add); features from rotary_dim on copied. In and out in
// the compute dtype; a multiple of 8 features per half, else one at a time.
__attribute__((target("avx2,fma"))) void rotate_head(const void* x, int64_t x_at, const void* cos,
                                                     const void* signed_sin, int64_t rope_at,
                                                     int64_t rotary_dim, int64_t d, bool bf16,
                                                     void* out, int64_t out_at) {
  const int64_t half = rotary_dim / 2;
  if (half % 8 == 0) {
    for (int64_t i = 0; i < rotary_dim; i += 8) {
      const int64_t partner = i < half ? i + half : i - half;
      __m256 a = _mm256_mul_ps(load8(x, bf16, x_at + i), load8(cos, bf16, rope_at + i));
      __m256 b = _mm256_mul_ps(load8(x, bf16, x_at + partner), load8(signed_sin, bf16, rope_at + i));
      asm("" : "+x"(a), "+x"(b));  // two roundings, as torch's ops: no fused multiply-add
      store8(out, bf16, out_at + i, _mm256_add_ps(round8(a, bf16), round8(b, bf16)));
    }
  } else {
    for (int64_t i = 0; i < rotary_dim; ++i) {
      const int64_t partner = i < half ? i + half : i - half;
      const auto value = [bf16](const void* p, int64_t at) {
        if (!bf16) return static_cast<const float*>(p)[at];
        const uint32_t bits = uint32_t(static_cast<const uint16_t*>(p)[at]) << 16;
        float f;
        std::memcpy(&f, &bits, 4);
        return f;
      };
      const auto rounded = [bf16](float f) {
        if (!bf16) return f;
        uint32_t bits;
        std::memcpy(&bits, &f, 4);
        bits = (bits + 0x7fff + ((bits >> 16) & 1)) & 0xffff0000u;
        std::memcpy(&f, &bits, 4);
        return f;
      };
      float a = value(x, x_at + i) * value(cos, rope_at + i);
      float b = value(x, x_at + partner) * value(signed_sin, rope_at + i);
      asm("" : "+x"(a), "+x"(b));  // no fused multiply-add
      const float sum = rounded(a) + rounded(b);
      if (bf16) {
        uint32_t bits;
        std::memcpy(&bits, &sum, 4);
        static_cast<uint16_t*>(out)[out_at + i] =
            static_cast<uint16_t>((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
      } else {
        static_cast<float*>(out)[out_at + i] = sum;
      }
    }
  }
  const int64_t size = bf16 ? 2 : 4;
  if (rotary_dim < d) {
    std::memcpy(static_cast<char*>(out) + (out_at + rotary_dim) * size,
                static_cast<const char*>(x) + (x_at + rotary_dim) * size, (d - rotary_dim) * size);
  }
}

void write_new(const Step& s, int64_t row, int64_t h) {
  if (s.k_new == nullptr) return;
  const int64_t size = s.bf16 ? 2 : 4;
  const int64_t at = s.writes[row];
  const char* k = static_cast<const char*>(s.k_new) + (row * s.k_stride + h * s.d) * size;
  const char* v = static_cast<const char*>(s.v_new) + (row * s.v_stride + h * s.d) * size;
  char* keys = static_cast<char*>(s.keys_t) + (row * s.kv_heads + h) * s.d * s.capacity * size;
  char* values = static_cast<char*>(s.values) + ((row * s.kv_heads + h) * s.capacity + at) * s.d * size;
  alignas(32) char rotated[kMaxRotatedHead * 4];
  if (s.cos != nullptr) {  // the new key rotated first (into a head-sized buffer)
    rotate_head(k, 0, s.cos, s.signed_sin, row * s.rope_stride, s.rotary_dim, s.d, s.bf16,
                rotated, 0);
    k = rotated;
  }
  for (int64_t j = 0; j < s.d; ++j) std::memcpy(keys + (j * s.capacity + at) * size, k + j * size, size);
  std::memcpy(values, v, s.d * size);
}

// The task's G query heads from `first`, rotated where the step asks (into `buffer`, the
// compute dtype, heads d apart), else where they lie: the pointer to read them at
const void* task_queries(const Step& s, int64_t row, int64_t first_head, int G, void* buffer) {
  const int64_t size = s.bf16 ? 2 : 4;
  const char* q = static_cast<const char*>(s.q) + (row * s.q_stride + first_head * s.d) * size;
  if (s.cos == nullptr) return q;
  for (int g = 0; g < G; ++g) {
    rotate_head(q, g * s.d, s.cos, s.signed_sin, row * s.rope_stride, s.rotary_dim, s.d, s.bf16,
                buffer, g * s.d);
  }
  return buffer;
}

// scores[g][0..padded) = q_g . key_t for G query heads, keys [d][capacity] float32 or bf16
// from `at`: each feature's row of keys read in one sweep (rows lie capacity apart: reading
// a block of keys across every row at once starved the prefetchers), the sums kept in
// `scores` (L1), each lane summing over the features in order
template <int G>
__attribute__((target("avx2,fma"))) void score_rows(const float* query, int64_t d,
                                                    const void* keys, bool bf16, int64_t at,
                                                    int64_t capacity, int64_t length,
                                                    float* scores, int64_t padded) {
  for (int64_t i = 0; i < G * padded; ++i) scores[i] = 0.0f;
  const int64_t whole = length / 8 * 8;
  alignas(32) float tail[8];
  const int64_t size = bf16 ? 2 : 4;
  for (int64_t j = 0; j < d; ++j) {
    const int64_t row = at + j * capacity;
    if (j + 2 < d) prefetch_span(static_cast<const char*>(keys) + (row + 2 * capacity) * size, length * size);
    __m256 q[G];
    for (int g = 0; g < G; ++g) q[g] = _mm256_set1_ps(query[g * d + j]);
    for (int64_t t = 0; t < padded; t += 8) {
      __m256 key;
      if (t < whole) {
        key = load8(keys, bf16, row + t);
      } else {  // the last keys, zero-padded to 8
        for (int64_t i = 0; i < 8; ++i) {
          float value = 0.0f;
          if (t + i < length) {
            if (bf16) {
              const uint32_t bits = uint32_t(static_cast<const uint16_t*>(keys)[row + t + i]) << 16;
              std::memcpy(&value, &bits, 4);
            } else {
              value = static_cast<const float*>(keys)[row + t + i];
            }
          }
          tail[i] = value;
        }
        key = _mm256_load_ps(tail);
      }
      for (int g = 0; g < G; ++g) {
        float* sums = scores + g * padded + t;
        _mm256_storeu_ps(sums, _mm256_fmadd_ps(q[g], key, _mm256_loadu_ps(sums)));
      }
    }
  }
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
  const int64_t size = bf16 ? 2 : 4;
  for (int64_t t = 0; t < length; ++t) {
    if (c == 0 && t + 8 < length) {  // the first sweep brings every row in
      prefetch_span(static_cast<const char*>(values) + (base + (t + 8) * d) * size, d * size);
    }
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

// The keys row `row` reads: up to its last visible one. A step's rows share one bias width
// (the longest row's extent), yet each row's keys past its own last visible one are masked:
// they would add exact zeros to its sums (and -inf to its maximum), so stopping there gives
// the same bits, and a short row beside a long one no longer scores the long one's keys
// (served at c=16, rows' lengths spread out: most of the step's attention was such keys).
int64_t row_extent(const Step& s, int64_t row) {
  return ragtune::visible_extent(s.bias + row * s.length, s.length);
}

template <int G>
__attribute__((target("avx2,fma"))) void attend_heads(const Step& s, int64_t row, int64_t h,
                                                      int64_t first, std::vector<float>& work) {
  const int64_t d = s.d, length = row_extent(s, row), group = s.heads / s.kv_heads;
  const int64_t padded = (length + 7) / 8 * 8;
  work.resize(G * padded + 2 * G * d);
  float* scores = work.data();
  float* query = scores + G * padded;
  float* sums = query + G * d;
  alignas(32) char rotated[kMaxGroup * kMaxRotatedHead * 4];
  const void* q = task_queries(s, row, h * group + first, G, rotated);
  for (int g = 0; g < G; ++g) {
    for (int64_t j = 0; j < d; j += 8) {
      _mm256_storeu_ps(query + g * d + j, load8(q, s.bf16, g * d + j));
    }
  }
  const int64_t key_base = (row * s.kv_heads + h) * d * s.capacity;
  score_rows<G>(query, d, s.keys_t, s.bf16, key_base, s.capacity, length, scores, padded);
  const float* bias = s.bias + row * s.length;
  softmax_rows(scores, G, padded, bias, length, s.scale, s.bf16);
  const int64_t value_base = (row * s.kv_heads + h) * s.capacity * d;
  for (int64_t c = 0; c < d; c += kValueChunk) {
    value_chunk<G>(scores, padded, bias, length, s.values, s.bf16, value_base, d, c, sums);
  }
  for (int g = 0; g < G; ++g) {
    const int64_t at = row * s.heads * d + (h * group + first + g) * d;
    for (int64_t j = 0; j < d; j += 8) {
      store8(s.out, s.bf16, at + j, _mm256_loadu_ps(sums + g * d + j));
    }
  }
}

// ------------------------------------------------ bf16 pairs on AVX-512 BF16 (vdpbf16ps)
//
// Where the compute dtype is bf16 and the CPU has AVX-512 BF16: products of bf16 pairs
// summed in float32 (as the bf16 GEMMs of torch's route), 16 lanes, two keys or two head
// features a step: 3-4x fewer instructions than the 8-lane float path. Other sums than that
// path (one process uses one), the same rules: lanes by index, keys in index order (pairs
// of neighbours, a key past the row's own keys weighing an exact zero), so a row's bits
// still depend on its own keys alone.

// scores[g][0..padded) = q_g . key_t, keys [d][capacity] bf16 from `at`: two features' rows
// of keys a sweep (see score_rows), the last keys zero-padded by a masked load
template <int G>
RAGTUNE_BF16_TARGET void score_rows16(const uint16_t* query, int64_t d, const uint16_t* keys,
                                      int64_t at, int64_t capacity, int64_t length,
                                      float* scores, int64_t padded) {
  for (int64_t i = 0; i < G * padded; ++i) scores[i] = 0.0f;
  for (int64_t j = 0; j < 8 && j < d; ++j) prefetch_span(keys + at + j * capacity, length * 2);
  for (int64_t j = 0; j < d; j += 2) {
    const uint16_t* even_row = keys + at + j * capacity;
    const uint16_t* odd_row = even_row + capacity;
    if (j + 8 < d) {
      prefetch_span(even_row + 8 * capacity, length * 2);
      prefetch_span(odd_row + 8 * capacity, length * 2);
    }
    uint32_t q[G];
    for (int g = 0; g < G; ++g) q[g] = pair_at(query, g * d + j);
    for (int64_t t = 0; t < padded; t += 16) {
      const __mmask16 valid = length - t >= 16 ? 0xffff : (1u << (length - t)) - 1;
      const __m512i even = _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(valid, even_row + t));
      const __m512i odd = _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(valid, odd_row + t));
      const __m512i pairs = interleave_low(even, odd);
      for (int g = 0; g < G; ++g) {
        float* sums = scores + g * padded + t;
        _mm512_storeu_ps(sums, dot_pairs(_mm512_loadu_ps(sums), pairs, q[g]));
      }
    }
  }
}

// sums[g][c..c+32) = sum over key pairs of p[g][t] * value_t[c..c+32)
template <int G>
RAGTUNE_BF16_TARGET void value_pairs(const uint16_t* probs, int64_t padded, const float* bias,
                                     int64_t length, const uint16_t* values, int64_t base,
                                     int64_t d, int64_t c, float* sums) {
  __m512 lo[G], hi[G];
  for (int g = 0; g < G; ++g) lo[g] = hi[g] = _mm512_setzero_ps();
  if (c == 0) prefetch_span(values + base, (length < 16 ? length : 16) * d * 2);
  for (int64_t t = 0; t < length; t += 2) {
    if (c == 0 && t + 17 < length) prefetch_span(values + base + (t + 16) * d, 2 * d * 2);
    const bool second = t + 1 < length;
    if (bias[t] != 0.0f && (!second || bias[t + 1] != 0.0f)) continue;  // both masked
    const __m512i a = _mm512_loadu_si512(values + base + t * d + c);
    const __m512i b = second ? _mm512_loadu_si512(values + base + (t + 1) * d + c)
                             : _mm512_setzero_si512();
    const __m512i low = interleave_low(a, b), high = interleave_high(a, b);
    for (int g = 0; g < G; ++g) {
      const uint32_t p = pair_at(probs, g * padded + t);
      lo[g] = dot_pairs(lo[g], low, p);
      hi[g] = dot_pairs(hi[g], high, p);
    }
  }
  for (int g = 0; g < G; ++g) {
    _mm512_storeu_ps(sums + g * d + c, lo[g]);
    _mm512_storeu_ps(sums + g * d + c + 16, hi[g]);
  }
}

template <int G>
RAGTUNE_BF16_TARGET void attend_heads_bf16(const Step& s, int64_t row, int64_t h,
                                           int64_t first, std::vector<float>& work) {
  const int64_t d = s.d, length = row_extent(s, row), group = s.heads / s.kv_heads;
  const int64_t padded = (length + 15) / 16 * 16;
  // floats: scores [G][padded], sums [G][d]; then bf16 probabilities [G][padded]
  work.resize(G * padded + G * d + G * padded / 2);
  float* scores = work.data();
  float* sums = scores + G * padded;
  uint16_t* probs = reinterpret_cast<uint16_t*>(sums + G * d);
  const uint16_t* keys = static_cast<const uint16_t*>(s.keys_t);
  alignas(32) char rotated[kMaxGroup * kMaxRotatedHead * 2];
  const uint16_t* query =
      static_cast<const uint16_t*>(task_queries(s, row, h * group + first, G, rotated));
  const int64_t key_base = (row * s.kv_heads + h) * d * s.capacity;
  score_rows16<G>(query, d, keys, key_base, s.capacity, length, scores, padded);
  const float* bias = s.bias + row * s.length;
  softmax_rows(scores, G, padded, bias, length, s.scale, true);
  for (int64_t i = 0; i < G * padded; ++i) {  // already bf16 values: the high halves
    uint32_t bits;
    std::memcpy(&bits, scores + i, 4);
    probs[i] = static_cast<uint16_t>(bits >> 16);
  }
  const uint16_t* values = static_cast<const uint16_t*>(s.values);
  const int64_t value_base = (row * s.kv_heads + h) * s.capacity * d;
  for (int64_t c = 0; c < d; c += 32) {
    value_pairs<G>(probs, padded, bias, length, values, value_base, d, c, sums);
  }
  for (int g = 0; g < G; ++g) {
    const int64_t at = row * s.heads * d + (h * group + first + g) * d;
    for (int64_t j = 0; j < d; j += 8) store8(s.out, true, at + j, _mm256_loadu_ps(sums + g * d + j));
  }
}

// Ask for a task's keys and values (up to its row's last visible key) into L2 while the task
// before it computes: each task's keys and values are cold (the step's weights evicted them),
// and the first rows of a task waited on memory before the sweeps' own prefetches caught up.
void prefetch_task(const Step& s, int64_t row, int64_t h) {
  const int64_t size = s.bf16 ? 2 : 4, length = row_extent(s, row);
  const char* keys = static_cast<const char*>(s.keys_t) + (row * s.kv_heads + h) * s.d * s.capacity * size;
  for (int64_t j = 0; j < s.d; ++j) {
    const char* p = keys + j * s.capacity * size;
    for (int64_t i = 0; i < length * size; i += 64) _mm_prefetch(p + i, _MM_HINT_T1);
  }
  const char* values = static_cast<const char*>(s.values) + (row * s.kv_heads + h) * s.capacity * s.d * size;
  for (int64_t i = 0; i < length * s.d * size; i += 64) _mm_prefetch(values + i, _MM_HINT_T1);
}

void attend(const Step& s, int64_t row, int64_t h, std::vector<float>& work, bool pairs) {
  const int64_t group = s.heads / s.kv_heads;
  for (int64_t first = 0; first < group; first += kMaxGroup) {
    const int64_t n = group - first < kMaxGroup ? group - first : kMaxGroup;
    ragtune::with_heads(n, [&](auto heads) {
      constexpr int kG = decltype(heads)::value;
      (pairs ? attend_heads_bf16<kG> : attend_heads<kG>)(s, row, h, first, work);
    });
  }
}

}  // namespace

extern "C" {

// 1 where the CPU has AVX-512 BF16 (the bf16 pair path), else 0
int attention_pairs_supported() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
}

// One decode step's attention in one layer (see the top of this file). head_dim a multiple
// of 16; pairs (bf16 with head_dim a multiple of 32, where attention_pairs_supported): the
// AVX-512 BF16 path. With cos (else null; head_dim at most 256), q and the new k are rotated
// first (LayerArithmetic._rotate's arithmetic): row r's cos and signed sin at r * rope_stride,
// the first rotary_dim features of each head turning.
void attention_rows(const void* q, int64_t q_stride, const void* k_new, int64_t k_stride,
                    const void* v_new, int64_t v_stride, const int64_t* writes, void* keys_t,
                    void* values, int64_t capacity, const float* bias, int64_t length,
                    int64_t rows, int64_t heads, int64_t kv_heads, int64_t d, float scale,
                    void* out, int bf16, int threads, int pairs, const void* cos,
                    const void* signed_sin, int64_t rope_stride, int64_t rotary_dim) {
  const Step s{q,     q_stride, k_new, k_stride,   v_new,      v_stride,    writes,
               keys_t, values,  capacity, bias,    length,     heads,       kv_heads,
               d,     scale,    out,   bf16 != 0,  d <= kMaxRotatedHead ? cos : nullptr,
               signed_sin, rope_stride, rotary_dim};
  const bool use_pairs = pairs != 0 && bf16 != 0 && d % 32 == 0;
  const int64_t tasks = rows * kv_heads;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> work;
    // tasks dealt round-robin, so each thread knows its next one and asks for it early
    const int64_t team = omp_get_num_threads();
    for (int64_t task = omp_get_thread_num(); task < tasks; task += team) {
      if (task + team < tasks) prefetch_task(s, (task + team) / kv_heads, (task + team) % kv_heads);
      const int64_t row = task / kv_heads, h = task % kv_heads;
      write_new(s, row, h);
      attend(s, row, h, work, use_pairs);
    }
  }
}

}  // extern "C"

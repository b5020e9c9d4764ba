// A prompt chunk's attention in one call per layer (server/engine/attention_rows.py: prompt).
//
// Why: torch ran it as a score GEMM over every key of the chunk's extent (the causal half
// that the mask hides included), a float32 softmax over [heads, rows, keys] through memory
// and a value GEMM: ~40 % of a long prompt's prefill. Here a task takes a few query rows of
// one KV head with the query heads that share it, keeps their score sums in registers over
// the head's features, reads each key and value once for all of them, and stops every row
// at its own last visible key.
//
// Arithmetic: decode's bf16 pair path (attention_rows.cpp) to the bit: scores summed lane by
// key index over feature pairs in order, softmax_rows, values summed over key pairs in
// order, a pair whose keys are both masked skipped and a row's odd last key paired with a
// zero value. So a prompt row's result depends on its own visible keys alone (not on its
// chunk, the rows beside it or the thread count), and equals a decode step's at the same
// position over the same keys. That body needs AVX-512 BF16 and bf16; elsewhere (float32,
// the AVX2 kind's default, or bf16 without AVX-512 BF16) a second body does what decode's
// 8-float-lane path does, to the bit: scores summed lane by key index over the features in
// order, values over the visible keys in order (below).

#include <immintrin.h>
#include <omp.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "attention_math.h"
#include "vec8.h"

namespace {

using ragtune::dot_pairs;
using ragtune::interleave_high;
using ragtune::interleave_low;
using ragtune::pair_at;
using ragtune::softmax_rows;
using ragtune::store8;

constexpr int kMaxHeads = 8;     // query heads per KV head in one task (more: several tasks)
constexpr int kMaxVectors = 12;  // (row, query head) score sums a task keeps in registers

struct Prompt {
  const uint16_t* q;  // [rows, heads, d]: row stride q_stride, heads d apart
  int64_t q_stride;
  const uint16_t* keys_t;  // key t's feature j of KV head h at h * k_head + j * k_feature + t
  int64_t k_head, k_feature;
  const uint16_t* values;  // feature c of key t of KV head h at h * v_head + t * v_key + c
  int64_t v_head, v_key;
  const void* bias;  // [rows, length]: 0 or -inf, float32 or (bias_bf16) bf16
  bool bias_bf16;
  int64_t length;
  int64_t rows, heads, kv_heads, d;
  float scale;
  uint16_t* out;  // [rows, heads * d]
  bool bf16 = true;  // q, keys, values and out in bf16, else float32 (the float body only)
  // the keys and values packed once a call (pack_keys, pack_values), zero past `length`
  uint16_t* keys_packed = nullptr;
  uint16_t* values_packed = nullptr;
  float* keys_float = nullptr;  // the float body's: [kv_heads][key_blocks][d][16] float32
  int64_t key_blocks = 0, value_pairs = 0;
  // per row, found once a call (read_masks): its bias as float32 [rows, length], its last
  // visible key + 1, and which blocks of 16 keys it sees [rows, key_blocks]
  const float* bias_f = nullptr;
  int64_t* extents = nullptr;
  char* sees = nullptr;
};

// Keys of KV head h, 16 at a time, as the score loop's bf16 pairs: block b's feature pair
// (j, j+1) is 32 words, key i's two features at words 2i, 2i+1 (interleave_low of the two
// features' rows). Read once per call instead of once per task, from 64-byte runs instead of
// 32-byte ones `capacity` apart (rows a power of two apart share a few L1 sets).
RAGTUNE_BF16_TARGET void pack_keys(const Prompt& s, int64_t h, int64_t b) {
  const int64_t t = b * 16, count = s.length - t < 16 ? s.length - t : 16;
  const __mmask16 valid = count == 16 ? 0xffff : (1u << count) - 1;
  const uint16_t* keys = s.keys_t + h * s.k_head + t;
  uint16_t* out = s.keys_packed + (h * s.key_blocks + b) * 16 * s.d;
  for (int64_t j = 0; j < s.d; j += 2) {
    const __m512i even =
        _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(valid, keys + j * s.k_feature));
    const __m512i odd =
        _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(valid, keys + (j + 1) * s.k_feature));
    _mm512_storeu_si512(out + j * 16, interleave_low(even, odd));
  }
}

// Values of KV head h, two keys at a time, as the value loop's bf16 pairs: pair p's
// features (c .. c+16) are 32 words, key 2p's feature at word 2i and key 2p+1's at 2i+1 (a
// key past `length`: zero)
RAGTUNE_BF16_TARGET void pack_values(const Prompt& s, int64_t h, int64_t p) {
  const int64_t t = 2 * p;
  const uint16_t* a = s.values + h * s.v_head + t * s.v_key;
  const uint16_t* b = a + s.v_key;
  uint16_t* out = s.values_packed + (h * s.value_pairs + p) * 2 * s.d;
  const bool second = t + 1 < s.length;
  for (int64_t c = 0; c < s.d; c += 32) {
    const __m512i x = _mm512_loadu_si512(a + c);
    const __m512i y = second ? _mm512_loadu_si512(b + c) : _mm512_setzero_si512();
    _mm512_storeu_si512(out + 2 * c, interleave_low(x, y));
    _mm512_storeu_si512(out + 2 * c + 32, interleave_high(x, y));
  }
}

float bias_at(const Prompt& s, int64_t row, int64_t t) {
  if (!s.bias_bf16) return static_cast<const float*>(s.bias)[row * s.length + t];
  const uint32_t bits = uint32_t(static_cast<const uint16_t*>(s.bias)[row * s.length + t]) << 16;
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
}

// Row `row`'s mask as float32 (into `out`, where the bias is bf16), its extent and the
// blocks of 16 keys it sees
void read_mask(const Prompt& s, int64_t row, float* out) {
  if (s.bias_bf16) {
    for (int64_t t = 0; t < s.length; ++t) out[t] = bias_at(s, row, t);
  }
  const float* bias = s.bias_f + row * s.length;
  const int64_t end = ragtune::visible_extent(bias, s.length);
  s.extents[row] = end;
  char* sees = s.sees + row * s.key_blocks;
  std::memset(sees, 0, s.key_blocks);
  for (int64_t t = 0; t < end; ++t) {
    if (bias[t] == 0.0f) sees[t / 16] = 1;
  }
}

// Per-thread buffers of one task
struct Work {
  std::vector<float> scores;   // [vectors][padded]
  std::vector<uint16_t> probs; // [vectors][padded]
  std::vector<float> sums;     // [vectors][d]
  std::vector<uint32_t> query; // [vectors][d / 2] feature pairs
  std::vector<float> query_float;  // [vectors][d] (the float body)
  std::vector<char> seen;      // [padded / 16] whether any row sees a block of keys
};

// A block of R query rows (rows of them real): ext[r] = each row's key extent (0 past the
// real rows); w.seen = which blocks of 16 keys any of them sees (masked scores weigh
// nothing: their sums need not be computed). Returns the longest extent.
// Both bodies' set-up.
template <int R>
inline int64_t block_extents(const Prompt& s, int64_t row0, int64_t rows, int64_t* ext,
                             Work& w) {
  int64_t extent = 0;
  for (int r = 0; r < R; ++r) {
    ext[r] = r < rows ? s.extents[row0 + r] : 0;
    if (ext[r] > extent) extent = ext[r];
  }
  const int64_t padded = (extent + 15) / 16 * 16;
  w.seen.assign(padded / 16, 0);
  for (int r = 0; r < rows; ++r) {
    const char* sees = s.sees + (row0 + r) * s.key_blocks;
    for (int64_t b = 0; b < padded / 16; ++b) w.seen[b] |= sees[b];
  }
  return extent;
}

// scores[n][0..padded) = q_n . key_t (lanes past `length`: zero keys; past a row's own
// extent: keys its softmax masks)
template <int N>
RAGTUNE_BF16_TARGET void score_block(const Prompt& s, int64_t h, const uint32_t* query,
                                     int64_t padded, const char* seen, float* scores) {
  const int64_t half = s.d / 2, blocks = padded / 16;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t t = b * 16;
    if (!seen[b]) {  // no row of the task sees these keys (a window's far past): zeros
      for (int n = 0; n < N; ++n) _mm512_storeu_ps(scores + n * padded + t, _mm512_setzero_ps());
      continue;
    }
    const uint16_t* keys = s.keys_packed + (h * s.key_blocks + b) * 16 * s.d;
    __m512 acc[N];
    for (int n = 0; n < N; ++n) acc[n] = _mm512_setzero_ps();
    for (int64_t j = 0; j < half; ++j) {
      const __m512i pairs = _mm512_loadu_si512(keys + j * 32);
      for (int n = 0; n < N; ++n) acc[n] = dot_pairs(acc[n], pairs, query[n * half + j]);
    }
    for (int n = 0; n < N; ++n) _mm512_storeu_ps(scores + n * padded + t, acc[n]);
  }
}

// sums[r * G + g][c..c+32) = sum over row r's visible key pairs of p * value, key order
template <int R, int G>
RAGTUNE_BF16_TARGET void value_block(const Prompt& s, int64_t h, const uint16_t* probs,
                                     int64_t padded, const int64_t* ext, const float* bias,
                                     int64_t extent, int64_t c, float* sums) {
  const uint16_t* values = s.values_packed + h * s.value_pairs * 2 * s.d + 2 * c;
  __m512 lo[R * G], hi[R * G];
  for (int n = 0; n < R * G; ++n) lo[n] = hi[n] = _mm512_setzero_ps();
  for (int64_t t = 0; t < extent; t += 2) {
    const __m512i low = _mm512_loadu_si512(values + t * s.d);
    const __m512i high = _mm512_loadu_si512(values + t * s.d + 32);
    for (int r = 0; r < R; ++r) {
      if (t >= ext[r]) continue;
      const bool second = t + 1 < ext[r];
      const float* row_bias = bias + r * s.length;
      if (row_bias[t] != 0.0f && (!second || row_bias[t + 1] != 0.0f)) continue;
      // a row's odd last key: paired with a zero value, as decode pairs it
      const __m512i l = second ? low : _mm512_maskz_mov_epi16(0x55555555u, low);
      const __m512i u = second ? high : _mm512_maskz_mov_epi16(0x55555555u, high);
      for (int g = 0; g < G; ++g) {
        const uint32_t p = pair_at(probs + (r * G + g) * padded, t);
        lo[r * G + g] = dot_pairs(lo[r * G + g], l, p);
        hi[r * G + g] = dot_pairs(hi[r * G + g], u, p);
      }
    }
  }
  for (int n = 0; n < R * G; ++n) {
    _mm512_storeu_ps(sums + n * s.d + c, lo[n]);
    _mm512_storeu_ps(sums + n * s.d + c + 16, hi[n]);
  }
}

// Rows row0.. (up to R and below row_end; fewer: the rest weigh nothing) and query heads
// first.. (G; an index among all heads) of KV head h
template <int R, int G>
RAGTUNE_BF16_TARGET void attend_block(const Prompt& s, int64_t h, int64_t first, int64_t row0,
                                      int64_t row_end, Work& w) {
  constexpr int N = R * G;
  const int64_t d = s.d, half = d / 2;
  const int64_t rows = row_end - row0 < R ? row_end - row0 : R;
  const float* bias = s.bias_f + row0 * s.length;  // the rows' masks, length apart
  int64_t ext[R];
  const int64_t extent = block_extents<R>(s, row0, rows, ext, w);
  const int64_t padded = (extent + 15) / 16 * 16;
  w.query.assign(N * half, 0u);
  for (int r = 0; r < rows; ++r) {
    const uint16_t* q = s.q + (row0 + r) * s.q_stride + first * d;
    for (int g = 0; g < G; ++g) {
      for (int64_t j = 0; j < half; ++j) {
        w.query[(r * G + g) * half + j] = pair_at(q, g * d + 2 * j);
      }
    }
  }
  w.scores.resize(N * padded);
  w.probs.resize(N * padded + 2);  // a pair read at the last index reads one past it
  score_block<N>(s, h, w.query.data(), padded, w.seen.data(), w.scores.data());
  for (int r = 0; r < rows; ++r) {
    const int64_t own = (ext[r] + 15) / 16 * 16;  // decode's padding for this row's keys
    for (int g = 0; g < G; ++g) {
      float* scores = w.scores.data() + (r * G + g) * padded;
      softmax_rows(scores, 1, own, bias + r * s.length, ext[r], s.scale, true);
      uint16_t* probs = w.probs.data() + (r * G + g) * padded;
      for (int64_t t = 0; t < own; ++t) {  // already bf16 values: the high halves
        uint32_t bits;
        std::memcpy(&bits, scores + t, 4);
        probs[t] = static_cast<uint16_t>(bits >> 16);
      }
    }
  }
  w.sums.resize(N * d);
  for (int64_t c = 0; c < d; c += 32) {
    value_block<R, G>(s, h, w.probs.data(), padded, ext, bias, extent, c, w.sums.data());
  }
  for (int r = 0; r < rows; ++r) {
    for (int g = 0; g < G; ++g) {
      const int64_t at = (row0 + r) * s.heads * d + (first + g) * d;
      const float* sums = w.sums.data() + (r * G + g) * d;
      for (int64_t j = 0; j < d; j += 8) store8(s.out, true, at + j, _mm256_loadu_ps(sums + j));
    }
  }
}

// Rows a task takes for G query heads: as many as keep G x rows score sums in registers
constexpr int rows_for(int G) { return kMaxVectors / G > 0 ? kMaxVectors / G : 1; }

// Rows [row0, row_end) of query heads first.. (G) of KV head h, rows_for(G) at a time
void attend(const Prompt& s, int64_t h, int64_t first, int G, int64_t row0, int64_t row_end,
            Work& w) {
  ragtune::with_heads(G, [&](auto heads) {
    constexpr int kG = decltype(heads)::value;
    for (int64_t r = row0; r < row_end; r += rows_for(kG)) {
      attend_block<rows_for(kG), kG>(s, h, first, r, row_end, w);
    }
  });
}

// ------------------------------------------------ 8 float lanes (float32, or bf16 without
// AVX-512 BF16): decode's float path (attention_rows.cpp score_rows, value_chunk) to the bit

using ragtune::load8;

// Keys of KV head h, 16 at a time, as float32: block b's feature j is 16 floats (keys in
// index order, zero past `length`), so each 8-key half is one aligned-size load
__attribute__((target("avx2,fma"))) void pack_keys_float(const Prompt& s, int64_t h, int64_t b) {
  const int64_t t = b * 16, count = s.length - t < 16 ? s.length - t : 16;
  const int64_t base = h * s.k_head + t;
  float* out = s.keys_float + (h * s.key_blocks + b) * 16 * s.d;
  for (int64_t j = 0; j < s.d; ++j) {
    const int64_t at = base + j * s.k_feature;
    if (count == 16) {
      _mm256_storeu_ps(out + j * 16, load8(s.keys_t, s.bf16, at));
      _mm256_storeu_ps(out + j * 16 + 8, load8(s.keys_t, s.bf16, at + 8));
      continue;
    }
    for (int64_t i = 0; i < 16; ++i) {
      float value = 0.0f;
      if (i < count) {
        if (s.bf16) {
          const uint32_t bits = uint32_t(s.keys_t[at + i]) << 16;
          std::memcpy(&value, &bits, 4);
        } else {
          value = reinterpret_cast<const float*>(s.keys_t)[at + i];
        }
      }
      out[j * 16 + i] = value;
    }
  }
}

// Up to this many queries share each key (and value) load: 2 x 6 sums, two keys' (or
// features') vectors and a broadcast fill 15 of AVX2's 16 registers, and each load feeds 6
// or 12 multiply-adds instead of one broadcast a multiply-add
constexpr int kFloatQueries = 6;

// scores[m][t..t+16) = q_m . key for M queries over one block of 16 keys, each lane summing
// q[j] * key[j] over the features in order from zero (fused multiply-adds, as decode's
// score_rows)
template <int M>
__attribute__((target("avx2,fma"))) void score_queries(const float* keys, int64_t d,
                                                       const float* query, int64_t padded,
                                                       float* scores) {
  __m256 lo[M], hi[M];
  for (int m = 0; m < M; ++m) lo[m] = hi[m] = _mm256_setzero_ps();
  for (int64_t j = 0; j < d; ++j) {
    const __m256 a = _mm256_loadu_ps(keys + j * 16);
    const __m256 b = _mm256_loadu_ps(keys + j * 16 + 8);
    for (int m = 0; m < M; ++m) {
      const __m256 q = _mm256_broadcast_ss(query + m * d + j);
      lo[m] = _mm256_fmadd_ps(q, a, lo[m]);
      hi[m] = _mm256_fmadd_ps(q, b, hi[m]);
    }
  }
  for (int m = 0; m < M; ++m) {
    _mm256_storeu_ps(scores + m * padded, lo[m]);
    _mm256_storeu_ps(scores + m * padded + 8, hi[m]);
  }
}

// scores[n][0..padded) = q_n . key_t for the task's N queries
template <int N>
__attribute__((target("avx2,fma"))) void score_block_float(const Prompt& s, int64_t h,
                                                           const float* query, int64_t padded,
                                                           const char* seen, float* scores) {
  constexpr int kRest = N % kFloatQueries;
  const int64_t d = s.d, blocks = padded / 16;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t t = b * 16;
    if (!seen[b]) {  // no row of the task sees these keys: zeros
      for (int n = 0; n < N; ++n) {
        _mm256_storeu_ps(scores + n * padded + t, _mm256_setzero_ps());
        _mm256_storeu_ps(scores + n * padded + t + 8, _mm256_setzero_ps());
      }
      continue;
    }
    const float* keys = s.keys_float + (h * s.key_blocks + b) * 16 * d;
    for (int n = 0; n + kFloatQueries <= N; n += kFloatQueries) {
      score_queries<kFloatQueries>(keys, d, query + n * d, padded, scores + n * padded + t);
    }
    if constexpr (kRest > 0) {
      constexpr int n = N - kRest;
      score_queries<kRest>(keys, d, query + n * d, padded, scores + n * padded + t);
    }
  }
}

// sums[r * G + g][c..c+16) for rows r0..r0+RG: the sum over row r's visible keys t, in
// order, of p * value_t (as decode's value_chunk); a row's visibility read once a key
template <int RG, int G>
__attribute__((target("avx2,fma"))) void value_rows(const Prompt& s, int64_t h, int r0,
                                                    const float* probs, int64_t padded,
                                                    const int64_t* ext, const float* bias,
                                                    int64_t c, float* sums) {
  constexpr int M = RG * G;
  __m256 lo[M], hi[M];
  for (int m = 0; m < M; ++m) lo[m] = hi[m] = _mm256_setzero_ps();
  int64_t extent = 0;
  for (int r = 0; r < RG; ++r) extent = ext[r0 + r] > extent ? ext[r0 + r] : extent;
  const int64_t base = h * s.v_head + c;
  for (int64_t t = 0; t < extent; ++t) {
    const __m256 a = load8(s.values, s.bf16, base + t * s.v_key);
    const __m256 b = load8(s.values, s.bf16, base + t * s.v_key + 8);
    for (int r = 0; r < RG; ++r) {
      if (t >= ext[r0 + r] || bias[(r0 + r) * s.length + t] != 0.0f) continue;  // weighs 0
      for (int g = 0; g < G; ++g) {
        const __m256 p = _mm256_broadcast_ss(probs + ((r0 + r) * G + g) * padded + t);
        lo[r * G + g] = _mm256_fmadd_ps(p, a, lo[r * G + g]);
        hi[r * G + g] = _mm256_fmadd_ps(p, b, hi[r * G + g]);
      }
    }
  }
  for (int m = 0; m < M; ++m) {
    _mm256_storeu_ps(sums + (r0 * G + m) * s.d + c, lo[m]);
    _mm256_storeu_ps(sums + (r0 * G + m) * s.d + c + 8, hi[m]);
  }
}

// Rows a value pass takes at once: as many whole rows as fit kFloatQueries queries (G > 6
// alone: two passes of its heads would need a head split; rows_for keeps G <= 8, 16 sums)
constexpr int value_rows_for(int G) { return kFloatQueries / G > 0 ? kFloatQueries / G : 1; }

// sums[r * G + g][0..d) for the task's rows and query heads
template <int R, int G>
__attribute__((target("avx2,fma"))) void value_block_float(const Prompt& s, int64_t h,
                                                           const float* probs, int64_t padded,
                                                           const int64_t* ext,
                                                           const float* bias, float* sums) {
  constexpr int RG = value_rows_for(G) < R ? value_rows_for(G) : R, kRest = R % RG;
  for (int64_t c = 0; c < s.d; c += 16) {
    for (int r = 0; r + RG <= R; r += RG) {
      value_rows<RG, G>(s, h, r, probs, padded, ext, bias, c, sums);
    }
    if constexpr (kRest > 0) value_rows<kRest, G>(s, h, R - kRest, probs, padded, ext, bias, c, sums);
  }
}

template <int R, int G>
__attribute__((target("avx2,fma"))) void attend_block_float(const Prompt& s, int64_t h,
                                                            int64_t first, int64_t row0,
                                                            int64_t row_end, Work& w) {
  constexpr int N = R * G;
  const int64_t d = s.d;
  const int64_t rows = row_end - row0 < R ? row_end - row0 : R;
  const float* bias = s.bias_f + row0 * s.length;
  int64_t ext[R];
  const int64_t extent = block_extents<R>(s, row0, rows, ext, w);
  const int64_t padded = (extent + 15) / 16 * 16;
  w.query_float.assign(N * d, 0.0f);
  for (int r = 0; r < rows; ++r) {
    const int64_t at = (row0 + r) * s.q_stride + first * d;
    for (int64_t j = 0; j < G * d; j += 8) {
      _mm256_storeu_ps(w.query_float.data() + r * G * d + j, load8(s.q, s.bf16, at + j));
    }
  }
  w.scores.resize(N * padded);
  score_block_float<N>(s, h, w.query_float.data(), padded, w.seen.data(), w.scores.data());
  for (int r = 0; r < rows; ++r) {
    const int64_t own = (ext[r] + 7) / 8 * 8;  // decode's padding for this row's keys
    for (int g = 0; g < G; ++g) {
      softmax_rows(w.scores.data() + (r * G + g) * padded, 1, own, bias + r * s.length, ext[r],
                   s.scale, s.bf16);
    }
  }
  w.sums.resize(N * d);
  value_block_float<R, G>(s, h, w.scores.data(), padded, ext, bias, w.sums.data());
  for (int r = 0; r < rows; ++r) {
    for (int g = 0; g < G; ++g) {
      const int64_t at = (row0 + r) * s.heads * d + (first + g) * d;
      const float* sums = w.sums.data() + (r * G + g) * d;
      for (int64_t j = 0; j < d; j += 8) store8(s.out, s.bf16, at + j, _mm256_loadu_ps(sums + j));
    }
  }
}

void attend_float(const Prompt& s, int64_t h, int64_t first, int G, int64_t row0,
                  int64_t row_end, Work& w) {
  ragtune::with_heads(G, [&](auto heads) {
    constexpr int kG = decltype(heads)::value;
    for (int64_t r = row0; r < row_end; r += rows_for(kG)) {
      attend_block_float<rows_for(kG), kG>(s, h, first, r, row_end, w);
    }
  });
}

}  // namespace

extern "C" {

// One prompt chunk's attention in one layer (see the top of this file): q [rows, heads, d]
// (already rotated), keys and values of the chunk's sequence in the cache (strides in
// elements), bias [rows, length] float32 or bf16, out [rows, heads * d]; q, keys, values and
// out in bf16 (bf16 1) or float32. pairs 1: the bf16 pair body (bf16, head_dim a multiple of
// 32, AVX-512 BF16: attention_pairs_supported), as decode takes it; else the float body
// (head_dim a multiple of 16, AVX2).
void attention_prompt(const void* q, int64_t q_stride, const void* keys_t, int64_t k_head,
                      int64_t k_feature, const void* values, int64_t v_head, int64_t v_key,
                      const void* bias, int bias_bf16, int64_t length, int64_t rows,
                      int64_t heads, int64_t kv_heads, int64_t d, float scale, void* out,
                      int bf16, int pairs, int threads) {
  Prompt s{static_cast<const uint16_t*>(q),      q_stride,
                 static_cast<const uint16_t*>(keys_t), k_head,
                 k_feature,                            static_cast<const uint16_t*>(values),
                 v_head,                               v_key,
                 bias,                                 bias_bf16 != 0,
                 length,                               rows,
                 heads,                                kv_heads,
                 d,                                    scale,
                 static_cast<uint16_t*>(out)};
  s.bf16 = bf16 != 0;
  const bool use_pairs = pairs != 0 && s.bf16 && d % 32 == 0;
  const int64_t group = heads / kv_heads;
  const int64_t parts = (group + kMaxHeads - 1) / kMaxHeads;  // head subgroups a KV head
  const int64_t per_part = (group + parts - 1) / parts;
  const int64_t block = rows_for(static_cast<int>(per_part));
  const int64_t blocks = (rows + block - 1) / block;
  const int64_t tasks = blocks * kv_heads * parts;
  s.key_blocks = (length + 15) / 16;
  s.value_pairs = (length + 1) / 2;
  // the call's buffers, kept between calls (a layer's are the next layer's size: no fresh
  // pages to fault in every call)
  static thread_local std::vector<uint16_t> keys_packed, values_packed;
  static thread_local std::vector<float> keys_float, bias_f;
  static thread_local std::vector<int64_t> extents;
  static thread_local std::vector<char> sees;
  if (use_pairs) {
    keys_packed.resize(kv_heads * s.key_blocks * 16 * d);
    values_packed.resize(kv_heads * s.value_pairs * 2 * d);
    s.keys_packed = keys_packed.data();
    s.values_packed = values_packed.data();
  } else {  // values read where they lie
    keys_float.resize(kv_heads * s.key_blocks * 16 * d);
    s.keys_float = keys_float.data();
  }
  bias_f.resize(bias_bf16 ? rows * length : 0);
  extents.resize(rows);
  sees.resize(rows * s.key_blocks);
  s.bias_f = bias_bf16 ? bias_f.data() : static_cast<const float*>(bias);
  s.extents = extents.data();
  s.sees = sees.data();
  float* const bias_out = bias_f.data();  // thread_local: named here, not in the team
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      read_mask(s, row, bias_bf16 ? bias_out + row * length : nullptr);
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < kv_heads * s.key_blocks; ++i) {
      if (use_pairs) {
        pack_keys(s, i / s.key_blocks, i % s.key_blocks);
      } else {
        pack_keys_float(s, i / s.key_blocks, i % s.key_blocks);
      }
    }
    if (use_pairs) {
#pragma omp for schedule(static)
      for (int64_t i = 0; i < kv_heads * s.value_pairs; ++i) {
        pack_values(s, i / s.value_pairs, i % s.value_pairs);
      }
    }
    Work w;
    // dealt round-robin: neighbouring blocks (whose causal extents differ little) spread
    // over the threads, so each gets a fair share of short and long rows
    const int64_t team = omp_get_num_threads();
    for (int64_t task = omp_get_thread_num(); task < tasks; task += team) {
      const int64_t b = task / (kv_heads * parts), rest = task % (kv_heads * parts);
      const int64_t h = rest / parts, part = rest % parts;
      const int64_t first = part * per_part;
      const int64_t count = group - first < per_part ? group - first : per_part;
      const int64_t row_end = (b + 1) * block < rows ? (b + 1) * block : rows;
      if (use_pairs) {
        attend(s, h, h * group + first, static_cast<int>(count), b * block, row_end, w);
      } else {
        attend_float(s, h, h * group + first, static_cast<int>(count), b * block, row_end, w);
      }
    }
  }
}

}  // extern "C"

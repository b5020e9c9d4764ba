// Decode-time LoRA for every adapter row of a step in one call (server/engine/lora_rowwise.py).
//
// Why: a step that mixes adapters ran, per layer and projection group, a gather, two int8
// GEMMs and a scatter for each adapter slot (4 adapters at c=16: ~1,000 small torch calls a
// step for SmolLM2). Here each row reads its own slot's int8 factors through a table of
// pointers indexed by slot, and adds its delta in place: one call per group and layer,
// whatever the adapter mix. Each row is computed by one thread in one fixed order (float32
// sums over 8 or 16 lanes, reduced the same way every time), so a row's delta depends on the
// row and its adapter alone, not on its neighbours, the row count or the thread count. Rows
// of one adapter share the reading of its factors, up to 4 at a time (each row still summed
// in its own order).
//
// Factors per slot (as lora_rowwise.pack_pair rounds them): A [width, inputs] int8 with one
// float32 scale per row of A, and B in blocks of 16 outputs, [outputs / 16][width][16] int8
// (zeros past the last output), with one float32 scale per output: t = (A x) * a_scale,
// delta = (Bᵀ t) * b_scale. The blocks make B one sequential read: transposed, [width,
// outputs], a block of outputs read `width` rows 16 bytes at a time, as many streams as the
// width, and the factors are cold each step (a SmolLM2 step reads ~7.5 MB of them).

#include <immintrin.h>
#include <omp.h>

#include <cstdint>
#include <vector>

#include "lora_rows.h"
#include "vec16.h"
#include "vec8.h"

namespace {

using ragtune::load8;
using ragtune::store8;
using ragtune::sum8;
using ragtune::load16;
using ragtune::store16;


__attribute__((target("avx2,fma"))) inline __m256 int8x8(const int8_t* codes) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
}


// R rows of one slot (their indexes in `rows`), the factors read once for all of them; each
// row's sums run in the order a lone row's do, so its bits are the same.
template <int R>
__attribute__((target("avx2,fma"))) void lora_rows8(const void* x, bool bf16,
                                                    const int64_t* rows, int64_t x_stride,
                                                    int64_t inputs, int64_t outputs, void* out,
                                                    const int8_t* a, const float* a_scales,
                                                    const int8_t* bt, const float* b_scales,
                                                    int64_t width, int64_t first,
                                                    int64_t last) {
  float t[R][256];
  for (int64_t j = 0; j < width; ++j) {
    const int8_t* a_row = a + j * inputs;
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < inputs; k += 8) {
      const __m256 weights = int8x8(a_row + k);
      for (int r = 0; r < R; ++r) {
        acc[r] = _mm256_fmadd_ps(weights, load8(x, bf16, rows[r] * x_stride + k), acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) t[r][j] = sum8(acc[r]) * a_scales[j];
  }
  for (int64_t n = first; n < last; n += 8) {
    __m256 delta[R];
    for (int r = 0; r < R; ++r) delta[r] = _mm256_setzero_ps();
    for (int64_t j = 0; j < width; ++j) {
      const __m256 weights = int8x8(bt + (n / 16) * width * 16 + j * 16 + n % 16);
      for (int r = 0; r < R; ++r) {
        delta[r] = _mm256_fmadd_ps(weights, _mm256_set1_ps(t[r][j]), delta[r]);
      }
    }
    const __m256 scale = _mm256_loadu_ps(b_scales + n);
    for (int r = 0; r < R; ++r) {
      const int64_t at = rows[r] * outputs + n;
      store8(out, bf16, at, _mm256_fmadd_ps(delta[r], scale, load8(out, bf16, at)));
    }
  }
}

// The same on AVX-512 (16 lanes: other sums than the 8-lane path, so one process uses one
// path for a shape), for lengths in vectors of 16. A second body, not one template over
// both widths: GCC refuses to inline AVX-512 intrinsics into a template instantiated without
// that target (tried), and a target on the template would let AVX2 machines meet AVX-512.
__attribute__((target("avx512f,avx512bw,avx2,fma"))) inline __m512 int8x16(const int8_t* codes) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
}


template <int R>
__attribute__((target("avx512f,avx512bw,avx2,fma"))) void lora_rows16(
    const void* x, bool bf16, const int64_t* rows, int64_t x_stride, int64_t inputs,
    int64_t outputs, void* out, const int8_t* a, const float* a_scales, const int8_t* bt,
    const float* b_scales, int64_t width, int64_t first, int64_t last) {
  float t[R][256];
  for (int64_t j = 0; j < width; ++j) {
    const int8_t* a_row = a + j * inputs;
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < inputs; k += 16) {
      const __m512 weights = int8x16(a_row + k);
      for (int r = 0; r < R; ++r) {
        acc[r] = _mm512_fmadd_ps(weights, load16(x, bf16, rows[r] * x_stride + k), acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) t[r][j] = _mm512_reduce_add_ps(acc[r]) * a_scales[j];
  }
  for (int64_t n = first; n < last; n += 16) {
    __m512 delta[R];
    for (int r = 0; r < R; ++r) delta[r] = _mm512_setzero_ps();
    for (int64_t j = 0; j < width; ++j) {
      const __m512 weights = int8x16(bt + (n / 16) * width * 16 + j * 16);
      for (int r = 0; r < R; ++r) {
        delta[r] = _mm512_fmadd_ps(weights, _mm512_set1_ps(t[r][j]), delta[r]);
      }
    }
    const __m512 scale = _mm512_loadu_ps(b_scales + n);
    for (int r = 0; r < R; ++r) {
      const int64_t at = rows[r] * outputs + n;
      store16(out, bf16, at, _mm512_fmadd_ps(delta[r], scale, load16(out, bf16, at)));
    }
  }
}

template <int R>
void run_set(const ragtune::RowSet& set, bool wide, const void* x, bool bf16, int64_t x_stride,
             int64_t inputs, int64_t outputs, void* out, const ragtune::LoraTables& t,
             int64_t first, int64_t last) {
  const int32_t slot = set.slot;
  (wide ? lora_rows16<R> : lora_rows8<R>)(x, bf16, set.rows, x_stride, inputs, outputs, out,
                                          t.a[slot], t.a_scales[slot], t.bt[slot],
                                          t.b_scales[slot], t.widths[slot], first, last);
}

void run_any_set(const ragtune::RowSet& set, bool wide, const void* x, bool bf16,
                 int64_t x_stride, int64_t inputs, int64_t outputs, void* out,
                 const ragtune::LoraTables& t, int64_t first, int64_t last) {
  switch (set.count) {
    case 1: run_set<1>(set, wide, x, bf16, x_stride, inputs, outputs, out, t, first, last); break;
    case 2: run_set<2>(set, wide, x, bf16, x_stride, inputs, outputs, out, t, first, last); break;
    case 3: run_set<3>(set, wide, x, bf16, x_stride, inputs, outputs, out, t, first, last); break;
    default: run_set<4>(set, wide, x, bf16, x_stride, inputs, outputs, out, t, first, last); break;
  }
}

}  // namespace

namespace ragtune {

std::vector<RowSet> lora_row_sets(int64_t rows, const LoraTables& t) {
  std::vector<RowSet> sets;
  for (int64_t row = 0; row < rows; ++row) {
    const int32_t slot = t.row_slot[row];
    if (slot < 0 || t.a[slot] == nullptr) continue;
    RowSet* open = nullptr;
    for (auto it = sets.rbegin(); it != sets.rend(); ++it) {
      if (it->slot == slot) {
        open = it->count < kSharedRows ? &*it : nullptr;
        break;
      }
    }
    if (open == nullptr) {
      sets.push_back(RowSet{slot, 0, {}});
      open = &sets.back();
    }
    open->rows[open->count++] = row;
  }
  return sets;
}

bool lora_wide(int isa, int64_t inputs, int64_t outputs) {
  return isa >= 2 && inputs % 16 == 0 && outputs % 16 == 0;
}

void add_lora_sets(const std::vector<RowSet>& sets, bool wide, const void* x, bool bf16,
                   int64_t x_stride, int64_t inputs, int64_t outputs, void* out,
                   const LoraTables& t, int64_t first, int64_t last) {
  if (first >= last) return;
  for (const RowSet& set : sets) {
    run_any_set(set, wide, x, bf16, x_stride, inputs, outputs, out, t, first, last);
  }
}

void add_lora_rows(const void* x, bool bf16, int64_t rows, int64_t x_stride, int64_t inputs,
                   int64_t outputs, void* out, const LoraTables& t, int threads, int isa) {
  const bool wide = lora_wide(isa, inputs, outputs);
  const std::vector<RowSet> sets = lora_row_sets(rows, t);
  // fewer sets than threads (one row at c=1): each set's outputs split between the threads,
  // each thread forming the set's A products itself; an output's sums are the same either way
  const int64_t count = static_cast<int64_t>(sets.size());
  const int64_t lanes = wide ? 16 : 8;
  const int64_t parts = count < threads ? threads : 1;
  const int64_t part = (outputs / lanes + parts - 1) / parts * lanes;
#pragma omp parallel for schedule(static) num_threads(threads) if (count * parts > 1)
  for (int64_t task = 0; task < count * parts; ++task) {
    const RowSet& set = sets[task / parts];
    const int64_t first = (task % parts) * part;
    const int64_t last = first + part < outputs ? first + part : outputs;
    if (first >= last) continue;
    run_any_set(set, wide, x, bf16, x_stride, inputs, outputs, out, t, first, last);
  }
}

}  // namespace ragtune

extern "C" {

// out[rows, outputs] += each row's LoRA delta, x and out both bf16 (1) or float32 (0), x's
// rows x_stride elements apart. row_slot[rows]: the row's slot, -1 for none; the tables,
// indexed by slot, hold each slot's factors for this layer and group (a null `a` where the
// slot has none). inputs and outputs are multiples of 8, widths at most 256. isa 2 or 3
// (AVX-512, as a8_isa numbers it) takes the 16-lane path where both lengths are multiples of
// 16, else the 8-lane one.
void lora_rows(const void* x, int bf16, int64_t rows, int64_t x_stride, int64_t inputs,
               int64_t outputs, void* out, const int32_t* row_slot, const int8_t* const* a,
               const float* const* a_scales, const int8_t* const* bt,
               const float* const* b_scales, const int32_t* widths, int threads, int isa) {
  const ragtune::LoraTables tables{row_slot, a, a_scales, bt, b_scales, widths};
  ragtune::add_lora_rows(x, bf16 != 0, rows, x_stride, inputs, outputs, out, tables, threads,
                         isa);
}

}  // extern "C"

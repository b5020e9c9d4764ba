// Decode-time LoRA rows (lora_rows.cpp), also added by the a8 GEMM in the same call
// (a8_linear.cpp) when a projection's adapters all run here.
#pragma once

#include <cstdint>
#include <vector>

namespace ragtune {

// Each slot's factors for one layer and projection group, indexed by slot (a null `a`
// where the slot has none), and each row's slot (-1: none).
struct LoraTables {
  const int32_t* row_slot;
  const int8_t* const* a;
  const float* const* a_scales;
  const int8_t* const* bt;
  const float* const* b_scales;
  const int32_t* widths;
};

// Rows of one slot taken together, at most kSharedRows: the slot's factors are converted
// from int8 once for all of them (16 rows of one adapter: 4 reads instead of 16).
constexpr int kSharedRows = 4;

struct RowSet {
  int32_t slot;
  int count;
  int64_t rows[kSharedRows];
};

// each slot's rows in order, kSharedRows at a time (rows without a slot left out)
std::vector<RowSet> lora_row_sets(int64_t rows, const LoraTables& tables);

// the 16-lane (AVX-512) sums for these lengths, else the 8-lane ones (one process, one path)
bool lora_wide(int isa, int64_t inputs, int64_t outputs);

// out[rows, first..last) += each set's rows' deltas, on the calling thread (first and last
// multiples of 16, or of 8 on the 8-lane path)
void add_lora_sets(const std::vector<RowSet>& sets, bool wide, const void* x, bool bf16,
                   int64_t x_stride, int64_t inputs, int64_t outputs, void* out,
                   const LoraTables& tables, int64_t first, int64_t last);

// out[rows, outputs] += each row's delta; x's rows x_stride elements apart, out contiguous.
void add_lora_rows(const void* x, bool bf16, int64_t rows, int64_t x_stride, int64_t inputs,
                   int64_t outputs, void* out, const LoraTables& tables, int threads, int isa);

}  // namespace ragtune

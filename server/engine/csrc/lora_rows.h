// Decode-time LoRA rows (lora_rows.cpp), also added by the a8 GEMM in the same call
// (a8_linear.cpp) when a projection's adapters all run here.
#pragma once

#include <cstdint>

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

// out[rows, outputs] += each row's delta; x's rows x_stride elements apart, out contiguous.
void add_lora_rows(const void* x, bool bf16, int64_t rows, int64_t x_stride, int64_t inputs,
                   int64_t outputs, void* out, const LoraTables& tables, int threads, int isa);

}  // namespace ragtune

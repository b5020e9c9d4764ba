// The kernels' C entry points that other kernels call (decode_layers.cpp runs a whole decode
// step through them): declared once here and included by their own sources, so a changed
// signature fails to compile instead of being called wrongly.
#pragma once

#include <cstdint>

extern "C" {
void a8_linear(const void* x, int x_bf16, int64_t rows, int64_t x_stride, int64_t inputs,
               const uint8_t* packed, const uint16_t* params, int64_t outputs, void* out,
               int out_bf16, int threads, int isa, int bits, const int32_t* row_slot,
               const int8_t* const* a_codes, const float* const* a_scales,
               const int8_t* const* bt, const float* const* b_scales, const int32_t* widths,
               const float* norm_weight, float eps, const float* out_norm_weight,
               float out_eps, const void* residual);
void attention_rows(const void* q, int64_t q_stride, const void* k_new, int64_t k_stride,
                    const void* v_new, int64_t v_stride, const int64_t* writes, void* keys_t,
                    void* values, int64_t capacity, const float* bias, int64_t length,
                    int64_t rows, int64_t heads, int64_t kv_heads, int64_t d, float scale,
                    void* out, int bf16, int threads, int pairs, const void* cos,
                    const void* signed_sin, int64_t rope_stride, int64_t rotary_dim);
void rms_norm_rows(const void* x, int bf16, int64_t outer, int64_t outer_stride, int64_t inner,
                   int64_t inner_stride, int64_t features, const float* weight, float eps,
                   void* out, int threads);
}

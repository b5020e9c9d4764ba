// A decode step's decoder layers in one call (server/engine/decode_layers.py).
//
// Why: a layer of the compact forward is five kernel calls (the a8 GEMMs with their fused
// norms, LoRA rows and residual adds; decode attention with the rotary embedding) and a dozen
// torch ops around them (views, splits, q/k norms, the GLU's activation and product). Each
// costs a few µs of Python, ctypes and dispatch on one thread while the other spins: a
// 16-row SmolLM2 step spent 2.4 of its 10.1 ms outside the kernels, a one-row step 1.7 of
// 4.8. Here the same kernels run in the same order on the same buffers' contents, so every
// value has the bits the step-by-step route gives it; the Python side hands over pointers once
// a step.
//
// The one op that is not one of these kernels is the GLU's act(gate) * up. Its activation
// comes as a table of torch's own results for every bf16 value (built by torch on this
// machine at load), and the product is torch's: both bf16 values widened, one float32
// multiply, rounded to nearest even with NaN as 0xffff (ATen's cvtfp32_bf16). bf16 only.

#include <immintrin.h>
#include <omp.h>

#include <cstdint>
#include <vector>

#include "kernels.h"

namespace {

// A layer's row of int64 fields (decode_layers.py LAYER_FIELDS, in this order): the four
// projections' packed codes, their params, their bits; the norm weights (float32, 0: none);
// the indices of its attention plan and rotary table.
enum Field : int64_t {
  kCodes = 0,       // qkv, o, gate_up, down
  kParams = 4,
  kBits = 8,
  kInputNorm = 12,
  kMlpNorm,
  kQNorm,
  kKNorm,
  kAttnOutNorm,
  kMlpOutNorm,
  kPlan,
  kRope,
  kFields
};
enum Projection : int64_t { kQkv = 0, kO, kGateUp, kDown, kProjections };
constexpr int64_t kLoraFields = 5;  // a, a_scales, bt, b_scales, widths (lora_rows.h)
constexpr int64_t kPlanFields = 3;  // bias, writes, length
constexpr int64_t kRopeFields = 4;  // cos, signed sin, row stride, rotary_dim

template <typename T>
T* pointer(int64_t field) {
  return reinterpret_cast<T*>(static_cast<intptr_t>(field));
}

struct Step {
  int64_t rows, hidden, heads, kv_heads, d, intermediate;
  float scale, eps;
  int threads, isa, pairs;
  const int32_t* row_slot;
  const int64_t* lora;  // [layers][4][kLoraFields], or null
};

// out = projection `p` of layer `layer` of x (rows `x_stride` apart), as A8Linear's call
void project(const Step& s, const int64_t* layer, int64_t index, int64_t p, const void* x,
             int64_t x_stride, int64_t inputs, int64_t outputs, void* out,
             const float* norm, const float* out_norm, const void* residual) {
  const int64_t* lora = nullptr;
  if (s.lora != nullptr) {
    lora = s.lora + (index * kProjections + p) * kLoraFields;
    if (lora[0] == 0) lora = nullptr;  // no slot of this step has this group
  }
  a8_linear(x, 1, s.rows, x_stride, inputs, pointer<const uint8_t>(layer[kCodes + p]),
            pointer<const uint16_t>(layer[kParams + p]), outputs, out, 1, s.threads, s.isa,
            static_cast<int>(layer[kBits + p]), lora != nullptr ? s.row_slot : nullptr,
            lora != nullptr ? pointer<const int8_t* const>(lora[0]) : nullptr,
            lora != nullptr ? pointer<const float* const>(lora[1]) : nullptr,
            lora != nullptr ? pointer<const int8_t* const>(lora[2]) : nullptr,
            lora != nullptr ? pointer<const float* const>(lora[3]) : nullptr,
            lora != nullptr ? pointer<const int32_t>(lora[4]) : nullptr, norm, s.eps, out_norm,
            s.eps, residual);
}

// torch's bf16 product of two widened bf16 vectors (ATen's cvtfp32_bf16: NaN as 0xffff)
__attribute__((target("avx512f,avx512bw,avx2,fma"))) inline __m256i product16(__m512 a,
                                                                             __m512 b) {
  const __m512 p = _mm512_mul_ps(a, b);
  const __m512i bits = _mm512_castps_si512(p);
  __m512i rounded = _mm512_add_epi32(
      _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1)),
                       _mm512_set1_epi32(0x7fff)),
      bits);
  rounded = _mm512_srli_epi32(rounded, 16);
  const __mmask16 ordered = _mm512_cmp_ps_mask(p, p, _CMP_ORD_Q);
  rounded = _mm512_mask_blend_epi32(ordered, _mm512_set1_epi32(0xffff), rounded);
  return _mm512_cvtepi32_epi16(rounded);
}

// widened bf16 values of 16 table entries at the bf16 codes `codes` (the table has one entry
// past the last code: each gather reads 4 bytes)
__attribute__((target("avx512f,avx512bw,avx2,fma"))) inline __m512 looked_up(
    const uint16_t* table, __m256i codes) {
  const __m512i index = _mm512_cvtepu16_epi32(codes);
  const __m512i words = _mm512_i32gather_epi32(index, table, 2);
  return _mm512_castsi512_ps(_mm512_slli_epi32(words, 16));
}

__attribute__((target("avx512f,avx512bw,avx2,fma"))) inline __m512 widened(const uint16_t* x) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// act[r][i] = table[gate[r][i]] * up[r][i], gate and up the halves of gate_up's rows
__attribute__((target("avx512f,avx512bw,avx2,fma"))) void glu_rows(
    const uint16_t* gate_up, int64_t rows, int64_t intermediate, const uint16_t* table,
    uint16_t* act, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) \
    if (rows * intermediate >= 16384)
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* gate = gate_up + r * 2 * intermediate;
    const uint16_t* up = gate + intermediate;
    uint16_t* out = act + r * intermediate;
    for (int64_t i = 0; i < intermediate; i += 16) {
      const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gate + i));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                          product16(looked_up(table, codes), widened(up + i)));
    }
  }
}

}  // namespace

extern "C" {

// act = act(gate) * up of bf16 rows gate_up [rows, 2 * intermediate] (the kernel's GLU, for
// its check against torch's)
void decode_glu(const uint16_t* gate_up, int64_t rows, int64_t intermediate,
                const uint16_t* act_table, uint16_t* act, int threads) {
  glu_rows(gate_up, rows, intermediate, act_table, act, threads);
}

// 1 where this CPU runs decode_layers (AVX-512 F and BW: its GLU product), else 0
int decode_layers_supported() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}

// Layers 0..count-1 of one decode step on bf16 rows: x [rows, hidden] in, out [rows, hidden]
// the last layer's output (out may not be x). layers: [count][kFields] (see Field); keys_t,
// values, capacities: each layer's cache; plans: [n][kPlanFields]; ropes: [n][kRopeFields];
// lora: [count][4][kLoraFields] (0: no adapter of the step's slots in that group) with
// row_slot, or null; act_table: the activation of every bf16 code, 65,537 entries.
// intermediate a multiple of 16.
void decode_layers(const int64_t* layers, int64_t count, const int64_t* keys_t,
                   const int64_t* values, const int64_t* capacities, const int64_t* plans,
                   const int64_t* ropes, const int32_t* row_slot, const int64_t* lora,
                   const uint16_t* act_table, int64_t rows, int64_t hidden, int64_t heads,
                   int64_t kv_heads, int64_t d, int64_t intermediate, float scale, float eps,
                   int threads, int isa, int pairs, const void* x, void* out) {
  const Step s{rows, hidden, heads, kv_heads, d, intermediate, scale, eps, threads, isa, pairs,
               row_slot, lora};
  const int64_t q_size = heads * d, kv_size = kv_heads * d, qkv_width = q_size + 2 * kv_size;
  // reused across calls (the engine thread's own)
  thread_local std::vector<uint16_t> qkv, q, k, attn, mid, gate_up, act;
  qkv.resize(rows * qkv_width);
  q.resize(rows * q_size);
  k.resize(rows * kv_size);
  attn.resize(rows * q_size);
  mid.resize(rows * hidden);
  gate_up.resize(rows * 2 * intermediate);
  act.resize(rows * intermediate);
  for (int64_t index = 0; index < count; ++index) {
    const int64_t* layer = layers + index * kFields;
    const void* input = index == 0 ? x : out;  // the residual stream
    project(s, layer, index, kQkv, input, hidden, hidden, qkv_width, qkv.data(),
            pointer<const float>(layer[kInputNorm]), nullptr, nullptr);
    const uint16_t* q_rows = qkv.data();
    const uint16_t* k_rows = qkv.data() + q_size;
    int64_t q_stride = qkv_width, k_stride = qkv_width;
    if (layer[kQNorm] != 0) {  // per-head norms (Qwen3, Gemma 3), each head a row of d
      rms_norm_rows(qkv.data(), 1, rows, qkv_width, heads, d, d,
                    pointer<const float>(layer[kQNorm]), eps, q.data(), threads);
      rms_norm_rows(qkv.data() + q_size, 1, rows, qkv_width, kv_heads, d, d,
                    pointer<const float>(layer[kKNorm]), eps, k.data(), threads);
      q_rows = q.data(), k_rows = k.data();
      q_stride = q_size, k_stride = kv_size;
    }
    const int64_t* plan = plans + layer[kPlan] * kPlanFields;
    const int64_t* rope = ropes + layer[kRope] * kRopeFields;
    attention_rows(q_rows, q_stride, k_rows, k_stride, qkv.data() + q_size + kv_size, qkv_width,
                   pointer<const int64_t>(plan[1]), pointer<void>(keys_t[index]),
                   pointer<void>(values[index]), capacities[index],
                   pointer<const float>(plan[0]), plan[2], rows, heads, kv_heads, d, scale,
                   attn.data(), 1, threads, pairs, pointer<const void>(rope[0]),
                   pointer<const void>(rope[1]), rope[2], rope[3]);
    project(s, layer, index, kO, attn.data(), q_size, q_size, hidden, mid.data(), nullptr,
            pointer<const float>(layer[kAttnOutNorm]), input);
    project(s, layer, index, kGateUp, mid.data(), hidden, hidden, 2 * intermediate,
            gate_up.data(), pointer<const float>(layer[kMlpNorm]), nullptr, nullptr);
    glu_rows(gate_up.data(), rows, intermediate, act_table, act.data(), threads);
    project(s, layer, index, kDown, act.data(), intermediate, intermediate, hidden, out,
            nullptr, pointer<const float>(layer[kMlpOutNorm]), mid.data());
  }
}

}  // extern "C"

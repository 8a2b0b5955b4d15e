// Raw-pointer entry points of the CPU kernels (contiguous row-major tensors), kept free of the
// heavy torch headers so that these translation units compile quickly; ops.cpp adapts tensors.
#pragma once

#include <cstdint>

namespace splitvl {

using bf16 = uint16_t;  // raw bf16 bits
using fp8 = uint8_t;    // raw float8_e4m3fn bits

// out[t] = sum_j weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = ids[t, j], summed
// in j order. gate_up [E, H, 2I] (gate = first I columns), down [E, I, H]. T (x, weights,
// out) and W (the expert weights) are float or bf16 (raw uint16 bits): <float, float>,
// <bf16, bf16> and <float, bf16>; or W is fp8 with T float or bf16, and the fp32 block scales
// gate_up_scale [E, ceil(H/128), 2 ceil(I/128)] (gate's column blocks, then up's) and
// down_scale [E, ceil(I/128), ceil(H/128)] (nullptr for other W). Id E routes a row to no
// expert (a zero term). Returns the index of the first id outside [0, E], or -1.
template <typename T, typename W>
int64_t fused_moe(const T* x, const W* gate_up, const W* down, const T* weights,
                  const int64_t* ids, T* out, int64_t num_tokens, int64_t hidden,
                  int64_t inter, int64_t num_experts, int64_t top_k,
                  const float* gate_up_scale = nullptr, const float* down_scale = nullptr);

// out[t] = sum over j in order of weights[t, j] * h[rows[t * k + j]], a zero term where ids[t, j]
// >= E (no expert); each product and partial sum rounded to T (float or bf16). h [n, hidden]
// holds the experts' output rows sorted by expert, rows[t * k + j] is where row (t, j) went.
template <typename T>
void moe_combine(const T* h, const int64_t* rows, const T* weights, const int64_t* ids, T* out,
                 int64_t tokens, int64_t top_k, int64_t hidden, int64_t num_experts);

// out [M, N] = x [M, K] . W^T for W [N, K] in e4m3 with fp32 block scales [ceil(N/128),
// ceil(K/128)]; T (x, out) float or bf16.
template <typename T>
void fp8_linear(const T* x, const fp8* weight, const float* scale, T* out, int64_t rows,
                int64_t out_features, int64_t in_features);

// out [rows, cols] (float or bf16) = W times its block scales, W [rows, cols] e4m3.
template <typename T>
void fp8_dequantize(const fp8* weight, const float* scale, T* out, int64_t rows, int64_t cols);

// Per row of [rows, hidden]: h = x + residual (rounded to T), out = weight * (h * rsqrt(mean(h^2)
// + eps)) with transformers' roundings to T (float or bf16). residual nullptr: h = x, and h_out
// (else written with h) may be nullptr.
template <typename T>
void add_rms_norm(const T* x, const T* residual, const T* weight, T* out, T* h_out,
                  int64_t rows, int64_t hidden, float eps);

// Per token t and head h: q_out[t, h] = rotary(q_weight * RMSNorm(q[t, h])) with cos[t], sin[t]
// ([tokens, d], rotate_half's convention, d even), likewise k; the same roundings as
// add_rms_norm. q's and k's tokens are q_stride / k_stride elements apart, their heads d apart;
// the outputs are contiguous [tokens, heads, d].
template <typename T>
void qk_norm_rope(const T* q, const T* k, int64_t q_stride, int64_t k_stride, const T* q_weight,
                  const T* k_weight, float eps, const T* cos, const T* sin, T* q_out, T* k_out,
                  int64_t tokens, int64_t q_heads, int64_t k_heads, int64_t d);

struct CacheLayout {
  int64_t block_stride, row_stride, head_stride;  // elements; head_dim is contiguous
  int64_t num_blocks, block_size, num_kv_heads, head_dim;
};

// One query token per sequence over its first context_lens[b] cached tokens (block tables
// [B, W] of int32 or int64 I); q, out [B, Hq, D] contiguous fp32; C is the cache's element
// type (float or bf16). Returns the first sequence whose context or table entries are out of
// range, or -1.
template <typename C, typename I>
int64_t paged_decode(const float* q, const C* k_cache, const C* v_cache,
                     const CacheLayout& layout, const I* block_tables,
                     int64_t table_width, const int64_t* context_lens, float* out,
                     int64_t batch, int64_t num_heads, float scale);

}  // namespace splitvl

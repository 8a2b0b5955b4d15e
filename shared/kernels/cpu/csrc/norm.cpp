// Residual add + RMSNorm, and the per-head q/k RMSNorm + rotary of attention, one pass per row
// instead of PyTorch's eight to fifteen ops, in transformers' rounding order: h = x + residual
// rounded to T, n = h * rsqrt(mean(h^2) + eps) rounded to T, out = weight * n rounded to T; then
// rotary as x * cos + rotate_half(x) * sin with each product and the sum rounded to T (each
// rounding is what one bf16 op of the reference does; fp32 rounds nowhere extra). The sum of
// squares is taken in 8 lanes, so it may differ from the reference's in the last fp32 bit.
#include <type_traits>

#include "common.h"
#include "kernels.h"

namespace splitvl {
namespace {

// dst[0:d] = weight * (src * rsqrt(mean(src^2) + eps)), each product rounded to T.
template <typename T>
inline void norm_row(const T* src, const T* weight, int64_t d, float eps, float* dst) {
  f8 ss = splat(0.f);
  for (int64_t c = 0; c < d; c += kLanes) {
    const int n = static_cast<int>(std::min<int64_t>(kLanes, d - c));
    const f8 v = load_row(src + c, n);
    ss += v * v;
  }
  const float inv = 1.f / std::sqrt(hsum(ss) / static_cast<float>(d) + eps);
  for (int64_t c = 0; c < d; c += kLanes) {
    const int n = static_cast<int>(std::min<int64_t>(kLanes, d - c));
    const f8 normed = round_to<T>(load_row(src + c, n) * splat(inv));
    const f8 v = round_to<T>(load_row(weight + c, n) * normed);
    if (n == kLanes) store8(dst + c, v);
    else store_partial(dst + c, v, n);
  }
}

// Heads [heads, d] of one token (rows `stride` apart in src, contiguous in dst): norm, then
// rotary with this token's cos / sin [d].
template <typename T>
inline void norm_rope_heads(const T* src, int64_t stride, int64_t heads, int64_t d,
                            const T* weight, float eps, const T* cos, const T* sin, T* dst,
                            float* n, float* rot) {
  const int64_t half = d / 2;
  for (int64_t h = 0; h < heads; ++h) {
    norm_row(src + h * stride, weight, d, eps, n);
    for (int64_t j = 0; j < half; ++j) {
      rot[j] = -n[j + half];
      rot[j + half] = n[j];
    }
    T* out = dst + h * d;
    for (int64_t c = 0; c < d; c += kLanes) {
      const int m = static_cast<int>(std::min<int64_t>(kLanes, d - c));
      const f8 a = round_to<T>(load_row(n + c, m) * load_row(cos + c, m));
      const f8 b = round_to<T>(load_row(rot + c, m) * load_row(sin + c, m));
      store_row(out + c, round_to<T>(a + b), m);
    }
  }
}

}  // namespace

template <typename T>
void qk_norm_rope(const T* q, const T* k, int64_t q_stride, int64_t k_stride, const T* q_weight,
                  const T* k_weight, float eps, const T* cos, const T* sin, T* q_out, T* k_out,
                  int64_t tokens, int64_t q_heads, int64_t k_heads, int64_t d) {
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>((q_heads + k_heads) * d, 1));
  at::parallel_for(0, tokens, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(2 * d);
    for (int64_t t = t0; t < t1; ++t) {
      const T* c = cos + t * d;
      const T* s = sin + t * d;
      norm_rope_heads(q + t * q_stride, d, q_heads, d, q_weight, eps, c, s,
                      q_out + t * q_heads * d, buf.data(), buf.data() + d);
      norm_rope_heads(k + t * k_stride, d, k_heads, d, k_weight, eps, c, s,
                      k_out + t * k_heads * d, buf.data(), buf.data() + d);
    }
  });
}

template <typename T>
void add_rms_norm(const T* x, const T* residual, const T* weight, T* out, T* h_out,
                  int64_t rows, int64_t hidden, float eps) {
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(hidden, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * hidden;
      const T* rr = residual ? residual + r * hidden : nullptr;
      T* hr = h_out ? h_out + r * hidden : nullptr;
      f8 ss = splat(0.f);
      for (int64_t c = 0; c < hidden; c += kLanes) {
        const int n = static_cast<int>(std::min<int64_t>(kLanes, hidden - c));
        f8 h = load_row(xr + c, n);
        if (rr) h = round_to<T>(h + load_row(rr + c, n));
        if (hr) store_row(hr + c, h, n);
        ss += h * h;
      }
      const T* hsrc = hr ? hr : xr;
      const float inv = 1.f / std::sqrt(hsum(ss) / static_cast<float>(hidden) + eps);
      T* orow = out + r * hidden;
      for (int64_t c = 0; c < hidden; c += kLanes) {
        const int n = static_cast<int>(std::min<int64_t>(kLanes, hidden - c));
        const f8 normed = round_to<T>(load_row(hsrc + c, n) * splat(inv));
        store_row(orow + c, round_to<T>(load_row(weight + c, n) * normed), n);
      }
    }
  });
}

template void qk_norm_rope<float>(const float*, const float*, int64_t, int64_t, const float*,
                                  const float*, float, const float*, const float*, float*,
                                  float*, int64_t, int64_t, int64_t, int64_t);
template void qk_norm_rope<bf16>(const bf16*, const bf16*, int64_t, int64_t, const bf16*,
                                 const bf16*, float, const bf16*, const bf16*, bf16*, bf16*,
                                 int64_t, int64_t, int64_t, int64_t);
template void add_rms_norm<float>(const float*, const float*, const float*, float*, float*,
                                  int64_t, int64_t, float);
template void add_rms_norm<bf16>(const bf16*, const bf16*, const bf16*, bf16*, bf16*, int64_t,
                                 int64_t, float);

}  // namespace splitvl

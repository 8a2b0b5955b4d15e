// Tensor-level checks and the torch.ops.splitvl registrations of the CPU kernels.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/to.h>
#include <torch/library.h>

#include "common.h"
#include "kernels.h"

namespace splitvl {
namespace {

bool supported(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16; }

at::Tensor moe_combine_op(const at::Tensor& h, const at::Tensor& order,
                          const at::Tensor& weights, const at::Tensor& ids, int64_t num_experts) {
  TORCH_CHECK_VALUE(h.dim() == 2 && order.dim() == 1 && weights.dim() == 2 && ids.dim() == 2,
                    "moe_combine: expected h [T*k, H], order [T*k], weights and ids [T, k]");
  const int64_t tokens = ids.size(0), top_k = ids.size(1), hidden = h.size(1);
  TORCH_CHECK_VALUE(weights.sizes() == ids.sizes() && h.size(0) == tokens * top_k &&
                        order.size(0) == tokens * top_k,
                    "moe_combine: h ", h.sizes(), ", order ", order.sizes(), ", weights ",
                    weights.sizes(), " and ids ", ids.sizes(), " disagree");
  TORCH_CHECK_TYPE(supported(h.scalar_type()) && weights.scalar_type() == h.scalar_type(),
                   "moe_combine: h and weights must share one dtype, float32 or bfloat16");
  TORCH_CHECK_TYPE(order.scalar_type() == at::kLong && ids.scalar_type() == at::kLong,
                   "moe_combine: order and ids must be int64");
  at::Tensor out = at::empty({tokens, hidden}, h.options());
  if (tokens == 0 || top_k == 0) return out.zero_();
  const at::Tensor hc = h.contiguous(), wc = weights.contiguous(), ic = ids.contiguous();
  const at::Tensor oc = order.contiguous();
  // rows = order's inverse: where each flat row (t, j) sits among the sorted rows.
  const int64_t n = tokens * top_k;
  std::vector<int64_t> rows(n, -1);
  const int64_t* op = oc.const_data_ptr<int64_t>();
  for (int64_t p = 0; p < n; ++p) {
    TORCH_CHECK_INDEX(op[p] >= 0 && op[p] < n && rows[op[p]] < 0, "moe_combine: order is not "
                      "a permutation of [0, ", n, ") (entry ", op[p], " at ", p, ")");
    rows[op[p]] = p;
  }
  if (h.scalar_type() == at::kFloat) {
    moe_combine<float>(hc.const_data_ptr<float>(), rows.data(), wc.const_data_ptr<float>(),
                       ic.const_data_ptr<int64_t>(), out.data_ptr<float>(), tokens, top_k,
                       hidden, num_experts);
  } else {
    moe_combine<bf16>(reinterpret_cast<const bf16*>(hc.const_data_ptr()), rows.data(),
                      reinterpret_cast<const bf16*>(wc.const_data_ptr()),
                      ic.const_data_ptr<int64_t>(), reinterpret_cast<bf16*>(out.data_ptr()),
                      tokens, top_k, hidden, num_experts);
  }
  return out;
}

at::Tensor fused_moe_op(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down,
                        const at::Tensor& weights, const at::Tensor& ids) {
  TORCH_CHECK_VALUE(x.dim() == 2 && gate_up.dim() == 3 && down.dim() == 3 && weights.dim() == 2 &&
                        ids.dim() == 2,
                    "fused_moe: expected x [T, H], gate_up [E, H, 2I], down [E, I, H], weights "
                    "and ids [T, k]");
  const int64_t num_tokens = x.size(0), hidden = x.size(1), num_experts = gate_up.size(0);
  const int64_t inter = down.size(1), top_k = ids.size(1);
  TORCH_CHECK_VALUE(gate_up.size(1) == hidden && gate_up.size(2) == 2 * inter &&
                        down.size(0) == num_experts && down.size(2) == hidden,
                    "fused_moe: weight shapes ", gate_up.sizes(), " and ", down.sizes(),
                    " do not match hidden size ", hidden);
  TORCH_CHECK_VALUE(ids.size(0) == num_tokens && weights.sizes() == ids.sizes(),
                    "fused_moe: weights ", weights.sizes(), " and ids ", ids.sizes(),
                    " must both be [", num_tokens, ", k]");
  const at::ScalarType act = x.scalar_type(), wt = gate_up.scalar_type();
  TORCH_CHECK_TYPE(supported(act) && supported(wt) && down.scalar_type() == wt &&
                       weights.scalar_type() == act && !(act == at::kBFloat16 && wt == at::kFloat),
                   "fused_moe: x and weights share one dtype, gate_up and down another: float32 "
                   "or bfloat16 throughout, or float32 with bfloat16 expert weights");
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong, "fused_moe: ids must be int64");
  at::Tensor out = at::empty({num_tokens, hidden}, x.options());
  if (num_tokens == 0 || top_k == 0) return out.zero_();
  const at::Tensor xc = x.contiguous(), gc = gate_up.contiguous(), dc = down.contiguous();
  const at::Tensor wc = weights.contiguous(), ic = ids.contiguous();
  int64_t bad;
  auto raw = [](const at::Tensor& t) { return reinterpret_cast<const bf16*>(t.data_ptr()); };
  if (act == at::kFloat && wt == at::kFloat) {
    bad = fused_moe<float, float>(xc.data_ptr<float>(), gc.data_ptr<float>(),
                                  dc.data_ptr<float>(), wc.data_ptr<float>(),
                                  ic.data_ptr<int64_t>(), out.data_ptr<float>(), num_tokens,
                                  hidden, inter, num_experts, top_k);
  } else if (act == at::kFloat) {
    bad = fused_moe<float, bf16>(xc.data_ptr<float>(), raw(gc), raw(dc), wc.data_ptr<float>(),
                                 ic.data_ptr<int64_t>(), out.data_ptr<float>(), num_tokens,
                                 hidden, inter, num_experts, top_k);
  } else {
    bad = fused_moe<bf16, bf16>(raw(xc), raw(gc), raw(dc), raw(wc), ic.data_ptr<int64_t>(),
                                reinterpret_cast<bf16*>(out.data_ptr()), num_tokens, hidden,
                                inter, num_experts, top_k);
  }
  const int64_t bad_id = bad < 0 ? 0 : ic.const_data_ptr<int64_t>()[bad];
  TORCH_CHECK_INDEX(bad < 0, "fused_moe: expert id ", bad_id, " at flat index ", bad,
                    " is outside [0, ", num_experts, "] (", num_experts, ": no expert)");
  return out;
}

// Sizes of fp8 block scales: one per 128 weights along each dimension.
int64_t blocks(int64_t size) { return (size + kFp8Block - 1) / kFp8Block; }

const fp8* fp8_data(const at::Tensor& t) { return reinterpret_cast<const fp8*>(t.data_ptr()); }

at::Tensor fused_moe_fp8_op(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down,
                            const at::Tensor& gate_up_scale, const at::Tensor& down_scale,
                            const at::Tensor& weights, const at::Tensor& ids) {
  TORCH_CHECK_VALUE(x.dim() == 2 && gate_up.dim() == 3 && down.dim() == 3 && weights.dim() == 2 &&
                        ids.dim() == 2,
                    "fused_moe_fp8: expected x [T, H], gate_up [E, H, 2I], down [E, I, H], "
                    "weights and ids [T, k]");
  const int64_t num_tokens = x.size(0), hidden = x.size(1), num_experts = gate_up.size(0);
  const int64_t inter = down.size(1), top_k = ids.size(1);
  TORCH_CHECK_VALUE(gate_up.size(1) == hidden && gate_up.size(2) == 2 * inter &&
                        down.size(0) == num_experts && down.size(2) == hidden,
                    "fused_moe_fp8: weight shapes ", gate_up.sizes(), " and ", down.sizes(),
                    " do not match hidden size ", hidden);
  TORCH_CHECK_VALUE(gate_up_scale.sizes() == at::IntArrayRef({num_experts, blocks(hidden),
                                                              2 * blocks(inter)}) &&
                        down_scale.sizes() == at::IntArrayRef({num_experts, blocks(inter),
                                                               blocks(hidden)}),
                    "fused_moe_fp8: scales ", gate_up_scale.sizes(), " and ", down_scale.sizes(),
                    " are not the 128-blocks of ", gate_up.sizes(), " and ", down.sizes());
  TORCH_CHECK_VALUE(ids.size(0) == num_tokens && weights.sizes() == ids.sizes(),
                    "fused_moe_fp8: weights ", weights.sizes(), " and ids ", ids.sizes(),
                    " must both be [", num_tokens, ", k]");
  const at::ScalarType act = x.scalar_type();
  TORCH_CHECK_TYPE(supported(act) && weights.scalar_type() == act &&
                       gate_up.scalar_type() == at::kFloat8_e4m3fn &&
                       down.scalar_type() == at::kFloat8_e4m3fn &&
                       gate_up_scale.scalar_type() == at::kFloat &&
                       down_scale.scalar_type() == at::kFloat,
                   "fused_moe_fp8: x and weights float32 or bfloat16, the experts float8_e4m3fn, "
                   "their scales float32");
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong, "fused_moe_fp8: ids must be int64");
  at::Tensor out = at::empty({num_tokens, hidden}, x.options());
  if (num_tokens == 0 || top_k == 0) return out.zero_();
  const at::Tensor xc = x.contiguous(), gc = gate_up.contiguous(), dc = down.contiguous();
  const at::Tensor gs = gate_up_scale.contiguous(), ds = down_scale.contiguous();
  const at::Tensor wc = weights.contiguous(), ic = ids.contiguous();
  const int64_t* idp = ic.const_data_ptr<int64_t>();
  const float *gsp = gs.const_data_ptr<float>(), *dsp = ds.const_data_ptr<float>();
  int64_t bad;
  if (act == at::kFloat) {
    bad = fused_moe<float, fp8>(xc.data_ptr<float>(), fp8_data(gc), fp8_data(dc),
                                wc.data_ptr<float>(), idp, out.data_ptr<float>(), num_tokens,
                                hidden, inter, num_experts, top_k, gsp, dsp);
  } else {
    auto raw = [](const at::Tensor& t) { return reinterpret_cast<bf16*>(t.data_ptr()); };
    bad = fused_moe<bf16, fp8>(raw(xc), fp8_data(gc), fp8_data(dc), raw(wc), idp, raw(out),
                               num_tokens, hidden, inter, num_experts, top_k, gsp, dsp);
  }
  const int64_t bad_id = bad < 0 ? 0 : idp[bad];
  TORCH_CHECK_INDEX(bad < 0, "fused_moe_fp8: expert id ", bad_id, " at flat index ", bad,
                    " is outside [0, ", num_experts, "] (", num_experts, ": no expert)");
  return out;
}

at::Tensor fp8_linear_op(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale) {
  TORCH_CHECK_VALUE(x.dim() == 2 && weight.dim() == 2 && scale.dim() == 2,
                    "fp8_linear: expected x [M, K], weight [N, K], scale [ceil(N/128), "
                    "ceil(K/128)]");
  const int64_t rows = x.size(0), in_features = x.size(1), out_features = weight.size(0);
  TORCH_CHECK_VALUE(weight.size(1) == in_features &&
                        scale.sizes() == at::IntArrayRef({blocks(out_features),
                                                          blocks(in_features)}),
                    "fp8_linear: weight ", weight.sizes(), " and scale ", scale.sizes(),
                    " do not fit x ", x.sizes());
  TORCH_CHECK_TYPE(supported(x.scalar_type()) && weight.scalar_type() == at::kFloat8_e4m3fn &&
                       scale.scalar_type() == at::kFloat,
                   "fp8_linear: x float32 or bfloat16, weight float8_e4m3fn, scale float32");
  at::Tensor out = at::empty({rows, out_features}, x.options());
  if (rows == 0) return out;
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous(), sc = scale.contiguous();
  if (x.scalar_type() == at::kFloat) {
    fp8_linear<float>(xc.const_data_ptr<float>(), fp8_data(wc), sc.const_data_ptr<float>(),
                      out.mutable_data_ptr<float>(), rows, out_features, in_features);
  } else {
    fp8_linear<bf16>(reinterpret_cast<const bf16*>(xc.const_data_ptr()), fp8_data(wc),
                     sc.const_data_ptr<float>(), reinterpret_cast<bf16*>(out.mutable_data_ptr()),
                     rows, out_features, in_features);
  }
  return out;
}

at::Tensor fp8_dequantize_op(const at::Tensor& weight, const at::Tensor& scale,
                             at::ScalarType dtype) {
  TORCH_CHECK_VALUE(weight.dim() == 2 && scale.dim() == 2 &&
                        scale.sizes() == at::IntArrayRef({blocks(weight.size(0)),
                                                          blocks(weight.size(1))}),
                    "fp8_dequantize: weight ", weight.sizes(), " and scale ", scale.sizes(),
                    " are not a matrix and its 128-blocks");
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kFloat8_e4m3fn && scale.scalar_type() == at::kFloat &&
                       supported(dtype),
                   "fp8_dequantize: weight float8_e4m3fn, scale float32, out float32 or bfloat16");
  at::Tensor out = at::empty(weight.sizes(), weight.options().dtype(dtype));
  const at::Tensor wc = weight.contiguous(), sc = scale.contiguous();
  const float* sp = sc.const_data_ptr<float>();
  if (dtype == at::kFloat) {
    fp8_dequantize<float>(fp8_data(wc), sp, out.mutable_data_ptr<float>(), weight.size(0),
                          weight.size(1));
  } else {
    fp8_dequantize<bf16>(fp8_data(wc), sp, reinterpret_cast<bf16*>(out.mutable_data_ptr()),
                         weight.size(0), weight.size(1));
  }
  return out;
}

at::Tensor paged_decode_op(const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& block_tables,
                           const at::Tensor& context_lens, double scale) {
  TORCH_CHECK_VALUE(q.dim() == 3 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
                    "paged_decode: expected q [B, Hq, D] and k/v caches [blocks, block_size, "
                    "Hkv, D] of one shape");
  const int64_t batch = q.size(0), num_heads = q.size(1), dim = q.size(2);
  const int64_t num_kv = k_cache.size(2);
  TORCH_CHECK_VALUE(k_cache.size(3) == dim && num_kv > 0 && num_heads % num_kv == 0,
                    "paged_decode: q heads ", num_heads, " x ", dim, " do not fit kv heads ",
                    num_kv, " x ", k_cache.size(3));
  TORCH_CHECK_VALUE(block_tables.dim() == 2 && block_tables.size(0) == batch &&
                        context_lens.dim() == 1 && context_lens.size(0) == batch,
                    "paged_decode: block_tables must be [B, W] and context_lens [B], B = ", batch);
  TORCH_CHECK_TYPE(supported(q.scalar_type()) && supported(k_cache.scalar_type()) &&
                       v_cache.scalar_type() == k_cache.scalar_type(),
                   "paged_decode: q and the caches must be float32 or bfloat16");
  TORCH_CHECK_TYPE((block_tables.scalar_type() == at::kInt ||
                    block_tables.scalar_type() == at::kLong) &&
                       context_lens.scalar_type() == at::kLong,
                   "paged_decode: block_tables must be int32 or int64, context_lens int64");
  // The kernel reads and writes fp32 queries (a few kilobytes); the cache stays as it is.
  const at::Tensor qf = q.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({batch, num_heads, dim}, qf.options());
  if (batch == 0) return out.to(q.scalar_type());
  at::Tensor k = k_cache, v = v_cache;
  if (k.stride(3) != 1 || v.strides() != k.strides()) {
    k = k.contiguous();
    v = v.contiguous();
  }
  const CacheLayout lay{k.stride(0), k.stride(1), k.stride(2), k.size(0), k.size(1), num_kv, dim};
  const at::Tensor tc = block_tables.contiguous(), lc = context_lens.contiguous();
  const int64_t* lens = lc.const_data_ptr<int64_t>();
  const float* qp = qf.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const bool fp32 = k.scalar_type() == at::kFloat;
  const auto* kb = reinterpret_cast<const bf16*>(k.const_data_ptr());
  const auto* vb = reinterpret_cast<const bf16*>(v.const_data_ptr());
  auto run = [&](const auto* tables) {
    return fp32 ? paged_decode(qp, k.const_data_ptr<float>(), v.const_data_ptr<float>(), lay,
                               tables, tc.size(1), lens, op, batch, num_heads, sc)
                : paged_decode(qp, kb, vb, lay, tables, tc.size(1), lens, op, batch, num_heads, sc);
  };
  const int64_t bad = tc.scalar_type() == at::kInt ? run(tc.const_data_ptr<int32_t>())
                                                   : run(tc.const_data_ptr<int64_t>());
  TORCH_CHECK_INDEX(bad < 0, "paged_decode: sequence ", bad, " has a context length outside [1, ",
                    block_tables.size(1) * k.size(1), "] or a block id outside [0, ", k.size(0),
                    ")");
  return q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_op(const at::Tensor& x,
                                                   const std::optional<at::Tensor>& residual,
                                                   const at::Tensor& weight, double eps) {
  TORCH_CHECK_VALUE(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1),
                    "add_rms_norm: x [..., H] and weight [H], got ", x.sizes(), " and ",
                    weight.sizes());
  TORCH_CHECK_VALUE(!residual || residual->sizes() == x.sizes(), "add_rms_norm: residual ",
                    residual ? residual->sizes() : x.sizes(), " is not the shape of x ",
                    x.sizes());
  const at::ScalarType t = x.scalar_type();
  TORCH_CHECK_TYPE(supported(t) && weight.scalar_type() == t &&
                       (!residual || residual->scalar_type() == t),
                   "add_rms_norm: x, residual and weight are all float32 or all bfloat16");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const at::Tensor rc = residual ? residual->contiguous() : at::Tensor();
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor h = residual ? at::empty(x.sizes(), x.options()) : x;
  const int64_t hidden = x.size(-1), rows = hidden ? x.numel() / hidden : 0;
  if (rows == 0) return {out, h};
  const float e = static_cast<float>(eps);
  if (t == at::kFloat) {
    add_rms_norm<float>(xc.const_data_ptr<float>(), residual ? rc.const_data_ptr<float>() : nullptr,
                        wc.const_data_ptr<float>(), out.mutable_data_ptr<float>(),
                        residual ? h.mutable_data_ptr<float>() : nullptr, rows, hidden, e);
  } else {
    auto in = [](const at::Tensor& a) { return reinterpret_cast<const bf16*>(a.const_data_ptr()); };
    auto mut = [](at::Tensor& a) { return reinterpret_cast<bf16*>(a.mutable_data_ptr()); };
    add_rms_norm<bf16>(in(xc), residual ? in(rc) : nullptr, in(wc), mut(out),
                       residual ? mut(h) : nullptr, rows, hidden, e);
  }
  return {out, h};
}

// q or k as the kernel reads it: heads d apart, tokens any stride apart (a column slice of the
// fused qkv projection needs no copy).
at::Tensor token_rows(const at::Tensor& t) {
  return t.stride(2) == 1 && t.stride(1) == t.size(2) ? t : t.contiguous();
}

std::tuple<at::Tensor, at::Tensor> qk_norm_rope_op(const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& q_weight,
                                                   const at::Tensor& k_weight, double eps,
                                                   const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK_VALUE(q.dim() == 3 && k.dim() == 3 && q.size(0) == k.size(0) &&
                        q.size(2) == k.size(2) && q.size(2) % 2 == 0,
                    "qk_norm_rope: expected q [T, Hq, D] and k [T, Hkv, D], D even; got ",
                    q.sizes(), " and ", k.sizes());
  const int64_t tokens = q.size(0), d = q.size(2);
  TORCH_CHECK_VALUE(q_weight.dim() == 1 && k_weight.dim() == 1 && q_weight.size(0) == d &&
                        k_weight.size(0) == d && cos.dim() == 2 && cos.size(0) == tokens &&
                        cos.size(1) == d && sin.sizes() == cos.sizes(),
                    "qk_norm_rope: weights [D] and cos, sin [T, D] for D = ", d, " and T = ",
                    tokens);
  const at::ScalarType t = q.scalar_type();
  for (const at::Tensor* a : {&k, &q_weight, &k_weight, &cos, &sin})
    TORCH_CHECK_TYPE(supported(t) && a->scalar_type() == t,
                     "qk_norm_rope: q, k, the weights, cos and sin are all float32 or all "
                     "bfloat16");
  const at::Tensor qc = token_rows(q), kc = token_rows(k);
  const at::Tensor qw = q_weight.contiguous(), kw = k_weight.contiguous();
  const at::Tensor cc = cos.contiguous(), sc = sin.contiguous();
  at::Tensor q_out = at::empty(q.sizes(), q.options()), k_out = at::empty(k.sizes(), k.options());
  if (tokens == 0) return {q_out, k_out};
  const float e = static_cast<float>(eps);
  auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    auto in = [](const at::Tensor& a) { return reinterpret_cast<const T*>(a.const_data_ptr()); };
    auto mut = [](at::Tensor& a) { return reinterpret_cast<T*>(a.mutable_data_ptr()); };
    qk_norm_rope<T>(in(qc), in(kc), qc.stride(0), kc.stride(0), in(qw), in(kw), e, in(cc),
                    in(sc), mut(q_out), mut(k_out), tokens, q.size(1), k.size(1), d);
  };
  if (t == at::kFloat) run(static_cast<float*>(nullptr));
  else run(static_cast<bf16*>(nullptr));
  return {q_out, k_out};
}

}  // namespace
}  // namespace splitvl

TORCH_LIBRARY(splitvl, m) {
  m.def(
      "moe_combine(Tensor h, Tensor order, Tensor weights, Tensor ids, int num_experts) -> "
      "Tensor");
  m.def("fused_moe(Tensor x, Tensor gate_up, Tensor down, Tensor weights, Tensor ids) -> Tensor");
  m.def(
      "fused_moe_fp8(Tensor x, Tensor gate_up, Tensor down, Tensor gate_up_scale, "
      "Tensor down_scale, Tensor weights, Tensor ids) -> Tensor");
  m.def("fp8_linear(Tensor x, Tensor weight, Tensor scale) -> Tensor");
  m.def("fp8_dequantize(Tensor weight, Tensor scale, ScalarType dtype) -> Tensor");
  m.def(
      "paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor context_lens, float scale) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def(
      "qk_norm_rope(Tensor q, Tensor k, Tensor q_weight, Tensor k_weight, float eps, Tensor cos, "
      "Tensor sin) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(splitvl, CPU, m) {
  m.impl("fused_moe", &splitvl::fused_moe_op);
  m.impl("moe_combine", &splitvl::moe_combine_op);
  m.impl("fused_moe_fp8", &splitvl::fused_moe_fp8_op);
  m.impl("fp8_linear", &splitvl::fp8_linear_op);
  m.impl("fp8_dequantize", &splitvl::fp8_dequantize_op);
  m.impl("paged_decode", &splitvl::paged_decode_op);
  m.impl("add_rms_norm", &splitvl::add_rms_norm_op);
  m.impl("qk_norm_rope", &splitvl::qk_norm_rope_op);
}

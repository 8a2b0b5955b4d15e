// The routed experts' last step after grouped GEMMs: each token's k output rows, found through
// the sort's inverse, weighted and added in top-k order, in one pass over the rows. PyTorch's
// version (un-sort copy, product, mask, k - 1 adds) writes and reads several [T*k, H]
// temporaries: at 2048 tokens, top-8, hidden 1024 in fp32 each is 64 MiB, and the passes took
// ~19 ms of the ~180 ms the experts take per layer.
//
// Rounding as the reference's ops: the product is rounded to T, then each partial sum. No
// fused multiply-add (contraction is off for this file, whatever -ffp-contract says), so the
// results equal the reference's bit for bit, fp32 and bf16.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "common.h"
#include "kernels.h"

namespace splitvl {

template <typename T>
void moe_combine(const T* h, const int64_t* rows, const T* weights, const int64_t* ids, T* out,
                 int64_t tokens, int64_t top_k, int64_t hidden, int64_t num_experts) {
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(hidden, 1));
  at::parallel_for(0, tokens, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      T* o = out + t * hidden;
      for (int64_t c = 0; c < hidden; c += kLanes) {
        const int n = static_cast<int>(std::min<int64_t>(kLanes, hidden - c));
        f8 acc = splat(0.f);
        for (int64_t j = 0; j < top_k; ++j) {
          const int64_t i = t * top_k + j;
          f8 term = splat(0.f);
          if (ids[i] < num_experts) {
            const f8 w = splat(to_float(weights[i]));
            term = round_to<T>(load_row(h + rows[i] * hidden + c, n) * w);
          }
          acc = j == 0 ? term : round_to<T>(acc + term);
        }
        store_row(o + c, acc, n);
      }
    }
  });
}

template void moe_combine<float>(const float*, const int64_t*, const float*, const int64_t*,
                                 float*, int64_t, int64_t, int64_t, int64_t);
template void moe_combine<bf16>(const bf16*, const int64_t*, const bf16*, const int64_t*, bf16*,
                                int64_t, int64_t, int64_t, int64_t);

}  // namespace splitvl

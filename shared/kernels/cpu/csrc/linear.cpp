// Linear projections with block fp8 weights on the CPU: out [M, N] = x [M, K] . W^T, W [N, K]
// in e4m3 as checkpoints store it (row-major), one fp32 scale per 128x128 block.
//
// A work item is one block row of W (128 output features, contiguous K-byte rows) for a group
// of rows of x. The scale of a block only depends on its column block along K for a fixed block
// row, so the item scales a copy of its x rows by the block row's scales once (K products per
// row), and the inner loop is widen + FMA: NR weight rows against MR x rows, 8 columns at a
// time, each weight byte read once. Sums are fixed-order (no dependence on the thread count).
#include "common.h"
#include "kernels.h"

namespace splitvl {
namespace {

#if defined(__AVX512F__)
constexpr int kAccRegs = 16;  // of 32 vector registers: the rest hold weights and activations
#else
constexpr int kAccRegs = 8;  // of 16
#endif
constexpr int kMr = kAccRegs / 2;  // most x rows per tile (with 2 weight rows)
constexpr int64_t kRowGroup = 32;  // rows of x per item: its scaled copy stays in L2

// out[m][j] for m < MR, j < NR: rows xs[m] (scaled fp32) against weight rows w[j]. The MR * NR
// accumulators are independent chains, so the FMA latency hides behind them.
template <int MR, int NR>
inline void dot_tile(const float* const* xs, const fp8* const* w, int64_t K, float* out,
                     int64_t ldo) {
  f8 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) acc[m][j] = splat(0.f);
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    f8 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = load8(w[j] + k);
    for (int m = 0; m < MR; ++m) {
      const f8 xv = load8(xs[m] + k);
      for (int j = 0; j < NR; ++j) acc[m][j] += xv * wv[j];
    }
  }
  if (k < K) {
    const int r = static_cast<int>(K - k);
    f8 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = load_partial(w[j] + k, r);
    for (int m = 0; m < MR; ++m) {
      const f8 xv = load_partial(xs[m] + k, r);
      for (int j = 0; j < NR; ++j) acc[m][j] += xv * wv[j];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) out[m * ldo + j] = hsum(acc[m][j]);
}

// MR x rows against the weight rows [n0, n1): 4 weight rows per tile while MR * 4 accumulators
// fit in registers (decode: few rows, and 4 chains even for one), else 2; 1 at the edge.
template <int MR>
void dot_rows(const float* const* xs, const fp8* weight, int64_t K, int64_t n0, int64_t n1,
              float* out, int64_t ldo) {
  constexpr int NR = MR * 4 <= kAccRegs ? 4 : 2;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) {
    const fp8* w[NR];
    for (int j = 0; j < NR; ++j) w[j] = weight + (n + j) * K;
    dot_tile<MR, NR>(xs, w, K, out + (n - n0), ldo);
  }
  for (; n < n1; ++n) {
    const fp8* w[1] = {weight + n * K};
    dot_tile<MR, 1>(xs, w, K, out + (n - n0), ldo);
  }
}

void dot_block(int mr, const float* const* xs, const fp8* weight, int64_t K, int64_t n0,
               int64_t n1, float* out, int64_t ldo) {
  switch (mr) {
#define SPLITVL_DOT_CASE(R) \
  case R:                   \
    return dot_rows<R>(xs, weight, K, n0, n1, out, ldo);
    SPLITVL_DOT_CASE(1)
    SPLITVL_DOT_CASE(2)
    SPLITVL_DOT_CASE(3)
    SPLITVL_DOT_CASE(4)
#if defined(__AVX512F__)
    SPLITVL_DOT_CASE(5)
    SPLITVL_DOT_CASE(6)
    SPLITVL_DOT_CASE(7)
    SPLITVL_DOT_CASE(8)
#endif
#undef SPLITVL_DOT_CASE
  }
}

}  // namespace

template <typename T>
void fp8_linear(const T* x, const fp8* weight, const float* scale, T* out, int64_t rows,
                int64_t out_features, int64_t in_features) {
  const int64_t K = in_features, N = out_features;
  const int64_t nk = (K + kFp8Block - 1) / kFp8Block, nb = (N + kFp8Block - 1) / kFp8Block;
  const int64_t groups = (rows + kRowGroup - 1) / kRowGroup;
  parallel_items(nb * groups, [&](int64_t item) {
    const int64_t b = item % nb, m0 = (item / nb) * kRowGroup;
    const int64_t mrows = std::min(kRowGroup, rows - m0);
    const int64_t n0 = b * kFp8Block, n1 = std::min(N, n0 + kFp8Block);
    static thread_local std::vector<float> xs_buf, out_buf;
    xs_buf.resize(mrows * K);
    out_buf.resize(kMr * kFp8Block);
    // x rows times this block row's scales (and kFp8Unit, see load8)
    for (int64_t m = 0; m < mrows; ++m) {
      const T* src = x + (m0 + m) * K;
      float* dst = xs_buf.data() + m * K;
      for (int64_t k = 0; k < K; ++k)
        dst[k] = to_float(src[k]) * scale[b * nk + k / kFp8Block] * kFp8Unit;
    }
    for (int64_t m = 0; m < mrows; m += kMr) {
      const int mr = static_cast<int>(std::min<int64_t>(kMr, mrows - m));
      const float* xs[kMr];
      for (int i = 0; i < mr; ++i) xs[i] = xs_buf.data() + (m + i) * K;
      dot_block(mr, xs, weight, K, n0, n1, out_buf.data(), kFp8Block);
      for (int i = 0; i < mr; ++i)
        for (int64_t n = n0; n < n1; ++n)
          out[(m0 + m + i) * N + n] = from_float<T>(out_buf[i * kFp8Block + (n - n0)]);
    }
  });
}

template <typename T>
void fp8_dequantize(const fp8* weight, const float* scale, T* out, int64_t rows, int64_t cols) {
  const int64_t nk = (cols + kFp8Block - 1) / kFp8Block;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    float tmp[kLanes];
    for (int64_t r = r0; r < r1; ++r) {
      const float* srow = scale + (r / kFp8Block) * nk;
      for (int64_t c = 0; c < cols; c += kLanes) {
        const int n = static_cast<int>(std::min<int64_t>(kLanes, cols - c));
        const fp8* src = weight + r * cols + c;
        const f8 v = (n == kLanes ? load8(src) : load_partial(src, n)) *
                     splat(srow[c / kFp8Block] * kFp8Unit);
        store8(tmp, v);
        for (int i = 0; i < n; ++i) out[r * cols + c + i] = from_float<T>(tmp[i]);
      }
    }
  });
}

template void fp8_dequantize<float>(const fp8*, const float*, float*, int64_t, int64_t);
template void fp8_dequantize<bf16>(const fp8*, const float*, bf16*, int64_t, int64_t);

template void fp8_linear<float>(const float*, const fp8*, const float*, float*, int64_t, int64_t,
                                int64_t);
template void fp8_linear<bf16>(const bf16*, const fp8*, const float*, bf16*, int64_t, int64_t,
                               int64_t);

}  // namespace splitvl

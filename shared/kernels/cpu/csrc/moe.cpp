// Routed experts on the CPU, reading the fused expert weights in place.
//
// Rows (token, j) are bucketed by expert on the fly. A work item is (expert e, slice s of the
// intermediate dimension, block of e's rows): it computes act = silu(x W_gate) * (x W_up) for
// its slice's columns, then w * (act W_down[slice rows]), a partial sum over the slice, so no
// item waits for another. The threads take items from a shared counter and stream disjoint
// parts of the weights (the bound at decode sizes). A final pass adds each token's k rows in
// j order (and the slices in s order). Each output element is computed by one item in a fixed
// order and the slicing depends on the shapes only: results do not depend on the thread count.
//
// fp8 weights carry one scale per 128x128 block: every step of the weight rows stays inside one
// block row (the steps are 16 or 128 rows, slices start on 128-column blocks) and every 8-column
// tile inside one block column, so a tile multiplies its widened weights by one scale per step.
#include <type_traits>

#include "common.h"
#include "kernels.h"

namespace splitvl {
namespace {

constexpr int kMr = 6;               // rows of a register tile
constexpr int64_t kMb = 96;          // rows per item, whose activations stay in L2
constexpr int64_t kPanelRows = 12;   // items with at most this many rows take the panel path
constexpr int64_t kPanelDepth = 16;  // weight rows per step with few rows
constexpr int64_t kDeepDepth = 128;  // weight rows per step with many rows
constexpr int64_t kSliceCols = 1024; // intermediate columns per slice at decode sizes (whole
                                     // experts up to this: their gate/up rows are contiguous)
constexpr int64_t kSliceRows = 4096; // at most this many (row, slice) partial rows per chunk
constexpr int64_t kChunk = 1024;     // tokens per pass, bounding the scratch buffers
constexpr int64_t kLine = 64;

template <typename W>
constexpr bool kScaled = std::is_same_v<W, fp8>;

// Where the scale of a weight lives: (row k, column c) of column stream s, relative to this
// view's first weight row and each stream's first column, are in block (row0 + k / 128,
// col0[s] + c / 128). Unused (p == nullptr) for unscaled weights.
struct BlockScales {
  const float* p = nullptr;
  int64_t row_stride = 0, row0 = 0, col0[2] = {0, 0};

  float at(int s, int64_t k, int64_t c) const {
    return p[(row0 + k / kFp8Block) * row_stride + col0[s] + c / kFp8Block] * kFp8Unit;
  }
};

// c0[m] += a[m][k0:k1] . b0[k0:k1, 0:8], c1[m] likewise with b1 (rows ldb apart). n0 / n1:
// valid columns of each stream (8 when FULL). pf: prefetch this many rows ahead (0: none).
// s0 / s1: the streams' block scales over these weight rows (fp8 weights only).
template <int MR, bool FULL, typename W>
inline void tile(const float* const* a, int64_t k0, int64_t k1, const W* b0, const W* b1,
                 int64_t ldb, int n0, int n1, int64_t pf, f8 s0, f8 s1, f8 (&c0)[MR],
                 f8 (&c1)[MR]) {
  const float* ar[MR];
  for (int m = 0; m < MR; ++m) ar[m] = a[m];
  for (int64_t k = k0; k < k1; ++k) {
    const W* r0 = b0 + k * ldb;
    const W* r1 = b1 + k * ldb;
    if (pf) {
      __builtin_prefetch(r0 + pf * ldb);
      __builtin_prefetch(r1 + pf * ldb);
    }
    f8 w0 = FULL ? load8(r0) : load_partial(r0, n0);
    f8 w1 = FULL ? load8(r1) : load_partial(r1, n1);
    if constexpr (kScaled<W>) {
      w0 *= s0;
      w1 *= s1;
    }
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const f8 av = splat(ar[m][k]);
      c0[m] += av * w0;
      c1[m] += av * w1;
    }
  }
}

// Where tile t of a panel reads: column offsets into both streams and their valid lanes.
struct TileCols {
  int64_t o0, o1;
  int n0, n1;
};

// Weight rows a panel streams (for prefetching): per row, up to two byte ranges from base.
struct Segments {
  const char* base;
  int64_t row_bytes;    // distance between weight rows
  int64_t off[2], len[2];
};

// The register tile for r <= kMr rows (rows m0.. of the tile's acc [rows, 16]): starts from
// zero on the first weight rows, else from acc; hands the sums to epi(m, v0, v1) after the
// last weight rows, else parks them in acc.
template <bool FULL, typename W, typename Epi>
inline void tile_rows(int r, const float* const* a, int64_t k0, int64_t k1, bool last,
                      const W* b0, const W* b1, int64_t ldb, int n0, int n1, int64_t pf, f8 s0,
                      f8 s1, float* acc, const Epi& epi) {
  switch (r) {
#define SPLITVL_TILE_CASE(R)                                      \
  case R: {                                                       \
    f8 c0[R], c1[R];                                              \
    for (int m = 0; m < R; ++m) {                                 \
      c0[m] = k0 == 0 ? splat(0.f) : load8(acc + m * 16);         \
      c1[m] = k0 == 0 ? splat(0.f) : load8(acc + m * 16 + kLanes); \
    }                                                             \
    tile<R, FULL>(a, k0, k1, b0, b1, ldb, n0, n1, pf, s0, s1, c0, c1); \
    for (int m = 0; m < R; ++m) {                                 \
      if (last) {                                                 \
        epi(m, c0[m], c1[m]);                                     \
      } else {                                                    \
        store8(acc + m * 16, c0[m]);                              \
        store8(acc + m * 16 + kLanes, c1[m]);                     \
      }                                                           \
    }                                                             \
    break;                                                        \
  }
    SPLITVL_TILE_CASE(1)
    SPLITVL_TILE_CASE(2)
    SPLITVL_TILE_CASE(3)
    SPLITVL_TILE_CASE(4)
    SPLITVL_TILE_CASE(5)
    SPLITVL_TILE_CASE(6)
#undef SPLITVL_TILE_CASE
  }
}

// For one or two rows: acc[m, :] = a[m] . W over K weight rows, W's row k being the byte
// ranges of seg (one or two column ranges); each weight row is consumed whole, in address
// order, before the next (which is prefetched), with the sums in L1. With so few rows the
// arithmetic is a few instructions per weight vector, so only the read pattern matters.
template <int MR, typename W>
void stream_rows(const float* const* a, int64_t K, const Segments& seg, const BlockScales& sc,
                 float* acc) {
  const int64_t cols0 = seg.len[0] / static_cast<int64_t>(sizeof(W));
  const int64_t cols = cols0 + seg.len[1] / static_cast<int64_t>(sizeof(W));
  std::fill(acc, acc + MR * cols, 0.f);
  for (int64_t k = 0; k < K; ++k) {
    const char* row = seg.base + k * seg.row_bytes;
    for (int s = 0; s < 2; ++s)
      for (int64_t off = 0; off < seg.len[s]; off += kLine)
        __builtin_prefetch(row + 2 * seg.row_bytes + seg.off[s] + off);
    f8 av[MR];
    for (int m = 0; m < MR; ++m) av[m] = splat(a[m][k]);
    for (int s = 0; s < 2; ++s) {
      const W* w = reinterpret_cast<const W*>(row + seg.off[s]);
      const int64_t n = seg.len[s] / static_cast<int64_t>(sizeof(W));
      float* dst = acc + (s == 0 ? 0 : cols0);
      // One scale per block of columns (fp8), or one run over the whole row.
      const int64_t block = kScaled<W> ? kFp8Block : std::max<int64_t>(n, 1);
      for (int64_t b0 = 0; b0 < n; b0 += block) {
        const int64_t b1 = std::min(n, b0 + block);
        f8 as[MR];
        for (int m = 0; m < MR; ++m) as[m] = av[m];
        if constexpr (kScaled<W>)
          for (int m = 0; m < MR; ++m) as[m] *= splat(sc.at(s, k, b0));
        int64_t c = b0;
        for (; c + kLanes <= b1; c += kLanes) {
          const f8 wv = load8(w + c);
          for (int m = 0; m < MR; ++m)
            store8(dst + m * cols + c, load8(dst + m * cols + c) + as[m] * wv);
        }
        if (c < b1) {
          const int r = static_cast<int>(b1 - c);
          const f8 wv = load_partial(w + c, r);
          for (int m = 0; m < MR; ++m)
            store_partial(dst + m * cols + c, load_partial(dst + m * cols + c, r) + as[m] * wv, r);
        }
      }
    }
  }
}

// Applies the register tiles of `rows` rows and `num_tiles` column tiles over K weight rows;
// epi(t, m, v0, v1) receives the finished sums. The weights are walked `depth` rows at a time,
// every column tile of those rows (and every row group of a tile) before the next rows, the
// partial sums parked in acc [num_tiles, rows, 16] in between:
//  - few rows (decode, memory-bound): shallow steps, so the weights are read nearly in address
//    order, the next step's lines prefetched one by one while this step computes (walking a
//    column tile down all K rows touches one line per row instead, each in another page, at
//    about half the streaming bandwidth);
//  - many rows (prefill, compute-bound): deep steps whose slice of a column tile stays in L1
//    for all the row groups, the first group prefetching a few rows ahead.
template <typename W, typename Geom, typename Epi>
void run_tiles(const float* const* a, int64_t rows, int64_t K, const W* b0, const W* b1,
               int64_t ldb, int64_t num_tiles, const Geom& geom, const Segments& seg,
               const BlockScales& sc, float* acc, const Epi& epi) {
  if (rows <= 2) {
    // Sums [rows, stream-0 columns then stream-1 columns], handed out per tile.
    if (rows == 1) stream_rows<1, W>(a, K, seg, sc, acc);
    else stream_rows<2, W>(a, K, seg, sc, acc);
    const int64_t cols0 = seg.len[0] / static_cast<int64_t>(sizeof(W));
    const int64_t cols = cols0 + seg.len[1] / static_cast<int64_t>(sizeof(W));
    const int64_t base1 = b1 == b0 ? 0 : cols0;  // one stream: both halves of a tile in it
    for (int64_t t = 0; t < num_tiles; ++t) {
      const TileCols tc = geom(t);
      for (int64_t m = 0; m < rows; ++m) {
        const float* r = acc + m * cols;
        const f8 v0 = load_partial(r + tc.o0, tc.n0);
        const f8 v1 = tc.n1 > 0 ? load_partial(r + base1 + tc.o1, tc.n1) : splat(0.f);
        epi(t, m, v0, v1);
      }
    }
    return;
  }
  const bool panel = rows <= kPanelRows;
  const int64_t depth = panel ? kPanelDepth : kDeepDepth;
  auto one = [&](int64_t t, int64_t m0, int64_t k0, int64_t k1, int64_t pf) {
    const TileCols tc = geom(t);
    const int r = static_cast<int>(std::min<int64_t>(kMr, rows - m0));
    float* ac = acc + (t * rows + m0) * 16;
    auto out = [&](int m, f8 v0, f8 v1) { epi(t, m0 + m, v0, v1); };
    f8 s0 = splat(1.f), s1 = splat(1.f);
    if constexpr (kScaled<W>) {
      s0 = splat(sc.at(0, k0, tc.o0));
      s1 = splat(sc.at(1, k0, tc.o1));
    }
    if (tc.n0 == kLanes && tc.n1 == kLanes)
      tile_rows<true>(r, a + m0, k0, k1, k1 == K, b0 + tc.o0, b1 + tc.o1, ldb, tc.n0, tc.n1, pf,
                      s0, s1, ac, out);
    else
      tile_rows<false>(r, a + m0, k0, k1, k1 == K, b0 + tc.o0, b1 + tc.o1, ldb, tc.n0,
                       std::max(tc.n1, 1), pf, s0, s1, ac, out);
  };
  // Line addresses of weight rows [k0, k1), issued a share per column tile (no divisions:
  // this runs once per line of weights).
  int64_t lines0 = (seg.len[0] + kLine - 1) / kLine;
  int64_t lines_per_row = lines0 + (seg.len[1] + kLine - 1) / kLine;
  int64_t pf_row = 0, pf_line = 0, pf_end = 0;
  auto prefetch_lines = [&](int64_t quota) {
    for (; quota > 0 && pf_row < pf_end; --quota) {
      const int64_t off = pf_line < lines0 ? seg.off[0] + pf_line * kLine
                                           : seg.off[1] + (pf_line - lines0) * kLine;
      __builtin_prefetch(seg.base + pf_row * seg.row_bytes + off);
      if (++pf_line == lines_per_row) {
        pf_line = 0;
        ++pf_row;
      }
    }
  };
  if (panel) {
    pf_end = std::min(K, depth);
    prefetch_lines(depth * lines_per_row);
  }
  for (int64_t k0 = 0; k0 < K; k0 += depth) {
    const int64_t k1 = std::min(K, k0 + depth), k2 = std::min(K, k1 + depth);
    const int64_t quota = ((k2 - k1) * lines_per_row + num_tiles - 1) / num_tiles;
    pf_row = k1;
    pf_line = 0;
    pf_end = k2;
    for (int64_t t = 0; t < num_tiles; ++t) {
      if (panel) prefetch_lines(quota);
      // Deep steps: tiles inside a cache line find it fetched by the tile that started it.
      const bool lead = !panel && (reinterpret_cast<uintptr_t>(b0 + geom(t).o0) & (kLine - 1)) == 0;
      for (int64_t m0 = 0; m0 < rows; m0 += kMr) one(t, m0, k0, k1, m0 == 0 && lead ? 12 : 0);
    }
  }
}

struct Buckets {
  std::vector<int64_t> offs;  // [E + 2] start of each expert's rows; the last run: id E
  std::vector<int64_t> row;   // [N] sorted position -> flat (t * k + j)
  std::vector<int64_t> slot;  // [N] flat (t * k + j) -> sorted position
};

// Stable counting sort of the flat (t, j) pairs by expert, the rows of id E (no expert) last;
// -1 or the first bad index.
int64_t bucket(const int64_t* ids, int64_t n, int64_t num_experts, Buckets& b) {
  b.offs.assign(num_experts + 2, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t e = ids[i];
    if (e < 0 || e > num_experts) return i;
    ++b.offs[e + 1];
  }
  for (int64_t e = 0; e <= num_experts; ++e) b.offs[e + 1] += b.offs[e];
  std::vector<int64_t> fill(b.offs.begin(), b.offs.end() - 1);
  b.row.resize(n);
  b.slot.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t p = fill[ids[i]]++;
    b.row[p] = i;
    b.slot[i] = p;
  }
  return -1;
}

inline f8 silu_mul(f8 g, f8 u) { return g / (splat(1.f) + exp8(-g)) * u; }

// act[m, c - c0] = silu(gate) * up for rows m < rows, the slice's columns [c0, c1) of I.
template <typename W>
void gate_up_slice(const float* const* arows, int64_t rows, const W* gu, int64_t hidden,
                   int64_t inter, int64_t c0, int64_t c1, const BlockScales& sc, float* acc,
                   float* act) {
  const int64_t ld = c1 - c0, num_tiles = (ld + kLanes - 1) / kLanes;
  auto geom = [&](int64_t t) {
    const int n = static_cast<int>(std::min<int64_t>(kLanes, ld - t * kLanes));
    return TileCols{t * kLanes, t * kLanes, n, n};
  };
  const int64_t esz = sizeof(W);
  const Segments seg{reinterpret_cast<const char*>(gu), 2 * inter * esz,
                     {c0 * esz, (inter + c0) * esz}, {ld * esz, ld * esz}};
  auto epi = [&](int64_t t, int64_t m, f8 g, f8 u) {
    const int64_t c = t * kLanes;
    float* dst = act + m * ld + c;
    if (c + kLanes <= ld) store8(dst, silu_mul(g, u));
    else store_partial(dst, silu_mul(g, u), static_cast<int>(ld - c));
  };
  run_tiles(arows, rows, hidden, gu + c0, gu + inter + c0, 2 * inter, num_tiles, geom, seg, sc,
            acc, epi);
}

// y[m, :] = w[m] * act[m, :] . dn[0:depth, :] for rows m < rows (dn: the slice's rows of W_down).
template <typename W>
void down_slice(const float* act, int64_t rows, int64_t depth, const W* dn, int64_t hidden,
                const float* row_weight, float* const* yrows, const BlockScales& sc,
                float* acc) {
  const float* arows[kMb];
  for (int64_t m = 0; m < rows; ++m) arows[m] = act + m * depth;
  const int64_t num_tiles = (hidden + 2 * kLanes - 1) / (2 * kLanes);
  auto geom = [&](int64_t t) {
    const int64_t c = t * 2 * kLanes;
    const int n0 = static_cast<int>(std::min<int64_t>(kLanes, hidden - c));
    const int n1 = static_cast<int>(std::clamp<int64_t>(hidden - c - kLanes, 0, kLanes));
    return TileCols{c, n1 > 0 ? c + kLanes : c, n0, n1};
  };
  const int64_t esz = sizeof(W);
  const Segments seg{reinterpret_cast<const char*>(dn), hidden * esz, {0, 0}, {hidden * esz, 0}};
  auto epi = [&](int64_t t, int64_t m, f8 v0, f8 v1) {
    const TileCols tc = geom(t);
    const f8 w = splat(row_weight[m]);
    float* dst = yrows[m] + t * 2 * kLanes;
    if (tc.n0 == kLanes) store8(dst, v0 * w);
    else store_partial(dst, v0 * w, tc.n0);
    if (tc.n1 == kLanes) store8(dst + kLanes, v1 * w);
    else if (tc.n1 > 0) store_partial(dst + kLanes, v1 * w, tc.n1);
  };
  run_tiles(arows, rows, depth, dn, dn, hidden, num_tiles, geom, seg, sc, acc, epi);
}

// Per-thread scratch reused across calls at decode sizes (no page faults per step).
float* scratch(std::vector<float>& local, int64_t n) {
  constexpr int64_t kKeep = int64_t(2) << 20;  // floats kept between calls (8 MB)
  static thread_local std::vector<float> cached;
  if (n <= kKeep) {
    if (static_cast<int64_t>(cached.size()) < n) cached.resize(n);
    return cached.data();
  }
  local.resize(n);
  return local.data();
}

// Slices of I: one per kSliceCols columns at decode sizes, one when experts have many rows
// (then row blocks give the items) or the partial sums would need too much scratch. Shapes
// only. A whole expert per item reads gate_up as one sequential stream (gate and up columns
// of a row are adjacent), which the hardware prefetchers follow: on the medium shape 1.3x
// the bandwidth of 128-column slices, whose rows are 512-byte pieces 3 KB apart.
int64_t num_slices(int64_t num_rows, int64_t inter, int64_t num_experts) {
  if (num_rows > 16 * num_experts) return 1;
  const int64_t by_width = (inter + kSliceCols - 1) / kSliceCols;
  return std::max<int64_t>(1, std::min(by_width, kSliceRows / std::max<int64_t>(num_rows, 1)));
}

template <typename T, typename W>
void moe_chunk(const T* x, const W* gate_up, const W* down, const T* weights, const Buckets& bk,
               T* out, int64_t num_tokens, int64_t hidden, int64_t inter, int64_t num_experts,
               int64_t top_k, const float* gu_scale, const float* dn_scale) {
  const int64_t n = num_tokens * top_k;
  const int64_t slices = num_slices(n, inter, num_experts);
  // Slice width: a multiple of 16 columns (whole 64-byte lines of fp32 weights); of 128 for
  // fp8, whose slices must start on a scale block.
  const int64_t align = kScaled<W> ? kFp8Block : 16;
  const int64_t width = ((inter + slices - 1) / slices + align - 1) / align * align;
  const int64_t nh = (hidden + kFp8Block - 1) / kFp8Block, ni = (inter + kFp8Block - 1) / kFp8Block;
  std::vector<float> local;
  const int64_t xf_size = std::is_same_v<T, float> ? 0 : num_tokens * hidden;
  float* buf = scratch(local, xf_size + slices * n * hidden + n);
  float* xf = buf;
  float* y = buf + xf_size;                   // [slices, n, H] partial sums, sorted rows
  float* row_weight = y + slices * n * hidden;  // [n]

  std::vector<const float*> arows(n);
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t p = 0; p < n; ++p) arows[p] = x + (bk.row[p] / top_k) * hidden;
  } else {
    for (int64_t i = 0; i < num_tokens * hidden; ++i) xf[i] = to_float(x[i]);
    for (int64_t p = 0; p < n; ++p) arows[p] = xf + (bk.row[p] / top_k) * hidden;
  }
  for (int64_t p = 0; p < n; ++p) row_weight[p] = to_float(weights[bk.row[p]]);

  struct Item { int64_t e, s, p0, p1; };
  std::vector<Item> items;
  std::vector<double> cost;
  for (int64_t e = 0; e < num_experts; ++e) {
    for (int64_t p0 = bk.offs[e]; p0 < bk.offs[e + 1]; p0 += kMb) {
      const int64_t p1 = std::min(bk.offs[e + 1], p0 + kMb);
      for (int64_t s = 0; s < slices && s * width < inter; ++s) {
        items.push_back({e, s, p0, p1});
        // Weight bytes streamed plus arithmetic, in row-equivalents.
        cost.push_back(static_cast<double>(std::min(width, inter - s * width)) * (8.0 + (p1 - p0)));
      }
    }
  }
  const std::vector<int64_t> order = by_cost(cost);
  parallel_items(static_cast<int64_t>(items.size()), [&](int64_t i) {
    const Item& it = items[order[i]];
    const int64_t c0 = it.s * width, c1 = std::min(inter, c0 + width), rows = it.p1 - it.p0;
    static thread_local std::vector<float> act, acc;
    act.resize(kMb * width);
    // Partial sums [tiles, rows, 16] of either product.
    acc.resize(rows * 16 * std::max((width + kLanes - 1) / kLanes, (hidden + 15) / 16));
    BlockScales gsc, dsc;
    if constexpr (kScaled<W>) {
      gsc = {gu_scale + it.e * nh * 2 * ni, 2 * ni, 0, {c0 / kFp8Block, ni + c0 / kFp8Block}};
      dsc = {dn_scale + it.e * ni * nh, nh, c0 / kFp8Block, {0, 0}};
    }
    gate_up_slice(arows.data() + it.p0, rows, gate_up + it.e * hidden * 2 * inter, hidden, inter,
                  c0, c1, gsc, acc.data(), act.data());
    float* yrows[kMb];
    for (int64_t m = 0; m < rows; ++m) yrows[m] = y + (it.s * n + it.p0 + m) * hidden;
    down_slice(act.data(), rows, c1 - c0, down + (it.e * inter + c0) * hidden, hidden,
               row_weight + it.p0, yrows, dsc, acc.data());
  });
  const int64_t used = (inter + width - 1) / width;  // slices that got columns
  const int64_t routed = bk.offs[num_experts];       // sorted rows past it have no expert
  auto combine = [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      T* dst = out + t * hidden;
      for (int64_t h = 0; h < hidden; ++h) {
        float sum = 0.f;
        bool first = true;
        for (int64_t j = 0; j < top_k; ++j) {
          const int64_t p = bk.slot[t * top_k + j];
          if (p >= routed) continue;  // a zero term, never computed
          const float* r = y + p * hidden + h;
          float term = r[0];
          for (int64_t s = 1; s < used; ++s) term += r[s * n * hidden];
          sum = first ? term : sum + term;
          first = false;
        }
        dst[h] = from_float<T>(sum);
      }
    }
  };
  // At decode sizes the sum is a few microseconds: not worth waking the pool again.
  if (n * used * hidden < (int64_t(1) << 20)) combine(0, num_tokens);
  else at::parallel_for(0, num_tokens, 16, combine);
}

}  // namespace

template <typename T, typename W>
int64_t fused_moe(const T* x, const W* gate_up, const W* down, const T* weights,
                  const int64_t* ids, T* out, int64_t num_tokens, int64_t hidden,
                  int64_t inter, int64_t num_experts, int64_t top_k, const float* gate_up_scale,
                  const float* down_scale) {
  Buckets bk;
  for (int64_t t0 = 0; t0 < num_tokens; t0 += kChunk) {
    const int64_t nt = std::min(kChunk, num_tokens - t0);
    const int64_t bad = bucket(ids + t0 * top_k, nt * top_k, num_experts, bk);
    if (bad >= 0) return t0 * top_k + bad;
    moe_chunk(x + t0 * hidden, gate_up, down, weights + t0 * top_k, bk, out + t0 * hidden, nt,
              hidden, inter, num_experts, top_k, gate_up_scale, down_scale);
  }
  return -1;
}

#define SPLITVL_FUSED_MOE(T, W)                                                               \
  template int64_t fused_moe<T, W>(const T*, const W*, const W*, const T*, const int64_t*, T*, \
                                   int64_t, int64_t, int64_t, int64_t, int64_t, const float*,  \
                                   const float*);
SPLITVL_FUSED_MOE(float, float)
SPLITVL_FUSED_MOE(bf16, bf16)
SPLITVL_FUSED_MOE(float, bf16)
SPLITVL_FUSED_MOE(float, fp8)
SPLITVL_FUSED_MOE(bf16, fp8)
#undef SPLITVL_FUSED_MOE

}  // namespace splitvl

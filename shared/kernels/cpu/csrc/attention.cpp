// Paged decode attention on the CPU: K/V read through the block table, online softmax in fp32.
//
// A work item is one sequence, or one fixed-length part of its context when the batch is too
// small to occupy the threads (flash-decoding; the last part of a sequence to finish combines
// the parts' partial results, in part order). It walks its positions in tiles of kTile and,
// per kv head, scores all the q heads that share it before moving on, so each K/V row is read
// once, prefetching rows kAhead positions ahead (they sit in scattered blocks, out of reach of
// the hardware prefetchers). The split depends on the shapes only, never on the thread count, so
// results are identical for any thread count.
#include <limits>

#include "common.h"
#include "kernels.h"

namespace splitvl {
namespace {

constexpr int kTile = 32;             // positions scored together
constexpr int kAhead = 16;            // positions between a row's prefetch and its use
constexpr int64_t kPartLen = 256;     // positions per part when the context is split
constexpr int64_t kSplitBelow = 16;   // split contexts only for batches smaller than this

template <typename C>
inline f8 load_d(const C* p, int64_t d, int64_t dim) {
  return d + kLanes <= dim ? load8(p + d) : load_partial(p + d, static_cast<int>(dim - d));
}

// The 8 lane sums of a[0..7], in lane order: a transpose-and-add tree instead of 8 separate
// horizontal sums.
inline f8 reduce8(const f8 (&a)[8]) {
  typedef int32_t m8 __attribute__((vector_size(32)));
  auto pairs = [](f8 x, f8 y) {  // {x0+x1, x2+x3, y0+y1, y2+y3 | same for lanes 4..7}
    const m8 even = {0, 2, 8, 10, 4, 6, 12, 14}, odd = {1, 3, 9, 11, 5, 7, 13, 15};
    return __builtin_shuffle(x, y, even) + __builtin_shuffle(x, y, odd);
  };
  const f8 s01 = pairs(a[0], a[1]), s23 = pairs(a[2], a[3]);
  const f8 s45 = pairs(a[4], a[5]), s67 = pairs(a[6], a[7]);
  const f8 lo = pairs(s01, s23), hi = pairs(s45, s67);  // lanes: 0 1 2 3 | 0 1 2 3 (halves)
  const m8 first = {0, 1, 2, 3, 8, 9, 10, 11}, second = {4, 5, 6, 7, 12, 13, 14, 15};
  return __builtin_shuffle(lo, hi, first) + __builtin_shuffle(lo, hi, second);
}

// Prefetches the lines of one K or V row (of `bytes` bytes).
inline void prefetch_row(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off);
}

// s[n] = q . k_n for n < count (q pre-scaled, fp32), eight rows at a time. With pf, also
// prefetches row n + kAhead of the row list (it runs on into the next tile) for n < pf_count.
template <typename C>
inline void scores(const float* q, int64_t dim, const C* const* krow, int count, float* s,
                   int pf_count) {
  for (int n0 = 0; n0 < count; n0 += 8) {
    const C* r[8];
    for (int j = 0; j < 8; ++j) r[j] = krow[std::min(n0 + j, count - 1)];  // pad: repeat
    for (int j = n0; j < std::min(n0 + 8, pf_count); ++j)
      prefetch_row(krow[j + kAhead], dim * static_cast<int64_t>(sizeof(C)));
    f8 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = splat(0.f);
    for (int64_t d = 0; d < dim; d += kLanes) {
      const f8 qv = load_d(q, d, dim);
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) acc[j] += qv * load_d(r[j], d, dim);
    }
    store8(s + n0, reduce8(acc));
  }
}

// acc_i += sum_n p[i][n] * v_n for GB heads, one 8-lane column chunk at a time in registers.
template <int GB, typename C>
inline void accumulate(float* acc, int64_t dim, const C* const* vrow, int count,
                       const float (*p)[kTile], int pf_count) {
  for (int n = 0; n < pf_count; ++n)
    prefetch_row(vrow[n + kAhead], dim * static_cast<int64_t>(sizeof(C)));
  for (int64_t d = 0; d < dim; d += kLanes) {
    const int nd = static_cast<int>(std::min<int64_t>(kLanes, dim - d));
    f8 a[GB];
    for (int i = 0; i < GB; ++i)
      a[i] = nd == kLanes ? load8(acc + i * dim + d) : load_partial(acc + i * dim + d, nd);
    for (int n = 0; n < count; ++n) {
      const f8 v = load_d(vrow[n], d, dim);
#pragma GCC unroll 8
      for (int i = 0; i < GB; ++i) a[i] += splat(p[i][n]) * v;
    }
    for (int i = 0; i < GB; ++i) {
      if (nd == kLanes) store8(acc + i * dim + d, a[i]);
      else store_partial(acc + i * dim + d, a[i], nd);
    }
  }
}

// Online-softmax update of one head with a tile: scores -> probabilities in place, zeros past
// count; rescales the head's accumulator.
inline void softmax_update(float* s, int count, float& m, float& l, float* acc, int64_t dim) {
  float tmax = s[0];
  for (int n = 1; n < count; ++n) tmax = std::max(tmax, s[n]);
  const float m_new = std::max(m, tmax);
  const float corr = std::exp(m - m_new);  // 0 on the first tile (m = -inf)
  for (int n = count; n < kTile; ++n) s[n] = m_new;
  for (int n = 0; n < kTile; n += kLanes) store8(s + n, exp8(load8(s + n) - splat(m_new)));
  float sum = 0.f;
  for (int n = 0; n < count; ++n) sum += s[n];
  for (int n = count; n < kTile; ++n) s[n] = 0.f;
  l = l * corr + sum;
  m = m_new;
  if (corr != 1.f)
    for (int64_t d = 0; d < dim; ++d) acc[d] *= corr;
}

// GB q heads sharing the tile's rows; pf_count > 0 on the kv head's first group only.
template <int GB, typename C>
inline void head_group(const float* q, const C* const* krow, const C* const* vrow, int count,
                       int pf_count, int64_t dim, float* m, float* l, float* acc) {
  float s[GB][kTile];
  for (int i = 0; i < GB; ++i) {
    scores(q + i * dim, dim, krow, count, s[i], i == 0 ? pf_count : 0);
    softmax_update(s[i], count, m[i], l[i], acc + i * dim, dim);
  }
  accumulate<GB>(acc, dim, vrow, count, s, pf_count);
}

template <typename C, typename I>
struct Decode {
  const float* q;
  const C* kc;
  const C* vc;
  CacheLayout lay;
  const I* tables;
  int64_t width, num_heads;
  float scale;

  void offsets(const I* table, int64_t p, int count, int64_t* ofs) const {
    for (int n = 0; n < count; ++n) {
      const int64_t pos = p + n;
      ofs[n] = static_cast<int64_t>(table[pos / lay.block_size]) * lay.block_stride +
               (pos % lay.block_size) * lay.row_stride;
    }
  }

  // Positions [p0, p1) of sequence b: leaves m, l [Hq] and the unnormalized acc [Hq, D].
  void run(int64_t b, int64_t p0, int64_t p1, float* m, float* l, float* acc) const {
    const int64_t dim = lay.head_dim, group = num_heads / lay.num_kv_heads;
    const int64_t row_bytes = dim * static_cast<int64_t>(sizeof(C));  // one head's row
    std::vector<float> qf(num_heads * dim);
    for (int64_t i = 0; i < num_heads * dim; ++i) qf[i] = q[b * num_heads * dim + i] * scale;
    std::fill(m, m + num_heads, -std::numeric_limits<float>::infinity());
    std::fill(l, l + num_heads, 0.f);
    std::fill(acc, acc + num_heads * dim, 0.f);
    const I* table = tables + b * width;
    // Row pointers of this tile followed by the next one's, so prefetches run ahead by kAhead
    // positions across the tile boundary.
    const C* krow[2 * kTile];
    const C* vrow[2 * kTile];
    int64_t ofs[2 * kTile];
    int count = static_cast<int>(std::min<int64_t>(kTile, p1 - p0));
    offsets(table, p0, count, ofs);
    for (int n = 0; n < std::min(count, kAhead); ++n)
      for (int64_t g = 0; g < lay.num_kv_heads; ++g) {
        prefetch_row(kc + ofs[n] + g * lay.head_stride, row_bytes);
        prefetch_row(vc + ofs[n] + g * lay.head_stride, row_bytes);
      }
    for (int64_t p = p0; p < p1; p += kTile) {
      const int64_t pn = p + kTile;
      const int next_count = pn < p1 ? static_cast<int>(std::min<int64_t>(kTile, p1 - pn)) : 0;
      offsets(table, pn, next_count, ofs + kTile);
      // Rows [kAhead, count + next_count) of the list get prefetched while rows [0, ...) run.
      const int total = next_count > 0 ? kTile + next_count : count;
      const int pf_count = std::max(0, std::min(count, total - kAhead));
      for (int64_t g = 0; g < lay.num_kv_heads; ++g) {
        for (int n = 0; n < total; ++n) {
          const int64_t o = ofs[n] + g * lay.head_stride;
          krow[n] = kc + o;
          vrow[n] = vc + o;
        }
        int64_t h = g * group;
        const int64_t h_end = h + group;
        while (h < h_end) {
          const int64_t left = h_end - h;
          const int pf = h == g * group ? pf_count : 0;
          const float* qh = qf.data() + h * dim;
          float* ah = acc + h * dim;
          if (left >= 4) {
            head_group<4>(qh, krow, vrow, count, pf, dim, m + h, l + h, ah);
            h += 4;
          } else if (left >= 2) {
            head_group<2>(qh, krow, vrow, count, pf, dim, m + h, l + h, ah);
            h += 2;
          } else {
            head_group<1>(qh, krow, vrow, count, pf, dim, m + h, l + h, ah);
            h += 1;
          }
        }
      }
      std::copy(ofs + kTile, ofs + kTile + next_count, ofs);
      count = next_count;
    }
  }
};

struct Part {
  int64_t b, p0, p1, slot;  // slot: its partial-result index, or -1 when it is the whole context
};

// out[h] = the parts' softmax-weighted accumulators of sequence b, combined in part order.
void combine(const float* partial, int64_t s0, int64_t s1, int64_t num_heads, int64_t dim,
             float* out) {
  const int64_t rec = num_heads * (dim + 2);
  std::vector<float> sum(dim);
  for (int64_t h = 0; h < num_heads; ++h) {
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t s = s0; s < s1; ++s) mx = std::max(mx, partial[s * rec + h]);
    float total = 0.f;
    std::fill(sum.begin(), sum.end(), 0.f);
    for (int64_t s = s0; s < s1; ++s) {
      const float* r = partial + s * rec;
      const float w = std::exp(r[h] - mx);
      total += r[num_heads + h] * w;
      const float* a = r + 2 * num_heads + h * dim;
      for (int64_t d = 0; d < dim; ++d) sum[d] += a[d] * w;
    }
    const float inv = 1.f / total;
    for (int64_t d = 0; d < dim; ++d) out[h * dim + d] = sum[d] * inv;
  }
}

}  // namespace

template <typename C, typename I>
int64_t paged_decode(const float* q, const C* k_cache, const C* v_cache,
                     const CacheLayout& layout, const I* block_tables,
                     int64_t table_width, const int64_t* context_lens, float* out,
                     int64_t batch, int64_t num_heads, float scale) {
  const int64_t bs = layout.block_size, dim = layout.head_dim;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = context_lens[b];
    if (len < 1 || len > table_width * bs) return b;
    for (int64_t i = 0; i < (len + bs - 1) / bs; ++i) {
      const int64_t blk = block_tables[b * table_width + i];
      if (blk < 0 || blk >= layout.num_blocks) return b;
    }
  }
  const bool split = batch < kSplitBelow;
  std::vector<Part> parts;
  std::vector<double> cost;
  std::vector<int64_t> first_slot(batch + 1, 0);
  int64_t slots = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = context_lens[b];
    const int64_t part_len = split ? kPartLen : len;
    const int64_t n = (len + part_len - 1) / part_len;
    first_slot[b] = slots;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t p0 = i * part_len, p1 = std::min(len, p0 + part_len);
      parts.push_back({b, p0, p1, n > 1 ? slots++ : -1});
      cost.push_back(static_cast<double>(p1 - p0) + 16.0);
    }
  }
  first_slot[batch] = slots;
  const int64_t rec = num_heads * (dim + 2);  // m, l, acc of every head
  std::vector<float> partial(slots * rec);
  std::vector<std::atomic<int64_t>> pending(batch);
  for (int64_t b = 0; b < batch; ++b) pending[b] = first_slot[b + 1] - first_slot[b];
  const Decode<C, I> dec{q, k_cache, v_cache, layout, block_tables, table_width, num_heads, scale};
  const std::vector<int64_t> order = by_cost(cost);
  parallel_items(static_cast<int64_t>(parts.size()), [&](int64_t i) {
    const Part& pt = parts[order[i]];
    std::vector<float> own;
    float* r;
    if (pt.slot >= 0) {
      r = partial.data() + pt.slot * rec;
    } else {
      own.resize(rec);
      r = own.data();
    }
    float* m = r;
    float* l = r + num_heads;
    float* acc = r + 2 * num_heads;
    dec.run(pt.b, pt.p0, pt.p1, m, l, acc);
    float* dst = out + pt.b * num_heads * dim;
    if (pt.slot < 0) {
      for (int64_t h = 0; h < num_heads; ++h) {
        const float inv = 1.f / l[h];
        for (int64_t d = 0; d < dim; ++d) dst[h * dim + d] = acc[h * dim + d] * inv;
      }
    } else if (pending[pt.b].fetch_sub(1, std::memory_order_acq_rel) == 1) {
      combine(partial.data(), first_slot[pt.b], first_slot[pt.b + 1], num_heads, dim, dst);
    }
  });
  return -1;
}

// Block tables of either index type: the runner's are int32, the references' callers' int64.
#define SPLITVL_DECODE(C, I)                                                                 \
  template int64_t paged_decode<C, I>(const float*, const C*, const C*, const CacheLayout&,  \
                                      const I*, int64_t, const int64_t*, float*, int64_t,    \
                                      int64_t, float);
SPLITVL_DECODE(float, int32_t)
SPLITVL_DECODE(float, int64_t)
SPLITVL_DECODE(bf16, int32_t)
SPLITVL_DECODE(bf16, int64_t)
#undef SPLITVL_DECODE

}  // namespace splitvl

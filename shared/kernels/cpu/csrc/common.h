// Shared pieces of the CPU kernels: 8-lane float vectors, bf16 and fp8 -> fp32, a vector exp
// and a cost-balanced split of work items over ATen's intra-op threads.
//
// The vectors are GCC/Clang vector extensions, so one source compiles to AVX2+FMA, AVX-512 or
// plain SSE depending on -march; bf16 widens in registers (zero-extend, shift left 16) because
// decode is memory-bound and bf16 halves the bytes read. fp8 (e4m3) halves them again: it
// widens through fp16 (F16C, on every AVX2 CPU), a lookup table elsewhere.
#pragma once

#include <ATen/Parallel.h>
#if defined(__F16C__) && defined(__SSE4_1__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace splitvl {

typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8v __attribute__((vector_size(32)));
typedef uint32_t u8v __attribute__((vector_size(32)));
typedef uint16_t h8v __attribute__((vector_size(16)));

constexpr int kLanes = 8;

inline f8 splat(float s) { return f8{s, s, s, s, s, s, s, s}; }

// What `load8` of fp8 weights returns, times this, is their value: scales carry the factor.
constexpr float kFp8Unit = 256.f;
constexpr int64_t kFp8Block = 128;  // weights per scale along each dimension

// e4m3 bits -> value / kFp8Unit, for CPUs without F16C: sign, 4 exponent bits (bias 7, 0 for
// subnormals), 3 mantissa bits; 0x7f and 0xff (NaN) never occur in quantized weights.
inline const float* fp8_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(256);
    for (int b = 0; b < 256; ++b) {
      const int e = (b >> 3) & 15, m = b & 7;
      const float mag = e == 0 ? std::ldexp(m / 8.f, -6) : std::ldexp(1.f + m / 8.f, e - 7);
      t[b] = ((b & 0x80) ? -mag : mag) / kFp8Unit;
    }
    return t;
  }();
  return table.data();
}

inline f8 load8(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline f8 load8(const bf16* p) {
  h8v h;
  std::memcpy(&h, p, sizeof(h));
  u8v w = __builtin_convertvector(h, u8v) << 16;
  return reinterpret_cast<f8&>(w);
}

// e4m3 / 256 (the factor 256 goes into the block scales, see kFp8Unit). Placed in fp16 bits
// (sign at 15, exponent and mantissa at 13..7) an e4m3 value reads as itself over 2^8, its
// subnormals included, and fp16 -> fp32 is exact: no fp32 denormals, so no slow assists.
inline f8 load8(const fp8* p) {
#if defined(__F16C__) && defined(__SSE4_1__)
  // Sign-extended, shifted left 7: the sign lands on bit 15 and on bit 14, which is cleared.
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const __m128i bits = _mm_and_si128(_mm_slli_epi16(_mm_cvtepi8_epi16(bytes), 7),
                                     _mm_set1_epi16(static_cast<short>(0xBFFF)));
  return reinterpret_cast<f8>(_mm256_cvtph_ps(bits));
#else
  f8 v;
  for (int i = 0; i < kLanes; ++i) v[i] = fp8_table()[p[i]];
  return v;
#endif
}

// The first n (< 8) elements, zeros after: for row tails of sizes that are not multiples of 8.
template <typename T>
inline f8 load_partial(const T* p, int n) {
  T tmp[kLanes] = {};
  for (int i = 0; i < n; ++i) tmp[i] = p[i];
  return load8(tmp);
}

inline void store8(float* p, f8 v) { std::memcpy(p, &v, sizeof(v)); }

inline void store_partial(float* p, f8 v, int n) {
  float tmp[kLanes];
  store8(tmp, v);
  for (int i = 0; i < n; ++i) p[i] = tmp[i];
}

inline float to_float(float v) { return v; }

inline float to_float(bf16 v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Round to nearest even, NaN stays NaN (the same rounding as c10::BFloat16).
inline bf16 to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if (std::isnan(f)) return 0x7fc0;
  bits += 0x7fff + ((bits >> 16) & 1);
  return static_cast<bf16>(bits >> 16);
}

template <typename T>
inline T from_float(float v);
template <>
inline float from_float<float>(float v) { return v; }
template <>
inline bf16 from_float<bf16>(float v) { return to_bf16(v); }

// The first n (<= 8) elements of a row, widened to fp32.
template <typename T>
inline f8 load_row(const T* p, int n) {
  return n == kLanes ? load8(p) : load_partial(p, n);
}

// v rounded to the precision of T (bf16: nearest even, as c10::BFloat16), widened back.
template <typename T>
inline f8 round_to(f8 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    u8v bits = reinterpret_cast<u8v&>(v);
    const u8v nan = reinterpret_cast<u8v>(v != v);
    bits = (bits + 0x7fff + ((bits >> 16) & 1)) & 0xffff0000u;
    bits = (nan & 0x7fc00000u) | (~nan & bits);
    return reinterpret_cast<f8&>(bits);
  }
}

// The first n (<= 8) lanes of v, a value of T's precision (round_to), stored as T.
template <typename T>
inline void store_row(T* p, f8 v, int n) {
  if constexpr (std::is_same_v<T, float>) {
    if (n == kLanes) store8(p, v);
    else store_partial(p, v, n);
  } else {  // v is already a bf16 value: its upper 16 bits
    const u8v bits = reinterpret_cast<u8v&>(v) >> 16;
    const h8v h = __builtin_convertvector(bits, h8v);
    if (n == kLanes) std::memcpy(p, &h, sizeof(h));
    else std::memcpy(p, &h, n * sizeof(T));
  }
}

inline float hsum(f8 v) {
  float s = 0.f;
  float t[kLanes];
  store8(t, v);
  // Pairwise, so the result does not depend on how the compiler schedules it.
  return ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7])) + s;
}

inline float hmax(f8 v) {
  float t[kLanes];
  store8(t, v);
  float m = t[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, t[i]);
  return m;
}

// exp(x) to ~2 ulp: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial, 2^n by exponent bits.
// Inputs below -87.3 give ~0 and above 88.3 saturate; NaN propagates.
inline f8 exp8(f8 x) {
  const f8 hi = splat(88.3762626647949f), lo = splat(-87.3365447504f);
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const f8 magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  f8 n = (x * splat(1.44269504088896341f) + magic) - magic;
  f8 r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  f8 p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  i8v e = (__builtin_convertvector(n, i8v) + 127) << 23;
  return p * reinterpret_cast<f8&>(e);
}

// Runs fn(item) for items 0..n-1 in one parallel region, threads taking the next item from a
// shared counter: a thread the OS delays (other processes on the cores) holds up only the item
// it is on, not a fixed share. List costly items first. Results never depend on who ran what:
// every output is written by exactly one item.
template <typename F>
void parallel_items(int64_t n, const F& fn) {
  if (n <= 0) return;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (threads <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
  });
}

// Item indices ordered by decreasing cost (stable), for parallel_items.
inline std::vector<int64_t> by_cost(const std::vector<double>& cost) {
  std::vector<int64_t> order(cost.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  return order;
}

}  // namespace splitvl

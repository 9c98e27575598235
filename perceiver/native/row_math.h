// Row arithmetic the attention kernels share: per-thread scratch buffers,
// e^x without libm (so that its loops vectorise), and a row's maximum,
// exp-and-sum and dot product.
#ifndef PERCEIVER_NATIVE_ROW_MATH_H_
#define PERCEIVER_NATIVE_ROW_MATH_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace perceiver {

// A per-thread buffer of at least `count` elements (slot: which buffer).
template <typename T>
T* Scratch(int slot, int64_t count) {
  thread_local std::vector<T> buffers[8];
  auto& buffer = buffers[slot];
  if (static_cast<int64_t>(buffer.size()) < count) buffer.resize(count);
  return buffer.data();
}

// e^x in float32 without a call into libm: e^x = 2^n e^r with
// n = round(x / ln 2), |r| <= ln(2) / 2, and e^r from the degree-6
// polynomial of Cephes' expf (within ~2 ulp). x is clamped to the range of
// normal results: e^-inf and tiny results give ~1e-38, not 0, which is lost
// against a row's largest term (e^0 = 1). Written once for a scalar and once
// for 16 lanes (GCC vector extensions: AVX-512 where -march=native has it,
// else two or four narrower registers).
template <typename F, typename I>
inline F ExpPoly(F x, I (*to_int)(F), F (*to_float)(I)) {
  x = x < -87.33654f ? -87.33654f + 0 * x : x;
  x = x > 88.37626f ? 88.37626f + 0 * x : x;
  const F y = x * 1.44269504088896341f + 0.5f;
  F n = to_float(to_int(y));  // truncated toward zero: make it the floor
  n = n > y ? n - 1.0f : n;
  const F r = x - n * 0.693359375f + n * 2.12194440e-4f;
  F p = 1.9875691500e-4f + 0 * r;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const I bits = (to_int(n) + 127) << 23;
  F scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

typedef float F16 __attribute__((vector_size(64)));
typedef int32_t I16 __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

inline F16 Load(const float* x) {
  F16 v;
  std::memcpy(&v, x, sizeof(v));
  return v;
}
inline void Store(float* x, F16 v) { std::memcpy(x, &v, sizeof(v)); }
inline F16 Splat(float x) { return F16{} + x; }

inline float Exp(float x) {
  return ExpPoly<float, int32_t>(
      x, [](float f) { return static_cast<int32_t>(f); },
      [](int32_t i) { return static_cast<float>(i); });
}
inline F16 Exp(F16 x) {
  return ExpPoly<F16, I16>(
      x, [](F16 f) { return __builtin_convertvector(f, I16); },
      [](I16 i) { return __builtin_convertvector(i, F16); });
}
inline double Exp(double x) { return std::exp(x); }

// x[j] = exp(x[j] - shift) over a row; returns the row's new sum.
inline float ExpRow(float* x, int64_t n, float shift) {
  F16 sums = Splat(0.0f);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const F16 e = Exp(Load(x + j) - shift);
    Store(x + j, e);
    sums += e;
  }
  float sum = 0;
  for (; j < n; ++j) sum += (x[j] = Exp(x[j] - shift));
  for (int64_t l = 0; l < kLanes; ++l) sum += sums[l];
  return sum;
}

inline double ExpRow(double* x, int64_t n, double shift) {
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += (x[j] = std::exp(x[j] - shift));
  return sum;
}

inline float MaxRow(const float* x, int64_t n) {
  F16 maxes = Splat(-INFINITY);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const F16 v = Load(x + j);
    maxes = v > maxes ? v : maxes;
  }
  float m = -INFINITY;
  for (; j < n; ++j) m = std::max(m, x[j]);
  for (int64_t l = 0; l < kLanes; ++l) m = std::max(m, maxes[l]);
  return m;
}

inline double MaxRow(const double* x, int64_t n) {
  double m = -INFINITY;
  for (int64_t j = 0; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

inline float DotRow(const float* a, const float* b, int64_t n) {
  F16 sums = Splat(0.0f);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) sums += Load(a + j) * Load(b + j);
  float sum = 0;
  for (; j < n; ++j) sum += a[j] * b[j];
  for (int64_t l = 0; l < kLanes; ++l) sum += sums[l];
  return sum;
}

inline double DotRow(const double* a, const double* b, int64_t n) {
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += a[j] * b[j];
  return sum;
}

}  // namespace perceiver

#endif  // PERCEIVER_NATIVE_ROW_MATH_H_

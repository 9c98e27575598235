// LayerNorm's normalisation over the last axis, forward and backward, for
// XLA:CPU through the XLA FFI; perceiver/native/layer_norm.py calls it.
//
//   forward:  x-hat = (x - mean) inv,  inv = 1 / sqrt(var + eps),
//             mean and var (biased) over each row of x [R, D]
//   backward: dx = inv (g - mean(g) - x-hat mean(g x-hat)), from x-hat, inv
//             and g = d x-hat (autodiff's LayerNorm gradient, written out)
//
// The scale and offset are not here: perceiver/cpu_kernels.py folds them
// into the linear layer that follows. Each row is read and written once per
// pass while it is in cache, the rows spread over XLA's intra-op threads
// (common.h); in XLA's own fusions the same work is several passes over the
// whole array, a reduction and a broadcast each.

#include <cmath>
#include <cstdint>

#include "common.h"
#include "row_math.h"

namespace perceiver {
namespace {

// fn(r) for each row r of `rows` rows of width d, on XLA's intra-op threads,
// in work items of about 64 KiB of floats (at least one row).
template <typename F>
void ForEachRow(ffi::ThreadPool& pool, int64_t rows, int64_t d, F fn) {
  const int64_t per_item =
      std::max<int64_t>(1, 16384 / std::max<int64_t>(1, d));
  ParallelFor(pool, (rows + per_item - 1) / per_item, [=](int64_t item) {
    const int64_t end = std::min(rows, (item + 1) * per_item);
    for (int64_t r = item * per_item; r < end; ++r) fn(r);
  });
}

// A row's sum, and its sum of squared deviations from `mean`, written as
// row_math.h's loops: 16 lanes for float, a plain loop for double.
inline float SumRow(const float* x, int64_t n) {
  F16 sums = Splat(0.0f);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) sums += Load(x + j);
  float sum = 0;
  for (; j < n; ++j) sum += x[j];
  for (int64_t l = 0; l < kLanes; ++l) sum += sums[l];
  return sum;
}

inline double SumRow(const double* x, int64_t n) {
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += x[j];
  return sum;
}

inline float SquaredDeviations(const float* x, int64_t n, float mean) {
  F16 sums = Splat(0.0f);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const F16 c = Load(x + j) - mean;
    sums += c * c;
  }
  float sum = 0;
  for (; j < n; ++j) sum += (x[j] - mean) * (x[j] - mean);
  for (int64_t l = 0; l < kLanes; ++l) sum += sums[l];
  return sum;
}

inline double SquaredDeviations(const double* x, int64_t n, double mean) {
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += (x[j] - mean) * (x[j] - mean);
  return sum;
}

// out[j] = (x[j] - shift) factor.
inline void ShiftScaleRow(const float* x, int64_t n, float shift, float factor,
                          float* out) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    Store(out + j, (Load(x + j) - shift) * factor);
  }
  for (; j < n; ++j) out[j] = (x[j] - shift) * factor;
}

inline void ShiftScaleRow(const double* x, int64_t n, double shift,
                          double factor, double* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = (x[j] - shift) * factor;
}

// out[j] = inv (g[j] - a - x_hat[j] b).
inline void GradientRow(const float* x_hat, const float* g, int64_t n,
                        float inv, float a, float b, float* out) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    Store(out + j, (Load(g + j) - a - Load(x_hat + j) * b) * inv);
  }
  for (; j < n; ++j) out[j] = (g[j] - a - x_hat[j] * b) * inv;
}

inline void GradientRow(const double* x_hat, const double* g, int64_t n,
                        double inv, double a, double b, double* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = (g[j] - a - x_hat[j] * b) * inv;
}

// The row count and width of x [..., D]; false for a scalar.
template <typename Buffer>
bool Rows(const Buffer& x, int64_t* rows, int64_t* d) {
  const auto dims = x.dimensions();
  if (dims.size() == 0) return false;
  *d = dims.back();
  *rows = *d == 0 ? 0 : x.element_count() / *d;
  return true;
}

template <ffi::DataType D>
ffi::Error LayerNormForward(ffi::ThreadPool pool, ffi::Buffer<D> x,
                   ffi::ResultBuffer<D> x_hat, ffi::ResultBuffer<D> inv,
                   double eps) {
  using T = ffi::NativeType<D>;
  int64_t rows, d;
  if (!Rows(x, &rows, &d) || inv->element_count() != rows) {
    return ffi::Error::InvalidArgument(
        "layer_norm: x must be [..., D] and inv [...]");
  }
  if (rows == 0) return ffi::Error::Success();
  const T* px = x.typed_data();
  T* ph = x_hat->typed_data();
  T* pi = inv->typed_data();
  const T width = static_cast<T>(d);
  ForEachRow(pool, rows, d, [=](int64_t r) {
    const T* row = px + r * d;
    const T mean = SumRow(row, d) / width;
    const T var = SquaredDeviations(row, d, mean) / width;
    const T inverse = T(1) / std::sqrt(var + static_cast<T>(eps));
    ShiftScaleRow(row, d, mean, inverse, ph + r * d);
    pi[r] = inverse;
  });
  return ffi::Error::Success();
}

template <ffi::DataType D>
ffi::Error LayerNormBackward(ffi::ThreadPool pool, ffi::Buffer<D> x_hat,
                    ffi::Buffer<D> inv, ffi::Buffer<D> g,
                    ffi::ResultBuffer<D> dx) {
  using T = ffi::NativeType<D>;
  int64_t rows, d;
  if (!Rows(x_hat, &rows, &d) || inv.element_count() != rows ||
      g.element_count() != x_hat.element_count()) {
    return ffi::Error::InvalidArgument(
        "layer_norm: x-hat and its gradient must be [..., D] and inv [...]");
  }
  if (rows == 0) return ffi::Error::Success();
  const T* ph = x_hat.typed_data();
  const T* pi = inv.typed_data();
  const T* pg = g.typed_data();
  T* pdx = dx->typed_data();
  const T width = static_cast<T>(d);
  ForEachRow(pool, rows, d, [=](int64_t r) {
    const T* h = ph + r * d;
    const T* g_r = pg + r * d;
    const T a = SumRow(g_r, d) / width;
    const T b = DotRow(g_r, h, d) / width;
    GradientRow(h, g_r, d, pi[r], a, b, pdx + r * d);
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace perceiver

#define PERCEIVER_DEFINE_LAYER_NORM(forward, backward, dtype)           \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                        \
      forward, perceiver::LayerNormForward<dtype>,                      \
      xla::ffi::Ffi::Bind()                                             \
          .Ctx<xla::ffi::ThreadPool>()                                  \
          .Arg<xla::ffi::Buffer<dtype>>()                               \
          .Ret<xla::ffi::Buffer<dtype>>()                               \
          .Ret<xla::ffi::Buffer<dtype>>()                               \
          .Attr<double>("eps"));                                        \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                        \
      backward, perceiver::LayerNormBackward<dtype>,                    \
      xla::ffi::Ffi::Bind()                                             \
          .Ctx<xla::ffi::ThreadPool>()                                  \
          .Arg<xla::ffi::Buffer<dtype>>()                               \
          .Arg<xla::ffi::Buffer<dtype>>()                               \
          .Arg<xla::ffi::Buffer<dtype>>()                               \
          .Ret<xla::ffi::Buffer<dtype>>());

PERCEIVER_DEFINE_LAYER_NORM(PerceiverLayerNormForwardF32,
                            PerceiverLayerNormBackwardF32, xla::ffi::F32)
PERCEIVER_DEFINE_LAYER_NORM(PerceiverLayerNormForwardF64,
                            PerceiverLayerNormBackwardF64, xla::ffi::F64)

// Batched matrix products for XLA:CPU through the XLA FFI: C = op(A) op(B)
// over matching leading (batch) axes, op = identity or transpose, computed
// with a single-threaded GEMM (common.h: OpenBLAS's or MKL's) on XLA's own
// intra-op thread pool.
//
// Why (benchmarks/RESULTS.md, 2026-12-03): jaxlib 0.10.2's XLA:CPU runs the
// batched products of multi-head attention ([256 x 64] x [64 x 256] per head)
// on one thread; the same products as GEMMs spread over the pool's threads
// take about half the time. Built and registered by perceiver/native;
// perceiver/native's `matmul` is the JAX function that calls it.
//
// Operands: A [..., a0, a1], B [..., b0, b1], the same leading axes (G in all,
// flattened), row-major and dense (XLA's default layout). op(A) is [m, k],
// op(B) [k, n], C [..., m, n]. Work is split into chunks of whole batch
// elements, or of row or column blocks of C when there are fewer elements
// than threads;
// threads claim chunks from a counter, and the caller waits only for chunks
// that are already running, so a busy pool cannot deadlock it (common.h).

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common.h"

namespace perceiver {
namespace {

template <ffi::DataType D>
ffi::Error BatchedMatmul(ffi::ThreadPool pool, ffi::Buffer<D> a,
                         ffi::Buffer<D> b, ffi::ResultBuffer<D> c,
                         bool transpose_a, bool transpose_b) {
  using T = ffi::NativeType<D>;
  const auto da = a.dimensions();
  const auto db = b.dimensions();
  const size_t rank = da.size();
  if (rank < 2 || db.size() != rank) {
    return ffi::Error::InvalidArgument(
        "batched_matmul: operands need the same rank, at least 2");
  }
  int64_t g = 1;
  for (size_t i = 0; i + 2 < rank; ++i) {
    if (da[i] != db[i]) {
      return ffi::Error::InvalidArgument(
          "batched_matmul: operands' leading axes differ");
    }
    g *= da[i];
  }
  const int64_t a0 = da[rank - 2], a1 = da[rank - 1];
  const int64_t b0 = db[rank - 2], b1 = db[rank - 1];
  const int64_t m = transpose_a ? a1 : a0, k = transpose_a ? a0 : a1;
  const int64_t n = transpose_b ? b0 : b1;
  if ((transpose_b ? b1 : b0) != k) {
    return ffi::Error::InvalidArgument(
        "batched_matmul: contracting axes differ in size");
  }
  const T* pa = a.typed_data();
  const T* pb = b.typed_data();
  T* pc = c->typed_data();
  if (g == 0 || m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::memset(pc, 0, sizeof(T) * g * m * n);
    return ffi::Error::Success();
  }

  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // Chunks: whole elements; when g < threads, blocks of C's rows or columns
  // (whichever C has more of).
  const int64_t split = g >= threads ? 1 : (threads + g - 1) / g;
  const bool by_rows = m >= n;
  const int64_t extent = by_rows ? m : n;
  const int64_t blocks = std::min(extent, split);
  const int64_t size = (extent + blocks - 1) / blocks;
  const int64_t chunks = g * blocks;

  auto run = [=](int64_t chunk) {
    const int64_t i = chunk / blocks;
    const int64_t start = (chunk % blocks) * size;
    const int64_t count = std::min(size, extent - start);
    if (count <= 0) return;
    const T* a_i = pa + i * a0 * a1;
    const T* b_i = pb + i * b0 * b1;
    T* c_i = pc + i * m * n;
    if (by_rows) {  // rows of op(A): rows of A, or columns when transposed
      Gemm<T>(transpose_a, transpose_b, count, n, k, T(1),
              a_i + (transpose_a ? start : start * a1), a1, b_i, b1, T(0),
              c_i + start * n, n);
    } else {  // columns of op(B): columns of B, or rows when transposed
      Gemm<T>(transpose_a, transpose_b, m, count, k, T(1), a_i, a1,
              b_i + (transpose_b ? start * b1 : start), b1, T(0), c_i + start,
              n);
    }
  };
  ParallelFor(pool, chunks, run);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace perceiver

#define PERCEIVER_DEFINE_BATCHED_MATMUL(name, dtype)            \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                \
      name, perceiver::BatchedMatmul<dtype>,                    \
      xla::ffi::Ffi::Bind()                                     \
          .Ctx<xla::ffi::ThreadPool>()                          \
          .Arg<xla::ffi::Buffer<dtype>>()                       \
          .Arg<xla::ffi::Buffer<dtype>>()                       \
          .Ret<xla::ffi::Buffer<dtype>>()                       \
          .Attr<bool>("transpose_a")                            \
          .Attr<bool>("transpose_b"));

PERCEIVER_DEFINE_BATCHED_MATMUL(PerceiverBatchedMatmulF32, xla::ffi::F32)
PERCEIVER_DEFINE_BATCHED_MATMUL(PerceiverBatchedMatmulF64, xla::ffi::F64)

// OpenBLAS's own threads off: the work is already spread over XLA's pool.
extern "C" void PerceiverBlasSingleThreaded() {
  scipy_openblas_set_num_threads(1);
}

// Another CBLAS's sgemm and dgemm for every GEMM of the library (common.h),
// set by the loader before the first call (perceiver/native/library.py);
// null keeps OpenBLAS's.
extern "C" void PerceiverUseGemm(void* sgemm, void* dgemm) {
  perceiver::sgemm = sgemm ? reinterpret_cast<perceiver::SgemmFn>(sgemm)
                           : &scipy_cblas_sgemm;
  perceiver::dgemm = dgemm ? reinterpret_cast<perceiver::DgemmFn>(dgemm)
                           : &scipy_cblas_dgemm;
}

// GEMMs that return at once, leaving C as it was: a diagnostic that times
// what a step spends outside its matrix products (library.gemms_skipped,
// benchmarks/gemm_share.py). Any result computed with them is meaningless.
namespace {
constexpr perceiver::SgemmFn kSkipSgemm = [](auto...) {};
constexpr perceiver::DgemmFn kSkipDgemm = [](auto...) {};
}  // namespace

// Writes the GEMMs in use to *sgemm and *dgemm and puts the no-op ones above
// in their place; PerceiverUseGemm with the written pointers restores them.
extern "C" void PerceiverSkipGemms(void** sgemm, void** dgemm) {
  *sgemm = reinterpret_cast<void*>(perceiver::sgemm);
  *dgemm = reinterpret_cast<void*>(perceiver::dgemm);
  perceiver::sgemm = kSkipSgemm;
  perceiver::dgemm = kSkipDgemm;
}

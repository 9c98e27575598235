// Batched matrix products for XLA:CPU through the XLA FFI: C = op(A) op(B)
// over matching leading (batch) axes, op = identity or transpose, computed
// with a single-threaded GEMM (common.h: OpenBLAS's or MKL's) on XLA's own
// intra-op thread pool; and two independent products in one call (a linear
// layer's dx = g W^T and dW = x^T g), one per thread.
//
// Why (benchmarks/RESULTS.md, 2026-12-03): jaxlib 0.10.2's XLA:CPU runs the
// batched products of multi-head attention ([256 x 64] x [64 x 256] per head)
// on one thread; the same products as GEMMs spread over the pool's threads
// take about half the time. Built and registered by perceiver/native;
// perceiver/native's `matmul` and `matmul_pair` are the JAX functions that
// call it.
//
// Operands: A [..., a0, a1], B [..., b0, b1], the same leading axes (G in all,
// flattened), row-major and dense (XLA's default layout). op(A) is [m, k],
// op(B) [k, n], C [..., m, n]. Work is split into chunks of whole batch
// elements, or of row or column blocks of C when there are fewer elements
// than threads (for a pair: than each product's share of the threads);
// threads claim chunks from a counter, and the caller waits only for chunks
// that are already running, so a busy pool cannot deadlock it (common.h).

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common.h"

namespace perceiver {
namespace {

// One product's shapes, pointers and chunks.
template <typename T>
struct Product {
  const T* pa;
  const T* pb;
  T* pc;
  bool ta, tb;
  int64_t g, a0, a1, b0, b1, m, n, k;
  bool by_rows;
  int64_t extent, blocks, size;

  // Readies the product for `threads` threads and returns its chunks for
  // Run: whole batch elements, or, when there are fewer elements than
  // threads, blocks of C's rows or columns (whichever C has more of). An
  // empty C has none; an empty contraction writes C's zeros here and has
  // none either.
  int64_t Plan(int64_t threads) {
    if (g == 0 || m == 0 || n == 0) return 0;
    if (k == 0) {
      std::memset(pc, 0, sizeof(T) * g * m * n);
      return 0;
    }
    const int64_t split = g >= threads ? 1 : (threads + g - 1) / g;
    by_rows = m >= n;
    extent = by_rows ? m : n;
    blocks = std::max<int64_t>(1, std::min(extent, split));
    size = (extent + blocks - 1) / blocks;
    return g * blocks;
  }

  void Run(int64_t chunk) const {
    const int64_t i = chunk / blocks;
    const int64_t start = (chunk % blocks) * size;
    const int64_t count = std::min(size, extent - start);
    if (count <= 0) return;
    const T* a_i = pa + i * a0 * a1;
    const T* b_i = pb + i * b0 * b1;
    T* c_i = pc + i * m * n;
    if (by_rows) {  // rows of op(A): rows of A, or columns when transposed
      Gemm<T>(ta, tb, count, n, k, T(1), a_i + (ta ? start : start * a1), a1,
              b_i, b1, T(0), c_i + start * n, n);
    } else {  // columns of op(B): columns of B, or rows when transposed
      Gemm<T>(ta, tb, m, count, k, T(1), a_i, a1,
              b_i + (tb ? start * b1 : start), b1, T(0), c_i + start, n);
    }
  }
};

// Checks the operands of op(A) op(B) and fills `p` (pointers, shapes; not
// the plan).
template <ffi::DataType D>
ffi::Error Describe(const ffi::Buffer<D>& a, const ffi::Buffer<D>& b,
                    ffi::Result<ffi::Buffer<D>>& c, bool ta, bool tb,
                    Product<ffi::NativeType<D>>& p) {
  const auto da = a.dimensions();
  const auto db = b.dimensions();
  const size_t rank = da.size();
  if (rank < 2 || db.size() != rank) {
    return ffi::Error::InvalidArgument(
        "batched_matmul: operands need the same rank, at least 2");
  }
  p.g = 1;
  for (size_t i = 0; i + 2 < rank; ++i) {
    if (da[i] != db[i]) {
      return ffi::Error::InvalidArgument(
          "batched_matmul: operands' leading axes differ");
    }
    p.g *= da[i];
  }
  p.a0 = da[rank - 2], p.a1 = da[rank - 1];
  p.b0 = db[rank - 2], p.b1 = db[rank - 1];
  p.ta = ta, p.tb = tb;
  p.m = ta ? p.a1 : p.a0, p.k = ta ? p.a0 : p.a1;
  p.n = tb ? p.b0 : p.b1;
  if ((tb ? p.b1 : p.b0) != p.k) {
    return ffi::Error::InvalidArgument(
        "batched_matmul: contracting axes differ in size");
  }
  p.pa = a.typed_data();
  p.pb = b.typed_data();
  p.pc = c->typed_data();
  return ffi::Error::Success();
}

template <ffi::DataType D>
ffi::Error BatchedMatmul(ffi::ThreadPool pool, ffi::Buffer<D> a,
                         ffi::Buffer<D> b, ffi::ResultBuffer<D> c,
                         bool transpose_a, bool transpose_b) {
  Product<ffi::NativeType<D>> p;
  if (auto error = Describe<D>(a, b, c, transpose_a, transpose_b, p);
      error.failure()) {
    return error;
  }
  const int64_t chunks = p.Plan(std::max<int64_t>(1, pool.num_threads()));
  ParallelFor(pool, chunks, [&p](int64_t chunk) { p.Run(chunk); });
  return ffi::Error::Success();
}

// C1 = op(A1) op(B1) and C2 = op(A2) op(B2), independent: each product gets
// half of the pool's threads (one on two threads: a whole GEMM per thread,
// where `BatchedMatmul` would split each in two).
template <ffi::DataType D>
ffi::Error MatmulPair(ffi::ThreadPool pool, ffi::Buffer<D> a1,
                      ffi::Buffer<D> b1, ffi::Buffer<D> a2, ffi::Buffer<D> b2,
                      ffi::ResultBuffer<D> c1, ffi::ResultBuffer<D> c2,
                      bool transpose_a1, bool transpose_b1, bool transpose_a2,
                      bool transpose_b2) {
  Product<ffi::NativeType<D>> p[2];
  if (auto error = Describe<D>(a1, b1, c1, transpose_a1, transpose_b1, p[0]);
      error.failure()) {
    return error;
  }
  if (auto error = Describe<D>(a2, b2, c2, transpose_a2, transpose_b2, p[1]);
      error.failure()) {
    return error;
  }
  const int64_t share = std::max<int64_t>(1, pool.num_threads() / 2);
  const int64_t first = p[0].Plan(share);
  const int64_t total = first + p[1].Plan(share);
  ParallelFor(pool, total, [&p, first](int64_t chunk) {
    if (chunk < first) {
      p[0].Run(chunk);
    } else {
      p[1].Run(chunk - first);
    }
  });
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

#define PERCEIVER_DEFINE_MATMUL_PAIR(name, dtype)               \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                \
      name, perceiver::MatmulPair<dtype>,                       \
      xla::ffi::Ffi::Bind()                                     \
          .Ctx<xla::ffi::ThreadPool>()                          \
          .Arg<xla::ffi::Buffer<dtype>>()                       \
          .Arg<xla::ffi::Buffer<dtype>>()                       \
          .Arg<xla::ffi::Buffer<dtype>>()                       \
          .Arg<xla::ffi::Buffer<dtype>>()                       \
          .Ret<xla::ffi::Buffer<dtype>>()                       \
          .Ret<xla::ffi::Buffer<dtype>>()                       \
          .Attr<bool>("transpose_a1")                           \
          .Attr<bool>("transpose_b1")                           \
          .Attr<bool>("transpose_a2")                           \
          .Attr<bool>("transpose_b2"));

PERCEIVER_DEFINE_MATMUL_PAIR(PerceiverMatmulPairF32, xla::ffi::F32)
PERCEIVER_DEFINE_MATMUL_PAIR(PerceiverMatmulPairF64, xla::ffi::F64)
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

// What the library's FFI handlers share: a single-threaded GEMM (OpenBLAS's or
// MKL's) and a parallel loop over XLA's own intra-op thread pool.
#ifndef PERCEIVER_NATIVE_COMMON_H_
#define PERCEIVER_NATIVE_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#include "cblas.h"
#include "xla/ffi/api/ffi.h"

namespace perceiver {

namespace ffi = xla::ffi;

// The GEMMs the handlers call: OpenBLAS's unless the loader hands the library
// another CBLAS implementation's (PerceiverUseGemm, batched_matmul.cc: MKL's,
// perceiver/native/library.py), with the same C ABI (row-major CBLAS, 32-bit
// integers). `inline`: one pointer for the whole library.
using SgemmFn = decltype(&scipy_cblas_sgemm);
using DgemmFn = decltype(&scipy_cblas_dgemm);
inline SgemmFn sgemm = &scipy_cblas_sgemm;
inline DgemmFn dgemm = &scipy_cblas_dgemm;

// C = alpha op(A) op(B) + beta C, row-major; op(A) is [m, k], op(B) [k, n];
// single-threaded (the caller spreads GEMMs over XLA's pool).
template <typename T>
inline void Gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha,
                 const T* a, int64_t lda, const T* b, int64_t ldb, T beta,
                 T* c, int64_t ldc) {
  const auto trans_a = ta ? CblasTrans : CblasNoTrans;
  const auto trans_b = tb ? CblasTrans : CblasNoTrans;
  if constexpr (sizeof(T) == 4) {
    sgemm(CblasRowMajor, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb,
          beta, c, ldc);
  } else {
    dgemm(CblasRowMajor, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb,
          beta, c, ldc);
  }
}

// Progress of one ParallelFor, shared with the tasks it scheduled.
struct ParallelForState {
  int64_t n = 0;
  std::function<void(int64_t)> fn;
  std::atomic<int64_t> next{0};  // the next unclaimed item
  std::atomic<int64_t> done{0};  // items finished

  void Work() {
    for (int64_t i; (i = next.fetch_add(1)) < n;) {
      fn(i);
      done.fetch_add(1);
    }
  }
};

// Calls fn(i) for i in [0, n) on XLA's intra-op threads and the calling
// thread. Items are claimed from a counter, so a busy pool only means the
// caller does more of them; the caller returns once every item is done, and
// waits only for items that other threads are already running (a task that
// starts after that finds nothing left to claim and never calls fn). fn must
// be safe to call concurrently for different items.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, F fn) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (n <= 0) return;
  if (n == 1 || threads == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  auto state = std::make_shared<ParallelForState>();
  state->n = n;
  state->fn = std::move(fn);
  for (int64_t t = 1; t < std::min(threads, n); ++t) {
    pool.Schedule([state] { state->Work(); });
  }
  state->Work();
  while (state->done.load() < n) std::this_thread::yield();
}

}  // namespace perceiver

#endif  // PERCEIVER_NATIVE_COMMON_H_

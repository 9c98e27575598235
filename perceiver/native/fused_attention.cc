// Fused multi-head softmax attention for XLA:CPU through the XLA FFI,
// forward and backward; perceiver/native's `attention` and `self_attention`
// are the JAX functions that call it.
//
//   forward:  o = softmax(scale q k^T) v,  lse_i = log sum_j exp(scale q_i.k_j)
//   backward: the usual gradient, with P recomputed from q, k and lse:
//     delta_i = dO_i . o_i,  P = exp(scale q k^T - lse),  dV = P^T dO,
//     dP = dO V^T,  dS = P (dP - delta),  dQ = scale dS K,  dK = scale dS^T Q.
//
// Layout: every array is token-major, [B, T, W] (B batch elements of T rows
// of width W, row-major and dense), and a head is a block of columns: head h
// of q is columns q_offset + h Dq .. + Dq of q's rows, of k k_offset + h Dq,
// of v v_offset + h Dv, of o and dO h Dv. So a fused projection's output
// [B, N, 2 H Dq + H Dv] is read in place as q, k and v (the same buffer three
// times, with offsets 0, H Dq, 2 H Dq), and the gradient can be written back
// in that same packed layout (the "packed" backward): no head is ever copied
// out. lse is [B, H, N].
//
// The logits and probabilities exist only one tile at a time (at most
// kRows x kColumns, in a per-thread buffer that stays in cache): none of the
// [N, M] arrays is written to memory, and the backward pass keeps nothing of
// size N x M from the forward pass (the recomputed q k^T is one more product
// of the backward pass's five).
//
// Forward work items: one (element, head)'s block of query rows; the keys are
// walked in tiles with an online softmax (the running row maximum and sum,
// the rows of o rescaled when the maximum grows). Backward work items: one
// (element, head)'s range of key columns, so that each row of dK and dV has
// one writer; with fewer (element, head) pairs than threads the columns are
// split into parts and each part's dQ is summed afterwards. Items run on
// XLA's intra-op threads (common.h).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "common.h"
#include "row_math.h"

namespace perceiver {

// The attributes of every attention call (decoded by name, below).
struct Attrs {
  int64_t heads, q_offset, k_offset, v_offset, qk_dim, v_dim;
  double scale;
};

namespace {

constexpr int64_t kRows = 256;      // query rows of a tile
constexpr int64_t kColumns = 1024;  // key columns of a tile
constexpr int64_t kMinRows = 32;    // smallest row block worth a GEMM

// Where one operand's heads lie: head h of element b is the [rows, dim]
// block at column offset + h dim of the element's [rows, width] rows.
template <typename T>
struct Heads {
  T* data;
  int64_t rows, width, offset, dim;

  T* at(int64_t b, int64_t h, int64_t row = 0) const {
    return data + (b * rows + row) * width + offset + h * dim;
  }
};

template <typename T, typename Buffer>
Heads<T> HeadsOf(Buffer& buffer, int64_t offset, int64_t dim) {
  const auto d = buffer.dimensions();
  return {const_cast<T*>(buffer.typed_data()), d[1], d[2], offset, dim};
}

// Checks q [B, N, Wq], k [B, M, Wk], v [B, M, Wv] and that every head fits
// its rows; returns an error message or nullptr.
template <typename Buffer>
const char* Check(const Buffer& q, const Buffer& k, const Buffer& v,
                  const Attrs& a) {
  const auto dq = q.dimensions(), dk = k.dimensions(), dv = v.dimensions();
  if (dq.size() != 3 || dk.size() != 3 || dv.size() != 3) {
    return "attention: q, k and v must be [B, T, W]";
  }
  if (dk[0] != dq[0] || dv[0] != dq[0] || dv[1] != dk[1]) {
    return "attention: q [B, N, .], k and v [B, M, .] differ in B or M";
  }
  if (dk[1] == 0) return "attention: no keys (M = 0)";
  if (a.heads <= 0 || a.qk_dim <= 0 || a.v_dim <= 0 || a.q_offset < 0 ||
      a.k_offset < 0 || a.v_offset < 0 ||
      a.q_offset + a.heads * a.qk_dim > dq[2] ||
      a.k_offset + a.heads * a.qk_dim > dk[2] ||
      a.v_offset + a.heads * a.v_dim > dv[2]) {
    return "attention: the heads do not fit the rows of q, k or v";
  }
  return nullptr;
}

template <ffi::DataType D>
ffi::Error AttentionForward(ffi::ThreadPool pool, ffi::Buffer<D> q,
                            ffi::Buffer<D> k, ffi::Buffer<D> v,
                            ffi::ResultBuffer<D> o, ffi::ResultBuffer<D> lse,
                            Attrs a) {
  using T = ffi::NativeType<D>;
  if (const char* error = Check(q, k, v, a)) {
    return ffi::Error::InvalidArgument(error);
  }
  const int64_t b_size = q.dimensions()[0], n = q.dimensions()[1];
  const int64_t m = k.dimensions()[1], heads = a.heads;
  const int64_t g = b_size * heads;  // (element, head) pairs
  if (g == 0 || n == 0) return ffi::Error::Success();
  const Heads<T> qh = HeadsOf<T>(q, a.q_offset, a.qk_dim);
  const Heads<T> kh = HeadsOf<T>(k, a.k_offset, a.qk_dim);
  const Heads<T> vh = HeadsOf<T>(v, a.v_offset, a.v_dim);
  const Heads<T> oh = {o->typed_data(), n, heads * a.v_dim, 0, a.v_dim};
  T* plse = lse->typed_data();
  const T scale = static_cast<T>(a.scale);
  const int64_t dq = a.qk_dim, dv = a.v_dim;

  // Row blocks: at most kRows rows, and enough items for every thread twice
  // over where the rows allow.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t blocks = (n + kRows - 1) / kRows;
  const int64_t wanted = (2 * threads + g - 1) / g;
  blocks = std::max(blocks, std::min(wanted, (n + kMinRows - 1) / kMinRows));
  const int64_t rows = (n + blocks - 1) / blocks;

  auto item = [=](int64_t index) {
    const int64_t pair = index / blocks;
    const int64_t b = pair / heads, h = pair % heads;
    const int64_t r0 = (index % blocks) * rows;
    const int64_t rn = std::min(rows, n - r0);
    if (rn <= 0) return;
    const T* q_rows = qh.at(b, h, r0);
    T* o_rows = oh.at(b, h, r0);
    T* lse_rows = plse + pair * n + r0;
    const int64_t columns = std::min(m, kColumns);
    T* p = Scratch<T>(0, rn * columns);
    T* row_max = Scratch<T>(1, 2 * rn);
    T* row_sum = row_max + rn;
    for (int64_t t0 = 0; t0 < m; t0 += columns) {
      const int64_t tn = std::min(columns, m - t0);
      const bool first = t0 == 0;
      Gemm<T>(false, true, rn, tn, dq, scale, q_rows, qh.width, kh.at(b, h, t0),
              kh.width, T(0), p, tn);
      for (int64_t i = 0; i < rn; ++i) {
        T* p_i = p + i * tn;
        const T tile_max = MaxRow(p_i, tn);
        const T new_max = first ? tile_max : std::max(row_max[i], tile_max);
        const T sum = ExpRow(p_i, tn, new_max);
        if (first) {
          row_sum[i] = sum;
        } else {  // rescale what the earlier tiles summed
          const T alpha = Exp(row_max[i] - new_max);
          row_sum[i] = alpha * row_sum[i] + sum;
          T* o_i = o_rows + i * oh.width;
          for (int64_t j = 0; j < dv; ++j) o_i[j] *= alpha;
        }
        row_max[i] = new_max;
      }
      Gemm<T>(false, false, rn, dv, tn, T(1), p, tn, vh.at(b, h, t0), vh.width,
              first ? T(0) : T(1), o_rows, oh.width);
    }
    for (int64_t i = 0; i < rn; ++i) {
      const T inverse = T(1) / row_sum[i];
      T* o_i = o_rows + i * oh.width;
      for (int64_t j = 0; j < dv; ++j) o_i[j] *= inverse;
      lse_rows[i] = row_max[i] + std::log(row_sum[i]);
    }
  };
  ParallelFor(pool, g * blocks, item);
  return ffi::Error::Success();
}

// The backward pass into dq, dk, dv (the same buffer for a packed gradient,
// with the operands' offsets).
template <typename T, typename Buffer>
ffi::Error Backward(ffi::ThreadPool& pool, const Buffer& q, const Buffer& k,
                    const Buffer& v, const Buffer& o, const Buffer& lse,
                    const Buffer& d_o, Heads<T> dqh, Heads<T> dkh,
                    Heads<T> dvh, const Attrs& a) {
  if (const char* error = Check(q, k, v, a)) {
    return ffi::Error::InvalidArgument(error);
  }
  const int64_t b_size = q.dimensions()[0], n = q.dimensions()[1];
  const int64_t m = k.dimensions()[1], heads = a.heads;
  const int64_t dq = a.qk_dim, dv = a.v_dim;
  if (o.element_count() != b_size * n * heads * dv ||
      d_o.element_count() != b_size * n * heads * dv ||
      lse.element_count() != b_size * heads * n) {
    return ffi::Error::InvalidArgument(
        "attention: o and dO must be [B, N, H Dv] and lse [B, H, N]");
  }
  const int64_t g = b_size * heads;
  if (g == 0) return ffi::Error::Success();
  const Heads<T> qh = HeadsOf<T>(q, a.q_offset, dq);
  const Heads<T> kh = HeadsOf<T>(k, a.k_offset, dq);
  const Heads<T> vh = HeadsOf<T>(v, a.v_offset, dv);
  const Heads<T> oh = {const_cast<T*>(o.typed_data()), n, heads * dv, 0, dv};
  const Heads<T> doh = {const_cast<T*>(d_o.typed_data()), n, heads * dv, 0,
                        dv};
  const T* plse = lse.typed_data();
  const T scale = static_cast<T>(a.scale);
  if (n == 0) {  // no queries: nothing flows to the keys and values
    for (int64_t b = 0; b < b_size; ++b) {
      for (int64_t h = 0; h < heads; ++h) {
        for (int64_t j = 0; j < m; ++j) {
          std::memset(dkh.at(b, h, j), 0, sizeof(T) * dq);
          std::memset(dvh.at(b, h, j), 0, sizeof(T) * dv);
        }
      }
    }
    return ffi::Error::Success();
  }

  // Column parts per (element, head): one, or enough for every thread.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t parts = std::min(
      g >= threads ? int64_t{1} : (threads + g - 1) / g,
      (m + kMinRows - 1) / kMinRows);
  const int64_t width = (m + parts - 1) / parts;
  // With several parts, each part's dQ goes to its own [N, Dq] slice here.
  std::unique_ptr<T[]> partial_dq(parts > 1 ? new T[g * parts * n * dq]
                                            : nullptr);
  T* partial = partial_dq.get();

  auto item = [=](int64_t index) {
    const int64_t pair = index / parts, part = index % parts;
    const int64_t b = pair / heads, h = pair % heads;
    const int64_t c0 = part * width;
    const int64_t c1 = std::min(m, c0 + width);
    // dQ's rows: the output's, or this part's slice of `partial`.
    T* dq_rows = parts > 1 ? partial + index * n * dq : dqh.at(b, h);
    const int64_t dq_ld = parts > 1 ? dq : dqh.width;
    if (c0 >= c1) {
      for (int64_t i = 0; i < n; ++i) {
        std::memset(dq_rows + i * dq_ld, 0, sizeof(T) * dq);
      }
      return;
    }
    const T* lse_g = plse + pair * n;
    const int64_t rows = std::min(n, kRows);
    const int64_t columns = std::min(c1 - c0, kColumns);
    T* p = Scratch<T>(0, rows * columns);
    T* dp = Scratch<T>(1, rows * columns);
    T* delta = Scratch<T>(2, n);
    for (int64_t i = 0; i < n; ++i) {
      delta[i] = DotRow(doh.at(b, h, i), oh.at(b, h, i), dv);
    }
    for (int64_t t0 = c0; t0 < c1; t0 += columns) {
      const int64_t tn = std::min(columns, c1 - t0);
      const T* k_t = kh.at(b, h, t0);
      const T* v_t = vh.at(b, h, t0);
      T* dk_t = dkh.at(b, h, t0);
      T* dv_t = dvh.at(b, h, t0);
      for (int64_t r0 = 0; r0 < n; r0 += rows) {
        const int64_t rn = std::min(rows, n - r0);
        const T* q_r = qh.at(b, h, r0);
        const T* do_r = doh.at(b, h, r0);
        const T first_rows = r0 == 0 ? T(0) : T(1);
        Gemm<T>(false, true, rn, tn, dq, scale, q_r, qh.width, k_t, kh.width,
                T(0), p, tn);
        for (int64_t i = 0; i < rn; ++i) {
          ExpRow(p + i * tn, tn, lse_g[r0 + i]);  // P
        }
        Gemm<T>(true, false, tn, dv, rn, T(1), p, tn, do_r, doh.width,
                first_rows, dv_t, dvh.width);  // dV += P^T dO
        Gemm<T>(false, true, rn, tn, dv, T(1), do_r, doh.width, v_t, vh.width,
                T(0), dp, tn);  // dP = dO V^T
        for (int64_t i = 0; i < rn; ++i) {
          T* p_i = p + i * tn;
          const T* dp_i = dp + i * tn;
          const T delta_i = delta[r0 + i];
          for (int64_t j = 0; j < tn; ++j) p_i[j] *= dp_i[j] - delta_i;  // dS
        }
        Gemm<T>(false, false, rn, dq, tn, scale, p, tn, k_t, kh.width,
                t0 == c0 ? T(0) : T(1), dq_rows + r0 * dq_ld,
                dq_ld);  // dQ += scale dS K
        Gemm<T>(true, false, tn, dq, rn, scale, p, tn, q_r, qh.width,
                first_rows, dk_t, dkh.width);  // dK += scale dS^T Q
      }
    }
  };
  ParallelFor(pool, g * parts, item);
  if (parts > 1) {  // dQ = the sum of the parts' dQ
    ParallelFor(pool, g, [=](int64_t pair) {
      const int64_t b = pair / heads, h = pair % heads;
      const T* first = partial + pair * parts * n * dq;
      for (int64_t i = 0; i < n; ++i) {
        T* out = dqh.at(b, h, i);
        std::memcpy(out, first + i * dq, sizeof(T) * dq);
        for (int64_t part = 1; part < parts; ++part) {
          const T* other = first + (part * n + i) * dq;
          for (int64_t j = 0; j < dq; ++j) out[j] += other[j];
        }
      }
    });
  }
  return ffi::Error::Success();
}

template <ffi::DataType D>
ffi::Error AttentionBackward(ffi::ThreadPool pool, ffi::Buffer<D> q,
                             ffi::Buffer<D> k, ffi::Buffer<D> v,
                             ffi::Buffer<D> o, ffi::Buffer<D> lse,
                             ffi::Buffer<D> d_o, ffi::ResultBuffer<D> dq,
                             ffi::ResultBuffer<D> dk, ffi::ResultBuffer<D> dv,
                             Attrs a) {
  using T = ffi::NativeType<D>;
  return Backward<T>(pool, q, k, v, o, lse, d_o,
                     HeadsOf<T>(*dq, a.q_offset, a.qk_dim),
                     HeadsOf<T>(*dk, a.k_offset, a.qk_dim),
                     HeadsOf<T>(*dv, a.v_offset, a.v_dim), a);
}

// q, k and v are one buffer (a fused projection's output); so is the
// gradient, in the same layout.
template <ffi::DataType D>
ffi::Error AttentionBackwardPacked(ffi::ThreadPool pool, ffi::Buffer<D> qkv,
                                   ffi::Buffer<D> o, ffi::Buffer<D> lse,
                                   ffi::Buffer<D> d_o,
                                   ffi::ResultBuffer<D> d_qkv, Attrs a) {
  using T = ffi::NativeType<D>;
  const auto d = qkv.dimensions();
  if (d.size() == 3 && a.heads * (2 * a.qk_dim + a.v_dim) != d[2]) {
    return ffi::Error::InvalidArgument(
        "attention: a packed gradient needs rows of exactly q, k and v");
  }
  return Backward<T>(pool, qkv, qkv, qkv, o, lse, d_o,
                     HeadsOf<T>(*d_qkv, a.q_offset, a.qk_dim),
                     HeadsOf<T>(*d_qkv, a.k_offset, a.qk_dim),
                     HeadsOf<T>(*d_qkv, a.v_offset, a.v_dim), a);
}

}  // namespace
}  // namespace perceiver

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(
    perceiver::Attrs, StructMember<int64_t>("heads"),
    StructMember<int64_t>("q_offset"), StructMember<int64_t>("k_offset"),
    StructMember<int64_t>("v_offset"), StructMember<int64_t>("qk_dim"),
    StructMember<int64_t>("v_dim"), StructMember<double>("scale"));

#define PERCEIVER_DEFINE_ATTENTION(forward, backward, packed, dtype)    \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                        \
      forward, perceiver::AttentionForward<dtype>,                      \
      xla::ffi::Ffi::Bind()                                             \
          .Ctx<xla::ffi::ThreadPool>()                                  \
          .Arg<xla::ffi::Buffer<dtype>>()                               \
          .Arg<xla::ffi::Buffer<dtype>>()                               \
          .Arg<xla::ffi::Buffer<dtype>>()                               \
          .Ret<xla::ffi::Buffer<dtype>>()                               \
          .Ret<xla::ffi::Buffer<dtype>>()                               \
          .Attrs<perceiver::Attrs>());                                  \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                        \
      backward, perceiver::AttentionBackward<dtype>,                    \
      xla::ffi::Ffi::Bind()                                             \
          .Ctx<xla::ffi::ThreadPool>()                                  \
          .Arg<xla::ffi::Buffer<dtype>>()                               \
          .Arg<xla::ffi::Buffer<dtype>>()                               \
          .Arg<xla::ffi::Buffer<dtype>>()                               \
          .Arg<xla::ffi::Buffer<dtype>>()                               \
          .Arg<xla::ffi::Buffer<dtype>>()                               \
          .Arg<xla::ffi::Buffer<dtype>>()                               \
          .Ret<xla::ffi::Buffer<dtype>>()                               \
          .Ret<xla::ffi::Buffer<dtype>>()                               \
          .Ret<xla::ffi::Buffer<dtype>>()                               \
          .Attrs<perceiver::Attrs>());                                  \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                        \
      packed, perceiver::AttentionBackwardPacked<dtype>,                \
      xla::ffi::Ffi::Bind()                                             \
          .Ctx<xla::ffi::ThreadPool>()                                  \
          .Arg<xla::ffi::Buffer<dtype>>()                               \
          .Arg<xla::ffi::Buffer<dtype>>()                               \
          .Arg<xla::ffi::Buffer<dtype>>()                               \
          .Arg<xla::ffi::Buffer<dtype>>()                               \
          .Ret<xla::ffi::Buffer<dtype>>()                               \
          .Attrs<perceiver::Attrs>());

PERCEIVER_DEFINE_ATTENTION(PerceiverAttentionForwardF32,
                           PerceiverAttentionBackwardF32,
                           PerceiverAttentionBackwardPackedF32, xla::ffi::F32)
PERCEIVER_DEFINE_ATTENTION(PerceiverAttentionForwardF64,
                           PerceiverAttentionBackwardF64,
                           PerceiverAttentionBackwardPackedF64, xla::ffi::F64)

// Attention of queries shared by the whole batch over a factored byte array,
// forward and backward, for XLA:CPU through the XLA FFI; perceiver/native's
// `factored_attention` is the JAX function that calls it.
//
// The Perceiver's first cross-attend reads the byte array with queries made
// from the learned latents alone: the same q for every example. Its keys and
// values are LayerNorm(x) W + b of a factored byte array (raw [B, M, c]
// channels per example, position features pos [M, p] shared,
// perceiver/byte_array.py). With W' = scale W (rows: c raw, p position),
// LayerNorm(x) W' = inv (x - mean) W', so, up to constant terms,
//
//   K_b = inv_b ((raw_b - mean_b) wk + pk - mean_b sk),
//   V_b = inv_b ((raw_b - mean_b) wv + pv - mean_b sv),
//
// wk = W'k's raw rows [c, D], pk = pos W'k's position rows [M, D] (once per
// batch), sk = the position rows' column sums [D], mean_b and inv_b the
// inputs' LayerNorm statistics [M] (the raw channels centred first, as
// LayerNorm centres them: no sum of large terms cancels). Per head (columns
// h D .. (h + 1) D), with qs = scale q:
//
//   S_b = inv_b * (qs pk^T + a (raw_b - mean_b)^T - (qs sk) mean_b^T),
//   a = qs wk^T [N, c]
//
// (inv_b scaling the columns; the keys' constant term adds q ck to every
// key, which the softmax ignores), P_b = softmax(S_b) and, R_b = P_b inv_b
// (columns scaled),
//
//   o_b = R_b pv + (R_b (raw_b - mean_b)) wv - (R_b mean_b) sv,
//
// the values' constant term added by the caller. qs pk^T, the one [N, M]
// product over D, is computed once per key tile for the whole batch; per
// example there remain R_b pv ([N, M] x [M, E]) forward, and R_b^T dO_b and
// dO_b pv^T backward, with rank-c updates and elementwise work: about half
// the products of attention over K_b and V_b, and no [B, M, D] array is
// ever formed.
//
// Backward, with delta_b = dO_b . o_b (per query row; the values' constant
// cancels in dP - delta), the probabilities recomputed from lse:
//
//   dP_b = inv_b * (dO_b pv^T + (dO_b wv^T) (raw_b - mean_b)^T
//                   - (dO_b sv) mean_b^T),
//   dS_b = P_b (dP_b - delta_b),  E_b = inv_b * dS_b  (columns scaled),
//   E = sum_b E_b,  F = sum_b E_b (raw_b - mean_b) [N, c],
//   G = sum_b E_b mean_b [N],
//   d qs = E pk + F wk - G sk^T,   d pk = E^T qs,   d wk = F^T qs,
//   d sk = -G^T qs,   d pv = sum_b R_b^T dO_b,
//   d wv = sum_b (R_b (raw_b - mean_b))^T dO_b,
//   d sv = -sum_b (R_b mean_b)^T dO_b,
//
// and d q = scale d qs. (The constant terms' gradients are the caller's.)
//
// Work items: one head's group of consecutive key tiles (kColumns keys),
// every example of the batch inside, so that E's columns and the rows of
// d pk and d pv have one writer. Forward, each item keeps an online softmax
// per (example, query row) over its tiles, and the items' partial sums are
// combined at the end (as split-K attention does); backward, the items'
// partial d qs, F, G, d wv and d sv are summed at the end. Items run on
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

struct FactoredAttrs {
  int64_t heads;
  double scale;
};

namespace {

constexpr int64_t kColumns = 512;  // keys of a tile

struct Sizes {
  int64_t b, n, m, c, heads, d, e;  // batch, queries, keys, raw channels
};

template <typename Buffer>
const char* CheckFactored(const Buffer& q, const Buffer& raw,
                          const Buffer& mean, const Buffer& inv,
                          const Buffer& pk, const Buffer& wk,
                          const Buffer& sk, const Buffer& pv,
                          const Buffer& wv, const Buffer& sv, int64_t heads,
                          Sizes* s) {
  const auto dq = q.dimensions(), draw = raw.dimensions();
  const auto dpk = pk.dimensions(), dpv = pv.dimensions();
  if (dq.size() != 2 || draw.size() != 3 || dpk.size() != 2 ||
      dpv.size() != 2) {
    return "factored_attention: q [N, W], raw [B, M, c], pk and pv [M, W]";
  }
  *s = {draw[0], dq[0], draw[1], draw[2], heads, 0, 0};
  if (heads <= 0 || dq[1] % heads || dpv[1] % heads) {
    return "factored_attention: widths do not split into the heads";
  }
  s->d = dq[1] / heads;
  s->e = dpv[1] / heads;
  if (s->m == 0) return "factored_attention: no keys (M = 0)";
  if (dpk[0] != s->m || dpk[1] != dq[1] || dpv[0] != s->m ||
      mean.element_count() != s->b * s->m ||
      inv.element_count() != s->b * s->m ||
      wk.element_count() != s->c * dq[1] || sk.element_count() != dq[1] ||
      wv.element_count() != s->c * dpv[1] || sv.element_count() != dpv[1]) {
    return "factored_attention: operand shapes do not match";
  }
  return nullptr;
}

// The per-example, per-tile quantities the items share.
template <typename T>
struct Tile {
  int64_t t0, tn;
  const T* mean;  // [tn]
  const T* inv;   // [tn]
  T* raw;         // [c, tn]: raw - mean, each channel contiguous
};

// Loads example b's tile: its statistics, and raw - mean (transposed) into
// `raw_t`.
template <typename T>
Tile<T> LoadTile(const Sizes& s, const T* raw, const T* mean, const T* inv,
                 int64_t b, int64_t t0, int64_t tn, T* raw_t) {
  const T* raw_rows = raw + (b * s.m + t0) * s.c;
  const T* mean_t = mean + b * s.m + t0;
  for (int64_t i = 0; i < tn; ++i) {
    for (int64_t j = 0; j < s.c; ++j) {
      raw_t[j * tn + i] = raw_rows[i * s.c + j] - mean_t[i];
    }
  }
  return {t0, tn, mean_t, inv + b * s.m + t0, raw_t};
}

// p[n, :] = inv * (s0[n, :] + sum_j a[n, j] (raw - mean)[j, :]
// - ms[n] mean) over a tile's columns: example b's logits from the shared
// qs pk^T tile.
template <typename T>
void Logits(const Sizes& s, const Tile<T>& t, const T* s0, const T* a,
            const T* ms, T* p) {
  for (int64_t i = 0; i < s.n; ++i) {
    const T* s0_i = s0 + i * t.tn;
    T* p_i = p + i * t.tn;
    const T* a_i = a + i * s.c;
    const T m_i = ms[i];
    for (int64_t k = 0; k < t.tn; ++k) p_i[k] = s0_i[k] - m_i * t.mean[k];
    for (int64_t j = 0; j < s.c; ++j) {
      const T a_ij = a_i[j];
      const T* r = t.raw + j * t.tn;
      for (int64_t k = 0; k < t.tn; ++k) p_i[k] += a_ij * r[k];
    }
    for (int64_t k = 0; k < t.tn; ++k) p_i[k] *= t.inv[k];
  }
}

// a = qs wk^T [N, c] and ms = qs . sk [N] for head h (qs = scale q).
template <typename T>
void QueryTerms(const Sizes& s, const T* q, const T* wk, const T* sk,
                int64_t h, T scale, T* a, T* ms) {
  const int64_t width = s.heads * s.d;
  for (int64_t i = 0; i < s.n; ++i) {
    const T* q_i = q + i * width + h * s.d;
    for (int64_t j = 0; j < s.c; ++j) {
      a[i * s.c + j] = scale * DotRow(q_i, wk + j * width + h * s.d, s.d);
    }
    ms[i] = scale * DotRow(q_i, sk + h * s.d, s.d);
  }
}

template <ffi::DataType D>
ffi::Error FactoredForward(ffi::ThreadPool pool, ffi::Buffer<D> q,
                           ffi::Buffer<D> raw, ffi::Buffer<D> mean,
                           ffi::Buffer<D> inv, ffi::Buffer<D> pk,
                           ffi::Buffer<D> wk, ffi::Buffer<D> sk,
                           ffi::Buffer<D> pv, ffi::Buffer<D> wv,
                           ffi::Buffer<D> sv, ffi::ResultBuffer<D> o,
                           ffi::ResultBuffer<D> lse, FactoredAttrs attrs) {
  using T = ffi::NativeType<D>;
  Sizes s;
  if (const char* error = CheckFactored(q, raw, mean, inv, pk, wk, sk, pv, wv,
                                        sv, attrs.heads, &s)) {
    return ffi::Error::InvalidArgument(error);
  }
  if (s.b == 0 || s.n == 0) return ffi::Error::Success();
  const T scale = static_cast<T>(attrs.scale);
  const int64_t wd = s.heads * s.d, we = s.heads * s.e;
  const int64_t tiles = (s.m + kColumns - 1) / kColumns;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t groups =
      std::min(tiles, std::max<int64_t>(1, (2 * threads + s.heads - 1) /
                                               s.heads));
  const int64_t per_group = (tiles + groups - 1) / groups;
  // Each item's online softmax, per (example, row): its maximum and sum,
  // and the rows of R pv, R (raw - mean) and R mean summed so far.
  const int64_t rows = s.b * s.n;
  const int64_t stride = rows * (2 + s.e + s.c + 1);
  std::unique_ptr<T[]> partial(new T[s.heads * groups * stride]);
  const T* pq = q.typed_data();
  const T* praw = raw.typed_data();
  const T* pmean = mean.typed_data();
  const T* pinv = inv.typed_data();
  const T* ppk = pk.typed_data();
  const T* pwk = wk.typed_data();
  const T* psk = sk.typed_data();
  const T* ppv = pv.typed_data();
  const T* pwv = wv.typed_data();
  const T* psv = sv.typed_data();
  T* part = partial.get();

  auto item = [=](int64_t index) {
    const int64_t h = index / groups, group = index % groups;
    T* row_max = part + index * stride;
    T* row_sum = row_max + rows;
    T* acc_o = row_sum + rows;            // [B, N, E]
    T* acc_raw = acc_o + rows * s.e;      // [B, N, c]
    T* acc_mean = acc_raw + rows * s.c;   // [B, N]
    std::fill(row_max, row_max + rows, T(-INFINITY));
    std::fill(row_sum, acc_mean + rows, T(0));
    T* a = Scratch<T>(0, s.n * (s.c + 1));
    T* ms = a + s.n * s.c;
    QueryTerms(s, pq, pwk, psk, h, scale, a, ms);
    const int64_t first = group * per_group;
    const int64_t last = std::min(tiles, first + per_group);
    const int64_t columns = std::min(s.m, kColumns);
    T* s0 = Scratch<T>(1, s.n * columns);
    T* p = Scratch<T>(2, s.n * columns);
    T* raw_t = Scratch<T>(3, s.c * columns);
    for (int64_t tile = first; tile < last; ++tile) {
      const int64_t t0 = tile * kColumns;
      const int64_t tn = std::min(kColumns, s.m - t0);
      // qs pk^T for this tile, shared by the batch.
      Gemm<T>(false, true, s.n, tn, s.d, scale, pq + h * s.d, wd,
              ppk + t0 * wd + h * s.d, wd, T(0), s0, tn);
      for (int64_t b = 0; b < s.b; ++b) {
        const Tile<T> t = LoadTile(s, praw, pmean, pinv, b, t0, tn, raw_t);
        Logits(s, t, s0, a, ms, p);
        for (int64_t i = 0; i < s.n; ++i) {
          const int64_t r = b * s.n + i;
          T* p_i = p + i * tn;
          const T tile_max = MaxRow(p_i, tn);
          const T new_max = std::max(row_max[r], tile_max);
          const T alpha = row_max[r] == T(-INFINITY)
                              ? T(0) : Exp(row_max[r] - new_max);
          row_sum[r] = alpha * row_sum[r] + ExpRow(p_i, tn, new_max);
          row_max[r] = new_max;
          T* o_r = acc_o + r * s.e;
          T* raw_r = acc_raw + r * s.c;
          if (alpha != T(1)) {
            for (int64_t k = 0; k < s.e; ++k) o_r[k] *= alpha;
            for (int64_t j = 0; j < s.c; ++j) raw_r[j] *= alpha;
            acc_mean[r] *= alpha;
          }
          for (int64_t k = 0; k < tn; ++k) p_i[k] *= t.inv[k];  // R
          for (int64_t j = 0; j < s.c; ++j) {  // R (raw - mean)
            raw_r[j] += DotRow(p_i, t.raw + j * tn, tn);
          }
          acc_mean[r] += DotRow(p_i, t.mean, tn);  // R mean
        }
        Gemm<T>(false, false, s.n, s.e, tn, T(1), p, tn,
                ppv + t0 * we + h * s.e, we, T(1), acc_o + b * s.n * s.e,
                s.e);  // += R pv
      }
    }
  };
  ParallelFor(pool, s.heads * groups, item);

  // Combine the items of each head: o = (R pv + (R (raw - mean)) wv
  // - (R mean) sv) over all keys, divided by the softmax's sum.
  T* po = o->typed_data();
  T* plse = lse->typed_data();
  ParallelFor(pool, s.b * s.heads, [=](int64_t pair) {
    const int64_t b = pair / s.heads, h = pair % s.heads;
    std::vector<T> raw_sum(s.c);
    for (int64_t i = 0; i < s.n; ++i) {
      const int64_t r = b * s.n + i;
      T top = T(-INFINITY);
      for (int64_t g = 0; g < groups; ++g) {
        top = std::max(top, part[(h * groups + g) * stride + r]);
      }
      T total = 0, mean_sum = 0;
      T* o_i = po + (b * s.n + i) * we + h * s.e;
      std::fill(o_i, o_i + s.e, T(0));
      std::fill(raw_sum.begin(), raw_sum.end(), T(0));
      for (int64_t g = 0; g < groups; ++g) {
        const T* base = part + (h * groups + g) * stride;
        if (base[r] == T(-INFINITY)) continue;  // an item without keys
        const T f = Exp(base[r] - top);
        total += f * base[rows + r];
        const T* acc_o = base + 2 * rows + r * s.e;
        for (int64_t k = 0; k < s.e; ++k) o_i[k] += f * acc_o[k];
        const T* acc_raw = base + 2 * rows + rows * s.e + r * s.c;
        for (int64_t j = 0; j < s.c; ++j) raw_sum[j] += f * acc_raw[j];
        mean_sum += f * base[2 * rows + rows * (s.e + s.c) + r];
      }
      for (int64_t j = 0; j < s.c; ++j) {
        const T* wv_j = pwv + j * we + h * s.e;
        for (int64_t k = 0; k < s.e; ++k) o_i[k] += raw_sum[j] * wv_j[k];
      }
      const T* sv_h = psv + h * s.e;
      const T inverse = T(1) / total;
      for (int64_t k = 0; k < s.e; ++k) {
        o_i[k] = (o_i[k] - mean_sum * sv_h[k]) * inverse;
      }
      plse[pair * s.n + i] = top + std::log(total);
    }
  });
  return ffi::Error::Success();
}

template <ffi::DataType D>
ffi::Error FactoredBackward(
    ffi::ThreadPool pool, ffi::Buffer<D> q, ffi::Buffer<D> raw,
    ffi::Buffer<D> mean, ffi::Buffer<D> inv, ffi::Buffer<D> pk,
    ffi::Buffer<D> wk, ffi::Buffer<D> sk, ffi::Buffer<D> pv,
    ffi::Buffer<D> wv, ffi::Buffer<D> sv, ffi::Buffer<D> o,
    ffi::Buffer<D> lse, ffi::Buffer<D> d_o, ffi::ResultBuffer<D> dq,
    ffi::ResultBuffer<D> dpk, ffi::ResultBuffer<D> dwk,
    ffi::ResultBuffer<D> dsk, ffi::ResultBuffer<D> dpv,
    ffi::ResultBuffer<D> dwv, ffi::ResultBuffer<D> dsv, FactoredAttrs attrs) {
  using T = ffi::NativeType<D>;
  Sizes s;
  if (const char* error = CheckFactored(q, raw, mean, inv, pk, wk, sk, pv, wv,
                                        sv, attrs.heads, &s)) {
    return ffi::Error::InvalidArgument(error);
  }
  const int64_t wd = s.heads * s.d, we = s.heads * s.e;
  if (o.element_count() != s.b * s.n * we ||
      d_o.element_count() != s.b * s.n * we ||
      lse.element_count() != s.b * s.heads * s.n) {
    return ffi::Error::InvalidArgument(
        "factored_attention: o and dO must be [B, N, H E], lse [B, H, N]");
  }
  const T scale = static_cast<T>(attrs.scale);
  const T* pq = q.typed_data();
  const T* praw = raw.typed_data();
  const T* pmean = mean.typed_data();
  const T* pinv = inv.typed_data();
  const T* ppk = pk.typed_data();
  const T* pwk = wk.typed_data();
  const T* psk = sk.typed_data();
  const T* ppv = pv.typed_data();
  const T* pwv = wv.typed_data();
  const T* psv = sv.typed_data();
  const T* po = o.typed_data();
  const T* plse = lse.typed_data();
  const T* pdo = d_o.typed_data();
  T* pdq = dq->typed_data();
  T* pdpk = dpk->typed_data();
  T* pdwk = dwk->typed_data();
  T* pdsk = dsk->typed_data();
  T* pdpv = dpv->typed_data();
  T* pdwv = dwv->typed_data();
  T* pdsv = dsv->typed_data();
  if (s.b == 0 || s.n == 0) {  // nothing flows back
    std::memset(pdq, 0, sizeof(T) * s.n * wd);
    std::memset(pdpk, 0, sizeof(T) * s.m * wd);
    std::memset(pdwk, 0, sizeof(T) * s.c * wd);
    std::memset(pdsk, 0, sizeof(T) * wd);
    std::memset(pdpv, 0, sizeof(T) * s.m * we);
    std::memset(pdwv, 0, sizeof(T) * s.c * we);
    std::memset(pdsv, 0, sizeof(T) * we);
    return ffi::Error::Success();
  }

  // Per (example, head): delta = dO . o, ds = dO . sv [N] and
  // bv = dO wv^T [N, c], in one array [B, H, N, 2 + c].
  const int64_t pre = 2 + s.c;
  std::unique_ptr<T[]> terms(new T[s.b * s.heads * s.n * pre]);
  T* pterms = terms.get();
  ParallelFor(pool, s.b * s.heads, [=](int64_t pair) {
    const int64_t b = pair / s.heads, h = pair % s.heads;
    for (int64_t i = 0; i < s.n; ++i) {
      const T* do_i = pdo + (b * s.n + i) * we + h * s.e;
      const T* o_i = po + (b * s.n + i) * we + h * s.e;
      T* t = pterms + (pair * s.n + i) * pre;
      t[0] = DotRow(do_i, o_i, s.e);
      t[1] = DotRow(do_i, psv + h * s.e, s.e);
      for (int64_t j = 0; j < s.c; ++j) {
        t[2 + j] = DotRow(do_i, pwv + j * we + h * s.e, s.e);
      }
    }
  });

  const int64_t tiles = (s.m + kColumns - 1) / kColumns;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t groups =
      std::min(tiles, std::max<int64_t>(1, (2 * threads + s.heads - 1) /
                                               s.heads));
  const int64_t per_group = (tiles + groups - 1) / groups;
  // Each item's partial d qs [N, D], F [N, c], G [N], d wv [c, E], d sv [E]
  // (F and d wv over raw - mean).
  const int64_t stride = s.n * (s.d + s.c + 1) + s.c * s.e + s.e;
  std::unique_ptr<T[]> partial(new T[s.heads * groups * stride]());
  T* part = partial.get();

  auto item = [=](int64_t index) {
    const int64_t h = index / groups, group = index % groups;
    T* dqs = part + index * stride;      // [N, D]
    T* f = dqs + s.n * s.d;              // [N, c]
    T* g = f + s.n * s.c;                // [N]
    T* dwv_part = g + s.n;               // [c, E]
    T* dsv_part = dwv_part + s.c * s.e;  // [E]
    T* a = Scratch<T>(0, s.n * (s.c + 1));
    T* ms = a + s.n * s.c;
    QueryTerms(s, pq, pwk, psk, h, scale, a, ms);
    const int64_t first = group * per_group;
    const int64_t last = std::min(tiles, first + per_group);
    const int64_t columns = std::min(s.m, kColumns);
    T* s0 = Scratch<T>(1, s.n * columns);
    T* p = Scratch<T>(2, s.n * columns);
    T* raw_t = Scratch<T>(3, s.c * columns);
    T* dp = Scratch<T>(4, s.n * columns);
    T* e_sum = Scratch<T>(5, s.n * columns);
    // R (raw - mean) [N, c], R mean [N]
    T* rraw = Scratch<T>(6, s.n * (s.c + 1));
    T* qs = Scratch<T>(7, s.n * s.d);
    for (int64_t i = 0; i < s.n; ++i) {
      for (int64_t k = 0; k < s.d; ++k) {
        qs[i * s.d + k] = scale * pq[i * wd + h * s.d + k];
      }
    }
    for (int64_t tile = first; tile < last; ++tile) {
      const int64_t t0 = tile * kColumns;
      const int64_t tn = std::min(kColumns, s.m - t0);
      Gemm<T>(false, true, s.n, tn, s.d, T(1), qs, s.d,
              ppk + t0 * wd + h * s.d, wd, T(0), s0, tn);
      std::fill(e_sum, e_sum + s.n * tn, T(0));
      T* dpv_t = pdpv + t0 * we + h * s.e;
      for (int64_t b = 0; b < s.b; ++b) {
        const Tile<T> t = LoadTile(s, praw, pmean, pinv, b, t0, tn, raw_t);
        const T* do_b = pdo + b * s.n * we + h * s.e;
        const T* lse_b = plse + (b * s.heads + h) * s.n;
        const T* terms_b = pterms + (b * s.heads + h) * s.n * pre;
        Logits(s, t, s0, a, ms, p);
        T* r_mean = rraw + s.n * s.c;
        for (int64_t i = 0; i < s.n; ++i) {
          T* p_i = p + i * tn;
          ExpRow(p_i, tn, lse_b[i]);  // P
        }
        // dP = inv * (dO pv^T + bv (raw - mean)^T - ds mean^T), from the
        // GEMM first.
        Gemm<T>(false, true, s.n, tn, s.e, T(1), do_b, we,
                ppv + t0 * we + h * s.e, we, T(0), dp, tn);
        for (int64_t i = 0; i < s.n; ++i) {
          T* p_i = p + i * tn;
          T* dp_i = dp + i * tn;
          T* e_i = e_sum + i * tn;
          const T* terms_i = terms_b + i * pre;
          const T delta_i = terms_i[0], ds_i = terms_i[1];
          for (int64_t k = 0; k < tn; ++k) dp_i[k] -= ds_i * t.mean[k];
          for (int64_t j = 0; j < s.c; ++j) {
            const T bv_ij = terms_i[2 + j];
            const T* r = t.raw + j * tn;
            for (int64_t k = 0; k < tn; ++k) dp_i[k] += bv_ij * r[k];
          }
          // p <- R = P inv; dp <- E = inv dS = R (inv dP' - delta), with
          // dP' the bracket above.
          for (int64_t k = 0; k < tn; ++k) {
            const T r_k = p_i[k] * t.inv[k];
            p_i[k] = r_k;
            dp_i[k] = r_k * (t.inv[k] * dp_i[k] - delta_i);
            e_i[k] += dp_i[k];
          }
          T* f_i = f + i * s.c;
          T* rraw_i = rraw + i * s.c;
          for (int64_t j = 0; j < s.c; ++j) {
            f_i[j] += DotRow(dp_i, t.raw + j * tn, tn);
            rraw_i[j] = DotRow(p_i, t.raw + j * tn, tn);
          }
          g[i] += DotRow(dp_i, t.mean, tn);
          r_mean[i] = DotRow(p_i, t.mean, tn);
        }
        // d pv += R^T dO; d wv += (R (raw - mean))^T dO;
        // d sv -= (R mean)^T dO.
        Gemm<T>(true, false, tn, s.e, s.n, T(1), p, tn, do_b, we,
                b == 0 ? T(0) : T(1), dpv_t, we);
        Gemm<T>(true, false, s.c, s.e, s.n, T(1), rraw, s.c, do_b, we, T(1),
                dwv_part, s.e);
        Gemm<T>(true, false, 1, s.e, s.n, T(-1), r_mean, 1, do_b, we, T(1),
                dsv_part, s.e);
      }
      // d pk = E^T qs for this tile; d qs += E pk.
      Gemm<T>(true, false, tn, s.d, s.n, T(1), e_sum, tn, qs, s.d, T(0),
              pdpk + t0 * wd + h * s.d, wd);
      Gemm<T>(false, false, s.n, s.d, tn, T(1), e_sum, tn,
              ppk + t0 * wd + h * s.d, wd, T(1), dqs, s.d);
    }
  };
  ParallelFor(pool, s.heads * groups, item);

  // Sum the items of each head: d qs = sum + F wk - G sk^T; d q = scale d qs;
  // d wk = F^T qs; d sk = -G^T qs; d wv, d sv: the sums.
  ParallelFor(pool, s.heads, [=](int64_t h) {
    T* total = part + h * groups * stride;  // the first item's, summed into
    for (int64_t g = 1; g < groups; ++g) {
      const T* other = total + g * stride;
      for (int64_t k = 0; k < stride; ++k) total[k] += other[k];
    }
    T* dqs = total;
    const T* f = dqs + s.n * s.d;
    const T* g = f + s.n * s.c;
    const T* dwv_sum = g + s.n;
    const T* dsv_sum = dwv_sum + s.c * s.e;
    std::vector<T> qs(s.n * s.d);
    for (int64_t i = 0; i < s.n; ++i) {
      for (int64_t k = 0; k < s.d; ++k) {
        qs[i * s.d + k] = scale * pq[i * wd + h * s.d + k];
      }
    }
    for (int64_t i = 0; i < s.n; ++i) {
      T* dqs_i = dqs + i * s.d;
      for (int64_t j = 0; j < s.c; ++j) {
        const T* wk_j = pwk + j * wd + h * s.d;
        for (int64_t k = 0; k < s.d; ++k) dqs_i[k] += f[i * s.c + j] * wk_j[k];
      }
      const T* sk_h = psk + h * s.d;
      for (int64_t k = 0; k < s.d; ++k) {
        pdq[i * wd + h * s.d + k] = scale * (dqs_i[k] - g[i] * sk_h[k]);
      }
    }
    for (int64_t j = 0; j < s.c; ++j) {
      for (int64_t k = 0; k < s.d; ++k) {
        T sum = 0;
        for (int64_t i = 0; i < s.n; ++i) sum += f[i * s.c + j] * qs[i * s.d + k];
        pdwk[j * wd + h * s.d + k] = sum;
      }
      for (int64_t k = 0; k < s.e; ++k) {
        pdwv[j * we + h * s.e + k] = dwv_sum[j * s.e + k];
      }
    }
    for (int64_t k = 0; k < s.d; ++k) {
      T sum = 0;
      for (int64_t i = 0; i < s.n; ++i) sum += g[i] * qs[i * s.d + k];
      pdsk[h * s.d + k] = -sum;
    }
    for (int64_t k = 0; k < s.e; ++k) pdsv[h * s.e + k] = dsv_sum[k];
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace perceiver

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(perceiver::FactoredAttrs,
                                      StructMember<int64_t>("heads"),
                                      StructMember<double>("scale"));

#define PERCEIVER_DEFINE_FACTORED(forward, backward, dtype)         \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                    \
      forward, perceiver::FactoredForward<dtype>,                   \
      xla::ffi::Ffi::Bind()                                         \
          .Ctx<xla::ffi::ThreadPool>()                              \
          .Arg<xla::ffi::Buffer<dtype>>()                           \
          .Arg<xla::ffi::Buffer<dtype>>()                           \
          .Arg<xla::ffi::Buffer<dtype>>()                           \
          .Arg<xla::ffi::Buffer<dtype>>()                           \
          .Arg<xla::ffi::Buffer<dtype>>()                           \
          .Arg<xla::ffi::Buffer<dtype>>()                           \
          .Arg<xla::ffi::Buffer<dtype>>()                           \
          .Arg<xla::ffi::Buffer<dtype>>()                           \
          .Arg<xla::ffi::Buffer<dtype>>()                           \
          .Arg<xla::ffi::Buffer<dtype>>()                           \
          .Ret<xla::ffi::Buffer<dtype>>()                           \
          .Ret<xla::ffi::Buffer<dtype>>()                           \
          .Attrs<perceiver::FactoredAttrs>());                      \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                    \
      backward, perceiver::FactoredBackward<dtype>,                 \
      xla::ffi::Ffi::Bind()                                         \
          .Ctx<xla::ffi::ThreadPool>()                              \
          .Arg<xla::ffi::Buffer<dtype>>()                           \
          .Arg<xla::ffi::Buffer<dtype>>()                           \
          .Arg<xla::ffi::Buffer<dtype>>()                           \
          .Arg<xla::ffi::Buffer<dtype>>()                           \
          .Arg<xla::ffi::Buffer<dtype>>()                           \
          .Arg<xla::ffi::Buffer<dtype>>()                           \
          .Arg<xla::ffi::Buffer<dtype>>()                           \
          .Arg<xla::ffi::Buffer<dtype>>()                           \
          .Arg<xla::ffi::Buffer<dtype>>()                           \
          .Arg<xla::ffi::Buffer<dtype>>()                           \
          .Arg<xla::ffi::Buffer<dtype>>()                           \
          .Arg<xla::ffi::Buffer<dtype>>()                           \
          .Arg<xla::ffi::Buffer<dtype>>()                           \
          .Ret<xla::ffi::Buffer<dtype>>()                           \
          .Ret<xla::ffi::Buffer<dtype>>()                           \
          .Ret<xla::ffi::Buffer<dtype>>()                           \
          .Ret<xla::ffi::Buffer<dtype>>()                           \
          .Ret<xla::ffi::Buffer<dtype>>()                           \
          .Ret<xla::ffi::Buffer<dtype>>()                           \
          .Ret<xla::ffi::Buffer<dtype>>()                           \
          .Attrs<perceiver::FactoredAttrs>());

PERCEIVER_DEFINE_FACTORED(PerceiverFactoredAttentionForwardF32,
                          PerceiverFactoredAttentionBackwardF32,
                          xla::ffi::F32)
PERCEIVER_DEFINE_FACTORED(PerceiverFactoredAttentionForwardF64,
                          PerceiverFactoredAttentionBackwardF64,
                          xla::ffi::F64)

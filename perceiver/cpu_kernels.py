"""The Perceiver's blocks laid out for XLA:CPU: same parameters, same numbers.

Shapes:
  B  batch      M  inputs      C = c + p  byte array channels (raw + position)
  N  latents    H  heads       Q / V  per-head query-key / value width
  T  rows of a linear layer (all leading axes flattened)
  E  projection width (E_i: one block of a fused projection)

perceiver/attention.py writes each block as the paper's math with Haiku's own
modules and lets autodiff take the gradients. `Perceiver(cpu_kernels=True)`
(and each block's `cpu_kernels` argument) swaps in what is below instead. None
of it is new mathematics; every function here equals its plain counterpart,
outputs and gradients (tests/attention_test.py, tests/reference_test.py):

- products through perceiver/native (OpenBLAS GEMMs on XLA's thread
  pool, through the XLA FFI; XLA's own dot on other backends): every product
  of the linear layers (`linear`: x w, then g w^T and x^T g as one
  `native.matmul_pair` call, a whole GEMM per thread) and the weight
  gradients of the factored projection, each reading its operands transposed
  in place (jaxlib 0.10.2's XLA:CPU runs batched dots on one thread, and a
  contraction over leading axes in a slower kernel); attention as
  `native.attention` / `native.self_attention`, one fused kernel forward and
  one backward that read the heads in place from the projections' rows and
  never write the [B, H, N, M] logits or probabilities;
- custom VJPs that sum over the batch the gradients of shared terms (biases,
  LayerNorm scales and offsets, the latents, position features) as a product
  with a ones vector when the summed array is large (`_sum_leading`);
- LayerNorm folded into the linear layer it feeds (`normalized_linear`:
  x-hat (scale W) + (offset W + b), the normalised array never formed; x-hat
  and its gradient from `native.normalize` / `native.normalize_gradient`,
  one visit per row) and GELU into the one it feeds (`gelu_linear`,
  recomputed in the backward pass), so that each pair keeps one array of its
  input's size for the backward pass (autodiff keeps four for a LayerNorm
  and its linear layer, six for a GELU and its linear layer;
  benchmarks/RESULTS.md has what it saves);
- fused projections (keys and values, or queries, keys and values, from one
  matmul) and the factored byte array's projection with a hand-written
  backward that reads each cotangent once.

Which setting is faster depends on the backend and the jaxlib; measurements
with the commands that produced them are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import functools
import itertools
import math

import haiku as hk
import jax
import jax.numpy as jnp

from perceiver import byte_array
from perceiver import native

# Above this many elements, a sum over leading axes runs as a matmul with a
# ones vector (see `_sum_leading`).
_MATMUL_SUM_MIN_SIZE = 4096


def _sum_leading(g: jax.Array, shape) -> jax.Array:
  """Sums g over its leading axes down to `shape`.

  On XLA:CPU a reduction over the leading axis of a [rows, size] array with a
  large `size` is much slower than the same sum as a product with a ones
  vector, while for a small `size` the reduction is the faster of the two:
  pick by size (the threshold is tuned to the jaxlib in benchmarks/RESULTS.md).
  """
  size = math.prod(shape)
  rows = g.size // size
  g = g.reshape(rows, size)
  if size >= _MATMUL_SUM_MIN_SIZE:
    return (jnp.ones((1, rows), g.dtype) @ g).reshape(shape)
  return g.sum(axis=0).reshape(shape)


@jax.custom_vjp
def add_shared(x: jax.Array, y: jax.Array) -> jax.Array:
  """x + y for y broadcast over x's leading axes (a bias, a shared term)."""
  return x + y


def _add_shared_fwd(x, y):
  return x + y, jnp.zeros((0,) + y.shape, y.dtype)  # y's shape and dtype


def _add_shared_bwd(y_carrier, g):
  return g, _sum_leading(g, y_carrier.shape[1:]).astype(y_carrier.dtype)


add_shared.defvjp(_add_shared_fwd, _add_shared_bwd)


def _rows_product(x: jax.Array, w: jax.Array, transpose_w: bool = False
                  ) -> jax.Array:
  """x @ op(w) over the last axis of x: [..., I] x [I, O] -> [..., O] (w
  [O, I] read transposed with transpose_w), as one perceiver.native product
  of x's rows."""
  if x.dtype != w.dtype:  # (mixed operands: XLA's dot and its promotion)
    return x @ (w.T if transpose_w else w)
  out = native.matmul(x.reshape(-1, x.shape[-1]), w, transpose_b=transpose_w)
  return out.reshape(x.shape[:-1] + out.shape[-1:])


@jax.custom_vjp
def linear(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """x @ w + b over the last axis of x: [..., I] -> [..., O].

  Its three products are perceiver.native GEMMs over x's rows: x w forward,
  and for the usual gradient dx = g w^T (w read transposed in place) and
  dw = x^T g (x read transposed in place), one `native.matmul_pair` call;
  db is summed as in `add_shared`.
  """
  return _rows_product(x, w) + b


def _linear_fwd(x, w, b):
  return linear(x, w, b), (x, w, jnp.zeros((0,) + b.shape, b.dtype))


def _gradient_products(x, w, g):
  """(g w^T [..., I], x^T g [I, O]) for x [..., I], w [I, O], g [..., O]:
  a linear layer's dx and dW, as one `native.matmul_pair` call (each
  product on its share of the threads) where the dtypes agree."""
  rows = lambda a: a.reshape(-1, a.shape[-1])
  if not x.dtype == w.dtype == g.dtype:  # (mixed: XLA's dots, promoted)
    return (_rows_product(g, w, transpose_w=True),
            native.matmul(rows(x), rows(g), transpose_a=True))
  dx, dw = native.matmul_pair(rows(g), w, rows(x), rows(g),
                              transpose_b1=True, transpose_a2=True)
  return dx.reshape(g.shape[:-1] + dx.shape[-1:]), dw


def _linear_bwd(residuals, g):
  x, w, b_carrier = residuals
  dx, dw = _gradient_products(x, w, g)  # g w^T [..., I], x^T g [I, O]
  db = _sum_leading(g, b_carrier.shape[1:])  # [O]
  return (dx.astype(x.dtype), dw.astype(w.dtype),
          db.astype(b_carrier.dtype))


linear.defvjp(_linear_fwd, _linear_bwd)


@jax.custom_vjp
def normalized_linear(x: jax.Array, scale: jax.Array, offset: jax.Array,
                      w: jax.Array, b: jax.Array) -> jax.Array:
  """linear(layer_norm(x, scale, offset), w, b): a LayerNorm feeding a
  linear layer, [..., I] -> [..., O], without the normalised array.

  With W' = scale[:, None] W (as for the factored byte array,
  perceiver/byte_array.py):

    (x-hat scale + offset) W + b = x-hat W' + (offset W + b),

  so the forward pass writes only x-hat (which the backward pass keeps, with
  the inverse deviations) and the gradients come from G = x-hat^T g, [I, O]:

    dW = scale[:, None] G + offset[:, None] db,  d scale = rowsum(W * G),
    d offset = W db,  d x-hat = g W'^T,  db = the sum of g,

  and dx = inv (d x-hat - mean(d x-hat) - x-hat mean(d x-hat x-hat)), the
  means over the last axis (autodiff's LayerNorm gradient, written out): two
  products, as for a linear layer, and no [..., I] array besides x-hat and
  its gradient.
  """
  return _normalized_linear_fwd(x, scale, offset, w, b)[0]


def _normalized_linear_fwd(x, scale, offset, w, b):
  normalized, inv = native.normalize(x, byte_array.LN_EPS)  # hk.LayerNorm
  w_scaled = scale[:, None] * w  # W'
  out = _rows_product(normalized, w_scaled) + (offset @ w + b)
  return out, (normalized, inv, scale, offset, w, w_scaled)


def _normalized_linear_bwd(residuals, g):
  normalized, inv, scale, offset, w, w_scaled = residuals
  # g W'^T [..., I] and x-hat^T g [I, O], in one call.
  d_normalized, gram = _gradient_products(normalized, w_scaled, g)
  db = _sum_leading(g, w.shape[1:])  # [O]
  dw = scale[:, None] * gram + offset[:, None] * db
  d_scale = jnp.sum(w * gram, axis=1)
  d_offset = w @ db
  dx = native.normalize_gradient(normalized, inv, d_normalized)
  return (dx.astype(normalized.dtype), d_scale.astype(scale.dtype),
          d_offset.astype(offset.dtype), dw.astype(w.dtype),
          db.astype(w.dtype))


normalized_linear.defvjp(_normalized_linear_fwd, _normalized_linear_bwd)


@jax.custom_vjp
def gelu_linear(h: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """linear(gelu(h), w, b), [..., I] -> [..., O], keeping only h for the
  backward pass, which recomputes gelu(h) (for dW) and its derivative."""
  return linear(jax.nn.gelu(h), w, b)


def _gelu_linear_fwd(h, w, b):
  return gelu_linear(h, w, b), (h, w, jnp.zeros((0,) + b.shape, b.dtype))


def _gelu_linear_bwd(residuals, g):
  h, w, b_carrier = residuals
  activation, gelu_vjp = jax.vjp(jax.nn.gelu, h)
  d_activation, dw, db = _linear_bwd((activation, w, b_carrier), g)
  return gelu_vjp(d_activation)[0], dw, db


gelu_linear.defvjp(_gelu_linear_fwd, _gelu_linear_bwd)


class Linear(hk.Module):
  """hk.Linear's parameters and output; the gradient of `linear`."""

  def __init__(self, output_size: int, name: str | None = None):
    super().__init__(name=name)
    self._output_size = output_size

  def __call__(self, x: jax.Array) -> jax.Array:
    w, b = byte_array.linear_params(None, x.shape[-1], self._output_size)
    return linear(x, w, b)  # [..., O]


def broadcast(x: jax.Array, batch: int) -> jax.Array:
  """[...] -> [batch, ...], the gradient summed as in `add_shared`."""
  return add_shared(jnp.zeros((batch,) + x.shape, x.dtype), x)


def _column_blocks(x: jax.Array, widths):
  """The column blocks of x [..., sum(widths)], left to right."""
  ends = itertools.accumulate(widths)
  return [x[..., end - width:end] for width, end in zip(widths, ends)]


def _fuse(weights):
  """[(W_i [C, E_i], b_i [E_i])] -> (W [C, E], b [E]), E = sum E_i."""
  return (jnp.concatenate([w for w, _ in weights], axis=1),
          jnp.concatenate([b for _, b in weights]))


def normalized_projection(x, scale, offset, weights) -> list[jax.Array]:
  """byte_array.normalized_projection with the projections fused in one.

  A dense array takes one `normalized_linear`; a factored one the
  hand-written gradient of `_factored_projection`.
  """
  w, b = _fuse(weights)
  widths = tuple(w_i.shape[1] for w_i, _ in weights)
  if not isinstance(x, byte_array.FactoredByteArray):
    out = normalized_linear(x, scale, offset, w, b)  # [B, M, E]
    return _column_blocks(out, widths)
  mean, inv = byte_array.layer_norm_statistics(x)  # [B, M] each
  return list(_factored_projection(
      widths, x.raw, x.pos.astype(x.raw.dtype), mean, inv,
      scale[:, None] * w, offset @ w + b))  # [B, M, E_i] each


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _factored_projection(widths, raw, pos, mean, inv, w_scaled, const):
  """inv * (raw W'_raw + pos W'_pos - mean sum_c W'_c) + const, in blocks.

  raw [B, M, c], pos [M, p], mean and inv [B, M] (the LayerNorm statistics),
  w_scaled [c + p, E] (W' = scale * W), const [E] (offset W + b); returns the
  [B, M, E_i] column blocks of the result for E_i in `widths`, each computed
  on its own so that no block is copied out of a fused array.

  The gradient is autodiff's, arranged for XLA:CPU: the weight gradients read
  each block's cotangent in two passes ([raw^T; -mean^T] times it, and its
  sum over the batch times pos), where autodiff's layout transposes it
  several times and contracts B M rows in the slow generic kernel. The
  cotangents of the inputs are computed only if used (XLA drops them
  otherwise, as for a byte array of data).
  """
  b, m, c = raw.shape
  blocks = []
  for w_i, const_i in zip(_column_blocks(w_scaled, widths),
                          _column_blocks(const, widths)):
    # The two products as perceiver.native calls: XLA:CPU would fuse them
    # into the elementwise loop below and recompute pos W'_pos per example.
    raw_part = native.matmul(raw.reshape(b * m, c), w_i[:c]).reshape(
        b, m, -1)  # [B, M, E_i]
    pos_part = native.matmul(pos, w_i[c:])  # [M, E_i], once for the batch
    inner = raw_part - mean[..., None] * w_i.sum(0)  # [B, M, E_i]
    blocks.append(add_shared(
        inv[..., None] * add_shared(inner, pos_part), const_i))
  return tuple(blocks)


def _factored_projection_fwd(widths, raw, pos, mean, inv, w_scaled, const):
  out = _factored_projection(widths, raw, pos, mean, inv, w_scaled, const)
  return out, (raw, pos, mean, inv, w_scaled, jnp.zeros((0,) + const.shape,
                                                        const.dtype))


def _factored_projection_bwd(widths, residuals, gs):
  raw, pos, mean, inv, w_scaled, const_carrier = residuals
  b, m, c = raw.shape
  # [raw, -mean] as one [BM, c + 1] operand: one product per block with it
  # transposed reads its cotangent once for the raw rows and the mean.
  lhs = jnp.concatenate([raw.reshape(b * m, c), -mean.reshape(b * m, 1)],
                        axis=1)
  d_w, d_const = [], []
  d_raw, d_pos, d_mean, d_inv = 0.0, 0.0, 0.0, 0.0
  for g, w_i in zip(gs, _column_blocks(w_scaled, widths)):
    e = g.shape[-1]
    g_inv = inv[..., None].astype(g.dtype) * g  # [B, M, E_i]
    g_pos = _sum_leading(g_inv, (m, e))  # [M, E_i]
    d_rows = native.matmul(lhs.astype(g.dtype), g_inv.reshape(b * m, e),
                           transpose_a=True)  # [c + 1, E_i]
    d_w.append(jnp.concatenate([d_rows[:c], pos.T.astype(g.dtype) @ g_pos],
                               axis=0) + d_rows[c])  # [c + p, E_i]
    d_const.append(_sum_leading(g, (e,)))  # [E_i]
    # Cotangents of the inputs and statistics (dropped by XLA when unused).
    w_sum = w_i.sum(0)  # [E_i]
    inner = (jnp.einsum('bmc,ce->bme', raw, w_i[:c])
             - mean[..., None] * w_sum + pos @ w_i[c:])  # [B, M, E_i]
    d_raw += jnp.einsum('bme,ce->bmc', g_inv, w_i[:c])
    d_pos += g_pos @ w_i[c:].T  # [M, p]
    d_mean -= g_inv @ w_sum  # [B, M]
    d_inv += jnp.sum(g * inner, axis=-1)  # [B, M]
  return (d_raw.astype(raw.dtype), d_pos.astype(pos.dtype),
          d_mean.astype(mean.dtype), d_inv.astype(inv.dtype),
          jnp.concatenate(d_w, axis=1).astype(w_scaled.dtype),
          jnp.concatenate(d_const).astype(const_carrier.dtype))


_factored_projection.defvjp(_factored_projection_fwd, _factored_projection_bwd)


def factored_cross_attend(q: jax.Array, x: byte_array.FactoredByteArray,
                          scale: jax.Array, offset: jax.Array, w_k: jax.Array,
                          b_k: jax.Array, w_v: jax.Array, b_v: jax.Array, *,
                          num_heads: int) -> jax.Array:
  """Attention of queries shared by the batch over a factored byte array's
  keys and values: q [N, H * Q] -> [B, N, H * V], before the output layer.

  The keys and values are the LayerNorm'd byte array's projections
  (scale, offset: the input LayerNorm's parameters; w_k, b_k and w_v, b_v:
  hk.Linear's 'key' and 'value'), never formed: `native.factored_attention`
  computes the logits' position term q (pos W'_pos)^T once for the batch
  (W' = scale[:, None] W, as in `normalized_projection`). The keys' constant
  term (offset W_k + b_k) changes no softmax; the values' is added here.
  """
  c = x.raw.shape[-1]
  mean, inv = byte_array.layer_norm_statistics(x)  # [B, M] each
  pos = x.pos.astype(x.raw.dtype)
  k_scaled, v_scaled = scale[:, None] * w_k, scale[:, None] * w_v  # W'
  per_head = q.shape[-1] // num_heads
  out = native.factored_attention(
      q, x.raw, mean, inv, native.matmul(pos, k_scaled[c:]), k_scaled[:c],
      k_scaled[c:].sum(0), native.matmul(pos, v_scaled[c:]), v_scaled[:c],
      v_scaled[c:].sum(0), num_heads=num_heads,
      scale=1.0 / math.sqrt(per_head))  # [B, N, H * V]
  return add_shared(out, offset @ w_v + b_v)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *,
           return_logits: bool = True):
  """attention.attend (token-major, one or more heads) through
  `native.attention`, which reads the heads in place. q [B, N, H, Q],
  k [B, M, H, Q], v [B, M, H, V] -> ([B, N, H, V], the [B, H, N, M] logits,
  or None without return_logits)."""
  b, n, h, width = q.shape
  scale = 1.0 / math.sqrt(width)
  rows = lambda x: x.reshape(x.shape[:2] + (-1,))  # [B, T, H * W], free
  out = native.attention(rows(q), rows(k), rows(v), num_heads=h, scale=scale)
  logits = (jnp.einsum('bnhq,bmhq->bhnm', q * scale, k) if return_logits
            else None)  # [B, H, N, M]
  return out.reshape(b, n, h, -1), logits  # [B, N, H, V]


def self_attend(z: jax.Array, *, num_heads: int, qk_channels: int,
                v_channels: int) -> jax.Array:
  """The attention of a self-attention layer: [B, N, D] (before its
  LayerNorm) -> [B, N, H * V], before the output projection.

  hk.LayerNorm's parameters 'layer_norm' and hk.Linear's 'query', 'key',
  'value', as on the plain path, applied as one `normalized_linear` whose
  output `native.self_attention` reads (and whose gradient it writes) in
  place: no head is copied out.
  """
  d = z.shape[-1]
  h, qk, vc = num_heads, qk_channels, v_channels
  scale, offset = byte_array.layer_norm_params('layer_norm', d)
  w, bias = _fuse([byte_array.linear_params(name, d, width) for name, width
                   in (('query', qk), ('key', qk), ('value', vc))])
  qkv = normalized_linear(z, scale, offset, w, bias)  # [B, N, 2QK + V]
  return native.self_attention(qkv, num_heads=h, qk_width=qk,
                               scale=1.0 / math.sqrt(qk // h))  # [B, N, V]

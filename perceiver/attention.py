"""Attention math and the Perceiver's attention blocks.

Shapes:
  B  batch
  M  inputs (byte array length)           C  input channels (c raw + p position)
  N  latents (queries)                    D  latent channels
  H  heads                                Q / V  per-head query-key / value width
  E  fused projection width

Every block is pre-LayerNorm with residuals (GPT-2 style) and is followed by an
MLP block (LN -> Linear -> GELU -> Linear -> residual). No masks, no dropout
(paper v2).

Speed without new mathematics: the keys and values of a cross-attend come from
one fused [C, H(Q + V)] projection, and so do a self-attention's queries, keys
and values. A byte array given as a `FactoredByteArray` (raw channels per
example, position features shared by the batch) is projected without ever
forming [B, M, C]: LayerNorm(u) W + b is computed as

  rsqrt(var_u + eps) * (raw W'_raw + pos W'_pos - mean_u * sum_c W'_c)
      + (offset W + b),        W' = scale[:, None] * W,

so the position features are projected once per batch instead of once per
example. Parameters are those of hk.LayerNorm / hk.Linear under the same names
('input_layer_norm', 'key', 'value', ...), whichever path runs.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp

LN_EPS = 1e-5  # hk.LayerNorm's default


class FactoredByteArray(NamedTuple):
  """The byte array concat([raw, broadcast(pos)], axis=-1), in two parts.

  raw: [B, M, c] per-example channels; pos: [M, p] position features, the same
  for every example. Behaves as a [B, M, c + p] array for the Perceiver.
  """
  raw: jax.Array
  pos: jax.Array

  @property
  def shape(self) -> tuple[int, int, int]:
    b, m, c = self.raw.shape
    return (b, m, c + self.pos.shape[-1])

  @property
  def ndim(self) -> int:
    return 3

  @property
  def dtype(self):
    return self.raw.dtype

  def dense(self) -> jax.Array:
    b, m, _ = self.raw.shape
    pos = jnp.broadcast_to(self.pos.astype(self.raw.dtype),
                           (b,) + self.pos.shape)
    return jnp.concatenate([self.raw, pos], axis=-1)  # [B, M, C]


def as_dense(x) -> jax.Array:
  """[B, M, C] from a dense or factored byte array."""
  return x.dense() if isinstance(x, FactoredByteArray) else x


def _sum_leading(g: jax.Array, shape) -> jax.Array:
  """Sums g over its leading axes down to `shape`.

  Measured on XLA:CPU (YNNPACK), a reduction over the leading axis of a
  [rows, size] array with a large `size` (e.g. [256, 54880]) runs ~50x slower
  than the same sum as a product with a ones vector, while for small `size`
  the reduction is the faster of the two: pick by size.
  """
  size = math.prod(shape)
  rows = g.size // size
  g = g.reshape(rows, size)
  if size >= 4096:
    return (jnp.ones((1, rows), g.dtype) @ g).reshape(shape)
  return g.sum(axis=0).reshape(shape)


@jax.custom_vjp
def add_shared(x: jax.Array, y: jax.Array) -> jax.Array:
  """x + y for y broadcast over x's leading axes (a bias, a shared term)."""
  return x + y


def _add_shared_fwd(x, y):
  return x + y, jnp.zeros((0,) + y.shape, y.dtype)


def _add_shared_bwd(shape_carrier, g):
  return g, _sum_leading(g, shape_carrier.shape[1:]).astype(
      shape_carrier.dtype)


add_shared.defvjp(_add_shared_fwd, _add_shared_bwd)


@jax.custom_vjp
def mul_shared(x: jax.Array, y: jax.Array) -> jax.Array:
  """x * y for y broadcast over x's leading axes (a LayerNorm scale)."""
  return x * y


def _mul_shared_fwd(x, y):
  return x * y, (x, y)


def _mul_shared_bwd(residuals, g):
  x, y = residuals
  return g * y, _sum_leading(g * x, y.shape).astype(y.dtype)


mul_shared.defvjp(_mul_shared_fwd, _mul_shared_bwd)


@jax.custom_vjp
def linear(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """x @ w + b over the last axis of x: [..., I] -> [..., O].

  The gradient is the usual one, laid out for XLA:CPU: the weight gradient
  x^T g contracts the leading axis of both operands, a form XLA:CPU leaves to
  a slower generic kernel that runs beside the next op and slows it too;
  with x^T materialised (the barrier keeps XLA from folding the transpose
  back into the product) it is a plain [I, T] x [T, O] product on the fast
  path (W1's step: ~3.1 s -> ~2.9 s). The bias gradient is summed as in
  `add_shared`.
  """
  return x @ w + b


def _linear_fwd(x, w, b):
  return linear(x, w, b), (x, w, jnp.zeros((0,) + b.shape, b.dtype))


def _linear_bwd(residuals, g):
  x, w, b_carrier = residuals
  x_t = jax.lax.optimization_barrier(x.reshape(-1, x.shape[-1]).T)  # [I, T]
  dw = x_t @ g.reshape(-1, g.shape[-1])  # [I, O]
  dx = g @ w.T  # [..., I]
  db = _sum_leading(g, b_carrier.shape[1:])  # [O]
  return (dx.astype(x.dtype), dw.astype(w.dtype),
          db.astype(b_carrier.dtype))


linear.defvjp(_linear_fwd, _linear_bwd)


def _linear_params(name: str, in_dim: int, out_dim: int):
  """hk.Linear's parameters ('name/w', 'name/b') and initialisers."""
  with hk.name_scope(name):
    w = hk.get_parameter('w', [in_dim, out_dim], init=hk.initializers.
                         TruncatedNormal(stddev=1.0 / math.sqrt(in_dim)))
    b = hk.get_parameter('b', [out_dim], init=jnp.zeros)
  return w, b


def _layer_norm_params(name: str, dim: int):
  """hk.LayerNorm's parameters ('name/scale', 'name/offset')."""
  with hk.name_scope(name):
    scale = hk.get_parameter('scale', [dim], init=jnp.ones)
    offset = hk.get_parameter('offset', [dim], init=jnp.zeros)
  return scale, offset


def layer_norm(x: jax.Array, scale: jax.Array, offset: jax.Array) -> jax.Array:
  """hk.LayerNorm over the last axis (eps 1e-5), as a pure function."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  normalized = (x - mean) * jax.lax.rsqrt(var + LN_EPS)
  return add_shared(mul_shared(normalized, scale), offset)


def normalized_projection(inputs, scale, offset, w, b,
                          widths: tuple[int, ...] | None = None):
  """LayerNorm(inputs) @ w + b for a dense [B, M, C] or factored byte array.

  Returns [B, M, E], or with `widths` (summing to E) the column blocks of it
  as separate arrays, e.g. the keys and values of a fused K/V projection. The
  factored path never forms [B, M, C], projects the position features once
  (see the module docstring) and writes each block directly.
  """
  if not isinstance(inputs, FactoredByteArray):
    out = linear(layer_norm(inputs, scale, offset), w, b)  # [B, M, E]
    return out if widths is None else tuple(_column_blocks(out, widths))
  raw, pos = inputs.raw, inputs.pos.astype(inputs.raw.dtype)
  total = inputs.shape[-1]
  mean = (raw.sum(-1) + pos.sum(-1)) / total  # [B, M]
  sq_mean = (jnp.square(raw).sum(-1) + jnp.square(pos).sum(-1)) / total
  inv = jax.lax.rsqrt(jnp.maximum(sq_mean - jnp.square(mean), 0.0)
                      + LN_EPS)  # [B, M]
  blocks = _factored_projection(tuple(widths or (w.shape[1],)), raw, pos,
                                mean, inv, scale[:, None] * w, offset @ w + b)
  return blocks if widths is not None else blocks[0]  # [B, M, E_i] each


def _column_blocks(x: jax.Array, widths):
  """The column blocks of x [..., sum(widths)], left to right."""
  ends = itertools.accumulate(widths)
  return [x[..., end - width:end] for width, end in zip(widths, ends)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _factored_projection(widths, raw, pos, mean, inv, w_scaled, const):
  """inv * (raw W'_raw + pos W'_pos - mean sum_c W'_c) + const, in blocks.

  raw [B, M, c], pos [M, p], mean and inv [B, M] (the LayerNorm statistics),
  w_scaled [c + p, E] (W' = scale * W), const [E] (offset W + b); returns the
  [B, M, E_i] column blocks of the result for E_i in `widths`, each computed
  on its own so that no block is copied out of a fused array.

  The gradient is autodiff's, arranged for speed: the weight gradients read
  each block's cotangent in two passes ([raw^T; -mean^T] times it, and its
  sum over the batch times pos), where autodiff's layout transposes it
  several times and contracts B M rows in XLA:CPU's slow generic kernel.
  The cotangents of the inputs are computed only if used (XLA drops them
  otherwise, as for a byte array of data).
  """
  c = raw.shape[-1]
  blocks = []
  for w_i, const_i in zip(_column_blocks(w_scaled, widths),
                          _column_blocks(const, widths)):
    inner = (jnp.einsum('bmc,ce->bme', raw, w_i[:c])
             - mean[..., None] * w_i.sum(0))  # [B, M, E_i]
    blocks.append(add_shared(
        inv[..., None] * add_shared(inner, pos @ w_i[c:]), const_i))
  return tuple(blocks)


def _factored_projection_fwd(widths, raw, pos, mean, inv, w_scaled, const):
  out = _factored_projection(widths, raw, pos, mean, inv, w_scaled, const)
  return out, (raw, pos, mean, inv, w_scaled, jnp.zeros((0,) + const.shape,
                                                        const.dtype))


def _factored_projection_bwd(widths, residuals, gs):
  raw, pos, mean, inv, w_scaled, const_carrier = residuals
  b, m, c = raw.shape
  # [raw^T; -mean^T] as one materialised [c + 1, BM] operand: one plain
  # product per block reads its cotangent once for the raw rows and the mean.
  lhs = jax.lax.optimization_barrier(jnp.concatenate(
      [raw.reshape(b * m, c), -mean.reshape(b * m, 1)], axis=1).T)
  d_w, d_const = [], []
  d_raw, d_pos, d_mean, d_inv = 0.0, 0.0, 0.0, 0.0
  for g, w_i in zip(gs, _column_blocks(w_scaled, widths)):
    e = g.shape[-1]
    g_inv = inv[..., None].astype(g.dtype) * g  # [B, M, E_i]
    g_pos = _sum_leading(g_inv, (m, e))  # [M, E_i]
    d_rows = lhs.astype(g.dtype) @ g_inv.reshape(b * m, e)  # [c + 1, E_i]
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


def attention_logits(q: jax.Array, k: jax.Array) -> jax.Array:
  """Scaled dot-product logits.

  Args:
    q: [B, N, H, Q] queries.
    k: [B, M, H, Q] keys.

  Returns:
    [B, H, N, M] logits q.k / sqrt(Q), before the softmax.
  """
  scale = 1.0 / math.sqrt(q.shape[-1])
  return jnp.einsum('bnhq,bmhq->bhnm', q * scale, k)  # [B, H, N, M]


def softmax_weighted_sum(logits: jax.Array, v: jax.Array, spec: str
                         ) -> tuple[jax.Array, jax.Array]:
  """(einsum(spec, exp(logits - max), v), row sums of exp(logits - max)).

  The caller divides the first by the second: the same numbers as
  normalising the softmax weights first, with the division on the [.., V]
  output instead of the [.., M] weights (V << M).
  """
  logits = logits.astype(jnp.float32)
  row_max = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
  unnormalised = jnp.exp(logits - row_max)
  total = unnormalised.sum(axis=-1)  # the row sums, [..., N]
  out = jnp.einsum(spec, unnormalised.astype(v.dtype), v)
  return out, total


def attend_heads_major(q: jax.Array, k: jax.Array, v: jax.Array, *,
                       return_logits: bool = False):
  """Softmax attention in the head-major layout (canonical batched matmuls).

  Args:
    q: [B, H, N, Q]; k: [B, H, M, Q]; v: [B, H, M, V].
    return_logits: also return the pre-softmax logits.

  Returns:
    [B, N, H, V], and the [B, H, N, M] logits if asked for.
  """
  scale = 1.0 / math.sqrt(q.shape[-1])
  logits = jnp.einsum('bhnq,bhmq->bhnm', q * scale, k)  # [B, H, N, M]
  out, total = softmax_weighted_sum(logits, v, 'bhnm,bhmv->bhnv')
  out = (out / total[..., None].astype(out.dtype)).transpose(0, 2, 1, 3)
  return (out, logits) if return_logits else out  # [B, N, H, V]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *,
           return_logits: bool = False):
  """Softmax attention in the token-major layout of the projections.

  Used by the cross-attends: with one head, measured faster on W1 than
  transposing to the head-major layout of `attend_heads_major`.

  Args:
    q: [B, N, H, Q]; k: [B, M, H, Q]; v: [B, M, H, V].
    return_logits: also return the pre-softmax logits.

  Returns:
    [B, N, H, V], and the [B, H, N, M] logits if asked for.
  """
  logits = attention_logits(q, k)  # [B, H, N, M]
  out, total = softmax_weighted_sum(logits, v, 'bhnm,bmhv->bnhv')
  out = out / total.transpose(0, 2, 1)[..., None].astype(out.dtype)
  return (out, logits) if return_logits else out  # [B, N, H, V]


class MLP(hk.Module):
  """The MLP block: x + Linear(GELU(Linear(LN(x)))).

  The hidden width is `widening_factor` times the input width; the paper's
  Perceiver uses 1 ("all linear layers preserve the dimensionality").
  GELU is JAX's default tanh approximation.
  """

  def __init__(self, *, widening_factor: int = 1, name: str | None = None):
    super().__init__(name=name)
    self._widening_factor = widening_factor

  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    hidden = self._widening_factor * channels
    h = layer_norm(x, *_layer_norm_params('layer_norm', channels))
    h = linear(h, *_linear_params('hidden', channels, hidden))  # [..., wD]
    h = jax.nn.gelu(h)
    h = linear(h, *_linear_params('output', hidden, channels))  # [..., D]
    return x + h


def _split_heads(x: jax.Array, num_heads: int) -> jax.Array:
  """[B, T, H * W] -> [B, T, H, W]."""
  b, t, width = x.shape
  if width % num_heads:
    raise ValueError(f'Attention width {width} is not divisible by '
                     f'num_heads={num_heads}.')
  return x.reshape(b, t, num_heads, width // num_heads)


def _fused(names_and_widths, in_dim: int):
  """Concatenated [in, sum widths] weights and biases of several hk.Linears."""
  params = [_linear_params(n, in_dim, w) for n, w in names_and_widths]
  return (jnp.concatenate([w for w, _ in params], axis=1),
          jnp.concatenate([b for _, b in params]))


class CrossAttention(hk.Module):
  """Cross-attend: the latents query the byte array, then an MLP block.

  z' = z + Linear_D(attend(Q(LN(z)), K(LN(x)), V(LN(x)))), then z' + MLP(z').

  Q/K width defaults to the smaller of the two input widths (min(C, D): the
  byte array's C on ImageNet, 261); V width defaults to the Q/K width.
  """

  def __init__(self, *, num_heads: int = 1, qk_channels: int | None = None,
               v_channels: int | None = None, widening_factor: int = 1,
               chunk_size: int | None = None, name: str | None = None):
    """Constructor.

    Args:
      num_heads: attention heads (the paper uses 1).
      qk_channels: total query/key width; None = min(C, D).
      v_channels: total value width; None = the query/key width.
      widening_factor: of the MLP block.
      chunk_size: if set, attend over the byte array in chunks of this many
        inputs with an online softmax (memory independent of N x M); the
        result equals the plain path to float tolerance.
      name: module name.
    """
    super().__init__(name=name)
    self._num_heads = num_heads
    self._qk_channels = qk_channels
    self._v_channels = v_channels
    self._widening_factor = widening_factor
    self._chunk_size = chunk_size

  def __call__(self, latents: jax.Array, inputs, *,
               return_logits: bool = False):
    """Cross-attends.

    Args:
      latents: [B, N, D].
      inputs: [B, M, C] byte array, or a FactoredByteArray of that shape.
      return_logits: also return the [B, H, N, M] pre-softmax logits.

    Returns:
      [B, N, D] updated latents (and the logits if asked for).
    """
    b, n, d = latents.shape
    _, m, c = inputs.shape
    qk = self._qk_channels or min(c, d)
    vc = self._v_channels or qk
    h = self._num_heads

    w_q, b_q = _linear_params('query', d, qk)
    q = layer_norm(latents, *_layer_norm_params('query_layer_norm', d))
    q = _split_heads(linear(q, w_q, b_q), h)  # [B, N, H, Q]
    ln = _layer_norm_params('input_layer_norm', c)
    w_kv, b_kv = _fused([('key', qk), ('value', vc)], c)  # [C, QK + V]

    def project(x):
      k, v = normalized_projection(x, *ln, w_kv, b_kv,
                                   widths=(qk, vc))  # [B, m, QK], [B, m, V]
      return _split_heads(k, h), _split_heads(v, h)

    if self._chunk_size is None or self._chunk_size >= m:
      k, v = project(inputs)  # [B, M, H, Q], [B, M, H, V]
      result = attend(q, k, v, return_logits=return_logits)
      out, logits = result if return_logits else (result, None)
    else:
      if return_logits:
        raise ValueError('return_logits is not available with chunk_size set: '
                         'the chunked path never holds the full logits.')
      out = chunked_attend(q, inputs, project, chunk_size=self._chunk_size,
                           v_channels=vc // h)
      logits = None

    out = linear(out.reshape(b, n, vc),
                 *_linear_params('output', vc, d))  # [B, N, D]
    z = latents + out
    z = MLP(widening_factor=self._widening_factor, name='mlp')(z)
    return (z, logits) if return_logits else z


def _chunks(inputs, chunk_size: int):
  """Pads M up to a multiple of chunk_size; splits it into S chunks.

  Returns the chunks (leading axis S: [S, B, m, C], or a FactoredByteArray of
  [S, B, m, c] and [S, m, p]) and the [S, m] mask of real (unpadded) inputs.
  """
  m = inputs.shape[1]
  num_chunks = -(-m // chunk_size)
  pad = num_chunks * chunk_size - m

  def split(x, axis):  # M on `axis` -> [S, ..., m, ...]
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    x = jnp.pad(x, widths)
    x = x.reshape(x.shape[:axis] + (num_chunks, chunk_size) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)

  if isinstance(inputs, FactoredByteArray):
    chunks = FactoredByteArray(split(inputs.raw, 1), split(inputs.pos, 0))
  else:
    chunks = split(inputs, 1)
  valid = (jnp.arange(num_chunks * chunk_size) < m).reshape(
      num_chunks, chunk_size)  # [S, m]
  return chunks, valid


def chunked_attend(q: jax.Array, inputs, project, *, chunk_size: int,
                   v_channels: int) -> jax.Array:
  """Attention over the byte array in chunks, with an online softmax.

  K and V are projected chunk by chunk inside a rematerialised scan body, so
  neither the [B, H, N, M] weights nor the [B, M, Q] keys are ever stored whole:
  forward and backward memory grow with M only through the inputs themselves.

  Args:
    q: [B, N, H, Q] queries.
    inputs: [B, M, C] byte array (or FactoredByteArray); M is padded up to a
      multiple of chunk_size and the padding is excluded from the softmax.
    project: maps a chunk of the inputs ([B, m, C]) to (k [B, m, H, Q],
      v [B, m, H, V]).
    chunk_size: inputs per chunk.
    v_channels: V, the per-head value width `project` gives.

  Returns:
    [B, N, H, V], equal to `attend(q, k, v)` to float tolerance.
  """
  b, n, h, _ = q.shape
  chunks, valid = _chunks(inputs, chunk_size)

  def body(carry, chunk):
    running_max, denom, acc = carry  # [B, H, N], [B, H, N], [B, N, H, V]
    x, valid_c = chunk
    k, v = project(x)
    logits = attention_logits(q, k).astype(jnp.float32)  # [B, H, N, m]
    logits = jnp.where(valid_c, logits, -jnp.inf)
    new_max = jnp.maximum(running_max, logits.max(axis=-1))
    correction = jnp.exp(running_max - new_max)  # [B, H, N]
    p = jnp.exp(logits - new_max[..., None])  # [B, H, N, m]
    denom = denom * correction + p.sum(axis=-1)
    acc = (acc * correction.transpose(0, 2, 1)[..., None]
           + jnp.einsum('bhnm,bmhv->bnhv', p, v.astype(jnp.float32)))
    return (new_max, denom, acc), None

  init = (jnp.full((b, h, n), -jnp.inf, jnp.float32),
          jnp.zeros((b, h, n), jnp.float32),
          jnp.zeros((b, n, h, v_channels), jnp.float32))
  (_, denom, acc), _ = hk.scan(hk.remat(body), init, (chunks, valid))
  out = acc / denom.transpose(0, 2, 1)[..., None]  # [B, N, H, V]
  return out.astype(q.dtype)


class SelfAttention(hk.Module):
  """A latent self-attention layer: multi-head pre-LN attention, then MLP."""

  def __init__(self, *, num_heads: int = 8, qk_channels: int | None = None,
               v_channels: int | None = None, widening_factor: int = 1,
               name: str | None = None):
    """Constructor.

    Args:
      num_heads: attention heads (8 in the paper).
      qk_channels: total query/key width; None = D.
      v_channels: total value width; None = the query/key width.
      widening_factor: of the MLP block.
      name: module name.
    """
    super().__init__(name=name)
    self._num_heads = num_heads
    self._qk_channels = qk_channels
    self._v_channels = v_channels
    self._widening_factor = widening_factor

  def __call__(self, z: jax.Array) -> jax.Array:
    """[B, N, D] -> [B, N, D]."""
    b, n, d = z.shape
    qk = self._qk_channels or d
    vc = self._v_channels or qk
    h = self._num_heads
    x = layer_norm(z, *_layer_norm_params('layer_norm', d))  # [B, N, D]
    w, bias = _fused([('query', qk), ('key', qk), ('value', vc)], d)
    qkv = linear(x, w, bias)  # [B, N, 2QK + V], one matmul
    if qk == vc:
      # Head-major layout: one transpose of the fused projection, then
      # canonical batched matmuls over (B, H).
      qkv = qkv.reshape(b, n, 3, h, qk // h).transpose(2, 0, 3, 1, 4)
      out = attend_heads_major(qkv[0], qkv[1], qkv[2])  # [B, N, H, V]
    else:
      q = _split_heads(qkv[..., :qk], h)  # [B, N, H, Q]
      k = _split_heads(qkv[..., qk:2 * qk], h)  # [B, N, H, Q]
      v = _split_heads(qkv[..., 2 * qk:], h)  # [B, N, H, V]
      out = attend(q, k, v)  # [B, N, H, V]
    out = linear(out.reshape(b, n, vc),
                 *_linear_params('output', vc, d))  # [B, N, D]
    z = z + out
    return MLP(widening_factor=self._widening_factor, name='mlp')(z)

"""Attention math and the Perceiver's attention blocks.

Shapes:
  B  batch
  M  inputs (byte array length)           C  input channels
  N  latents (queries)                    D  latent channels
  H  heads                                Q / V  per-head query-key / value width

Every block is pre-LayerNorm with residuals (GPT-2 style) and is followed by an
MLP block (LN -> Linear -> GELU -> Linear -> residual). No masks, no dropout
(paper v2).
"""

from __future__ import annotations

import functools
import math

import haiku as hk
import jax
import jax.numpy as jnp


def _layer_norm(name: str) -> hk.LayerNorm:
  return hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, name=name)


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


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *,
           return_logits: bool = False):
  """Softmax attention, materialising the full [B, H, N, M] weights.

  Args:
    q: [B, N, H, Q]; k: [B, M, H, Q]; v: [B, M, H, V].
    return_logits: also return the pre-softmax logits.

  Returns:
    [B, N, H, V], and the [B, H, N, M] logits if asked for.
  """
  logits = attention_logits(q, k)  # [B, H, N, M]
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  out = jnp.einsum('bhnm,bmhv->bnhv', weights.astype(v.dtype), v)  # [B, N, H, V]
  return (out, logits) if return_logits else out


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
    h = _layer_norm('layer_norm')(x)
    h = hk.Linear(self._widening_factor * channels, name='hidden')(h)  # [..., wD]
    h = jax.nn.gelu(h)
    h = hk.Linear(channels, name='output')(h)  # [..., D]
    return x + h


def _split_heads(x: jax.Array, num_heads: int) -> jax.Array:
  """[B, T, H * W] -> [B, T, H, W]."""
  b, t, width = x.shape
  if width % num_heads:
    raise ValueError(f'Attention width {width} is not divisible by '
                     f'num_heads={num_heads}.')
  return x.reshape(b, t, num_heads, width // num_heads)


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

  def __call__(self, latents: jax.Array, inputs: jax.Array, *,
               return_logits: bool = False):
    """Cross-attends.

    Args:
      latents: [B, N, D].
      inputs: [B, M, C] byte array.
      return_logits: also return the [B, H, N, M] pre-softmax logits.

    Returns:
      [B, N, D] updated latents (and the logits if asked for).
    """
    _, _, d = latents.shape
    _, m, c = inputs.shape
    qk_channels = self._qk_channels or min(c, d)
    v_channels = self._v_channels or qk_channels
    h = self._num_heads

    q = hk.Linear(qk_channels, name='query')(
        _layer_norm('query_layer_norm')(latents))  # [B, N, H*Q]
    q = _split_heads(q, h)  # [B, N, H, Q]
    key_layer = hk.Linear(qk_channels, name='key')
    value_layer = hk.Linear(v_channels, name='value')
    input_norm = _layer_norm('input_layer_norm')

    if self._chunk_size is None or self._chunk_size >= m:
      x = input_norm(inputs)  # [B, M, C]
      k = _split_heads(key_layer(x), h)  # [B, M, H, Q]
      v = _split_heads(value_layer(x), h)  # [B, M, H, V]
      result = attend(q, k, v, return_logits=return_logits)
      out, logits = result if return_logits else (result, None)
    else:
      if return_logits:
        raise ValueError('return_logits is not available with chunk_size set: '
                         'the chunked path never holds the full logits.')
      project = functools.partial(_chunk_kv, input_norm, key_layer,
                                  value_layer, h)
      if hk.running_init():
        project(inputs[:, :1])  # create the parameters outside the scan
      out = chunked_attend(q, inputs, project, chunk_size=self._chunk_size,
                           v_channels=v_channels // h)
      logits = None

    b, n = out.shape[:2]
    out = hk.Linear(d, name='output')(out.reshape(b, n, -1))  # [B, N, D]
    z = latents + out
    z = MLP(widening_factor=self._widening_factor, name='mlp')(z)
    return (z, logits) if return_logits else z


def _chunk_kv(input_norm, key_layer, value_layer, num_heads, x):
  x = input_norm(x)  # [B, m, C]
  return (_split_heads(key_layer(x), num_heads),  # [B, m, H, Q]
          _split_heads(value_layer(x), num_heads))  # [B, m, H, V]


def chunked_attend(q: jax.Array, inputs: jax.Array, project, *,
                   chunk_size: int, v_channels: int) -> jax.Array:
  """Attention over the byte array in chunks, with an online softmax.

  K and V are projected chunk by chunk inside a rematerialised scan body, so
  neither the [B, H, N, M] weights nor the [B, M, Q] keys are ever stored whole:
  forward and backward memory grow with M only through the inputs themselves.

  Args:
    q: [B, N, H, Q] queries.
    inputs: [B, M, C] byte array; M is padded up to a multiple of chunk_size
      and the padding is excluded from the softmax.
    project: maps a [B, m, C] chunk to (k [B, m, H, Q], v [B, m, H, V]).
    chunk_size: inputs per chunk.
    v_channels: V, the per-head value width `project` gives.

  Returns:
    [B, N, H, V], equal to `attend(q, k, v)` to float tolerance.
  """
  b, m, c = inputs.shape
  num_chunks = -(-m // chunk_size)
  pad = num_chunks * chunk_size - m
  x = jnp.pad(inputs, ((0, 0), (0, pad), (0, 0)))
  x = x.reshape(b, num_chunks, chunk_size, c).swapaxes(0, 1)  # [S, B, m, C]
  valid = (jnp.arange(num_chunks * chunk_size) < m).reshape(
      num_chunks, chunk_size)  # [S, m]
  n, h = q.shape[1], q.shape[2]

  def body(carry, chunk):
    running_max, denom, acc = carry  # [B, H, N], [B, H, N], [B, N, H, V]
    xc, valid_c = chunk
    k, v = project(xc)
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
  body = hk.remat(body)
  (_, denom, acc), _ = hk.scan(body, init, (x, valid))
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
    qk_channels = self._qk_channels or d
    v_channels = self._v_channels or qk_channels
    h = self._num_heads
    x = _layer_norm('layer_norm')(z)  # [B, N, D]
    q = _split_heads(hk.Linear(qk_channels, name='query')(x), h)  # [B, N, H, Q]
    k = _split_heads(hk.Linear(qk_channels, name='key')(x), h)  # [B, N, H, Q]
    v = _split_heads(hk.Linear(v_channels, name='value')(x), h)  # [B, N, H, V]
    out = attend(q, k, v)  # [B, N, H, V]
    out = hk.Linear(d, name='output')(out.reshape(b, n, -1))  # [B, N, D]
    z = z + out
    return MLP(widening_factor=self._widening_factor, name='mlp')(z)

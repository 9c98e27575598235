"""Cross-attention over the byte array in chunks, with an online softmax.

Shapes:
  B  batch      M  inputs      C  byte array channels
  N  latents    H  heads       Q / V  per-head query-key / value width
  S  chunks     m  inputs per chunk (S m >= M: the last chunk is padded)

The softmax over M is accumulated chunk by chunk: with the running maximum
mu, the running denominator l and the running weighted sum a of each query
row, a chunk with logits s_j and values v_j updates

  mu' = max(mu, max_j s_j),   l' = l e^(mu - mu') + sum_j e^(s_j - mu'),
  a'  = a e^(mu - mu') + sum_j e^(s_j - mu') v_j,

and the attention is a / l after the last chunk: the same numbers as the
softmax over all M at once. Keys and values are projected chunk by chunk
inside a rematerialised scan body, so neither the [B, H, N, M] weights nor
the [B, M, Q] keys are stored whole: forward and backward memory grow with M
only through the byte array itself.
"""

from __future__ import annotations

import math
from typing import Callable

import haiku as hk
import jax
import jax.numpy as jnp

from perceiver.byte_array import FactoredByteArray


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


def chunked_attend(q: jax.Array, inputs, project: Callable, *,
                   chunk_size: int, v_channels: int) -> jax.Array:
  """Softmax attention of q over the byte array, chunk by chunk.

  Args:
    q: [B, N, H, Q] queries.
    inputs: [B, M, C] byte array (or FactoredByteArray); M is padded up to a
      multiple of chunk_size and the padding is excluded from the softmax.
    project: maps a chunk of the inputs ([B, m, C]) to (k [B, m, H, Q],
      v [B, m, H, V]); it must not create parameters (it runs in a scan).
    chunk_size: m, inputs per chunk.
    v_channels: V, the per-head value width `project` gives.

  Returns:
    [B, N, H, V], equal to attention.attend(q, k, v) to float tolerance.
  """
  b, n, h, _ = q.shape
  chunks, valid = _chunks(inputs, chunk_size)
  q = q * (1.0 / math.sqrt(q.shape[-1]))
  f32 = jnp.promote_types(q.dtype, jnp.float32)  # the softmax's dtype

  def body(carry, chunk):
    running_max, denom, acc = carry  # [B, H, N], [B, H, N], [B, N, H, V]
    x, valid_c = chunk
    k, v = project(x)  # [B, m, H, Q], [B, m, H, V]
    logits = jnp.einsum('bnhq,bmhq->bhnm', q, k).astype(f32)
    logits = jnp.where(valid_c, logits, -jnp.inf)  # [B, H, N, m]
    new_max = jnp.maximum(running_max, logits.max(axis=-1))
    correction = jnp.exp(running_max - new_max)  # [B, H, N]
    p = jnp.exp(logits - new_max[..., None])  # [B, H, N, m]
    denom = denom * correction + p.sum(axis=-1)
    acc = (acc * correction.transpose(0, 2, 1)[..., None]
           + jnp.einsum('bhnm,bmhv->bnhv', p, v.astype(f32)))
    return (new_max, denom, acc), None

  init = (jnp.full((b, h, n), -jnp.inf, f32), jnp.zeros((b, h, n), f32),
          jnp.zeros((b, n, h, v_channels), f32))
  (_, denom, acc), _ = hk.scan(hk.remat(body), init, (chunks, valid))
  out = acc / denom.transpose(0, 2, 1)[..., None]  # [B, N, H, V]
  return out.astype(q.dtype)

"""The byte array a Perceiver reads, and its normalised projection.

Shapes:
  B  batch          M  inputs          C = c + p  channels
  c  raw channels   p  position-feature channels
  E  projection width (E_i: the width of one of several projections)

The byte array is [B, M, C]: each input's raw channels followed by its position
features (concatenated, not added: paper section 3.2, docs/paper.md). The position features are the same for every example, so a
preprocessor may hand them over unrepeated as a `FactoredByteArray`
(raw [B, M, c], pos [M, p]): the same byte array, stored in two parts.

A cross-attend reads the byte array only through LayerNorm(x) W + b (its
keys and values). For a factored array that product needs no [B, M, C]
array: with the LayerNorm statistics mean_u, var_u of each input u,

  LayerNorm(u) W + b
      = rsqrt(var_u + eps) * (raw_u W'_raw + pos_u W'_pos - mean_u sum_c W'_c)
        + (offset W + b),                 W' = scale[:, None] * W,

so pos W'_pos is computed once per batch instead of once per example: the
same numbers, with the position features' share of the work divided by B.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

LN_EPS = 1e-5  # hk.LayerNorm's default


class FactoredByteArray(NamedTuple):
  """The byte array concat([raw, broadcast(pos)], axis=-1), in two parts.

  raw: [B, M, c] per-example channels; pos: [M, p] position features, the same
  for every example. Behaves as a [B, M, c + p] array for the Perceiver. A
  grid keeps its axes: raw [B, H, W, c] and pos [H, W, p] behave as the
  [B, H, W, c + p] grid that the convolutional and ViT baselines read
  (perceiver/resnet.py, vit.py).
  """
  raw: jax.Array
  pos: jax.Array

  @property
  def shape(self) -> tuple[int, ...]:
    return self.raw.shape[:-1] + (self.raw.shape[-1] + self.pos.shape[-1],)

  @property
  def ndim(self) -> int:
    return self.raw.ndim

  @property
  def dtype(self):
    return self.raw.dtype

  def dense(self) -> jax.Array:
    pos = jnp.broadcast_to(self.pos.astype(self.raw.dtype),
                           self.raw.shape[:1] + self.pos.shape)
    return jnp.concatenate([self.raw, pos], axis=-1)  # [B, ..., C]


def as_dense(x) -> jax.Array:
  """[B, M, C] from a dense or factored byte array."""
  return x.dense() if isinstance(x, FactoredByteArray) else x


def _scope(name: str | None):
  return contextlib.nullcontext() if name is None else hk.name_scope(name)


def layer_norm_params(name: str | None, dim: int
                      ) -> tuple[jax.Array, jax.Array]:
  """hk.LayerNorm(name=name)'s parameters: ('name/scale', 'name/offset')
  (name None: in the current module's own scope).

  For math that needs the arrays themselves (a factored byte array cannot
  pass through hk.LayerNorm); the names, shapes and initialisers are
  Haiku's, so checkpoints do not depend on which code path made them.
  """
  with _scope(name):
    scale = hk.get_parameter('scale', [dim], init=jnp.ones)
    offset = hk.get_parameter('offset', [dim], init=jnp.zeros)
  return scale, offset


def linear_params(name: str | None, in_dim: int, out_dim: int
                  ) -> tuple[jax.Array, jax.Array]:
  """hk.Linear(out_dim, name=name)'s parameters ('name/w', 'name/b') for
  `in_dim` inputs, with hk.Linear's initialisers."""
  with _scope(name):
    w = hk.get_parameter('w', [in_dim, out_dim], init=hk.initializers.
                         TruncatedNormal(stddev=1.0 / math.sqrt(in_dim)))
    b = hk.get_parameter('b', [out_dim], init=jnp.zeros)
  return w, b


def layer_norm_statistics(x: FactoredByteArray
                          ) -> tuple[jax.Array, jax.Array]:
  """(mean [B, M], rsqrt(var + eps) [B, M]) of each input of a factored
  byte array over its C = c + p channels, without forming [B, M, C]."""
  raw, pos = x.raw, x.pos.astype(x.raw.dtype)
  total = x.shape[-1]
  mean = (raw.sum(-1) + pos.sum(-1)) / total  # [B, M]
  sq_mean = (jnp.square(raw).sum(-1) + jnp.square(pos).sum(-1)) / total
  var = jnp.maximum(sq_mean - jnp.square(mean), 0.0)  # [B, M]
  return mean, jax.lax.rsqrt(var + LN_EPS)


def normalized_projection(x, scale: jax.Array, offset: jax.Array,
                          weights: Sequence[tuple[jax.Array, jax.Array]]
                          ) -> list[jax.Array]:
  """[LayerNorm(x) W_i + b_i for each (W_i, b_i) in weights], plain autodiff.

  Args:
    x: [B, M, C] byte array, or a FactoredByteArray of that shape.
    scale, offset: [C], the LayerNorm's parameters (eps 1e-5).
    weights: (W_i [C, E_i], b_i [E_i]) pairs, e.g. a key and a value
      projection.

  Returns:
    the [B, M, E_i] projections, in the order of `weights`. A factored array
    is projected as in the module docstring, never forming [B, M, C].
  """
  if not isinstance(x, FactoredByteArray):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    normed = (x - mean) * jax.lax.rsqrt(var + LN_EPS) * scale + offset
    return [normed @ w + b for w, b in weights]  # [B, M, E_i] each
  c = x.raw.shape[-1]
  mean, inv = layer_norm_statistics(x)  # [B, M] each
  pos = x.pos.astype(x.raw.dtype)
  out = []
  for w, b in weights:
    w_scaled = scale[:, None] * w  # W', [C, E_i]
    inner = (x.raw @ w_scaled[:c] + pos @ w_scaled[c:]
             - mean[..., None] * w_scaled.sum(0))  # [B, M, E_i]
    out.append(inv[..., None] * inner + (offset @ w + b))  # [B, M, E_i]
  return out

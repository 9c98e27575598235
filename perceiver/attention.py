"""The Perceiver's attention blocks (paper section 3.1, docs/paper.md).

Shapes:
  B  batch
  M  inputs (byte array length)           C  input channels (raw + position)
  N  latents (queries)                    D  latent channels
  H  heads                                Q / V  per-head query-key / value width

Every block is pre-LayerNorm with a residual (GPT-2 style) and is followed by
the MLP block; no masks, no dropout (paper v2):

  attend(q, k, v)  = softmax(q k^T / sqrt(Q)) v, per head
  cross-attend     z' = z + Linear_D(attend(Q(LN(z)), K(LN(x)), V(LN(x))))
  self-attend      z' = z + Linear_D(attend(Q(LN(z)), K(LN(z)), V(LN(z))))
  MLP              z'' = z' + Linear_D(GELU(Linear_wD(LN(z'))))

Each block takes `cpu_kernels`: False computes the lines below with Haiku's
modules and autodiff; True (the default) computes the same numbers with the
same parameters in perceiver/cpu_kernels.py (custom gradients and fused
projections for XLA:CPU). Either way the parameters are hk.Linear's and
hk.LayerNorm's under the names used here ('query', 'key', 'value', ...).
"""

from __future__ import annotations

import math

import haiku as hk
import jax
import jax.numpy as jnp

from perceiver import byte_array
from perceiver import chunked_attention
from perceiver import cpu_kernels as kernels


def attend(q: jax.Array, k: jax.Array, v: jax.Array):
  """Softmax attention, per head, the softmax in float32 (or wider).

  Args:
    q: [B, N, H, Q] queries; k: [B, M, H, Q] keys; v: [B, M, H, V] values.

  Returns:
    ([B, N, H, V] outputs, the [B, H, N, M] logits before the softmax).
  """
  logits = jnp.einsum('bnhq,bmhq->bhnm', q, k) / math.sqrt(q.shape[-1])
  weights = jax.nn.softmax(_at_least_f32(logits), axis=-1)  # over M
  out = jnp.einsum('bhnm,bmhv->bnhv', weights.astype(v.dtype), v)
  return out, logits  # [B, N, H, V], [B, H, N, M]


def _at_least_f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _linear(cpu_kernels: bool):
  """The Linear module constructor of the chosen path."""
  return kernels.Linear if cpu_kernels else hk.Linear


def _normalized_linear(x: jax.Array, size: int, *, norm_name: str,
                       linear_name: str, cpu_kernels: bool) -> jax.Array:
  """Linear(LN(x)): hk.LayerNorm's parameters under `norm_name`, then
  hk.Linear's under `linear_name` (both made in that order on either path)."""
  if cpu_kernels:
    return kernels.normalized_linear(
        x, *byte_array.layer_norm_params(norm_name, x.shape[-1]),
        *byte_array.linear_params(linear_name, x.shape[-1], size))
  x = hk.LayerNorm(axis=-1, create_scale=True, create_offset=True,
                   name=norm_name)(x)
  return hk.Linear(size, name=linear_name)(x)


def _split_heads(x: jax.Array, num_heads: int) -> jax.Array:
  """[B, T, H * W] -> [B, T, H, W]."""
  b, t, width = x.shape
  return x.reshape(b, t, num_heads, width // num_heads)


def _check_heads(num_heads: int, *widths: int):
  for width in widths:
    if width % num_heads:
      raise ValueError(f'Attention width {width} is not divisible by '
                       f'num_heads={num_heads}.')


class MLP(hk.Module):
  """The MLP block: x + Linear(GELU(Linear(LN(x)))).

  The hidden width is `widening_factor` times the input width; the paper's
  Perceiver uses 1 ("all linear layers preserve the dimensionality").
  GELU is JAX's default tanh approximation.
  """

  def __init__(self, *, widening_factor: int = 1, cpu_kernels: bool = True,
               name: str | None = None):
    super().__init__(name=name)
    self._widening_factor = widening_factor
    self._cpu_kernels = cpu_kernels

  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    wd = self._widening_factor * d
    h = _normalized_linear(x, wd, norm_name='layer_norm', linear_name='hidden',
                           cpu_kernels=self._cpu_kernels)  # [..., wD]
    if self._cpu_kernels:  # GELU and the output layer keep only h
      return x + kernels.gelu_linear(
          h, *byte_array.linear_params('output', wd, d))  # [..., D]
    return x + hk.Linear(d, name='output')(jax.nn.gelu(h))  # [..., D]


class CrossAttention(hk.Module):
  """Cross-attend: the latents query the byte array, then an MLP block.

  Q/K width defaults to the smaller of the two input widths (min(C, D): the
  byte array's C on ImageNet, 261); V width defaults to the Q/K width.
  """

  def __init__(self, *, num_heads: int = 1, qk_channels: int | None = None,
               v_channels: int | None = None, widening_factor: int = 1,
               chunk_size: int | None = None, cpu_kernels: bool = True,
               name: str | None = None):
    """Constructor.

    Args:
      num_heads: attention heads (the paper uses 1).
      qk_channels: total query/key width; None = min(C, D).
      v_channels: total value width; None = the query/key width.
      widening_factor: of the MLP block.
      chunk_size: if set, attend over the byte array in chunks of this many
        inputs with an online softmax (perceiver/chunked_attention.py: memory
        independent of N x M); the same numbers to float tolerance.
      cpu_kernels: compute with perceiver/cpu_kernels.py (see module doc).
      name: module name.
    """
    super().__init__(name=name)
    self._num_heads = num_heads
    self._qk_channels = qk_channels
    self._v_channels = v_channels
    self._widening_factor = widening_factor
    self._chunk_size = chunk_size
    self._cpu_kernels = cpu_kernels

  def __call__(self, latents: jax.Array, inputs, *,
               return_logits: bool = False):
    """Cross-attends.

    Args:
      latents: [B, N, D], or [N, D]: the same latents for every example (the
        first cross-attend, fed the learned latents themselves), whose
        queries are then computed once for the batch.
      inputs: [B, M, C] byte array, or a FactoredByteArray of that shape.
      return_logits: also return the [B, H, N, M] pre-softmax logits.

    Returns:
      [B, N, D] updated latents (and the logits if asked for).
    """
    b, m, c = inputs.shape
    n, d = latents.shape[-2:]
    h = self._num_heads
    qk = self._qk_channels or min(c, d)
    vc = self._v_channels or qk
    _check_heads(h, qk, vc)
    shared = latents.ndim == 2
    q = _normalized_linear(latents, qk, norm_name='query_layer_norm',
                           linear_name='query', cpu_kernels=self._cpu_kernels)
    # K(LN(x)) and V(LN(x)) of the dense or factored byte array
    # (perceiver/byte_array.py), from parameters made once for all chunks.
    ln = byte_array.layer_norm_params('input_layer_norm', c)
    kv = [byte_array.linear_params('key', c, qk),
          byte_array.linear_params('value', c, vc)]
    output = _linear(self._cpu_kernels)(d, name='output')

    if (shared and self._cpu_kernels and not return_logits
        and isinstance(inputs, byte_array.FactoredByteArray)):
      # Shared queries over a factored byte array: the logits' position
      # term once for the batch, no key or value array formed (whatever
      # chunk_size: the kernel holds one tile of keys at a time).
      out = kernels.factored_cross_attend(q, inputs, *ln, *kv[0], *kv[1],
                                          num_heads=h)
      z = kernels.add_shared(output(out), latents)  # [B, N, D]
      return MLP(widening_factor=self._widening_factor,
                 cpu_kernels=self._cpu_kernels, name='mlp')(z)

    if shared:  # one copy of the latents and queries per example
      spread = kernels.broadcast if self._cpu_kernels else (
          lambda x, b: jnp.broadcast_to(x, (b,) + x.shape))
      latents, q = spread(latents, b), spread(q, b)
    q = _split_heads(q, h)  # [B, N, H, Q]
    projection = (kernels.normalized_projection if self._cpu_kernels
                  else byte_array.normalized_projection)

    def project(x):  # [B, m, C] -> [B, m, H, Q], [B, m, H, V]
      k, v = projection(x, *ln, kv)
      return _split_heads(k, h), _split_heads(v, h)

    logits = None
    if self._chunk_size is None or self._chunk_size >= m:
      if self._cpu_kernels:  # the logits computed only if asked for
        out, logits = kernels.attend(q, *project(inputs),
                                     return_logits=return_logits)
      else:
        out, logits = attend(q, *project(inputs))  # [B, N, H, V], [B, H, N, M]
    elif return_logits:
      raise ValueError('return_logits is not available with chunk_size set: '
                       'the chunked path never holds the full logits.')
    else:
      out = chunked_attention.chunked_attend(
          q, inputs, project, chunk_size=self._chunk_size, v_channels=vc // h)
    z = latents + output(out.reshape(b, n, vc))  # [B, N, D]
    z = MLP(widening_factor=self._widening_factor,
            cpu_kernels=self._cpu_kernels, name='mlp')(z)
    return (z, logits) if return_logits else z


class SelfAttention(hk.Module):
  """A latent self-attention layer: multi-head pre-LN attention, then MLP."""

  def __init__(self, *, num_heads: int = 8, qk_channels: int | None = None,
               v_channels: int | None = None, widening_factor: int = 1,
               cpu_kernels: bool = True, name: str | None = None):
    """Constructor.

    Args:
      num_heads: attention heads (8 in the paper).
      qk_channels: total query/key width; None = D.
      v_channels: total value width; None = the query/key width.
      widening_factor: of the MLP block.
      cpu_kernels: compute with perceiver/cpu_kernels.py (see module doc).
      name: module name.
    """
    super().__init__(name=name)
    self._num_heads = num_heads
    self._qk_channels = qk_channels
    self._v_channels = v_channels
    self._widening_factor = widening_factor
    self._cpu_kernels = cpu_kernels

  def __call__(self, z: jax.Array) -> jax.Array:
    """[B, N, D] -> [B, N, D]."""
    b, n, d = z.shape
    h = self._num_heads
    qk = self._qk_channels or d
    vc = self._v_channels or qk
    _check_heads(h, qk, vc)
    if self._cpu_kernels:  # LN and the fused projection in one kernel
      out = kernels.self_attend(z, num_heads=h, qk_channels=qk,
                                v_channels=vc)  # [B, N, H * V]
    else:
      x = hk.LayerNorm(axis=-1, create_scale=True, create_offset=True,
                       name='layer_norm')(z)  # [B, N, D]
      q = _split_heads(hk.Linear(qk, name='query')(x), h)  # [B, N, H, Q]
      k = _split_heads(hk.Linear(qk, name='key')(x), h)  # [B, N, H, Q]
      v = _split_heads(hk.Linear(vc, name='value')(x), h)  # [B, N, H, V]
      out = attend(q, k, v)[0].reshape(b, n, vc)  # [B, N, H * V]
    z = z + _linear(self._cpu_kernels)(d, name='output')(out)  # [B, N, D]
    return MLP(widening_factor=self._widening_factor,
               cpu_kernels=self._cpu_kernels, name='mlp')(z)

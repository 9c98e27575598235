"""The Perceiver: latents cross-attend a byte array, then a latent Transformer.

Shapes:
  B  batch            M  inputs            C  input channels
  N  latents          D  latent channels   H  heads
  K  classes          R  blocks (latent Transformer applications)
  L  self-attends per block          X  cross-attends (X <= R, default R)

    z0 = learned latents [N, D]   (truncated normal, std 0.02, cut at 2 std)
    for i in 1..R:  z = CrossAttend_i(z, x);  z = LatentTransformer_i(z)
    logits = Linear_K(mean_N(z))

With X < R cross-attends, 'interleaved' puts them before evenly spaced blocks
(block floor(j R / X) for j < X) and 'start' puts all X before the first
block: the paper's Table 6 varies X with the latent Transformer fixed.

Weight sharing (paper v2): CrossAttend_1 has its own weights, CrossAttend_2..R
share one set, and one latent Transformer is shared by all R blocks. With
sharing off every cross-attend and latent Transformer has its own weights.
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp

from perceiver import attention

ARRANGEMENTS = ('interleaved', 'start')


class LatentTransformer(hk.Module):
  """L latent self-attention layers: [B, N, D] -> [B, N, D] (L = 0: identity)."""

  def __init__(self, *, num_layers: int, num_heads: int = 8,
               qk_channels: int | None = None, v_channels: int | None = None,
               widening_factor: int = 1, cpu_kernels: bool = True,
               name: str | None = None):
    super().__init__(name=name)
    self._num_layers = num_layers
    self._layer_kwargs = dict(num_heads=num_heads, qk_channels=qk_channels,
                              v_channels=v_channels,
                              widening_factor=widening_factor,
                              cpu_kernels=cpu_kernels)

  def __call__(self, z: jax.Array) -> jax.Array:
    for i in range(self._num_layers):
      z = attention.SelfAttention(**self._layer_kwargs,
                                  name=f'self_attend_{i}')(z)  # [B, N, D]
    return z


class Perceiver(hk.Module):
  """Perceiver classifier over a byte array [B, M, C] -> logits [B, K]."""

  def __init__(self, *, num_classes: int, num_latents: int = 512,
               latent_channels: int = 1024, num_blocks: int = 8,
               num_self_attends_per_block: int = 6,
               num_cross_attends: int | None = None,
               num_cross_heads: int = 1, num_self_heads: int = 8,
               cross_qk_channels: int | None = None,
               cross_v_channels: int | None = None,
               self_qk_channels: int | None = None,
               self_v_channels: int | None = None,
               cross_widening_factor: int = 1, self_widening_factor: int = 1,
               cross_attend_arrangement: str = 'interleaved',
               share_weights: bool = True, latent_init_scale: float = 0.02,
               cross_attend_chunk_size: int | None = None,
               remat_latent_blocks: bool = False,
               cpu_kernels: bool = True,
               name: str | None = None):
    """Constructor.

    Args:
      num_classes: K.
      num_latents: N (512 in the paper).
      latent_channels: D (1024 in the paper).
      num_blocks: R, the number of latent Transformer applications (8 on
        ImageNet).
      num_self_attends_per_block: L (6 on ImageNet); 0 gives a stack of
        cross-attends only (paper Table 5).
      num_cross_attends: X, the number of cross-attends, 1 <= X <= R;
        None = R (the paper's main model: one before every block).
      num_cross_heads: heads of each cross-attend (1).
      num_self_heads: heads of each latent self-attention (8).
      cross_qk_channels: cross-attend Q/K width; None = min(C, D).
      cross_v_channels: cross-attend V width; None = its Q/K width.
      self_qk_channels: self-attention Q/K width; None = D.
      self_v_channels: self-attention V width; None = its Q/K width.
      cross_widening_factor: MLP widening after cross-attends (1).
      self_widening_factor: MLP widening after self-attends (1).
      cross_attend_arrangement: 'interleaved' (cross-attends before evenly
        spaced latent Transformers; with X = R one before each) or 'start'
        (all X cross-attends first, then the R latent Transformers).
      share_weights: the paper's sharing scheme (True) or none at all.
      latent_init_scale: std of the latents' truncated-normal init.
      cross_attend_chunk_size: attend over the inputs in chunks of this size
        (memory-lean for huge M); None = plain attention.
      remat_latent_blocks: rematerialise each latent Transformer in the
        backward pass (less memory, more compute).
      cpu_kernels: compute every block with perceiver/cpu_kernels.py (custom
        gradients and fused projections laid out for XLA:CPU; True) or with
        Haiku's modules and plain autodiff (False). Same parameters, same
        numbers; which is faster is a property of the backend
        (benchmarks/RESULTS.md).
      name: module name.
    """
    super().__init__(name=name)
    if cross_attend_arrangement not in ARRANGEMENTS:
      raise ValueError(f'cross_attend_arrangement must be one of {ARRANGEMENTS}, '
                       f'got {cross_attend_arrangement!r}.')
    if num_blocks < 1:
      raise ValueError(f'num_blocks must be >= 1, got {num_blocks}.')
    num_cross_attends = num_cross_attends or num_blocks
    if not 1 <= num_cross_attends <= num_blocks:
      raise ValueError(f'num_cross_attends must be in [1, num_blocks='
                       f'{num_blocks}], got {num_cross_attends}.')
    self._num_cross_attends = num_cross_attends
    self._num_classes = num_classes
    self._num_latents = num_latents
    self._latent_channels = latent_channels
    self._num_blocks = num_blocks
    self._arrangement = cross_attend_arrangement
    self._share_weights = share_weights
    self._latent_init_scale = latent_init_scale
    self._remat = remat_latent_blocks
    self._cpu_kernels = cpu_kernels
    self._cross_kwargs = dict(
        num_heads=num_cross_heads, qk_channels=cross_qk_channels,
        v_channels=cross_v_channels, widening_factor=cross_widening_factor,
        chunk_size=cross_attend_chunk_size, cpu_kernels=cpu_kernels)
    self._latent_kwargs = dict(
        num_layers=num_self_attends_per_block, num_heads=num_self_heads,
        qk_channels=self_qk_channels, v_channels=self_v_channels,
        widening_factor=self_widening_factor, cpu_kernels=cpu_kernels)

  @hk.transparent
  def _blocks(self):
    """The X cross-attends and R latent Transformers, shared as configured.

    Haiku shares weights between calls of one module instance, so sharing is
    building a module once and putting it in several slots of the lists.
    """
    r, x = self._num_blocks, self._num_cross_attends
    cross = lambda name: attention.CrossAttention(**self._cross_kwargs,
                                                  name=name)
    latent = lambda name: LatentTransformer(**self._latent_kwargs, name=name)
    if self._share_weights:
      first = cross('cross_attend_first')
      crosses = [first]
      if x > 1:
        crosses += [cross('cross_attend_shared')] * (x - 1)  # one set, X-1 calls
      transformers = [latent('latent_transformer')] * r  # one set, R calls
    else:
      crosses = [cross(f'cross_attend_{i}') for i in range(x)]
      transformers = [latent(f'latent_transformer_{i}') for i in range(r)]
    return crosses, transformers

  def __call__(self, inputs: jax.Array, *, is_training: bool,
               return_attention: bool = False):
    """Classifies a byte array.

    Args:
      inputs: [B, M, C] byte array (or a FactoredByteArray of that shape).
      is_training: unused (no dropout in paper v2); kept for a uniform API.
      return_attention: also return the list of X pre-softmax cross-attention
        logits, each [B, H, N, M] (paper Fig. 3).

    Returns:
      logits [B, K] (and the list of cross-attention logits if asked for).
    """
    del is_training
    if inputs.ndim != 3:
      raise ValueError(f'Perceiver expects a byte array [B, M, C], got shape '
                       f'{inputs.shape} (rank {inputs.ndim}).')
    latents = hk.get_parameter(
        'latents', [self._num_latents, self._latent_channels],
        init=hk.initializers.TruncatedNormal(stddev=self._latent_init_scale))
    # The first block is always a cross-attend, which takes the latents
    # unbroadcast: the same for every example, so its queries are too.
    z = latents.astype(inputs.dtype)  # [N, D], then [B, N, D]
    crosses, transformers = self._blocks()
    if self._remat:
      transformers = [hk.remat(t) for t in transformers]

    attention_maps = []

    def cross_attend(i, z):
      if return_attention:
        z, logits = crosses[i](z, inputs, return_logits=True)
        attention_maps.append(logits)  # [B, H, N, M]
        return z
      return crosses[i](z, inputs)  # [B, N, D]

    r, x = self._num_blocks, self._num_cross_attends
    if self._arrangement == 'interleaved':
      before = {j * r // x: j for j in range(x)}  # block -> cross-attend index
      for i in range(r):
        if i in before:
          z = cross_attend(before[i], z)  # [B, N, D]
        z = transformers[i](z)  # [B, N, D]
    else:
      for j in range(x):
        z = cross_attend(j, z)  # [B, N, D]
      for i in range(r):
        z = transformers[i](z)  # [B, N, D]

    pooled = jnp.mean(z, axis=1)  # [B, D]
    # Not zero-initialised: LAMB scales each update by the parameter's norm,
    # so a zero head would barely move.
    logits = hk.Linear(self._num_classes, name='head')(pooled)  # [B, K]
    return (logits, attention_maps) if return_attention else logits

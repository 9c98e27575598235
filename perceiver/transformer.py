"""A plain Transformer over a downsampled input ("Transformer (64x64)" of paper
Tables 1 and 2, "Transformer (44x44)" of Table 4), and the input adapters the
baselines need beyond perceiver/preprocessors.py.

Shapes:
  B  batch            M  tokens (pixels of the downsampled image, or points)
  C  input channels   D  width           H  heads         K  classes
  P  points           h, w  downsampled grid / point grid

Transformer: every token (a pixel of the downsampled image, or a point) is the
raw value ++ its Fourier features, linearly projected to D; then L of the
Perceiver's own self-attention layers (pre-LN, 8 heads, MLP widening 1: the
latent Transformer's layer, attention.SelfAttention) over all M tokens; a final
LayerNorm, the mean over M and a linear head (randomly initialised: a zero
tensor barely moves under LAMB's trust ratio, see perceiver/resnet.py). It is the
Perceiver's latent Transformer applied to the inputs themselves instead of to
latents. Paper-size choice (the paper does not give one): L = 6, D = 1024,
8 heads, i.e. exactly one Perceiver latent Transformer. On 64x64 ImageNet
(M = 4,096) that costs ~729 GFLOPs per example, the Perceiver's compute
budget (707 GFLOPs), so the comparison is at matched compute; the attention
over M^2 = 16.8M pairs per head is what forces the downsampling. There is no
position embedding beyond the Fourier features and the pooling is a mean, so
the model is exactly invariant to a fixed permutation of its tokens applied
after the features are attached (paper Table 2: 57.0 / 57.0).

Input adapters (registered in experiments/modeling.PREPROCESSORS):
  DownsampledImagePreprocessor  'downsampled_image': [B, H, W, C] -> resize to
      h x w -> ImagePreprocessor (Fourier features of the *downsampled* grid,
      then the optional fixed permutation, on the downsampled pixels).
  PointGridPreprocessor  'point_grid': [B, P, 3] -> a fixed subset of h*w
      points, each xyz ++ Fourier features of xyz (PointCloudPreprocessor),
      arranged on an h x w grid [B, h, w, C] for the ResNet / ViT, or as a
      sequence [B, h*w, C] for the Transformer. Points have no order, so the
      grid is arbitrary: a ViT-B-k patch is a set of k*k points, a conv window
      a set of neighbouring-in-memory points. ModelNet40: 32 x 64 = all 2,048
      points for the ResNet / ViT (ViT-B-2/4/8/16 -> 512 / 128 / 32 / 8
      tokens); 44 x 44 = 1,936 points for the Transformer (the paper's name).
"""

from __future__ import annotations

from typing import Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from perceiver import attention
from perceiver import preprocessors


class Transformer(hk.Module):
  """Transformer classifier over a token array [B, M, C] -> logits [B, K]."""

  def __init__(self, *, num_classes: int, num_layers: int = 6,
               num_channels: int = 1024, num_heads: int = 8,
               widening_factor: int = 1, remat_layers: bool = False,
               cpu_kernels: bool = True, name: str | None = None):
    """Constructor.

    Args:
      num_classes: K.
      num_layers: L self-attention layers (6, one Perceiver latent Transformer).
      num_channels: D, the width (1024, the Perceiver's latent width).
      num_heads: H (8).
      widening_factor: of each MLP block (1, as in the Perceiver).
      remat_layers: rematerialise each layer in the backward pass (the
        [B, H, M, M] attention weights are then not stored).
      cpu_kernels: the layers' switch (perceiver/attention.py): XLA:CPU
        kernels (True) or Haiku modules with plain autodiff (False).
      name: module name.
    """
    super().__init__(name=name)
    self._num_classes = num_classes
    self._num_layers = num_layers
    self._num_channels = num_channels
    self._layer = dict(num_heads=num_heads, widening_factor=widening_factor,
                       cpu_kernels=cpu_kernels)
    self._remat = remat_layers

  def __call__(self, x: jax.Array, *, is_training: bool) -> jax.Array:
    """Classifies a token array.

    Args:
      x: [B, M, C] tokens (inputs ++ position features).
      is_training: unused (no dropout); kept for a uniform API.

    Returns:
      logits [B, K].
    """
    del is_training
    if x.ndim != 3:
      raise ValueError(f'Transformer expects tokens [B, M, C], got shape '
                       f'{x.shape} (rank {x.ndim}).')
    z = hk.Linear(self._num_channels, name='input_projection')(x)  # [B, M, D]
    for i in range(self._num_layers):
      layer = attention.SelfAttention(**self._layer, name=f'self_attend_{i}')
      z = (hk.remat(layer) if self._remat else layer)(z)  # [B, M, D]
    z = hk.LayerNorm(axis=-1, create_scale=True, create_offset=True,
                     name='final_layer_norm')(z)  # [B, M, D]
    pooled = jnp.mean(z, axis=1)  # [B, D]
    return hk.Linear(self._num_classes, name='head')(pooled)  # [B, K]


class DownsampledImagePreprocessor(hk.Module):
  """Pixels [B, H, W, C] -> downsampled to h x w -> [B, h*w, C + pos].

  Downsampling is antialiased bilinear (jax.image.resize, a triangle filter
  widened by the scale factor: an area-like average for 224 -> 64). Position
  features are those of the downsampled grid (crop-relative, as always), and
  the fixed permutation, if any, permutes the downsampled pixels after the
  features are attached, as the paper's Table 2 prescribes.
  """

  def __init__(self, *, resolution: Sequence[int] = (64, 64),
               input_channels: int | None = 3,
               position_encoding: str = 'fourier', num_bands: int = 64,
               max_resolution: Sequence[float] | None = (64, 64),
               learned_channels: int = 128, learned_init_scale: float = 1.0,
               permutation_seed: int | None = None, name: str | None = None):
    """Constructor.

    Args:
      resolution: (h, w) after downsampling (64 x 64 on ImageNet).
      input_channels: expected raw channels (3 for RGB), None to accept any.
      position_encoding: 'fourier', 'learned' or 'none'.
      num_bands: Fourier bands per axis.
      max_resolution: mu per axis, of the downsampled grid; None = (h, w).
      learned_channels: width of learned position encodings.
      learned_init_scale: std of their init.
      permutation_seed: if set, the fixed permutation of the h*w pixels.
      name: module name.
    """
    super().__init__(name=name)
    self._resolution = tuple(resolution)
    self._image_kwargs = dict(
        input_channels=input_channels, position_encoding=position_encoding,
        num_bands=num_bands, max_resolution=max_resolution,
        learned_channels=learned_channels,
        learned_init_scale=learned_init_scale,
        permutation_seed=permutation_seed, flatten=True)

  def __call__(self, images: jax.Array) -> jax.Array:
    if images.ndim != 4:
      raise ValueError(f'DownsampledImagePreprocessor expects [B, H, W, C], '
                       f'got shape {images.shape}.')
    b, _, _, c = images.shape
    h, w = self._resolution
    small = jax.image.resize(images, (b, h, w, c), method='linear',
                             antialias=True)  # [B, h, w, C]
    return preprocessors.ImagePreprocessor(**self._image_kwargs, name='image')(
        small)  # [B, h*w, C + pos]


class PointGridPreprocessor(hk.Module):
  """Points [B, P, 3] -> h*w of them, xyz ++ Fourier features, on a grid.

  The subset is a fixed pseudo-random choice of h*w point indices (seed 0; all
  points when h*w = P), so it does not depend on how the data orders points.
  """

  def __init__(self, *, grid_shape: Sequence[int] = (32, 64),
               flatten: bool = False, num_bands: int = 64,
               max_resolution: Sequence[float] = (2240, 2240, 2240),
               input_channels: int = 3, name: str | None = None):
    """Constructor.

    Args:
      grid_shape: (h, w); h*w points are kept (at most P).
      flatten: return the sequence [B, h*w, C] instead of the grid.
      num_bands: Fourier bands per coordinate (64 on ModelNet40).
      max_resolution: mu per coordinate (2240, see configs/modelnet40.py).
      input_channels: 3 (xyz).
      name: module name.
    """
    super().__init__(name=name)
    self._grid_shape = tuple(grid_shape)
    self._flatten = flatten
    self._points = dict(num_bands=num_bands,
                        max_resolution=tuple(max_resolution),
                        input_channels=input_channels)

  def __call__(self, points: jax.Array) -> jax.Array:
    if points.ndim != 3:
      raise ValueError(f'PointGridPreprocessor expects [B, P, 3], got shape '
                       f'{points.shape}.')
    b, p, _ = points.shape
    h, w = self._grid_shape
    if h * w > p:
      raise ValueError(f'grid_shape {self._grid_shape} needs {h * w} points, '
                       f'the input has {p}.')
    keep = preprocessors.fixed_permutation(p, 0)[:h * w]
    if h * w == p:
      keep.sort()  # all points, in their own order
    x = points[:, keep]  # [B, h*w, 3]
    x = preprocessors.PointCloudPreprocessor(**self._points, name='points')(
        x)  # [B, h*w, C]
    return x if self._flatten else x.reshape(b, h, w, -1)  # [B, h, w, C]

"""Preprocessors: each modality -> a byte array [B, M, C].

Shapes:
  B  batch                      M  inputs after preprocessing
  C  byte array channels        F  Fourier bands per axis
  T  audio samples / frames     P  points

Position features are always computed from the shape of the array the
preprocessor is given (for images: the crop), never from outside state, and
are concatenated to the raw channels (not added), as in the paper. With
`factored=True` the concatenation is left to the consumer: the result is a
`FactoredByteArray(raw [B, M, c], pos [M, p])`, the same byte array, which the
Perceiver's cross-attends project without repeating the position features'
share for every example (perceiver/byte_array.py).
"""

from __future__ import annotations

from typing import Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from perceiver import position_encoding
from perceiver.byte_array import as_dense
from perceiver.byte_array import FactoredByteArray

POSITION_ENCODINGS = ('fourier', 'learned', 'none')


def fixed_permutation(size: int, seed: int) -> np.ndarray:
  """A fixed pseudo-random permutation of range(size), the same for any run."""
  return np.random.default_rng(seed).permutation(size)


def _check_rank_and_channels(x, rank: int, channels: int | None, what: str):
  if x.ndim != rank:
    raise ValueError(f'{what}: expected a rank-{rank} array, got shape '
                     f'{x.shape} (rank {x.ndim}).')
  if channels is not None and x.shape[-1] != channels:
    raise ValueError(f'{what}: expected {channels} input channels (last axis) '
                     f'as configured, got {x.shape[-1]} (shape {x.shape}).')


class _PositionFeatures(hk.Module):
  """Attaches position features for a grid of `index_dims` to [B, M, C] data."""

  def __init__(self, *, position_encoding_kind: str, num_bands: int,
               max_resolution: Sequence[float] | None,
               learned_channels: int, learned_init_scale: float,
               name: str | None = None):
    super().__init__(name=name)
    if position_encoding_kind not in POSITION_ENCODINGS:
      raise ValueError(f'position_encoding must be one of {POSITION_ENCODINGS}, '
                       f'got {position_encoding_kind!r}.')
    self._kind = position_encoding_kind
    self._num_bands = num_bands
    self._max_resolution = max_resolution
    self._learned_channels = learned_channels
    self._learned_init_scale = learned_init_scale

  def num_channels(self, num_dims: int) -> int:
    if self._kind == 'fourier':
      return position_encoding.num_fourier_channels(num_dims, self._num_bands)
    return self._learned_channels if self._kind == 'learned' else 0

  def __call__(self, x: jax.Array, index_dims: Sequence[int], *,
               factored: bool = False):
    """x: [B, M, C] with M = prod(index_dims) -> [B, M, C + pos channels]
    (a FactoredByteArray of that shape with `factored`)."""
    b, m, _ = x.shape
    if self._kind == 'none':
      return FactoredByteArray(x, jnp.zeros((m, 0), x.dtype)) if factored else x
    if self._kind == 'fourier':
      # A None max resolution means "the grid itself": mu_d = the axis size.
      mu = self._max_resolution or index_dims
      if len(mu) == 1 and len(index_dims) > 1:
        mu = tuple(mu) * len(index_dims)
      pos = position_encoding.linear_positions(index_dims)  # [*dims, d]
      feats = position_encoding.fourier_features(
          pos, num_bands=self._num_bands, max_resolution=mu)
      feats = jnp.asarray(feats.reshape(m, -1), x.dtype)  # [M, d(2F+1)]
    else:
      feats = position_encoding.LearnedPositionEncoding(
          num_positions=m, num_channels=self._learned_channels,
          init_scale=self._learned_init_scale, name='learned_pos')()
      feats = feats.astype(x.dtype)  # [M, p]
    factored_array = FactoredByteArray(x, feats)
    return factored_array if factored else factored_array.dense()


class ImagePreprocessor(hk.Module):
  """Pixels [B, H, W, C] + 2-D position features -> [B, H*W, C + pos].

  With `permutation_seed` set, one fixed pixel permutation (the same for every
  example and every run) is applied after the position features are attached:
  the paper's "permuted ImageNet" (Table 2). With `flatten=False` the result
  keeps the grid, [B, H, W, C + pos], for convolutional baselines.
  """

  def __init__(self, *, input_channels: int | None = 3,
               position_encoding: str = 'fourier', num_bands: int = 64,
               max_resolution: Sequence[float] | None = (224, 224),
               learned_channels: int = 128, learned_init_scale: float = 1.0,
               patch_size: int = 1, permutation_seed: int | None = None,
               flatten: bool = True, factored: bool = False,
               name: str | None = None):
    """Constructor.

    Args:
      input_channels: expected raw channels (3 for RGB), None to accept any.
      position_encoding: 'fourier', 'learned' or 'none'.
      num_bands: Fourier bands per axis (64 on ImageNet).
      max_resolution: mu per axis (224 on ImageNet); None = the grid size.
      learned_channels: width of learned position encodings (128, Table 2).
      learned_init_scale: std of their truncated-normal init (1.0, Table 2).
      patch_size: side of square patches flattened into one input (1 = pixels).
      permutation_seed: if set, apply the fixed permutation of this seed.
      flatten: return [B, M, C] (True) or keep the grid (False).
      factored: return a FactoredByteArray ([B, M, c] and [M, p]; with
        flatten=False the grid [B, H, W, c] and [H, W, p]).
      name: module name.
    """
    super().__init__(name=name)
    self._input_channels = input_channels
    self._factored = factored
    self._patch_size = patch_size
    self._permutation_seed = permutation_seed
    self._flatten = flatten
    self._pos = dict(position_encoding_kind=position_encoding,
                     num_bands=num_bands, max_resolution=max_resolution,
                     learned_channels=learned_channels,
                     learned_init_scale=learned_init_scale)

  def __call__(self, images: jax.Array) -> jax.Array:
    _check_rank_and_channels(images, 4, self._input_channels,
                             'ImagePreprocessor [B, H, W, C]')
    b, height, width, c = images.shape
    p = self._patch_size
    if height % p or width % p:
      raise ValueError(f'Image size {height}x{width} is not divisible by '
                       f'patch_size={p}.')
    gh, gw = height // p, width // p
    x = images.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, gh * gw, p * p * c)  # [B, M, p*p*C]
    x = _PositionFeatures(**self._pos, name='position')(
        x, (gh, gw), factored=self._factored)
    if self._permutation_seed is not None:
      perm = fixed_permutation(gh * gw, self._permutation_seed)
      if self._factored:  # pixels move together with their positions
        x = FactoredByteArray(x.raw[:, perm], x.pos[perm])
      else:
        x = x[:, perm]  # [B, M, C']
    if self._flatten:
      return x
    if self._factored:  # raw [B, H, W, c], pos [H, W, p]
      return FactoredByteArray(x.raw.reshape(b, gh, gw, -1),
                               x.pos.reshape(gh, gw, -1))
    return x.reshape(b, gh, gw, -1)  # [B, H, W, C']


class AudioPreprocessor(hk.Module):
  """Raw audio [B, T] -> patches of `samples_per_patch` + 1-D features.

  AudioSet: 61,440 samples at 48 kHz in 128-sample patches -> M = 480.
  """

  def __init__(self, *, samples_per_patch: int = 128,
               position_encoding: str = 'fourier', num_bands: int = 192,
               max_resolution: Sequence[float] | None = None,
               learned_channels: int = 128, learned_init_scale: float = 1.0,
               factored: bool = False, name: str | None = None):
    super().__init__(name=name)
    self._factored = factored
    self._samples_per_patch = samples_per_patch
    self._pos = dict(position_encoding_kind=position_encoding,
                     num_bands=num_bands, max_resolution=max_resolution,
                     learned_channels=learned_channels,
                     learned_init_scale=learned_init_scale)

  def __call__(self, audio: jax.Array) -> jax.Array:
    _check_rank_and_channels(audio, 2, None, 'AudioPreprocessor [B, T]')
    b, t = audio.shape
    s = self._samples_per_patch
    if t % s:
      raise ValueError(f'Audio length {t} is not divisible by '
                       f'samples_per_patch={s}.')
    x = audio.reshape(b, t // s, s)  # [B, M, s]
    return _PositionFeatures(**self._pos, name='position')(
        x, (t // s,), factored=self._factored)


class SpectrogramPreprocessor(hk.Module):
  """Mel spectrogram [B, T, F_mel] -> one input per (time, mel) patch + 2-D features.

  With the default 1x1 patches every time-frequency bin is one input
  (120 frames x 40 mel bins -> M = 4,800 for AudioSet).
  """

  def __init__(self, *, patch_size: Sequence[int] = (1, 1),
               position_encoding: str = 'fourier', num_bands: int = 32,
               max_resolution: Sequence[float] | None = None,
               learned_channels: int = 128, learned_init_scale: float = 1.0,
               factored: bool = False, name: str | None = None):
    super().__init__(name=name)
    self._factored = factored
    self._patch_size = tuple(patch_size)
    self._pos = dict(position_encoding_kind=position_encoding,
                     num_bands=num_bands, max_resolution=max_resolution,
                     learned_channels=learned_channels,
                     learned_init_scale=learned_init_scale)

  def __call__(self, spectrogram: jax.Array) -> jax.Array:
    _check_rank_and_channels(spectrogram, 3, None,
                             'SpectrogramPreprocessor [B, T, F_mel]')
    b, t, f = spectrogram.shape
    pt, pf = self._patch_size
    if t % pt or f % pf:
      raise ValueError(f'Spectrogram {t}x{f} is not divisible by patch_size='
                       f'{self._patch_size}.')
    x = spectrogram.reshape(b, t // pt, pt, f // pf, pf).transpose(0, 1, 3, 2, 4)
    x = x.reshape(b, (t // pt) * (f // pf), pt * pf)  # [B, M, pt*pf]
    return _PositionFeatures(**self._pos, name='position')(
        x, (t // pt, f // pf), factored=self._factored)


class VideoPreprocessor(hk.Module):
  """Video [B, T, H, W, C] -> space-time patches + 3-D features.

  AudioSet video: 32 frames at 224x224 in 2x8x8 patches -> M = 12,544 inputs
  of 2*8*8*3 = 384 raw channels.
  """

  def __init__(self, *, patch_size: Sequence[int] = (2, 8, 8),
               input_channels: int | None = 3,
               position_encoding: str = 'fourier', num_bands: int = 32,
               max_resolution: Sequence[float] | None = None,
               learned_channels: int = 128, learned_init_scale: float = 1.0,
               factored: bool = False, name: str | None = None):
    super().__init__(name=name)
    self._factored = factored
    self._patch_size = tuple(patch_size)
    self._input_channels = input_channels
    self._pos = dict(position_encoding_kind=position_encoding,
                     num_bands=num_bands, max_resolution=max_resolution,
                     learned_channels=learned_channels,
                     learned_init_scale=learned_init_scale)

  def __call__(self, video: jax.Array) -> jax.Array:
    _check_rank_and_channels(video, 5, self._input_channels,
                             'VideoPreprocessor [B, T, H, W, C]')
    b, t, height, width, c = video.shape
    pt, ph, pw = self._patch_size
    if t % pt or height % ph or width % pw:
      raise ValueError(f'Video {t}x{height}x{width} is not divisible by '
                       f'patch_size={self._patch_size}.')
    grid = (t // pt, height // ph, width // pw)
    x = video.reshape(b, grid[0], pt, grid[1], ph, grid[2], pw, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    x = x.reshape(b, int(np.prod(grid)), pt * ph * pw * c)  # [B, M, pt*ph*pw*C]
    return _PositionFeatures(**self._pos, name='position')(
        x, grid, factored=self._factored)


class PointCloudPreprocessor(hk.Module):
  """Points [B, P, 3] -> xyz ++ Fourier features of the coordinates themselves.

  ModelNet40: 64 bands, max resolution 2240 ("max frequency 1120") per axis:
  C = 3 * (2 * 64 + 1) = 387 (xyz once, then 3 x 64 sines and cosines).
  """

  def __init__(self, *, num_bands: int = 64,
               max_resolution: Sequence[float] = (2240, 2240, 2240),
               input_channels: int = 3, name: str | None = None):
    super().__init__(name=name)
    self._num_bands = num_bands
    self._max_resolution = tuple(max_resolution)
    self._input_channels = input_channels

  def __call__(self, points: jax.Array) -> jax.Array:
    _check_rank_and_channels(points, 3, self._input_channels,
                             'PointCloudPreprocessor [B, P, 3]')
    return position_encoding.fourier_features(
        points, num_bands=self._num_bands,
        max_resolution=self._max_resolution)  # [B, P, 3 (2F + 1)]


class MultimodalPreprocessor(hk.Module):
  """Audio + video -> one byte array, concatenated along M.

  Each modality's byte array is padded to a common width with a learned,
  modality-specific vector (the same for every input of that modality): the
  common width is the widest modality's plus `min_padding`, so every modality
  carries at least `min_padding` learned channels (4 in the paper).
  """

  def __init__(self, *, audio: hk.Module, video: hk.Module,
               min_padding: int = 4, name: str | None = None):
    super().__init__(name=name)
    self._modalities = {'audio': audio, 'video': video}
    self._min_padding = min_padding

  def __call__(self, inputs: dict[str, jax.Array]) -> jax.Array:
    if set(inputs) != set(self._modalities):
      raise ValueError(f'MultimodalPreprocessor expects inputs with keys '
                       f'{sorted(self._modalities)}, got {sorted(inputs)}.')
    arrays = {k: as_dense(pre(inputs[k]))
              for k, pre in self._modalities.items()}
    width = max(a.shape[-1] for a in arrays.values()) + self._min_padding
    padded = []
    for key in sorted(arrays):  # audio first, then video
      a = arrays[key]  # [B, M_k, C_k]
      b, m, c = a.shape
      pad = hk.get_parameter(f'{key}_padding', [width - c],
                             init=hk.initializers.TruncatedNormal(0.02))
      pad = jnp.broadcast_to(pad.astype(a.dtype), (b, m, width - c))
      padded.append(jnp.concatenate([a, pad], axis=-1))  # [B, M_k, width]
    return jnp.concatenate(padded, axis=1)  # [B, sum M_k, width]

"""Position encodings: linear positions, Fourier features, learned encodings.

Shapes:
  d  number of index axes (2 for an image, 1 for audio, 3 for video / points)
  F  number of Fourier bands per axis
  P  number of positions (the product of the index dims)

Fourier features follow the paper (v2, section 3.2 and appendix): for each axis
with position x_d in [-1, 1] and F frequencies f_k spaced linearly from 1 to
mu_d / 2 (mu_d = the axis' "max resolution", its Nyquist frequency mu_d / 2),

    [x_1 .. x_d] ++ [sin(f_k pi x_d)]_{d, k} ++ [cos(f_k pi x_d)]_{d, k}

of size d (2F + 1). Within the sin (and cos) block the index is axis-major:
channel d * F + k holds axis d, band k.
"""

from __future__ import annotations

from typing import Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np


def linear_positions(index_dims: Sequence[int]) -> np.ndarray:
  """Linearly spaced positions in [-1, 1], endpoints included.

  Args:
    index_dims: size of each index axis, e.g. (H, W).

  Returns:
    float32 array [*index_dims, d] with d = len(index_dims); entry
    [i_1, .., i_d, a] is the position of index i_a along axis a.
  """
  index_dims = tuple(int(n) for n in index_dims)
  if not index_dims or any(n < 1 for n in index_dims):
    raise ValueError(f'index_dims must be positive sizes, got {index_dims}.')
  axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in index_dims]
  grid = np.meshgrid(*axes, indexing='ij')
  return np.stack(grid, axis=-1)  # [*index_dims, d]


def num_fourier_channels(num_dims: int, num_bands: int, *,
                         concat_pos: bool = True) -> int:
  """Channels of `fourier_features`: d (2F + 1), or 2dF without raw positions."""
  return num_dims * (2 * num_bands + int(concat_pos))


def fourier_features(positions, *, num_bands: int,
                     max_resolution: Sequence[float],
                     concat_pos: bool = True):
  """Fourier features of positions (paper section 3.2).

  Args:
    positions: [..., d] positions in [-1, 1]; numpy or jax array.
    num_bands: F, the number of frequency bands per axis.
    max_resolution: mu_d for each of the d axes; frequencies run linearly from 1
      to mu_d / 2 (included).
    concat_pos: whether the raw positions x_d lead the features.

  Returns:
    [..., d (2F + 1)] (or [..., 2dF] without concat_pos): the raw positions, then
    all sines (axis-major, band-minor), then all cosines in the same order.
    numpy in, numpy out; jax in, jax out.
  """
  xp = jnp if isinstance(positions, jax.Array) else np
  num_dims = positions.shape[-1]
  max_resolution = tuple(max_resolution)
  if len(max_resolution) != num_dims:
    raise ValueError(
        f'max_resolution has {len(max_resolution)} entries but the positions '
        f'have {num_dims} axes (shape {positions.shape}).')
  if not isinstance(positions, jax.core.Tracer):
    if not np.all(np.isfinite(np.asarray(positions))):
      raise ValueError('Position array holds non-finite values (NaN or inf); '
                       'positions must be finite, in [-1, 1].')
  # [d, F]: row d runs linearly from 1 to mu_d / 2.
  freqs = np.stack([np.linspace(1.0, mu / 2.0, num_bands, dtype=np.float32)
                    for mu in max_resolution])
  # [..., d, F] -> [..., dF], axis-major.
  angles = positions[..., :, None] * freqs * np.float32(np.pi)
  angles = angles.reshape(positions.shape[:-1] + (num_dims * num_bands,))
  parts = [positions] if concat_pos else []
  parts += [xp.sin(angles), xp.cos(angles)]
  return xp.concatenate(parts, axis=-1).astype(positions.dtype)


class LearnedPositionEncoding(hk.Module):
  """A learned [P, C] array of position encodings (paper Table 2).

  Initialised from a truncated normal of std `init_scale`.
  """

  def __init__(self, *, num_positions: int, num_channels: int,
               init_scale: float = 1.0, name: str | None = None):
    super().__init__(name=name)
    self._num_positions = num_positions
    self._num_channels = num_channels
    self._init_scale = init_scale

  def __call__(self) -> jax.Array:
    """Returns the [P, C] encodings (the same for every example)."""
    return hk.get_parameter(
        'pos_embs', [self._num_positions, self._num_channels],
        init=hk.initializers.TruncatedNormal(stddev=self._init_scale))  # [P, C]

"""Fourier features and positions, checked against hand-computed values."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from perceiver import position_encoding


def test_linear_positions_span_minus_one_to_one_with_endpoints():
  pos = position_encoding.linear_positions((3, 5))
  assert pos.shape == (3, 5, 2)
  np.testing.assert_allclose(pos[:, 0, 0], [-1.0, 0.0, 1.0])
  np.testing.assert_allclose(pos[0, :, 1], [-1.0, -0.5, 0.0, 0.5, 1.0])
  # Axis 0 is constant along axis 1 and vice versa.
  np.testing.assert_allclose(pos[:, 3, 0], pos[:, 0, 0])
  np.testing.assert_allclose(pos[2, :, 1], pos[0, :, 1])


def test_fourier_features_hand_computed_two_axes():
  # Two axes, F = 3 bands, mu = (8, 4): frequencies [1, 2.5, 4] and [1, 1.5, 2].
  x = np.array([[0.5, -0.25]], np.float32)
  got = position_encoding.fourier_features(x, num_bands=3, max_resolution=(8, 4))
  f0, f1 = [1.0, 2.5, 4.0], [1.0, 1.5, 2.0]
  angles = ([f * math.pi * 0.5 for f in f0] + [f * math.pi * -0.25 for f in f1])
  want = [0.5, -0.25] + [math.sin(a) for a in angles] + [math.cos(a) for a in angles]
  assert got.shape == (1, 2 * (2 * 3 + 1))
  np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-6)


def test_fourier_features_imagenet_size_and_numpy_jax_agree():
  pos = position_encoding.linear_positions((224, 224)).reshape(-1, 2)
  feats = position_encoding.fourier_features(pos, num_bands=64,
                                             max_resolution=(224, 224))
  assert feats.shape == (224 * 224, 258)
  assert position_encoding.num_fourier_channels(2, 64) == 258
  # Highest band is the Nyquist frequency mu / 2 = 112: sin(112 pi x).
  np.testing.assert_allclose(feats[:, 2 + 63], np.sin(112 * np.pi * pos[:, 0]),
                             atol=1e-4)
  jax_feats = position_encoding.fourier_features(
      jnp.asarray(pos), num_bands=64, max_resolution=(224, 224))
  np.testing.assert_allclose(np.asarray(jax_feats), feats, atol=1e-4)


def test_fourier_features_reject_non_finite_positions():
  pos = np.array([[0.0, np.nan]], np.float32)
  with pytest.raises(ValueError, match='non-finite'):
    position_encoding.fourier_features(pos, num_bands=2, max_resolution=(4, 4))


def test_fourier_features_reject_wrong_number_of_resolutions():
  pos = np.zeros((4, 3), np.float32)
  with pytest.raises(ValueError, match='3 axes'):
    position_encoding.fourier_features(pos, num_bands=2, max_resolution=(4, 4))

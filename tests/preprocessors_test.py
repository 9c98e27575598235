"""Every preprocessor's byte-array shape and channel count, and its errors."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import perceiver
from perceiver import position_encoding


def _apply(make, *inputs):
  f = hk.transform(lambda *x: make()(*x))
  params = f.init(jax.random.key(0), *inputs)
  return f.apply(params, None, *inputs), params


def test_imagenet_byte_array_has_261_channels():
  out, _ = _apply(perceiver.ImagePreprocessor, jnp.zeros((2, 224, 224, 3)))
  assert out.shape == (2, 224 * 224, 261)


def test_image_positions_are_crop_relative():
  """The same pixel content at any crop size gets positions spanning [-1, 1]."""
  make = lambda: perceiver.ImagePreprocessor(num_bands=4, max_resolution=None,
                                             input_channels=3)
  for size in (8, 12):
    out, _ = _apply(make, jnp.zeros((1, size, size, 3)))
    pos = np.asarray(out[0, :, 3:5]).reshape(size, size, 2)
    np.testing.assert_allclose(pos[0, 0], [-1, -1])
    np.testing.assert_allclose(pos[-1, -1], [1, 1])


def test_image_permutation_is_fixed_and_follows_position_features():
  images = jax.random.normal(jax.random.key(1), (2, 6, 6, 3))
  plain, _ = _apply(lambda: perceiver.ImagePreprocessor(num_bands=2), images)
  perm, _ = _apply(lambda: perceiver.ImagePreprocessor(
      num_bands=2, permutation_seed=7), images)
  order = perceiver.fixed_permutation(36, 7)
  # Pixels move together with their own position features.
  np.testing.assert_array_equal(np.asarray(perm), np.asarray(plain)[:, order])
  assert not np.array_equal(order, np.arange(36))
  np.testing.assert_array_equal(order, perceiver.fixed_permutation(36, 7))


def test_learned_position_encoding_channels():
  out, params = _apply(lambda: perceiver.ImagePreprocessor(
      position_encoding='learned', learned_channels=128), jnp.zeros((1, 8, 8, 3)))
  assert out.shape == (1, 64, 3 + 128)
  (pos,) = [v['pos_embs'] for v in params.values() if 'pos_embs' in v]
  assert pos.shape == (64, 128)


def test_audio_raw_patches():
  out, _ = _apply(lambda: perceiver.AudioPreprocessor(num_bands=64,
                                                      max_resolution=(480,)),
                  jnp.zeros((2, 61_440)))
  assert out.shape == (2, 480, 128 + 129)
  # Patch 1 holds samples 128..255.
  audio = jnp.arange(2 * 1024, dtype=jnp.float32).reshape(2, 1024)
  out, _ = _apply(lambda: perceiver.AudioPreprocessor(position_encoding='none'),
                  audio)
  np.testing.assert_array_equal(out[0, 1], np.arange(128, 256))


def test_spectrogram_inputs():
  out, _ = _apply(lambda: perceiver.SpectrogramPreprocessor(
      num_bands=32, max_resolution=(120, 40)), jnp.zeros((1, 120, 40)))
  assert out.shape == (1, 4800, 1 + 2 * 65)


def test_video_space_time_patches():
  video = jnp.zeros((1, 32, 224, 224, 3))
  out, _ = _apply(lambda: perceiver.VideoPreprocessor(num_bands=32), video)
  assert out.shape == (1, 12_544, 2 * 8 * 8 * 3 + 3 * 65)
  # A patch holds exactly its 2x8x8 block of the video.
  small = jax.random.normal(jax.random.key(0), (1, 4, 16, 16, 3))
  out, _ = _apply(lambda: perceiver.VideoPreprocessor(position_encoding='none'),
                  small)
  patch = np.asarray(small[0, 2:4, 8:16, 0:8]).reshape(-1)
  np.testing.assert_allclose(out[0, 1 * 4 + 1 * 2 + 0], patch)


def test_point_cloud_features_of_the_coordinates_themselves():
  points = jax.random.uniform(jax.random.key(0), (2, 2048, 3), minval=-1)
  out, _ = _apply(perceiver.PointCloudPreprocessor, points)
  assert out.shape == (2, 2048, 3 * (2 * 64 + 1))
  want = position_encoding.fourier_features(
      np.asarray(points), num_bands=64, max_resolution=(2240,) * 3)
  np.testing.assert_allclose(out, want, atol=2e-3)


def test_audio_video_fusion_pads_with_learned_modality_vectors():
  make = lambda: perceiver.MultimodalPreprocessor(
      audio=perceiver.AudioPreprocessor(num_bands=4, max_resolution=(8,)),
      video=perceiver.VideoPreprocessor(num_bands=4), min_padding=4)
  inputs = {'audio': jnp.zeros((2, 1024)), 'video': jnp.zeros((2, 4, 16, 16, 3))}
  out, params = _apply(make, inputs)
  c_audio, c_video = 128 + 9, 384 + 27
  width = max(c_audio, c_video) + 4
  assert out.shape == (2, 8 + 2 * 2 * 2, width)
  pads = next(v for k, v in params.items() if 'multimodal' in k)
  assert pads['audio_padding'].shape == (width - c_audio,)
  assert pads['video_padding'].shape == (width - c_video,)
  # Every audio input carries the same learned audio padding.
  np.testing.assert_allclose(out[1, 3, c_audio:], pads['audio_padding'])
  np.testing.assert_allclose(out[0, -1, c_video:], pads['video_padding'])


@pytest.mark.parametrize('make,shape,match', [
    (perceiver.ImagePreprocessor, (224, 224, 3), 'rank-4.*got shape'),
    (perceiver.ImagePreprocessor, (1, 32, 32, 1), 'expected 3 input channels.*got 1'),
    (perceiver.PointCloudPreprocessor, (1, 10, 4), 'expected 3 input channels.*got 4'),
    (perceiver.AudioPreprocessor, (1, 1000), 'not divisible by samples_per_patch'),
])
def test_bad_inputs_name_expected_and_given(make, shape, match):
  with pytest.raises(ValueError, match=match):
    _apply(make, jnp.zeros(shape))


def test_non_finite_point_positions_are_rejected():
  points = np.zeros((1, 4, 3), np.float32)
  points[0, 2, 1] = np.inf
  with pytest.raises(ValueError, match='non-finite'):
    _apply(perceiver.PointCloudPreprocessor, jnp.asarray(points))

"""RandAugment (Cubuk et al. 2020) in TensorFlow ops, with stateless randomness.

Shapes: H, W image height and width. Images are float32 [H, W, 3] with values
in [0, 255] (integers-valued in, and clipped to [0, 255] after every op).

Each of `num_layers` layers applies one op drawn uniformly from the 14 of the
paper (identity, auto-contrast, equalize, rotate, solarize, colour, posterize,
contrast, brightness, sharpness, shear x/y, translate x/y) at the fixed
`magnitude` m in [0, 10] (larger m = stronger; the PIL conventions of the
AutoAugment code, in their "increasing" form):
  rotate     +-30 * m/10 degrees        shear       +-0.3 * m/10
  translate  +-0.45 * m/10 of the size  solarize    threshold 256 * (1 - m/10)
  posterize  8 - floor(4 * m/10) bits   colour, contrast, brightness,
  sharpness  enhancement factor 1 +- 0.9 * m/10
The sign of signed ops is random. Geometric ops fill with grey (128).
"""
import math

import tensorflow as tf

_FILL = 128.


def _blend(image, degenerate, factor):
  """PIL ImageEnhance: degenerate + factor * (image - degenerate), clipped."""
  return tf.clip_by_value(degenerate + factor * (image - degenerate), 0., 255.)


def _grayscale(image):  # [H, W, 1]
  return tf.reduce_sum(image * [0.299, 0.587, 0.114], -1, keepdims=True)


def _colour(image, factor):
  return _blend(image, tf.tile(_grayscale(image), [1, 1, 3]), factor)


def _contrast(image, factor):
  mean = tf.reduce_mean(_grayscale(image))
  return _blend(image, tf.fill(tf.shape(image), mean), factor)


def _brightness(image, factor):
  return _blend(image, tf.zeros_like(image), factor)


def _sharpness(image, factor):
  """Blend with a 3x3 smoothed image (PIL's SMOOTH kernel), borders kept."""
  kernel = tf.constant([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]]) / 13.
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])  # [3, 3, 3, 1]
  smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1],
                                  'VALID')[0]  # [H-2, W-2, 3]
  smooth = tf.round(smooth)
  degenerate = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  border = tf.pad(tf.zeros_like(smooth), [[1, 1], [1, 1], [0, 0]],
                  constant_values=1.)
  degenerate = border * image + (1. - border) * degenerate
  return _blend(image, degenerate, factor)


def _auto_contrast(image):
  lo = tf.reduce_min(image, axis=[0, 1])  # [3]
  hi = tf.reduce_max(image, axis=[0, 1])  # [3]
  scaled = (image - lo) * 255. / tf.maximum(hi - lo, 1.)
  return tf.where(hi > lo, scaled, image)


def _equalize_channel(channel):  # [H, W] -> [H, W]
  values = tf.cast(channel, tf.int32)
  hist = tf.math.bincount(values, minlength=256, maxlength=256)  # [256]
  last = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)))
  step = (tf.reduce_sum(hist) - last) // 255
  safe = tf.maximum(step, 1)
  lut = (tf.cumsum(hist) + safe // 2) // safe
  lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)  # [256]
  equalized = tf.cast(tf.gather(lut, values), tf.float32)
  return tf.where(step > 0, equalized, channel)


def _equalize(image):
  return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], -1)


def _solarize(image, threshold):
  return tf.where(image < threshold, image, 255. - image)


def _posterize(image, bits):
  shift = 8 - bits
  values = tf.cast(image, tf.int32)
  return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(values, shift),
                                       shift), tf.float32)


def _transform(image, transform, interpolation='NEAREST'):
  """Projective transform; `transform` [8] maps output to input pixels."""
  shape = tf.shape(image)[:2]
  return tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=tf.cast(transform, tf.float32)[None],
      output_shape=shape, fill_value=_FILL, interpolation=interpolation,
      fill_mode='CONSTANT')[0]


def _rotate(image, degrees):
  theta = degrees * math.pi / 180.
  h = tf.cast(tf.shape(image)[0], tf.float32)
  w = tf.cast(tf.shape(image)[1], tf.float32)
  cx, cy = (w - 1.) / 2., (h - 1.) / 2.
  cos, sin = tf.cos(theta), tf.sin(theta)
  return _transform(image, [cos, sin, cx - cos * cx - sin * cy,
                            -sin, cos, cy + sin * cx - cos * cy, 0., 0.])


def _shear_x(image, s):
  return _transform(image, [1., s, 0., 0., 1., 0., 0., 0.])


def _shear_y(image, s):
  return _transform(image, [1., 0., 0., s, 1., 0., 0., 0.])


def _translate_x(image, fraction):
  pixels = fraction * tf.cast(tf.shape(image)[1], tf.float32)
  return _transform(image, [1., 0., pixels, 0., 1., 0., 0., 0.])


def _translate_y(image, fraction):
  pixels = fraction * tf.cast(tf.shape(image)[0], tf.float32)
  return _transform(image, [1., 0., 0., 0., 1., pixels, 0., 0.])


def ops(magnitude: float, sign: tf.Tensor):
  """The 14 ops at `magnitude`, as functions of the image; sign is +-1."""
  m = magnitude / 10.
  enhance = 1. + sign * 0.9 * m
  return [
      lambda x: x,
      _auto_contrast,
      _equalize,
      lambda x: _rotate(x, sign * 30. * m),
      lambda x: _solarize(x, 256. * (1. - m)),
      lambda x: _colour(x, enhance),
      lambda x: _posterize(x, 8 - int(4 * m)),
      lambda x: _contrast(x, enhance),
      lambda x: _brightness(x, enhance),
      lambda x: _sharpness(x, enhance),
      lambda x: _shear_x(x, sign * 0.3 * m),
      lambda x: _shear_y(x, sign * 0.3 * m),
      lambda x: _translate_x(x, sign * 0.45 * m),
      lambda x: _translate_y(x, sign * 0.45 * m),
  ]


NUM_OPS = 14


def randaugment(image: tf.Tensor, key: tf.Tensor, *, num_layers: int,
                magnitude: float) -> tf.Tensor:
  """Applies `num_layers` random ops to `image` [H, W, 3] float in [0, 255].

  `key` [2] seeds the stateless choice of ops and signs.
  """
  if not 0 <= magnitude <= 10:
    raise ValueError(f'RandAugment magnitude {magnitude} not in [0, 10].')
  keys = tf.random.experimental.stateless_split(key, 2 * num_layers)
  for layer in range(num_layers):
    op = tf.random.stateless_uniform([], keys[2 * layer], 0, NUM_OPS, tf.int32)
    sign = tf.where(
        tf.random.stateless_uniform([], keys[2 * layer + 1]) < 0.5, -1., 1.)
    branches = [lambda f=f: tf.clip_by_value(f(image), 0., 255.)
                for f in ops(magnitude, sign)]
    image = tf.ensure_shape(tf.switch_case(op, branches), image.shape)
  return image

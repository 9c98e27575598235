"""ResNet baselines: "ResNet-50 (FF)" of paper Tables 1, 2 and 4, and small
ResNets for CPU-scale stand-ins.

Shapes:
  B  batch                     H, W  height and width of the grid / feature map
  C  input channels            E     channels of a feature map
  K  classes

The input is a grid [B, H, W, C] whose channels are the raw pixels with the
Fourier position features concatenated ("ResNet-50 (FF)"), i.e. the output of
`ImagePreprocessor(flatten=False)`; with the fixed pixel permutation of paper
Table 2 the grid arrives already scrambled (features travel with their pixels).
Given that grid as a FactoredByteArray (`ImagePreprocessor(flatten=False,
factored=True)`), the stem convolves the position features once per batch
rather than once per example: the same parameters and numbers, less work.

ResNet-50 is v1.5 (the torchvision / MLPerf variant): bottleneck blocks with
the stride on the 3x3 convolution, projection shortcuts (1x1 conv + BN) where
the shape changes, batch norm after every convolution, no conv biases. With 3
input channels and 1000 classes it has 25,557,032 parameters (BN scale and
offset included; the BN moving statistics are Haiku *state*, not parameters),
the standard count. Concatenating F Fourier bands over 2 axes widens only the
stem: + 7 * 7 * 2(2F+1) * 64 parameters (26,366,120 for F = 64).

Initialisation: He-normal convolutions, BN scales 1 and offsets 0, a
randomly initialised head (hk.Linear's default). Zero-initialised tensors (a
zero head, or the zero last-BN scale of Goyal et al.'s `zero_init_residual`)
barely move under LAMB, the runner's optimizer: its layer-wise trust ratio
scales every update by the tensor's own norm, so a tensor starting at zero
grows only geometrically from its first step's size (~lr). The option stays
for SGD / Adam, off by default.

BatchNorm keeps moving statistics, so a model with it must be transformed with
`hk.transform_with_state` (experiments/modeling.build_model does so for every
model). Under `jax.jit` over a device mesh the batch statistics are taken over
the whole (global) batch, as with synchronised BN.
"""

from __future__ import annotations

from typing import Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from perceiver.byte_array import FactoredByteArray

# He et al. (2015) init for convolutions followed by ReLU.
_CONV_INIT = hk.initializers.VarianceScaling(2.0, 'fan_in', 'truncated_normal')


def factored_conv(x: FactoredByteArray, w: jax.Array, stride: int
                  ) -> jax.Array:
  """The 'SAME' convolution of the grid raw ++ pos by w [k, k, c + p, E].

  A convolution is linear in its input channels, so the kernel splits into
  its raw and position-feature slices, and the position features, the same
  for every example, are convolved once per batch instead of once per
  example (the same numbers up to summation order): [B, H', W', E].
  """
  c = x.raw.shape[-1]

  def conv(inputs, kernel):
    return jax.lax.conv_general_dilated(
        inputs, kernel, (stride, stride), 'SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  pos = x.pos.astype(x.raw.dtype)[None]  # [1, H, W, p]
  return conv(x.raw, w[:, :, :c]) + conv(pos, w[:, :, c:])  # [B, H', W', E]


class _ConvBN(hk.Module):
  """Conv (no bias) -> BatchNorm (-> ReLU): [B, H, W, C] -> [B, H', W', E]."""

  def __init__(self, *, channels: int, kernel_size: int, stride: int,
               relu: bool, bn_decay_rate: float, bn_eps: float,
               zero_init_scale: bool = False, name: str | None = None):
    super().__init__(name=name)
    self._channels = channels
    self._kernel_size = kernel_size
    self._stride = stride
    self._relu = relu
    self._bn_decay_rate = bn_decay_rate
    self._bn_eps = bn_eps
    self._zero_init_scale = zero_init_scale

  def __call__(self, x, *, is_training: bool) -> jax.Array:
    if isinstance(x, FactoredByteArray):
      # Named as hk.Conv2D(name='conv') names it: one parameter either way.
      with hk.name_scope('conv'):
        w = hk.get_parameter('w', [self._kernel_size, self._kernel_size,
                                   x.shape[-1], self._channels], x.dtype,
                             init=_CONV_INIT)  # [k, k, c + p, E]
      x = factored_conv(x, w, self._stride)  # [B, H', W', E]
    else:
      x = hk.Conv2D(self._channels, self._kernel_size, stride=self._stride,
                    with_bias=False, padding='SAME', w_init=_CONV_INIT,
                    name='conv')(x)  # [B, H', W', E]
    x = hk.BatchNorm(
        create_scale=True, create_offset=True,
        decay_rate=self._bn_decay_rate, eps=self._bn_eps,
        scale_init=jnp.zeros if self._zero_init_scale else jnp.ones,
        # At init the moving statistics must be created, which only a
        # training-mode call does: init works with either is_training.
        name='batch_norm')(x, is_training=is_training or hk.running_init()
                           )  # [B, H', W', E]
    return jax.nn.relu(x) if self._relu else x


class ResidualBlock(hk.Module):
  """A bottleneck (1x1, 3x3, 1x1) or basic (3x3, 3x3) residual block.

  [B, H, W, C] -> [B, H / stride, W / stride, E]. The shortcut is the identity
  when the shape is kept, else a projection (1x1 conv with the stride + BN).
  With `zero_init_residual` the last BN's scale starts at zero, so every block
  starts as the identity (Goyal et al. 2017).
  """

  def __init__(self, *, channels: int, stride: int, bottleneck: bool,
               bn_decay_rate: float = 0.9, bn_eps: float = 1e-5,
               zero_init_residual: bool = False, name: str | None = None):
    super().__init__(name=name)
    self._channels = channels
    self._stride = stride
    self._bottleneck = bottleneck
    self._bn = dict(bn_decay_rate=bn_decay_rate, bn_eps=bn_eps)
    self._zero_init_residual = zero_init_residual

  def __call__(self, x: jax.Array, *, is_training: bool) -> jax.Array:
    in_channels = x.shape[-1]
    e, s = self._channels, self._stride
    if self._bottleneck:
      # v1.5: the stride sits on the 3x3 convolution.
      specs = [(e // 4, 1, 1, True), (e // 4, 3, s, True), (e, 1, 1, False)]
    else:
      specs = [(e, 3, s, True), (e, 3, 1, False)]
    h = x
    for i, (channels, kernel, stride, relu) in enumerate(specs):
      last = i == len(specs) - 1
      h = _ConvBN(channels=channels, kernel_size=kernel, stride=stride,
                  relu=relu, zero_init_scale=last and self._zero_init_residual,
                  **self._bn, name=f'conv_{i}')(
                      h, is_training=is_training)  # [B, H / s, W / s, E_i]
    if s != 1 or in_channels != e:
      shortcut = _ConvBN(channels=e, kernel_size=1, stride=s, relu=False,
                         **self._bn, name='shortcut')(
                             x, is_training=is_training)  # [B, H / s, W / s, E]
    else:
      shortcut = x  # [B, H, W, E]
    return jax.nn.relu(shortcut + h)  # [B, H / s, W / s, E]


class ResNet(hk.Module):
  """ResNet classifier over a grid [B, H, W, C] -> logits [B, K].

  Defaults are ResNet-50 v1.5 for 224x224 inputs. A small-image stem (3x3,
  stride 1, no max-pool), basic blocks and fewer, narrower stages give the
  CPU-scale ResNets (e.g. for 28x28 Fashion-MNIST).
  """

  def __init__(self, *, num_classes: int,
               blocks_per_stage: Sequence[int] = (3, 4, 6, 3),
               stage_channels: Sequence[int] = (256, 512, 1024, 2048),
               bottleneck: bool = True, stem_channels: int = 64,
               stem_kernel_size: int = 7, stem_stride: int = 2,
               stem_max_pool: bool = True, bn_decay_rate: float = 0.9,
               bn_eps: float = 1e-5, zero_init_residual: bool = False,
               name: str | None = None):
    """Constructor.

    Args:
      num_classes: K.
      blocks_per_stage: residual blocks in each stage ((3, 4, 6, 3) for
        ResNet-50). The first stage keeps the resolution, every later stage
        halves it in its first block.
      stage_channels: output channels E of each stage's blocks ((256, 512,
        1024, 2048) for ResNet-50; bottlenecks run at E / 4 inside).
      bottleneck: bottleneck blocks (ResNet-50) or basic blocks (ResNet-18).
      stem_channels: channels of the stem convolution (64).
      stem_kernel_size: its kernel (7; 3 for small images).
      stem_stride: its stride (2; 1 for small images).
      stem_max_pool: a 3x3 stride-2 max-pool after the stem (True; False for
        small images).
      bn_decay_rate: decay of the BN moving statistics (0.9 = torch's 0.1
        momentum).
      bn_eps: BN epsilon.
      zero_init_residual: start each block's last BN scale at zero (Goyal et
        al. 2017; not with LAMB, see the module docstring).
      name: module name.
    """
    super().__init__(name=name)
    if len(blocks_per_stage) != len(stage_channels):
      raise ValueError(f'blocks_per_stage {tuple(blocks_per_stage)} and '
                       f'stage_channels {tuple(stage_channels)} must have the '
                       'same length (one entry per stage).')
    self._num_classes = num_classes
    self._blocks_per_stage = tuple(blocks_per_stage)
    self._stage_channels = tuple(stage_channels)
    self._bottleneck = bottleneck
    self._stem = dict(channels=stem_channels, kernel_size=stem_kernel_size,
                      stride=stem_stride)
    self._stem_max_pool = stem_max_pool
    self._bn = dict(bn_decay_rate=bn_decay_rate, bn_eps=bn_eps)
    self._zero_init_residual = zero_init_residual

  def __call__(self, x: jax.Array, *, is_training: bool) -> jax.Array:
    """Classifies a grid.

    Args:
      x: [B, H, W, C], pixels ++ position features (ImagePreprocessor with
        flatten=False).
      is_training: batch statistics (and moving-average updates) in training,
        the moving averages in evaluation.

    Returns:
      logits [B, K].
    """
    if x.ndim != 4:  # dense, or a FactoredByteArray grid
      raise ValueError(f'ResNet expects a grid [B, H, W, C], got shape '
                       f'{x.shape}; build its input with flatten=False.')
    h = _ConvBN(**self._stem, relu=True, **self._bn, name='stem')(
        x, is_training=is_training)  # [B, H / s, W / s, E_stem]
    if self._stem_max_pool:
      h = hk.max_pool(h, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1),
                      padding='SAME')  # [B, H / 2s, W / 2s, E_stem]
    for stage, (num_blocks, channels) in enumerate(
        zip(self._blocks_per_stage, self._stage_channels)):
      for block in range(num_blocks):
        stride = 2 if stage > 0 and block == 0 else 1
        h = ResidualBlock(
            channels=channels, stride=stride, bottleneck=self._bottleneck,
            zero_init_residual=self._zero_init_residual, **self._bn,
            name=f'stage_{stage}_block_{block}')(
                h, is_training=is_training)  # [B, H', W', E]
    pooled = jnp.mean(h, axis=(1, 2))  # [B, E]
    # Random, not zero, init: see the module docstring.
    return hk.Linear(self._num_classes, name='head')(pooled)  # [B, K]

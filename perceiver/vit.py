"""ViT baselines: "ViT-B-16 (FF)" of paper Tables 1 and 2, ViT-B-2/4/8/16 of
Table 4.

Shapes:
  B  batch                        G  grid axes of the input (2 for an image)
  C  input channels               P  patch side (the "16" of ViT-B-16)
  T  tokens (patches) + 1 class token
  D  hidden width (768)           H  heads (12)        K  classes

How the Fourier features attach: per *pixel*, before patching. The input is
the grid [B, H, W, C] of `ImagePreprocessor(flatten=False)`, whose channels
are the raw pixels ++ the pixel's Fourier features; each P x P patch is
flattened to P*P*C values and linearly embedded (exactly a P x P stride-P
convolution). No learned position embedding is added: positions come in
through the features inside every patch. This is the input the other models
see, so the Table 2 permutation (applied to pixels, after the features are
attached) reaches the ViT the same way: a permuted patch holds scattered
pixels, each still carrying its own position.

It widens the patch embedding: P*P*C x D. ViT-B/16 has 86,416,360 parameters
with 3 channels, 1000 classes, a class token and no position embedding
(86,567,656 with the standard learned embedding, `learned_position_embedding`);
with 64 Fourier bands (C = 261) the patch embedding adds 16*16*258*768 and the
model has 137,141,224. The alternative, Fourier features of the *patch* grid
concatenated to each flattened patch, is this model with patch_size=1 fed by
`ImagePreprocessor(patch_size=P)` (tokens [B, M, P*P*C_raw + pos]).

Encoder: pre-LayerNorm blocks, multi-head self-attention then an MLP of width
`mlp_dim` with exact GELU, dropout after the attention output and in the MLP
(Dosovitskiy et al. 2021); a final LayerNorm; the class token's output is
projected to K by the head. Unlike ViT's zero-initialised head and class
token, both start random (hk.Linear's default; normal, std 0.02): under LAMB,
the runner's optimizer, a tensor that starts at zero barely moves (its
trust ratio scales updates by its own norm).
"""

from __future__ import annotations


import haiku as hk
import jax
import jax.numpy as jnp

from perceiver import attention
from perceiver.byte_array import FactoredByteArray

_XAVIER = hk.initializers.VarianceScaling(1.0, 'fan_avg', 'uniform')


def _layer_norm(name: str) -> hk.LayerNorm:
  return hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, name=name)


def _dropout(x: jax.Array, rate: float, is_training: bool) -> jax.Array:
  if is_training and rate > 0:
    return hk.dropout(hk.next_rng_key(), rate, x)
  return x


def patchify(x: jax.Array, patch_size: int) -> jax.Array:
  """Cuts a grid into non-overlapping patches, each flattened.

  Args:
    x: [B, *grid, C] with every grid axis divisible by patch_size (G = 1 or 2
      grid axes: a sequence or an image).
    patch_size: P, the side of a patch along every grid axis.

  Returns:
    [B, T, P^G * C]: patches in row-major grid order; within a patch, values
    are ordered (patch row, patch column, channel).
  """
  b, *grid, c = x.shape
  p = patch_size
  if len(grid) not in (1, 2) or any(n % p for n in grid):
    raise ValueError(f'ViT expects a sequence [B, M, C] or a grid [B, H, W, C] '
                     f'divisible by patch_size={p}; got shape {x.shape}.')
  if len(grid) == 1:
    return x.reshape(b, grid[0] // p, p * c)  # [B, T, P*C]
  gh, gw = grid[0] // p, grid[1] // p
  x = x.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * gw, p * p * c)  # [B, T, P*P*C]


def factored_patch_embedding(x: FactoredByteArray, w: jax.Array,
                             bias: jax.Array, patch_size: int) -> jax.Array:
  """patchify(raw ++ pos) @ w + bias without forming raw ++ pos: [B, T, D].

  The embedding is linear, so w [P^G * (c + p), D] splits into the rows of
  the raw channels and those of the position features of every patch cell;
  the position features' share is computed once per batch.
  """
  c, total, d = x.raw.shape[-1], x.shape[-1], w.shape[-1]
  w = w.reshape(-1, total, d)  # rows: (patch cell, channel)
  raw = patchify(x.raw, patch_size)  # [B, T, P^G * c]
  pos = patchify(x.pos.astype(x.raw.dtype)[None], patch_size)  # [1, T, .]
  return (raw @ w[:, :c].reshape(-1, d) + pos @ w[:, c:].reshape(-1, d)
          + bias)  # [B, T, D]


class EncoderBlock(hk.Module):
  """x + Drop(MHSA(LN(x))), then x + Drop(MLP(LN(x))): [B, T, D] -> same."""

  def __init__(self, *, num_heads: int, mlp_dim: int, dropout_rate: float,
               name: str | None = None):
    super().__init__(name=name)
    self._num_heads = num_heads
    self._mlp_dim = mlp_dim
    self._dropout_rate = dropout_rate

  def __call__(self, x: jax.Array, *, is_training: bool) -> jax.Array:
    b, t, d = x.shape
    h = self._num_heads
    if d % h:
      raise ValueError(f'hidden width {d} is not divisible by num_heads={h}.')
    linear = lambda width, name: hk.Linear(width, w_init=_XAVIER, name=name)
    y = _layer_norm('attention_layer_norm')(x)  # [B, T, D]
    q = linear(d, 'query')(y).reshape(b, t, h, d // h)  # [B, T, H, D/H]
    k = linear(d, 'key')(y).reshape(b, t, h, d // h)  # [B, T, H, D/H]
    v = linear(d, 'value')(y).reshape(b, t, h, d // h)  # [B, T, H, D/H]
    y = attention.attend(q, k, v)[0].reshape(b, t, d)  # [B, T, D]
    y = linear(d, 'output')(y)  # [B, T, D]
    x = x + _dropout(y, self._dropout_rate, is_training)

    y = _layer_norm('mlp_layer_norm')(x)  # [B, T, D]
    y = hk.Linear(self._mlp_dim, w_init=_XAVIER,
                  b_init=hk.initializers.RandomNormal(1e-6),
                  name='mlp_hidden')(y)  # [B, T, mlp_dim]
    y = _dropout(jax.nn.gelu(y, approximate=False), self._dropout_rate,
                 is_training)
    y = hk.Linear(d, w_init=_XAVIER, b_init=hk.initializers.RandomNormal(1e-6),
                  name='mlp_output')(y)  # [B, T, D]
    return x + _dropout(y, self._dropout_rate, is_training)


class ViT(hk.Module):
  """Vision Transformer over a grid or sequence of inputs -> logits [B, K].

  Defaults are ViT-B/16: D = 768, 12 layers, 12 heads, MLP 3072.
  """

  def __init__(self, *, num_classes: int, patch_size: int = 16,
               hidden_size: int = 768, num_layers: int = 12,
               num_heads: int = 12, mlp_dim: int = 3072,
               dropout_rate: float = 0.0,
               learned_position_embedding: bool = False,
               name: str | None = None):
    """Constructor.

    Args:
      num_classes: K.
      patch_size: P, patch side in grid cells (pixels, or points on a grid).
      hidden_size: D.
      num_layers: encoder blocks (12).
      num_heads: H (12).
      mlp_dim: hidden width of the MLPs (3072 = 4D).
      dropout_rate: dropout on the patch embeddings and inside every block
        (needs an rng in training when > 0).
      learned_position_embedding: add the standard learned [T, D] embedding
        (plain ViT-B); False for the Fourier-feature variants.
      name: module name.
    """
    super().__init__(name=name)
    self._num_classes = num_classes
    self._patch_size = patch_size
    self._hidden_size = hidden_size
    self._num_layers = num_layers
    self._block = dict(num_heads=num_heads, mlp_dim=mlp_dim,
                       dropout_rate=dropout_rate)
    self._dropout_rate = dropout_rate
    self._learned_position_embedding = learned_position_embedding

  def __call__(self, x: jax.Array, *, is_training: bool) -> jax.Array:
    """Classifies a grid.

    Args:
      x: [B, H, W, C] grid (or [B, M, C] sequence) of inputs ++ position
        features.
      is_training: enables dropout.

    Returns:
      logits [B, K].
    """
    d = self._hidden_size
    # Equal to a P x P stride-P convolution; LeCun-normal as in big_vision.
    w_init = hk.initializers.VarianceScaling(1.0, 'fan_in', 'truncated_normal')
    if isinstance(x, FactoredByteArray):
      # Named as hk.Linear(name='patch_embedding') names them.
      cells = self._patch_size ** (x.ndim - 2)  # P^G
      with hk.name_scope('patch_embedding'):
        w = hk.get_parameter('w', [cells * x.shape[-1], d], x.dtype,
                             init=w_init)
        bias = hk.get_parameter('b', [d], x.dtype, init=jnp.zeros)
      tokens = factored_patch_embedding(x, w, bias, self._patch_size)
    else:
      patches = patchify(x, self._patch_size)  # [B, T-1, P^G * C]
      tokens = hk.Linear(d, w_init=w_init, name='patch_embedding')(patches)
    b, num_patches, _ = tokens.shape
    cls = hk.get_parameter('class_token', [1, 1, d],
                           init=hk.initializers.RandomNormal(0.02))
    tokens = jnp.concatenate(
        [jnp.broadcast_to(cls.astype(tokens.dtype), (b, 1, d)), tokens],
        axis=1)  # [B, T, D]
    if self._learned_position_embedding:
      pos = hk.get_parameter(
          'position_embedding', [1, num_patches + 1, d],
          init=hk.initializers.RandomNormal(stddev=0.02))  # as in ViT
      tokens = tokens + pos.astype(tokens.dtype)  # [B, T, D]
    tokens = _dropout(tokens, self._dropout_rate, is_training)
    for i in range(self._num_layers):
      tokens = EncoderBlock(**self._block, name=f'encoder_block_{i}')(
          tokens, is_training=is_training)  # [B, T, D]
    tokens = _layer_norm('final_layer_norm')(tokens)  # [B, T, D]
    return hk.Linear(self._num_classes, name='head')(tokens[:, 0])  # [B, K]

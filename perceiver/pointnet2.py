"""PointNet++ baseline of paper Table 4 (ModelNet40, 91.9% top-1): the
single-scale-grouping (SSG) classification network of Qi, Yi, Su and Guibas,
"PointNet++: Deep Hierarchical Feature Learning on Point Sets in a Metric
Space" (NeurIPS 2017), and small versions of it for CPU-scale stand-ins.

Shapes:
  B  batch                          N  points of a level (P = 2,048 raw points)
  S  centroids of a level           k  neighbours per centroid
  C  per-point features             E  channels of a shared-MLP layer
  K  classes

The network is a stack of *set abstraction* (SA) levels. Each level
  1. samples S centroids from its N points by farthest point sampling,
  2. groups, around each centroid, the first k points within radius r (ball
     query), each as its coordinates relative to the centroid ++ its features,
  3. applies a shared MLP to every grouped point (1x1 convolution + BatchNorm
     + ReLU per layer) and max-pools over the k neighbours,
so N points with C features become S centroids with E features. The last
level groups all points into one (centroid at the origin, absolute
coordinates), giving a global feature that a head classifies:
  SA(S=512, r=0.2, k=32, [64, 64, 128]) -> SA(S=128, r=0.4, k=64,
  [128, 128, 256]) -> SA(all, [256, 512, 1024]) -> FC 512 -> FC 256 -> FC K,
the two hidden FC layers with BatchNorm, ReLU and dropout 0.5.

Radii are in the units of the input. The reference normalises each cloud into
the unit ball; experiments/data/modelnet40.py scales it so its largest
absolute coordinate is 1 (the cube [-1, 1]^3), so objects there are at most
sqrt(3) times larger than in the unit ball.

Parameters. As in the reference implementation (Qi's TensorFlow `tf_util`
conv2d / fully_connected), every 1x1 convolution and hidden FC layer has a
bias *and* is followed by BatchNorm with a scale and an offset (the moving
statistics are Haiku state, not parameters). Counting (in -> out: w + b + BN):
  SA1  3 -> 64 -> 64 -> 128:         384 + 4,288 + 8,576      =    13,248
  SA2  131 -> 128 -> 128 -> 256:     17,152 + 16,768 + 33,536 =    67,456
  SA3  259 -> 256 -> 512 -> 1,024:   67,072 + 132,608 + 527,360 = 727,040
  FC   1,024 -> 512 -> 256 -> 40:    525,824 + 131,840 + 10,280 = 667,944
(the output layer has no BN), so the SSG classifier on xyz with 40 classes has
1,475,688 parameters: the "1.48M" quoted for PointNet++ (SSG) in later papers'
parameter tables. tests/pointnet2_test.py checks this module's count against
the sum, layer by layer. Per-point input features (e.g. normals) widen
SA1's first layer only: + 64 per feature channel.

Sampling and grouping follow the reference CUDA kernels: farthest point
sampling starts at point 0; the ball query takes, in index order, the first k
points strictly within the radius and pads with the first of them. Both are
pure, parameter-free functions below. Consequently the network's output is
NOT invariant to every permutation of its input: which point comes first
decides the sampled centroids, and a ball with more than k points keeps its
first k by index. It is invariant, in evaluation mode, to permutations that
keep point 0 in place when no ball holds more than k points (training-mode
BatchNorm statistics also see the padding duplicates, so there it is not).

BatchNorm keeps moving statistics and the head has dropout: transform with
`hk.transform_with_state` and pass an rng in training
(experiments/modeling.build_model does both).
"""

from __future__ import annotations

from typing import Sequence

import haiku as hk
import jax
import jax.numpy as jnp


def _square_distances(a: jax.Array, b: jax.Array) -> jax.Array:
  """[B, S, 3], [B, N, 3] -> [B, S, N] squared Euclidean distances, computed
  from coordinate differences (not |a|^2 + |b|^2 - 2ab, whose cancellation
  can misjudge a point on the edge of a ball)."""
  return jnp.sum(jnp.square(a[:, :, None, :] - b[:, None, :, :]), axis=-1)


def farthest_point_sampling(points: jax.Array, num_samples: int) -> jax.Array:
  """Farthest point sampling, starting at point 0.

  Sample 0 is point 0; each next sample is the point farthest from all
  samples so far (the largest distance to its nearest sample; the lowest
  index among ties). While there are points not yet sampled, no point is
  sampled twice.

  Args:
    points: [B, N, 3].
    num_samples: S, 1 <= S <= N.

  Returns:
    int32 indices [B, S] into the N points, in sampling order.
  """
  b, n, _ = points.shape
  if not 1 <= num_samples <= n:
    raise ValueError(f'farthest_point_sampling: num_samples={num_samples} '
                     f'must be in [1, N={n}].')

  def body(i, carry):
    indices, nearest = carry  # [B, S], [B, N]
    last = jnp.take_along_axis(points, indices[:, i - 1, None, None],
                               axis=1)  # [B, 1, 3]
    d = jnp.sum(jnp.square(points - last), axis=-1)  # [B, N]
    nearest = jnp.minimum(nearest, d)  # [B, N]
    indices = indices.at[:, i].set(jnp.argmax(nearest, axis=1).astype(
        jnp.int32))
    return indices, nearest

  indices = jnp.zeros((b, num_samples), jnp.int32)  # [B, S]: sample 0 = point 0
  nearest = jnp.full((b, n), jnp.inf, points.dtype)  # [B, N]
  indices, _ = jax.lax.fori_loop(1, num_samples, body, (indices, nearest))
  return indices


def ball_query(points: jax.Array, centroids: jax.Array, radius: float,
               num_neighbours: int) -> jax.Array:
  """The first k points strictly within `radius` of each centroid.

  For each centroid: the indices, in increasing order, of the first k points
  p with |p - centroid| < radius; when fewer than k points are that close,
  the rest of the row repeats the first (lowest) index found. Every returned
  index < N is a point within the radius. A centroid with no point within
  the radius gets a row of N (one past the last point); a centroid that is
  itself one of the points never does.

  Args:
    points: [B, N, 3].
    centroids: [B, S, 3].
    radius: r > 0.
    num_neighbours: k, 1 <= k <= N.

  Returns:
    int32 indices [B, S, k].
  """
  n = points.shape[1]
  if radius <= 0:
    raise ValueError(f'ball_query: radius={radius} must be positive.')
  if not 1 <= num_neighbours <= n:
    raise ValueError(f'ball_query: num_neighbours={num_neighbours} must be in '
                     f'[1, N={n}].')
  if n >= 2**24:
    raise ValueError(f'ball_query: N={n} points; indices are ranked as '
                     'float32, exact below 2^24.')
  inside = _square_distances(centroids, points) < radius**2  # [B, S, N]
  # Indices as float32 (exact below 2^24): XLA's CPU top_k is several times
  # faster on floats than on integers.
  index = jnp.arange(n, dtype=jnp.float32)  # [N]
  candidates = jnp.where(inside, index, n)  # [B, S, N]: N marks "outside"
  # The k smallest candidates, ascending: the first k inside, then N's.
  first = (-jax.lax.top_k(-candidates, num_neighbours)[0]).astype(
      jnp.int32)  # [B, S, k]
  return jnp.where(first == n, first[..., :1], first)  # [B, S, k]


def group(points: jax.Array, features: jax.Array | None, centroids: jax.Array,
          indices: jax.Array) -> jax.Array:
  """Gathers neighbourhoods: relative coordinates ++ features.

  Args:
    points: [B, N, 3].
    features: [B, N, C], or None (C = 0).
    centroids: [B, S, 3].
    indices: [B, S, k] into the N points (all < N).

  Returns:
    [B, S, k, 3 + C]: points[indices] - centroid, then features[indices].
  """
  gather = jax.vmap(lambda x, i: x[i])  # per example: [N, ·], [S, k]
  grouped = gather(points, indices) - centroids[:, :, None, :]  # [B, S, k, 3]
  if features is None:
    return grouped
  return jnp.concatenate([grouped, gather(features, indices)],
                         axis=-1)  # [B, S, k, 3 + C]


class _DenseBN(hk.Module):
  """Linear (with bias, as the reference) -> BatchNorm -> ReLU on the last
  axis: [..., C] -> [..., E]. On grouped points this is the reference's 1x1
  convolution; BatchNorm statistics are taken over every axis but the last."""

  def __init__(self, *, channels: int, bn_decay_rate: float, bn_eps: float,
               name: str | None = None):
    super().__init__(name=name)
    self._channels = channels
    self._bn_decay_rate = bn_decay_rate
    self._bn_eps = bn_eps

  def __call__(self, x: jax.Array, *, is_training: bool) -> jax.Array:
    x = hk.Linear(self._channels, name='linear')(x)  # [..., E]
    x = hk.BatchNorm(create_scale=True, create_offset=True,
                     decay_rate=self._bn_decay_rate, eps=self._bn_eps,
                     name='batch_norm')(
                         # init must create the moving statistics, which only
                         # a training-mode call does.
                         x, is_training=is_training or hk.running_init())
    return jax.nn.relu(x)  # [..., E]


class SetAbstraction(hk.Module):
  """One set abstraction level: sample, group, shared MLP, max-pool.

  (points [B, N, 3], features [B, N, C] or None) ->
  (centroids [B, S, 3], features [B, S, E_last]).
  With num_centroids=None the level groups all N points around one centroid
  at the origin (S = 1; absolute coordinates, as the reference's group-all).
  """

  def __init__(self, *, num_centroids: int | None, radius: float | None,
               num_neighbours: int | None, mlp_channels: Sequence[int],
               bn_decay_rate: float = 0.9, bn_eps: float = 1e-5,
               name: str | None = None):
    super().__init__(name=name)
    if num_centroids is not None and (radius is None or num_neighbours is None):
      raise ValueError('SetAbstraction: a sampling level (num_centroids set) '
                       'needs radius and num_neighbours.')
    if not mlp_channels:
      raise ValueError('SetAbstraction: mlp_channels must not be empty.')
    self._num_centroids = num_centroids
    self._radius = radius
    self._num_neighbours = num_neighbours
    self._mlp_channels = tuple(mlp_channels)
    self._bn = dict(bn_decay_rate=bn_decay_rate, bn_eps=bn_eps)

  def __call__(self, points: jax.Array, features: jax.Array | None, *,
               is_training: bool) -> tuple[jax.Array, jax.Array]:
    b = points.shape[0]
    if self._num_centroids is None:
      centroids = jnp.zeros((b, 1, 3), points.dtype)  # [B, 1, 3]
      grouped = points[:, None]  # [B, 1, N, 3]
      if features is not None:
        grouped = jnp.concatenate([grouped, features[:, None]],
                                  axis=-1)  # [B, 1, N, 3 + C]
    else:
      sampled = farthest_point_sampling(points, self._num_centroids)  # [B, S]
      centroids = jnp.take_along_axis(points, sampled[..., None],
                                      axis=1)  # [B, S, 3]
      neighbours = ball_query(points, centroids, self._radius,
                              self._num_neighbours)  # [B, S, k]
      grouped = group(points, features, centroids,
                      neighbours)  # [B, S, k, 3 + C]
    h = grouped
    for i, channels in enumerate(self._mlp_channels):
      # Shared MLP: one weight for every centroid and neighbour.
      h = _DenseBN(channels=channels, **self._bn, name=f'mlp_{i}')(
          h, is_training=is_training)  # [B, S, k, E_i]
    return centroids, jnp.max(h, axis=2)  # [B, S, 3], [B, S, E_last]


class PointNet2(hk.Module):
  """PointNet++ SSG classifier: points [B, N, 3 + C] -> logits [B, K].

  Defaults are the paper's ModelNet40 network (module docstring); smaller
  centroid counts, neighbourhoods and widths give the CPU-scale versions.
  """

  def __init__(self, *, num_classes: int,
               num_centroids: Sequence[int] = (512, 128),
               radii: Sequence[float] = (0.2, 0.4),
               num_neighbours: Sequence[int] = (32, 64),
               mlp_channels: Sequence[Sequence[int]] = ((64, 64, 128),
                                                        (128, 128, 256)),
               global_mlp_channels: Sequence[int] = (256, 512, 1024),
               head_channels: Sequence[int] = (512, 256),
               dropout_rate: float = 0.5, bn_decay_rate: float = 0.9,
               bn_eps: float = 1e-5, name: str | None = None):
    """Constructor.

    Args:
      num_classes: K.
      num_centroids: S of each sampling level ((512, 128)).
      radii: ball-query radius of each level ((0.2, 0.4)), input units.
      num_neighbours: k of each level ((32, 64)).
      mlp_channels: the shared MLP of each level (((64, 64, 128),
        (128, 128, 256))).
      global_mlp_channels: the shared MLP of the final group-all level
        ((256, 512, 1024)).
      head_channels: hidden FC layers of the head ((512, 256)), each with
        BatchNorm, ReLU and dropout.
      dropout_rate: dropout after each hidden FC layer (0.5), training only.
      bn_decay_rate: decay of the BN moving statistics (0.9 = torch's 0.1
        momentum).
      bn_eps: BN epsilon.
      name: module name.
    """
    super().__init__(name=name)
    levels = (len(num_centroids), len(radii), len(num_neighbours),
              len(mlp_channels))
    if len(set(levels)) != 1:
      raise ValueError(
          f'PointNet2: num_centroids, radii, num_neighbours and mlp_channels '
          f'need one entry per level; got lengths {levels}.')
    self._num_classes = num_classes
    self._levels = tuple(zip(num_centroids, radii, num_neighbours,
                             (tuple(m) for m in mlp_channels)))
    self._global_mlp_channels = tuple(global_mlp_channels)
    self._head_channels = tuple(head_channels)
    self._dropout_rate = dropout_rate
    self._bn = dict(bn_decay_rate=bn_decay_rate, bn_eps=bn_eps)

  def __call__(self, x: jax.Array, *, is_training: bool) -> jax.Array:
    """Classifies point clouds.

    Args:
      x: [B, N, 3 + C]: xyz first, then optional per-point features.
      is_training: batch statistics and dropout in training; moving averages
        and no dropout in evaluation.

    Returns:
      logits [B, K].
    """
    if x.ndim != 3 or x.shape[-1] < 3:
      raise ValueError(f'PointNet2 expects points [B, N, 3 + C] (xyz first), '
                       f'got shape {x.shape}.')
    points = x[..., :3]  # [B, N, 3]
    features = x[..., 3:] if x.shape[-1] > 3 else None  # [B, N, C] or None
    for i, (s, r, k, mlp) in enumerate(self._levels):
      points, features = SetAbstraction(
          num_centroids=s, radius=r, num_neighbours=k, mlp_channels=mlp,
          **self._bn, name=f'sa_{i}')(
              points, features, is_training=is_training)  # [B, S, 3], [B, S, E]
    _, features = SetAbstraction(
        num_centroids=None, radius=None, num_neighbours=None,
        mlp_channels=self._global_mlp_channels, **self._bn,
        name=f'sa_{len(self._levels)}')(
            points, features, is_training=is_training)  # [B, 1, E]
    h = features[:, 0]  # [B, E]
    for i, channels in enumerate(self._head_channels):
      h = _DenseBN(channels=channels, **self._bn, name=f'fc_{i}')(
          h, is_training=is_training)  # [B, E_i]
      if is_training and self._dropout_rate > 0:
        h = hk.dropout(hk.next_rng_key(), self._dropout_rate, h)  # [B, E_i]
    return hk.Linear(self._num_classes, name='head')(h)  # [B, K]

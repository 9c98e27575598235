"""PointNet++ pinned down: farthest point sampling and ball query on hand
cases and random clouds, the SSG classifier's golden parameter count, what
its output is (and is not) invariant to, and a tiny net that learns."""

import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import modeling
from perceiver import pointnet2

SSG_PARAMS = 1_475_688  # perceiver/pointnet2.py docstring: the "1.48M"

# A tiny SSG net on 32-point clouds for the numerical tests.
TINY = dict(num_centroids=(16, 4), radii=(0.5, 1.0), num_neighbours=(32, 16),
            mlp_channels=((16, 16), (32,)), global_mlp_channels=(32,),
            head_channels=(32,), dropout_rate=0.1)

# XLA compiles the RBG generator much faster than threefry.
_key = lambda seed: jax.random.key(seed, impl='rbg')
_KEY = _key(0)


def _cloud(*shape, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


# --- Farthest point sampling --------------------------------------------------


def test_fps_hand_case():
  # On a line: start at x=0, then 10 (farthest), 5, 2, then 1 and 9 both at
  # distance 1 (the lower index first), finally 9.
  x = np.array([0., 1., 2., 10., 5., 9.], np.float32)
  line = np.stack([x, np.zeros_like(x), np.zeros_like(x)], -1)
  # The second example is the same points mirrored in index order, with a
  # different start, to check the batch axis is independent.
  points = np.stack([line, line[::-1]])
  indices = pointnet2.farthest_point_sampling(points, 6)
  assert indices.dtype == jnp.int32
  np.testing.assert_array_equal(indices[0], [0, 3, 4, 2, 1, 5])
  # Reversed: start at x=9 (index 0); farthest x=0 (5); then 5 (1), 2 (3),
  # then x=1 (index 4) and x=10 (index 2) both at 1: index 2 first.
  np.testing.assert_array_equal(indices[1], [0, 5, 1, 3, 2, 4])
  np.testing.assert_array_equal(
      pointnet2.farthest_point_sampling(points, 3), indices[:, :3])


def test_fps_is_a_permutation_and_equivariant():
  points = _cloud(2, 64, 3)
  full = np.asarray(pointnet2.farthest_point_sampling(points, 64))
  for row in full:
    assert sorted(row) == list(range(64))  # every point once
  # Relabelling the points (point 0 kept first) relabels the samples, and a
  # rigid motion changes nothing: FPS sees only distances.
  perm = np.concatenate([[0], 1 + np.random.default_rng(1).permutation(63)])
  angle = 0.7
  rotation = np.array([[np.cos(angle), -np.sin(angle), 0],
                       [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
  moved = (points[:, perm] @ rotation.T + 0.3).astype(np.float32)
  samples = np.asarray(pointnet2.farthest_point_sampling(moved, 16))
  np.testing.assert_array_equal(perm[samples], full[:, :16])


# --- Ball query ---------------------------------------------------------------


def test_ball_query_hand_case():
  x = np.array([0., 0.5, 3., 0.9, 1.0, -0.2], np.float32)
  points = np.stack([x, np.zeros_like(x), np.zeros_like(x)], -1)[None]
  centroids = np.array([[[0., 0., 0.], [3., 0., 0.], [6., 0., 0.]]],
                       np.float32)
  got = np.asarray(pointnet2.ball_query(points, centroids, 1.0, 4))
  # Around 0: indices 0, 1, 3, 5 are within 1 (x=1.0 is not strictly);
  # the first 4 by index.
  np.testing.assert_array_equal(got[0, 0], [0, 1, 3, 5])
  # Around 3: only index 2; padded with it.
  np.testing.assert_array_equal(got[0, 1], [2, 2, 2, 2])
  # Around 6: nothing within the radius: N everywhere.
  np.testing.assert_array_equal(got[0, 2], [6, 6, 6, 6])
  # k larger than the ball: the ball in index order, padded with its first.
  got = np.asarray(pointnet2.ball_query(points, centroids[:, :1], 1.0, 6))
  np.testing.assert_array_equal(got[0, 0], [0, 1, 3, 5, 0, 0])


@pytest.mark.parametrize('radius,k', [(0.3, 8), (0.8, 16), (0.05, 4)])
def test_ball_query_properties_on_random_clouds(radius, k):
  b, n, s = 3, 200, 40
  points = _cloud(b, n, 3, seed=2)
  # Half the centroids are points of the cloud, half arbitrary (some far off,
  # with empty balls).
  centroids = np.concatenate([points[:, :s // 2], 1.5 * _cloud(b, s // 2, 3)],
                             axis=1)
  got = np.asarray(pointnet2.ball_query(points, centroids, radius, k))
  assert got.shape == (b, s, k) and got.dtype == np.int32
  exact = np.linalg.norm(points[:, None].astype(np.float64)
                         - centroids[:, :, None], axis=-1)  # [B, S, N]
  for i in range(b):
    for j in range(s):
      row = got[i, j]
      inside = np.flatnonzero(exact[i, j] < radius)
      if len(inside) == 0:
        np.testing.assert_array_equal(row, n)
        assert j >= s // 2  # a centroid on a point always has itself
        continue
      # Never a point outside the radius (float32 rounding aside).
      assert (exact[i, j, row] < radius * (1 + 1e-6)).all()
      # The first k inside, by index, then the first repeated.
      m = min(k, len(inside))
      np.testing.assert_array_equal(row[:m], inside[:m])
      np.testing.assert_array_equal(row[m:], inside[0])


def test_group_is_relative_coordinates_then_features():
  points = _cloud(1, 5, 3)
  features = _cloud(1, 5, 2, seed=3)
  centroids = points[:, [4]]
  indices = np.array([[[4, 1, 1]]], np.int32)
  out = np.asarray(pointnet2.group(points, features, centroids, indices))
  assert out.shape == (1, 1, 3, 5)
  np.testing.assert_allclose(out[0, 0, :, :3],
                             points[0, [4, 1, 1]] - points[0, 4])
  np.testing.assert_array_equal(out[0, 0, :, 3:], features[0, [4, 1, 1]])
  np.testing.assert_array_equal(out[0, 0, 0, :3], 0)


def test_bad_arguments_fail_clearly():
  points = _cloud(1, 8, 3)
  with pytest.raises(ValueError, match='num_samples=9'):
    pointnet2.farthest_point_sampling(points, 9)
  with pytest.raises(ValueError, match='radius=0'):
    pointnet2.ball_query(points, points, 0, 2)
  with pytest.raises(ValueError, match='num_neighbours=9'):
    pointnet2.ball_query(points, points, 0.1, 9)
  with pytest.raises(ValueError, match='one entry per level'):
    hk.transform(lambda: pointnet2.PointNet2(num_classes=2, radii=(0.2,))
                 ).init(None)
  f = hk.transform_with_state(
      lambda x: pointnet2.PointNet2(num_classes=2)(x, is_training=True))
  with pytest.raises(ValueError, match=r'\[B, N, 3 \+ C\]'):
    jax.eval_shape(f.init, jax.random.key(0),
                   jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))


# --- The classifier -----------------------------------------------------------


def _param_shapes(x_shape, **kwargs):
  f = hk.transform_with_state(
      lambda x: pointnet2.PointNet2(**kwargs)(x, is_training=True))
  return jax.eval_shape(f.init, jax.random.key(0),
                        jax.ShapeDtypeStruct(x_shape, jnp.float32))


def test_ssg_parameter_count_layer_by_layer():
  params, state = _param_shapes((2, 1024, 3), num_classes=40)
  # (in, out) of every Linear; each but the output has a BN scale + offset.
  layers = {'sa_0/mlp_0': (3, 64), 'sa_0/mlp_1': (64, 64),
            'sa_0/mlp_2': (64, 128), 'sa_1/mlp_0': (128 + 3, 128),
            'sa_1/mlp_1': (128, 128), 'sa_1/mlp_2': (128, 256),
            'sa_2/mlp_0': (256 + 3, 256), 'sa_2/mlp_1': (256, 512),
            'sa_2/mlp_2': (512, 1024), 'fc_0': (1024, 512), 'fc_1': (512, 256)}
  expected = 0
  for name, (c_in, c_out) in layers.items():
    assert params[f'point_net2/{name}/linear']['w'].shape == (c_in, c_out)
    assert params[f'point_net2/{name}/batch_norm']['scale'].size == c_out
    expected += c_in * c_out + c_out + 2 * c_out
  assert params['point_net2/head']['w'].shape == (256, 40)
  expected += 256 * 40 + 40
  assert len(params) == 2 * len(layers) + 1
  assert modeling.count_params(params) == expected == SSG_PARAMS
  # Moving mean and variance per BN channel are state, not parameters.
  bn_channels = sum(c for _, c in layers.values())
  averages = sum(s['average'].size for s in state.values())
  assert averages == 2 * bn_channels
  # The number of input points does not change the count; each extra
  # per-point feature (e.g. a normal's component) adds one row to SA1.
  assert modeling.count_params(_param_shapes((1, 600, 3), num_classes=40)[0]
                               ) == SSG_PARAMS
  assert modeling.count_params(_param_shapes((1, 600, 6), num_classes=40)[0]
                               ) == SSG_PARAMS + 3 * 64


@functools.lru_cache(maxsize=None)
def _tiny():
  """(init, apply) of the tiny net, jitted once for every test below (XLA
  compilation dominates these tests); all calls use [16, 32, 3] clouds."""
  f = hk.transform_with_state(lambda x, is_training: pointnet2.PointNet2(
      num_classes=2, **TINY)(x, is_training=is_training))
  return (jax.jit(f.init, static_argnames='is_training'),
          jax.jit(f.apply, static_argnames='is_training'), f)


def test_invariant_to_permutations_keeping_point_zero_in_evaluation():
  init, apply, _ = _tiny()
  points = _cloud(16, 32, 3, seed=4)
  params, state = init(_KEY, points, is_training=True)
  # Non-trivial BN moving statistics: one training-mode pass.
  _, state = apply(params, state, _KEY, points, is_training=True)
  logits = lambda x: np.asarray(apply(params, state, None, x,
                                      is_training=False)[0])
  reference = logits(points)
  # TINY's balls hold up to N = 32 and then 16 = S_1 points: every ball is
  # kept whole, in any order.
  keep_first = np.concatenate([[0], 1 + np.random.default_rng(5).permutation(31)])
  np.testing.assert_allclose(logits(points[:, keep_first]), reference,
                             rtol=1e-5, atol=1e-5)
  # Moving another point first changes the sampled centroids, and the output.
  swap_first = np.concatenate([[7], np.delete(np.arange(32), 7)])
  assert np.abs(logits(points[:, swap_first]) - reference).max() > 1e-3


def test_dropout_only_in_training():
  init, apply, _ = _tiny()
  points = _cloud(16, 32, 3)
  params, state = init(_KEY, points, is_training=True)
  run = lambda rng, t: np.asarray(apply(params, state, rng, points,
                                        is_training=t)[0])
  np.testing.assert_array_equal(run(None, False), run(_key(1), False))
  assert not np.allclose(run(_key(1), True), run(_key(2), True))


def _shapes(n, rng):
  """n clouds of 32 points, label 0: on a sphere, 1: on a flat square;
  random size and rotation about z, a little noise."""
  labels = rng.integers(0, 2, n)
  v = rng.normal(size=(n, 32, 3))
  sphere = v / np.linalg.norm(v, axis=-1, keepdims=True)
  square = rng.uniform(-1, 1, (n, 32, 3)) * [1, 1, 0]
  points = np.where(labels[:, None, None] == 0, sphere, square)
  angle = rng.uniform(0, 2 * np.pi, n)
  c, s = np.cos(angle), np.sin(angle)
  rotation = np.stack([np.stack([c, -s, 0 * c], -1), np.stack([s, c, 0 * c], -1),
                       np.stack([0 * c, 0 * c, 1 + 0 * c], -1)], -2)
  points = np.einsum('npd,ned->npe', points, rotation)
  points = points * rng.uniform(0.7, 1.0, (n, 1, 1))
  points = points + 0.01 * rng.normal(size=points.shape)
  return points.astype(np.float32), labels


def test_tiny_net_learns_to_separate_two_shapes():
  init, apply, f = _tiny()
  rng = np.random.default_rng(6)
  x, y = _shapes(16, rng)
  params, state = init(_KEY, x, is_training=True)
  opt = optax.adam(3e-3)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, state, opt_state, rng, x, y):
    def loss_fn(p):
      logits, s = f.apply(p, state, rng, x, is_training=True)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, y).mean(), s
    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), state, opt_state, loss

  losses = []
  for i in range(40):
    x, y = _shapes(16, rng)
    params, state, opt_state, loss = step(params, state, opt_state, _key(i),
                                          x, y)
    losses.append(float(loss))
  assert np.isfinite(losses).all()
  # Held-out clouds, evaluation mode (moving BN statistics, no dropout).
  correct = []
  for _ in range(4):
    x, y = _shapes(16, rng)
    logits = apply(params, state, None, x, is_training=False)[0]
    correct.extend(np.argmax(logits, -1) == y)
  assert np.mean(correct) >= 0.9, (np.mean(correct), losses)
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses

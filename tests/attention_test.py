"""The CPU kernels (perceiver/cpu_kernels.py) against plain autodiff.

Each function with a custom VJP, and the plain factored projection of
perceiver/byte_array.py, is compared, in float64, with jax.grad of the same
formula written plainly (on the dense byte array), for every argument
(inputs included, though the model never needs the byte array's gradient).
"""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver import attention
from perceiver import byte_array
from perceiver import cpu_kernels


def _plain_projection(raw, pos, scale, offset, w, b):
  x = jnp.concatenate(
      [raw, jnp.broadcast_to(pos, raw.shape[:1] + pos.shape)], axis=-1)
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return ((x - mean) / jnp.sqrt(var + byte_array.LN_EPS) * scale + offset) @ w + b


def _args(*shapes, seed=0):
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return [jax.random.normal(k, s, jnp.float64) for k, s in zip(keys, shapes)]


def _assert_same_gradients(fast, plain, args):
  cotangent = _args(jax.eval_shape(plain, *args).shape, seed=7)[0]
  argnums = tuple(range(len(args)))
  grad = lambda f: jax.grad(lambda *a: jnp.vdot(f(*a), cotangent), argnums)
  want = plain(*args)
  # atol: float64 rounding of the largest output, for outputs that cancel
  # to near zero (normalized_linear sums the same terms in another order).
  np.testing.assert_allclose(fast(*args), want, rtol=1e-12,
                             atol=1e-12 * np.abs(want).max())
  for got, want in zip(grad(fast)(*args), grad(plain)(*args)):
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('widths', [None, (3, 4)])
@pytest.mark.parametrize('projection', [cpu_kernels.normalized_projection,
                                        byte_array.normalized_projection])
def test_factored_projection(widths, projection):
  with jax.enable_x64(True):
    raw, pos, scale, offset, w, b = _args((3, 5, 2), (5, 4), (6,), (6,),
                                          (6, 7), (7,))
    def fast(raw, pos, scale, offset, w, b):  # The blocks side by side again.
      blocks = [(w, b)] if widths is None else [
          (w[:, :3], b[:3]), (w[:, 3:], b[3:])]
      out = projection(byte_array.FactoredByteArray(raw, pos), scale, offset,
                       blocks)
      return jnp.concatenate(out, axis=-1)
    _assert_same_gradients(fast, _plain_projection,
                           [raw, pos, 1 + scale, offset, w, b])


@pytest.mark.parametrize('shape', [(3, 4, 6), (8, 6)])
def test_linear(shape):
  with jax.enable_x64(True):
    _assert_same_gradients(cpu_kernels.linear, lambda x, w, b: x @ w + b,
                           _args(shape, (6, 5), (5,)))


def _plain_layer_norm(x, scale, offset):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.var(x, axis=-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + byte_array.LN_EPS) * scale + offset


def _saved_like(fn, args, like):
  """How many arrays of `like`'s shape fn's VJP keeps for the backward pass."""
  residuals = jax.vjp(fn, *args)[1]
  return sum(getattr(leaf, 'shape', None) == like.shape
             for leaf in jax.tree.leaves(residuals))


def test_shared_add():
  with jax.enable_x64(True):
    for size in (3, 5000):  # Both ways of summing rows.
      x, y = _args((2, 3, size), (size,))
      _assert_same_gradients(cpu_kernels.add_shared, lambda x, y: x + y,
                             [x, y])


@pytest.mark.parametrize('size', [3, 5000])  # Both ways of summing rows.
def test_normalized_linear_keeps_only_x_hat(size):
  with jax.enable_x64(True):
    x, scale, offset, w, b = _args((2, 3, 6), (6,), (6,), (6, size), (size,))
    plain = lambda x, scale, offset, w, b: _plain_layer_norm(
        x, scale, offset) @ w + b
    args = [3 * x + 1, 1 + scale, offset, w, b]
    _assert_same_gradients(cpu_kernels.normalized_linear, plain, args)
    assert _saved_like(cpu_kernels.normalized_linear, args, x) == 1
    assert _saved_like(plain, args, x) > 1


def test_gelu_linear_keeps_only_its_input():
  with jax.enable_x64(True):
    h, w, b = _args((4, 6), (6, 5), (5,))
    plain = lambda h, w, b: jax.nn.gelu(h) @ w + b
    _assert_same_gradients(cpu_kernels.gelu_linear, plain, [3 * h, w, b])
    assert _saved_like(cpu_kernels.gelu_linear, [h, w, b], h) == 1
    assert _saved_like(plain, [h, w, b], h) > 1


def _blocks_both_ways(block, x, z):
  """(params, apply(params, z, x) for cpu_kernels False, the same for True).

  The byte array x is an argument of apply, so that it computes in the
  caller's precision."""
  def make(cpu_kernels):
    def fwd(z, x):
      if block == 'cross_shared':  # the same latents for every example
        return attention.CrossAttention(
            num_heads=2, qk_channels=6, v_channels=4,
            cpu_kernels=cpu_kernels)(z[0], x)
      if block.startswith('cross'):
        return attention.CrossAttention(
            num_heads=2, qk_channels=6, v_channels=4, cpu_kernels=cpu_kernels,
            chunk_size=3 if block == 'cross_chunked' else None)(z, x)
      qk, vc = (8, 8) if block == 'self' else (8, 4)
      return attention.SelfAttention(num_heads=2, qk_channels=qk,
                                     v_channels=vc, widening_factor=2,
                                     cpu_kernels=cpu_kernels)(z)
    return hk.without_apply_rng(hk.transform(fwd))
  plain, fast = make(False), make(True)
  params = plain.init(jax.random.key(0), z, x)
  assert jax.tree.map(np.shape, params) == jax.tree.map(
      np.shape, fast.init(jax.random.key(0), z, x))
  keys = jax.random.split(jax.random.key(1), len(jax.tree.leaves(params)))
  params = jax.tree.unflatten(jax.tree.structure(params), [
      np.asarray(p + 0.3 * jax.random.normal(k, p.shape), np.float64)
      for p, k in zip(jax.tree.leaves(params), keys)])
  return params, plain.apply, fast.apply


@pytest.mark.parametrize('block,factored', [
    ('cross', False), ('cross', True), ('cross_chunked', False),
    ('cross_chunked', True), ('cross_shared', False), ('cross_shared', True),
    ('self', False), ('self_unequal', False)])
def test_blocks_equal_with_and_without_cpu_kernels(block, factored):
  """A block's output and every parameter gradient, in float64, whichever
  path computes it (chunked: 7 inputs in chunks of 3; shared: one set of
  latents for the batch, over a factored array native.factored_attention)."""
  raw, pos, z, cotangent = _args((2, 7, 3), (7, 4), (2, 5, 8), (2, 5, 8))
  x = (byte_array.FactoredByteArray(raw, pos) if factored else
       byte_array.FactoredByteArray(raw, pos).dense())
  params, plain, fast = _blocks_both_ways(block, x, z)
  with jax.enable_x64(True):
    x, z = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (x, z))
    cotangent = jnp.asarray(cotangent, jnp.float64)
    plain, fast = jax.jit(plain), jax.jit(fast)
    np.testing.assert_allclose(fast(params, z, x), plain(params, z, x),
                               rtol=1e-12)
    grad = lambda f: jax.jit(jax.grad(
        lambda p: jnp.vdot(f(p, z, x), cotangent)))(params)
    want, got = grad(plain), grad(fast)
    for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want),
                            jax.tree.leaves(got)):
      assert np.abs(w).max() > 0 or 'key' in jax.tree_util.keystr(path)
      np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12,
                                 err_msg=jax.tree_util.keystr(path))

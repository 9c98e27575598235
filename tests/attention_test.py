"""The custom gradients of perceiver/attention.py against plain autodiff.

Each function with a custom VJP is compared, in float64, with jax.grad of the
same formula written plainly, for every argument (inputs included, though the
model never needs the byte array's gradient).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver import attention


def _plain_projection(raw, pos, scale, offset, w, b):
  x = jnp.concatenate(
      [raw, jnp.broadcast_to(pos, raw.shape[:1] + pos.shape)], axis=-1)
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return ((x - mean) / jnp.sqrt(var + attention.LN_EPS) * scale + offset) @ w + b


def _args(*shapes, seed=0):
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return [jax.random.normal(k, s, jnp.float64) for k, s in zip(keys, shapes)]


def _assert_same_gradients(fast, plain, args):
  cotangent = _args(jax.eval_shape(plain, *args).shape, seed=7)[0]
  argnums = tuple(range(len(args)))
  grad = lambda f: jax.grad(lambda *a: jnp.vdot(f(*a), cotangent), argnums)
  np.testing.assert_allclose(fast(*args), plain(*args), rtol=1e-12)
  for got, want in zip(grad(fast)(*args), grad(plain)(*args)):
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('widths', [None, (3, 4)])
def test_factored_projection(widths):
  with jax.enable_x64(True):
    raw, pos, scale, offset, w, b = _args((3, 5, 2), (5, 4), (6,), (6,),
                                          (6, 7), (7,))
    def fast(raw, pos, *p):  # The blocks side by side again.
      out = attention.normalized_projection(
          attention.FactoredByteArray(raw, pos), *p, widths=widths)
      return out if widths is None else jnp.concatenate(out, axis=-1)
    _assert_same_gradients(fast, _plain_projection,
                           [raw, pos, 1 + scale, offset, w, b])


@pytest.mark.parametrize('shape', [(3, 4, 6), (8, 6)])
def test_linear(shape):
  with jax.enable_x64(True):
    _assert_same_gradients(attention.linear, lambda x, w, b: x @ w + b,
                           _args(shape, (6, 5), (5,)))


@pytest.mark.parametrize('size', [3, 5000])  # Both ways of summing rows.
def test_shared_add_and_multiply(size):
  with jax.enable_x64(True):
    x, y = _args((2, 3, size), (size,))
    _assert_same_gradients(attention.add_shared, lambda x, y: x + y, [x, y])
    _assert_same_gradients(attention.mul_shared, lambda x, y: x * y, [x, y])

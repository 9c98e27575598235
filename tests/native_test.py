"""perceiver/native: the FFI batched matmul against XLA's dot_general, the
fused attention against the paper's attention in jax.numpy."""

import os
import subprocess
import sys

import jax
from jax import test_util as jtu
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver import native
from perceiver.native import library

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMS = [(False, False), (False, True), (True, False), (True, True)]


def _operands(lead, m, k, n, transpose_a, transpose_b, dtype, seed=0):
  ka, kb = jax.random.split(jax.random.key(seed))
  a = jax.random.normal(ka, lead + ((k, m) if transpose_a else (m, k)), dtype)
  b = jax.random.normal(kb, lead + ((n, k) if transpose_b else (k, n)), dtype)
  return a, b


def _reference(a, b, transpose_a, transpose_b):
  a = np.swapaxes(np.asarray(a, np.float64), -1, -2) if transpose_a else a
  b = np.swapaxes(np.asarray(b, np.float64), -1, -2) if transpose_b else b
  return np.matmul(np.asarray(a, np.float64), np.asarray(b, np.float64))


def test_library_builds_here():
  # The suite's machines have g++ and the wheel (scripts/setup.sh): the fast
  # path must be the one tested, not the fallback.
  assert native.available(), native.why_unavailable()


# Shapes cover: many batch elements (whole elements per thread), one element
# split by rows (m >= n) and by columns (m < n), odd sizes, rank 2 and 4.
@pytest.mark.parametrize('transpose_a,transpose_b', FORMS)
@pytest.mark.parametrize('lead,m,k,n', [((6,), 5, 7, 3), ((), 33, 17, 9),
                                        ((), 3, 11, 40), ((2, 3), 8, 4, 8)])
def test_matmul_equals_float64_product(lead, m, k, n, transpose_a,
                                       transpose_b):
  a, b = _operands(lead, m, k, n, transpose_a, transpose_b, jnp.float32)
  out = jax.jit(lambda a, b: native.matmul(
      a, b, transpose_a=transpose_a, transpose_b=transpose_b))(a, b)
  assert out.shape == lead + (m, n) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, _reference(a, b, transpose_a, transpose_b),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('transpose_a,transpose_b', FORMS)
def test_float64_gradients_are_the_products(transpose_a, transpose_b):
  with jax.enable_x64(True):
    a, b = _operands((3,), 4, 6, 5, transpose_a, transpose_b, jnp.float64)
    f = lambda a, b: native.matmul(a, b, transpose_a=transpose_a,
                                   transpose_b=transpose_b)
    np.testing.assert_allclose(jax.jit(f)(a, b),
                               _reference(a, b, transpose_a, transpose_b),
                               rtol=1e-12)
    jtu.check_grads(f, (a, b), order=2, modes=['rev'])


def test_vmap_over_one_operand():
  a, b = _operands((4,), 6, 5, 7, False, True, jnp.float32)
  f = lambda a, b: native.matmul(a, b, transpose_b=True)
  out = jax.jit(jax.vmap(f, in_axes=(0, None)))(a, b[0])  # b shared
  np.testing.assert_allclose(
      out, _reference(a, np.broadcast_to(b[0], b.shape), False, True),
      rtol=1e-5, atol=1e-5)


def test_empty_contraction_is_zeros():
  a = jnp.ones((2, 3, 0))
  b = jnp.ones((2, 0, 4))
  out = jax.jit(native.matmul)(a, b)
  np.testing.assert_array_equal(out, np.zeros((2, 3, 4), np.float32))


def test_other_dtypes_use_xla():
  a, b = _operands((2,), 4, 8, 4, False, False, jnp.bfloat16)
  out = jax.jit(native.matmul)(a, b)
  assert out.dtype == jnp.bfloat16
  assert 'perceiver_batched_matmul' not in jax.jit(native.matmul).lower(
      a, b).as_text()
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             _reference(a, b, False, False), rtol=0.05,
                             atol=0.1)


def test_mismatched_operands_name_the_problem():
  with pytest.raises(ValueError, match='contracting sizes'):
    native.matmul(jnp.ones((2, 3, 4)), jnp.ones((2, 5, 6)))
  with pytest.raises(ValueError, match='leading axes'):
    native.matmul(jnp.ones((2, 3, 4)), jnp.ones((3, 4, 6)))
  with pytest.raises(ValueError, match='2 or more axes'):
    native.matmul(jnp.ones((4,)), jnp.ones((4, 6)))


def test_hlo_flops_counts_the_calls():
  a, b = _operands((5,), 6, 7, 8, True, False, jnp.float32)
  f = lambda a, b: native.matmul(a, b, transpose_a=True) + 1.0
  compiled = jax.jit(f).lower(a, b).compile()
  assert native.hlo_flops(compiled.as_text()) == 2 * 5 * 6 * 7 * 8


# Pairs cover: a linear layer's dx = g w^T and dW = x^T g; products of other
# ranks and forms side by side (on a pool of more than two threads, also
# split into row and column blocks); an empty contraction beside a full one.
PAIRS = [
    (((), 12, 5, 7, False, True), ((), 7, 12, 5, True, False)),
    (((3,), 4, 6, 5, True, True), ((), 9, 2, 33, False, False)),
    (((), 3, 0, 4, False, False), ((2, 2), 5, 3, 6, False, True)),
]


@pytest.mark.parametrize('first,second', PAIRS)
def test_matmul_pair_equals_two_products(first, second):
  operands = [_operands(*shape, jnp.float32, seed=i)
              for i, shape in enumerate((first, second))]
  flags = dict(transpose_a1=first[-2], transpose_b1=first[-1],
               transpose_a2=second[-2], transpose_b2=second[-1])
  f = jax.jit(lambda a1, b1, a2, b2: native.matmul_pair(a1, b1, a2, b2,
                                                        **flags))
  args = operands[0] + operands[1]
  assert 'perceiver_matmul_pair_f32' in f.lower(*args).as_text()
  for out, (a, b), shape in zip(f(*args), operands, (first, second)):
    lead, m, _, n = shape[:4]
    assert out.shape == lead + (m, n) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, _reference(a, b, *shape[-2:]), rtol=1e-5,
                               atol=1e-5)


def test_matmul_pair_gradients_vmap_flops_and_fallbacks():
  with jax.enable_x64(True):
    x, w = _operands((), 4, 5, 3, False, False, jnp.float64)  # [4,5], [5,3]
    g = jax.random.normal(jax.random.key(5), (4, 3), jnp.float64)
    f = lambda x, w, g: native.matmul_pair(g, w, x, g, transpose_b1=True,
                                           transpose_a2=True)
    dx, dw = jax.jit(f)(x, w, g)
    np.testing.assert_allclose(dx, _reference(g, w, False, True), rtol=1e-12)
    np.testing.assert_allclose(dw, _reference(x, g, True, False), rtol=1e-12)
    jtu.check_grads(f, (x, w, g), order=2, modes=['rev'])
  # vmap over some operands: the others broadcast.
  a, b = _operands((4,), 6, 5, 7, False, True, jnp.float32)
  f = lambda a, b: native.matmul_pair(a, b, b, a, transpose_b1=True,
                                      transpose_b2=True)
  c1, c2 = jax.jit(jax.vmap(f, in_axes=(0, None)))(a, b[0])
  shared = np.broadcast_to(b[0], b.shape)
  np.testing.assert_allclose(c1, _reference(a, shared, False, True),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(c2, _reference(shared, a, False, True),
                             rtol=1e-5, atol=1e-5)
  # FLOPs: both products of the call.
  compiled = jax.jit(f).lower(a[0], b[0]).compile()
  assert native.hlo_flops(compiled.as_text()) == 2 * (2 * 6 * 5 * 7)
  # bfloat16, or operands of different dtypes: XLA's dots, no pair call.
  for dtypes in ((jnp.bfloat16,) * 2, (jnp.float32, jnp.bfloat16)):
    a16, b16 = a[0].astype(dtypes[0]), b[0].astype(dtypes[1])
    text = jax.jit(f).lower(a16, b16).as_text()
    assert 'perceiver_matmul_pair' not in text
    c1, _ = jax.jit(f)(a16, b16)
    np.testing.assert_allclose(np.asarray(c1, np.float32),
                               _reference(a16, b16, False, True), rtol=0.05,
                               atol=0.1)
  with pytest.raises(ValueError, match='contracting sizes'):
    native.matmul_pair(a[0], b[0], a[0], b[0])  # [6,5] x [7,5] untransposed


def _plain_attention(q, k, v, num_heads, scale):
  """Multi-head attention on [B, T, H * W] rows, as the paper writes it."""
  split = lambda x: x.reshape(x.shape[:2] + (num_heads, -1))
  weights = jax.nn.softmax(
      jnp.einsum('bnhq,bmhq->bhnm', split(q), split(k)) * scale, axis=-1)
  out = jnp.einsum('bhnm,bmhv->bnhv', weights, split(v))
  return out.reshape(out.shape[:2] + (-1,))


def _attention_operands(b, n, m, h, dq, dv, dtype, seed=3):
  keys = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(keys[0], (b, n, h * dq), dtype),
          jax.random.normal(keys[1], (b, m, h * dq), dtype),
          jax.random.normal(keys[2], (b, m, h * dv), dtype),
          jax.random.normal(keys[3], (b, n, h * dv), dtype))


# Shapes cover: several heads of unequal q/k and v widths; more keys than one
# tile of the kernel (1,024: the online softmax across tiles) and more query
# rows than one block (256); fewer (element, head) pairs than threads (the
# backward pass splits the keys and sums the parts' dq); one query.
ATTENTION_SHAPES = [(2, 5, 7, 3, 4, 6), (1, 300, 2100, 1, 10, 20),
                    (3, 40, 70, 2, 8, 8), (2, 1, 9, 2, 3, 5)]


@pytest.mark.parametrize('b,n,m,h,dq,dv', ATTENTION_SHAPES)
def test_attention_equals_plain_attention_in_float64(b, n, m, h, dq, dv):
  with jax.enable_x64(True):
    q, k, v, g = _attention_operands(b, n, m, h, dq, dv, jnp.float64)
    scale = 1.0 / np.sqrt(dq)
    fused = lambda q, k, v: native.attention(q, k, v, num_heads=h,
                                             scale=scale)
    plain = lambda q, k, v: _plain_attention(q, k, v, h, scale)
    assert 'perceiver_attention_forward_f64' in jax.jit(fused).lower(
        q, k, v).as_text()
    np.testing.assert_allclose(jax.jit(fused)(q, k, v), plain(q, k, v),
                               rtol=1e-12, atol=1e-13)
    got = jax.jit(lambda *x: jax.vjp(fused, *x)[1](g))(q, k, v)
    want = jax.vjp(plain, q, k, v)[1](g)
    for x, y in zip(got, want):
      np.testing.assert_allclose(x, y, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize('b,n,m,h,dq,dv', ATTENTION_SHAPES)
def test_attention_in_float32_is_float64_to_rounding(b, n, m, h, dq, dv):
  q, k, v, g = _attention_operands(b, n, m, h, dq, dv, jnp.float32)
  fused = lambda q, k, v: native.attention(q, k, v, num_heads=h, scale=0.3)
  out, vjp = jax.vjp(jax.jit(fused), q, k, v)
  with jax.enable_x64(True):
    wide = [np.asarray(x, np.float64) for x in (q, k, v, g)]
    plain = lambda q, k, v: _plain_attention(q, k, v, h, 0.3)
    want_out, want_vjp = jax.vjp(plain, *wide[:3])
    want = want_vjp(wide[3])
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, want_out, rtol=2e-5, atol=2e-6)
  for x, y in zip(vjp(g), want):
    np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5)


def test_self_attention_reads_and_writes_the_packed_layout():
  with jax.enable_x64(True):
    b, n, h, dq, dv = 2, 6, 2, 3, 5
    q, k, v, g = _attention_operands(b, n, n, h, dq, dv, jnp.float64)
    qkv = jnp.concatenate([q, k, v], axis=-1)
    fused = lambda qkv: native.self_attention(qkv, num_heads=h,
                                              qk_width=h * dq, scale=0.5)
    plain = lambda qkv: _plain_attention(
        qkv[..., :h * dq], qkv[..., h * dq:2 * h * dq], qkv[..., 2 * h * dq:],
        h, 0.5)
    text = jax.jit(lambda x: jax.vjp(fused, x)[1](g)).lower(qkv).as_text()
    assert 'perceiver_attention_packed_f64' in text
    np.testing.assert_allclose(jax.jit(fused)(qkv), plain(qkv), rtol=1e-12)
    got = jax.jit(lambda x: jax.vjp(fused, x)[1](g))(qkv)[0]
    np.testing.assert_allclose(got, jax.vjp(plain, qkv)[1](g)[0],
                               rtol=1e-11, atol=1e-12)


def test_attention_gradients_to_second_order():
  with jax.enable_x64(True):
    q, k, v, _ = _attention_operands(2, 3, 4, 2, 2, 3, jnp.float64)
    fused = lambda q, k, v: native.attention(q, k, v, num_heads=2, scale=0.7)
    jtu.check_grads(fused, (q, k, v), order=2, modes=['rev'])
    qkv = jnp.concatenate([q, q[::-1], q], axis=-1)
    packed = lambda x: native.self_attention(x, num_heads=2, qk_width=4)
    jtu.check_grads(packed, (qkv,), order=2, modes=['rev'])


def test_attention_under_vmap():
  q, k, v, _ = _attention_operands(3, 4, 5, 2, 3, 3, jnp.float32)
  stack = lambda x: jnp.stack([x, 2 * x])  # a mapped axis before B
  f = lambda q, k, v: native.attention(q, k, v, num_heads=2, scale=0.5)
  out = jax.jit(jax.vmap(f, in_axes=(0, 0, None)))(stack(q), stack(k), v)
  for i, scale in enumerate((1.0, 2.0)):
    np.testing.assert_allclose(
        out[i], _plain_attention(q * scale, k * scale, v, 2, 0.5), rtol=1e-5,
        atol=1e-6)


def test_attention_shapes_that_do_not_fit_name_the_problem():
  x = jnp.ones((2, 3, 8))
  with pytest.raises(ValueError, match='must be \\[B, T, W\\]'):
    native.attention(jnp.ones((3, 8)), x, x)
  with pytest.raises(ValueError, match='does not split into num_heads=3'):
    native.attention(x, x, x, num_heads=3)
  with pytest.raises(ValueError, match='needs q \\[B, N, H Dq\\]'):
    native.attention(x, jnp.ones((2, 4, 6)), jnp.ones((2, 4, 8)))
  with pytest.raises(ValueError, match='does not hold q and k'):
    native.self_attention(x, num_heads=1, qk_width=4)


def test_hlo_flops_counts_attention():
  b, n, m, h, dq, dv = 2, 5, 7, 3, 4, 6
  q, k, v, g = _attention_operands(b, n, m, h, dq, dv, jnp.float32)
  f = lambda q, k, v: native.attention(q, k, v, num_heads=h)
  forward = jax.jit(f).lower(q, k, v).compile().as_text()
  assert native.hlo_flops(forward) == 2 * b * h * n * m * (dq + dv)
  both = jax.jit(lambda *x: jax.vjp(f, *x)[1](g)).lower(
      q, k, v).compile().as_text()
  assert native.hlo_flops(both) == 2 * b * h * n * m * (
      (dq + dv) + (3 * dq + 2 * dv))
  qkv = jnp.ones((b, n, h * (2 * dq + dv)))
  packed = lambda x: native.self_attention(x, num_heads=h, qk_width=h * dq)
  text = jax.jit(lambda x: jax.vjp(packed, x)[1](g)).lower(
      qkv).compile().as_text()
  assert native.hlo_flops(text) == 2 * b * h * n * n * (4 * dq + 3 * dv)


def _factored_operands(b, n, m, c, h, d, e, dtype, seed=5):
  keys = jax.random.split(jax.random.key(seed), 11)
  r = lambda i, shape: jax.random.normal(keys[i], shape, dtype)
  return ((r(0, (n, h * d)), r(1, (b, m, c)), 0.1 * r(2, (b, m)),
           1 + 0.3 * jnp.abs(r(3, (b, m))), r(4, (m, h * d)),
           r(5, (c, h * d)), r(6, (h * d,)), r(7, (m, h * e)),
           r(8, (c, h * e)), r(9, (h * e,))), r(10, (b, n, h * e)))


def _plain_factored(q, raw, mean, inv, pk, wk, sk, pv, wv, sv, h, scale):
  """The keys and values formed, then the paper's attention."""
  centred = raw - mean[..., None]
  k = inv[..., None] * (centred @ wk + pk - mean[..., None] * sk)
  v = inv[..., None] * (centred @ wv + pv - mean[..., None] * sv)
  q = jnp.broadcast_to(q, raw.shape[:1] + q.shape)
  return _plain_attention(q, k, v, h, scale)


# Shapes cover: one head and several; more keys than one tile (512) and
# than one group of tiles per thread; one example; one raw channel.
FACTORED_SHAPES = [(2, 5, 7, 3, 1, 4, 6), (3, 8, 1300, 3, 2, 5, 4),
                   (1, 4, 600, 1, 1, 3, 3)]


@pytest.mark.parametrize('b,n,m,c,h,d,e', FACTORED_SHAPES)
def test_factored_attention_equals_attention_over_formed_keys(b, n, m, c, h,
                                                              d, e):
  with jax.enable_x64(True):
    args, g = _factored_operands(b, n, m, c, h, d, e, jnp.float64)
    fused = lambda *x: native.factored_attention(*x, num_heads=h, scale=0.4)
    plain = lambda *x: _plain_factored(*x, h, 0.4)
    np.testing.assert_allclose(jax.jit(fused)(*args), plain(*args),
                               rtol=1e-12, atol=1e-13)
    # The byte array is data: gradients of the queries and weights alone
    # run the kernel's backward pass.
    data = args[1:4]
    weights = lambda f: lambda q, *w: f(q, *data, *w)
    trainable = (args[0],) + args[4:]
    backward = jax.jit(lambda *x: jax.vjp(weights(fused), *x)[1](g))
    assert 'perceiver_factored_attention_backward_f64' in backward.lower(
        *trainable).as_text()
    for x, y in zip(backward(*trainable),
                    jax.vjp(weights(plain), *trainable)[1](g)):
      np.testing.assert_allclose(x, y, rtol=1e-11, atol=1e-12)
    # Through the byte array too (a saliency map): XLA's gradient, whole.
    for x, y in zip(jax.jit(lambda *x: jax.vjp(fused, *x)[1](g))(*args),
                    jax.vjp(plain, *args)[1](g)):
      np.testing.assert_allclose(x, y, rtol=1e-11, atol=1e-12)


def test_factored_attention_in_float32_and_to_second_order():
  args, g = _factored_operands(3, 8, 1300, 3, 2, 5, 4, jnp.float32)
  fused = lambda *x: native.factored_attention(*x, num_heads=2, scale=0.4)
  with jax.enable_x64(True):
    wide = [np.asarray(x, np.float64) for x in args]
    want = _plain_factored(*wide, 2, 0.4)
  np.testing.assert_allclose(jax.jit(fused)(*args), want, rtol=2e-5,
                             atol=2e-6)
  with jax.enable_x64(True):
    small, _ = _factored_operands(2, 3, 5, 2, 1, 2, 3, jnp.float64)
    data = small[1:4]
    f = lambda q, pk, wk: native.factored_attention(
        q, *data, pk, wk, *small[6:], num_heads=1, scale=0.4)
    jtu.check_grads(f, (small[0], small[4], small[5]), order=2,
                    modes=['rev'])


def test_factored_attention_under_vmap_and_flops():
  args, g = _factored_operands(2, 5, 7, 3, 1, 4, 6, jnp.float32)
  f = lambda *x: native.factored_attention(*x, num_heads=1, scale=0.4)
  stacked = jax.jit(jax.vmap(f, in_axes=(0,) + (None,) * 9))(
      jnp.stack([args[0], 2 * args[0]]), *args[1:])
  for i, scale in enumerate((1.0, 2.0)):
    np.testing.assert_allclose(
        stacked[i], _plain_factored(args[0] * scale, *args[1:], 1, 0.4),
        rtol=1e-5, atol=1e-6)
  b, n, m, d, e = 2, 5, 7, 4, 6
  text = jax.jit(f).lower(*args).compile().as_text()
  assert native.hlo_flops(text) == 2 * n * m * (d + b * e)
  q, data, weights = args[0], args[1:4], args[4:]
  both = jax.jit(lambda q, *w: jax.vjp(
      lambda q, *w: f(q, *data, *w), q, *w)[1](g)).lower(q, *weights)
  assert native.hlo_flops(both.compile().as_text()) == 2 * n * m * (
      (d + b * e) + (3 * d + 2 * b * e))


def test_factored_attention_shapes_that_do_not_fit_name_the_problem():
  args, _ = _factored_operands(2, 5, 7, 3, 1, 4, 6, jnp.float32)
  with pytest.raises(ValueError, match='needs q \\[N, H D\\], raw'):
    native.factored_attention(args[0][None], *args[1:])
  with pytest.raises(ValueError, match='num_heads=3'):
    native.factored_attention(*args, num_heads=3)


def _layer_norm_rows(shape, dtype, seed=7):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(3 * rng.normal(size=shape) + 1, dtype)
  return x, jnp.asarray(rng.normal(size=shape), dtype)


def _float64_layer_norm(x, g):
  """(x-hat, inv, dx) in float64 numpy: dx by the chain rule through the
  mean and the variance, not by the formula the kernel uses."""
  x, g = np.float64(x), np.float64(g)
  d = x.shape[-1]
  centered = x - x.mean(-1, keepdims=True)
  inv = 1 / np.sqrt((centered ** 2).mean(-1, keepdims=True) + 1e-5)
  x_hat = centered * inv
  # d x-hat_j / d x_i = inv (delta_ij - 1/d - x-hat_i x-hat_j / d)
  dx = inv * (g - g.sum(-1, keepdims=True) / d
              - x_hat * (g * x_hat).sum(-1, keepdims=True) / d)
  return x_hat, inv, dx


# D = 1, 15 and 17 go through the kernel's loops' scalar tails.
@pytest.mark.parametrize('shape', [(2, 3, 512), (5, 17), (4, 1, 15), (3, 1),
                                   (2, 0, 8)])
def test_layer_norm_rows_equal_float64(shape):
  for dtype, tolerance in ((jnp.float64, 1e-12), (jnp.float32, 2e-5)):
    with jax.enable_x64(dtype == jnp.float64):
      x, g = _layer_norm_rows(shape, dtype)
      x_hat, inv = jax.jit(lambda x: native.normalize(x, 1e-5))(x)
      dx = jax.jit(native.normalize_gradient)(x_hat, inv, g)
      want = _float64_layer_norm(x, g)
      for got, expected in zip((x_hat, inv, dx), want):
        assert got.dtype == dtype and got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=tolerance,
                                   atol=tolerance)
      text = jax.jit(native.normalize_gradient).lower(x_hat, inv, g).as_text()
      assert 'perceiver_layer_norm_backward' in text


def test_layer_norm_rows_gradients_to_second_order():
  with jax.enable_x64(True):
    x, g = _layer_norm_rows((2, 3, 6), jnp.float64)
    jtu.check_grads(lambda x: native.normalize(x, 1e-5), (x,), order=2,
                    modes=['rev'])
    x_hat, inv = native.normalize(x, 1e-5)
    jtu.check_grads(native.normalize_gradient, (x_hat, inv, g), order=2,
                    modes=['rev'])
    # the kernels' pair is autodiff's gradient of the normalisation
    _, vjp = jax.vjp(lambda x: native.normalize(x, 1e-5)[0], x)
    np.testing.assert_allclose(native.normalize_gradient(x_hat, inv, g),
                               vjp(g)[0], rtol=1e-12, atol=1e-12)


def test_layer_norm_rows_under_vmap_and_other_dtypes():
  x, g = _layer_norm_rows((3, 4, 9), jnp.float32)
  stacked = jnp.stack([x, 2 * x + 1])
  x_hat, inv = jax.jit(jax.vmap(lambda x: native.normalize(x, 1e-5)))(stacked)
  dx = jax.jit(jax.vmap(native.normalize_gradient, in_axes=(0, 0, None)))(
      x_hat, inv, g)
  for i in range(2):
    want = _float64_layer_norm(stacked[i], g)
    for got, expected in zip((x_hat[i], inv[i], dx[i]), want):
      np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)
  for y in (x.astype(jnp.bfloat16), x[0, 0]):  # XLA's: bf16, one axis
    text = jax.jit(lambda y: native.normalize(y, 1e-5)).lower(y).as_text()
    assert 'perceiver_layer_norm' not in text
    np.testing.assert_allclose(
        np.float32(native.normalize(y, 1e-5)[0]),
        _float64_layer_norm(np.float32(y), np.float32(y))[0], atol=0.05)


def test_layer_norm_rows_shapes_that_do_not_fit_name_the_problem():
  x, g = _layer_norm_rows((2, 3, 4), jnp.float32)
  x_hat, inv = native.normalize(x, 1e-5)
  with pytest.raises(ValueError, match='inv \\[..., 1\\]; got'):
    native.normalize_gradient(x_hat, inv[..., 0], g)
  with pytest.raises(ValueError, match='must be \\[..., D\\]'):
    native.normalize_gradient(x_hat, inv, g[:, :2])


def _run(code: str, **env):
  return subprocess.run(
      [sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
      timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu', **env},
      check=False)


_FALLBACK_CHECK = '''
import jax.numpy as jnp, numpy as np
from perceiver import native
out = native.matmul(jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5)))
np.testing.assert_allclose(out, 4.0)
print('available', native.available(), native.why_unavailable())
'''


def test_turned_off_falls_back_to_xla():
  result = _run(_FALLBACK_CHECK, PERCEIVER_NATIVE='0')
  assert result.returncode == 0, result.stderr
  assert 'available False PERCEIVER_NATIVE=0' in result.stdout


def test_failed_build_warns_once_and_falls_back(tmp_path):
  result = _run(_FALLBACK_CHECK, CXX='/bin/false',
                PERCEIVER_NATIVE_CACHE=str(tmp_path))
  assert result.returncode == 0, result.stderr
  assert 'available False /bin/false failed on batched_matmul.cc' in (
      result.stdout)
  assert result.stderr.count('perceiver.native unavailable') == 1
  assert not list(tmp_path.glob('*.so'))  # nothing half-written is kept


def test_build_is_cached_by_source_and_toolchain(tmp_path):
  code = 'from perceiver import native; print(native.build())'
  first = _run(code, PERCEIVER_NATIVE_CACHE=str(tmp_path))
  assert first.returncode == 0, first.stderr
  path = first.stdout.strip()
  assert os.path.dirname(path) == str(tmp_path) and os.path.exists(path)
  mtime = os.path.getmtime(path)
  again = _run(code, PERCEIVER_NATIVE_CACHE=str(tmp_path))
  assert again.stdout.strip() == path and os.path.getmtime(path) == mtime


def test_blas_choice_follows_the_setting_and_the_processor():
  choice = library.blas_choice
  assert choice('auto', 'GenuineIntel', True) == 'mkl'
  assert choice('auto', 'AuthenticAMD', True) == 'openblas'
  assert choice('auto', 'GenuineIntel', False) == 'openblas'
  assert choice('mkl', 'AuthenticAMD', True) == 'mkl'
  assert choice('mkl', 'GenuineIntel', False) == 'openblas'
  assert choice('openblas', 'GenuineIntel', True) == 'openblas'
  with pytest.raises(native.BuildError,
                     match="PERCEIVER_BLAS='MKL': expected one of auto, "
                           'openblas, mkl'):
    choice('MKL', 'GenuineIntel', True)


_BLAS_CHECK = '''
import jax.numpy as jnp, numpy as np
from perceiver import native
rng = np.random.default_rng(0)
for dtype, rtol in ((np.float32, 2e-5), (np.float64, 1e-13)):
  a = rng.standard_normal((3, 90, 70)).astype(dtype)
  b = rng.standard_normal((3, 50, 90)).astype(dtype)
  want = np.einsum('gkm,gnk->gmn', a.astype(np.float64), b.astype(np.float64))
  got = native.matmul(jnp.asarray(a), jnp.asarray(b), transpose_a=True,
                      transpose_b=True)
  assert got.dtype == dtype, got.dtype
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * 10)
print('blas', native.blas())
'''


@pytest.mark.parametrize('setting', ['openblas', 'mkl'])
def test_each_blas_computes_the_products(setting):
  if setting == 'mkl' and library.mkl_path() is None:
    pytest.skip('the mkl wheel is not installed here')
  result = _run(_BLAS_CHECK, PERCEIVER_BLAS=setting, JAX_ENABLE_X64='1')
  assert result.returncode == 0, result.stderr
  assert f'blas {setting}' in result.stdout


def test_unknown_blas_setting_names_the_problem():
  result = _run(_FALLBACK_CHECK, PERCEIVER_BLAS='fast')
  assert result.returncode == 0, result.stderr
  assert ("available False PERCEIVER_BLAS='fast': expected one of auto, "
          'openblas, mkl') in result.stdout
  assert result.stderr.count('perceiver.native unavailable') == 1


_SHARDED_CHECK = '''
import re
import haiku as hk, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import perceiver
from perceiver import native
assert jax.device_count() == 8 and native.available()
mesh = Mesh(np.array(jax.devices()), ('data',))
put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
op = lambda x, t: np.swapaxes(x, -1, -2) if t else x
ref = lambda a, b, ta, tb: np.float64(op(a, ta)) @ np.float64(op(b, tb))
calls = lambda text: re.findall(r'= f32\\[([\\d,]*)\\]\\S* custom-call', text)
ka, kb = jax.random.split(jax.random.key(0))
for ta in (False, True):
  for tb in (False, True):
    a = jax.random.normal(ka, (8, 3) + ((5, 6) if ta else (6, 5)))
    b = jax.random.normal(kb, (8, 3) + ((4, 5) if tb else (5, 4)))
    f = jax.jit(lambda a, b: native.matmul(a, b, transpose_a=ta,
                                           transpose_b=tb))
    args = put(a, 'data'), put(b, 'data')
    np.testing.assert_allclose(f(*args), ref(a, b, ta, tb), rtol=1e-5,
                               atol=1e-5)
    text = f.lower(*args).compile().as_text()
    # each device multiplies its own batch element, nothing is gathered
    assert calls(text) == ['1,3,6,4'] and 'all-gather' not in text, text
# Shardings not over a mesh (HLO shardings): the whole product everywhere
from jax._src import sharding_impls
hlo = sharding_impls.GSPMDSharding(
    jax.devices(), NamedSharding(mesh, P('data'))._to_xla_hlo_sharding(3))
a, b = jax.random.normal(ka, (8, 6, 5)), jax.random.normal(kb, (8, 5, 4))
f = jax.jit(native.matmul, in_shardings=(hlo, hlo))
np.testing.assert_allclose(f(a, b), ref(a, b, False, False), rtol=1e-5,
                           atol=1e-5)
# x^T g over the batch's rows: each device its rows, then one sum
x = jax.random.normal(ka, (16, 5))
g = jax.random.normal(kb, (16, 3))
f = jax.jit(lambda x, g: native.matmul(x, g, transpose_a=True))
args = put(x, 'data'), put(g, 'data')
np.testing.assert_allclose(f(*args), ref(x, g, True, False), rtol=1e-5,
                           atol=1e-5)
text = f.lower(*args).compile().as_text()
assert 'all-reduce' in text and 'all-gather' not in text, text
# A linear layer's dx = g w^T and dW = x^T g as one pair call: each device
# its rows of both, then one sum for dW
w = jax.random.normal(kb, (5, 3))
f = jax.jit(lambda x, w, g: native.matmul_pair(
    g, w, x, g, transpose_b1=True, transpose_a2=True))
args = put(x, 'data'), put(w), put(g, 'data')
dx, dw = f(*args)
np.testing.assert_allclose(dx, ref(g, w, False, True), rtol=1e-5, atol=1e-5)
np.testing.assert_allclose(dw, ref(x, g, True, False), rtol=1e-5, atol=1e-5)
assert dx.sharding.spec[0] == 'data', dx.sharding
text = f.lower(*args).compile().as_text()
assert 'perceiver_matmul_pair_f32' in text, text
assert 'all-reduce' in text and 'all-gather' not in text, text
# vmap and gradients through the sharded call
w = jax.random.normal(kb, (5, 3))
f = jax.jit(jax.vmap(native.matmul, in_axes=(0, None)))
np.testing.assert_allclose(f(put(x.reshape(8, 2, 5), 'data'), put(w)),
                           ref(x, w, False, False).reshape(8, 2, 3),
                           rtol=1e-5, atol=1e-5)
loss = lambda x, w: jnp.sum(jnp.sin(native.matmul(x, w)))
grad = jax.grad(loss, argnums=(0, 1))
for got, want in zip(jax.jit(grad)(put(x, 'data'), put(w)), grad(x, w)):
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
# A cpu_kernels Perceiver's gradient over 8 devices, in float64: the same
# numbers, and each device does the products of one device with its two
# examples (an eighth of the per-example work; the batch-independent work,
# such as the first cross-attend's queries from the shared latents, once).
jax.config.update('jax_enable_x64', True)
model = hk.transform(lambda x: perceiver.Perceiver(
    num_classes=3, num_latents=8, latent_channels=16, num_blocks=2,
    num_self_attends_per_block=1, num_self_heads=2,
    cpu_kernels=True)(x, is_training=True))
x = jax.random.normal(ka, (16, 32, 5), jnp.float64)
params = jax.tree.map(lambda p: p.astype(jnp.float64), model.init(kb, x))
grad = jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(model.apply(p, None,
                                                                   x)))))
def run(devices, x):
  mesh = Mesh(np.array(devices), ('data',))
  args = (jax.device_put(params, NamedSharding(mesh, P())),
          jax.device_put(x, NamedSharding(mesh, P('data'))))
  text = grad.lower(*args).compile().as_text()
  return native.hlo_flops(text), grad(*args), text
flops_1, grads_1, _ = run(jax.devices()[:1], x)
flops_8, grads_8, text_8 = run(jax.devices(), x)
flops_two, _, _ = run(jax.devices()[:1], x[:2])
assert 0 < flops_two == flops_8 < flops_1 / 7, (flops_two, flops_8, flops_1)
# the attention kernels ran on each device's own examples, nothing gathered
assert 'perceiver_attention_packed_f64' in text_8
assert 'perceiver_layer_norm_backward_f64' in text_8
assert 'perceiver_matmul_pair_f64' in text_8
assert 'all-gather' not in text_8, text_8
for got, want in zip(jax.tree.leaves(grads_8), jax.tree.leaves(grads_1)):
  assert got.dtype == jnp.float64
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
# Over a factored byte array, the first cross-attend's kernel: its gradients
# (all of shared operands) summed over the devices.
from perceiver import byte_array
pos = jax.random.normal(kb, (32, 2), jnp.float64)
factored = lambda x: byte_array.FactoredByteArray(x[..., :3], pos)
grad = jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(model.apply(
    p, None, factored(x))))))
flops_1, grads_1, _ = run(jax.devices()[:1], x)
flops_8, grads_8, text_8 = run(jax.devices(), x)
assert 'perceiver_factored_attention_backward_f64' in text_8
assert 'all-gather' not in text_8, text_8
for got, want in zip(jax.tree.leaves(grads_8), jax.tree.leaves(grads_1)):
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
print('ok')
'''


def test_sharded_operands_are_multiplied_where_they_lie():
  # Under jax.jit over a mesh (experiments/parallel.py), XLA cannot see into
  # the FFI call: without the partitioning rule every device computed the
  # whole product (8x the work on 8 devices).
  result = _run(_SHARDED_CHECK,
                XLA_FLAGS='--xla_force_host_platform_device_count=8')
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith('ok')

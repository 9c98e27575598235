"""The Perceiver against an independent numpy reading of the paper.

The reference below is written from the paper's architecture alone (paper
section 3.1, docs/paper.md: pre-LN blocks, 1-head
cross-attend with Q/K/V width C, 8-head latent self-attention, MLP widening 1,
GELU, mean over latents then a linear head, the v2 weight-sharing scheme) and
evaluated in float64 from the model's own parameters, with jax.numpy so that
it can be differentiated too. Every speed change to perceiver/ (the CPU
kernels included) must keep the Haiku model's outputs and parameter gradients
equal to it, with `cpu_kernels` on and off.
"""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import perceiver


def _ln(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / jnp.sqrt(var + 1e-5) * p['scale'] + p['offset']


def _linear(x, p):
  return x @ p['w'] + p['b']


def _gelu(x):  # tanh approximation, as jax.nn.gelu's default
  return 0.5 * x * (1 + jnp.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _mlp(z, params, scope):
  h = _ln(z, params[f'{scope}/mlp/layer_norm'])
  h = _gelu(_linear(h, params[f'{scope}/mlp/hidden']))
  return z + _linear(h, params[f'{scope}/mlp/output'])


def _attention(q, k, v, heads):
  """q [N, W], k [M, W], v [M, V] -> [N, V], `heads` heads, softmax over M."""
  out = []
  for qh, kh, vh in zip(jnp.split(q, heads, -1), jnp.split(k, heads, -1),
                        jnp.split(v, heads, -1)):
    logits = qh @ kh.T / np.sqrt(qh.shape[-1])
    w = jnp.exp(logits - logits.max(-1, keepdims=True))
    out.append((w / w.sum(-1, keepdims=True)) @ vh)
  return jnp.concatenate(out, -1)


def _cross_attend(z, x, params, scope):
  q = _linear(_ln(z, params[f'{scope}/query_layer_norm']), params[f'{scope}/query'])
  xn = _ln(x, params[f'{scope}/input_layer_norm'])
  k, v = _linear(xn, params[f'{scope}/key']), _linear(xn, params[f'{scope}/value'])
  z = z + _linear(_attention(q, k, v, 1), params[f'{scope}/output'])
  return _mlp(z, params, scope)


def _self_attend(z, params, scope, heads):
  zn = _ln(z, params[f'{scope}/layer_norm'])
  q, k, v = (_linear(zn, params[f'{scope}/{n}']) for n in ('query', 'key', 'value'))
  z = z + _linear(_attention(q, k, v, heads), params[f'{scope}/output'])
  return _mlp(z, params, scope)


def reference_logits(params, x, *, blocks, layers, heads, shared):
  """The paper's classifier on [B, M, C] inputs; float64 whatever it is given
  (run it under `jax.enable_x64`)."""
  params = {k: {n: jnp.asarray(v, jnp.float64) for n, v in d.items()}
            for k, d in params.items()}
  out = []
  for example in jnp.asarray(x, jnp.float64):
    z = params['perceiver']['latents']
    for i in range(blocks):
      cross = (('cross_attend_first' if i == 0 else 'cross_attend_shared')
               if shared else f'cross_attend_{i}')
      z = _cross_attend(z, example, params, f'perceiver/{cross}')
      latent = 'latent_transformer' if shared else f'latent_transformer_{i}'
      for j in range(layers):
        z = _self_attend(z, params, f'perceiver/{latent}/self_attend_{j}', heads)
    out.append(_linear(z.mean(0), params['perceiver/head']))
  return jnp.stack(out)


BLOCKS, LAYERS, HEADS = 3, 2, 4


def _model_and_params(shared, chunk_size, cpu_kernels=True):
  f = hk.transform(lambda x: perceiver.Perceiver(
      num_classes=6, num_latents=8, latent_channels=32, num_blocks=BLOCKS,
      num_self_attends_per_block=LAYERS, num_self_heads=HEADS,
      share_weights=shared, cross_attend_chunk_size=chunk_size,
      cpu_kernels=cpu_kernels)(x, is_training=False))
  x = jax.random.normal(jax.random.key(0), (2, 23, 12))
  params = f.init(jax.random.key(1), x)
  # Non-trivial LayerNorm scales/offsets and head.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = jax.tree.unflatten(tree, [
      p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  return f, params, x


@pytest.mark.parametrize('cpu_kernels', [True, False])
@pytest.mark.parametrize('shared', [True, False])
@pytest.mark.parametrize('chunk_size', [None, 7])
def test_model_equals_numpy_reference(shared, chunk_size, cpu_kernels):
  f, params, x = _model_and_params(shared, chunk_size, cpu_kernels)
  got = np.asarray(jax.jit(f.apply)(params, None, x))
  with jax.enable_x64(True):
    want = np.asarray(reference_logits(params, x, blocks=BLOCKS, layers=LAYERS,
                                       heads=HEADS, shared=shared))
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize('chunk_size,factored,cpu_kernels', [
    (None, False, True), (None, True, True), (7, False, True), (7, True, True),
    (None, True, False), (7, True, False)])
def test_parameter_gradients_equal_reference_gradients(chunk_size, factored,
                                                       cpu_kernels):
  """The gradients (with the CPU kernels: linear, add_shared, layer_norm, the
  factored projection; chunked attention; and plain autodiff) against
  float64 autodiff of the paper."""
  f, params, x = _model_and_params(True, chunk_size, cpu_kernels)
  # The model sees the last 5 channels as position features shared by the
  # batch (the reference sees the same numbers as one dense array).
  x = x.at[1, :, 7:].set(x[0, :, 7:])
  inputs = (perceiver.FactoredByteArray(x[..., :7], x[0, :, 7:]) if factored
            else x)
  weights = jax.random.normal(jax.random.key(3), (2, 6))
  loss = lambda logits: jnp.sum(weights * jnp.sin(logits))
  got = jax.jit(jax.grad(lambda p: loss(f.apply(p, None, inputs))))(params)
  with jax.enable_x64(True):
    want = jax.grad(lambda p: loss(reference_logits(
        p, x, blocks=BLOCKS, layers=LAYERS, heads=HEADS, shared=True)))(
            jax.tree.map(lambda p: np.asarray(p, np.float64), params))
    want = jax.tree.map(np.asarray, want)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  top = max(float(np.abs(w).max()) for w in jax.tree.leaves(want))
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got),
                          jax.tree.leaves(want)):
    name, scale = jax.tree_util.keystr(path), float(np.abs(w).max())
    if scale < 1e-9 * top:
      # Zero in exact arithmetic (the key biases: a softmax ignores a shift
      # of all its logits); float32 leaves rounding noise only.
      assert 'key' in name and np.abs(g).max() < 1e-4 * top, name
      continue
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-4 * scale,
                               err_msg=name)

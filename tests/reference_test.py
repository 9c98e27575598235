"""The Perceiver against an independent numpy reading of the paper.

The reference below is written from PAPER.md section 1 alone (pre-LN blocks,
1-head cross-attend with Q/K/V width C, 8-head latent self-attention, MLP
widening 1, GELU, mean over latents then a linear head, the v2 weight-sharing
scheme) and evaluated in float64 from the model's own parameters. Every speed
change to perceiver/ must keep the Haiku model equal to it.
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
  return (x - mu) / np.sqrt(var + 1e-5) * p['scale'] + p['offset']


def _linear(x, p):
  return x @ p['w'] + p['b']


def _gelu(x):  # tanh approximation, as jax.nn.gelu's default
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _mlp(z, params, scope):
  h = _ln(z, params[f'{scope}/mlp/layer_norm'])
  h = _gelu(_linear(h, params[f'{scope}/mlp/hidden']))
  return z + _linear(h, params[f'{scope}/mlp/output'])


def _attention(q, k, v, heads):
  """q [N, W], k [M, W], v [M, V] -> [N, V], `heads` heads, softmax over M."""
  out = []
  for qh, kh, vh in zip(np.split(q, heads, -1), np.split(k, heads, -1),
                        np.split(v, heads, -1)):
    logits = qh @ kh.T / np.sqrt(qh.shape[-1])
    w = np.exp(logits - logits.max(-1, keepdims=True))
    out.append((w / w.sum(-1, keepdims=True)) @ vh)
  return np.concatenate(out, -1)


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
  params = {k: {n: np.asarray(v, np.float64) for n, v in d.items()}
            for k, d in params.items()}
  out = []
  for example in np.asarray(x, np.float64):
    z = params['perceiver']['latents']
    for i in range(blocks):
      cross = (('cross_attend_first' if i == 0 else 'cross_attend_shared')
               if shared else f'cross_attend_{i}')
      z = _cross_attend(z, example, params, f'perceiver/{cross}')
      latent = 'latent_transformer' if shared else f'latent_transformer_{i}'
      for j in range(layers):
        z = _self_attend(z, params, f'perceiver/{latent}/self_attend_{j}', heads)
    out.append(_linear(z.mean(0), params['perceiver/head']))
  return np.stack(out)


@pytest.mark.parametrize('shared', [True, False])
@pytest.mark.parametrize('chunk_size', [None, 7])
def test_model_equals_numpy_reference(shared, chunk_size):
  blocks, layers, heads = 3, 2, 4
  f = hk.transform(lambda x: perceiver.Perceiver(
      num_classes=6, num_latents=8, latent_channels=32, num_blocks=blocks,
      num_self_attends_per_block=layers, num_self_heads=heads,
      share_weights=shared, cross_attend_chunk_size=chunk_size)(
          x, is_training=False))
  x = jax.random.normal(jax.random.key(0), (2, 23, 12))
  params = f.init(jax.random.key(1), x)
  # Non-trivial LayerNorm scales/offsets and head.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = jax.tree.unflatten(tree, [
      p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  got = np.asarray(jax.jit(f.apply)(params, None, x))
  want = reference_logits(params, x, blocks=blocks, layers=layers, heads=heads,
                          shared=shared)
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)

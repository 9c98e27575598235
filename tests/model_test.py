"""The Perceiver pinned to the paper: parameters, FLOPs, sharing, invariances."""

import os
import subprocess
import sys
import textwrap

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs.imagenet
import perceiver
from experiments.tools import flops
from experiments import modeling

SMALL = dict(num_classes=5, num_latents=8, latent_channels=16, num_blocks=3,
             num_self_attends_per_block=2, num_self_heads=4)


def _perceiver(inputs, return_attention=False, **kwargs):
  f = hk.transform(lambda x: perceiver.Perceiver(**{**SMALL, **kwargs})(
      x, is_training=False, return_attention=return_attention))
  params = f.init(jax.random.key(0), inputs)
  # Non-trivial LayerNorm scales and offsets.
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(
      jax.random.key(1), p.shape), params)
  return f, params


def _num_params(params):
  return sum(p.size for p in jax.tree.leaves(params))


def test_imagenet_golden_parameter_count_is_the_papers():
  params = modeling.param_shapes(configs.imagenet.get_config())
  n = modeling.count_params(params)
  assert n == 44_912_254
  assert abs(n - 44.9e6) / 44.9e6 < 1e-3


def test_imagenet_flops_match_paper_and_xla_without_sharing():
  config = configs.imagenet.get_config()
  params = modeling.param_shapes(config)
  model = modeling.build_counting_model(config)
  fwd = lambda p, x: model.apply(p, {}, None, x, is_training=False)[0]
  x = modeling.example_inputs(config)
  total, per_module = flops.count_flops(fwd, params, x)
  assert abs(total - 707.2e9) / 707.2e9 < 0.01
  # Shared cross-attends 2..8 account for 7 of the 8 applications.
  shared = sum(v for k, v in per_module.items() if 'cross_attend_shared' in k)
  first = sum(v for k, v in per_module.items() if 'cross_attend_first' in k)
  assert shared == pytest.approx(7 * first, rel=1e-6)
  # Without sharing XLA has no repeated work to eliminate: the counts agree.
  config.model.share_weights = False
  params = modeling.param_shapes(config)
  model = modeling.build_counting_model(config)
  fwd = lambda p, x: model.apply(p, {}, None, x, is_training=False)[0]
  assert flops.count_flops(fwd, params, x)[0] == pytest.approx(total, rel=1e-9)
  assert flops.xla_flops(fwd, params, x) == pytest.approx(total, rel=0.01)


def test_parameter_count_independent_of_repeats_when_shared():
  x = jnp.zeros((1, 10, 6))
  counts = [_num_params(_perceiver(x, num_blocks=r)[1]) for r in (2, 3, 8)]
  assert counts[0] == counts[1] == counts[2]
  # One block has no shared cross-attend; unshared models grow per block.
  assert _num_params(_perceiver(x, num_blocks=1)[1]) < counts[0]
  unshared = [_num_params(_perceiver(x, num_blocks=r, share_weights=False)[1])
              for r in (1, 2, 4)]
  assert unshared[2] - unshared[1] == 2 * (unshared[1] - unshared[0]) > 0
  # Two unshared blocks = two shared blocks + a second latent Transformer.
  _, shared_params = _perceiver(x, num_blocks=2)
  latent = sum(p.size for k, v in shared_params.items()
               if 'latent_transformer' in k for p in v.values())
  assert latent > 0 and unshared[1] == counts[0] + latent


def test_sharing_structure():
  x = jnp.zeros((1, 10, 6))
  _, shared = _perceiver(x, num_blocks=4)
  top = {k.split('/')[1] for k in shared if '/' in k}
  assert top == {'cross_attend_first', 'cross_attend_shared',
                 'latent_transformer', 'head'}
  _, unshared = _perceiver(x, num_blocks=4, share_weights=False)
  top = {k.split('/')[1] for k in unshared if '/' in k}
  assert top == ({f'cross_attend_{i}' for i in range(4)} |
                 {f'latent_transformer_{i}' for i in range(4)} | {'head'})


def test_output_invariant_to_permuting_inputs_without_position_features():
  x = jax.random.normal(jax.random.key(2), (2, 30, 6))
  f, params = _perceiver(x)
  perm = np.random.default_rng(0).permutation(30)
  out = f.apply(params, None, x)
  out_perm = f.apply(params, None, x[:, perm])
  assert float(jnp.abs(out).max()) > 1e-3
  np.testing.assert_allclose(out, out_perm, rtol=1e-4, atol=1e-5)


def test_position_features_break_permutation_invariance():
  images = jax.random.normal(jax.random.key(3), (1, 6, 6, 1))
  def fwd(x):
    b = perceiver.ImagePreprocessor(input_channels=1, num_bands=3,
                                    max_resolution=(6, 6))(x)
    return perceiver.Perceiver(**SMALL)(b, is_training=False)
  f = hk.transform(fwd)
  params = f.init(jax.random.key(0), images)
  params = jax.tree.map(lambda p: p + 0.1, params)
  perm = np.random.default_rng(0).permutation(36)
  shuffled = images.reshape(1, 36, 1)[:, perm].reshape(1, 6, 6, 1)
  assert not np.allclose(f.apply(params, None, images),
                         f.apply(params, None, shuffled), atol=1e-4)


def test_cross_attention_logits_returned_for_every_block():
  x = jax.random.normal(jax.random.key(4), (2, 30, 6))
  f, params = _perceiver(x, return_attention=True)
  logits, maps = f.apply(params, None, x)
  assert logits.shape == (2, 5)
  assert len(maps) == 3 and all(m.shape == (2, 1, 8, 30) for m in maps)
  # Shared cross-attends see different latents, so their maps differ.
  assert not np.allclose(maps[1], maps[2])


def test_arrangements_and_stacks_of_cross_attends_only():
  x = jax.random.normal(jax.random.key(5), (1, 12, 6))
  f_int, p_int = _perceiver(x, cross_attend_arrangement='interleaved')
  f_start, p_start = _perceiver(x, cross_attend_arrangement='start')
  assert jax.tree.map(jnp.shape, p_int) == jax.tree.map(jnp.shape, p_start)
  assert not np.allclose(f_int.apply(p_int, None, x),
                         f_start.apply(p_int, None, x))
  # Table 5: L = 0, no sharing: only cross-attends.
  f0, p0 = _perceiver(x, num_self_attends_per_block=0, share_weights=False,
                      num_blocks=4)
  assert not any('latent_transformer' in k for k in p0)
  assert f0.apply(p0, None, x).shape == (1, 5)
  with pytest.raises(ValueError, match='arrangement'):
    _perceiver(x, cross_attend_arrangement='middle')


def test_cross_attend_width_defaults_to_smaller_input_width():
  x = jnp.zeros((1, 10, 6))
  _, params = _perceiver(x)
  assert params['perceiver/cross_attend_first/query']['w'].shape == (16, 6)
  assert params['perceiver/cross_attend_first/key']['w'].shape == (6, 6)
  assert params['perceiver/cross_attend_first/output']['w'].shape == (6, 16)
  assert params['perceiver']['latents'].shape == (8, 16)
  # Latents: truncated normal std 0.02, cut at 2 std; head zero-initialised.
  f = hk.transform(lambda x: perceiver.Perceiver(
      **{**SMALL, 'num_latents': 512, 'latent_channels': 64})(
          x, is_training=False))
  p = f.init(jax.random.key(0), x)
  lat = p['perceiver']['latents']
  assert float(jnp.abs(lat).max()) <= 0.04 + 1e-6
  assert float(lat.std()) == pytest.approx(0.02 * 0.88, rel=0.1)
  assert float(jnp.abs(p['perceiver/head']['w']).min()) >= 0  # default init
  assert float(jnp.abs(p['perceiver/head']['w']).max()) > 0


def test_chunked_cross_attention_equals_plain_with_gradients():
  x = jax.random.normal(jax.random.key(6), (2, 37, 6))
  f, params = _perceiver(x)
  f_chunk = hk.transform(lambda x: perceiver.Perceiver(
      **SMALL, cross_attend_chunk_size=8)(x, is_training=False))
  assert jax.tree.map(jnp.shape, f_chunk.init(jax.random.key(0), x)) == \
      jax.tree.map(jnp.shape, params)
  loss = lambda fn: lambda p: jnp.sum(jnp.sin(fn.apply(p, None, x)))
  np.testing.assert_allclose(f_chunk.apply(params, None, x),
                             f.apply(params, None, x), rtol=1e-5, atol=1e-5)
  g_plain = jax.grad(loss(f))(params)
  g_chunk = jax.jit(jax.grad(loss(f_chunk)))(params)
  for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_chunk)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_remat_changes_nothing_but_memory():
  x = jax.random.normal(jax.random.key(7), (2, 12, 6))
  f, params = _perceiver(x)
  f_remat = hk.transform(lambda x: perceiver.Perceiver(
      **SMALL, remat_latent_blocks=True)(x, is_training=False))
  loss = lambda fn: lambda p: jnp.sum(fn.apply(p, None, x) ** 2)
  for a, b in zip(jax.tree.leaves(jax.grad(loss(f))(params)),
                  jax.tree.leaves(jax.grad(loss(f_remat))(params))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_wrong_rank_is_a_clear_error():
  with pytest.raises(ValueError, match=r'byte array \[B, M, C\].*rank 2'):
    _perceiver(jnp.zeros((10, 6)))


def test_forward_pass_jitted_on_eight_cpu_devices():
  code = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np, haiku as hk
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import perceiver
    assert jax.device_count() == 8, jax.devices()
    f = hk.transform(lambda x: perceiver.Perceiver(
        num_classes=3, num_latents=4, latent_channels=8, num_blocks=2,
        num_self_attends_per_block=1, num_self_heads=2)(x, is_training=False))
    x = jax.random.normal(jax.random.key(0), (16, 10, 5))
    params = f.init(jax.random.key(1), x)
    params = jax.tree.map(lambda p: p + 0.1, params)
    mesh = Mesh(np.array(jax.devices()), ('data',))
    xs = jax.device_put(x, NamedSharding(mesh, P('data')))
    ps = jax.device_put(params, NamedSharding(mesh, P()))
    out = jax.jit(lambda p, x: f.apply(p, None, x))(ps, xs)
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(out, f.apply(params, None, x), rtol=1e-5, atol=1e-6)
    print('ok')
  ''')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, '-c', code], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith('ok')


def test_fewer_cross_attends_than_blocks():
  x = jax.random.normal(jax.random.key(8), (1, 12, 6))
  f1, p1 = _perceiver(x, num_blocks=4, num_cross_attends=1,
                      return_attention=True)
  assert len(f1.apply(p1, None, x)[1]) == 1
  assert not any('cross_attend_shared' in k for k in p1)
  f2, p2 = _perceiver(x, num_blocks=4, num_cross_attends=2,
                      return_attention=True)
  assert len(f2.apply(p2, None, x)[1]) == 2
  # Latent Transformer shared: same parameter count as 4 cross-attends.
  _, p4 = _perceiver(x, num_blocks=4)
  assert _num_params(p2) == _num_params(p4)
  # One cross-attend: interleaved and at the start are the same model.
  fs, _ = _perceiver(x, num_blocks=4, num_cross_attends=1,
                     cross_attend_arrangement='start')
  np.testing.assert_allclose(fs.apply(p1, None, x), f1.apply(p1, None, x)[0],
                             rtol=1e-6)
  with pytest.raises(ValueError, match='num_cross_attends'):
    _perceiver(x, num_blocks=2, num_cross_attends=3)


@pytest.mark.parametrize('chunk_size', [None, 50])
@pytest.mark.parametrize('permutation_seed', [None, 3])
def test_factored_byte_array_equals_dense(chunk_size, permutation_seed):
  """Projecting position features once per batch changes no number."""
  images = jax.random.normal(jax.random.key(9), (3, 12, 10, 2))

  def make(factored):
    def fwd(x):
      b = perceiver.ImagePreprocessor(
          input_channels=2, num_bands=5, max_resolution=(12, 10),
          permutation_seed=permutation_seed, factored=factored)(x)
      assert isinstance(b, perceiver.FactoredByteArray) == factored
      return perceiver.Perceiver(**SMALL, cross_attend_chunk_size=chunk_size)(
          b, is_training=False)
    return hk.transform(fwd)

  dense, factored = make(False), make(True)
  params = dense.init(jax.random.key(0), images)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(
      jnp.shape, factored.init(jax.random.key(0), images))
  params = jax.tree.map(lambda p: p + 0.2 * jax.random.normal(
      jax.random.key(4), p.shape), params)
  np.testing.assert_allclose(factored.apply(params, None, images),
                             dense.apply(params, None, images),
                             rtol=1e-4, atol=1e-5)
  loss = lambda f: lambda p: jnp.sum(jnp.sin(f.apply(p, None, images)))
  for a, b in zip(jax.tree.leaves(jax.grad(loss(dense))(params)),
                  jax.tree.leaves(jax.grad(loss(factored))(params))):
    # float32, another summation order: tolerance relative to the leaf's scale.
    np.testing.assert_allclose(a, b, rtol=1e-3,
                               atol=1e-5 * max(1.0, float(np.abs(b).max())))


@pytest.mark.parametrize('chunk_size,factored', [(None, False), (50, True)])
def test_cpu_kernels_switch_changes_no_parameter_nor_number(chunk_size,
                                                            factored):
  """cpu_kernels=False (Haiku modules, plain autodiff) against the default:
  the same parameters (names, shapes, initial values), outputs and every
  parameter gradient (each block in float64, all four combinations of
  dense / factored and plain / chunked: tests/attention_test.py)."""
  images = jax.random.normal(jax.random.key(10), (3, 12, 10, 2))

  def make(cpu_kernels):
    def fwd(x):
      b = perceiver.ImagePreprocessor(input_channels=2, num_bands=5,
                                      max_resolution=(12, 10),
                                      factored=factored)(x)
      return perceiver.Perceiver(**SMALL, cross_attend_chunk_size=chunk_size,
                                 cpu_kernels=cpu_kernels)(b, is_training=False)
    return hk.transform(fwd)

  fast, plain = make(True), make(False)
  params = fast.init(jax.random.key(0), images)
  for a, b in zip(jax.tree.leaves(params),
                  jax.tree.leaves(plain.init(jax.random.key(0), images))):
    np.testing.assert_array_equal(a, b)
  assert jax.tree.structure(params) == jax.tree.structure(
      plain.init(jax.random.key(0), images))
  params = jax.tree.map(lambda p: p + 0.2 * jax.random.normal(
      jax.random.key(4), p.shape), params)
  out = jax.jit(fast.apply)(params, None, images)
  assert float(jnp.abs(out).max()) > 0.1
  np.testing.assert_allclose(jax.jit(plain.apply)(params, None, images), out,
                             rtol=1e-4, atol=1e-5)
  loss = lambda f: jax.jit(jax.grad(
      lambda p: jnp.sum(jnp.sin(f.apply(p, None, images)))))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(
      loss(fast)(params)), jax.tree.leaves(loss(plain)(params))):
    np.testing.assert_allclose(a, b, rtol=1e-3, err_msg=str(path),
                               atol=1e-5 * max(1.0, float(np.abs(b).max())))

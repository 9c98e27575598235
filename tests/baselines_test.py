"""The baselines pinned down: golden parameter counts, FLOPs, the permutation
properties of paper Table 2, every baseline config through build_model, and a
small ResNet that learns."""

import functools
import importlib

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import configs.fashion_mnist
import configs.imagenet
from configs import baselines
from experiments.tools import flops
from experiments import modeling
from perceiver import resnet
from perceiver import transformer
from perceiver import vit

RESNET50_PARAMS = 25_557_032  # torchvision / Keras ResNet-50, 1000 classes
VIT_B16_PARAMS = 86_567_656  # ViT-B/16 with its learned position embedding


def _shapes(fn, *inputs):
  """(params, state) shapes of hk.transform_with_state(fn) on inputs."""
  f = hk.transform_with_state(fn)
  return jax.eval_shape(f.init, jax.random.key(0), *inputs)


def _image(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def _config(arg):
  return baselines.get_config(arg)


def _num_params(config):
  return modeling.count_params(modeling.param_shapes(config))


def _flops(config):
  params, state = modeling.variable_shapes(config)
  model = modeling.build_model(config)
  fwd = lambda p, s, x: model.apply(p, s, None, x, is_training=False)[0]
  return flops.count_flops(fwd, params, state,
                           modeling.example_inputs(config))[0]


def _jitted(model):
  """(init, apply) of a transform_with_state model, jitted with is_training
  static (eager Haiku runs op by op and is slow)."""
  init = jax.jit(model.init, static_argnames=('is_training',))
  apply = jax.jit(model.apply, static_argnames=('is_training',
                                                'return_attention'))
  return init, apply


def _random_params(shapes):
  """Random parameters of the given shapes, drawn by numpy on the host
  (nothing to compile, unlike Haiku's initialisers), none of them zero (a
  zero-initialised head would make every output zero): weights fan-in scaled,
  LayerNorm / BatchNorm scales near 1, other vectors small."""
  paths_and_shapes, tree = jax.tree_util.tree_flatten_with_path(shapes)
  leaves = []
  for i, (path, shape) in enumerate(paths_and_shapes):
    noise = np.random.default_rng(i).standard_normal(shape.shape)
    if len(shape.shape) >= 2:
      value = noise * np.sqrt(2 / np.prod(shape.shape[:-1]))
    elif path[-1].key == 'scale':
      value = 1 + 0.1 * noise
    else:
      value = 0.1 * noise
    leaves.append(value.astype(shape.dtype))
  return jax.tree.unflatten(tree, leaves)


# XLA compiles the RBG generator much faster than threefry; tests are
# dominated by compilation, and no test depends on which generator is used.
_key = lambda seed: jax.random.key(seed, impl='rbg')
_KEY = _key(0)


def _normal(*shape):
  return np.random.default_rng(0).normal(size=shape).astype(np.float32)


def _uniform(*shape, low=0.0):
  return np.random.default_rng(0).uniform(low, 1, size=shape).astype(np.float32)


# --- ResNet -------------------------------------------------------------------


def test_resnet50_parameter_count_is_the_standard_one():
  params, state = _shapes(
      lambda x: resnet.ResNet(num_classes=1000)(x, is_training=True),
      _image(1, 224, 224, 3))
  assert modeling.count_params(params) == RESNET50_PARAMS
  # BN moving statistics are state, not parameters: mean and var per channel.
  bn_channels = sum(p.size for path, m in params.items() if 'batch_norm' in path
                    for name, p in m.items() if name == 'scale')
  averages = sum(s['average'].size for path, s in state.items()
                 if 'average' in s)
  assert averages == 2 * bn_channels


def test_resnet50_ff_widens_only_the_stem():
  config = _config('dataset=imagenet,model=resnet50')
  extra = 7 * 7 * 2 * (2 * 64 + 1) * 64  # 258 Fourier channels into the stem
  assert _num_params(config) == RESNET50_PARAMS + extra == 26_366_120
  assert _num_params(_config('dataset=imagenet,model=resnet50,ff=false')) == (
      RESNET50_PARAMS)


def test_resnet50_flops_match_the_literature():
  # ResNet-50: 4.09 G multiply-adds at 224x224 (+ BN / ReLU / pooling).
  total = _flops(_config('dataset=imagenet,model=resnet50,ff=false'))
  assert total == pytest.approx(2 * 4.09e9, rel=0.02)
  # Fourier features: the stem at 112x112 sees 261 instead of 3 channels.
  ff = _flops(_config('dataset=imagenet,model=resnet50'))
  assert ff - total == pytest.approx(2 * 112 * 112 * 64 * 7 * 7 * 258,
                                     rel=1e-3)


def test_resnet_small_stem_keeps_resolution():
  x = _image(4, 28, 28, 1)
  # init works in evaluation mode too (the BN statistics are created anyway).
  f = hk.transform_with_state(lambda x: resnet.ResNet(
      num_classes=10, **baselines.RESNET_SMALL)(x, is_training=False))
  params, state = jax.eval_shape(f.init, jax.random.key(0), x)
  assert jax.tree.leaves(state)
  # 3x3 stride-1 stem, no max-pool, then stages at 28, 14 and 7.
  assert params['res_net/stem/conv']['w'].shape == (3, 3, 1, 16)
  shapes = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and isinstance(
        context.module, resnet.ResidualBlock):
      shapes[context.module.module_name] = out.shape
    return out

  def forward(x):
    with hk.intercept_methods(record):
      return resnet.ResNet(num_classes=10, **baselines.RESNET_SMALL)(
          x, is_training=True)

  jax.eval_shape(hk.transform_with_state(forward).init, jax.random.key(0), x)
  assert sorted(shapes.values()) == [(4, 7, 7, 64), (4, 14, 14, 32),
                                     (4, 28, 28, 16)]


def test_resnet_small_learns():
  config = _config('dataset=fashion_mnist,model=resnet_small')
  model = modeling.build_model(config)
  # A learnable task: each class is a fixed random image, plus noise.
  rng = np.random.default_rng(1)
  y = rng.integers(0, 10, 32)
  templates = rng.normal(size=(10, 28, 28, 1)).astype(np.float32)
  x = templates[y] + 0.5 * _normal(32, 28, 28, 1)
  params, state = _jitted(model)[0](_KEY, x, is_training=True)
  # LAMB, the runner's optimizer: a zero-initialised head would not learn.
  opt = optax.lamb(1e-2)

  def loss_fn(p, s):
    logits, s = model.apply(p, s, None, x, is_training=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), s

  @jax.jit
  def step(p, s, o):
    (loss, s), g = jax.value_and_grad(loss_fn, has_aux=True)(p, s)
    updates, o = opt.update(g, o, p)
    return optax.apply_updates(p, updates), s, o, loss

  @jax.jit
  def eval_loss(p, s):
    logits, s = model.apply(p, s, None, x, is_training=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), s

  opt_state = opt.init(params)
  initial_state = state
  losses = []
  for _ in range(20):
    params, state, opt_state, loss = step(params, state, opt_state)
    losses.append(float(loss))
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.5 * losses[0], losses
  # Training moved the BN statistics; evaluation uses them (and has learnt
  # too) and returns the state unchanged.
  assert not all(jax.tree.leaves(jax.tree.map(
      np.array_equal, state, initial_state)))
  loss, same_state = eval_loss(params, state)
  assert loss < 0.5 * losses[0]
  jax.tree.map(np.testing.assert_array_equal, same_state, state)


# --- ViT ----------------------------------------------------------------------


def test_vit_b16_parameter_counts():
  # The standard ViT-B/16 (learned position embedding, 3 channels).
  assert _num_params(_config('dataset=imagenet,model=vit_b16,ff=false')) == (
      VIT_B16_PARAMS)
  # Without a position embedding: 197 x 768 fewer.
  params, _ = _shapes(lambda x: vit.ViT(num_classes=1000)(x, is_training=False),
                      _image(1, 224, 224, 3))
  no_pos = VIT_B16_PARAMS - 197 * 768
  assert modeling.count_params(params) == no_pos == 86_416_360
  # Per-pixel Fourier features widen the patch embedding: 258 more channels.
  ff = _num_params(_config('dataset=imagenet,model=vit_b16'))
  assert ff == no_pos + 16 * 16 * 258 * 768 == 137_141_224


def test_vit_b16_flops_match_the_literature():
  # ViT-B/16 at 224: 17.56 G multiply-adds (+ softmax, LN, GELU).
  total = _flops(_config('dataset=imagenet,model=vit_b16,ff=false'))
  assert total == pytest.approx(2 * 17.56e9, rel=0.02)


def test_patchify_order():
  x = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
  p = vit.patchify(x, 2)
  assert p.shape == (2, 4, 4)
  np.testing.assert_array_equal(p[0, 0], [0, 1, 4, 5])  # top-left patch
  np.testing.assert_array_equal(p[0, 1], [2, 3, 6, 7])  # top-right
  np.testing.assert_array_equal(p[1, 3], [26, 27, 30, 31])
  seq = vit.patchify(jnp.arange(12.).reshape(1, 6, 2), 3)
  np.testing.assert_array_equal(seq[0, 1], [6, 7, 8, 9, 10, 11])
  with pytest.raises(ValueError, match='divisible'):
    vit.patchify(x, 3)


def test_vit_dropout_only_in_training():
  f = hk.transform_with_state(lambda x, is_training: vit.ViT(
      num_classes=3, patch_size=2, hidden_size=16, num_layers=1, num_heads=2,
      mlp_dim=32, dropout_rate=0.5)(x, is_training=is_training))
  x = _normal(2, 4, 4, 5)
  params, state = jax.eval_shape(
      functools.partial(f.init, is_training=False), _KEY, x)
  params = _random_params(params)
  apply = jax.jit(f.apply, static_argnames='is_training')
  run = lambda rng, t: apply(params, state, rng, x, is_training=t)[0]
  np.testing.assert_array_equal(run(None, False), run(_key(1), False))
  assert not np.allclose(run(_key(1), True),
                         run(_key(2), True))


# --- Transformer and the input adapters -------------------------------------


def test_transformer_64x64_size_and_compute():
  config = _config('dataset=imagenet,model=transformer')
  d, c = 1024, 3 + 2 * (2 * 64 + 1)
  layer = 6 * d * d + 10 * d  # Q, K, V, O, MLP (x2) with biases; 2 LayerNorms
  expected = (c * d + d) + 6 * layer + 2 * d + (d * 1000 + 1000)
  assert _num_params(config) == expected == 39_105_512
  # One Perceiver latent Transformer on 4,096 pixels: the Perceiver's budget.
  assert _flops(config) == pytest.approx(707.2e9, rel=0.05)


def test_downsampled_image_preprocessor():
  f = hk.transform(lambda x: transformer.DownsampledImagePreprocessor(
      resolution=(64, 64), num_bands=64, max_resolution=(64, 64))(x))
  images = _uniform(2, 224, 224, 3)
  out = f.apply(f.init(None, images), None, images)
  assert out.shape == (2, 64 * 64, 261)
  small = jax.image.resize(images, (2, 64, 64, 3), 'linear', antialias=True)
  np.testing.assert_allclose(out[..., :3], small.reshape(2, -1, 3), atol=1e-6)
  # Position features are those of the 64x64 grid: corners at -1 and +1.
  np.testing.assert_allclose(out[0, 0, 3:5], [-1, -1])
  np.testing.assert_allclose(out[0, -1, 3:5], [1, 1])
  # Antialiased downsampling keeps a constant image constant.
  flat = f.apply(None, None, jnp.full((1, 224, 224, 3), 0.3))
  np.testing.assert_allclose(flat[..., :3], 0.3, atol=1e-5)


def test_point_grid_preprocessor():
  points = _uniform(2, 2048, 3, low=-1)
  grid = hk.transform(lambda x: transformer.PointGridPreprocessor(
      grid_shape=(32, 64))(x))
  out = grid.apply(None, None, points)
  # xyz are the raw positions of the Fourier features: 3 (2F + 1) channels.
  assert out.shape == (2, 32, 64, 3 * (2 * 64 + 1))
  # All points, in their own order, xyz first.
  np.testing.assert_array_equal(out[..., :3].reshape(2, -1, 3), points)
  seq = hk.transform(lambda x: transformer.PointGridPreprocessor(
      grid_shape=(44, 44), flatten=True)(x))
  out = seq.apply(None, None, points)
  assert out.shape == (2, 1936, 387)
  kept = {tuple(np.asarray(p)) for p in out[0, :, :3]}
  assert len(kept) == 1936
  assert kept <= {tuple(np.asarray(p)) for p in points[0]}


# --- Permutation (paper Table 2) ----------------------------------------------


def _raw_and_permuted_logits(arg: str, base_config=None):
  """Logits of one model (one set of parameters) on raw and permuted images."""
  if base_config is None:
    raw = _config(arg)
    perm = _config(arg + ',permuted')
  else:
    raw, perm = base_config(''), base_config('permuted')
  images = _uniform(2, 28, 28, 1)
  (_, apply_raw), (_, apply_perm) = (
      _jitted(modeling.build_model(c)) for c in (raw, perm))
  params, state = modeling.variable_shapes(raw)
  params = _random_params(params)
  state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), state)
  # Training mode: BatchNorm normalises with the batch's statistics, so the
  # (unused) state needs no values; nothing here has dropout.
  run = lambda apply: apply(params, state, None, images, is_training=True)[0]
  return run(apply_raw), run(apply_perm)


@pytest.mark.parametrize('model', ['resnet_small', 'vit_small'])
def test_grid_baselines_change_under_the_fixed_permutation(model):
  raw, permuted = _raw_and_permuted_logits(
      f'dataset=fashion_mnist,model={model}')
  assert np.abs(raw - permuted).max() > 1e-2


@pytest.mark.parametrize('model', ['transformer', 'perceiver_learned_pos'])
def test_set_models_are_invariant_to_the_fixed_permutation(model):
  raw, permuted = _raw_and_permuted_logits(
      f'dataset=fashion_mnist,model={model}')
  assert np.abs(raw).max() > 1e-2
  np.testing.assert_allclose(raw, permuted, rtol=1e-4, atol=1e-5)


def test_perceiver_without_position_features_is_invariant_resnet_is_not():
  def perceiver_config(arg):
    config = configs.fashion_mnist.get_config(arg)
    config.input.position_encoding = 'none'
    return config

  raw, permuted = _raw_and_permuted_logits('', base_config=perceiver_config)
  np.testing.assert_allclose(raw, permuted, rtol=1e-4, atol=1e-5)

  def resnet_config(arg):
    return _config('dataset=fashion_mnist,model=resnet_small,ff=false'
                   + (',' + arg if arg else ''))

  raw, permuted = _raw_and_permuted_logits('', base_config=resnet_config)
  assert np.abs(raw - permuted).max() > 1e-2


@pytest.mark.parametrize('arg', ['model=resnet_small',
                                 'model=vit_small,permuted'])
def test_factored_grid_equals_the_dense_grid(arg):
  """A FactoredByteArray grid (the position features projected once per
  batch by the first layer) is the dense grid's model: the same parameters,
  the same logits and parameter gradients up to summation order."""
  factored = _config(f'dataset=fashion_mnist,{arg}')
  assert factored.input.factored
  dense = _config(f'dataset=fashion_mnist,{arg}')
  dense.input.factored = False
  images = _uniform(2, 28, 28, 1)
  labels = np.array([3, 7])
  shapes = [modeling.variable_shapes(c) for c in (factored, dense)]
  assert jax.tree.map(jnp.shape, shapes[0]) == jax.tree.map(jnp.shape,
                                                            shapes[1])
  params = _random_params(shapes[0][0])
  state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes[0][1])

  def loss_and_logits(config):
    model = modeling.build_model(config)

    def loss(p):
      logits = model.apply(p, state, None, images, is_training=True)[0]
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, labels).mean(), logits
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (_, logits_f), grads_f = loss_and_logits(factored)
  (_, logits_d), grads_d = loss_and_logits(dense)
  assert np.abs(logits_d).max() > 1e-2
  np.testing.assert_allclose(logits_f, logits_d, rtol=1e-4, atol=1e-5)
  for g_f, g_d in zip(jax.tree.leaves(grads_f), jax.tree.leaves(grads_d)):
    np.testing.assert_allclose(g_f, g_d, rtol=1e-3,
                               atol=1e-5 * np.abs(g_d).max() + 1e-7)


# --- Configs through build_model ---------------------------------------------

_ALL = [(d, m) for d, models in baselines.MODELS.items() for m in models]


@pytest.mark.parametrize('dataset,model', _ALL)
def test_paper_size_config_builds(dataset, model):
  config = _config(f'dataset={dataset},model={model}')
  params, state = modeling.variable_shapes(config)
  assert modeling.count_params(params) > 0
  # BatchNorm statistics: the ResNets and PointNet++ only.
  assert (config.model_name in ('resnet', 'pointnet2')) == bool(
      jax.tree.leaves(state))
  # Every section other than input and model is the dataset config's own,
  # but the Fashion-MNIST baselines' own epochs and augmentation.
  base = importlib.import_module(f'configs.{dataset}').get_config()
  assert set(config) == set(base)
  if dataset == 'fashion_mnist' and model in baselines.FMNIST_EPOCHS:
    assert config.num_epochs == baselines.FMNIST_EPOCHS[model]
    assert config.data.augment == (model in baselines.FMNIST_AUGMENT)
    base.num_epochs = config.num_epochs
    base.data.augment = config.data.augment
  for key in base:
    if key not in ('input_name', 'input', 'model_name', 'model'):
      assert config[key] == base[key], key


def test_perceiver_learned_pos_is_the_perceiver_with_one_cross_attend():
  config = _config('dataset=imagenet,model=perceiver_learned_pos,permuted')
  base = configs.imagenet.get_config('permuted')
  assert config.model_name == base.model_name == 'perceiver'
  assert config.model.to_dict() == dict(base.model, num_cross_attends=1)
  assert config.input.to_dict() == dict(
      base.input, position_encoding='learned', learned_channels=128,
      learned_init_scale=1.0)
  learned = modeling.param_shapes(config)[
      'image_preprocessor/position/learned_pos']
  assert learned['pos_embs'].shape == (224 * 224, 128)


@pytest.mark.parametrize('dataset,model', _ALL)
def test_cpu_scale_config_traces(dataset, model):
  # Traced, not compiled: the numerics of every model class are exercised by
  # the permutation and training tests on Fashion-MNIST.
  config = _config(f'dataset={dataset},model={model},runlocal')
  model_fn = modeling.build_model(config)
  x = modeling.example_inputs(config, batch_size=2)
  params, state = modeling.variable_shapes(config)
  logits, new_state = jax.eval_shape(
      functools.partial(model_fn.apply, is_training=True), params, state,
      jax.random.key(1), x)
  assert logits.shape == (2, config.model.num_classes)
  assert jax.tree.map(jnp.shape, new_state) == jax.tree.map(jnp.shape, state)


def test_build_model_contract():
  config = configs.fashion_mnist.get_config()
  model = modeling.build_model(config)
  x = _image(1, 28, 28, 1)
  params, state = jax.eval_shape(
      functools.partial(model.init, is_training=True), _KEY, x)
  assert state == {}
  (logits, maps), new_state = jax.eval_shape(
      functools.partial(model.apply, is_training=False, return_attention=True),
      params, state, None, x)
  assert logits.shape == (1, 10) and len(maps) == config.model.num_blocks
  assert new_state == {}
  resnet_model = modeling.build_model(
      _config('dataset=fashion_mnist,model=resnet_small'))
  p, s = jax.eval_shape(functools.partial(resnet_model.init, is_training=True),
                        jax.random.key(0), x)
  with pytest.raises(ValueError, match='return_attention'):
    jax.eval_shape(functools.partial(resnet_model.apply, is_training=False,
                                     return_attention=True), p, s, None, x)


def test_config_errors():
  with pytest.raises(ValueError, match='Unknown model'):
    _config('dataset=modelnet40,model=resnet_small')
  with pytest.raises(ValueError, match='permuted'):
    _config('dataset=modelnet40,model=vit_b2,permuted')
  with pytest.raises(ValueError, match='Unknown dataset'):
    _config('dataset=audioset,model=resnet50')
  assert _config('dataset=fashion_mnist,model=resnet_small,synthetic'
                 ).dataset == 'synthetic'



def test_modelnet40_vit_token_counts():
  """ViT-B-k on the 32 x 64 point grid: 2048 / k^2 patches of k x k points."""
  for k, tokens in ((2, 512), (4, 128), (8, 32), (16, 8)):
    config = _config(f'dataset=modelnet40,model=vit_b{k}')
    embed = modeling.param_shapes(config)['vi_t/patch_embedding']['w']
    assert embed.shape == (k * k * 387, 768)
    to_grid = hk.transform(
        lambda x: transformer.PointGridPreprocessor(**config.input)(x))
    grid = jax.eval_shape(functools.partial(to_grid.apply, None, None),
                          jax.ShapeDtypeStruct((1, 2048, 3), jnp.float32))
    assert grid.shape == (1, 32, 64, 387)
    patches = jax.eval_shape(lambda g: vit.patchify(g, k), grid)
    assert patches.shape == (1, tokens, k * k * 387)



# --- PointNet++ and the CPU-scale Table 4 stand-ins (data=kicad) -------------


def test_modelnet40_pointnet2_is_the_paper_ssg_net_on_raw_xyz():
  config = _config('dataset=modelnet40,model=pointnet2')
  assert config.input_name == 'none' and not config.input
  x = _uniform(2, 2048, 3, low=-1)
  assert modeling.make_preprocessor('none', {})(x) is x  # raw xyz
  assert config.model.to_dict() == dict(baselines.POINTNET2, num_classes=40)
  assert _num_params(config) == 1_475_688  # tests/pointnet2_test.py


def _kicad_config(monkeypatch, model, extra=''):
  """baselines' data=kicad config over a stand-in for configs/modelnet40.py's
  `data` argument, recording what reaches the base config."""
  import configs.modelnet40
  real = configs.modelnet40.get_config
  received = []

  def get_config(arg=None):
    received.append(arg)
    args = dict(item.split('=') for item in (arg or '').split(','))
    assert args.pop('data') == 'kicad'
    return real(','.join(f'{k}={v}' for k, v in args.items()))

  monkeypatch.setattr(configs.modelnet40, 'get_config', get_config)
  config = _config(f'dataset=modelnet40,model={model},data=kicad{extra}')
  return config, received


@pytest.mark.parametrize('model', sorted(baselines.CPU_SCALE))
def test_kicad_forwards_data_and_uses_the_cpu_scale_models(monkeypatch, model):
  config, received = _kicad_config(monkeypatch, model)
  assert received == ['runlocal=False,synthetic=False,data=kicad']
  # The CPU-scale model, on every point of the base config's clouds (the
  # Transformer: the 44 x 44 = 1,936 of its name).
  sizes = dict(baselines.CPU_SCALE[model])
  grid = sizes.pop('grid_shape', None)
  assert config.model.to_dict() == dict(sizes, num_classes=40)
  if grid is not None:
    assert config.input.grid_shape == grid
    assert np.prod(grid) == (1936 if model == 'transformer' else 2048)
  # Everything else is the base config's: one training budget for all.
  base = configs.modelnet40.get_config('data=kicad')
  for key in base:
    if key not in ('input_name', 'input', 'model_name', 'model'):
      assert config[key] == base[key], key
  # Smaller than the paper-size model (by 4x to 400x).
  monkeypatch.undo()
  paper = _config(f'dataset=modelnet40,model={model}')
  assert _num_params(config) < 0.3 * _num_params(paper)


def test_data_argument_errors(monkeypatch):
  with pytest.raises(ValueError, match='applies to modelnet40'):
    _config('dataset=fashion_mnist,model=resnet_small,data=kicad')
  with pytest.raises(ValueError, match='No CPU-scale version'):
    _kicad_config(monkeypatch, 'vit_b16')

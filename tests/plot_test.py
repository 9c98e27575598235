"""launch.plot and experiments/tools/figures.py: the attention picture's grid is the
input's grid (pixel (i, j) of the input is cell [i, j] of every map, for raw
and permuted models alike), curves come from metrics.jsonl, and one command
draws both PNGs for a run of the runner with the Fashion-MNIST config."""

import json
import os
import subprocess
import sys

import haiku as hk
import jax
import matplotlib.image
import numpy as np
import pytest

from configs import fashion_mnist
from experiments.tools import figures
from experiments import metric_writers
from experiments import modeling
from experiments.data import synthetic
import perceiver
from tests import testing

def _tiny_fashion_mnist_config(arg=None):
  """The Fashion-MNIST config (28x28x1 inputs), shrunk to compile in
  seconds: 4 blocks, so cross-attends 1, 2 and 4 are drawn."""
  config = fashion_mnist.get_config(arg)
  config.input.num_bands = 2
  config.model.update(num_latents=8, latent_channels=16, num_blocks=4,
                      num_self_attends_per_block=1, num_self_heads=2)
  return config


# --------------------------------------------------------- the grid ----


def test_attention_grid_puts_the_logit_of_pixel_i_j_at_i_j():
  gh, gw = 3, 5  # not square: a transposed grid would not fit
  h, n = 2, 4
  maps = (1000 * np.arange(h)[:, None, None] + 100 * np.arange(n)[:, None] +
          np.arange(gh * gw)).astype(np.float32)  # [H, N, M]
  grid = figures.attention_grid(maps, (gh, gw))
  assert grid.shape == (h, n, gh, gw)
  for i in range(gh):
    for j in range(gw):
      np.testing.assert_array_equal(grid[:, :, i, j], maps[:, :, i * gw + j])


def test_attention_grid_undoes_the_preprocessors_permutation():
  """The preprocessor itself permutes a picture of its positions; the grid
  function must give the picture back."""
  gh, gw, seed = 6, 10, 3
  picture = (100 * np.arange(gh)[:, None] + np.arange(gw)).astype(np.float32)
  pre = hk.transform(lambda x: perceiver.ImagePreprocessor(
      input_channels=1, position_encoding='none', permutation_seed=seed)(x))
  x = pre.apply({}, None, picture[None, :, :, None])  # [1, M, 1], permuted
  permuted = np.asarray(x)[0, :, 0][None, None]  # [H=1, N=1, M]
  assert not np.array_equal(permuted.reshape(gh, gw), picture)
  perm = perceiver.fixed_permutation(gh * gw, seed)
  grid = figures.attention_grid(permuted, (gh, gw), permutation=perm)
  np.testing.assert_array_equal(grid[0, 0], picture)


def test_attention_grid_rejects_a_wrong_grid():
  with pytest.raises(ValueError, match='M = 28x28'):
    figures.attention_grid(np.zeros((1, 4, 783)), (28, 28))
  with pytest.raises(ValueError, match='not a permutation'):
    figures.attention_grid(np.zeros((1, 4, 6)), (2, 3),
                           permutation=np.array([0, 0, 1, 2, 3, 4]))


def _changed_cells(model, params, state, image, config, pixel):
  """Cells of the first cross-attend's maps that change when one input
  pixel changes: its keys depend on that input alone (its queries on the
  latents alone), so only the pixel's own cell may change."""
  _, before = figures.attention_maps(model, params, state, image, config)
  poked = image.copy()
  poked[pixel] += 3.0
  _, after = figures.attention_maps(model, params, state, poked, config)
  diff = np.abs(after[0] - before[0])  # [H, N, gh, gw]
  return {tuple(c) for c in np.argwhere(diff.max(axis=(0, 1)) > 1e-5)}


@pytest.mark.parametrize('arg', [None, 'permuted'])
def test_map_cell_i_j_answers_to_input_pixel_i_j(arg):
  config = _tiny_fashion_mnist_config(arg)
  model = modeling.build_model(config)
  image = np.random.default_rng(0).normal(size=(28, 28, 1)).astype(np.float32)
  params, state = model.init(jax.random.PRNGKey(0), image[None],
                             is_training=False)
  for pixel in [(3, 20, 0), (27, 0, 0)]:
    assert _changed_cells(model, params, state, image, config,
                          pixel) == {pixel[:2]}


def test_permuted_model_draws_the_raw_models_maps():
  """The permutation comes after the position features and the Perceiver
  is permutation invariant: with the same parameters the permuted model's
  un-permuted maps are the raw model's, at every cross-attend."""
  raw, permuted = (_tiny_fashion_mnist_config(a) for a in (None, 'permuted'))
  image = np.random.default_rng(1).normal(size=(28, 28, 1)).astype(np.float32)
  model = modeling.build_model(raw)
  params, state = model.init(jax.random.PRNGKey(1), image[None],
                             is_training=False)
  logits, want = figures.attention_maps(model, params, state, image, raw)
  got_logits, got = figures.attention_maps(
      modeling.build_model(permuted), params, state, image, permuted)
  np.testing.assert_allclose(got_logits, logits, rtol=1e-4, atol=1e-5)
  assert len(got) == len(want) == 4
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_first_second_and_last_cross_attend_are_shown():
  assert figures.shown_cross_attends(1) == [0]
  assert figures.shown_cross_attends(2) == [0, 1]
  assert figures.shown_cross_attends(3) == [0, 1, 2]
  assert figures.shown_cross_attends(8) == [0, 1, 7]
  assert figures.latent_indices(4, 8) == [0, 1, 2, 3]
  assert figures.latent_indices(512, 8) == [0, 73, 146, 219, 292, 365, 438,
                                            511]


# -------------------------------------------------------- refusals ----


def test_refuses_models_without_cross_attention_and_non_images():
  config = _tiny_fashion_mnist_config()
  config.model_name = 'resnet'
  with pytest.raises(figures.FigureError, match="'resnet' has no cross-att"):
    figures.check_attention_config(config)
  config = _tiny_fashion_mnist_config()
  config.input_name = 'points'
  with pytest.raises(figures.FigureError, match="'points' is not an image"):
    figures.check_attention_config(config)


def test_refuses_workdirs_without_config_checkpoint_or_metrics(tmp_path):
  with pytest.raises(figures.FigureError, match='config.json does not exist'):
    figures.plot_attention(str(tmp_path))
  with pytest.raises(figures.FigureError, match='metrics.jsonl does not'):
    figures.plot_curves(str(tmp_path))
  (tmp_path / 'config.json').write_text(
      _tiny_fashion_mnist_config().to_json_best_effort())
  with pytest.raises(figures.FigureError, match='no checkpoint in'):
    figures.plot_attention(str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists()  # nothing created


# ---------------------------------------------------------- curves ----


def test_curves_read_every_scalar_facts_as_text(tmp_path):
  writer = metric_writers.MetricWriter(str(tmp_path), tensorboard=False)
  writer.write_scalars(0, {'num_params': 100, 'global_batch_size': 8})
  writer.write_scalars(2, {'loss': 2.0, 'lr': 0.1})
  writer.write_scalars(4, {'loss': 1.5, 'lr': 0.2})
  writer.write_scalars(4, {'eval/top1': 0.5, 'eval/loss': 1.7,
                           'eval/num_examples': 10})
  writer.write_scalars(4, {'num_params': 100, 'global_batch_size': 8})
  writer.write_scalars(4, {'loss': 1.4, 'lr': 0.2})  # resumed: last counts
  writer.write_scalars(6, {'loss': float('nan'), 'lr': 0.3})
  writer.write_scalars(6, {'eval/top1': 0.5, 'eval/loss': 1.6,
                           'eval/num_examples': 10})
  writer.close()
  series = figures.read_metrics(str(tmp_path))
  steps, values = series['loss']
  np.testing.assert_array_equal(steps, [2, 4, 6])
  np.testing.assert_array_equal(values, [2.0, 1.4, np.nan])
  panels, facts = figures.split_curves(series)
  assert panels == {'loss': ['eval/loss', 'loss'], 'top1': ['eval/top1'],
                    'lr': ['lr']}  # a flat top-1 is still drawn
  assert facts == {'eval/num_examples': 10, 'global_batch_size': 8,
                   'num_params': 100}
  fig = figures.curves_figure(series)
  assert sum(ax.axison for ax in fig.axes) == 3
  assert [ax.get_title() for ax in fig.axes[:3]] == ['loss', 'top1', 'lr']


# ---------------------------------------------- end to end, one run ----


_TINY_OVERRIDES = [
    'input.num_bands=2', 'model.num_latents=8', 'model.latent_channels=16',
    'model.num_blocks=4', 'model.num_self_attends_per_block=1',
    'model.num_self_heads=2', 'data.num_train_examples=96', 'batch_size=16',
    'eval_batch_size=50', 'num_train_steps=6', 'log_every_steps=2',
    'eval_every_steps=3', 'checkpoint_every_steps=3']


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """`python -m experiments.train` on the Fashion-MNIST config's synthetic
  stand-in (same 28x28x1 inputs, 100 evaluation examples), the model shrunk
  as in _tiny_fashion_mnist_config: 6 steps, checkpoints at 3 and 6."""
  workdir = str(tmp_path_factory.mktemp('fmnist'))
  config = os.path.join(testing.ROOT, 'configs', 'fashion_mnist.py')
  result = testing.run_train(workdir, _TINY_OVERRIDES,
                             config=f'{config}:runlocal,synthetic')
  assert result.returncode == 0, result.stderr[-3000:]
  assert testing.checkpoint_steps(workdir) == [3, 6]
  return workdir


def _png(path):
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[2] in (3, 4)
  return image


def test_cli_draws_fig3_on_the_28x28_grid_of_the_input(trained):
  result = subprocess.run(
      [sys.executable, '-m', 'launch.plot', f'--workdir={trained}',
       '--attention', '--index=7'], cwd=testing.ROOT,
      env=testing.subprocess_env(), capture_output=True, text=True,
      timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  path = os.path.join(trained, figures.ATTENTION_NAME)
  assert result.stdout.strip() == path
  image = _png(path)
  # Rows: cross-attends 1, 2 and 4 of 4; columns: input, gap, 8 latents.
  rows, cols = 3, 8
  inches = figures.PANEL_INCHES
  assert image.shape[:2] == (
      round((inches * rows + 0.9) * figures.DPI),
      round((inches * (rows + cols + figures.GAP) + 0.6) * figures.DPI))
  assert image[..., :3].std() > 0.05  # not blank


def test_restored_maps_cover_the_input_grid(trained):
  """The same pieces the CLI runs, on the trained checkpoint."""
  config = figures.load_config(trained)
  model, state = figures.restore(config, trained)
  assert int(state.step) == 6
  image, label = figures.eval_example(config, 7)
  assert image.shape == (28, 28, 1)
  first = next(synthetic.load('test', batch_size=8, is_training=False,
                              **config.data.to_dict()))
  np.testing.assert_array_equal(image, first['inputs'][7])
  assert label == first['labels'][7]
  logits, grids = figures.attention_maps(model, state.params, state.state,
                                         image, config)
  assert logits.shape == (10,)
  assert [g.shape for g in grids] == [(1, 8, 28, 28)] * 4
  assert _changed_cells(model, state.params, state.state, image, config,
                        (5, 17, 0)) == {(5, 17)}
  fig = figures.attention_figure(image, [g[0] for g in grids[:3]],
                                 ['a', 'b', 'c'], [0, 2, 4, 6])
  assert len(fig.axes) == 1 + 3 * 4
  assert fig.axes[1].images[0].get_array().shape == (28, 28)
  with pytest.raises(figures.FigureError, match='out of range'):
    figures.eval_example(config, 100)


def test_cli_draws_curves_of_the_run(trained):
  path = figures.plot_curves(trained)
  assert path == os.path.join(trained, figures.CURVES_NAME)
  image = _png(path)
  assert image.shape[0] > 300 and image.shape[1] > 800
  titles = {ax.get_title() for ax in figures.curves_figure(
      figures.read_metrics(trained)).axes}
  assert {'loss', 'lr', 'grad_norm', 'top1', 'top5'} <= titles


def test_cli_refuses_in_one_line(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps(
      json.loads(_tiny_fashion_mnist_config().to_json_best_effort()),
      indent=2))
  result = subprocess.run(
      [sys.executable, '-m', 'launch.plot', f'--workdir={tmp_path}',
       '--attention'], cwd=testing.ROOT, env=testing.subprocess_env(),
      capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith(
      'launch.plot: error: no checkpoint in ')
  assert 'Traceback' not in result.stderr

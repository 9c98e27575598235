"""The runner's pieces against hand-computed values: schedules, weight-decay
mask, losses, metrics (top-k, AP/mAP, clip averaging), MixUp/CutMix, the
synthetic dataset's determinism and sharding, batch-size checks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import losses
from experiments import metrics
from experiments import mixing
from experiments import modeling
from experiments import optimizers
from experiments import parallel
from experiments import steps
from experiments.data import synthetic
from tests import testing

# ------------------------------------------------------------ schedules ----


def test_imagenet_schedule_drops_tenfold_at_epochs_84_102_114():
  schedule = optimizers.make_schedule(
      lr=0.004, kind='piecewise', boundaries=(84, 102, 114), decay_factor=0.1,
      unit='epochs', total_steps=1200, steps_per_epoch=lambda: 10.0)
  expected = {0: 4e-3, 839: 4e-3, 840: 4e-4, 1019: 4e-4, 1020: 4e-5,
              1139: 4e-5, 1140: 4e-6, 1199: 4e-6}
  for step, lr in expected.items():
    assert float(schedule(step)) == pytest.approx(lr, rel=1e-5), step


def test_warmup_then_cosine():
  schedule = optimizers.make_schedule(lr=1.0, kind='cosine', warmup=10,
                                      unit='steps', total_steps=110)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(0.5)
  assert float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(60)) == pytest.approx(0.5, abs=1e-6)  # half-way
  assert float(schedule(110)) == pytest.approx(0.0, abs=1e-6)


def test_constant_schedule_and_epoch_rounding():
  schedule = optimizers.make_schedule(lr=1e-3, kind='constant',
                                      total_steps=50_000)
  assert [float(schedule(s)) for s in (0, 1, 49_999)] == pytest.approx(
      [1e-3] * 3)
  # 1.5 epochs of 9843 examples at batch 512.
  assert optimizers.to_steps(1.5, 'epochs', lambda: 9843 / 512) == 29
  with pytest.raises(ValueError, match='Unknown unit'):
    optimizers.to_steps(1, 'hours', lambda: 1.0)


def test_weight_decay_skips_biases_and_layer_norms():
  params, _ = jax.eval_shape(
      lambda: modeling.build_model(testing.get_config()).init(
          jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), is_training=True))
  mask = optimizers.weight_decay_mask(params)
  decayed = {f'{m}/{n}' for m, d in mask.items() for n, v in d.items() if v}
  skipped = {f'{m}/{n}' for m, d in mask.items() for n, v in d.items()
             if not v}
  assert all(p.endswith(('/b', '/offset', '/scale')) for p in skipped)
  assert all(p.endswith(('/w', '/latents')) for p in decayed)
  assert any('layer_norm' in p for p in skipped)
  assert 'perceiver/latents' in decayed


def test_lamb_decays_weights_but_not_biases():
  params = {'linear': {'w': jnp.ones((3, 3)), 'b': jnp.ones(3)},
            'layer_norm': {'scale': jnp.ones(3), 'offset': jnp.ones(3)}}
  optimizer = optimizers.make_optimizer(
      lr=0.1, weight_decay=0.5, clip_grad_norm=1.0,
      schedule=optax.constant_schedule(0.1))
  state = optimizer.init(params)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = optimizer.update(zero_grads, state, params)
  new = optax.apply_updates(params, updates)
  # Only weight decay moves anything: w shrinks by lr * trust ratio (1).
  np.testing.assert_allclose(new['linear']['w'], 0.9, rtol=1e-5)
  for leaf in (new['linear']['b'], new['layer_norm']['scale'],
               new['layer_norm']['offset']):
    np.testing.assert_array_equal(leaf, 1.0)


# --------------------------------------------------------------- losses ----


def test_label_smoothing_matches_hand_computation():
  logits = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
  labels = jnp.array([0, 2])
  log_p = np.log(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True))
  targets = 0.9 * np.eye(3)[[0, 2]] + 0.1 / 3
  expected = -(targets * log_p).sum(-1).mean()
  got = losses.softmax_cross_entropy(logits, labels, label_smoothing=0.1)
  assert float(got) == pytest.approx(expected, rel=1e-6)


def test_soft_labels_and_mask():
  logits = jnp.array([[1.0, 2.0], [3.0, -1.0], [100.0, -100.0]])
  ids = jnp.array([1, 0, 1])
  one_hot = jax.nn.one_hot(ids, 2)
  mask = jnp.array([True, True, False])  # the huge third loss is padding
  by_id = losses.softmax_cross_entropy(logits, ids, mask)
  by_dist = losses.softmax_cross_entropy(logits, one_hot, mask)
  assert float(by_id) == pytest.approx(float(by_dist))
  expected = np.mean([np.log1p(np.exp(-1.0)), np.log1p(np.exp(-4.0))])
  assert float(by_id) == pytest.approx(expected, rel=1e-6)
  soft = jnp.array([[0.25, 0.75]])
  p = jax.nn.softmax(logits[:1])
  assert float(losses.softmax_cross_entropy(logits[:1], soft)) == \
      pytest.approx(float(-(soft * jnp.log(p)).sum()), rel=1e-6)


def test_sigmoid_cross_entropy_sums_classes():
  logits = jnp.array([[0.0, 2.0, -1.0]])
  labels = jnp.array([[1.0, 0.0, 1.0]])
  sig = 1 / (1 + np.exp(-np.array([0.0, 2.0, -1.0])))
  expected = -(np.log(sig[0]) + np.log(1 - sig[1]) + np.log(sig[2]))
  assert float(losses.sigmoid_cross_entropy(logits, labels)) == \
      pytest.approx(expected, rel=1e-6)
  with pytest.raises(ValueError, match='softmax loss only'):
    losses.loss_fn('sigmoid', label_smoothing=0.1)


# -------------------------------------------------------------- metrics ----


def test_average_precision_by_hand_and_with_ties():
  ap = metrics.average_precision(np.array([0.9, 0.8, 0.7, 0.6]),
                                 np.array([True, False, True, False]))
  assert ap == pytest.approx((1 / 1 + 2 / 3) / 2)
  # A tie is one threshold: precision 1/2 at recall 1.
  assert metrics.average_precision(np.array([0.5, 0.5]),
                                   np.array([False, True])) == 0.5


def test_map_averages_only_classes_with_positives():
  scores = np.array([[0.9, 0.1, 0.3], [0.2, 0.8, 0.4], [0.7, 0.6, 0.5]])
  labels = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 0]], np.float32)
  # class 0: AP 1; class 1: positives ranked 1st and 2nd -> AP 1;
  # class 2 has no positive and is left out.
  assert metrics.mean_average_precision(scores, labels) == 1.0
  labels[2] = [1, 0, 0]  # class 0 positives at ranks 1 and 2; class 1 at 1
  scores[2] = [0.1, 0.6, 0.5]  # class 0 positive now ranked last of three
  assert metrics.mean_average_precision(scores, labels) == pytest.approx(
      ((1 + 2 / 3) / 2 + 1) / 2)


def test_topk_with_ids_and_multi_hot():
  scores = jnp.array([[0.1, 0.5, 0.2, 0.15, 0.05, 0.0],
                      [0.3, 0.1, 0.2, 0.25, 0.1, 0.05]])
  ids = jnp.array([2, 5])
  np.testing.assert_array_equal(metrics.topk_correct(scores, ids, 1), [0, 0])
  np.testing.assert_array_equal(metrics.topk_correct(scores, ids, 5), [1, 0])
  multi = jnp.array([[0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]], jnp.float32)
  np.testing.assert_array_equal(metrics.topk_correct(scores, multi, 1),
                                [1, 0])


def test_masked_sums_count_each_kept_example_once():
  scores = jnp.eye(3)
  labels = jnp.array([0, 1, 0])
  sums = metrics.masked_sums(scores, labels, jnp.array([True, False, True]),
                             jnp.array([1.0, 10.0, 2.0]))
  assert {k: float(v) for k, v in sums.items()} == {
      'top1': 1.0, 'top5': 2.0, 'loss': 3.0, 'count': 2.0}
  final = metrics.finalize({k: float(v) for k, v in sums.items()})
  assert final == {'top1': 0.5, 'top5': 1.0, 'loss': 1.5, 'num_examples': 2}


def test_clip_scores_average_probabilities():
  logits = jnp.array([[[0.0, 0.0], [10.0, -10.0]]])  # [B=1, C=2, K=2]
  scores = metrics.clip_scores(logits, multi_label=False)
  np.testing.assert_allclose(scores, [[0.75, 0.25]], atol=1e-6)
  sig = metrics.clip_scores(logits, multi_label=True)
  np.testing.assert_allclose(sig, [[0.75, 0.25]], atol=1e-4)


# ---------------------------------------------------------------- mixing ----


def test_mixup_mixes_images_and_labels_with_one_ratio():
  b = 4
  images = jnp.broadcast_to(jnp.arange(b, dtype=jnp.float32)[:, None, None,
                                                              None],
                            (b, 2, 2, 1))
  labels = jax.nn.one_hot(jnp.arange(b), b)
  mixed, soft = mixing.mix(jax.random.PRNGKey(3), images, labels,
                           mixup_alpha=0.4)
  np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-6)
  lam = float(soft[0, 0])
  assert 0.0 <= lam <= 1.0
  expected = lam * np.arange(b) + (1 - lam) * np.arange(b)[::-1]
  np.testing.assert_allclose(mixed[:, 0, 0, 0], expected, rtol=1e-5)


def test_cutmix_label_weight_is_the_pasted_area():
  b, h, w = 2, 16, 16
  images = jnp.concatenate([jnp.zeros((1, h, w, 1)), jnp.ones((1, h, w, 1))])
  labels = jax.nn.one_hot(jnp.arange(b), b)
  for seed in range(5):
    mixed, soft = mixing.mix(jax.random.PRNGKey(seed), images, labels,
                             cutmix_alpha=1.0)
    pasted = float(mixed[0].mean())  # example 0 is zeros; its partner ones
    assert float(soft[0, 1]) == pytest.approx(pasted, abs=1e-6)


# ------------------------------------------------------------- synthetic ----


def _load(**kwargs):
  args = dict(batch_size=4, is_training=True, seed=1, input_shape=(3, 2),
              num_classes=5, num_train_examples=10, num_eval_examples=7)
  args.update(kwargs)
  return synthetic.load('train' if args['is_training'] else 'test', **args)


def test_synthetic_resumes_exactly_at_start_step():
  stream = _load()
  batches = [next(stream) for _ in range(5)]
  resumed = next(_load(start_step=3))
  for key in ('inputs', 'labels'):
    np.testing.assert_array_equal(resumed[key], batches[3][key])
  assert not np.array_equal(batches[0]['inputs'], batches[1]['inputs'])


def test_synthetic_processes_split_the_global_batch():
  whole = next(_load(batch_size=8, start_step=2))
  parts = [next(_load(batch_size=4, start_step=2, process_index=p,
                      process_count=2)) for p in range(2)]
  for key in ('inputs', 'labels'):
    np.testing.assert_array_equal(
        np.concatenate([p[key] for p in parts]), whole[key])


def test_synthetic_eval_covers_each_example_once_with_clips():
  per_process = [list(_load(is_training=False, process_index=p,
                            process_count=2, num_clips=3, multi_label=True))
                 for p in range(2)]
  assert len(per_process[0]) == len(per_process[1]) == 1  # 7 <= 2 x 4
  batch = per_process[0][0]
  assert batch['inputs'].shape == (4, 3, 3, 2)
  assert batch['labels'].shape == (4, 5) and batch['labels'].dtype == np.float32
  kept = np.concatenate([b['inputs'][b['mask']] for p in per_process
                         for b in p])
  assert len(kept) == 7
  assert len({x.tobytes() for x in kept}) == 7


def test_batch_size_that_does_not_divide_is_an_error():
  mesh = parallel.make_mesh()
  assert parallel.check_batch_size(16, mesh, 1) == 16
  with pytest.raises(ValueError, match='must be positive'):
    parallel.check_batch_size(0, mesh, 1)
  with pytest.raises(ValueError, match='does not divide over 2 processes'):
    parallel.check_batch_size(3, mesh, 2)


# ----------------------------------------------------------------- steps ----


def test_eval_step_averages_clips_and_reports_map_inputs():
  config = testing.get_config('multi_label')
  mesh = parallel.make_mesh()
  model = modeling.build_model(config)
  params, state = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)),
                             is_training=True)
  batch = next(synthetic.load(
      'test', batch_size=16, is_training=False,
      **{k: v for k, v in config.data.to_dict().items() if k != 'data_dir'}))
  assert batch['inputs'].shape == (16, 2, 8, 8, 1)
  out = steps.make_eval_step(config, model, mesh)(
      params, state, parallel.global_batch(batch, mesh))
  # Per-clip logits by hand, then the mean of their sigmoids.
  logits, _ = model.apply(params, state, None,
                          batch['inputs'].reshape(32, 8, 8, 1),
                          is_training=False)
  expected = jax.nn.sigmoid(logits).reshape(16, 2, -1).mean(1)
  np.testing.assert_allclose(out['scores'], expected, rtol=1e-5, atol=1e-6)
  assert float(out['sums']['count']) == 16 == math.fsum(batch['mask'])
  assert out['labels'].shape == (16, 4)


# --------------------------------------------------------------- configs ----

CONFIGS = ['imagenet', 'audioset', 'modelnet40', 'fashion_mnist']


@pytest.mark.parametrize('name', CONFIGS)
def test_configs_have_training_sections_and_valid_sweeps(name):
  import importlib  # pylint: disable=g-import-not-at-top
  from experiments import setup  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(f'configs.{name}')
  for arg in ('', 'runlocal', 'runlocal,synthetic'):
    config = module.get_config(arg)
    setup.check_config(config)  # durations, data dirs, dataset module
    assert config.loss in losses.LOSSES
    assert config.schedule.kind in optimizers.SCHEDULE_KINDS
  sweeps = [getattr(module, n) for n in dir(module) if n.startswith('sweep_')]
  assert sweeps
  config = module.get_config()
  for sweep_fn in sweeps:
    for point in sweep_fn():
      for key, value in point.items():
        node = config
        for part in key.split('.'):
          node = node[part]  # KeyError: the sweep names a missing field
        assert node is None or type(node) is type(value), (key, value)


def test_paper_optimizer_settings():
  from configs import imagenet, modelnet40  # pylint: disable=g-import-not-at-top
  config = imagenet.get_config()
  assert config.optimizer.lr == 0.004 and config.num_epochs == 120
  assert tuple(config.schedule.boundaries) == (84, 102, 114)
  assert config.schedule.unit == 'epochs' and config.schedule.decay_factor == 0.1
  config = modelnet40.get_config()
  assert config.optimizer.lr == 1e-3 and config.schedule.kind == 'constant'
  assert config.batch_size == 512 and config.num_train_steps == 50_000


def test_durations_in_epochs_use_the_dataset_size():
  from experiments import setup  # pylint: disable=g-import-not-at-top
  config = testing.get_config()
  config.num_train_steps = None
  config.num_epochs = 2.5  # 64 training examples at batch 16: 4 steps/epoch
  assert setup.num_train_steps(config, synthetic) == 10
  config.schedule.update(kind='piecewise', boundaries=(1, 2), unit='epochs',
                         warmup=0)
  _, schedule = optimizers.from_config(
      config, total_steps=10,
      steps_per_epoch=setup.steps_per_epoch_fn(config, synthetic))
  lr = config.optimizer.lr
  assert [float(schedule(s)) for s in (3, 4, 7, 8)] == pytest.approx(
      [lr, lr * 0.1, lr * 0.1, lr * 0.01])
  config.num_train_steps = 10
  with pytest.raises(setup.ConfigError, match='exactly one of'):
    setup.check_config(config)

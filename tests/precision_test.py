"""Mixed precision (experiments/precision.py, config.mixed_precision='bf16').

A 30-step run of the runner's own train step on fixed synthetic batches with
the tiny test config (tests/testing.py), in float32 and in bf16:
- the bf16 loss stays within LOSS_RTOL (relative) of the float32 loss at
  every step;
- parameters and optimizer state are float32 before and after;
- the forward really computes in bf16: the lowered train step has dot
  products with bf16 operands, and the float32 step has none.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import modeling
from experiments import optimizers
from experiments import parallel
from experiments import precision
from experiments import steps
from tests import testing

NUM_STEPS = 30
# bf16 keeps 8 bits of mantissa (relative rounding 2^-9 ~ 0.2% per op); over
# 30 Adam steps the two runs' parameters drift apart. Measured on CPU: the
# largest relative gap over the 30 steps is 1.4%; 5% leaves a margin without
# hiding a broken bf16 path (a wrong cast or an overflow moves it far more).
LOSS_RTOL = 0.05


def _config(mixed_precision):
  config = testing.get_config()
  # A little wider than the fixture, so that the dots are real matmuls.
  config.input_shape = (16, 16, 1)
  config.input.max_resolution = (16, 16)
  config.input.factored = True
  config.model.update(num_latents=16, latent_channels=32, num_blocks=2,
                      num_self_attends_per_block=1)
  config.optimizer.update(lr=3e-3, weight_decay=0.0, clip_grad_norm=0.0)
  config.mixed_precision = mixed_precision
  return config


def _batches(config, mesh):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(2):  # two fixed batches, cycled: the loss can fall.
    inputs = rng.normal(size=(16,) + config.input_shape).astype(np.float32)
    labels = rng.integers(0, 4, size=16).astype(np.int32)
    out.append(parallel.global_batch(
        {'inputs': inputs, 'labels': labels, 'mask': np.ones(16, bool)},
        mesh))
  return out


def _run(mixed_precision):
  config = _config(mixed_precision)
  mesh = parallel.make_mesh()
  model = modeling.build_model(config)
  schedule = optimizers.make_schedule(
      lr=config.optimizer.lr, total_steps=NUM_STEPS,
      **dict(config.schedule.to_dict(), unit='steps'))
  optimizer = optimizers.make_optimizer(schedule=schedule,
                                        **config.optimizer.to_dict())
  state = steps.create_train_state(config, model, optimizer, mesh)
  train_step = steps.make_train_step(config, model, optimizer, mesh)
  batches = _batches(config, mesh)
  lowered = train_step.lower(state, steps.zero_metrics(mesh), batches[0])
  compiled = lowered.compile()
  dtypes_before = {x.dtype for x in jax.tree.leaves(
      (state.params, state.opt_state)) if jnp.issubdtype(x.dtype, jnp.floating)}
  losses = []
  for i in range(NUM_STEPS):
    state, sums = compiled(state, steps.zero_metrics(mesh), batches[i % 2])
    losses.append(float(sums['loss']))
  dtypes_after = {x.dtype for x in jax.tree.leaves(
      (state.params, state.opt_state)) if jnp.issubdtype(x.dtype, jnp.floating)}
  return np.array(losses), dtypes_before, dtypes_after, lowered.as_text()


@pytest.fixture(scope='module')
def runs():
  return {name: _run(name) for name in (None, 'bf16')}


def test_bf16_loss_tracks_fp32(runs):
  fp32, bf16 = runs[None][0], runs['bf16'][0]
  assert np.all(np.isfinite(bf16))
  assert fp32[-1] < fp32[0]  # it learns
  rel = np.abs(bf16 - fp32) / np.abs(fp32)
  print('max relative loss gap bf16 vs fp32:', rel.max())
  assert rel.max() < LOSS_RTOL, (rel, fp32, bf16)


def test_params_and_optimizer_state_stay_float32(runs):
  for name in (None, 'bf16'):
    _, before, after, _ = runs[name]
    assert before == {jnp.dtype(jnp.float32)}
    assert after == {jnp.dtype(jnp.float32)}


def _bf16_dots(stablehlo: str) -> int:
  # The program as JAX hands it to XLA (XLA's CPU backend may later upcast
  # bf16 dots it has no kernel for; GPUs and TPUs run them as written).
  return sum(1 for line in stablehlo.splitlines()
             if 'dot_general' in line and 'bf16' in line)


def test_forward_computes_in_bf16(runs):
  assert _bf16_dots(runs['bf16'][3]) > 0
  assert _bf16_dots(runs[None][3]) == 0


def test_jaxpr_of_forward_has_bf16_dots():
  config = _config('bf16')
  model = modeling.build_model(config)
  x = jnp.zeros((2,) + config.input_shape, jnp.float32)
  params, state = model.init(jax.random.key(0), x, is_training=True)
  jaxpr = jax.make_jaxpr(lambda p: model.apply(p, state, None, x,
                                               is_training=False))(params)
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == 'dot_general']
  assert dots and all(e.invars[0].aval.dtype == jnp.bfloat16 for e in dots)
  logits, _ = jaxpr.out_avals[0], None
  assert logits.dtype == jnp.float32


def test_unknown_policy_fails_and_none_is_fp32():
  assert precision.get_policy(None) is None
  assert precision.get_policy('bf16').compute_dtype == jnp.bfloat16
  with pytest.raises(Exception):
    modeling.build_model(_config('bf17'))

"""The pure, jitted pieces of training: state, train step, evaluation step.

Shapes: G global batch, C clips per example (evaluation only), K classes,
S one example's input shape (config.input_shape; a dict for audio+video).

  TrainState  (params, state, opt_state, rng, step): Haiku parameters and
              state, optimizer state, the run's base PRNG key, the step.
  train_step  (TrainState, Metrics, batch) -> (TrainState, Metrics); the
              per-step key is fold_in(rng, step), so a resumed run draws the
              numbers an uninterrupted one would. Metrics are running sums
              that stay on the device until the runner logs them.
  eval_step   (params, state, batch) -> masked sums (+ scores for mAP).

All are `jax.jit`s over a mesh: batch split on 'data', state replicated,
state and metrics donated; on CPU under malloc's defaults the steps'
temporaries come in blocks of at most 8 MiB (host_memory.compiler_options).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import optax

from experiments import host_memory
from experiments import losses
from experiments import metrics
from experiments import mixing
from experiments import modeling
from experiments import parallel

Metrics = dict[str, jax.Array]


class TrainState(NamedTuple):
  params: hk.Params
  state: hk.State
  opt_state: optax.OptState
  rng: jax.Array  # uint32 [2], the run's base key; constant.
  step: jax.Array  # int32 [], steps taken.


def _dummy_inputs(config):
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                      modeling.example_inputs(config, batch_size=1))


def _init_fn(config, model, optimizer):
  def init(seed_key):
    params_key, base_key = jax.random.split(seed_key)
    params, state = model.init(params_key, _dummy_inputs(config),
                               is_training=True)
    return TrainState(params, state, optimizer.init(params), base_key,
                      jnp.zeros((), jnp.int32))
  return init


def create_train_state(config, model, optimizer, mesh) -> TrainState:
  """Fresh state from config.seed, replicated over the mesh."""
  init = jax.jit(_init_fn(config, model, optimizer),
                 out_shardings=parallel.replicated(mesh))
  return init(jax.random.PRNGKey(config.seed))


def abstract_train_state(config, model, optimizer, mesh) -> TrainState:
  """Shapes, dtypes and (replicated) shardings of the state; no compute."""
  shapes = jax.eval_shape(_init_fn(config, model, optimizer),
                          jax.random.PRNGKey(config.seed))
  sharding = parallel.replicated(mesh)
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
      shapes)


def zero_metrics(mesh) -> Metrics:
  """Running sums of the train step, on the devices."""
  names = ('loss', 'grad_norm', 'steps', 'nonfinite')
  return parallel.replicate({k: jnp.zeros((), jnp.float32) for k in names},
                            mesh)


def make_train_step(config, model, optimizer, mesh):
  """The jitted train step; see the module docstring."""
  loss_fn = losses.loss_fn(config.loss, label_smoothing=config.label_smoothing)
  mix = config.mixup.to_dict()
  mixing_on = bool(mix['mixup_alpha'] or mix['cutmix_alpha'])
  num_classes = config.model.num_classes

  def train_step(state: TrainState, sums: Metrics, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    mix_rng, apply_rng = jax.random.split(rng)
    inputs, labels = batch['inputs'], batch['labels']  # [G, S], [G] / [G, K]
    if mixing_on:
      inputs, labels = mixing.mix(
          mix_rng, inputs, losses.dense_labels(labels, num_classes), **mix)

    def objective(params):
      logits, model_state = model.apply(params, state.state, apply_rng,
                                        inputs, is_training=True)  # [G, K]
      return loss_fn(logits, labels, batch['mask']), model_state

    (loss, model_state), grads = jax.value_and_grad(
        objective, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state,
                                          state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)  # optax.global_norm is deprecated
    bad = jnp.logical_not(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    sums = {'loss': sums['loss'] + loss,
            'grad_norm': sums['grad_norm'] + grad_norm,
            'steps': sums['steps'] + 1.0,
            'nonfinite': sums['nonfinite'] + bad.astype(jnp.float32)}
    new_state = TrainState(params, model_state, opt_state, state.rng,
                           state.step + 1)
    return new_state, sums

  rep, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(train_step, in_shardings=(rep, rep, data),
                 out_shardings=(rep, rep), donate_argnums=(0, 1),
                 compiler_options=host_memory.compiler_options(mesh))


def _example_ranks(input_shape) -> Any:
  if isinstance(input_shape, ml_collections.ConfigDict):
    input_shape = input_shape.to_dict()
  if isinstance(input_shape, Mapping):
    return {k: len(v) for k, v in input_shape.items()}
  return len(input_shape)


def has_clips(inputs, input_shape) -> bool:
  """Whether inputs are [B, C, S] (several clips) rather than [B, S]."""
  ranks = _example_ranks(input_shape)
  if isinstance(inputs, Mapping):
    return any(inputs[k].ndim == ranks[k] + 2 for k in ranks)
  return inputs.ndim == ranks + 2


def make_eval_step(config, model, mesh):
  """The jitted evaluation step; see the module docstring.

  Returns {'sums': masked sums (top1, top5, loss, count)} and, for
  multi-label data, 'scores' [G, K], 'labels' [G, K] and 'mask' [G] for mAP.
  All outputs are replicated, so every process holds the whole batch.
  """
  multi_label = config.loss == 'sigmoid'
  input_shape = config.input_shape
  num_classes = config.model.num_classes

  def eval_step(params, model_state, batch):
    inputs, mask = batch['inputs'], batch['mask']
    labels = batch['labels']  # [G] or [G, K]
    if has_clips(inputs, input_shape):
      b, c = jax.tree.leaves(inputs)[0].shape[:2]
      flat = jax.tree.map(lambda x: x.reshape((b * c,) + x.shape[2:]),
                          inputs)  # [G C, S]
      logits, _ = model.apply(params, model_state, None, flat,
                              is_training=False)  # [G C, K]
      scores = metrics.clip_scores(logits.reshape(b, c, -1),
                                   multi_label=multi_label)  # [G, K]
      per_example = metrics.probability_cross_entropy(
          scores, labels, multi_label=multi_label)  # [G]
    else:
      logits, _ = model.apply(params, model_state, None, inputs,
                              is_training=False)  # [G, K]
      scores = (jax.nn.sigmoid(logits) if multi_label
                else jax.nn.softmax(logits))  # [G, K]
      per_example = losses.per_example_loss(
          config.loss, logits, labels)  # [G]
    out = {'sums': metrics.masked_sums(scores, labels, mask, per_example)}
    if multi_label:
      out.update(scores=scores, mask=mask,
                 labels=losses.dense_labels(labels, num_classes))
    return out

  rep, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(eval_step, in_shardings=(rep, rep, data), out_shardings=rep,
                 compiler_options=host_memory.compiler_options(mesh))

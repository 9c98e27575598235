"""Evaluation over a whole split, each example counted once, on the mesh.

Shapes: G global evaluation batch, K classes.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import ml_collections
import numpy as np

from experiments import checkpointing
from experiments import metrics as metrics_lib
from experiments import optimizers
from experiments import parallel
from experiments import setup
from experiments import steps as steps_lib

TrainState = steps_lib.TrainState


def evaluate(config, state: TrainState, eval_step, dataset, mesh, *,
             split: Optional[str] = None) -> dict[str, float]:
  """Metrics over the whole evaluation split, each example counted once:
  top1, top5, loss, num_examples, and map for multi-label data."""
  split = split or config.eval_split
  _, eval_batch = setup.batch_sizes(config, mesh)
  batches = dataset.load(split, batch_size=eval_batch, is_training=False,
                         seed=config.seed, process_index=jax.process_index(),
                         process_count=jax.process_count(),
                         **config.data.to_dict())
  sums, scores, labels = None, [], []
  for local_batch in batches:
    out = eval_step(state.params, state.state,
                    parallel.global_batch(local_batch, mesh))
    sums = out['sums'] if sums is None else jax.tree.map(
        lambda a, b: a + b, sums, out['sums'])
    if 'scores' in out:
      keep = parallel.fetch(out['mask'])
      scores.append(parallel.fetch(out['scores'])[keep])
      labels.append(parallel.fetch(out['labels'])[keep])
  if sums is None:
    raise ValueError(f'Evaluation split {split!r} yielded no batches.')
  result = metrics_lib.finalize(parallel.fetch(sums))
  if scores:
    result['map'] = metrics_lib.mean_average_precision(
        np.concatenate(scores), np.concatenate(labels))
  return result


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *,
                        step: Optional[int] = None, split: Optional[str] = None,
                        mesh=None) -> dict[str, float]:
  """Metrics of a saved run (its latest checkpoint, or `step`) on `split`
  (default config.eval_split), without training."""
  setup.check_config(config)
  mesh = mesh or parallel.make_mesh()
  setup.batch_sizes(config, mesh)
  dataset = setup.dataset_module(config)
  model = steps_lib.build_model(config)
  optimizer, _ = optimizers.from_config(
      config, total_steps=setup.num_train_steps(config, dataset),
      steps_per_epoch=setup.steps_per_epoch_fn(config, dataset))
  checkpointer = checkpointing.Checkpointer(
      os.path.join(workdir, 'checkpoints'), max_to_keep=None)
  try:
    step = checkpointer.latest_step() if step is None else step
    if step is None:
      raise setup.ConfigError(f'No checkpoint in {checkpointer.directory}.')
    abstract = steps_lib.abstract_train_state(config, model, optimizer, mesh)
    state = TrainState(**checkpointer.restore(abstract._asdict(), step))
  finally:
    checkpointer.close()
  eval_step = steps_lib.make_eval_step(config, model, mesh)
  return dict(evaluate(config, state, eval_step, dataset, mesh, split=split),
              step=step)

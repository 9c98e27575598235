"""Evaluation over a whole split, each example counted once, on the mesh.

Shapes: G global evaluation batch, K classes.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple, Optional

import jax
import ml_collections
import numpy as np

from experiments import checkpointing
from experiments import metrics as metrics_lib
from experiments import modeling
from experiments import parallel
from experiments import setup
from experiments import steps as steps_lib

TrainState = steps_lib.TrainState


def evaluate(config, state, eval_step, dataset, mesh, *,
             split: Optional[str] = None) -> dict[str, float]:
  """Metrics over the whole evaluation split, each example counted once:
  top1, top5, loss, num_examples, and map for multi-label data. `state` is a
  TrainState or a Restored (its params and state are used)."""
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


class Restored(NamedTuple):
  """What evaluation and figures need of a checkpoint (no optimizer state)."""
  params: Any
  state: Any
  step: int


def abstract_model(config, model, mesh) -> dict[str, Any]:
  """{'params', 'state'} as replicated jax.ShapeDtypeStructs; no compute."""
  shapes = jax.eval_shape(
      lambda key, x: model.init(key, x, is_training=True),
      jax.random.PRNGKey(0), modeling.example_inputs(config, batch_size=1))
  sharding = parallel.replicated(mesh)
  params, state = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
      shapes)
  return {'params': params, 'state': state}


def restore_model(config, model, workdir: str, mesh, *,
                  step: Optional[int] = None) -> Restored:
  """Parameters and model state of the newest intact checkpoint of a run
  (or of `step`), without the optimizer state; CheckpointError if there is
  none or `step` is damaged."""
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory) and '://' not in directory:
    raise checkpointing.CheckpointError(f'no checkpoint in {directory}.')
  checkpointer = checkpointing.Checkpointer(directory, max_to_keep=None,
                                            read_only=True)
  try:
    found, tree = checkpointing.restore(
        checkpointer, abstract_model(config, model, mesh), step=step,
        partial=True)
  finally:
    checkpointer.close()
  if found is None:
    raise checkpointing.CheckpointError(
        f'no intact checkpoint in {checkpointer.directory}.')
  return Restored(tree['params'], tree['state'], found)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *,
                        step: Optional[int] = None, split: Optional[str] = None,
                        mesh=None) -> dict[str, float]:
  """Metrics of a saved run (its newest intact checkpoint, or `step`) on
  `split` (default config.eval_split), without training."""
  dataset = setup.check_config(config)
  mesh = mesh or parallel.make_mesh()
  setup.batch_sizes(config, mesh)
  model = modeling.build_model(config)
  restored = restore_model(config, model, workdir, mesh, step=step)
  eval_step = steps_lib.make_eval_step(config, model, mesh)
  return dict(evaluate(config, restored, eval_step, dataset, mesh,
                       split=split), step=restored.step)

"""Deterministic batching of datasets held in memory as numpy arrays.

Used by the small datasets (Fashion-MNIST, ModelNet40) that fit in host memory,
so their pipelines need no tf.data and resume exactly by index arithmetic.

Shapes: B per-process batch, N examples in the split, n examples in this
process's shard.

Training order. Process p of P owns the contiguous shard
`np.array_split(arange(N), P)[p]` (disjoint, sizes differ by at most one). Its
example stream is the concatenation of epochs 0, 1, 2, ...; epoch e is the
permutation of the shard drawn from `np.random.default_rng([seed, e])`. Batch s
is stream positions [s*B, (s+1)*B), so batches run across epoch boundaries
and batch s is computed directly from (seed, s): `start_step=s` costs nothing.
Augmentation for batch s draws from `np.random.default_rng([seed, s, p, 1])`.

Evaluation. Every process yields the same number of batches,
ceil(max shard size / B), so multi-host evaluation steps stay in lockstep; the
padding rows are zeros with mask False.
"""
import functools
import itertools
import math
from typing import Callable, Iterator, Mapping, Optional

import numpy as np

Batch = dict[str, np.ndarray]


def shard_indices(num_examples: int, process_index: int,
                  process_count: int) -> np.ndarray:
  """Indices of the examples owned by `process_index` ([n] int64)."""
  if not 0 <= process_index < process_count:
    raise ValueError(
        f'process_index={process_index} not in [0, {process_count}).')
  if num_examples < process_count:
    raise ValueError(f'{num_examples} examples cannot be sharded over '
                     f'{process_count} processes.')
  return np.array_split(np.arange(num_examples), process_count)[process_index]


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)  # [n]


def train_positions(n: int, *, batch_size: int, step: int,
                    seed: int) -> np.ndarray:
  """Shard-local indices of training batch `step` ([B] int64)."""
  stream = np.arange(step * batch_size, (step + 1) * batch_size)  # [B]
  epochs, offsets = np.divmod(stream, n)
  out = np.empty(batch_size, np.int64)
  for epoch in np.unique(epochs):
    sel = epochs == epoch
    out[sel] = _epoch_permutation(seed, int(epoch), n)[offsets[sel]]
  return out


def train_batches(
    arrays: Mapping[str, np.ndarray],
    *,
    batch_size: int,
    seed: int,
    start_step: int,
    process_index: int,
    process_count: int,
    transform: Callable[[Batch, Optional[np.random.Generator]], Batch],
    augment: bool,
) -> Iterator[Batch]:
  """Yields training batches forever, from batch `start_step` on.

  Args:
    arrays: equal-length arrays of the whole split (the same on every process).
    transform: (raw batch, rng or None) -> batch with `inputs` and `labels`;
      called with an rng only when `augment`.
  """
  num = len(next(iter(arrays.values())))
  shard = shard_indices(num, process_index, process_count)  # [n]
  for step in itertools.count(start_step):
    idx = shard[train_positions(len(shard), batch_size=batch_size, step=step,
                                seed=seed)]  # [B]
    rng = (np.random.default_rng([seed, step, process_index, 1])
           if augment else None)
    batch = transform({k: a[idx] for k, a in arrays.items()}, rng)
    batch['mask'] = np.ones(batch_size, bool)
    yield batch


def num_eval_batches(num_examples: int, *, batch_size: int,
                     process_count: int) -> int:
  """Batches each process yields for one evaluation pass."""
  return math.ceil(math.ceil(num_examples / process_count) / batch_size)


def eval_batches(
    arrays: Mapping[str, np.ndarray],
    *,
    batch_size: int,
    process_index: int,
    process_count: int,
    transform: Callable[[Batch, Optional[np.random.Generator]], Batch],
) -> Iterator[Batch]:
  """Yields one pass over this process's shard in order, padded with mask."""
  num = len(next(iter(arrays.values())))
  shard = shard_indices(num, process_index, process_count)  # [n]
  steps = num_eval_batches(num, batch_size=batch_size,
                           process_count=process_count)
  for step in range(steps):
    idx = shard[step * batch_size:(step + 1) * batch_size]
    batch = transform({k: a[idx] for k, a in arrays.items()}, None)
    valid = len(idx)
    if valid < batch_size:
      batch = {k: np.concatenate(
          [v, np.zeros((batch_size - valid,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
    batch['mask'] = np.arange(batch_size) < valid
    yield batch

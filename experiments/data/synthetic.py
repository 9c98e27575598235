"""A small made-up dataset with the interface of every dataset module here,
for exercising the runner without real data (tests, `:synthetic` configs).

Shapes: B per-process batch, G global batch (B x process count), K classes,
C clips per example at evaluation, S the example shape (`input_shape`; a dict
of shapes gives dict inputs, as the audio+video model takes).

Example i of a split is a function of (seed, split, i) alone: its label(s)
are drawn from `np.random.default_rng([seed, split id, i])`, and its input is
the class prototype (sum of prototypes when multi-label) plus Gaussian noise,
so a model can learn it. Training reads an endless stream in which epoch e is
the permutation `default_rng([seed, 2, e])` of the training examples; global
batch s is stream positions [s G, (s + 1) G) and process p takes rows
[p B, (p + 1) B) of it. So the global batch, and a run's result, does not
depend on how many processes read it, and `start_step` costs nothing.
Evaluation makes one pass in global batches of G, the last one padded with
mask False; every process yields the same number of batches.
"""

from __future__ import annotations

import math
import time
from typing import Iterator, Mapping, Optional, Sequence, Union

import numpy as np

NUM_CLASSES = 10
_SPLIT_IDS = {'train': 0, 'test': 1, 'validation': 1, 'eval': 1}
Shape = Union[Sequence[int], Mapping[str, Sequence[int]]]


def num_examples(split: str, *, num_train_examples: int = 256,
                 num_eval_examples: int = 50, **unused) -> int:
  del unused
  _split_id(split)
  return num_train_examples if split == 'train' else num_eval_examples


def _split_id(split: str) -> int:
  if split not in _SPLIT_IDS:
    raise ValueError(f'Synthetic split {split!r} is not one of '
                     f'{sorted(_SPLIT_IDS)}.')
  return _SPLIT_IDS[split]


def _prototypes(seed: int, shape: Shape, num_classes: int):
  rng = np.random.default_rng([seed, 3])
  if isinstance(shape, Mapping):
    return {k: _prototypes(seed + 1 + i, v, num_classes)
            for i, (k, v) in enumerate(sorted(shape.items()))}
  return rng.normal(size=(num_classes,) + tuple(shape)).astype(np.float32)


def _example(seed: int, split_id: int, index: int, *, protos, shape: Shape,
             num_classes: int, multi_label: bool, num_clips: int,
             noise: float):
  """(inputs [S] or [C, S], label int or multi-hot [K]) of example `index`."""
  rng = np.random.default_rng([seed, split_id, index])
  if multi_label:
    label = np.zeros(num_classes, np.float32)
    label[rng.choice(num_classes, size=rng.integers(1, 4),
                     replace=False)] = 1.0
    weights = label
  else:
    label = np.int32(rng.integers(num_classes))
    weights = np.eye(num_classes, dtype=np.float32)[label]

  def make(proto, shape):
    clean = np.tensordot(weights, proto, axes=1)  # [S]
    clips = clean + noise * rng.normal(
        size=(num_clips,) + tuple(shape)).astype(np.float32)  # [C, S]
    return clips if num_clips > 1 else clips[0]

  if isinstance(shape, Mapping):
    inputs = {k: make(protos[k], shape[k]) for k in sorted(shape)}
  else:
    inputs = make(protos, shape)
  return inputs, label


def _stack(items):
  if isinstance(items[0], dict):
    return {k: np.stack([x[k] for x in items]).astype(np.float32)
            for k in items[0]}
  return np.stack(items)


def _batch(indices, valid, **kwargs):
  pairs = [_example(index=int(i), **kwargs) for i in indices]
  batch = {'inputs': _stack([p[0] for p in pairs]),
           'labels': _stack([p[1] for p in pairs]),
           'mask': np.asarray(valid, bool)}
  if not isinstance(batch['inputs'], dict):
    batch['inputs'] = batch['inputs'].astype(np.float32)
  return batch


def load(split: str, *, batch_size: int, is_training: bool, seed: int = 0,
         start_step: int = 0, process_index: int = 0, process_count: int = 1,
         data_dir: Optional[str] = None, input_shape: Shape = (8, 8, 1),
         num_classes: int = NUM_CLASSES, multi_label: bool = False,
         num_clips: int = 1, num_train_examples: int = 256,
         num_eval_examples: int = 50, noise: float = 0.5,
         seconds_per_batch: float = 0.0) -> Iterator[dict[str, np.ndarray]]:
  """Batches of the synthetic dataset; see the module docstring.

  Args:
    input_shape: shape of one example's input, or a dict of shapes.
    multi_label: multi-hot float labels [B, K] (1 to 3 classes each).
    num_clips: at evaluation, inputs are [B, num_clips, ...] when > 1.
    noise: std of the noise added to the class prototypes.
    seconds_per_batch: sleep before each training batch (a slow input
      pipeline, for tests that interrupt a run).
  """
  del data_dir  # Made up here; nothing is read.
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in '
                     f'[0, {process_count}).')
  split_id = _split_id(split)
  size = num_examples(split, num_train_examples=num_train_examples,
                      num_eval_examples=num_eval_examples)
  kwargs = dict(seed=seed, split_id=split_id, shape=input_shape,
                num_classes=num_classes, multi_label=multi_label,
                protos=_prototypes(seed, input_shape, num_classes),
                num_clips=1 if is_training else num_clips, noise=noise)
  global_batch = batch_size * process_count
  offset = process_index * batch_size
  if is_training:
    return _train(size, global_batch, offset, batch_size, start_step,
                  seconds_per_batch, kwargs)
  return _eval(size, global_batch, offset, batch_size, kwargs)


def _train(size, global_batch, offset, batch_size, start_step,
           seconds_per_batch, kwargs):
  step = start_step
  while True:
    if seconds_per_batch:
      time.sleep(seconds_per_batch)
    positions = step * global_batch + offset + np.arange(batch_size)  # [B]
    epochs, within = np.divmod(positions, size)
    orders = {int(e): np.random.default_rng([kwargs['seed'], 2, int(e)])
              .permutation(size) for e in np.unique(epochs)}
    indices = [orders[int(e)][w] for e, w in zip(epochs, within)]
    yield _batch(indices, np.ones(batch_size, bool), **kwargs)
    step += 1


def _eval(size, global_batch, offset, batch_size, kwargs):
  for step in range(math.ceil(size / global_batch)):
    positions = step * global_batch + offset + np.arange(batch_size)  # [B]
    valid = positions < size
    yield _batch(np.where(valid, positions, 0), valid, **kwargs)

"""tf.data plumbing shared by the TFDS-backed datasets (ImageNet, AudioSet).

Shapes: B per-process batch, n examples in this process's shard.

Preparation. `prepare` builds a TFDS dataset from the user's manual directory
when it is not prepared yet, with downloads and GCS switched off; a missing
directory or an unprepared dataset without a manual directory is an error
naming the path. Nothing here ever downloads.

Sharding. Process p reads `tfds.split_for_jax_process(split)` for p: disjoint
shards of (nearly) equal size.

Training order. The example stream of a process is epochs 0, 1, 2, ... of its
shard; epoch e reads the shard's TFRecord files in an order drawn from
(seed, e), interleaved, through a shuffle buffer seeded from (seed, e).
Batch s is stream positions [s*B, (s+1)*B). Every example's random
augmentation is drawn by stateless ops from the key
fold_in([seed, process_index], position) (position in the stream), and batch
operations (MixUp, CutMix) from fold_in([seed, process_index], -1 - s). So the
data depend only on (seed, step), never on threading; `start_step=s` starts
at epoch floor(s*B/n) and skips the remaining records of that epoch before
decoding (reading at most one epoch of records, decoding none of them).
The shuffle buffers' op seeds combine with TF's global seed, so a program
that calls tf.random.set_seed gets a different (still deterministic) order.

Evaluation. One ordered pass over the shard, padded with zero examples
(mask False) to ceil(ceil(N/P)/B) batches on every process.
"""
import contextlib
import fcntl
import math
import os
from typing import Any, Callable, Iterator, Optional

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

Example = dict[str, Any]
_CYCLE_LENGTH = 16  # TFRecord files read at once.


def prepare(builder: tfds.core.DatasetBuilder, *, data_dir: Optional[str],
            manual_dir: Optional[str]) -> tfds.core.DatasetBuilder:
  """Returns `builder` prepared, building it from `manual_dir` if needed."""
  if builder.is_prepared():
    return builder
  where = builder.data_dir
  if manual_dir is None:
    if data_dir is not None and not os.path.isdir(data_dir):
      raise FileNotFoundError(
          f'data_dir {data_dir} does not exist and no manual_dir was given '
          f'to build {builder.name} from.')
    raise FileNotFoundError(
        f'{builder.name} is not prepared in {where}; pass manual_dir= the '
        'directory of the downloaded files to build it.')
  if not os.path.isdir(manual_dir):
    raise FileNotFoundError(
        f'manual_dir {manual_dir} for {builder.name} does not exist.')
  with _build_lock(os.fspath(where)):
    if builder.is_prepared():  # built by another process while we waited
      logging.info('%s was built in %s by another process.', builder.name,
                   where)
      builder.info.read_from_directory(builder.data_dir)
      return builder
    logging.info('Building %s in %s from %s', builder.name, where, manual_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir, try_download_gcs=False,
        compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder


@contextlib.contextmanager
def _build_lock(data_path: str) -> Iterator[None]:
  """Holds an exclusive lock beside a local dataset's directory while it is
  built: two runs that start at once on the same new data_dir (e.g.
  launch.reproduce --jobs=2) build it once, the second waits and reads it.
  Remote paths (gs://) are not locked."""
  if '://' in data_path:
    yield
    return
  parent = os.path.dirname(os.path.normpath(data_path))
  os.makedirs(parent, exist_ok=True)
  with open(os.path.join(parent, '.build.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def process_split(split: str, process_index: int, process_count: int) -> str:
  if not 0 <= process_index < process_count:
    raise ValueError(
        f'process_index={process_index} not in [0, {process_count}).')
  return tfds.split_for_jax_process(split, process_index=process_index,
                                    process_count=process_count)


def num_examples(builder: tfds.core.DatasetBuilder, split: str) -> int:
  return builder.info.splits[split].num_examples


def _base_key(seed: int, process_index: int) -> tf.Tensor:
  return tf.constant([seed, process_index], tf.int64)


def train_dataset(
    builder: tfds.core.DatasetBuilder,
    split: str,
    *,
    batch_size: int,
    seed: int,
    start_step: int,
    process_index: int,
    process_count: int,
    shuffle_buffer: int,
    decoders: Optional[dict[str, Any]],
    preprocess: Callable[[Example, tf.Tensor], Example],
) -> tf.data.Dataset:
  """Infinite, deterministic training batches (see the module docstring).

  Args:
    preprocess: (decoded example, key [2]) -> example with `inputs`, `labels`;
      the key seeds all of the example's stateless random ops.
  """
  if builder.info.file_format != tfds.core.FileFormat.TFRECORD:
    raise ValueError(f'{builder.name} in {builder.data_dir} is stored as '
                     f'{builder.info.file_format}; only tfrecord is supported.')
  shard = process_split(split, process_index, process_count)
  instructions = builder.info.splits[shard].file_instructions
  n = sum(fi.take for fi in instructions)
  if n == 0:
    raise ValueError(f'{builder.name} {shard} holds no examples.')
  paths = tf.constant([os.fspath(fi.filename) for fi in instructions])
  skips = tf.constant([fi.skip for fi in instructions], tf.int64)
  takes = tf.constant([fi.take for fi in instructions], tf.int64)
  base = _base_key(seed, process_index)
  features = builder.info.features

  def epoch_records(epoch):  # -> records of one epoch of the shard
    key = tf.random.experimental.stateless_fold_in(
        tf.constant([seed, 1 << 20], tf.int64), epoch)
    order = tf.argsort(tf.random.stateless_uniform([len(instructions)], key))
    files = tf.data.Dataset.from_tensor_slices(
        (tf.gather(paths, order), tf.gather(skips, order),
         tf.gather(takes, order)))
    records = files.interleave(
        lambda p, s, t: tf.data.TFRecordDataset(p).skip(s).take(t),
        cycle_length=min(_CYCLE_LENGTH, len(instructions)),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return records.shuffle(shuffle_buffer, seed=seed * 1_000_003 + epoch)

  offset = start_step * batch_size
  first_epoch, skip = divmod(offset, n)
  ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max)
  ds = ds.flat_map(epoch_records).skip(skip)
  ds = tf.data.Dataset.zip(ds, tf.data.Dataset.range(offset,
                                                     np.iinfo(np.int64).max))

  def decode_and_preprocess(record, position):
    example = features.deserialize_example(record, decoders=decoders)
    key = tf.random.experimental.stateless_fold_in(base, position)
    return preprocess(example, key)

  ds = ds.map(decode_and_preprocess, num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=True)
  ds = ds.map(lambda b: {**b, 'mask': tf.ones([batch_size], tf.bool)})
  return ds.with_options(_options()).prefetch(tf.data.AUTOTUNE)


def eval_dataset(
    builder: tfds.core.DatasetBuilder,
    split: str,
    *,
    batch_size: int,
    process_index: int,
    process_count: int,
    decoders: Optional[dict[str, Any]],
    preprocess: Callable[[Example], Example],
) -> tf.data.Dataset:
  """One ordered pass over this process's shard, padded (see docstring)."""
  shard = process_split(split, process_index, process_count)
  n = builder.info.splits[shard].num_examples
  total = builder.info.splits[split].num_examples
  steps = math.ceil(math.ceil(total / process_count) / batch_size)
  ds = builder.as_dataset(split=shard, shuffle_files=False, decoders=decoders)
  ds = ds.map(lambda ex: {**preprocess(ex), 'mask': tf.constant(True)},
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  padding = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype),
                                  ds.element_spec)
  ds = ds.concatenate(
      tf.data.Dataset.from_tensors(padding).repeat(steps * batch_size - n))
  ds = ds.batch(batch_size, drop_remainder=True)
  return ds.with_options(_options()).prefetch(tf.data.AUTOTUNE)


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  return options


def as_numpy(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
  return iter(tfds.as_numpy(ds))

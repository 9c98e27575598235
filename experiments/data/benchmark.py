r"""Input throughput of a dataset's training pipeline, in examples per second.

  python -m experiments.data.benchmark --dataset=fashion_mnist
  python -m experiments.data.benchmark --dataset=imagenet \
      --data_dir=/data/tfds --manual_dir=/data/ilsvrc2012 --batch_size=64
  python -m experiments.data.benchmark --dataset=audioset --data_dir=... \
      --kwargs=modality=audio_video,audio_format=mel

Builds `experiments.data.<dataset>.load(train_split, is_training=True, ...)`,
takes one batch (reported separately: it includes building the pipeline and
filling buffers), then times `--num_batches` more.
"""
import ast
import importlib
import time

from absl import app
from absl import flags

_DATASET = flags.DEFINE_string('dataset', 'fashion_mnist',
                               'Module name in experiments/data/.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Prepared TFDS data.')
_MANUAL_DIR = flags.DEFINE_string('manual_dir', None,
                                  'Downloaded files to build from.')
_SPLIT = flags.DEFINE_string('split', 'train', 'Training split.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 128, 'Per-process batch.')
_NUM_BATCHES = flags.DEFINE_integer('num_batches', 50, 'Batches timed.')
_KWARGS = flags.DEFINE_string(
    'kwargs', '', 'Extra load() kwargs as key=value,... (Python literals or '
    'strings).')


def parse_kwargs(text: str) -> dict[str, object]:
  out = {}
  for item in filter(None, text.split(',')):
    key, value = item.split('=', 1)
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def measure(dataset: str, *, batch_size: int, num_batches: int,
            split: str = 'train', **kwargs) -> tuple[float, float]:
  """(seconds to the first batch, examples/s over the next num_batches)."""
  module = importlib.import_module(f'experiments.data.{dataset}')
  start = time.perf_counter()
  batches = module.load(split, batch_size=batch_size, is_training=True,
                        **kwargs)
  next(batches)
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(num_batches):
    next(batches)
  return first, num_batches * batch_size / (time.perf_counter() - start)


def main(argv):
  del argv
  kwargs = parse_kwargs(_KWARGS.value)
  if _DATA_DIR.value:
    kwargs['data_dir'] = _DATA_DIR.value
  if _MANUAL_DIR.value:
    kwargs['manual_dir'] = _MANUAL_DIR.value
  first, rate = measure(_DATASET.value, batch_size=_BATCH_SIZE.value,
                        num_batches=_NUM_BATCHES.value, split=_SPLIT.value,
                        **kwargs)
  print(f'{_DATASET.value} {_SPLIT.value} batch {_BATCH_SIZE.value} '
        f'{kwargs}: first batch {first:.2f} s, then '
        f'{rate:,.0f} examples/s over {_NUM_BATCHES.value} batches.')


if __name__ == '__main__':
  app.run(main)

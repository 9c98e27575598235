"""Checks and sizes the runner needs before anything compiles: the dataset
module, data directories and splits, durations, batch sizes per process.

Every mistake found here is a `ConfigError` whose message fits on one line.
"""

from __future__ import annotations

import glob
import importlib
import os
from typing import Callable

from etils import epath
import jax
import ml_collections

from experiments import optimizers
from experiments import parallel


class ConfigError(ValueError):
  """A config or command-line mistake, found before anything compiles."""


def one_line(text: str) -> str:
  """First line of an error message, plus its last line when the first only
  announces it ('Error whilst parsing config file:')."""
  lines = [line.strip() for line in str(text).splitlines() if line.strip()]
  if not lines:
    return 'unknown error'
  if lines[0].endswith(':') and len(lines) > 1:
    return f'{lines[0]} {lines[-1]}'
  return lines[0]


def dataset_module(config: ml_collections.ConfigDict):
  """experiments.data.<config.dataset>, imported on demand."""
  try:
    return importlib.import_module(f'experiments.data.{config.dataset}')
  except ModuleNotFoundError as e:
    if e.name != f'experiments.data.{config.dataset}':
      raise
    known = sorted(
        os.path.basename(p)[:-3] for p in glob.glob(
            os.path.join(os.path.dirname(__file__), 'data', '[a-z]*.py'))
        if '\ndef load(' in open(p).read())
    raise ConfigError(f'Unknown dataset {config.dataset!r}: no module '
                      f'experiments/data/{config.dataset}.py (known: '
                      f'{known}).') from None


def check_data_dirs(config: ml_collections.ConfigDict) -> None:
  """Every config.data.*_dir that is set must be an existing directory."""
  for key, value in config.data.items():
    if key.endswith('_dir') and value is not None:
      if not epath.Path(value).is_dir():
        raise ConfigError(f'config.data.{key}={value!r} is not an existing '
                          'directory.')


def check_config(config: ml_collections.ConfigDict) -> None:
  """Checks that need no devices: durations, data dirs, dataset module."""
  if (config.num_train_steps is None) == (config.num_epochs is None):
    raise ConfigError('Set exactly one of config.num_train_steps and '
                      f'config.num_epochs (got {config.num_train_steps} and '
                      f'{config.num_epochs}).')
  for key in ('log_every_steps', 'checkpoint_every_steps'):
    if config[key] <= 0:
      raise ConfigError(f'config.{key}={config[key]} must be positive.')
  check_data_dirs(config)
  dataset_module(config)


def check_data(config, dataset) -> None:
  """Asks the dataset for the size of both splits, so missing or unprepared
  data is a one-line ConfigError before anything compiles."""
  for split in (config.train_split, config.eval_split):
    try:
      count = dataset.num_examples(split, **config.data.to_dict())
    except (OSError, ValueError) as e:
      raise ConfigError(f'dataset {config.dataset!r}, split {split!r}: '
                        f'{one_line(str(e))}') from None
    if count <= 0:
      raise ConfigError(f'dataset {config.dataset!r}, split {split!r} is '
                        'empty.')


def batch_sizes(config, mesh) -> tuple[int, int]:
  """Per-process (train, eval) batch sizes; ConfigError if they don't
  divide over the devices and processes."""
  try:
    return (parallel.check_batch_size(config.batch_size, mesh,
                                      jax.process_count(), 'batch_size'),
            parallel.check_batch_size(config.eval_batch_size, mesh,
                                      jax.process_count(), 'eval_batch_size'))
  except ValueError as e:
    raise ConfigError(str(e)) from None


def steps_per_epoch_fn(config, dataset) -> Callable[[], float]:
  """Steps in one epoch of the training split (asks the dataset lazily)."""
  def steps_per_epoch() -> float:
    num = dataset.num_examples(config.train_split, **config.data.to_dict())
    return num / config.batch_size
  return steps_per_epoch


def num_train_steps(config, dataset) -> int:
  if config.num_train_steps is not None:
    return int(config.num_train_steps)
  return optimizers.to_steps(config.num_epochs, 'epochs',
                             steps_per_epoch_fn(config, dataset))

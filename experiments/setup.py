"""Checks and sizes the runner needs before anything compiles: the dataset
module, data directories and splits, durations, batch sizes per process, and
the workdir (writable, locked by one run, holding the same config).

Every mistake found here is a `ConfigError` whose message fits on one line.
"""

from __future__ import annotations

import fcntl
import glob
import importlib
import json
import os
import socket
import time
import types
from typing import Any, Callable, Optional

from absl import logging
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


def builds_into_data_dir(module) -> bool:
  """Whether the dataset module prepares TFDS data into data_dir (through
  experiments/data/tfds_pipeline.py), so that a new data_dir is normal."""
  return isinstance(getattr(module, 'tfds_pipeline', None), types.ModuleType)


def check_data_dirs(config: ml_collections.ConfigDict, module) -> None:
  """Every config.data.*_dir that is set must be an existing directory, but
  the data_dir of a dataset built with TFDS, which may be new (the runner
  creates it: prepare_data_dirs)."""
  for key, value in config.data.items():
    if key.endswith('_dir') and value is not None:
      path = epath.Path(value)
      if path.is_dir():
        continue
      if (key == 'data_dir' and builds_into_data_dir(module) and
          not path.exists()):
        continue
      raise ConfigError(f'config.data.{key}={value!r} is not an existing '
                        'directory.')


def prepare_data_dirs(config: ml_collections.ConfigDict, module) -> None:
  """Creates the data_dir of a TFDS-built dataset if it does not exist."""
  value = config.data.get('data_dir', None)
  if value is None or not builds_into_data_dir(module):
    return
  try:
    epath.Path(value).mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ConfigError(f'config.data.data_dir={value!r} cannot be created '
                      f'({e.strerror or e}).') from None


def check_config(config: ml_collections.ConfigDict):
  """Checks that need no devices: durations, cadences, data dirs; returns
  the dataset module."""
  if (config.num_train_steps is None) == (config.num_epochs is None):
    raise ConfigError('Set exactly one of config.num_train_steps and '
                      f'config.num_epochs (got {config.num_train_steps} and '
                      f'{config.num_epochs}).')
  for key in ('num_train_steps', 'num_epochs'):
    if config[key] is not None and config[key] <= 0:
      raise ConfigError(f'config.{key}={config[key]} must be positive.')
  for key in ('log_every_steps', 'checkpoint_every_steps'):
    if config[key] <= 0:
      raise ConfigError(f'config.{key}={config[key]} must be positive.')
  if config.get('eval_every_steps', 0) and config.eval_every_steps < 0:
    raise ConfigError(f'config.eval_every_steps={config.eval_every_steps} '
                      'must be positive (or 0: final evaluation only).')
  keep = config.get('keep_checkpoints', None)
  if keep is not None and keep <= 0:
    raise ConfigError(f'config.keep_checkpoints={keep} must be positive (or '
                      'None: keep all).')
  module = dataset_module(config)
  check_data_dirs(config, module)
  return module


def check_data(config, dataset) -> None:
  """Asks the dataset for the size of both splits, so missing or unprepared
  data is a one-line ConfigError before anything compiles. A new data_dir
  of a TFDS-built dataset is created first."""
  prepare_data_dirs(config, dataset)
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


# -------------------------------------------------------------- workdir ----

CONFIG_NAME = 'config.json'
LOCK_NAME = 'run.lock'
# Fields a resumed run may change: how long it runs, how often it logs,
# evaluates and saves, and what it evaluates on (a finished run resumed to
# score another split, e.g. Table 7's train column).
RESUMABLE_FIELDS = ('num_train_steps', 'num_epochs', 'log_every_steps',
                    'eval_every_steps', 'checkpoint_every_steps',
                    'keep_checkpoints', 'eval_split', 'eval_batch_size')


def check_workdir(workdir: str) -> None:
  """ConfigError unless workdir (created if missing) and its checkpoints/
  are directories this process can write to."""
  if '://' in workdir:
    return
  for path in (workdir, os.path.join(workdir, 'checkpoints')):
    try:
      os.makedirs(path, exist_ok=True)
      probe = os.path.join(path, f'.write_test.{os.getpid()}')
      with open(probe, 'w') as f:
        f.write('ok')
      os.remove(probe)
    except FileExistsError:
      raise ConfigError(f'--workdir={workdir}: {path} is a file, not a '
                        'directory.') from None
    except OSError as e:
      raise ConfigError(f'--workdir={workdir}: {path} is not writable '
                        f'({(e.strerror or str(e)).lower()}).') from None


class WorkdirLock:
  """An exclusive lock on workdir/run.lock (flock: released by the kernel
  when the process dies) holding its owner's host, pid and start time.

  A second run on the workdir gets a ConfigError naming the owner. A lock
  file with an owner but no holder is a stale one of a run that died: it is
  taken over, with a warning. `release` empties the file.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_NAME)
    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      owner = self._owner(wait=True)
      os.close(self._fd)
      raise ConfigError(
          f'--workdir={workdir} is in use by another run ({_who(owner)}); '
          'wait for it to end, or use another --workdir.') from None
    previous = self._owner(wait=False)
    if previous:
      logging.warning('Taking over the stale lock %s of a run that is no '
                      'longer running (%s).', self.path, _who(previous))
    me = {'host': socket.gethostname(), 'pid': os.getpid(),
          'started': time.strftime('%Y-%m-%d %H:%M:%S')}
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, json.dumps(me).encode(), 0)
    os.fsync(self._fd)

  def _owner(self, wait: bool) -> dict[str, Any]:
    for _ in range(20 if wait else 1):  # the owner writes right after locking
      try:
        with open(self.path) as f:
          text = f.read()
        if text.strip():
          return json.loads(text)
      except (OSError, ValueError):
        pass
      if wait:
        time.sleep(0.05)
    return {}

  def release(self) -> None:
    if self._fd is None:
      return
    os.ftruncate(self._fd, 0)
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None


def _who(owner: dict[str, Any]) -> str:
  if not owner:
    return 'owner unknown'
  return (f'pid {owner.get("pid")} on host {owner.get("host")}, started '
          f'{owner.get("started")}')


def _flat(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flat(value, f'{prefix}{key}.'))
    return out
  return {prefix[:-1]: tree}


def config_changes(old: dict[str, Any], new: dict[str, Any]
                   ) -> dict[str, tuple[Any, Any]]:
  """{dotted key: (old value, new value)} of the fields that differ, but
  RESUMABLE_FIELDS; a missing key's value is '<absent>'."""
  old, new = _flat(old), _flat(new)
  return {key: (old.get(key, '<absent>'), new.get(key, '<absent>'))
          for key in sorted(set(old) | set(new))
          if key not in RESUMABLE_FIELDS and old.get(key, '<absent>') !=
          new.get(key, '<absent>')}


def check_resumed_config(config: ml_collections.ConfigDict, workdir: str, *,
                         step: Optional[int], allow_change: bool) -> None:
  """Resuming (a checkpoint of `step` exists) with a config that differs
  from workdir/config.json in anything but RESUMABLE_FIELDS is a
  ConfigError listing the differences, unless `allow_change`; then the old
  config is kept as config.before_step_STEP.json. Writes config.json."""
  path = epath.Path(workdir) / CONFIG_NAME
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if step is not None and path.exists():
    try:
      old = json.loads(path.read_text())
    except ValueError:
      old = None
    changes = (config_changes(old, json.loads(text)) if old is not None
               else {CONFIG_NAME: ('unreadable', 'this config')})
    if changes:
      listed = ', '.join(f'{key} {was!r} -> {now!r}'
                         for key, (was, now) in changes.items())
      if not allow_change:
        raise ConfigError(
            f'--workdir={workdir} holds a run (checkpoint of step {step}) '
            f'with another config: {listed}; use a new --workdir, or pass '
            '--allow_config_change to resume it with this config.')
      kept = epath.Path(workdir) / f'config.before_step_{step}.json'
      kept.write_text(path.read_text())
      logging.warning('Resuming step %d with a changed config (%s); the old '
                      'one is kept as %s.', step, listed, kept)
  path.write_text(text)

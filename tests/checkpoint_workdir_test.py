"""The workdir around the checkpoints, in-process: the lock, the config check
on resume, unwritable workdirs, metrics.jsonl after a resume, step counts,
data directories (a new TFDS one is created, an explicit IDX one never falls
back), and overrides of missing fields named from the config's own keys."""

import gzip
import json
import os

from absl import logging
import numpy as np
import pytest

from experiments import metric_writers
from experiments import setup
from experiments.data import fashion_mnist
from tests import testing


def test_a_second_lock_on_one_workdir_names_the_owner(tmp_path):
  lock = setup.WorkdirLock(str(tmp_path))
  owner = json.loads((tmp_path / setup.LOCK_NAME).read_text())
  assert owner['pid'] == os.getpid() and owner['host']
  with pytest.raises(setup.ConfigError) as raised:
    setup.WorkdirLock(str(tmp_path))
  assert str(raised.value).startswith(
      f'--workdir={tmp_path} is in use by another run (pid {os.getpid()} on '
      f'host {owner["host"]}, started ')
  lock.release()
  assert (tmp_path / setup.LOCK_NAME).read_text() == ''
  setup.WorkdirLock(str(tmp_path)).release()  # free again


def test_a_stale_lock_of_a_dead_run_is_taken_over(tmp_path, monkeypatch):
  (tmp_path / setup.LOCK_NAME).write_text(json.dumps(
      {'host': 'h1', 'pid': 99999999, 'started': '2024-01-01 00:00:00'}))
  lines = []
  monkeypatch.setattr(logging, 'warning',
                      lambda msg, *args: lines.append(msg % args))
  lock = setup.WorkdirLock(str(tmp_path))
  assert lines == [f'Taking over the stale lock {tmp_path / "run.lock"} of a '
                   'run that is no longer running (pid 99999999 on host h1, '
                   'started 2024-01-01 00:00:00).']
  assert json.loads((tmp_path / 'run.lock').read_text())['pid'] == os.getpid()
  lock.release()


def _config_file(workdir, config):
  (workdir / setup.CONFIG_NAME).write_text(config.to_json_best_effort())


def test_resuming_with_another_config_lists_the_differences(tmp_path):
  old = testing.get_config()
  _config_file(tmp_path, old)
  new = testing.get_config()
  new.optimizer.lr = 3e-3
  new.model.num_latents = 4
  new.num_train_steps = 100  # run length and cadences may change
  new.checkpoint_every_steps = 5
  with pytest.raises(setup.ConfigError) as raised:
    setup.check_resumed_config(new, str(tmp_path), step=100,
                               allow_change=False)
  assert str(raised.value) == (
      f'--workdir={tmp_path} holds a run (checkpoint of step 100) with '
      "another config: model.num_latents 8 -> 4, optimizer.lr 0.01 -> 0.003; "
      'use a new --workdir, or pass --allow_config_change to resume it with '
      'this config.')
  assert json.loads((tmp_path / 'config.json').read_text())[
      'optimizer']['lr'] == 0.01  # untouched
  setup.check_resumed_config(new, str(tmp_path), step=100, allow_change=True)
  assert json.loads((tmp_path / 'config.json').read_text())[
      'optimizer']['lr'] == 0.003
  assert json.loads((tmp_path / 'config.before_step_100.json').read_text())[
      'optimizer']['lr'] == 0.01
  longer = testing.get_config()
  longer.optimizer.lr = 3e-3
  longer.model.num_latents = 4
  longer.num_train_steps = 200
  setup.check_resumed_config(longer, str(tmp_path), step=100,
                             allow_change=False)
  # Without a checkpoint there is nothing to mix: the new config is written.
  setup.check_resumed_config(old, str(tmp_path), step=None,
                             allow_change=False)


def test_workdir_that_is_a_file_or_not_writable(tmp_path, monkeypatch):
  a_file = tmp_path / 'file'
  a_file.write_text('x')
  with pytest.raises(setup.ConfigError,
                     match=f'{a_file} is a file, not a directory'):
    setup.check_workdir(str(a_file))
  with pytest.raises(setup.ConfigError, match='is not writable'):
    setup.check_workdir(str(a_file / 'under'))  # ENOTDIR, even for root
  def read_only(path, mode='r', *args, **kwargs):
    raise PermissionError(13, 'Permission denied', path)
  monkeypatch.setattr(setup, 'open', read_only, raising=False)
  with pytest.raises(setup.ConfigError) as raised:
    setup.check_workdir(str(tmp_path / 'w'))
  assert str(raised.value) == (
      f'--workdir={tmp_path / "w"}: {tmp_path / "w"} is not writable '
      '(permission denied).')


def test_non_positive_step_counts_are_config_errors():
  for key, value in [('num_train_steps', -5), ('num_train_steps', 0),
                     ('eval_every_steps', -1), ('keep_checkpoints', 0)]:
    config = testing.get_config()
    config[key] = value
    with pytest.raises(setup.ConfigError, match=f'config.{key}={value} must '
                       'be positive'):
      setup.check_config(config)
  config = testing.get_config()
  config.num_train_steps = None
  config.num_epochs = -1.0
  with pytest.raises(setup.ConfigError, match='num_epochs=-1.0 must be'):
    setup.check_config(config)


def test_metrics_after_a_resume_hold_each_step_once(tmp_path):
  writer = metric_writers.MetricWriter(str(tmp_path), tensorboard=False,
                                       resume_from=0)
  writer.write_scalars(0, {'num_params': 10})
  for step in (10, 20, 30):
    writer.write_scalars(step, {'loss': 1.0 / step})
  writer.write_scalars(20, {'eval/top1': 0.5})
  writer.close()
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 40, "lo')  # torn by a kill mid-write
  # Resumed from the checkpoint of step 20: it logs 20 and 0 again.
  writer = metric_writers.MetricWriter(str(tmp_path), tensorboard=False,
                                       resume_from=20)
  writer.write_scalars(0, {'num_params': 10})
  writer.write_scalars(20, {'eval/top1': 0.5, 'eval/loss': 0.7})
  writer.write_scalars(30, {'loss': 0.03})
  writer.close()
  records = testing.read_jsonl(str(tmp_path))
  pairs = [(r['step'], k) for r in records for k in r if k != 'step']
  assert len(pairs) == len(set(pairs))
  assert sorted(pairs) == [(0, 'num_params'), (10, 'loss'), (20, 'eval/loss'),
                           (20, 'eval/top1'), (20, 'loss'), (30, 'loss')]
  assert [r for r in records if r['step'] == 30] == [{'step': 30,
                                                      'loss': 0.03}]


def test_a_new_data_dir_is_created_for_tfds_built_datasets_only(tmp_path):
  from configs import modelnet40  # pylint: disable=g-import-not-at-top
  config = modelnet40.get_config('runlocal')
  new = tmp_path / 'tfds' / 'new'
  config.data.data_dir = str(new)
  module = setup.check_config(config)
  assert setup.builds_into_data_dir(module) and not new.exists()
  setup.prepare_data_dirs(config, module)
  assert new.is_dir()
  config = testing.get_config()  # synthetic: nothing is built there
  config.data.data_dir = str(tmp_path / 'absent')
  with pytest.raises(setup.ConfigError, match='is not an existing directory'):
    setup.check_config(config)
  config = modelnet40.get_config('runlocal')
  config.data.data_dir = str(tmp_path / 'tfds' / 'new' / '..' / 'x')
  (tmp_path / 'tfds' / 'x').write_text('a file')
  with pytest.raises(setup.ConfigError, match='is not an existing directory'):
    setup.check_config(config)


def _idx(path, array):
  header = bytes([0, 0, 8, array.ndim]) + b''.join(
      int(n).to_bytes(4, 'big') for n in array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def test_explicit_data_dir_of_damaged_idx_files_never_falls_back(tmp_path):
  fashion_mnist._arrays.cache_clear()
  for split, (images, labels) in fashion_mnist._IDX_FILES.items():
    n = 6 if split == 'train' else 4
    _idx(tmp_path / f'{images}.gz', np.zeros((n, 28, 28)))
    _idx(tmp_path / f'{labels}.gz', np.arange(n) % 10)
  assert fashion_mnist.num_examples('train', data_dir=str(tmp_path)) == 6
  fashion_mnist._arrays.cache_clear()
  path = tmp_path / 'train-images-idx3-ubyte.gz'
  path.write_bytes(path.read_bytes()[:-9])  # damaged
  with pytest.raises(ValueError, match=f'{path}: corrupt gzip stream'):
    fashion_mnist.num_examples('train', data_dir=str(tmp_path))
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match='holds neither a prepared TFDS '
                     'fashion_mnist nor the Fashion-MNIST IDX files'):
    fashion_mnist.num_examples('train', data_dir=str(empty))
  fashion_mnist._arrays.cache_clear()

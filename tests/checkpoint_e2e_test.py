"""`python -m experiments.train` at the edges of checkpointing, in
subprocesses on the tiny synthetic config (tests/testing.py): a second
run on a locked workdir, SIGKILL then a stale lock, a damaged newest
checkpoint, a full disk, a changed config, workdir and data mistakes. Each
ends in one line (or a fallback) and the resumed runs end with the
uninterrupted run's parameters, bit for bit."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from tests import testing

TOTAL_STEPS = 24
_PREFIX = 'experiments.train: error: '


def _assert_identical_params(workdir, reference):
  got, want = (testing.read_checkpoint(w) for w in (workdir, reference))
  assert int(got['step']) == int(want['step']) == TOTAL_STEPS
  for (path, a), (_, b) in zip(
      jax.tree_util.tree_leaves_with_path(got['params']),
      jax.tree_util.tree_leaves_with_path(want['params'])):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def _assert_each_step_once(workdir):
  records = testing.read_jsonl(workdir)
  pairs = [(r['step'], k) for r in records for k in r if k != 'step']
  assert len(pairs) == len(set(pairs))
  assert len([r for r in records if 'num_params' in r]) == 1


def _copy(reference, tmp_path):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(reference, workdir)
  os.remove(os.path.join(workdir, 'final_metrics.json'))
  return workdir


def _last_line(result):
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  return result.stderr.strip().splitlines()[-1]


def _wait_for_step(workdir, step, proc):
  jsonl = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 180
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(jsonl) and any(
        r.get('step', 0) >= step and 'loss' in r
        for r in testing.read_jsonl(workdir)):
      return
    time.sleep(0.05)
  raise AssertionError('the run ended before it could be interrupted')


def test_second_run_is_locked_out_then_sigkill_resumes_bit_identically(
    tmp_path, reference, cache_dir):
  workdir = str(tmp_path / 'killed')
  # Slow enough that the first run is still going when the second starts.
  slow = ['data.seconds_per_batch=1.5']
  first = subprocess.Popen(
      testing.train_command(workdir, slow), cwd=testing.ROOT,
      env=testing.subprocess_env(1, cache_dir), stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL)
  try:
    _wait_for_step(workdir, 10, first)  # past the checkpoint of step 8
    second = testing.run_train(workdir, slow, cache_dir=cache_dir)
    assert second.returncode == 2
    assert _last_line(second).startswith(
        f'{_PREFIX}--workdir={workdir} is in use by another run (pid '
        f'{first.pid} on host ')
    assert first.poll() is None  # untouched
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
  steps = testing.checkpoint_steps(workdir)
  assert steps and steps[-1] < TOTAL_STEPS
  rerun = testing.run_train(workdir, slow, cache_dir=cache_dir)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert 'Taking over the stale lock' in rerun.stderr
  assert f'(pid {first.pid} on host ' in rerun.stderr
  assert f'Resuming from the checkpoint of step {steps[-1]}' in rerun.stderr
  _assert_identical_params(workdir, reference)
  _assert_each_step_once(workdir)
  with open(os.path.join(workdir, 'run.lock')) as f:
    assert f.read() == ''  # released


def test_damaged_newest_checkpoint_falls_back_bit_identically(
    tmp_path, reference, cache_dir):
  workdir = _copy(reference, tmp_path)
  data_dir = os.path.join(workdir, 'checkpoints', '24', 'default',
                          'ocdbt.process_0', 'd')
  name = max(os.listdir(data_dir),
             key=lambda n: os.path.getsize(os.path.join(data_dir, n)))
  with open(os.path.join(data_dir, name), 'r+b') as f:
    f.seek(100)
    byte = f.read(1)
    f.seek(100)
    f.write(bytes([byte[0] ^ 0x01]))  # one bit
  result = testing.run_train(workdir, cache_dir=cache_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (f'checkpoint 24 in {workdir}/checkpoints is damaged: '
          f'default/ocdbt.process_0/d/{name} does not match its checksum; '
          f'moved to {workdir}/damaged_checkpoints/24-') in result.stderr
  assert 'Falling back to checkpoint 16' in result.stderr
  _assert_identical_params(workdir, reference)
  _assert_each_step_once(workdir)
  with open(os.path.join(workdir, 'final_metrics.json')) as f, open(
      os.path.join(reference, 'final_metrics.json')) as g:
    assert json.load(f) == json.load(g)


_DRIVER = """
import errno, os, runpy, shutil, sys
from orbax.checkpoint._src.handlers import base_pytree_checkpoint_handler as b
if os.environ['PATCH'] == 'enospc_at_16':
  write = b.BasePyTreeCheckpointHandler._write_metadata_file
  async def full(self, directory, **kwargs):
    if '/16.' in os.fspath(directory):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
    return await write(self, directory, **kwargs)
  b.BasePyTreeCheckpointHandler._write_metadata_file = full
else:
  usage = shutil.disk_usage
  shutil.disk_usage = lambda path: usage(path)._replace(free=1000)
runpy.run_module('experiments.train', run_name='__main__', alter_sys=True)
"""


def _run_patched(tmp_path, workdir, patch, cache_dir):
  driver = tmp_path / 'driver.py'
  driver.write_text(_DRIVER)
  env = testing.subprocess_env(1, cache_dir)
  env.update(PATCH=patch, JAX_LOG_COMPILES='1')
  return subprocess.run(
      [sys.executable, str(driver)] + testing.train_command(workdir)[3:],
      cwd=testing.ROOT, env=env, capture_output=True, text=True, timeout=240,
      check=False)


def test_disk_full_stops_at_once_and_a_rerun_says_so_before_compiling(
    tmp_path, cache_dir):
  workdir = str(tmp_path / 'full')
  checkpoints = os.path.join(workdir, 'checkpoints')
  result = _run_patched(tmp_path, workdir, 'enospc_at_16', cache_dir)
  assert result.returncode == 74, result.stderr[-3000:]
  assert _last_line(result) == (
      f'{_PREFIX}no space left on device while writing checkpoint 16 to '
      f'{checkpoints}; checkpoint 8 is intact.')
  assert 'Checkpoint of step 8 ->' in result.stderr
  assert 'Checkpoint of step 16 ->' not in result.stderr
  assert sorted(os.listdir(checkpoints)) == ['8']
  assert max(r['step'] for r in testing.read_jsonl(workdir)) == 16

  rerun = _run_patched(tmp_path, workdir, 'disk_usage_1000', cache_dir)
  assert rerun.returncode == 74, rerun.stderr[-3000:]
  line = _last_line(rerun)
  assert line.startswith(f'{_PREFIX}no space left on device for checkpoint '
                         f'16 in {checkpoints} (it needs about ')
  assert line.endswith('MiB are free); checkpoint 8 is intact.')
  assert 'Compiling' not in rerun.stderr


def _one_line_before_compiling(workdir, overrides=(), config=None):
  env = testing.subprocess_env(1)
  env['JAX_LOG_COMPILES'] = '1'
  kwargs = {'config': config} if config else {}
  result = subprocess.run(
      testing.train_command(workdir, overrides, **kwargs), cwd=testing.ROOT,
      env=env, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'Compiling' not in result.stderr
  line = _last_line(result)
  assert line.startswith(_PREFIX)
  return line[len(_PREFIX):]


def test_resume_with_another_config_is_refused(tmp_path, reference):
  workdir = _copy(reference, tmp_path)
  with open(os.path.join(workdir, 'config.json')) as f:
    before = f.read()
  line = _one_line_before_compiling(workdir, ['optimizer.lr=3e-3'])
  assert line == (
      f'--workdir={workdir} holds a run (checkpoint of step 24) with another '
      'config: optimizer.lr 0.01 -> 0.003; use a new --workdir, or pass '
      '--allow_config_change to resume it with this config.')
  with open(os.path.join(workdir, 'config.json')) as f:
    assert f.read() == before


def _idx(path, header, payload):
  with open(path, 'wb') as f:
    f.write(bytes(header) + bytes(payload))


def test_workdir_step_count_and_data_dir_mistakes(tmp_path):
  a_file = tmp_path / 'a_file'
  a_file.write_text('x')
  assert _one_line_before_compiling(str(a_file)) == (
      f'--workdir={a_file}: {a_file} is a file, not a directory.')
  assert _one_line_before_compiling(
      str(tmp_path / 'w'), ['num_train_steps=-5']) == (
          'config.num_train_steps=-5 must be positive.')
  assert not os.path.exists(tmp_path / 'w')
  idx = tmp_path / 'idx'
  idx.mkdir()
  _idx(idx / 'train-images-idx3-ubyte', [0, 0, 8, 3, 0, 0, 0, 9, 0, 0, 0, 28,
                                         0, 0, 0, 28], [0] * 100)
  _idx(idx / 'train-labels-idx1-ubyte', [0, 0, 8, 1, 0, 0, 0, 9], [1] * 9)
  config = os.path.join(testing.ROOT, 'configs', 'fashion_mnist.py')
  line = _one_line_before_compiling(
      str(tmp_path / 'w'), [f'data.data_dir={idx}'],
      config=f'{config}:runlocal')
  assert line.startswith("dataset 'fashion_mnist', split 'train': "
                         f'{idx}/train-images-idx3-ubyte: IDX header says')

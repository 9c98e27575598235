"""End to end: `python -m experiments.train` in subprocesses on the tiny
synthetic config (tests/testing.py), on 1 and 8 fake CPU devices, two
processes of 2 fake devices each joined by jax.distributed, interrupted by SIGTERM and resumed.

One uninterrupted 1-device run (the fixture `reference`, tests/conftest.py) is the yardstick
the other runs must reproduce. A shared JAX compilation cache keeps the
repeated compiles cheap.
"""

import json
import os
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest

from tests import testing

TOTAL_STEPS = 24


def _assert_same_params(workdir, reference, *, atol):
  got = testing.read_checkpoint(workdir)
  want = testing.read_checkpoint(reference)
  assert int(got['step']) == int(want['step']) == TOTAL_STEPS
  flat_got = jax.tree_util.tree_leaves_with_path(got['params'])
  flat_want = jax.tree_util.tree_leaves_with_path(want['params'])
  assert [p for p, _ in flat_got] == [p for p, _ in flat_want]
  for (path, a), (_, b) in zip(flat_got, flat_want):
    np.testing.assert_allclose(a, b, rtol=0, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def _losses(workdir):
  return {r['step']: r['loss'] for r in testing.read_jsonl(workdir)
          if 'loss' in r}


def test_reference_run_learns_and_writes_its_files(reference):
  assert testing.checkpoint_steps(reference) == [8, 16, 24]
  losses = _losses(reference)
  assert sorted(losses) == list(range(2, TOTAL_STEPS + 1, 2))
  assert losses[24] < losses[2] - 0.05  # it learns the synthetic classes
  with open(os.path.join(reference, 'config.json')) as f:
    assert json.load(f)['num_train_steps'] == TOTAL_STEPS
  with open(os.path.join(reference, 'final_metrics.json')) as f:
    final = json.load(f)
  # 20 evaluation examples in batches of 16: the padding counts nowhere.
  assert final['num_examples'] == 20
  assert final['step'] == TOTAL_STEPS
  assert 0.0 <= final['top1'] <= final['top5'] <= 1.0


def test_jsonl_holds_every_logged_scalar_and_tensorboard_reads_them(
    reference):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  records = testing.read_jsonl(reference)
  logged = {(r['step'], k): v for r in records for k, v in r.items()
            if k != 'step'}
  for step in range(2, TOTAL_STEPS + 1, 2):
    for key in ('loss', 'lr', 'examples_per_sec', 'steps_per_sec',
                'seconds_left', 'grad_norm'):
      assert (step, key) in logged, (step, key)
  for step in (12, TOTAL_STEPS):
    for key in ('eval/top1', 'eval/top5', 'eval/loss', 'eval/num_examples'):
      assert (step, key) in logged, (step, key)
  assert logged[(0, 'num_params')] > 0
  assert logged[(0, 'gflops_per_example_forward')] > 0

  event_files = tf.io.gfile.glob(
      os.path.join(reference, 'tensorboard', 'events.out.tfevents.*'))
  assert len(event_files) == 1
  from_events = {}
  for event in tf.compat.v1.train.summary_iterator(event_files[0]):
    for value in event.summary.value:
      assert value.metadata.plugin_data.plugin_name == 'scalars'
      from_events[(event.step, value.tag)] = float(
          tf.make_ndarray(value.tensor))
  assert set(from_events) == set(logged)
  for key, value in logged.items():
    assert from_events[key] == pytest.approx(value, rel=1e-6), key


def test_eight_devices_give_the_one_device_result(tmp_path, reference,
                                                  cache_dir):
  workdir = str(tmp_path / 'eight')
  result = testing.run_train(workdir, num_devices=8, cache_dir=cache_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert testing.read_jsonl(workdir)[0]['num_devices'] == 8
  got, want = _losses(workdir), _losses(reference)
  assert got.keys() == want.keys()
  for step in want:
    assert got[step] == pytest.approx(want[step], abs=1e-5), step
  _assert_same_params(workdir, reference, atol=1e-5)


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_give_the_one_process_result(tmp_path, reference,
                                                   cache_dir):
  workdir = str(tmp_path / 'two_processes')
  address = f'localhost:{_free_port()}'
  procs = []
  for process_id in range(2):
    command = testing.train_command(workdir, extra=[
        f'--coordinator_address={address}', '--num_processes=2',
        f'--process_id={process_id}'])
    procs.append(subprocess.Popen(
        command, cwd=testing.ROOT, env=testing.subprocess_env(2, cache_dir),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  records = testing.read_jsonl(workdir)  # written by process 0 only
  assert records[0]['num_processes'] == 2 and records[0]['num_devices'] == 4
  assert len([r for r in records if r['step'] == 2]) == 1
  got, want = _losses(workdir), _losses(reference)
  for step in want:
    assert got[step] == pytest.approx(want[step], abs=1e-5), step
  _assert_same_params(workdir, reference, atol=1e-5)
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    assert json.load(f)['num_examples'] == 20


def test_sigterm_then_rerun_ends_with_the_uninterrupted_params(
    tmp_path, reference, cache_dir):
  workdir = str(tmp_path / 'interrupted')
  # A slow input pipeline leaves time to interrupt the run mid-way.
  overrides = ['data.seconds_per_batch=0.1']
  proc = subprocess.Popen(
      testing.train_command(workdir, overrides), cwd=testing.ROOT,
      env=testing.subprocess_env(1, cache_dir), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 180
  jsonl = os.path.join(workdir, 'metrics.jsonl')
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(jsonl) and any(
        r['step'] >= 4 and 'loss' in r for r in testing.read_jsonl(workdir)):
      break
    time.sleep(0.05)
  assert proc.poll() is None, 'the run ended before it could be interrupted'
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
  assert 'Stopped by signal' in err
  stopped_at = testing.checkpoint_steps(workdir)[-1]
  assert 4 <= stopped_at < TOTAL_STEPS
  assert not os.path.exists(os.path.join(workdir, 'final_metrics.json'))

  rerun = testing.run_train(workdir, overrides, cache_dir=cache_dir)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f'Resuming from the checkpoint of step {stopped_at}' in rerun.stderr
  _assert_same_params(workdir, reference, atol=1e-6)
  assert _losses(workdir)[TOTAL_STEPS] == pytest.approx(
      _losses(reference)[TOTAL_STEPS], abs=1e-6)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(
    tmp_path, cache_dir):
  workdir = str(tmp_path / 'diverges')
  # The learning rate jumps by 1e30 at step 10: the loss blows up after the
  # checkpoint of step 8 and before the one of step 16.
  result = testing.run_train(workdir, [
      'schedule.kind=piecewise', 'schedule.boundaries=(10,)',
      'schedule.decay_factor=1e30', 'schedule.warmup=0'],
      cache_dir=cache_dir)
  assert result.returncode == 1
  last_line = result.stderr.strip().splitlines()[-1]
  assert last_line.startswith('experiments.train: error: Loss or gradient '
                              'became NaN/inf')
  assert 'last good checkpoint is step 8' in last_line
  assert testing.checkpoint_steps(workdir) == [8]


def _one_line_error(result):
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert 'Traceback' not in result.stderr
  # Nothing was compiled (JAX_LOG_COMPILES would log every compilation).
  assert 'Finished XLA compilation' not in result.stderr
  assert 'Compiling' not in result.stderr
  return lines[-1]


@pytest.mark.parametrize('args, expected', [
    (['--config.optimizer.lrr=1e-3'], 'lrr'),
    (['--config.optimizer.lr=fast'], 'fast'),
    (['--config.data.data_dir=/no/such/dir'],
     "config.data.data_dir='/no/such/dir' is not an existing directory"),
    (['--config.batch_size=12', '--config.eval_batch_size=16'],
     'batch_size=12 does not divide over 8 devices'),
])
def test_mistakes_give_one_line_errors_before_compiling(tmp_path, args,
                                                        expected):
  workdir = str(tmp_path / 'w')
  env = testing.subprocess_env(8)
  env['JAX_LOG_COMPILES'] = '1'
  result = subprocess.run(
      testing.train_command(workdir, extra=args), cwd=testing.ROOT, env=env,
      capture_output=True, text=True, timeout=120, check=False)
  line = _one_line_error(result)
  assert line.startswith('experiments.train: error: '), line
  assert expected in line, line
  assert not os.path.exists(os.path.join(workdir, 'checkpoints'))


def test_missing_workdir_is_a_one_line_error():
  result = subprocess.run(
      testing.train_command('')[:-1], cwd=testing.ROOT,
      env=testing.subprocess_env(1), capture_output=True, text=True,
      timeout=120, check=False)
  assert _one_line_error(result) == (
      'experiments.train: error: --workdir is required.')


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(
    tmp_path, cache_dir):
  workdir = str(tmp_path / 'two_interrupted')
  address = f'localhost:{_free_port()}'
  procs = [subprocess.Popen(
      testing.train_command(workdir, ['data.seconds_per_batch=0.1'], extra=[
          f'--coordinator_address={address}', '--num_processes=2',
          f'--process_id={i}']),
      cwd=testing.ROOT, env=testing.subprocess_env(2, cache_dir),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  jsonl = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 180
  while time.time() < deadline and procs[0].poll() is None:
    if os.path.exists(jsonl) and any(
        r['step'] >= 4 and 'loss' in r for r in testing.read_jsonl(workdir)):
      break
    time.sleep(0.05)
  assert procs[1].poll() is None, 'the run ended before it could be stopped'
  procs[1].send_signal(signal.SIGTERM)  # the notice reaches one host only
  errs = [p.communicate(timeout=120)[1] for p in procs]
  for p, err in zip(procs, errs):
    assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
  steps = [int(err.split('Stopped by signal 15 at step ')[1].split(';')[0])
           for err in errs]
  assert steps[0] == steps[1] == testing.checkpoint_steps(workdir)[-1]
  assert steps[0] < TOTAL_STEPS


def test_evaluate_checkpoint_reproduces_the_final_metrics(reference):
  from experiments import evaluation  # pylint: disable=g-import-not-at-top
  result = evaluation.evaluate_checkpoint(testing.get_config(), reference)
  with open(os.path.join(reference, 'final_metrics.json')) as f:
    final = json.load(f)
  assert result['step'] == final['step'] == TOTAL_STEPS
  for key in ('top1', 'top5', 'num_examples'):
    assert result[key] == final[key], key
  assert result['loss'] == pytest.approx(final['loss'], abs=1e-5)
  at_8 = evaluation.evaluate_checkpoint(testing.get_config(), reference, step=8)
  assert at_8['step'] == 8 and at_8['num_examples'] == 20

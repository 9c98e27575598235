"""launch.sweep: exact Cloud TPU commands with --dry-run, and a local sweep
of two points of the tiny config run to the end."""

import json
import os
import shlex
import subprocess
import sys

from tests import testing


def _sweep(*args, env=None, timeout=300):
  return subprocess.run([sys.executable, '-m', 'launch.sweep', *args],
                        cwd=testing.ROOT, env=env or testing.subprocess_env(),
                        capture_output=True, text=True, timeout=timeout,
                        check=False)


def test_tpu_dry_run_prints_one_gcloud_command_per_point():
  result = _sweep('--config=configs/imagenet.py', '--sweep=weight_sharing',
                  '--workdir=gs://bucket/table7', '--tpu=pod-64',
                  '--zone=us-central2-b', '--project=my-proj', '--dry-run')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert lines == [
      "gcloud compute tpus tpu-vm ssh pod-64 --zone=us-central2-b "
      "--project=my-proj --worker=all '--command=cd ~/perceiver && python3 "
      "-m experiments.train --config=configs/imagenet.py "
      f"--workdir=gs://bucket/table7/{i:02d}_share_weights={v} "
      f"--config.model.share_weights={v}'"
      for i, v in enumerate(('True', 'False'))]
  # What the workers run, once gcloud hands it to their shells.
  argv = shlex.split(lines[1])
  remote = shlex.split(argv[-1][len('--command='):])
  assert remote[:3] == ['cd', '~/perceiver', '&&']
  assert remote[3:] == ['python3', '-m', 'experiments.train',
                        '--config=configs/imagenet.py',
                        '--workdir=gs://bucket/table7/01_share_weights=False',
                        '--config.model.share_weights=False']


def test_dry_run_quotes_values_and_adds_overrides():
  result = _sweep('--config=configs/imagenet.py:runlocal',
                  '--sweep=cross_attends', '--workdir=/tmp/root',
                  '--override=num_train_steps=5', '--dry-run')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 8  # 2 arrangements x 4 numbers of cross-attends
  argv = shlex.split(lines[-1])
  assert argv[1:] == [
      '-m', 'experiments.train', '--config=configs/imagenet.py:runlocal',
      '--workdir=/tmp/root/07_num_cross_attends=8_cross_attend_arrangement='
      'interleaved',
      '--config.num_train_steps=5', '--config.model.num_cross_attends=8',
      '--config.model.cross_attend_arrangement=interleaved']


def test_unknown_sweep_and_missing_zone_are_errors():
  result = _sweep('--config=configs/imagenet.py', '--sweep=nope',
                  '--workdir=/tmp/x', '--dry-run')
  assert result.returncode == 1
  assert "has no sweep 'nope'" in result.stderr
  assert 'weight_sharing' in result.stderr
  result = _sweep('--config=configs/imagenet.py', '--sweep=lr',
                  '--workdir=/tmp/x', '--tpu=t', '--dry-run')
  assert result.returncode == 1 and '--tpu needs --zone' in result.stderr


def test_local_sweep_runs_both_points_and_tabulates_them(tmp_path):
  root = str(tmp_path / 'sweep')
  env = testing.subprocess_env(cache_dir=str(tmp_path / 'cache'))
  result = _sweep(f'--config={testing.CONFIG_PATH}', '--sweep=lr',
                  f'--workdir={root}', '--override=num_train_steps=6',
                  '--override=eval_every_steps=0', env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  names = ['00_lr=0.001', '01_lr=0.01']
  assert sorted(os.listdir(root)) == names
  finals = []
  for name, lr in zip(names, (0.001, 0.01)):
    with open(os.path.join(root, name, 'config.json')) as f:
      assert json.load(f)['optimizer']['lr'] == lr
    with open(os.path.join(root, name, 'final_metrics.json')) as f:
      finals.append(json.load(f))
    assert finals[-1]['step'] == 6 and finals[-1]['num_examples'] == 20
  table = result.stdout.strip().splitlines()[-3:]
  assert table[0].split() == ['point', 'rc', 'step', 'top1', 'top5', 'loss',
                              'num_examples']
  for row, name, final in zip(table[1:], names, finals):
    assert row.split() == [name, '0', '6', f'{final["top1"]:.4f}',
                           f'{final["top5"]:.4f}', f'{final["loss"]:.4f}',
                           '20']

"""launch.benchmark prints its figures for a config (the tiny test config);
benchmark_matmul counts 2 n^3 FLOPs."""

import re
import subprocess
import sys

import pytest

from tests import testing


def test_benchmark_prints_step_time_flops_and_matmul_ratio():
  result = subprocess.run(
      [sys.executable, '-m', 'launch.benchmark',
       f'--config={testing.CONFIG_PATH}', '--iterations=2',
       '--matmul_n=256'], cwd=testing.ROOT, env=testing.subprocess_env(2),
      capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert out.startswith('devices: 2 x cpu')

  def number(label, section=0):
    values = re.findall(rf'^\s*{label}\s+([0-9.e+]+)', out, re.M)
    return float(values[section])

  assert number('time/step') > 0
  assert number('examples/s') > 0
  train_flops = number('FLOPs/step')
  assert 1e6 < train_flops < 1e9  # ~3x forward of 16 tiny examples
  assert number('FLOPs') == pytest.approx(2 * 256**3, rel=1e-3)  # matmul
  ratio = number('train / matmul')
  achieved = re.findall(r'achieved\s+([0-9.]+) GFLOP/s', out)
  assert ratio == pytest.approx(
      float(achieved[0]) / float(achieved[1]), rel=0.02, abs=0.002)


def test_plain_haiku_perceiver_is_the_main_jobs_size_and_runs():
  """benchmarks/plain_haiku_perceiver.py: the comparison the README quotes
  is between models of the same size (tests/summary_test.py pins 83,596 for
  configs/fashion_mnist.py)."""
  result = subprocess.run(
      [sys.executable, '-m', 'benchmarks.plain_haiku_perceiver',
       '--batch_size=8', '--iterations=1', '--rounds=1'], cwd=testing.ROOT,
      env=testing.subprocess_env(1), capture_output=True, text=True,
      timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert '83,596 parameters' in result.stdout
  assert float(re.search(r'examples/s: ([0-9.]+)', result.stdout)[1]) > 0

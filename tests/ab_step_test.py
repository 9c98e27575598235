"""benchmarks/ab_step.py: two variants of the train step in one process
(the main job's small model; no timing claims)."""

import re
import subprocess
import sys

import pytest

from benchmarks import ab_step
from tests import testing


def test_pairs_and_values_parse():
  assert ab_step.parse_pairs(['model.cpu_kernels=false', 'a.b=x=y'], '--b') \
      == [('model.cpu_kernels', 'false'), ('a.b', 'x=y')]
  with pytest.raises(ValueError, match='--b_xla: expected KEY=VALUE'):
    ab_step.parse_pairs(['no_equals'], '--b_xla')
  with pytest.raises(ValueError, match='--a'):
    ab_step.parse_pairs(['=1'], '--a')
  assert ab_step.xla_value('True') is True
  assert ab_step.xla_value('false') is False
  assert ab_step.xla_value('3') == 3 and ab_step.xla_value('0.5') == 0.5
  assert ab_step.xla_value('-reduce') == '-reduce'


def test_summary_is_of_per_pair_ratios():
  # Medians of the times and of the ratios differ: the ratio is per pair.
  result = ab_step.summarize([1.0, 4.0, 2.0, 9.0], [2.0, 2.0, 2.0, 3.0])
  assert result['a_s'] == 3.0 and result['b_s'] == 2.0
  assert result['ratio'] == pytest.approx(1.5)  # ratios 0.5, 1, 2, 3
  assert result['ratio_q1'] <= result['ratio'] <= result['ratio_q3']
  single = ab_step.summarize([2.0], [1.0])
  assert single['ratio'] == single['ratio_q1'] == single['ratio_q3'] == 2.0
  with pytest.raises(ValueError):
    ab_step.summarize([1.0], [])


def _run(*args, timeout=300):
  return subprocess.run(
      [sys.executable, 'benchmarks/ab_step.py',
       '--config=configs/fashion_mnist.py', *args],
      cwd=testing.ROOT, env=testing.subprocess_env(1), capture_output=True,
      text=True, timeout=timeout, check=False)


def test_the_script_compares_the_kernels_with_plain_haiku():
  result = _run('--b=model.cpu_kernels=false', '--pairs=2', '--warmup=1')
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert 'B: model.cpu_kernels=false' in out
  # The same model both ways: the two steps agree to float32 rounding.
  difference = float(re.search(r'difference after one step: (\S+)',
                               out).group(1))
  assert difference < 1e-3
  rows = {m.group(1): (float(m.group(2)), float(m.group(3)))
          for m in re.finditer(r'^\| ([AB]) \| ([\d.]+) \| ([\d.]+) \|$', out,
                               re.M)}
  assert set(rows) == {'A', 'B'}
  assert all(seconds > 0 and mb > 0 for seconds, mb in rows.values())
  ratio, q1, q3 = map(float, re.search(
      r'median ([\d.]+) \(quartiles ([\d.]+)-([\d.]+)\)', out).groups())
  assert 0 < q1 <= ratio <= q3


def test_a_misspelt_override_fails_in_one_line_before_compiling():
  result = _run('--b=model.cpu_kernel=false', timeout=120)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1] == (
      'ab_step: --config.model.cpu_kernel: no such config field. Did you '
      'mean --config.model.cpu_kernels?')


def test_an_unknown_xla_option_names_itself():
  result = _run('--b_xla=xla_no_such_option=1', '--pairs=1', timeout=120)
  assert result.returncode != 0
  assert "No such compile option: 'xla_no_such_option'" in (
      result.stderr.strip().splitlines()[-1])

"""benchmarks/gpu.py without a GPU: the MFU arithmetic, the batch search, the
time shares, the retry of a worker that ran out of memory, the wheel list,
the table, and the dry run's exit status and plan (no wheels, no torch)."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2.0 ** 30


def test_mfu_is_three_forwards_per_example_over_time_and_peak():
  assert gpu.model_flops_per_step(710e9, 64) == 3 * 710e9 * 64
  assert gpu.mfu(710e9, 64, 0.5) == pytest.approx(
      3 * 710e9 * 64 / 0.5 / 790e12)
  assert gpu.mfu(1e12, 1, 1.0, peak_flops=3e12) == pytest.approx(1.0)
  # Twice the batch in twice the time: the same utilisation.
  assert gpu.mfu(710e9, 128, 1.0) == pytest.approx(gpu.mfu(710e9, 64, 0.5))


def _search(per_example, budget, *, prior=None, fixed=1.0 * GIB,
            runtime_oom=()):
  """Runs next_batch against a linear memory model; returns (chosen batch,
  batches compiled in order)."""
  plans, compiled = {}, []
  while True:
    b = gpu.next_batch(gpu.CANDIDATES, plans, budget,
                       prior_bytes_per_example=prior, fixed_bytes=fixed)
    if b is None:
      break
    assert b not in compiled, 'a batch is never compiled twice'
    compiled.append(b)
    plans[b] = fixed + per_example * b
    if b in runtime_oom and plans[b] <= budget:  # Fits on paper, not at run.
      plans[b] = None
  return gpu.chosen_batch(plans, budget), compiled


@pytest.mark.parametrize('per_example_gib,prior_gib', [
    (2.0, 3.8),   # the estimate is too high: one step up
    (2.0, 2.0),   # exact: one compile
    (4.5, 3.8),   # too low: one step down
    (0.01, 3.8),  # far too high: jumps up to the cap, 1024
    (200.0, 3.8),  # nothing fits
    (2.0, None),  # no estimate: starts at 1024, then jumps down
])
def test_batch_search_finds_the_largest_power_of_two_in_few_compiles(
    per_example_gib, prior_gib):
  budget = 130 * GIB
  prior = prior_gib and prior_gib * GIB
  chosen, compiled = _search(per_example_gib * GIB, budget, prior=prior)
  fitting = [b for b in gpu.CANDIDATES
             if 1 * GIB + per_example_gib * GIB * b <= budget]
  assert chosen == max(fitting, default=None)
  assert len(compiled) <= 3, compiled
  if prior_gib == per_example_gib:
    assert compiled == [chosen]


def test_batch_search_steps_down_after_a_runtime_out_of_memory():
  chosen, compiled = _search(2.0 * GIB, 130 * GIB, prior=2.0 * GIB,
                             runtime_oom={64})
  assert compiled[:2] == [64, 32] and chosen == 32


def test_unlimited_memory_takes_the_largest_candidate():
  assert gpu.next_batch([16, 8], {}, float('inf')) == 16
  assert gpu.next_batch([16, 8], {16: 1e6}, float('inf')) is None


def test_time_shares_keep_priority_order_and_minimum_slots():
  pending = gpu.MEASUREMENTS
  first = gpu.time_cap(457, pending, slack=gpu.FIRST_SLACK)
  reserve = sum(gpu.MIN_SLOT_S[m.impl] for m in pending[1:])
  assert gpu.MIN_SLOT_S['jax'] <= first <= 457 - reserve
  # Short of time: the last ones are dropped, not the first.
  assert gpu.time_cap(70, pending) == pytest.approx(70)
  assert gpu.time_cap(50, pending) is None  # not even one JAX slot
  assert gpu.time_cap(50, pending[2:]) == pytest.approx(50)  # hf bf16 fits
  # A learned compile time raises the JAX minimum.
  slots = dict(gpu.MIN_SLOT_S, jax=200.0)
  assert gpu.time_cap(150, pending, min_slot_s=slots) is None


def test_timing_plan_fits_the_time_left():
  assert gpu.timing_plan(0.5, 100) == (3, 4)
  assert gpu.timing_plan(0.5, 3) == (1, 4)
  assert gpu.timing_plan(5.0, 7) == (1, 1)
  assert gpu.timing_plan(5.0, 1) == (1, 1)


def test_out_of_memory_errors_are_recognised():
  assert gpu.is_out_of_memory(RuntimeError(
      'RESOURCE_EXHAUSTED: Out of memory while trying to allocate 12 GiB'))
  assert gpu.is_out_of_memory(RuntimeError('CUDA out of memory. Tried to'))
  assert not gpu.is_out_of_memory(ValueError('shapes do not match'))


def test_a_worker_that_ran_out_of_memory_is_retried_one_size_down():
  calls = []

  def fake_run(command, timeout_s, env):
    del timeout_s, env
    calls.append(command)
    if len(calls) == 1:
      return gpu.WorkerOutcome(gpu.OOM_EXIT, [
          {'event': 'compiled', 'batch': 64, 'plan_bytes': 1e11,
           'fits': True, 'compile_s': 40.0},
          {'event': 'oom', 'batch': 64, 'plans': {'64': 1e11}}], 50.0)
    return gpu.WorkerOutcome(0, [
        {'event': 'compiled', 'batch': 32, 'plan_bytes': 5e10, 'fits': True,
         'compile_s': 35.0},
        {'event': 'result', 'status': 'ok', 'batch': 32,
         'step_time_s': 0.25},
        {'event': 'matmul', 'n': 8192, 'flops_per_s': 7e14}], 60.0)

  m = gpu.Measurement('jax', 'bf16', True)
  row = gpu.measure_jax(m, deadline=1000.0, clock=lambda: 0.0, run=fake_run)
  assert row['batch'] == 32 and row['status'] == 'ok'
  assert [a['batch'] for a in row['attempts']] == [64, 32]
  assert row['matmul']['n'] == 8192
  assert '--cpu_kernels=true' in calls[0]
  known = [a for a in calls[1] if a.startswith('--known_plans=')][0]
  assert json.loads(known.split('=', 1)[1]) == {'64': None}


def test_a_worker_killed_at_its_time_limit_is_reported():
  outcome = gpu.WorkerOutcome(None, [], 130.0)
  row = gpu.measure_jax(gpu.Measurement('jax', 'fp32', False),
                        deadline=100.0, clock=lambda: 0.0,
                        run=lambda *a: outcome)
  assert row['status'] == 'timed out' and '130' in row['note']


def test_wheel_list_pins_the_project_versions_and_finds_files(tmp_path):
  wheels = {w.name: w for w in gpu.read_wheel_list()}
  with open(os.path.join(ROOT, 'requirements.txt')) as f:
    pins = dict(line.split(';')[0].strip().split('==') for line in f
                if '==' in line and not line.startswith('#'))  # markers cut
  for name in ('dm-haiku', 'ml-collections'):
    assert wheels[name].version == pins[name]
  assert wheels['jmp'].policy == 'always'
  (tmp_path / 'dm_haiku-0.0.17-py3-none-any.whl').write_text('')
  (tmp_path / 'jmp-0.0.3-py3-none-any.whl').write_text('')  # wrong version
  (tmp_path / 'pyyaml-6.0.4-cp312-cp312-manylinux_2_17_x86_64.whl'
   ).write_text('')
  paths, missing = gpu.wheels_to_install(
      wheels.values(), str(tmp_path), importable=lambda m: m == 'tabulate')
  assert [os.path.basename(p).split('-')[0] for p in paths] == [
      'dm_haiku', 'pyyaml']
  assert {w.name for w in missing} == {'ml-collections', 'jmp'}


def test_table_has_every_row_and_the_convention():
  rows = [gpu.complete_row(gpu.MEASUREMENTS[0],
                           {'batch': 64, 'step_time_s': 0.5,
                            'compile_s': 40.0, 'memory_bytes': 100 * GIB},
                           710e9),
          gpu.complete_row(gpu.MEASUREMENTS[2],
                           {'status': 'skipped', 'note': 'no time'}, 710e9)]
  assert rows[0]['images_per_s'] == 128.0
  assert rows[0]['mfu'] == pytest.approx(gpu.mfu(710e9, 64, 0.5))
  table = gpu.format_table(rows, {'device': '1 x H200',
                                  'convention': 'MFU = ...'})
  assert '| jax bf16 cpu_kernels=off | 64 | 500.0 |' in table
  assert f'{100 * rows[0]["mfu"]:.1f}%' in table
  assert '| hf bf16 | - |' in table and 'skipped' in table
  assert 'MFU = ...' in table and '- hf bf16: no time' in table


def test_dry_run_without_wheels_or_torch_plans_every_measurement(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'benchmarks.gpu', '--dry-run', '--no-trace',
       f'--wheel_dir={tmp_path}', '--torch_python=/nonexistent/python'],
      cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stdout + result.stderr[-2000:]
  out = result.stdout
  for precision in ('bf16', 'fp32'):
    for kernels in ('off', 'on'):
      assert f'jax {precision} cpu_kernels={kernels}' in out
    assert f'hf {precision}' in out
  assert 'missing: dm-haiku==0.0.17' in out and gpu.FETCH_COMMAND in out
  assert 'skipping the PyTorch part' in out
  assert 'none imported' in out  # no TensorFlow on the train step's path
  assert 'dry run ok' in out
  # What gpu.sh runs first on the GPU machine fails on missing wheels.
  strict = subprocess.run(
      [sys.executable, '-m', 'benchmarks.gpu', '--wheels-to-install',
       f'--wheel_dir={tmp_path}'], cwd=ROOT, capture_output=True, text=True,
      timeout=60, check=False)
  assert strict.returncode == 2 and 'dm-haiku' in strict.stderr

"""benchmarks/step_trace.py: the HLO names mapped to kinds, the trace's
events summed by kind, and the script on the main job's small model (no
timing claims)."""

import subprocess
import sys

import pytest

from benchmarks import step_trace
from perceiver import native
from tests import testing

HLO = '''
ENTRY %main.1 (p: f32[4,8]) -> f32[4,8] {
  %ffi_call.12 = f32[4,8]{1,0} custom-call(%p, %w), custom_call_target="perceiver_batched_matmul_f32"
  %multiply_add_fusion.3 = f32[4,8]{1,0} fusion(%ffi_call.12), kind=kLoop
  ROOT %copy.7 = f32[4,8]{1,0} copy(%multiply_add_fusion.3)
  %multiply_add_fusion = f32[8]{0} fusion(%p), kind=kLoop
}
'''


def test_instructions_are_named_by_target_or_kind():
  kinds = step_trace.instruction_kinds(
      HLO, lambda line: 64.0 if 'custom-call' in line else 1.0)
  assert kinds['ffi_call.12'] == ('perceiver_batched_matmul_f32', 64.0)
  assert kinds['multiply_add_fusion.3'] == ('multiply_add_fusion', 0.0)
  assert kinds['multiply_add_fusion'] == ('multiply_add_fusion', 0.0)
  assert kinds['copy.7'] == ('copy', 0.0)


def test_events_are_summed_per_step_by_kind():
  kinds = {'ffi_call.12': ('perceiver_batched_matmul_f32', 4e6),
           'fusion.1': ('fusion', 0.0), 'fusion.2': ('fusion', 0.0)}
  events = [
      {'ph': 'X', 'name': 'ffi_call.12', 'dur': 1000},  # 1 ms
      {'ph': 'X', 'name': 'ffi_call.12', 'dur': 3000},
      {'ph': 'X', 'name': 'fusion.1', 'dur': 500},
      {'ph': 'X', 'name': 'fusion.2', 'dur': 700},
      {'ph': 'X', 'name': 'ThunkExecutor::Execute', 'dur': 9000},  # not HLO
      {'ph': 'i', 'name': 'fusion.1', 'dur': 5000},  # not a complete event
  ]
  rows = step_trace.per_step(events, kinds, steps=2)
  assert [row['kind'] for row in rows] == ['perceiver_batched_matmul_f32',
                                           'fusion']
  call, fusion = rows
  assert call['calls'] == 1 and call['ms'] == pytest.approx(2.0)
  # 8 MFLOP in 4 ms: 2 GFLOP/s
  assert call['gflops'] == pytest.approx(2.0)
  assert fusion['calls'] == 1 and fusion['ms'] == pytest.approx(0.6)
  assert fusion['gflops'] is None


@pytest.mark.skipif(not native.available(),
                    reason='perceiver.native unavailable')
def test_the_script_traces_a_step():
  result = subprocess.run(
      [sys.executable, 'benchmarks/step_trace.py',
       '--config=configs/fashion_mnist.py', '--steps=1', '--warmup=1',
       '--top=8'],
      cwd=testing.ROOT, env=testing.subprocess_env(1), capture_output=True,
      text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  rows = [line.strip('|').split('|') for line in lines[3:]]
  assert len(rows) == 9  # --top, then the rest in one row
  shares = [float(row[3].strip().rstrip('%')) for row in rows]
  assert sum(shares) == pytest.approx(100, abs=0.5)
  library = [row for row in rows if row[0].strip().startswith('perceiver_')]
  assert library and all(float(row[4]) > 0 for row in library), lines

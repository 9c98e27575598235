r"""Where a train step's time goes, operation by operation: a profiler trace
of the compiled step, summed by what each operation is.

  python benchmarks/step_trace.py                      # W1
  python benchmarks/step_trace.py --workload=W2:side=32
  python benchmarks/step_trace.py --config=configs/fashion_mnist.py

XLA:CPU runs a compiled step as a sequence of thunks (a fusion, a dot, a copy,
a custom call into perceiver/native), and `jax.profiler.trace` records each
one's start and duration on the thread that ran it. This traces --steps
steps of the runner's own step (after --warmup untraced ones) and sums the
durations per step by kind: each library call by its FFI target (with the
GFLOP/s of its products, `native.hlo_flops`, over its duration), each of
XLA's own operations by its HLO name without the numeric suffix
(`multiply_add_fusion`, `ynn_fusion`, `copy`, ...). A library call's duration
is the wall time of its caller, with both threads working inside it; XLA may
run two independent thunks at once, so the durations can add up to more
than the step. Freed memory is retained (experiments/host_memory.py), as in
benchmarks/gemm_share.py, which splits the same step into its GEMMs and the
rest by timing it with the GEMMs skipped.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time
from typing import Iterable, Mapping, Sequence

# `%name = type op(...), ..., custom_call_target="target"` in compiled HLO.
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$')
_TARGET = re.compile(r'custom_call_target="([\w.\-]+)"')


def instruction_kinds(hlo_text: str, flops_of) -> dict[str, tuple[str, float]]:
  """{HLO instruction name: (kind, FLOPs)} for a compiled module's text: a
  custom call's kind is its target (FLOPs from `flops_of(line)`), any other
  instruction's its name without the numeric suffix (FLOPs 0)."""
  kinds = {}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if not match or match.group(1) in kinds:
      continue
    name, rest = match.groups()
    target = _TARGET.search(rest)
    if target and 'custom-call(' in rest:
      kinds[name] = (target.group(1), flops_of(line))
    else:
      kinds[name] = (re.sub(r'[.\d]+$', '', name), 0.0)
  return kinds


def per_step(events: Iterable[Mapping], kinds: Mapping[str, tuple[str, float]],
             steps: int) -> list[dict]:
  """Complete events ('ph' == 'X') of the step's instructions summed by kind:
  [{kind, calls, ms, gflops}] per step, the longest first. Events of other
  names (the runtime's own spans, Python's) are left out."""
  totals = collections.defaultdict(lambda: [0, 0.0, 0.0])
  for event in events:
    if event.get('ph') != 'X' or event.get('name') not in kinds:
      continue
    kind, flops = kinds[event['name']]
    entry = totals[kind]
    entry[0] += 1
    entry[1] += float(event['dur'])  # microseconds
    entry[2] += flops
  rows = [{'kind': kind, 'calls': calls / steps, 'ms': us / steps / 1e3,
           'gflops': flops / us / 1e3 if flops and us else None}
          for kind, (calls, us, flops) in totals.items()]
  return sorted(rows, key=lambda row: -row['ms'])


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workload', default='W1',
                      help="launch.benchmark's preset: W1, W2:side=S, ...")
  parser.add_argument('--config', default=None,
                      help='a config file (configs/NAME.py[:ARG]) at its own '
                           'batch_size, instead of --workload')
  parser.add_argument('--steps', type=int, default=3,
                      help='traced steps')
  parser.add_argument('--warmup', type=int, default=3,
                      help='untraced steps first')
  parser.add_argument('--top', type=int, default=25,
                      help='rows printed (the rest summed in one)')
  args = parser.parse_args(argv)
  if args.steps < 1 or args.warmup < 0 or args.top < 1:
    parser.error('--steps and --top must be positive, --warmup not negative')
  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))
  from experiments import host_memory
  host_memory.configure('retain')  # before JAX starts its backends
  import jax
  from experiments import parallel
  from launch import benchmark
  from perceiver import native
  # pylint: enable=g-import-not-at-top
  try:
    config, batch_size, name = benchmark.config_or_workload(args.config,
                                                            args.workload)
  except ValueError as e:  # setup.ConfigError among them
    sys.exit(f'step_trace: {e}')
  mesh = parallel.make_mesh()
  train_step, state, sums, batch = benchmark.train_step_inputs(
      config, batch_size, mesh)
  compiled = train_step.lower(state, sums, batch).compile()
  kinds = instruction_kinds(compiled.as_text(), native.hlo_flops)
  for _ in range(args.warmup):
    state, sums = compiled(state, sums, batch)
  jax.block_until_ready((state, sums))
  seconds = []
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir):
      for _ in range(args.steps):
        start = time.perf_counter()
        state, sums = jax.block_until_ready(compiled(state, sums, batch))
        seconds.append(time.perf_counter() - start)
    files = glob.glob(os.path.join(log_dir, '**', '*.trace.json.gz'),
                      recursive=True)
    if not files:
      sys.exit(f'step_trace: the profiler wrote no trace under {log_dir}')
    with gzip.open(files[0], 'rt') as f:
      events = json.load(f).get('traceEvents', [])
  rows = per_step(events, kinds, args.steps)
  total = sum(row['ms'] for row in rows)
  print(f'{name}, batch {batch_size}, {mesh.devices.size} device(s), GEMMs: '
        f'{native.blas()}, freed memory retained; {args.steps} traced steps, '
        f'median {statistics.median(seconds) * 1e3:.0f} ms (traced); '
        f'operations {total:.0f} ms a step in all')
  print('| operation | calls a step | ms a step | share | GFLOP/s |')
  print('|---|---:|---:|---:|---:|')
  shown, rest = rows[:args.top], rows[args.top:]
  if rest:
    shown.append({'kind': f'({len(rest)} other kinds)',
                  'calls': sum(r['calls'] for r in rest),
                  'ms': sum(r['ms'] for r in rest), 'gflops': None})
  for row in shown:
    rate = f'{row["gflops"]:.0f}' if row['gflops'] else '-'
    print(f'| {row["kind"]} | {row["calls"]:.0f} | {row["ms"]:.2f} | '
          f'{row["ms"] / total:.1%} | {rate} |')


if __name__ == '__main__':
  main()

r"""Two variants of the train step, compiled in one process and alternated.

  python benchmarks/ab_step.py --config=configs/w1.py:side=32,batch_size=4 \
      --b=model.cpu_kernels=false              # W2 at M = 1,024: kernels off
  python benchmarks/ab_step.py --config=configs/w1.py \
      --b_xla=xla_cpu_enable_concurrency_optimized_scheduler=true   # W1

On a machine whose speed drifts by +-20% from one minute to the next (the
2-vCPU cloud machines of benchmarks/RESULTS.md), two separate processes
compare the machine's moments as much as the variants. Here both variants
are compiled up front in the same process, from the same config: A is the
config with the --a overrides, B with the --b overrides (`KEY=VALUE`, as
`--config.KEY=VALUE` on the runner's command line) and, on top of the
runner's own compiler options, B's --b_xla XLA options (what
`jax.jit(...).lower(...).compile(compiler_options=...)` takes). Each step
starts from a copy of its variant's initial state (the step donates it), the
variants run in turn A B B A ... for --pairs pairs after --warmup, and each
pair gives one ratio A / B: above 1, B is the faster. The median ratio is
the figure to quote; the spread of the ratios says how far to trust it.
Also printed: each variant's median step, its compiled temporaries
(`memory_analysis()`), and, where both variants have the same parameters,
the largest difference between them after one step from the same state: 0
where B runs the same arithmetic, float32 rounding where it reorders it
(Adam's first step, ~lr sign(g), can carry a rounding difference in a tiny
gradient up to ~lr), and more where B computes something else.

Freed host memory is retained (experiments/host_memory.py, --host_memory).
Measured tables belong in benchmarks/RESULTS.md with the command and date.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Sequence


def parse_pairs(items: Sequence[str], what: str) -> list[tuple[str, str]]:
  """['KEY=VALUE', ...] as [(KEY, VALUE), ...]; ValueError naming `what`
  for an item without '=' or with an empty key."""
  pairs = []
  for item in items:
    key, sep, value = item.partition('=')
    if not sep or not key.strip():
      raise ValueError(f'{what}: expected KEY=VALUE, got {item!r}.')
    pairs.append((key.strip(), value))
  return pairs


def xla_value(text: str) -> Any:
  """An XLA option's value from the command line: bool, int, float or str."""
  if text.lower() in ('true', 'false'):
    return text.lower() == 'true'
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def summarize(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
  """Medians of the two variants' step times and of the per-pair ratios
  A / B, with the ratios' lower and upper quartiles."""
  if len(a) != len(b) or not a:
    raise ValueError('summarize: needs as many A as B times, at least one.')
  ratios = sorted(x / y for x, y in zip(a, b))
  quartiles = (statistics.quantiles(ratios, n=4, method='inclusive')
               if len(ratios) > 1 else [ratios[0]] * 3)
  return {'a_s': statistics.median(a), 'b_s': statistics.median(b),
          'ratio': statistics.median(ratios), 'ratio_q1': quartiles[0],
          'ratio_q3': quartiles[2]}


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', required=True,
                      help='configs/NAME.py[:ARG], at its own batch_size')
  parser.add_argument('--a', action='append', default=[], metavar='KEY=VALUE',
                      help='a config override of variant A (repeatable)')
  parser.add_argument('--b', action='append', default=[], metavar='KEY=VALUE',
                      help='a config override of variant B (repeatable)')
  parser.add_argument('--b_xla', action='append', default=[],
                      metavar='OPTION=VALUE',
                      help='an XLA compiler option of variant B (repeatable)')
  parser.add_argument('--pairs', type=int, default=12,
                      help='timed pairs (one step of each variant)')
  parser.add_argument('--warmup', type=int, default=2,
                      help='untimed pairs first')
  parser.add_argument('--host_memory', default='retain',
                      choices=('retain', 'system'),
                      help='experiments/host_memory.py policy')
  args = parser.parse_args(argv)
  if args.pairs < 1 or args.warmup < 0:
    parser.error('--pairs must be positive and --warmup not negative')
  try:
    a_overrides = parse_pairs(args.a, '--a')
    b_overrides = parse_pairs(args.b, '--b')
    b_xla = {k: xla_value(v) for k, v in parse_pairs(args.b_xla, '--b_xla')}
  except ValueError as e:
    parser.error(str(e))
  if not (args.a or args.b or args.b_xla):
    parser.error('nothing tells B from A: give --a, --b or --b_xla')

  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))
  from experiments import host_memory
  retained = host_memory.configure(args.host_memory)  # before JAX starts
  import jax
  import numpy as np
  from experiments import config_loader
  from experiments import parallel
  from experiments import setup
  from launch import benchmark
  # pylint: enable=g-import-not-at-top

  try:  # every config mistake before anything compiles
    configs = {'A': config_loader.load(args.config, a_overrides),
               'B': config_loader.load(args.config, b_overrides)}
  except setup.ConfigError as e:
    sys.exit(f'ab_step: {e}')
  mesh = parallel.make_mesh()
  variants = {}
  for name in ('B', 'A'):  # B first: a bad --b_xla fails at once
    config = configs[name]
    step, state, sums, batch = benchmark.train_step_inputs(
        config, config.batch_size, mesh)
    options = b_xla if name == 'B' else None
    try:
      compiled = step.lower(state, sums, batch).compile(options)
    except Exception as e:  # pylint: disable=broad-except
      # XLA's error for an unknown option or value is long; its first line
      # names it.
      sys.exit(f'ab_step: variant {name} does not compile: '
               f'{setup.one_line(str(e))}')
    variants[name] = (compiled, state, sums, batch)
  variants = {name: variants[name] for name in ('A', 'B')}

  def run(name: str) -> tuple[float, Any]:
    compiled, state, sums, batch = variants[name]
    state, sums = jax.block_until_ready(
        jax.tree.map(lambda x: x.copy(), (state, sums)))  # untimed
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(state, sums, batch))
    return time.perf_counter() - start, out

  first = {name: run(name)[1][0].params for name in variants}
  leaves = [jax.tree.leaves(first[name]) for name in variants]
  same = (jax.tree.structure(first['A']) == jax.tree.structure(first['B'])
          and all(x.shape == y.shape for x, y in zip(*leaves)))
  difference = (max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                    for x, y in zip(*leaves)) if same else None)
  times = {'A': [], 'B': []}
  for i in range(args.warmup + args.pairs):
    for name in (('A', 'B') if i % 2 == 0 else ('B', 'A')):
      seconds = run(name)[0]
      if i >= args.warmup:
        times[name].append(seconds)
  result = summarize(times['A'], times['B'])

  def describe(overrides, xla=None):
    parts = [f'{k}={v}' for k, v in overrides]
    parts += [f'XLA {k}={v}' for k, v in (xla or {}).items()]
    return ', '.join(parts) or 'the config as it is'

  print(f'{args.config}, batch {configs["A"].batch_size}, '
        f'{mesh.devices.size} device(s), freed memory '
        f'{"retained" if retained else "not retained"}, {args.pairs} pairs '
        f'after {args.warmup}')
  print(f'A: {describe(a_overrides)}')
  print(f'B: {describe(b_overrides, b_xla)}')
  if same:
    print(f'largest parameter difference after one step: {difference:.3g}')
  else:
    print('the variants have different parameters (not compared)')
  print('| variant | train step, median (s) | compiled temporaries (MB) |')
  print('|---|---:|---:|')
  for name in variants:
    memory = variants[name][0].memory_analysis()
    temp = (f'{memory.temp_size_in_bytes / 1e6:.1f}'
            if memory is not None else '-')
    print(f'| {name} | {result[name.lower() + "_s"]:.3f} | {temp} |')
  print(f'A / B per pair: median {result["ratio"]:.3f} (quartiles '
        f'{result["ratio_q1"]:.3f}-{result["ratio_q3"]:.3f}); above 1, B is '
        'faster')


if __name__ == '__main__':
  main()

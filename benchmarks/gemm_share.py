r"""How much of a train step is its matrix products: the step timed with the
library's GEMMs and with every GEMM skipped, alternately in one process.

  python benchmarks/gemm_share.py                      # W1
  python benchmarks/gemm_share.py --workload=W2:side=32
  python benchmarks/gemm_share.py --config=configs/fashion_mnist.py

perceiver/native computes every product of the model's layers and attention
with a single-threaded GEMM per chunk of work (common.h). Inside
`native.library.gemms_skipped()` each of those GEMMs returns at once, so the
same compiled step then times everything else: XLA's elementwise fusions
(LayerNorm, GELU, bias sums, Adam), the attention kernels' softmax, the
thread pool's hand-offs. A skipped GEMM leaves its output as the buffer
was, so some of that work then runs on stale or non-finite values and can be
slower than in a real step: the skipped time is an upper bound on the rest.
The difference is the time the step spends in its GEMMs; with the FLOPs of
the library's calls (`native.hlo_flops`, nearly all of them GEMM FLOPs) it
gives the GEMMs' rate inside the step, to set against
benchmarks/gemm_rates.py's rates of the same GEMMs alone. Each step starts
from a copy of the same initial state (a skipped step's parameters are
garbage), the two variants in turn A B B A ..., so the machine's drift hits
both; the figures are medians. Freed memory is retained
(experiments/host_memory.py): under malloc's defaults each step faults its
temporaries in afresh, and a skipped product leaves its output's pages to be
faulted by whatever touches them next, so the split would move faults
between the two sides rather than measure the products.

The PyTorch peer's split comes from its profiler:
  .venv-torch/bin/python benchmarks/hf_perceiver_w1.py --profile
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Sequence


def split(real: Sequence[float], skipped: Sequence[float],
          flops: float) -> dict[str, float]:
  """Medians of the step times with and without the GEMMs, the GEMMs' share
  of the step and their rate inside it (GFLOP/s of `flops` over the time
  the GEMMs add)."""
  step, rest = statistics.median(real), statistics.median(skipped)
  gemms = step - rest
  return {'step_s': step, 'rest_s': rest, 'gemm_s': gemms,
          'gemm_share': gemms / step,
          'gemm_gflops': flops / gemms / 1e9 if gemms > 0 else float('nan')}


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workload', default='W1',
                      help="launch.benchmark's preset: W1, W2:side=S, ...")
  parser.add_argument('--config', default=None,
                      help='a config file (configs/NAME.py[:ARG]) at its own '
                           'batch_size, instead of --workload')
  parser.add_argument('--pairs', type=int, default=8,
                      help='timed pairs (one step of each variant)')
  parser.add_argument('--warmup', type=int, default=3,
                      help='untimed pairs first')
  args = parser.parse_args(argv)
  if args.pairs < 1 or args.warmup < 0:
    parser.error('--pairs must be positive and --warmup not negative')
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
  if not native.available():
    sys.exit(f'perceiver.native unavailable: {native.why_unavailable()}')
  try:
    config, batch_size, name = benchmark.config_or_workload(args.config,
                                                            args.workload)
  except ValueError as e:  # setup.ConfigError among them
    sys.exit(f'gemm_share: {e}')
  mesh = parallel.make_mesh()
  train_step, initial, sums, batch = benchmark.train_step_inputs(
      config, batch_size, mesh)
  compiled = train_step.lower(initial, sums, batch).compile()
  flops = native.hlo_flops(compiled.as_text()) * mesh.devices.size

  def step_seconds(skip: bool) -> float:
    # The step donates its state and sums: each call gets copies (untimed).
    state, metrics = jax.block_until_ready(
        jax.tree.map(lambda a: a.copy(), (initial, sums)))
    start = time.perf_counter()
    if skip:
      with native.library.gemms_skipped():
        jax.block_until_ready(compiled(state, metrics, batch))
    else:
      jax.block_until_ready(compiled(state, metrics, batch))
    return time.perf_counter() - start

  times = {False: [], True: []}
  for i in range(args.warmup + args.pairs):
    for skip in ((False, True) if i % 2 == 0 else (True, False)):
      seconds = step_seconds(skip)
      if i >= args.warmup:
        times[skip].append(seconds)
  result = split(times[False], times[True], flops)
  print(f'{name}, batch {batch_size}, GEMMs: {native.blas()}, freed memory '
        f'retained, {args.pairs} pairs of steps (medians)')
  print('| train step (s) | GEMMs skipped (s) | GEMMs (s) | GEMM share | '
        'library FLOPs (G) | GEMM GFLOP/s in the step |')
  print('|---:|---:|---:|---:|---:|---:|')
  print(f'| {result["step_s"]:.3f} | {result["rest_s"]:.3f} | '
        f'{result["gemm_s"]:.3f} | {result["gemm_share"]:.0%} | '
        f'{flops / 1e9:.1f} | {result["gemm_gflops"]:.0f} |')


if __name__ == '__main__':
  main()

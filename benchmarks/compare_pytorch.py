r"""This project against the PyTorch peer on W1 or W2, on equal terms.

  bash benchmarks/setup_torch.sh       # once: the peer's venv, .venv-torch
  python -m benchmarks.compare_pytorch --workload=W1 --repeats=5
  python -m benchmarks.compare_pytorch --workload=W2 --sides=32,64,128,256

Workloads (configs/w1.py): W1 = batch 16 of 64x64x3 images; W2 = the same
model at batch 4 over S x S images (M = S^2; --sides). The project runs its
own jitted train step (experiments/steps.py) and forward pass, the peer is
benchmarks/hf_perceiver_w1.py (HuggingFace transformers' Perceiver rebuilt to
the same shapes, in its own venv: --torch_python). Both build the same model
(the parameter counts are checked against configs/w1.NUM_PARAMS, 7,656,115),
time the same two things on the same shapes: a forward pass (logits, no
gradients) and a train step (forward, softmax cross-entropy, backward, Adam),
each call timed on its own after --warmup calls, float32, with as many
threads as this process may use CPUs (XLA:CPU's own choice; torch is told).

Equal malloc terms. The project's CPU runs keep freed host memory for reuse
through mallopt (experiments/host_memory.py); a process that does not call
mallopt gets the same settings from glibc's tunables in the environment,
`RETAIN_TUNABLES` (the same three parameters, applied through the same glibc
setters when malloc starts). Each --policies column runs both sides alike:

  system  "malloc defaults": the project with --host_memory=system, the peer
          with no glibc.malloc tunables in its environment;
  retain  "freed memory retained": the project with --host_memory=retain
          (mallopt; --project_retain=tunables uses the environment instead),
          the peer with GLIBC_TUNABLES=RETAIN_TUNABLES.

Every measurement is a fresh process. A round runs each (side, policy) pair
as project then peer, and every other round swaps the two (ABBA), so that
drift of the machine hits both sides; there are --repeats rounds. Each run
reports the median of its calls; the tables give every run and, per cell,
the median over the runs, with the ratio torch / project (above 1: the
project is faster; for memory: the peer holds more), and each run's peak
resident memory (ru_maxrss of the child, from wait4). A numpy 2048^3 float32
matmul, timed here before and after the runs, gives the machine's rate.

Measured tables belong in benchmarks/RESULTS.md with the command and date;
`--json_out=FILE` keeps every run's raw figures.
"""

from __future__ import annotations

import ctypes
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

from absl import app
from absl import flags
import numpy as np

from experiments import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_SCRIPT = os.path.join(ROOT, 'benchmarks', 'hf_perceiver_w1.py')
GIB = 2.0 ** 30

IMPLS = ('project', 'torch')
POLICIES = {'system': 'malloc defaults', 'retain': 'freed memory retained'}
# mallopt's M_TRIM_THRESHOLD=-1 (host_memory.py) is the largest size_t.
_SIZE_MAX = (1 << (8 * ctypes.sizeof(ctypes.c_size_t))) - 1
RETAIN_TUNABLES = ('glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:'
                   f'glibc.malloc.trim_threshold={_SIZE_MAX}')
MEASURES = (('train_s', 'train step (s)', '{:.3f}'),
            ('forward_s', 'forward (s)', '{:.3f}'),
            ('maxrss_gib', 'peak RSS (GiB)', '{:.2f}'))


class Run(NamedTuple):
  """One measurement: a fresh process of `impl` at one side and policy."""
  round: int
  side: int  # image side S; M = S^2
  policy: str  # a key of POLICIES
  impl: str  # 'project' | 'torch'


class Launch(NamedTuple):
  argv: list[str]
  env: dict[str, str]


def plan(repeats: int, sides: Sequence[int],
         policies: Sequence[str]) -> list[Run]:
  """The runs in order: rounds of (side, policy) pairs, each pair project
  then torch in even rounds and torch then project in odd ones."""
  runs = []
  for r in range(repeats):
    impls = IMPLS if r % 2 == 0 else IMPLS[::-1]
    for side in sides:
      for policy in policies:
        runs.extend(Run(r, side, policy, impl) for impl in impls)
  return runs


def malloc_env(policy: str, base: dict[str, str]) -> dict[str, str]:
  """`base` without any glibc malloc setting, plus RETAIN_TUNABLES for
  'retain'. Other tunables in GLIBC_TUNABLES are kept."""
  if policy not in POLICIES:
    raise ValueError(f'Unknown policy {policy!r}; known: {sorted(POLICIES)}.')
  env = {k: v for k, v in base.items() if not k.startswith('MALLOC_')}
  kept = [item for item in env.pop('GLIBC_TUNABLES', '').split(':')
          if item and not item.startswith('glibc.malloc.')]
  if policy == 'retain':
    kept.append(RETAIN_TUNABLES)
  if kept:
    env['GLIBC_TUNABLES'] = ':'.join(kept)
  return env


def workload_spec(workload: str, side: int) -> str:
  """The `--workload` value of launch.benchmark for one side."""
  return 'W1' if workload == 'W1' else f'W2:side={side}'


def launch(run: Run, *, workload: str, batch_size: int, iterations: int,
           warmup: int, torch_python: str, torch_threads: int,
           project_retain: str = 'mallopt',
           base_env: Optional[dict[str, str]] = None) -> Launch:
  """The command line and environment of one run."""
  base = dict(os.environ if base_env is None else base_env)
  timing = [f'--iterations={iterations}', f'--warmup={warmup}']
  if run.impl == 'project':
    by_mallopt = run.policy == 'retain' and project_retain == 'mallopt'
    env = malloc_env('system' if by_mallopt else run.policy, base)
    env.setdefault('JAX_PLATFORMS', 'cpu')
    env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    mode = 'retain' if by_mallopt else 'system'
    argv = [sys.executable, '-m', 'benchmarks.compare_pytorch',
            f'--worker={workload_spec(workload, run.side)}',
            f'--host_memory={mode}'] + timing
  elif run.impl == 'torch':
    env = malloc_env(run.policy, base)
    argv = [torch_python, PEER_SCRIPT, '--json', '--forward',
            f'--side={run.side}', f'--batch_size={batch_size}',
            f'--threads={torch_threads}'] + timing
  else:
    raise ValueError(f'Unknown implementation {run.impl!r}.')
  return Launch(argv, env)


def execute(argv: Sequence[str], env: dict[str, str],
            timeout_s: Optional[float] = None) -> dict[str, Any]:
  """Runs one child to its end; its last JSON line of output, plus wall_s,
  maxrss_gib (the child's own peak RSS, from wait4) and, on failure, error."""
  with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
    start = time.perf_counter()
    proc = subprocess.Popen(list(argv), stdout=out, stderr=err, env=env,
                            cwd=ROOT)
    timer = threading.Timer(timeout_s, proc.kill) if timeout_s else None
    if timer:
      timer.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if timer:
      timer.cancel()
    result = {'wall_s': time.perf_counter() - start,
              'maxrss_gib': usage.ru_maxrss * 1024 / GIB}
    out.seek(0)
    err.seek(0)
    stdout = out.read().decode(errors='replace')
    stderr = err.read().decode(errors='replace')
  lines = [l for l in stdout.splitlines() if l.startswith('{')]
  if proc.returncode == 0 and lines:
    result.update(json.loads(lines[-1]))
    return result
  tail = (stderr or stdout).strip().splitlines()[-3:]
  result['error'] = f'exit {proc.returncode}: ' + ' | '.join(tail)
  return result


def run_median(result: dict[str, Any], key: str) -> Optional[float]:
  """A run's figure: the median of its calls' times, or its peak RSS."""
  value = result.get(key)
  if isinstance(value, list):
    return statistics.median(value) if value else None
  return value


def run_plan(runs: Sequence[Run], command: Callable[[Run], Launch],
             runner: Callable[[Sequence[str], dict[str, str]], dict],
             expected_params: Optional[int] = None,
             log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Runs every run in order; each result carries its Run's fields.

  Stops at the first run whose parameter count differs from
  expected_params (the comparison would not be between equal models).
  """
  results = []
  for i, run in enumerate(runs):
    argv, env = command(run)
    result = dict(runner(argv, env), **run._asdict())
    results.append(result)
    log(f'[{i + 1}/{len(runs)}] ' + describe(result))
    params = result.get('params')
    if expected_params is not None and params is not None and (
        params != expected_params):
      raise RuntimeError(f'{run.impl} has {params:,} parameters at side '
                         f'{run.side}, expected {expected_params:,}.')
  return results


def describe(r: dict[str, Any]) -> str:
  """One line of progress for a finished run."""
  head = f'round {r["round"]} S={r["side"]} {r["policy"]} {r["impl"]}: '
  if 'error' in r:
    return head + r['error']
  cells = [f'{label.split(" (")[0]} ' + fmt.format(run_median(r, key))
           for key, label, fmt in MEASURES if run_median(r, key) is not None]
  return head + ', '.join(cells) + f' (wall {r["wall_s"]:.0f} s)'


def summarize(results: Sequence[dict[str, Any]]) -> dict[tuple, dict]:
  """(side, policy, impl) -> {measure key: median over runs, 'runs': n}."""
  cells: dict[tuple, list[dict]] = {}
  for r in results:
    if 'error' not in r:
      cells.setdefault((r['side'], r['policy'], r['impl']), []).append(r)
  summary = {}
  for cell, rs in cells.items():
    figures = {'runs': len(rs)}
    for key, _, _ in MEASURES:
      values = [v for v in (run_median(r, key) for r in rs) if v is not None]
      figures[key] = statistics.median(values) if values else None
    summary[cell] = figures
  return summary


def _cell(value: Optional[float], fmt: str) -> str:
  return '-' if value is None else fmt.format(value)


def ratio(torch_value: Optional[float],
          project_value: Optional[float]) -> Optional[float]:
  if torch_value is None or not project_value:
    return None
  return torch_value / project_value


def format_summary(summary: dict[tuple, dict], sides: Sequence[int],
                   policies: Sequence[str]) -> str:
  """The markdown table: per side and measure, for each policy the project,
  the peer and torch / project, each the median over the runs."""
  header = ['S', 'M', 'measure']
  for policy in policies:
    header += [f'{POLICIES[policy]}: project', 'torch', 'torch / project']
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '---:|---:|---|' + '---:|' * (3 * len(policies))]
  for side in sides:
    for key, label, fmt in MEASURES:
      row = [str(side), f'{side * side:,}', label]
      for policy in policies:
        p = summary.get((side, policy, 'project'), {}).get(key)
        t = summary.get((side, policy, 'torch'), {}).get(key)
        row += [_cell(p, fmt), _cell(t, fmt), _cell(ratio(t, p), '{:.2f}')]
      lines.append('| ' + ' | '.join(row) + ' |')
  return '\n'.join(lines)


def format_runs(results: Sequence[dict[str, Any]]) -> str:
  """Every run, in the order run: each a median over its own calls."""
  lines = ['| # | round | S | policy | impl | train step (s) | forward (s) | '
           'peak RSS (GiB) | compile (s) | wall (s) |',
           '|---:|---:|---:|---|---|---:|---:|---:|---:|---:|']
  for i, r in enumerate(results):
    row = [str(i + 1), str(r['round']), str(r['side']), r['policy'],
           r['impl']]
    if 'error' in r:
      row += [r['error'][:100], '', '', '', f'{r["wall_s"]:.0f}']
    else:
      row += [_cell(run_median(r, key), fmt) for key, _, fmt in MEASURES]
      row += [_cell(r.get('compile_s'), '{:.1f}'), f'{r["wall_s"]:.0f}']
    lines.append('| ' + ' | '.join(row) + ' |')
  return '\n'.join(lines)


def numpy_matmul_gflops(n: int = 2048, iterations: int = 10) -> float:
  """GFLOP/s of an [n, n] x [n, n] float32 numpy matmul (median call)."""
  rng = np.random.default_rng(0)
  a = rng.standard_normal((n, n), dtype=np.float32)
  b = rng.standard_normal((n, n), dtype=np.float32)
  a @ b  # warm-up
  times = []
  for _ in range(iterations):
    start = time.perf_counter()
    a @ b
    times.append(time.perf_counter() - start)
  return 2.0 * n ** 3 / statistics.median(times) / 1e9


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return 'unknown CPU'


def _versions(results: Sequence[dict[str, Any]], impl: str) -> str:
  found = {r['versions'] for r in results
           if r['impl'] == impl and 'versions' in r}
  return ' / '.join(sorted(found)) or '?'


def _params(results: Sequence[dict[str, Any]], impl: str) -> str:
  found = {r['params'] for r in results if r['impl'] == impl and 'params' in r}
  return ' / '.join(f'{p:,}' for p in sorted(found)) or '?'


# The project's side of a run (a fresh process: `--worker`).


def _peak_rss_gib() -> float:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) * 1024 / GIB
  return float('nan')


def project_worker(spec: str, mode: str, iterations: int,
                   warmup: int) -> dict[str, Any]:
  """The project's forward and train step at a launch.benchmark workload.

  The runner's jitted train step (as launch.benchmark times it) and the
  model's jitted forward (logits, is_training=False), each call timed on its
  own until its outputs are ready, forward first, as the peer does.
  """
  retained = host_memory.configure(mode)  # Before JAX starts.
  # pylint: disable=g-import-not-at-top
  import jax
  import jaxlib
  from experiments import parallel
  from experiments import steps as steps_lib
  from launch import benchmark
  from perceiver import native
  # pylint: enable=g-import-not-at-top

  config, batch_size = benchmark.workload(spec)
  mesh = parallel.make_mesh()
  model, optimizer = benchmark.model_and_optimizer(config)
  state = steps_lib.create_train_state(config, model, optimizer, mesh)
  sums = steps_lib.zero_metrics(mesh)
  batch = benchmark.random_batch(config, batch_size, mesh)
  side = config.input_shape[0]
  result = {'impl': 'project', 'batch': batch_size, 'side': side,
            'm': side * config.input_shape[1],
            'params': sum(x.size for x in jax.tree.leaves(state.params)),
            'devices': mesh.devices.size,
            'threads': len(os.sched_getaffinity(0)),
            'retained': retained,
            'versions': f'jax {jax.__version__}, jaxlib {jaxlib.__version__}, '
                        f'GEMMs: {native.blas() or "XLA"}',
            'glibc_tunables': os.environ.get('GLIBC_TUNABLES', '')}

  def time_calls(fn):
    for _ in range(warmup):
      jax.block_until_ready(fn())
    times = []
    for _ in range(iterations):
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times.append(time.perf_counter() - start)
    return times

  def logits(params, model_state, inputs):
    return model.apply(params, model_state, None, inputs,
                       is_training=False)[0]  # [B, K]

  start = time.perf_counter()
  forward = jax.jit(logits).lower(state.params, state.state,
                                  batch['inputs']).compile()
  compile_s = time.perf_counter() - start
  result['forward_s'] = time_calls(
      lambda: forward(state.params, state.state, batch['inputs']))
  result['rss_forward_gib'] = _peak_rss_gib()

  train_step = steps_lib.make_train_step(config, model, optimizer, mesh)
  start = time.perf_counter()
  compiled = train_step.lower(state, sums, batch).compile()
  result['compile_s'] = compile_s + time.perf_counter() - start
  carry = [state, sums]

  def step():
    carry[0], carry[1] = compiled(carry[0], carry[1], batch)  # donates
    return carry[1]

  result['train_s'] = time_calls(step)
  result['rss_peak_gib'] = _peak_rss_gib()
  return result


def define_flags() -> None:
  """Flags of the command line (defined only when run as the program)."""
  flags.DEFINE_enum('workload', 'W1', ['W1', 'W2'],
                    'W1 (batch 16, 64x64) or W2 (batch 4, --sides).')
  flags.DEFINE_list('sides', None,
                    'W2 image sides S (M = S^2); default configs/w1.W2_SIDES '
                    '= 32,64,128,256.')
  flags.DEFINE_integer('repeats', 3, 'Rounds; each run is a fresh process.')
  flags.DEFINE_integer('iterations', 5, 'Timed calls per run and phase.')
  flags.DEFINE_integer('warmup', 2, 'Untimed calls before them.')
  flags.DEFINE_list('policies', list(POLICIES),
                    f'malloc policies, columns of the table: {list(POLICIES)}.')
  flags.DEFINE_string('torch_python',
                      os.path.join(ROOT, '.venv-torch', 'bin', 'python'),
                      'Python of the peer\'s venv (benchmarks/setup_torch.sh).')
  flags.DEFINE_integer('torch_threads', 0,
                       'torch intra-op threads; 0 = the CPUs this process may '
                       'run on, as XLA:CPU uses.')
  flags.DEFINE_enum('project_retain', 'mallopt', ['mallopt', 'tunables'],
                    'How the project retains freed memory in the retain '
                    'column: its own --host_memory=retain, or the '
                    'environment the peer gets.')
  flags.DEFINE_float('timeout_s', 3600.0, 'Kill a run after this long.')
  flags.DEFINE_integer('matmul_n', 2048, 'numpy matmul size N.')
  flags.DEFINE_string('json_out', None, 'Also write every run as JSON lines.')
  flags.DEFINE_string('worker', None,
                      'Internal: one project run at this launch.benchmark '
                      'workload (W1, W2:side=S); prints a JSON line.')
  host_memory.define_flag()


def main(argv):
  del argv
  f = flags.FLAGS
  if f.worker:
    print(json.dumps(project_worker(f.worker, f.host_memory, f.iterations,
                                    f.warmup)), flush=True)
    return
  from configs import w1  # pylint: disable=g-import-not-at-top
  if f.workload == 'W1':
    if f.sides:
      raise app.UsageError('--sides is for W2; W1 is 64x64.')
    sides, batch_size = [64], w1.BATCH_SIZE
  else:
    sides = [int(s) for s in (f.sides or w1.W2_SIDES)]
    batch_size = w1.W2_BATCH_SIZE
    if any(s <= 0 or s > 1024 for s in sides):
      raise app.UsageError(f'--sides are image sides (M = S^2), got {sides}.')
  unknown = set(f.policies) - set(POLICIES)
  if unknown:
    raise app.UsageError(f'Unknown --policies {sorted(unknown)}; known: '
                         f'{list(POLICIES)}.')
  if not os.access(f.torch_python, os.X_OK):
    raise app.UsageError(f'No peer python at {f.torch_python}: run bash '
                         'benchmarks/setup_torch.sh or set --torch_python.')
  cpus = len(os.sched_getaffinity(0))
  threads = f.torch_threads or cpus
  runs = plan(f.repeats, sides, f.policies)

  def command(run):
    return launch(run, workload=f.workload, batch_size=batch_size,
                  iterations=f.iterations, warmup=f.warmup,
                  torch_python=f.torch_python, torch_threads=threads,
                  project_retain=f.project_retain)

  print(f'{f.workload}: project vs HuggingFace Perceiver (PyTorch), batch '
        f'{batch_size}, sides {sides}, policies {list(f.policies)}, '
        f'{f.repeats} round(s) of fresh processes, {f.warmup} warm-up + '
        f'{f.iterations} timed calls per phase; {len(runs)} runs.',
        flush=True)
  load_start = os.getloadavg()
  matmul_start = numpy_matmul_gflops(f.matmul_n)
  start = time.perf_counter()
  results = run_plan(
      runs, command,
      lambda argv, env: execute(argv, env, timeout_s=f.timeout_s),
      expected_params=w1.NUM_PARAMS, log=lambda s: print(s, flush=True))
  elapsed = time.perf_counter() - start
  matmul_end = numpy_matmul_gflops(f.matmul_n)
  load_end = os.getloadavg()
  if f.json_out:
    with open(f.json_out, 'w') as out:
      for r in results:
        out.write(json.dumps(r) + '\n')

  date = datetime.datetime.now(datetime.timezone.utc)
  print()
  print(f'date: {date:%Y-%m-%d %H:%M} UTC')
  print('command: python -m benchmarks.compare_pytorch '
        + ' '.join(sys.argv[1:]))
  print(f'machine: {_cpu_model()}, {cpus} CPU(s) usable (affinity), load '
        f'average {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the '
        'end (1 min)')
  print(f'numpy {f.matmul_n}^3 float32 matmul: {matmul_start:.1f} GFLOP/s '
        f'before the runs, {matmul_end:.1f} after')
  print(f'project: {_versions(results, "project")}, XLA:CPU on {cpus} '
        f'CPU(s); peer: {_versions(results, "torch")}, {threads} thread(s)')
  print(f'parameters: project {_params(results, "project")}, torch '
        f'{_params(results, "torch")} (expected {w1.NUM_PARAMS:,})')
  print(f'retain: project by {f.project_retain}; peer by GLIBC_TUNABLES='
        f'{RETAIN_TUNABLES}')
  print(f'{len(results)} runs in {elapsed / 60:.1f} min')
  print()
  print('Median over runs of each run\'s median call; peak RSS = the '
        'process\'s (ru_maxrss); torch / project above 1: the project is '
        'faster (smaller).')
  print(format_summary(summarize(results), sides, f.policies))
  print()
  print('Every run:')
  print(format_runs(results), flush=True)
  if any('error' in r for r in results):
    sys.exit(1)


if __name__ == '__main__':
  define_flags()
  app.run(main)

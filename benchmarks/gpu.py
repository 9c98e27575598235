r"""The ImageNet Perceiver's train step on one GPU, next to the HF PyTorch peer.

  bash benchmarks/gpu.sh                    # on the GPU machine: installs the
                                            # wheels, then runs this module
  python -m benchmarks.gpu --dry-run        # here, on the CPU: checks, plan
  python -m benchmarks.gpu --dry-run --torch_python=.venv-torch/bin/python
  JAX_PLATFORMS=cpu python -m benchmarks.gpu --impls=jax,hf --precisions=bf16 \
      --kernels=off --config_arg=runlocal --max_batch=16 \
      --hf_args='--tiny --device=cpu' --torch_python=.venv-torch/bin/python
                                            # the whole run on the CPU, small

Measures, in this order and in one go of at most ~8 minutes (`--deadline`):

  1. jax  bf16  cpu_kernels=False     4. jax  fp32  cpu_kernels=False
  2. jax  bf16  cpu_kernels=True      5. jax  fp32  cpu_kernels=True
  3. hf   bf16 (autocast)             6. hf   fp32 (TF32 matmuls)

`jax` is this project's own jitted train step (experiments/steps.py:
MixUp/CutMix, label smoothing, LAMB with clipping) on configs/imagenet.py at
paper size (224 x 224 x 3, 64 Fourier bands, 512 x 1024 latents, 8 blocks of
6 self-attends, 8 interleaved cross-attends, 44,912,254 parameters), random
inputs; `bf16` is config.mixed_precision='bf16' (experiments/precision.py),
`fp32` is float32 with XLA's default matmul precision (TF32 on this GPU).
`hf` is benchmarks/hf_perceiver_gpu.py: HF transformers' Perceiver layers in
the same arrangement, at the JAX run's batch where it fits.

Each JAX measurement runs in its own process (benchmarks/gpu_worker.py). Its
batch is the largest power of two up to 1024 that fits, found without running
anything that cannot fit: the step is compiled for a batch and XLA's memory
plan of the compiled step is compared with the device's memory
(`next_batch`: the first batch comes from a shapes-only estimate of the
activations the backward pass keeps, later ones from the plans already
measured, memory being linear in the batch). A step that still runs out of
memory ends its process, and a fresh one continues one size down.

Every measurement gets a share of the time left (`time_cap`); one that would
not fit in what is left is skipped, and the table is printed either way.

MFU (model FLOP utilisation) = 3 x F x batch / step time / 790 TFLOP/s, where
F is the model's forward FLOPs per example as the project counts them
(experiments/tools/flops.py: a multiply and an add are two FLOPs, every
application of the shared weights counts, elementwise ops one per element;
710.5 GFLOPs), 3 x F stands for forward + backward, and 790 TFLOP/s is the
dense bf16 matmul rate measured on this H200. The fp32 rows use the same
peak.

Output: a markdown table on stdout and, if $OUT is set, $OUT/gpu_results.md
and $OUT/gpu_results.json (rewritten after every measurement).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEEL_LIST = os.path.join(ROOT, 'benchmarks', 'gpu_wheels.txt')
WHEEL_DIR = os.path.join(ROOT, '.whl')
FETCH_COMMAND = 'bash benchmarks/gpu_wheels.sh'

PEAK_FLOPS = 790e12  # Dense bf16 matmul rate measured on the H200.
PARAMS_EXPECTED = 44_912_254  # configs/imagenet.py (README).
CANDIDATES = (1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1)
FIT_FRACTION = 0.97  # Of the device's memory limit, for XLA's plan.
BUDGET_S = 465.0  # Without --deadline: from the start of this process.
FINAL_RESERVE_S = 8.0  # Kept for the table at the end.
GRACE_S = 10.0  # A worker past its deadline is killed after this.
# Time shares: a measurement's weight, and the least time worth starting it
# with (a JAX one needs a compile; learned from the first one that compiles).
WEIGHTS = {'jax': 1.0, 'hf': 0.6}
MIN_SLOT_S = {'jax': 60.0, 'hf': 30.0}
AFTER_COMPILE_S = 30.0  # State, warm-up and timing after the last compile.
SLACK = 1.5  # How far past its share a measurement may run...
FIRST_SLACK = 2.5  # ...and the first JAX one, before compile times are known.
MARK = '@@gpu-bench '  # Prefix of the workers' JSON lines on stdout.
OOM_EXIT = 3  # A worker's exit status when its step ran out of memory.
GIB = 2.0 ** 30

CONVENTION = (
    'MFU = 3 x F x batch / step time / {peak:.0f} TFLOP/s. F = forward '
    'FLOPs per example counted by experiments/tools/flops.py on the model '
    '(configs/imagenet.py with cpu_kernels=False): multiply and add counted '
    'separately, every application of the shared weights counted, elementwise '
    'ops once per element: {flops:.1f} GFLOPs; 3 x F = forward + backward; '
    'optimizer, MixUp/CutMix and position features not counted. The peak is '
    'the dense bf16 matmul rate measured on the H200; fp32 rows use the same '
    'peak. XLA computes the identical keys and values of the shared '
    'cross-attends 2..8 once, so the JAX step does less arithmetic than F '
    'counts (XLA TFLOP/s: its own count of the compiled step).')


@dataclasses.dataclass(frozen=True)
class Measurement:
  """One row of the table: an implementation, a precision, a kernel switch."""
  impl: str  # 'jax' (this project) or 'hf' (transformers, PyTorch).
  precision: str  # 'bf16' or 'fp32'.
  cpu_kernels: Optional[bool] = None  # config.model.cpu_kernels (jax only).

  @property
  def name(self) -> str:
    if self.impl == 'jax':
      return (f'jax {self.precision} cpu_kernels='
              f'{"on" if self.cpu_kernels else "off"}')
    return f'hf {self.precision}'


MEASUREMENTS = (
    Measurement('jax', 'bf16', False),
    Measurement('jax', 'bf16', True),
    Measurement('hf', 'bf16'),
    Measurement('jax', 'fp32', False),
    Measurement('jax', 'fp32', True),
    Measurement('hf', 'fp32'),
)


# ----------------------------------------------------------------------------
# Arithmetic.


def model_flops_per_step(flops_per_example: float, batch: int) -> float:
  """Forward + backward FLOPs of one step: 3 x forward x batch."""
  return 3.0 * flops_per_example * batch


def mfu(flops_per_example: float, batch: int, step_time_s: float,
        peak_flops: float = PEAK_FLOPS) -> float:
  """Model FLOP utilisation of a step against `peak_flops`."""
  return model_flops_per_step(flops_per_example, batch) / step_time_s / (
      peak_flops)


def next_batch(candidates: Sequence[int],
               plans: Mapping[int, Optional[float]], budget_bytes: float, *,
               prior_bytes_per_example: Optional[float] = None,
               fixed_bytes: float = 0.0) -> Optional[int]:
  """The next batch to compile in the search for the largest that fits.

  Args:
    candidates: batch sizes to choose from (powers of two, any order).
    plans: what is known: batch -> bytes of XLA's memory plan for its step,
      or None for a batch that does not fit (its compile or run ran out of
      memory).
    budget_bytes: the most a plan may take.
    prior_bytes_per_example: an estimate of the memory per example, used
      until a plan is known.
    fixed_bytes: memory that does not grow with the batch (parameters,
      optimizer state).

  Returns:
    The largest candidate between the largest batch known to fit and the
    smallest known not to that is predicted to fit (memory linear in the
    batch: through the two largest known plans, or one plan and
    fixed_bytes, or the prior); with no prediction at all the largest
    candidate. If none is predicted to fit: None when a batch is known to fit
    (the search is over), else the smallest open candidate (a last try).
    None when no candidate is left between the two.
  """
  fit = [b for b, p in plans.items() if p is not None and p <= budget_bytes]
  miss = [b for b, p in plans.items() if p is None or p > budget_bytes]
  lo, hi = max(fit, default=0), min(miss, default=math.inf)
  open_ = sorted((c for c in candidates
                  if lo < c < hi and c not in plans), reverse=True)
  if not open_:
    return None
  points = sorted((b, p) for b, p in plans.items() if p is not None)[-2:]
  if len(points) == 2 and points[1][1] > points[0][1]:
    (b1, p1), (b2, p2) = points
    slope = (p2 - p1) / (b2 - b1)
    intercept = p1 - slope * b1
  elif points:
    b, p = points[-1]
    intercept = min(fixed_bytes, p)
    slope = (p - intercept) / b
  elif prior_bytes_per_example is not None:
    slope, intercept = prior_bytes_per_example, fixed_bytes
  else:
    return open_[0]
  fitting = [c for c in open_ if intercept + slope * c <= budget_bytes]
  if fitting:
    return fitting[0]
  return None if fit else open_[-1]


def chosen_batch(plans: Mapping[int, Optional[float]],
                 budget_bytes: float) -> Optional[int]:
  """The largest batch whose plan fits, None if none does."""
  return max((b for b, p in plans.items()
              if p is not None and p <= budget_bytes), default=None)


def time_cap(remaining_s: float, pending: Sequence[Measurement], *,
             min_slot_s: Mapping[str, float] = MIN_SLOT_S,
             slack: float = SLACK) -> Optional[float]:
  """Seconds the first of `pending` may take, None to skip it.

  The pending measurements are in priority order: when the time left cannot
  give each its minimum slot, the last ones are dropped from the sharing (the
  first is skipped only when not even its own minimum is left). Among the
  rest, the first gets its weighted share of the time left times `slack`,
  but never so much that the others' minimum slots no longer fit.
  """
  active, total = [], 0.0
  for m in pending:
    if total + min_slot_s[m.impl] > remaining_s:
      break
    active.append(m)
    total += min_slot_s[m.impl]
  if not active:
    return None
  first = active[0]
  reserve = sum(min_slot_s[m.impl] for m in active[1:])
  share = remaining_s * WEIGHTS[first.impl] / sum(WEIGHTS[m.impl]
                                                  for m in active)
  return min(remaining_s - reserve,
             max(share * slack, min_slot_s[first.impl]))


def timing_plan(step_s: float, remaining_s: float, *, rounds: int = 3,
                round_s: float = 2.0, max_iterations: int = 10
                ) -> tuple[int, int]:
  """(rounds, iterations per round) for steps of `step_s` seconds: rounds of
  about `round_s`, as many of the wanted `rounds` as `remaining_s` allows,
  at least one round of one step."""
  step_s = max(step_s, 1e-6)
  iterations = max(1, min(max_iterations, int(round_s / step_s)))
  fit_rounds = int(remaining_s / (iterations * step_s))
  if fit_rounds >= 1:
    return min(rounds, fit_rounds), iterations
  return 1, max(1, min(iterations, int(remaining_s / step_s)))


def is_out_of_memory(error: BaseException) -> bool:
  """Whether an exception from XLA or PyTorch reports exhausted memory."""
  text = f'{type(error).__name__}: {error}'.lower()
  return ('resource_exhausted' in text or 'out of memory' in text
          or 'outofmemory' in text)


# ----------------------------------------------------------------------------
# Wheels.


@dataclasses.dataclass(frozen=True)
class Wheel:
  requirement: str  # 'dm-haiku==0.0.17'
  module: str  # 'haiku'
  policy: str  # 'always' or 'if-missing'

  @property
  def name(self) -> str:
    return self.requirement.split('==')[0]

  @property
  def version(self) -> str:
    return self.requirement.split('==')[1]


def read_wheel_list(path: str = WHEEL_LIST) -> list[Wheel]:
  wheels = []
  with open(path) as f:
    for line in f:
      line = line.split('#')[0].strip()
      if line:
        requirement, module, policy = line.split()
        if policy not in ('always', 'if-missing') or '==' not in requirement:
          raise ValueError(f'{path}: bad line {line!r}.')
        wheels.append(Wheel(requirement, module, policy))
  return wheels


def _normalise(name: str) -> str:
  return re.sub(r'[-_.]+', '_', name).lower()


def find_wheel(wheel: Wheel, folder: str) -> Optional[str]:
  """The .whl file of `wheel` (name and version) in `folder`, if any."""
  if not os.path.isdir(folder):
    return None
  for filename in sorted(os.listdir(folder)):
    parts = filename[:-len('.whl')].split('-') if filename.endswith(
        '.whl') else []
    if (len(parts) >= 5 and _normalise(parts[0]) == _normalise(wheel.name)
        and parts[1] == wheel.version):
      return os.path.join(folder, filename)
  return None


def wheels_to_install(wheels: Iterable[Wheel], folder: str,
                      importable: Callable[[str], bool]
                      ) -> tuple[list[str], list[Wheel]]:
  """(wheel files to install, wheels that are needed but not in folder)."""
  paths, missing = [], []
  for wheel in wheels:
    if wheel.policy == 'if-missing' and importable(wheel.module):
      continue
    path = find_wheel(wheel, folder)
    if path is None:
      missing.append(wheel)
    else:
      paths.append(path)
  return paths, missing


def _importable(module: str) -> bool:
  return importlib.util.find_spec(module) is not None


# ----------------------------------------------------------------------------
# Workers.


def emit(event: Mapping[str, Any]) -> None:
  """Prints one event of a worker for the parent (one JSON line)."""
  print(MARK + json.dumps(event), flush=True)


def parse_events(text: str) -> list[dict[str, Any]]:
  return [json.loads(line[len(MARK):]) for line in text.splitlines()
          if line.startswith(MARK)]


@dataclasses.dataclass
class WorkerOutcome:
  returncode: Optional[int]  # None: killed at its time limit.
  events: list[dict[str, Any]]
  seconds: float


def run_worker(command: Sequence[str], timeout_s: float,
               env: Optional[Mapping[str, str]] = None) -> WorkerOutcome:
  """Runs a worker; its stderr goes to ours, its stdout is parsed for
  events. Past `timeout_s` its whole process group is killed."""
  start = time.monotonic()
  proc = subprocess.Popen(list(command), cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, text=True,
                          start_new_session=True)
  try:
    out, _ = proc.communicate(timeout=max(timeout_s, 1.0))
    code = proc.returncode
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    code = None
  return WorkerOutcome(code, parse_events(out or ''), time.monotonic() - start)


def _last(events: Sequence[Mapping[str, Any]], kind: str):
  found = [e for e in events if e.get('event') == kind]
  return found[-1] if found else None


def measure_jax(m: Measurement, *, deadline: float, clock=time.time,
                run: Callable[..., WorkerOutcome] = run_worker,
                worker_args: Sequence[str] = (),
                env: Optional[Mapping[str, str]] = None) -> dict[str, Any]:
  """One JAX row: workers until one reports a result, runs out of time or
  fails; a step that ran out of memory is retried in a fresh worker that
  knows every plan so far (so it continues one size down)."""
  plans: dict[str, Optional[float]] = {}
  attempts: list[dict[str, Any]] = []
  while True:
    left = deadline - clock()
    if left < 5:
      return {'status': 'timed out', 'attempts': attempts,
              'note': 'no time left for another attempt'}
    command = [sys.executable, '-m', 'benchmarks.gpu_worker',
               f'--precision={m.precision}',
               f'--cpu_kernels={str(m.cpu_kernels).lower()}',
               f'--deadline={deadline:.1f}',
               f'--known_plans={json.dumps(plans)}', *worker_args]
    outcome = run(command, left + GRACE_S, env)
    attempts += [e for e in outcome.events if e.get('event') == 'compiled']
    result = _last(outcome.events, 'result')
    if result is not None:
      matmul = _last(outcome.events, 'matmul')
      return dict(result, attempts=attempts,
                  **({'matmul': matmul} if matmul else {}))
    oom = _last(outcome.events, 'oom')
    if outcome.returncode == OOM_EXIT and oom is not None:
      plans = dict(oom['plans'], **{str(oom['batch']): None})
      continue
    if outcome.returncode is None:
      return {'status': 'timed out', 'attempts': attempts,
              'note': f'killed after {outcome.seconds:.0f} s'}
    return {'status': 'failed', 'attempts': attempts,
            'note': f'worker exit status {outcome.returncode}'}


def measure_hf(m: Measurement, batch: int, *, deadline: float,
               clock=time.time, run: Callable[..., WorkerOutcome] = run_worker,
               torch_python: str = sys.executable,
               worker_args: Sequence[str] = (),
               env: Optional[Mapping[str, str]] = None) -> dict[str, Any]:
  """One HF row (benchmarks/hf_perceiver_gpu.py halves its batch itself on
  running out of memory)."""
  command = [torch_python, os.path.join(ROOT, 'benchmarks',
                                        'hf_perceiver_gpu.py'),
             f'--precision={m.precision}', f'--batch_size={batch}',
             f'--deadline={deadline:.1f}', *worker_args]
  outcome = run(command, deadline - clock() + GRACE_S, env)
  result = _last(outcome.events, 'result')
  if result is not None:
    return result
  if outcome.returncode is None:
    return {'status': 'timed out',
            'note': f'killed after {outcome.seconds:.0f} s'}
  return {'status': 'failed',
          'note': f'worker exit status {outcome.returncode}'}


# ----------------------------------------------------------------------------
# The table.


def _fmt(value, spec: str, empty: str = '-') -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return empty
  return format(value, spec)


def complete_row(m: Measurement, row: Mapping[str, Any],
                 flops_per_example: Optional[float],
                 peak_flops: float = PEAK_FLOPS) -> dict[str, Any]:
  """The row with the name, images/s, model TFLOP/s and MFU filled in."""
  row = dict(row, name=m.name, impl=m.impl, precision=m.precision,
             cpu_kernels=m.cpu_kernels)
  row.setdefault('status', 'ok')
  t, b = row.get('step_time_s'), row.get('batch')
  if row['status'] == 'ok' and t and b:
    row['images_per_s'] = b / t
    if flops_per_example:
      row['model_flops_per_s'] = model_flops_per_step(flops_per_example,
                                                      b) / t
      row['mfu'] = mfu(flops_per_example, b, t, peak_flops)
  return row


def format_table(rows: Sequence[Mapping[str, Any]],
                 meta: Mapping[str, Any]) -> str:
  """Markdown: a header of facts, the table, the MFU convention, notes."""
  lines = [f'# ImageNet Perceiver train step on {meta.get("device", "?")}',
           '']
  for key in ('versions', 'model', 'date'):
    if meta.get(key):
      lines.append(f'- {key}: {meta[key]}')
  lines += ['', '| measurement | batch | step (ms, median) | best (ms) | '
            'images/s | model TFLOP/s | MFU | XLA TFLOP/s | compile (s) | '
            'memory (GiB) | status |',
            '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|']
  for r in rows:
    t, best = r.get('step_time_s'), r.get('step_time_best_s')
    model_tf = r.get('model_flops_per_s')
    xla_tf = r.get('xla_flops_per_s')
    lines.append(' | '.join([
        f'| {r["name"]}', _fmt(r.get('batch'), 'd'),
        _fmt(t and t * 1e3, '.1f'), _fmt(best and best * 1e3, '.1f'),
        _fmt(r.get('images_per_s'), '.1f'),
        _fmt(model_tf and model_tf / 1e12, '.1f'),
        _fmt(r.get('mfu') and 100 * r['mfu'], '.1f') + (
            '%' if r.get('mfu') else ''),
        _fmt(xla_tf and xla_tf / 1e12, '.1f'),
        _fmt(r.get('compile_s'), '.1f'),
        _fmt(r.get('memory_bytes') and r['memory_bytes'] / GIB, '.1f'),
        r.get('status', '?') + ' |']))
  lines += ['', meta.get('convention', ''), '']
  notes = [f'- {r["name"]}: {r["note"]}' for r in rows if r.get('note')]
  for key in ('hf_differences', 'memory', 'matmul'):
    if meta.get(key):
      notes.append(f'- {meta[key]}')
  return '\n'.join(lines + notes) + '\n'


def write_outputs(rows, meta, out_dir: Optional[str]) -> str:
  table = format_table(rows, meta)
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'gpu_results.md'), 'w') as f:
      f.write(table)
    with open(os.path.join(out_dir, 'gpu_results.json'), 'w') as f:
      json.dump({'meta': meta, 'rows': list(rows)}, f, indent=1)
  return table


HF_DIFFERENCES = (
    'hf rows: transformers\' PerceiverLayer modules (PerceiverModel\'s '
    'latents, cross-attend and 6-layer self-attend block, plus one more '
    'PerceiverLayer for the shared cross-attends 2..8) arranged as the '
    'paper: 8 cross-attends interleaved with 8 applications of the block, '
    'the same 44,912,254 parameters and shapes (Q/K/V width 261, 1 cross '
    'head, 8 self heads, MLP widening 1). Stock PerceiverModel has a single '
    'cross-attend before the blocks (--arrangement=stock: 42,135,859 '
    'parameters). Otherwise: the byte array [B, 50176, 261] is materialised '
    'and each cross-attend recomputes its keys and values; the Fourier '
    'features are HF\'s generate_fourier_features, computed once on the '
    'GPU (HF\'s own preprocessor rebuilds them on the host every step: '
    '--features=hf); GELU tanh approximation as the project; no MixUp/CutMix; '
    'AdamW (fused) instead of LAMB, both with grad-norm clipping 10 and label '
    'smoothing 0.1; bf16 = torch.autocast (fp32 parameters, softmax and '
    'LayerNorm in fp32), fp32 = TF32 matmuls like XLA\'s default; eager '
    'mode (no torch.compile).')


MEMORY_NOTE = (
    'memory: jax rows, XLA\'s plan of the compiled step (arguments + outputs '
    '- donated buffers + temporaries; the batch searched against '
    f'{FIT_FRACTION:.0%} of the allocator\'s limit, '
    'XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 of the GPU); hf rows, '
    'torch.cuda.max_memory_allocated. batch: the largest power of two up to '
    f'{CANDIDATES[0]} that fits (hf: the jax row\'s, halved until it fits).')


# ----------------------------------------------------------------------------
# The plan (shapes only, on the CPU).


def compute_plan(*, priors: bool, stock: bool = False,
                 config_arg: Optional[str] = None) -> dict[str, Any]:
  """Parameters and FLOPs of the model, and (priors) each JAX
  measurement's shapes-only memory estimate. Runs JAX on the CPU."""
  os.environ['JAX_PLATFORMS'] = 'cpu'
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_platforms', 'cpu')
  from experiments.tools import model_summary  # pylint: disable=g-import-not-at-top
  from benchmarks import gpu_worker  # pylint: disable=g-import-not-at-top
  config = gpu_worker.make_config('fp32', cpu_kernels=False,
                                  config_arg=config_arg)
  summary = model_summary.summarize(config)
  plan = {'params': summary['params'], 'flops_per_example': summary['flops'],
          'config': gpu_worker.describe(config)}
  if stock:
    config.model.num_cross_attends = 1
    config.model.cross_attend_arrangement = 'start'
    plan['stock_flops_per_example'] = model_summary.summarize(config)['flops']
  if priors:
    plan['residual_bytes_per_example'] = {
        m.name: gpu_worker.residual_bytes_per_example(
            gpu_worker.make_config(m.precision, m.cpu_kernels))
        for m in MEASUREMENTS if m.impl == 'jax'}
  return plan


def _child_env(jax_platforms: Optional[str]) -> dict[str, str]:
  env = dict(os.environ)
  env.pop('JAX_PLATFORMS', None)
  if jax_platforms:
    env['JAX_PLATFORMS'] = jax_platforms
  return env


def _torch_available(python: str) -> bool:
  try:
    return subprocess.run([python, '-c', 'import torch, transformers'],
                          capture_output=True, check=False).returncode == 0
  except OSError:  # No such interpreter.
    return False


# ----------------------------------------------------------------------------
# Dry run.


def dry_run(args) -> int:
  """Checks and the plan, on the CPU; nothing needs a GPU."""
  start = time.monotonic()
  ok = True
  print('== wheels (benchmarks/gpu_wheels.txt) in', args.wheel_dir)
  wheels = read_wheel_list()
  for wheel in wheels:
    path = find_wheel(wheel, args.wheel_dir)
    print(f'  {wheel.requirement:24s} {wheel.policy:10s} '
          f'{os.path.basename(path) if path else "MISSING"}')
  missing = [w.requirement for w in wheels
             if find_wheel(w, args.wheel_dir) is None]
  if missing:
    print(f'  missing: {", ".join(missing)}; fetch them with: '
          f'{FETCH_COMMAND}')
    ok = not args.require_wheels

  print('== imports (the train step\'s path)')
  os.environ['JAX_PLATFORMS'] = 'cpu'
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_platforms', 'cpu')
  from benchmarks import gpu_worker  # pylint: disable=g-import-not-at-top
  versions = gpu_worker.versions()
  print('  ' + versions)
  heavy = sorted(m for m in ('tensorflow', 'tensorflow_datasets', 'torch')
                 if m in sys.modules)
  print(f'  modules that must not be imported on this path: '
        f'{", ".join(heavy) if heavy else "none imported"}')
  ok = ok and not heavy

  print('== measurements, in order (MFU peak '
        f'{args.peak_tflops:.0f} TFLOP/s)')
  for i, m in enumerate(MEASUREMENTS, 1):
    config = gpu_worker.make_config(m.precision, m.cpu_kernels or False)
    extra = (f'mixed_precision={config.mixed_precision}, '
             f'cpu_kernels={m.cpu_kernels}' if m.impl == 'jax' else
             'benchmarks/hf_perceiver_gpu.py, batch of the jax row')
    print(f'  {i}. {m.name:26s} ({extra})')
  print(f'  batch: the largest of {CANDIDATES} whose XLA plan fits '
        f'{FIT_FRACTION:.0%} of the device memory limit')

  if args.trace:
    print('== plan (shapes only: jax.eval_shape and experiments/tools/flops.py)')
    plan = compute_plan(priors=True)
    print(f'  model: {plan["config"]}')
    flag = '' if plan['params'] == PARAMS_EXPECTED else (
        f'  (expected {PARAMS_EXPECTED:,})')
    print(f'  parameters {plan["params"]:,}{flag}')
    ok = ok and not flag
    f = plan['flops_per_example']
    print(f'  forward FLOPs / example {f:,} ({f / 1e9:.1f} G); '
          f'model FLOPs / step = 3 x {f / 1e9:.1f} G x batch')
    print(f'  MFU at batch 64 and 1 s / step: '
          f'{100 * mfu(f, 64, 1.0, args.peak_tflops * 1e12):.1f}%')
    budget = args.assumed_limit_gib * GIB * FIT_FRACTION
    for name, per_example in plan['residual_bytes_per_example'].items():
      first = next_batch(CANDIDATES, {}, budget,
                         prior_bytes_per_example=per_example)
      print(f'  {name:26s} backward keeps {per_example / GIB:.2f} GiB / '
            f'example (jax.vjp residuals); first batch tried on a '
            f'{args.assumed_limit_gib:.0f} GiB limit: {first}')

  if args.smoke:
    print('== smoke: the JAX worker on the CPU (configs/imagenet.py:runlocal)')
    outcome = run_worker(
        [sys.executable, '-m', 'benchmarks.gpu_worker', '--precision=bf16',
         '--cpu_kernels=false', '--config_arg=runlocal',
         '--candidates=16,8', '--rounds=1', '--round_s=0.2',
         '--matmul_n=256', f'--deadline={time.time() + 120:.1f}'],
        120.0, _child_env('cpu'))
    result = _last(outcome.events, 'result')
    good = (outcome.returncode == 0 and result is not None
            and result.get('status') == 'ok')
    print(f'  exit {outcome.returncode}, ' + (
        f'batch {result["batch"]}, step {result["step_time_s"] * 1e3:.1f} ms, '
        f'compile {result["compile_s"]:.1f} s' if good else 'FAILED'))
    ok = ok and good

  print('== PyTorch peer (benchmarks/hf_perceiver_gpu.py)')
  if _torch_available(args.torch_python):
    outcome = run_worker([args.torch_python,
                          os.path.join(ROOT, 'benchmarks',
                                       'hf_perceiver_gpu.py'), '--dry-run'],
                         120.0)
    plan_event = _last(outcome.events, 'plan')
    good = outcome.returncode == 0 and plan_event is not None
    if good:
      print(f'  {plan_event["versions"]}: {plan_event["params"]:,} '
            f'parameters, torch matmul FLOPs / example '
            f'{_fmt(plan_event.get("matmul_flops_per_example"), ",")}')
      good = plan_event['params'] == PARAMS_EXPECTED
    print('  ' + ('ok' if good else f'FAILED (exit {outcome.returncode})'))
    ok = ok and good
  else:
    print(f'  torch / transformers not importable by {args.torch_python}: '
          'skipping the PyTorch part (--torch_python=PATH to check it)')

  print(f'== time plan: of {BUDGET_S - FINAL_RESERVE_S:.0f} s, each its '
        f'share of the time left (the first JAX one {FIRST_SLACK}x, later '
        f'ones {SLACK}x); worst case: every one uses all of its time')
  remaining = BUDGET_S - FINAL_RESERVE_S
  for i, m in enumerate(MEASUREMENTS):
    cap = time_cap(remaining, MEASUREMENTS[i:],
                   slack=FIRST_SLACK if i == 0 else SLACK)
    print(f'  {m.name:26s} at most {_fmt(cap, ".0f", "skipped")} s of '
          f'{remaining:.0f} s left')
    remaining -= cap or 0.0
  print(f'== dry run {"ok" if ok else "FAILED"} in '
        f'{time.monotonic() - start:.1f} s')
  return 0 if ok else 1


# ----------------------------------------------------------------------------
# The run.


def selected_measurements(args) -> list[Measurement]:
  """MEASUREMENTS filtered by --impls, --precisions and --kernels."""
  kernels = {'on': True, 'off': False}
  return [m for m in MEASUREMENTS
          if m.impl in args.impls and m.precision in args.precisions
          and (m.impl != 'jax' or m.cpu_kernels in
               [kernels[k] for k in args.kernels])]


def _plan_or_none(future) -> dict[str, Any]:
  """The plan computed in the background; without FLOPs if it failed."""
  try:
    return future.result()
  except Exception as e:  # pylint: disable=broad-except
    print(f'[gpu.py] no FLOP count: {type(e).__name__}: {e}',
          file=sys.stderr, flush=True)
    return {'flops_per_example': None, 'stock_flops_per_example': None}


def run(args) -> int:
  """The measurements in order, each in its share of the time left; the
  table after each one (to $OUT) and at the end (to stdout)."""
  deadline = (args.deadline or time.time() + BUDGET_S) - FINAL_RESERVE_S
  out_dir = os.environ.get('OUT')
  env = _child_env(os.environ.get('JAX_PLATFORMS'))  # Before the plan's.
  # Parameters and FLOPs, traced on this process's CPU while the first
  # worker compiles on the GPU.
  planner = concurrent.futures.ThreadPoolExecutor(max_workers=1)
  future = planner.submit(compute_plan, priors=False,
                          stock=args.arrangement == 'stock',
                          config_arg=args.config_arg)
  plan = None
  meta: dict[str, Any] = {'date': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
                          'hf_differences': HF_DIFFERENCES,
                          'memory': MEMORY_NOTE}
  rows: list[dict[str, Any]] = []
  batches: dict[str, int] = {}  # precision -> batch of its first jax row
  calibration = None  # XLA's plan / the shapes-only estimate, per example.
  min_slot = dict(MIN_SLOT_S)
  compiled_once = False
  selected = selected_measurements(args)
  for i, m in enumerate(selected):
    now = time.time()
    cap = time_cap(deadline - now, selected[i:], min_slot_s=min_slot,
                   slack=SLACK if compiled_once else FIRST_SLACK)
    if cap is None:
      row = {'status': 'skipped',
             'note': f'not enough time left ({deadline - now:.0f} s)'}
    elif m.impl == 'jax':
      print(f'[gpu.py] {m.name}: up to {cap:.0f} s', file=sys.stderr,
            flush=True)
      worker_args = [f'--peak_tflops={args.peak_tflops}']
      if calibration:
        worker_args.append(f'--calibration={calibration:.4f}')
      if not compiled_once and args.matmul_n:
        worker_args.append(f'--matmul_n={args.matmul_n}')
      if args.config_arg:
        worker_args.append(f'--config_arg={args.config_arg}')
      if args.max_batch:
        worker_args.append('--candidates=' + ','.join(
            str(b) for b in CANDIDATES if b <= args.max_batch))
      row = measure_jax(m, deadline=now + cap, worker_args=worker_args,
                        env=env)
    else:
      batch = batches.get(m.precision) or next(iter(batches.values()),
                                               CANDIDATES[0])
      print(f'[gpu.py] {m.name}: batch {batch}, up to {cap:.0f} s',
            file=sys.stderr, flush=True)
      row = measure_hf(m, batch, deadline=now + cap,
                       torch_python=args.torch_python,
                       worker_args=[f'--arrangement={args.arrangement}',
                                    f'--features={args.features}',
                                    *args.hf_args.split()])
    if plan is None:
      plan = _plan_or_none(future)
      if plan.get('flops_per_example'):
        meta['model'] = (f'{plan["config"]}; {plan["params"]:,} parameters;'
                         f' F = {plan["flops_per_example"] / 1e9:.1f} GFLOPs')
        meta['convention'] = CONVENTION.format(
            peak=args.peak_tflops, flops=plan['flops_per_example'] / 1e9)
    for key in ('device', 'versions'):
      if row.get(key) and not meta.get(key):
        meta[key] = row[key]
    matmul = row.pop('matmul', None)
    if matmul:
      rate = matmul['flops_per_s']
      meta['matmul'] = (f'bf16 matmul {matmul["n"]}^3 on this GPU (jax): '
                        f'{rate / 1e12:.0f} TFLOP/s, '
                        f'{rate / (args.peak_tflops * 1e12):.0%} of the peak '
                        'used for MFU')
    compile_times = [a['compile_s'] for a in row.get('attempts', ())
                     if a.get('plan_bytes') is not None]
    if compile_times:
      compiled_once = True
      min_slot['jax'] = max(MIN_SLOT_S['jax'],
                            max(compile_times) + AFTER_COMPILE_S)
    elif m.impl == 'jax' and row.get('status') == 'timed out':
      # Not one compile finished in its time: later ones need more.
      min_slot['jax'] = max(min_slot['jax'], cap + AFTER_COMPILE_S)
    if m.impl == 'jax' and row.get('status') == 'ok':
      batches.setdefault(m.precision, row['batch'])
      if (calibration is None and row.get('plan_bytes_per_example')
          and row.get('residual_bytes_per_example')):
        calibration = (row['plan_bytes_per_example']
                       / row['residual_bytes_per_example'])
    flops = plan.get('stock_flops_per_example' if m.impl == 'hf' and
                     args.arrangement == 'stock' else 'flops_per_example')
    rows.append(complete_row(m, row, flops, args.peak_tflops * 1e12))
    r = rows[-1]
    print(f'[gpu.py] {m.name}: {r["status"]}'
          + (f', batch {r["batch"]}, {r["step_time_s"] * 1e3:.1f} ms/step, '
             f'{r["images_per_s"]:.1f} images/s' if r.get('images_per_s')
             else '')
          + (f', MFU {100 * r["mfu"]:.1f}%' if r.get('mfu') else '')
          + (f' ({r["note"]})' if r.get('note') else ''),
          file=sys.stderr, flush=True)
    write_outputs(rows, meta, out_dir)
  planner.shutdown(wait=False)
  print(write_outputs(rows, meta, out_dir), flush=True)
  return 0 if any(r['status'] == 'ok' for r in rows) else 1


def parse_args(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--dry-run', '--dry_run', dest='dry_run',
                      action='store_true',
                      help='checks and the plan on the CPU; no GPU needed')
  parser.add_argument('--deadline', type=float, default=None,
                      help='unix time by which the table must be printed '
                           f'(default: {BUDGET_S:.0f} s from now)')
  parser.add_argument('--peak_tflops', type=float, default=PEAK_FLOPS / 1e12)
  parser.add_argument('--impls', default='jax,hf',
                      type=lambda s: s.split(','))
  parser.add_argument('--precisions', default='bf16,fp32',
                      type=lambda s: s.split(','))
  parser.add_argument('--kernels', default='off,on',
                      type=lambda s: s.split(','),
                      help='jax rows: cpu_kernels off, on')
  parser.add_argument('--max_batch', type=int, default=None,
                      help=f'jax rows: the largest batch tried '
                           f'(default {CANDIDATES[0]})')
  parser.add_argument('--config_arg', default=None,
                      help='jax rows: configs/imagenet.py argument (runlocal: '
                           'a small model, to check this script on a CPU)')
  parser.add_argument('--hf_args', default='',
                      help='more arguments of the hf rows (--tiny '
                           '--device=cpu: to check this script on a CPU)')
  parser.add_argument('--torch_python', default=sys.executable,
                      help='the Python that runs the PyTorch peer')
  parser.add_argument('--arrangement', default='paper',
                      choices=('paper', 'stock'),
                      help='hf: the paper\'s 8 cross-attends, or stock '
                           'PerceiverModel\'s one')
  parser.add_argument('--features', default='device',
                      choices=('device', 'hf'),
                      help='hf: Fourier features cached on the GPU, or HF\'s '
                           'preprocessor every step')
  parser.add_argument('--matmul_n', type=int, default=8192,
                      help='bf16 N^3 matmul timed after the first JAX row '
                           '(0: none)')
  parser.add_argument('--wheels-to-install', '--wheels_to_install',
                      dest='wheels_to_install', action='store_true',
                      help='print the wheel files gpu.sh installs, exit 2 '
                           'if one is missing')
  parser.add_argument('--wheel_dir', default=WHEEL_DIR)
  parser.add_argument('--require_wheels', action='store_true',
                      help='dry run: missing wheels are a failure')
  parser.add_argument('--no-trace', '--no_trace', dest='trace',
                      action='store_false',
                      help='dry run: skip the shapes-only plan')
  parser.add_argument('--smoke', action='store_true',
                      help='dry run: also run the JAX worker on the CPU on '
                           'the runlocal config (compiles: minutes on a '
                           'busy 2-core machine)')
  parser.add_argument('--assumed_limit_gib', type=float, default=132.0,
                      help='dry run: the device memory limit to plan for')
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.wheels_to_install:
    paths, missing = wheels_to_install(read_wheel_list(), args.wheel_dir,
                                       _importable)
    if missing:
      print(f'missing wheels in {args.wheel_dir}: '
            f'{", ".join(w.requirement for w in missing)}; fetch them with '
            f'{FETCH_COMMAND} (where a package index is reachable)',
            file=sys.stderr)
      return 2
    print('\n'.join(paths))
    return 0
  if args.dry_run:
    return dry_run(args)
  return run(args)


if __name__ == '__main__':
  sys.exit(main())

r"""One JAX measurement of benchmarks/gpu.py, in a process of its own.

  python -m benchmarks.gpu_worker --precision=bf16 --cpu_kernels=false
  python -m benchmarks.gpu_worker --precision=bf16 --cpu_kernels=true \
      --config_arg=runlocal --candidates=16,8     # a CPU check of the script

Builds configs/imagenet.py (paper size; `--config_arg=runlocal` gives its
laptop variant) with config.mixed_precision ('bf16' or None) and
config.model.cpu_kernels set, and the runner's own jitted train step
(experiments/steps.py) with the config's LAMB optimizer, then

  1. searches the batch (benchmarks/gpu.py `next_batch`): the step is
     compiled for abstract inputs of a batch and XLA's memory plan of the
     compiled step (arguments + outputs - donated buffers + temporaries) is
     compared with FIT_FRACTION of the device's memory limit; nothing is
     allocated on the device until a batch fits;
  2. creates the train state and a random batch of that size on the device,
     runs two warm-up steps and times rounds of back-to-back steps (as the
     runner dispatches them; the median round is reported);
  3. with --matmul_n, times an N x N x N bfloat16 matmul.

Reports on stdout as JSON lines (benchmarks/gpu.py `emit`): a `compiled`
event per compile, then `result` (and `matmul`), or `oom` with exit status 3
when the chosen batch ran out of memory at run time (the parent then starts
a fresh worker that knows the plans so far). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import platform
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks import gpu as bench
from configs import imagenet
from experiments import modeling
from experiments import optimizers
from experiments import parallel
from experiments import steps as steps_lib

PACKAGES = ('jax', 'jaxlib', 'dm-haiku', 'optax', 'chex', 'ml-collections',
            'jmp')


def make_config(precision: str, cpu_kernels: bool,
                config_arg: Optional[str] = None
                ) -> ml_collections.ConfigDict:
  """configs/imagenet.py with the measurement's two switches."""
  if precision not in ('bf16', 'fp32'):
    raise ValueError(f'precision must be bf16 or fp32, got {precision!r}.')
  config = imagenet.get_config(config_arg)
  config.mixed_precision = 'bf16' if precision == 'bf16' else None
  config.model.cpu_kernels = cpu_kernels
  return config


def describe(config: ml_collections.ConfigDict) -> str:
  """The model's shape in one line."""
  m = config.model
  h, w, c = config.input_shape
  crosses = m.num_cross_attends or m.num_blocks
  sharing = ', weights of 2..X shared' if m.share_weights else ''
  return (f'{h}x{w}x{c} images, {config.input.num_bands} Fourier bands, '
          f'{m.num_latents} x {m.latent_channels} latents, {m.num_blocks} '
          f'blocks of {m.num_self_attends_per_block} self-attends '
          f'({m.num_self_heads} heads, one set of weights), {crosses} '
          f'cross-attends ({m.cross_attend_arrangement}{sharing})')


def versions() -> str:
  found = []
  for name in PACKAGES:
    try:
      found.append(f'{name} {importlib.metadata.version(name)}')
    except importlib.metadata.PackageNotFoundError:
      found.append(f'{name} missing')
  return f'Python {platform.python_version()}, ' + ', '.join(found)


def tree_bytes(tree) -> int:
  """Bytes of the arrays (or shapes) of a pytree."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    try:
      itemsize = np.dtype(leaf.dtype).itemsize
    except TypeError:  # PRNG keys and other extended dtypes.
      itemsize = 4
    total += math.prod(leaf.shape) * itemsize
  return total


def residual_bytes_per_example(config: ml_collections.ConfigDict) -> int:
  """Bytes of what the backward pass keeps from the forward pass of one
  example (the residuals of jax.vjp, shapes only, nothing computed).

  An estimate of the activation memory per example before XLA's fusions
  (some residuals are never materialised, some temporaries are not
  residuals): benchmarks/gpu.py uses it only to choose the first batch to
  compile.
  """
  model = modeling.build_model(config)
  params, state = modeling.variable_shapes(config)
  inputs = modeling.example_inputs(config, batch_size=1)

  def residuals(params, state, inputs):
    def loss(p):
      return model.apply(p, state, None, inputs, is_training=True)[0].sum()
    return jax.vjp(loss, params)[1]

  return tree_bytes(jax.eval_shape(residuals, params, state, inputs))


def plan_bytes(compiled) -> Optional[int]:
  """Device bytes the compiled step needs (XLA's buffer assignment):
  arguments + outputs - donated (aliased) buffers + temporaries."""
  stats = compiled.memory_analysis()
  if isinstance(stats, (list, tuple)):
    stats = stats[0] if stats else None
  if stats is None:
    return None
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             - stats.alias_size_in_bytes + stats.temp_size_in_bytes)


def xla_flops(compiled) -> Optional[float]:
  """FLOPs of the compiled step by XLA's cost analysis."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  flops = (cost or {}).get('flops')
  return float(flops) if flops else None


def device_limit_bytes(device) -> Optional[int]:
  """The allocator's limit on the device (None where unknown, e.g. CPU)."""
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return int(stats['bytes_limit']) if stats and 'bytes_limit' in stats else (
      None)


def abstract_batch(config, batch_size: int, mesh) -> dict[str, Any]:
  """Shapes of a global batch of `batch_size`, split over the mesh."""
  sharding = parallel.batch_sharded(mesh)
  shapes = {'inputs': ((batch_size,) + tuple(config.input_shape),
                       jnp.float32),
            'labels': ((batch_size,), jnp.int32),
            'mask': ((batch_size,), jnp.bool_)}
  return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding)
          for k, (s, d) in shapes.items()}


def random_batch(config, batch_size: int, mesh, seed: int = 0):
  """Random images and labels of `batch_size`, split over the mesh (as
  launch/benchmark.py's, without importing that module's host-memory and
  flag machinery)."""
  rng = np.random.default_rng(seed)
  local = batch_size // jax.process_count()
  return parallel.global_batch(
      {'inputs': rng.standard_normal((local,) + tuple(config.input_shape),
                                     dtype=np.float32),
       'labels': rng.integers(0, config.model.num_classes, size=local,
                              dtype=np.int32),
       'mask': np.ones(local, bool)}, mesh)


def matmul_flops_per_s(n: int, iterations: int = 20) -> float:
  """FLOP/s (2 n^3 per call) of an [n, n] x [n, n] bfloat16 matmul."""
  a_key, b_key = jax.random.split(jax.random.key(0))
  a = jax.random.normal(a_key, (n, n), jnp.bfloat16)
  b = jax.random.normal(b_key, (n, n), jnp.bfloat16)
  matmul = jax.jit(lambda a, b: a @ b).lower(a, b).compile()
  for _ in range(2):
    jax.block_until_ready(matmul(a, b))
  start = time.perf_counter()
  for _ in range(iterations):
    out = matmul(a, b)
  jax.block_until_ready(out)
  return 2.0 * n ** 3 * iterations / (time.perf_counter() - start)


def _default_matmul_precision() -> str:
  """jax_default_matmul_precision ('None': the backend's default, TF32 for
  float32 on recent NVIDIA GPUs)."""
  state = getattr(jax, 'default_matmul_precision', None)
  return str(getattr(state, 'value', getattr(
      jax.config, 'jax_default_matmul_precision', '?')))


class _Log:

  def __init__(self, name: str):
    self._name, self._start = name, time.monotonic()

  def __call__(self, message: str) -> None:
    print(f'[gpu_worker {self._name} {time.monotonic() - self._start:6.1f}s]'
          f' {message}', file=sys.stderr, flush=True)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--precision', required=True, choices=('bf16', 'fp32'))
  parser.add_argument('--cpu_kernels', required=True,
                      type=lambda s: {'true': True, 'false': False}[s.lower()])
  parser.add_argument('--config_arg', default=None,
                      help='configs/imagenet.py argument, e.g. runlocal')
  parser.add_argument('--candidates',
                      default=','.join(map(str, bench.CANDIDATES)),
                      type=lambda s: [int(b) for b in s.split(',')])
  parser.add_argument('--known_plans', default='{}', type=json.loads,
                      help='JSON {batch: plan bytes or null (does not fit)}')
  parser.add_argument('--deadline', type=float, default=None,
                      help='unix time by which to be done')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--round_s', type=float, default=2.0,
                      help='target seconds per timed round')
  parser.add_argument('--calibration', type=float, default=None,
                      help='plan bytes / residual bytes per example, '
                           'measured on an earlier configuration')
  parser.add_argument('--limit_bytes', type=int, default=None,
                      help='device memory limit (default: the allocator\'s)')
  parser.add_argument('--matmul_n', type=int, default=0)
  parser.add_argument('--peak_tflops', type=float,
                      default=bench.PEAK_FLOPS / 1e12)
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  deadline = args.deadline or time.time() + bench.BUDGET_S
  name = (f'jax {args.precision} cpu_kernels='
          f'{"on" if args.cpu_kernels else "off"}')
  log = _Log(name)
  config = make_config(args.precision, args.cpu_kernels, args.config_arg)
  mesh = parallel.make_mesh()
  device = jax.devices()[0]
  limit = args.limit_bytes or device_limit_bytes(device)
  budget = limit * bench.FIT_FRACTION if limit else math.inf
  device_text = f'{jax.device_count()} x {device.device_kind}'
  log(f'{device_text}, memory limit '
      f'{f"{limit / bench.GIB:.1f} GiB" if limit else "unknown"}; '
      f'{describe(config)}')

  model = modeling.build_model(config)
  schedule = optimizers.make_schedule(
      lr=config.optimizer.lr, total_steps=1000,
      **dict(config.schedule.to_dict(), unit='steps'))
  optimizer = optimizers.make_optimizer(schedule=schedule,
                                        **config.optimizer.to_dict())
  train_step = steps_lib.make_train_step(config, model, optimizer, mesh)
  state_shapes = steps_lib.abstract_train_state(config, model, optimizer,
                                                mesh)
  fixed = tree_bytes(state_shapes) + tree_bytes(state_shapes.params)
  sums = steps_lib.zero_metrics(mesh)
  residual = residual_bytes_per_example(config)
  prior = residual * (args.calibration or 1.0)
  log(f'backward keeps {residual / bench.GIB:.2f} GiB / example (shapes '
      f'only); state {tree_bytes(state_shapes) / bench.GIB:.2f} GiB')

  plans = {int(b): p for b, p in args.known_plans.items()}
  compiled_at: dict[int, Any] = {}
  compile_s: dict[int, float] = {}
  note = None
  while True:
    batch = bench.next_batch(args.candidates, plans, budget,
                             prior_bytes_per_example=prior, fixed_bytes=fixed)
    if batch is None:
      break
    left = deadline - time.time()
    if compile_s and left < max(compile_s.values()) + bench.AFTER_COMPILE_S:
      note = f'batch search stopped at {batch}: {left:.0f} s left'
      break
    log(f'compiling for batch {batch}')
    start = time.perf_counter()
    try:
      compiled = train_step.lower(state_shapes, sums,
                                  abstract_batch(config, batch, mesh)).compile()
    except Exception as e:  # pylint: disable=broad-except
      if not bench.is_out_of_memory(e):
        raise
      plans[batch] = None
      bench.emit({'event': 'compiled', 'batch': batch, 'plan_bytes': None,
                  'fits': False, 'compile_s': time.perf_counter() - start})
      log(f'batch {batch}: out of memory while compiling')
      continue
    compile_s[batch] = time.perf_counter() - start
    plan = plan_bytes(compiled)
    fits = plan is None or plan <= budget
    bench.emit({'event': 'compiled', 'batch': batch, 'plan_bytes': plan,
                'fits': fits, 'compile_s': compile_s[batch]})
    log(f'batch {batch}: compiled in {compile_s[batch]:.1f} s, plan '
        f'{plan / bench.GIB if plan is not None else math.nan:.1f} GiB '
        f'({"fits" if fits else "does not fit"})')
    if plan is None:  # No plan to search with: take this batch.
      plans = {batch: 0.0}
      compiled_at = {batch: compiled}
      note = 'XLA gave no memory plan: batch not searched'
      break
    plans[batch] = float(plan)
    if fits:
      compiled_at = {batch: compiled}  # Only the largest that fits is kept.

  batch = bench.chosen_batch(plans, budget)
  if batch is None or batch not in compiled_at:
    bench.emit({'event': 'result', 'status': 'does not fit',
                'device': device_text, 'versions': versions(),
                'note': note or f'no batch of {args.candidates} fits'})
    return 0
  compiled = compiled_at[batch]
  try:
    state = steps_lib.create_train_state(config, model, optimizer, mesh)
    carry = [state, sums]
    data = random_batch(config, batch, mesh)

    def step():
      carry[0], carry[1] = compiled(carry[0], carry[1], data)
      return carry[1]

    start = time.perf_counter()
    jax.block_until_ready(step())
    first = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(step())
    warm = time.perf_counter() - start
    rounds, iterations = bench.timing_plan(
        warm, deadline - time.time() - 3.0, rounds=args.rounds,
        round_s=args.round_s)
    log(f'batch {batch}: first step {first:.2f} s, second {warm:.3f} s; '
        f'timing {rounds} x {iterations} steps')
    per_round = []
    for _ in range(rounds):
      start = time.perf_counter()
      for _ in range(iterations):
        out = step()
      jax.block_until_ready(out)
      per_round.append((time.perf_counter() - start) / iterations)
    sums_host = parallel.fetch(carry[1])
  except Exception as e:  # pylint: disable=broad-except
    if not bench.is_out_of_memory(e):
      raise
    log(f'batch {batch}: out of memory at run time')
    bench.emit({'event': 'oom', 'batch': batch,
                'plans': {str(b): p for b, p in plans.items()}})
    return bench.OOM_EXIT

  per_round.sort()
  seconds = per_round[(len(per_round) - 1) // 2]
  flops = xla_flops(compiled)
  memory = plans[batch] or None
  result = {
      'event': 'result', 'status': 'ok', 'batch': batch,
      'step_time_s': seconds, 'step_time_best_s': per_round[0],
      'rounds': rounds, 'iterations': iterations, 'first_step_s': first,
      'compile_s': compile_s.get(batch),
      'compile_total_s': sum(compile_s.values()),
      'memory_bytes': memory, 'limit_bytes': limit,
      'xla_flops_per_step': flops,
      'xla_flops_per_s': flops / seconds if flops else None,
      'residual_bytes_per_example': residual,
      'plan_bytes_per_example': (memory - fixed) / batch if memory else None,
      'loss': float(sums_host['loss'] / max(sums_host['steps'], 1.0)),
      'nonfinite_steps': float(sums_host['nonfinite']),
      'device': device_text, 'versions': versions(),
      'matmul_precision': _default_matmul_precision(),
  }
  if note:
    result['note'] = note
  bench.emit(result)
  log(f'batch {batch}: {seconds * 1e3:.1f} ms / step (median of {rounds} '
      f'rounds of {iterations}), {batch / seconds:.1f} images/s')

  if args.matmul_n and deadline - time.time() > 10:
    del carry, state, data, compiled, compiled_at
    rate = matmul_flops_per_s(args.matmul_n)
    bench.emit({'event': 'matmul', 'n': args.matmul_n, 'flops_per_s': rate})
    log(f'bf16 matmul {args.matmul_n}^3: {rate / 1e12:.1f} TFLOP/s '
        f'({rate / (args.peak_tflops * 1e12):.0%} of the peak used for MFU)')
  return 0


if __name__ == '__main__':
  sys.exit(main())

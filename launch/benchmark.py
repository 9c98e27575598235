r"""Train-step speed of a config next to a plain matmul on the same devices.

  python -m launch.benchmark --config=configs/fashion_mnist.py [--batch_size=B]
  python -m launch.benchmark --workload=NAME      # a registered preset
  python -m launch.benchmark --workload=W1 --cpu_kernels=false  # plain autodiff
  python -m launch.benchmark --workload=W2:side=128  # a preset's argument

Prints the train-step time, examples/s, FLOPs per step (XLA's cost analysis
of the compiled, partitioned step, times the number of devices), the achieved
FLOP/s, and the same for an N x N x N float32 matmul (rows split over the
devices), with the ratio of the two FLOP rates: how much of what the hardware
does on a matmul the train step achieves. Inputs are random arrays of the
config's input shape; no dataset is read. A benchmark prints figures; it is
not a timed test.

Reuse: `benchmark_train_step(config, batch_size)` and `benchmark_matmul(n)`
return dicts; `train_step_inputs(config, batch_size, mesh)` the jitted step
and what to call it with; `register_workload('W1')` adds a preset (a
function of the preset's argument, the text after ':' in
`--workload=NAME:ARG` or None, returning (config, batch_size)) that
`--workload=W1` runs.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import config_loader
from experiments import host_memory
from experiments import modeling
from experiments import optimizers
from experiments import parallel
from experiments import steps as steps_lib
from experiments.tools import flops as flops_lib
from perceiver import native

WORKLOADS: dict[str, Callable[[Optional[str]],
                               tuple[ml_collections.ConfigDict, int]]] = {}


def register_workload(name: str):
  """Decorator: `@register_workload('W1') def w1(arg): return config, batch`.

  `arg` is the text after ':' in `--workload=W1:ARG`, None without one.
  """
  def register(fn):
    WORKLOADS[name] = fn
    return fn
  return register


def _time(fn: Callable[[], Any], iterations: int) -> float:
  """Mean seconds per call of fn (which returns arrays to wait for)."""
  start = time.perf_counter()
  for _ in range(iterations):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / iterations


def time_rounds(fn: Callable[[], Any], *, iterations: int, rounds: int,
                warmup: int = 2) -> tuple[float, float]:
  """(median, best) over `rounds` rounds of the mean seconds per call of fn,
  each round `iterations` calls back to back, after `warmup` calls. The
  median is robust to a round disturbed by the machine."""
  _time(fn, warmup)
  per_round = sorted(_time(fn, iterations) for _ in range(rounds))
  return per_round[(rounds - 1) // 2], per_round[0]


def random_batch(config, batch_size: int, mesh, seed: int = 0):
  """A global batch of random inputs and labels, split over the mesh."""
  rng = np.random.default_rng(seed)
  local = batch_size // jax.process_count()
  shape = config.input_shape
  if hasattr(shape, 'items'):
    inputs = {k: rng.normal(size=(local,) + tuple(v)).astype(np.float32)
              for k, v in shape.items()}
  else:
    inputs = rng.normal(size=(local,) + tuple(shape)).astype(np.float32)
  num_classes = config.model.num_classes
  if config.loss == 'sigmoid':
    labels = (rng.random((local, num_classes)) < 0.05).astype(np.float32)
  else:
    labels = rng.integers(0, num_classes, size=local).astype(np.int32)
  return parallel.global_batch(
      {'inputs': inputs, 'labels': labels, 'mask': np.ones(local, bool)},
      mesh)


def model_and_optimizer(config: ml_collections.ConfigDict):
  """The model and optimizer a benchmark times: the config's own, with its
  learning-rate schedule laid over 1,000 steps (the step's cost does not
  depend on where in the schedule it is)."""
  model = modeling.build_model(config)
  schedule = optimizers.make_schedule(
      lr=config.optimizer.lr, total_steps=1000,
      **dict(config.schedule.to_dict(), unit='steps'))
  return model, optimizers.make_optimizer(schedule=schedule,
                                          **config.optimizer.to_dict())


def train_step_inputs(config: ml_collections.ConfigDict, batch_size: int,
                      mesh) -> tuple[Any, Any, Any, Any]:
  """(the runner's jitted train step, a fresh state, zero metric sums, a
  random batch) for `config` at `batch_size` over `mesh`: what a benchmark
  calls the step with."""
  model, optimizer = model_and_optimizer(config)
  state = steps_lib.create_train_state(config, model, optimizer, mesh)
  sums = steps_lib.zero_metrics(mesh)
  batch = random_batch(config, batch_size, mesh)
  return (steps_lib.make_train_step(config, model, optimizer, mesh), state,
          sums, batch)


def benchmark_train_step(config: ml_collections.ConfigDict,
                         batch_size: Optional[int] = None, *, mesh=None,
                         iterations: int = 10, rounds: int = 3,
                         warmup: int = 2) -> dict[str, float]:
  """Times the runner's own jitted train step on random data.

  After `warmup` steps, `rounds` rounds of `iterations` steps, each round
  dispatched back to back as the runner does; the step time is the median
  round's mean (robust to a round disturbed by the machine), the best round's
  is kept as step_time_best_s.

  Returns step_time_s, step_time_best_s, examples_per_sec, flops_per_step
  (XLA cost analysis, all devices), flops_per_sec, compile_time_s,
  num_devices, batch_size, rounds, iterations.
  """
  mesh = mesh or parallel.make_mesh()
  batch_size = batch_size or config.batch_size
  parallel.check_batch_size(batch_size, mesh, jax.process_count())
  train_step, state, sums, batch = train_step_inputs(config, batch_size, mesh)
  start = time.perf_counter()
  compiled = train_step.lower(state, sums, batch).compile()
  compile_time = time.perf_counter() - start
  num_devices = mesh.devices.size
  flops = flops_lib.compiled_flops(compiled) * num_devices
  carry = [state, sums]

  def step():
    carry[0], carry[1] = compiled(carry[0], carry[1], batch)
    return carry[1]

  seconds, best = time_rounds(step, iterations=iterations, rounds=rounds,
                              warmup=warmup)
  return {'step_time_s': seconds, 'step_time_best_s': best,
          'examples_per_sec': batch_size / seconds,
          'flops_per_step': flops, 'flops_per_sec': flops / seconds,
          'compile_time_s': compile_time, 'num_devices': num_devices,
          'batch_size': batch_size, 'rounds': rounds,
          'iterations': iterations}


def benchmark_matmul(n: int = 2048, *, dtype=jnp.float32, mesh=None,
                     iterations: int = 10) -> dict[str, float]:
  """An [n, n] x [n, n] matmul, rows of the left operand split over the
  devices: time, FLOPs (2 n^3) and FLOP/s."""
  mesh = mesh or parallel.make_mesh()
  if n % mesh.devices.size:
    raise ValueError(f'n={n} does not divide over {mesh.devices.size} '
                     'devices.')
  a = jax.device_put(jnp.ones((n, n), dtype), parallel.batch_sharded(mesh))
  b = jax.device_put(jnp.ones((n, n), dtype) / n, parallel.replicated(mesh))
  matmul = jax.jit(lambda a, b: a @ b,
                   out_shardings=parallel.batch_sharded(mesh))
  compiled = matmul.lower(a, b).compile()
  _time(lambda: compiled(a, b), 2)
  seconds = _time(lambda: compiled(a, b), iterations)
  flops = 2.0 * n ** 3
  return {'step_time_s': seconds, 'flops_per_step': flops,
          'flops_per_sec': flops / seconds}


def report(name: str, train: dict[str, float], matmul: dict[str, float],
           matmul_n: int, retained: Optional[bool] = None) -> str:
  devices = jax.devices()
  memory = ('' if retained is None else
            '; freed host memory ' + ('retained' if retained else
                                      'returned to the OS (malloc defaults)'))
  if devices[0].platform == 'cpu':  # perceiver.native's GEMMs, if it runs
    memory += f'; GEMMs: {native.blas() or "XLA"}'
  return '\n'.join([
      f'devices: {len(devices)} x {devices[0].device_kind} '
      f'({jax.process_count()} process(es)){memory}',
      f'train step ({name}, global batch {train["batch_size"]}):',
      f'  time/step        {train["step_time_s"] * 1e3:.2f} ms '
      f'(median of {train["rounds"]} rounds of {train["iterations"]} steps; '
      f'best {train["step_time_best_s"] * 1e3:.2f} ms; '
      f'compile {train["compile_time_s"]:.1f} s)',
      f'  examples/s       {train["examples_per_sec"]:.1f}',
      f'  FLOPs/step       {train["flops_per_step"]:.4g} (XLA cost analysis '
      'and perceiver.native\'s products)',
      f'  achieved         {train["flops_per_sec"] / 1e9:.2f} GFLOP/s',
      f'matmul {matmul_n}^3 float32:',
      f'  time             {matmul["step_time_s"] * 1e3:.2f} ms',
      f'  FLOPs            {matmul["flops_per_step"]:.4g}',
      f'  achieved         {matmul["flops_per_sec"] / 1e9:.2f} GFLOP/s',
      f'train / matmul     {train["flops_per_sec"] / matmul["flops_per_sec"]:.3f}',
  ])


@register_workload('W1')
def _w1(arg: Optional[str] = None):
  """Issue 6's workload W1 (configs/w1.py); it takes no argument."""
  from configs import common  # pylint: disable=g-import-not-at-top
  from configs import w1  # pylint: disable=g-import-not-at-top
  common.parse_arg(arg)  # any key is an error
  return w1.get_config(), w1.BATCH_SIZE


@register_workload('W2')
def _w2(arg: Optional[str] = None):
  """W2 at one image side S: `--workload=W2:side=S` (configs/w1.py: W1's
  model at batch 4 over S x S images, M = S^2; the issue's sides are
  w1.W2_SIDES)."""
  from configs import common  # pylint: disable=g-import-not-at-top
  from configs import w1  # pylint: disable=g-import-not-at-top
  side = common.parse_arg(arg, side=0).side
  if side <= 0:
    raise ValueError('W2 needs an image side: --workload=W2:side=S, S in '
                     f'{w1.W2_SIDES}.')
  config = w1.get_config(f'side={side},batch_size={w1.W2_BATCH_SIZE}')
  return config, w1.W2_BATCH_SIZE


def workload(spec: str) -> tuple[ml_collections.ConfigDict, int]:
  """(config, batch_size) of a `--workload` value, 'NAME' or 'NAME:ARG'."""
  name, _, arg = spec.partition(':')
  if name not in WORKLOADS:
    raise ValueError(f'Unknown --workload={spec}; known: {sorted(WORKLOADS)}.')
  return WORKLOADS[name](arg or None)


def config_or_workload(config_spec: Optional[str], workload_spec: str
                       ) -> tuple[ml_collections.ConfigDict, int, str]:
  """(config, batch_size, name) for a benchmark script's --config (a config
  file, 'configs/NAME.py[:ARG]', at its own batch_size) or, without one, its
  --workload; ValueError (setup.ConfigError among them) naming a bad one."""
  if config_spec:
    config = config_loader.load(config_spec)
    return config, config.batch_size, config_spec
  return workload(workload_spec) + (workload_spec,)


def define_flags() -> None:
  """Flags of the command line (defined only when run as the program)."""
  config_loader.define_flag()
  flags.DEFINE_string('workload', None,
                      'A registered preset instead of --config: NAME or '
                      f'NAME:ARG ({", ".join(sorted(WORKLOADS))}; '
                      'W2:side=S).')
  flags.DEFINE_integer('batch_size', None,
                       'Global batch (default config.batch_size).')
  flags.DEFINE_integer('iterations', 10, 'Timed steps per round.')
  flags.DEFINE_integer('rounds', 3, 'Timed rounds (the median is reported).')
  flags.DEFINE_integer('matmul_n', 2048, 'Matmul size N.')
  flags.DEFINE_string('mixed_precision', None,
                      "Sets config.mixed_precision, e.g. 'bf16' "
                      '(experiments/precision.py).')
  flags.DEFINE_bool('cpu_kernels', None,
                    'Sets config.model.cpu_kernels (perceiver/cpu_kernels.py; '
                    'unset: the config\'s own setting).')
  host_memory.define_flag()


def main(argv):
  del argv
  f = flags.FLAGS
  retained = host_memory.configure(f.host_memory)  # Before JAX starts.
  if f.workload:
    try:
      config, batch_size = workload(f.workload)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    name = f.workload
  elif f.config is not None:
    config, batch_size = f.config, f.batch_size
    name = f['config'].config_filename
  else:
    raise app.UsageError('Give --config or --workload.')
  if f.mixed_precision:
    config.mixed_precision = f.mixed_precision
    name += f' {f.mixed_precision}'
  if f.cpu_kernels is not None:
    config.model.cpu_kernels = f.cpu_kernels
    name += f' cpu_kernels={f.cpu_kernels}'
  train = benchmark_train_step(config, f.batch_size or batch_size,
                               iterations=f.iterations, rounds=f.rounds)
  matmul = benchmark_matmul(f.matmul_n, iterations=f.iterations)
  print(report(name, train, matmul, f.matmul_n, retained), flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)

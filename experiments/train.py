r"""One training runner for every experiment, driven by a config file.

  python -m experiments.train --config=configs/modelnet40.py:runlocal \
      --config.optimizer.lr=3e-4 --workdir=/tmp/mn40

Multi-host: one process per host (or per GPU) with
  --coordinator_address=HOST:PORT --num_processes=P --process_id=I
(or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
environment variables); on Cloud TPU VMs the processes find each other
automatically.

Composition: mesh -> data -> workdir -> model -> optimizer -> state ->
restore-or-init -> loop -> evaluate. Files in the workdir: config.json (the
resolved config), run.lock (the running process), checkpoints/ (orbax, each
step with its SHA256SUMS), metrics.jsonl and tensorboard/ (process 0).

Rerunning the same command resumes from the newest intact checkpoint (see
experiments/checkpointing.py); resuming with a config that differs in more
than run length and cadences needs --allow_config_change. One run per
workdir: a second one stops with an error.

Exit codes: 0 done; 1 the loss became NaN/inf; 2 a config, flag, data or
workdir mistake (found before compiling); 74 a checkpoint or workdir file
could not be written or read (disk full, permissions); 128+N stopped by
signal N (checkpoint saved: rerun to resume).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import sys
import time
from typing import Any, Callable, Iterator, Optional

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
import ml_collections

from experiments import checkpointing
from experiments import config_loader
from experiments import evaluation
from experiments.tools import flops as flops_lib
from experiments import host_memory
from experiments import metric_writers
from experiments import modeling
from experiments import optimizers
from experiments import parallel
from experiments import setup
from experiments import steps as steps_lib

TrainState = steps_lib.TrainState

EXIT_IO_ERROR = 74  # sysexits.h EX_IOERR

ConfigError = setup.ConfigError


class NonFiniteLossError(RuntimeError):
  """The training loss became NaN or inf."""


def static_facts(config, params, model_state) -> dict[str, float]:
  """Parameter count and forward FLOPs per example (paper's counting, on
  `modeling.build_counting_model`), computed once on the host from shapes."""
  inputs = modeling.example_inputs(config, batch_size=1)
  shapes = lambda tree: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  model = modeling.build_counting_model(config)
  forward = lambda p, s, x: model.apply(p, s, None, x, is_training=False)[0]
  fwd_flops, _ = flops_lib.count_flops(forward, shapes(params),
                                       shapes(model_state), inputs)
  return {'num_params': modeling.count_params(params),
          'gflops_per_example_forward': fwd_flops / 1e9,
          'num_devices': jax.device_count(),
          'num_processes': jax.process_count()}


def restore_or_init(config, model, optimizer, mesh,
                    checkpointer: checkpointing.Checkpointer
                    ) -> tuple[TrainState, Optional[int]]:
  """(state, its step) of the newest intact checkpoint of the workdir (the
  damaged ones are moved aside), else (a fresh state, None)."""
  abstract = steps_lib.abstract_train_state(config, model, optimizer, mesh)
  step, restored = checkpointing.restore(checkpointer, abstract._asdict(),
                                         set_aside=True)
  if step is None:
    logging.info('No checkpoint in %s: initialising from seed %d.',
                 checkpointer.directory, config.seed)
    return steps_lib.create_train_state(config, model, optimizer, mesh), None
  logging.info('Resuming from the checkpoint of step %d in %s.', step,
               checkpointer.directory)
  return TrainState(**restored), step


def prepare_workdir(config, workdir: str, *, allow_config_change: bool
                    ) -> Optional[setup.WorkdirLock]:
  """Process 0: the workdir is writable, locked by this run, and holds this
  config (or none). ConfigError otherwise. Returns the lock (None on other
  processes and on remote workdirs)."""
  if jax.process_index() != 0:
    return None
  setup.check_workdir(workdir)
  lock = None if '://' in workdir else setup.WorkdirLock(workdir)
  try:
    directory = epath.Path(workdir) / 'checkpoints'
    steps = sorted(int(p.name) for p in directory.iterdir()
                   if p.name.isdigit()) if directory.is_dir() else []
    setup.check_resumed_config(config, workdir,
                               step=steps[-1] if steps else None,
                               allow_change=allow_config_change)
  except BaseException:
    if lock is not None:
      lock.release()
    raise
  return lock


# ----------------------------------------------------------------- loop ----


def train_loop(config, state: TrainState, train_step, batches: Iterator,
               mesh, *, total_steps: int, schedule,
               checkpointer: checkpointing.Checkpointer,
               writer: metric_writers.MetricWriter,
               stop: checkpointing.StopRequest,
               evaluate_fn: Callable[[TrainState], dict[str, float]],
               ) -> TrainState:
  """Runs steps until total_steps or a stop request; logs, evaluates and
  checkpoints on the configured cadence. Metrics leave the device only when
  they are logged or a checkpoint is due (the finite-loss check)."""
  step = int(parallel.fetch(state.step))
  last_saved = step if step else None  # restored, hence verified
  sums = steps_lib.zero_metrics(mesh)
  tick, tick_step = time.time(), step
  while step < total_steps:
    state, sums = train_step(state, sums,
                             parallel.global_batch(next(batches), mesh))
    step += 1
    stopping = stop.should_stop(step)
    last = step == total_steps
    log_due = step % config.log_every_steps == 0 or last or stopping
    save_due = step % config.checkpoint_every_steps == 0 or last or stopping
    eval_due = (config.eval_every_steps and
                step % config.eval_every_steps == 0 and not last)
    if not (log_due or save_due or eval_due):
      continue
    host = parallel.fetch(sums)
    if host['nonfinite'] > 0:
      kept = (f'the last good checkpoint is step {last_saved} in '
              f'{checkpointer.directory}' if last_saved is not None
              else 'no checkpoint was saved')
      raise NonFiniteLossError(
          f'Loss or gradient became NaN/inf between steps '
          f'{step - int(host["steps"]) + 1} and {step}; stopped ({kept}).')
    if log_due and host['steps']:
      now = time.time()
      steps_per_sec = (step - tick_step) / max(now - tick, 1e-9)
      scalars = {
          'loss': host['loss'] / host['steps'],
          'grad_norm': host['grad_norm'] / host['steps'],
          'lr': float(schedule(step - 1)),
          'steps_per_sec': steps_per_sec,
          'examples_per_sec': steps_per_sec * config.batch_size,
          'seconds_left': (total_steps - step) / max(steps_per_sec, 1e-9),
      }
      logging.info(metric_writers.progress_line(step, total_steps, scalars))
      writer.write_scalars(step, scalars)
      sums = steps_lib.zero_metrics(mesh)
      tick, tick_step = now, step
    if save_due:
      checkpointer.save(step, state._asdict())
      last_saved = step
    if eval_due:
      eval_start = time.time()
      result = evaluate_fn(state)
      metric_writers.log_scalars('eval', step, result)
      writer.write_scalars(step, {f'eval/{k}': v for k, v in result.items()})
      tick += time.time() - eval_start  # Speeds count training time only.
    if stopping:
      break
  return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       mesh=None, dataset=None,
                       allow_config_change: bool = False) -> dict[str, Any]:
  """Trains (resuming from workdir) and evaluates; returns the final
  evaluation metrics, or {'stopped_at': step, 'signal': n} when a stop
  request ended the run early. `dataset`: the module check_config returned
  (it is checked here if not given)."""
  if dataset is None:
    dataset = setup.check_config(config)
  mesh = mesh or parallel.make_mesh()
  train_batch, _ = setup.batch_sizes(config, mesh)
  setup.check_data(config, dataset)
  total_steps = setup.num_train_steps(config, dataset)
  with contextlib.ExitStack() as cleanup:
    lock = prepare_workdir(config, workdir,
                           allow_config_change=allow_config_change)
    if lock is not None:
      cleanup.callback(lock.release)
    checkpointer = checkpointing.Checkpointer(
        os.path.join(workdir, 'checkpoints'),
        max_to_keep=config.keep_checkpoints)
    cleanup.callback(checkpointer.close)
    latest = checkpointer.latest_step() or 0
    if latest < total_steps:  # A disk still full: say so before compiling.
      every = config.checkpoint_every_steps
      checkpointer.check_space(min(total_steps, (latest // every + 1) * every))
    return _train(config, workdir, dataset, mesh, train_batch, total_steps,
                  checkpointer, cleanup)


def _train(config, workdir, dataset, mesh, train_batch, total_steps,
           checkpointer, cleanup) -> dict[str, Any]:
  """train_and_evaluate from the model on."""
  model = modeling.build_model(config)
  optimizer, schedule = optimizers.from_config(
      config, total_steps=total_steps,
      steps_per_epoch=setup.steps_per_epoch_fn(config, dataset))
  state, restored = restore_or_init(config, model, optimizer, mesh,
                                    checkpointer)
  writer = metric_writers.MetricWriter(
      workdir, enabled=jax.process_index() == 0, resume_from=restored or 0)
  cleanup.callback(writer.close)
  start = int(parallel.fetch(state.step))
  facts = static_facts(config, state.params, state.state)
  facts.update(total_steps=total_steps, global_batch_size=config.batch_size)
  metric_writers.log_scalars('static', start, facts)
  writer.write_scalars(0, facts)  # once per workdir (kept on resume)

  eval_step = steps_lib.make_eval_step(config, model, mesh)
  evaluate_fn = lambda s: evaluation.evaluate(config, s, eval_step, dataset, mesh)
  batches = dataset.load(config.train_split, batch_size=train_batch,
                         is_training=True, seed=config.seed, start_step=start,
                         process_index=jax.process_index(),
                         process_count=jax.process_count(),
                         **config.data.to_dict())
  stop = checkpointing.StopRequest(multi_process=jax.process_count() > 1)
  cleanup.callback(stop.restore_handlers)
  state = train_loop(
      config, state, steps_lib.make_train_step(config, model, optimizer,
                                               mesh),
      batches, mesh, total_steps=total_steps, schedule=schedule,
      checkpointer=checkpointer, writer=writer, stop=stop,
      evaluate_fn=evaluate_fn)
  step = int(parallel.fetch(state.step))
  if stop.signum is not None and step < total_steps:
    logging.warning('Stopped by signal %d at step %d; checkpoint saved. '
                    'Run the same command to resume.', stop.signum, step)
    return {'stopped_at': step, 'signal': stop.signum}
  result = evaluate_fn(state)
  metric_writers.log_scalars('final eval', step, result)
  writer.write_scalars(step, {f'eval/{k}': v for k, v in result.items()})
  if jax.process_index() == 0:
    (epath.Path(workdir) / 'final_metrics.json').write_text(
        json.dumps(dict(result, step=step), indent=2))
  return result


# ----------------------------------------------------------------- main ----

def define_flags() -> None:
  """The command line's flags; defined only when this module is the program,
  so that others can import its functions next to their own flags."""
  config_loader.define_flag()
  flags.DEFINE_string('workdir', None,
                      'Directory for the config, checkpoints and metrics.')
  flags.DEFINE_string('coordinator_address', None,
                      'Multi-process: HOST:PORT of process 0.')
  flags.DEFINE_integer('num_processes', None,
                       'Multi-process: number of processes.')
  flags.DEFINE_integer('process_id', None,
                       'Multi-process: index of this process.')
  flags.DEFINE_enum(
      'distributed', 'auto', ['auto', 'true', 'false'],
      'jax.distributed.initialize: auto = when a coordinator is given or on '
      'a Cloud TPU VM; true = always (cluster auto-detection, e.g. SLURM).')
  flags.DEFINE_bool(
      'allow_config_change', False,
      'Resume a workdir whose config.json differs from --config in more '
      'than run length and cadences (the old one is kept beside it).')
  host_memory.define_flag()


def _fail(message: str, code: int = 2):
  """One line on stderr, then exit."""
  print(f'experiments.train: error: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with flag/override errors on one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(setup.one_line(str(e)))
  except (AttributeError, KeyError, ValueError, TypeError) as e:
    # config_flags: a field the config does not have, a bad value or config
    # argument; the config loader names which argument, in one line.
    _fail(config_loader.explain(argv) or setup.one_line(str(e)))


def _on_cloud_tpu_vm() -> bool:
  return bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'))


def main(argv):
  checkpointing.quiet_orbax_logs()
  if len(argv) > 1:
    _fail(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    if config is not None:
      config.keys()  # config_flags reports a file it could not load lazily.
  except OSError as e:
    _fail(f'cannot load --config: {str(e).strip().splitlines()[-1].strip()}')
  if config is None:
    _fail('--config is required (e.g. --config=configs/modelnet40.py).')
  if not workdir:
    _fail('--workdir is required.')
  try:
    dataset = setup.check_config(config)
  except ConfigError as e:
    _fail(str(e))
  host_memory.configure(flags.FLAGS.host_memory)  # Before JAX starts.
  mode = flags.FLAGS.distributed
  if mode != 'false':
    parallel.initialize_distributed(
        flags.FLAGS.coordinator_address, flags.FLAGS.num_processes,
        flags.FLAGS.process_id,
        auto=mode == 'true' or (mode == 'auto' and _on_cloud_tpu_vm()))
  try:
    result = train_and_evaluate(
        config, workdir, dataset=dataset,
        allow_config_change=flags.FLAGS.allow_config_change)
  except ConfigError as e:
    _fail(str(e))
  except NonFiniteLossError as e:
    _fail(str(e), code=1)
  except checkpointing.CheckpointError as e:
    _fail(str(e), code=EXIT_IO_ERROR)
  except OSError as e:  # a workdir file (metrics, config) on a full disk
    where = f' ({e.filename})' if e.filename else ''
    _fail(f'{checkpointing.describe_error(e)}{where}', code=EXIT_IO_ERROR)
  if 'signal' in result:
    sys.exit(128 + result['signal'])


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=parse_flags)

r"""Train-step time and peak memory against the byte-array length M.

  python -m launch.memory_benchmark                   # M = 1,024 .. 1,048,576
  python -m launch.memory_benchmark --sizes=1024,65536 --paths=plain,chunked

A cross-attend-heavy Perceiver in the W1 mould (configs/w1.py: latents
N = 256 x D = 512, one 1-head cross-attend, 8-head latent self-attention,
1,000 classes, Adam, float32) over a raw 1-D signal of M samples, one input
per sample (AudioPreprocessor(samples_per_patch=1), 64 Fourier bands:
C = 1 + 2 * 64 + 1 = 130, factored byte array); one block of L = 2
self-attends to keep the latent side small. Batch 1 at every size.

Paths: 'plain' (cross_attend_chunk_size=None: the [B, H, N, M] logits are
materialised), 'chunked' (--chunk_size inputs at a time with an online
softmax, perceiver/chunked_attention.py), 'plain+remat' (plain with
remat_latent_blocks=True; its row is run at the largest size where the plain
path runs).

Every row runs in a fresh subprocess: the runner's jitted train step
(experiments/steps.py; forward + backward + Adam update) is compiled, XLA's
memory analysis of the compiled step is read (argument + output + temp bytes,
what XLA plans to hold at once), and only if that plan is below --budget_gib
is the step run (1 warm-up + --iterations timed steps) and the process's
peak resident memory (VmHWM: includes the JAX runtime, ~0.3 GiB) read.
Rows over the budget print 'OOM (XLA plans X GiB)' without allocating.
At batch 1 the plain path's [1, 1, 256, M] logits are only 1 GiB at M = 2^20,
so two last rows (--plan_batch, default 16) compile both paths at the largest
M and that batch without running them: XLA's plan for the plain path against
the chunked one's.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

from absl import app
from absl import flags

DEFAULT_SIZES = (1024, 4096, 16384, 65536, 262144, 1048576)
PATHS = ('plain', 'chunked', 'plain+remat')
GIB = 2.0 ** 30

flags.DEFINE_list('sizes', [str(m) for m in DEFAULT_SIZES],
                  'Byte-array lengths M.')
flags.DEFINE_integer('max_m', None, 'Skip sizes above this.')
flags.DEFINE_list('paths', list(PATHS), f'Subset of {PATHS}.')
flags.DEFINE_integer('chunk_size', 4096, 'Inputs per chunk (chunked path).')
flags.DEFINE_integer('batch_size', 1, 'Batch B of every row.')
flags.DEFINE_integer('iterations', 2, 'Timed steps per row.')
flags.DEFINE_float('budget_gib', 16.0,
                   'Run a row only if XLA plans less than this.')
flags.DEFINE_integer('latent_channels', 512, 'D.')
flags.DEFINE_integer('num_latents', 256, 'N.')
flags.DEFINE_integer('plan_batch', 16,
                     'Also compile (not run) both paths at the largest M with '
                     'this batch, to show XLA\'s plans where the plain path '
                     'no longer fits; 0 = skip.')
flags.DEFINE_string('row', None, 'Internal: M,batch,path[,plan] of one row.')
FLAGS = flags.FLAGS


def make_config(m: int, *, path: str, chunk_size: int, num_latents: int,
                latent_channels: int):
  """The W1-like config over a 1-D signal of m samples."""
  from configs import w1  # pylint: disable=g-import-not-at-top
  config = w1.get_config()
  config.input_name = 'audio'
  config.input_shape = (m,)
  config.input = dict(samples_per_patch=1, position_encoding='fourier',
                      num_bands=64, max_resolution=(m,), factored=True)
  config.model.update(
      num_latents=num_latents, latent_channels=latent_channels, num_blocks=1,
      num_cross_attends=1, num_self_attends_per_block=2,
      cross_attend_chunk_size=chunk_size if path == 'chunked' else None,
      remat_latent_blocks=path == 'plain+remat')
  return config


def _peak_rss_gib() -> float:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) * 1024 / GIB
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def run_row(m: int, batch_size: int, path: str,
            plan_only: bool = False) -> dict:
  """Compiles (and, within the budget, runs) one row; returns its figures."""
  import jax  # pylint: disable=g-import-not-at-top
  from experiments import parallel  # pylint: disable=g-import-not-at-top
  from experiments import steps as steps_lib  # pylint: disable=g-import-not-at-top
  from launch import benchmark  # pylint: disable=g-import-not-at-top

  config = make_config(m, path=path, chunk_size=FLAGS.chunk_size,
                       num_latents=FLAGS.num_latents,
                       latent_channels=FLAGS.latent_channels)
  mesh = parallel.make_mesh()
  model, optimizer = benchmark.model_and_optimizer(config)
  train_step = steps_lib.make_train_step(config, model, optimizer, mesh)
  abstract = steps_lib.abstract_train_state(config, model, optimizer, mesh)
  sums = steps_lib.zero_metrics(mesh)
  batch = benchmark.random_batch(config, batch_size, mesh)
  start = time.perf_counter()
  compiled = train_step.lower(abstract, sums, batch).compile()
  row = {'m': m, 'batch': batch_size, 'path': path,
         'compile_s': time.perf_counter() - start}
  mem = compiled.memory_analysis()
  row['xla_gib'] = (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                    + mem.output_size_in_bytes) / GIB
  row['xla_temp_gib'] = mem.temp_size_in_bytes / GIB
  if plan_only:
    row['plan_only'] = True
    return row
  if row['xla_gib'] > FLAGS.budget_gib:
    return row
  state = steps_lib.create_train_state(config, model, optimizer, mesh)
  carry = [state, sums]

  def step():
    carry[0], carry[1] = compiled(carry[0], carry[1], batch)
    return carry[1]

  jax.block_until_ready(step())  # warm-up
  start = time.perf_counter()
  for _ in range(FLAGS.iterations):
    out = step()
  jax.block_until_ready(out)
  row['step_s'] = (time.perf_counter() - start) / FLAGS.iterations
  row['rss_gib'] = _peak_rss_gib()
  return row


def _subprocess_row(m: int, batch_size: int, path: str,
                    plan_only: bool = False) -> dict:
  argv = [sys.executable, '-m', 'launch.memory_benchmark',
          f'--row={m},{batch_size},{path}' + (',plan' if plan_only else '')
          ] + [
              f'--{name}={FLAGS[name].value}' for name in (
                  'chunk_size', 'iterations', 'budget_gib', 'latent_channels',
                  'num_latents')]
  proc = subprocess.run(argv, capture_output=True, text=True, check=False)
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith('{'):
      return json.loads(line)
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
  return {'m': m, 'batch': batch_size, 'path': path,
          'error': f'exit {proc.returncode}: ' + ' | '.join(tail)}


def format_row(r: dict) -> str:
  cells = [f'{r["m"]:,}', str(r['batch']), r['path']]
  if 'error' in r:
    return '| ' + ' | '.join(cells + [r['error'][:80], '', '', '']) + ' |'
  plan = f'{r["xla_gib"]:.3f}'
  if r.get('plan_only'):
    fits = 'fits' if r['xla_gib'] < FLAGS.budget_gib else 'OOM'
    cells += [f'not run: plan only ({fits})', plan, '-',
              f'{r["compile_s"]:.1f}']
  elif 'step_s' not in r:
    cells += [f'OOM (XLA plans {r["xla_gib"]:.1f} GiB)', plan, '-',
              f'{r["compile_s"]:.1f}']
  else:
    cells += [f'{r["step_s"]:.3f}', plan, f'{r["rss_gib"]:.2f}',
              f'{r["compile_s"]:.1f}']
  return '| ' + ' | '.join(cells) + ' |'


HEADER = ('| M | batch | path | step (s) | XLA plan (GiB) | peak RSS (GiB) '
          '| compile (s) |\n|---:|---:|---|---:|---:|---:|---:|')


def main(argv):
  del argv
  if FLAGS.row:
    m, b, path, *plan = FLAGS.row.split(',')
    print(json.dumps(run_row(int(m), int(b), path, bool(plan))), flush=True)
    return
  sizes = [int(s) for s in FLAGS.sizes]
  if FLAGS.max_m:
    sizes = [m for m in sizes if m <= FLAGS.max_m]
  paths = [p for p in FLAGS.paths if p in PATHS]
  print(f'N={FLAGS.num_latents} D={FLAGS.latent_channels} C=130, '
        f'chunk {FLAGS.chunk_size}, budget {FLAGS.budget_gib} GiB; '
        f'XLA plan = argument + output + temp bytes of the compiled step; '
        f'peak RSS = VmHWM of the row\'s process.', flush=True)
  print(HEADER, flush=True)
  largest_plain = None
  start = time.perf_counter()
  for m in sizes:
    for path in ('plain', 'chunked'):
      if path not in paths:
        continue
      r = _subprocess_row(m, FLAGS.batch_size, path)
      print(format_row(r), flush=True)
      if path == 'plain' and 'step_s' in r:
        largest_plain = m
  if 'plain+remat' in paths and largest_plain:
    r = _subprocess_row(largest_plain, FLAGS.batch_size, 'plain+remat')
    print(format_row(r), flush=True)
  if FLAGS.plan_batch and sizes:
    for path in ('plain', 'chunked'):
      if path in paths:
        print(format_row(_subprocess_row(sizes[-1], FLAGS.plan_batch, path,
                                         plan_only=True)), flush=True)
  print(f'total {time.perf_counter() - start:.0f} s', flush=True)


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  app.run(main)

r"""Runs every point of a config's sweep, locally or on a Cloud TPU VM.

  python -m launch.sweep --config=configs/imagenet.py --sweep=weight_sharing \
      --workdir=/tmp/sweeps/sharing
  python -m launch.sweep --config=configs/imagenet.py --sweep=cross_attends \
      --workdir=gs://BUCKET/sweeps/table6 --tpu=NAME --zone=ZONE [--project=P]
  ... --dry-run   prints exactly the commands, runs nothing.

A sweep is a generator `sweep_NAME()` in the config file yielding dicts of
config overrides ({'optimizer.lr': 1e-3}). Each point runs
`python -m experiments.train --config=CONFIG --workdir=ROOT/POINT
--config.KEY=VALUE ...` in its own workdir, one after another; afterwards a
table of the final metrics (ROOT/POINT/final_metrics.json) is printed.
With --tpu, each command runs on every worker of the TPU VM at once through
`gcloud compute tpus tpu-vm ssh --worker=all` (install the project there first
with launch/tpu_setup.sh); the processes find each other automatically.
Rerunning a sweep resumes unfinished points from their checkpoints.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from typing import Any, Iterable, Optional, Sequence

from absl import app
from absl import flags

from experiments import config_loader


def define_launch_flags() -> None:
  """Flags shared with launch.reproduce (--workdir, --override, --tpu, --zone,
  --project, --remote_dir, --dry_run); defined only by the program that runs,
  so that both modules import each other's functions without side effects."""
  flags.DEFINE_string('workdir', None,
                      'Root directory; one subdirectory per run.')
  flags.DEFINE_multi_string(
      'override', [], 'KEY=VALUE config override added to every run, e.g. '
      '--override=num_train_steps=100.')
  flags.DEFINE_string('tpu', None, 'Cloud TPU VM name: run there.')
  flags.DEFINE_string('zone', None, 'Zone of the TPU VM.')
  flags.DEFINE_string('project', None, 'GCP project of the TPU VM.')
  flags.DEFINE_string(
      'remote_dir', '~/perceiver', 'Project checkout on the TPU workers '
      '(where launch/tpu_setup.sh put it).')
  flags.DEFINE_bool('dry_run', False,
                    'Print the commands instead of running them.')


def define_flags() -> None:
  flags.DEFINE_string('config', None, 'Config file, configs/NAME.py[:ARG].')
  flags.DEFINE_string('sweep', None, 'Sweep name: the generator sweep_NAME() '
                      'in the config file.')
  define_launch_flags()


METRIC_COLUMNS = ('top1', 'top5', 'map', 'loss', 'num_examples')


def load_sweep(config: str, name: str) -> list[dict[str, Any]]:
  """The points of sweep_NAME in the config file (`path[:arg]`)."""
  module = config_loader.load_module(config)
  path = config_loader.config_path(config)
  fn_name = name if name.startswith('sweep_') else f'sweep_{name}'
  known = sorted(n[len('sweep_'):] for n in dir(module)
                 if n.startswith('sweep_'))
  if not hasattr(module, fn_name):
    raise ValueError(f'{path} has no sweep {name!r}; its sweeps: {known}.')
  points = [dict(p) for p in getattr(module, fn_name)()]
  if not points:
    raise ValueError(f'Sweep {name!r} of {path} yields no points.')
  return points


def point_name(index: int, point: dict[str, Any]) -> str:
  """'03_lr=0.001_num_blocks=8': index plus the last key parts."""
  parts = [f'{k.split(".")[-1]}={config_loader.format_value(v)}'
           for k, v in point.items()]
  return re.sub(r'[^A-Za-z0-9._=+-]', '', '_'.join([f'{index:02d}'] + parts))


def train_args(config: str, workdir: str, point: dict[str, Any],
               overrides: Sequence[str] = ()) -> list[str]:
  """The arguments after `python` of one point's training command."""
  args = ['-m', 'experiments.train', f'--config={config}',
          f'--workdir={workdir}']
  args += [f'--config.{kv}' for kv in overrides]
  args += config_loader.override_args(point)
  return args


def tpu_command(args: Sequence[str], *, tpu: str, zone: str,
                project: Optional[str], remote_dir: str) -> list[str]:
  """gcloud ssh that runs the training command on every worker."""
  remote = f'cd {remote_dir} && python3 ' + ' '.join(
      shlex.quote(a) for a in args)
  command = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', tpu,
             f'--zone={zone}']
  if project:
    command.append(f'--project={project}')
  return command + ['--worker=all', f'--command={remote}']


def read_metrics(workdir: str) -> Optional[dict[str, Any]]:
  path = os.path.join(workdir, 'final_metrics.json')
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def table(rows: Iterable[tuple[str, int, Optional[dict[str, Any]]]]) -> str:
  """Plain-text table: point, exit status, then the final metrics."""
  rows = list(rows)
  columns = [c for c in METRIC_COLUMNS
             if any(m and c in m for _, _, m in rows)]
  header = ['point', 'rc', 'step'] + columns
  lines = [header]
  for name, rc, metrics in rows:
    metrics = metrics or {}
    cells = [name, str(rc), str(metrics.get('step', '-'))]
    for c in columns:
      v = metrics.get(c)
      cells.append('-' if v is None else
                   (f'{v:.4f}' if isinstance(v, float) else str(v)))
    lines.append(cells)
  widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
  return '\n'.join('  '.join(cell.ljust(w) for cell, w in zip(line, widths))
                   .rstrip() for line in lines)


def commands(config: str, sweep: str, root: str, *,
             overrides: Sequence[str] = (), tpu: Optional[str] = None,
             zone: Optional[str] = None, project: Optional[str] = None,
             remote_dir: str = '~/perceiver',
             python: str = sys.executable) -> list[tuple[str, str, list[str]]]:
  """(point name, workdir, command) for every point of the sweep."""
  out = []
  for i, point in enumerate(load_sweep(config, sweep)):
    name = point_name(i, point)
    workdir = os.path.join(root, name)
    args = train_args(config, workdir, point, overrides)
    if tpu:
      command = tpu_command(args, tpu=tpu, zone=zone, project=project,
                            remote_dir=remote_dir)
    else:
      command = [python] + args
    out.append((name, workdir, command))
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  FLAGS = flags.FLAGS
  for flag, value in (('--config', FLAGS.config), ('--sweep', FLAGS.sweep),
                      ('--workdir', FLAGS.workdir)):
    if not value:
      sys.exit(f'launch.sweep: error: {flag} is required.')
  if FLAGS.tpu and not FLAGS.zone:
    sys.exit('launch.sweep: error: --tpu needs --zone.')
  try:
    points = commands(FLAGS.config, FLAGS.sweep, FLAGS.workdir,
                      overrides=FLAGS.override, tpu=FLAGS.tpu,
                      zone=FLAGS.zone, project=FLAGS.project,
                      remote_dir=FLAGS.remote_dir)
  except ValueError as e:
    sys.exit(f'launch.sweep: error: {e}')
  if FLAGS.dry_run:
    for _, _, command in points:
      print(shlex.join(command))
    return
  rows = []
  for name, workdir, command in points:
    print(f'[sweep] {name}: {shlex.join(command)}', flush=True)
    rc = subprocess.call(command)
    rows.append((name, rc, read_metrics(workdir)))
    if rc in (130, 143):  # The point was interrupted: stop the sweep too.
      break
  print(table(rows), flush=True)
  if any(rc for _, rc, _ in rows):
    sys.exit(1)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flags, also accepting the spelling --dry-run."""
  return flags.FLAGS([a.replace('--dry-run', '--dry_run', 1)
                      if a.startswith('--dry-run') else a for a in argv])


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=_parse_flags)

r"""Reproduces the paper's Tables 1-7 (launch/tables.py), one or all.

  # CPU scale (the README's main job is Table 2 on Fashion-MNIST; Table 3
  # needs the drums set, Table 4 the KiCad point set: experiments/data/prepare.py):
  python -m launch.reproduce --table=2 --scale=local --workdir=workdirs/table2
  python -m launch.reproduce --table=4 --scale=local --jobs=2
  # Every table, one REPORT.md with each table, figure and finding:
  python -m launch.reproduce --table=all --scale=local --jobs=2
  # Paper scale: list the runs with parameters and FLOPs, or launch them
  # (locally one after another, or on every worker of a Cloud TPU VM):
  python -m launch.reproduce --table=6 --scale=paper --dry-run
  python -m launch.reproduce --table=6 --scale=paper --workdir=gs://B/t6 \
      --tpu=NAME --zone=ZONE

Every cell trains with `python -m experiments.train` in its own workdir
(ROOT/ROW_COLUMN), so an interrupted reproduction resumes where it stopped.
The table (paper's number, this run's number, parameters and FLOPs per example
of the paper-size model) is printed and written to ROOT/table_N.md; at local
scale also its figure (ROOT/table_N.png, launch/report.py) and one line
saying whether the paper's finding holds at this scale. The exit status is 1
when a cell that should have a score has none.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from typing import Any, Optional, Sequence

from absl import app
from absl import flags

from experiments import config_loader
from experiments.tools import model_summary
from launch import report
from launch import sweep
from launch import tables as tables_lib


def define_flags() -> None:
  """The command line's flags (only when this module is the program):
  --table, --scale, --rows, --jobs, and launch.sweep's --workdir, --override,
  --dry_run, --tpu, --zone, --project and --remote_dir, meaning the same."""
  flags.DEFINE_string('table', None, "Paper table, 1-7, or 'all' (every "
                      'table, one REPORT.md).')
  flags.DEFINE_enum('scale', 'local', ['local', 'paper'],
                    'local: CPU-scale stand-ins; paper: full scale.')
  flags.DEFINE_list('rows', None, 'Only these rows (by name).')
  flags.DEFINE_integer('jobs', 1, 'Runs trained at the same time.')
  sweep.define_launch_flags()


@dataclasses.dataclass
class Reproduction:
  """What a call of `reproduce` did: the markdown table, every cell's score
  (None: trained without a result, or not run), and the cells that should
  have produced a score but did not."""
  text: str
  results: dict[str, Optional[float]]
  missing: list[str]


def model_facts(run: tables_lib.Run) -> dict[str, float]:
  """Parameters and FLOPs per example of a run's paper-size model."""
  s = model_summary.summarize(config_loader.load(run.config, run.overrides))
  return {'params': s['params'], 'flops': s['flops']}


def cell_name(row: tables_lib.Row, column: str) -> str:
  return f'{row.name}_{column.replace("+", "_").replace("-", "")}'


def run_args(run: tables_lib.Run, workdir: str, scale: str,
             extra: Sequence[str] = ()) -> Optional[list[str]]:
  """`python` arguments that train (and evaluate) one cell, or None."""
  config = run.config if scale == 'paper' else run.local_config
  if config is None:
    return None
  overrides = run.overrides if scale == 'paper' else run.local_overrides
  point = dict(overrides)
  if run.eval_split:
    point['eval_split'] = run.eval_split
  return sweep.train_args(config, workdir, point, extra)


def _stream(process: subprocess.Popen, prefix: str) -> None:
  for line in process.stdout:
    print(f'[{prefix}] {line}', end='', flush=True)


def core_groups(jobs: int) -> list[set[int]]:
  """This process's CPU cores split into `jobs` disjoint groups.

  Small CPU-scale models use several cores poorly, so runs pinned to a core
  each train more examples per second together than one run on all cores
  (benchmarks/RESULTS.md).
  """
  cores = sorted(os.sched_getaffinity(0))
  if jobs > len(cores):
    raise ValueError(f'--jobs={jobs} exceeds the {len(cores)} available '
                     'cores.')
  return [set(cores[i::jobs]) for i in range(jobs)]


def train_cells(cells: list[tuple[str, str, list[str]]], jobs: int
                ) -> dict[str, int]:
  """Runs the training commands, `jobs` at a time, each job pinned to its own
  cores when jobs > 1; returns their exit codes."""
  groups = core_groups(jobs) if jobs > 1 else [None]
  codes, running, queue = {}, [], list(cells)
  while queue or running:
    while queue and len(running) < jobs:
      name, _, command = queue.pop(0)
      busy = [cores for _, _, _, cores in running]
      cores = next(g for g in groups if g not in busy)
      print(f'[reproduce] {name}: {shlex.join(command)}'
            + (f'  (cores {sorted(cores)})' if cores else ''), flush=True)
      process = subprocess.Popen(command, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
      if cores:  # pinned before the child has started any thread
        os.sched_setaffinity(process.pid, cores)
      thread = threading.Thread(target=_stream, args=(process, name),
                                daemon=True)
      thread.start()
      running.append((name, process, thread, cores))
    time.sleep(0.2)
    for item in list(running):
      name, process, thread, _ = item
      if process.poll() is not None:
        thread.join()
        codes[name] = process.returncode
        running.remove(item)
  return codes


def _score(metrics: Optional[dict[str, Any]], metric: str) -> Optional[float]:
  if not metrics or metrics.get(metric) is None:
    return None
  return 100.0 * float(metrics[metric])


def reference_scores(table: tables_lib.Table) -> dict[str, Optional[float]]:
  """Each local reference's score (percent), computed from the data of its
  config; None where the data is not prepared (the reason is printed)."""
  scores = {}
  for ref in table.references:
    module_name, _, attr = ref.function.rpartition('.')
    function = getattr(importlib.import_module(module_name), attr)
    try:
      scores[ref.label] = 100.0 * float(
          function(config_loader.load(ref.config)))
    except (OSError, ValueError) as e:
      print(f'[reproduce] {ref.label}: not computed: {e}', flush=True)
      scores[ref.label] = None
  return scores


def markdown(table: tables_lib.Table, rows, facts, results, scale: str,
             references: Optional[dict[str, Optional[float]]] = None) -> str:
  """The table: per column the paper's number and this run's (for raw /
  permuted tables also the change under permutation), then the local
  references (e.g. the class-prior mAP) when given."""
  paired = table.columns == ('raw', 'permuted')
  head = ['Model']
  for c in table.columns:
    head += [f'{c}: paper', f'{c}: this run ({scale})']
  if paired:
    head += ['permuted - raw: paper', 'permuted - raw: this run']
  head += ['Params (paper size)', 'GFLOPs / example (paper size)']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  fmt = lambda v: '—' if v is None else f'{v:.1f}'
  diff = lambda a, b: None if a is None or b is None else b - a
  for row in rows:
    cells, got = [row.label], []
    for column, run in zip(table.columns, row.runs):
      if run is None:
        cells += ['—', 'not reproduced']
        got.append(None)
        continue
      value = results.get(cell_name(row, column))
      got.append(value)
      cells += [fmt(run.paper), 'not run' if value is None and
                run_args(run, '', scale) is None else fmt(value)]
    if paired:
      cells += [fmt(diff(*(r.paper for r in row.runs))), fmt(diff(*got))]
    f = facts.get(row.name)
    cells += [f'{f["params"] / 1e6:.2f}M' if f else '—',
              f'{f["flops"] / 1e9:.1f}' if f else '—']
    lines.append('| ' + ' | '.join(cells) + ' |')
  for ref in table.references if references is not None else ():
    cells = [ref.label]
    for column in table.columns:
      value = references.get(ref.label) if column == ref.column else None
      cells += ['—', fmt(value) if column == ref.column else '—']
    cells += ['—'] * (len(head) - len(cells))
    lines.append('| ' + ' | '.join(cells) + ' |')
  where = (f' — this run: CPU-scale stand-ins on {table.local_data}'
           if scale == 'local' and table.local_data else '')
  text = f'Table {table.number}: {table.title}{where}\n\n' + '\n'.join(lines)
  return text + (f'\n\n{table.note}' if table.note else '')


def _read_scores(path: str) -> dict[str, Optional[float]]:
  """Scores saved by an earlier invocation ({} when there are none)."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def config_key(run: tables_lib.Run, scale: str, overrides=()) -> str:
  """The fully resolved config a cell trains and evaluates, as text: two
  cells with the same key (e.g. Table 1's and Table 2's raw Perceiver) are
  the same experiment."""
  config = run.config if scale == 'paper' else run.local_config
  point = list(run.overrides if scale == 'paper' else run.local_overrides)
  if run.eval_split:
    point.append(('eval_split', run.eval_split))
  loaded = config_loader.load(config, point + [
      tuple(o.split('=', 1)) for o in overrides])
  return json.dumps(loaded.to_dict(), sort_keys=True, default=str)


@dataclasses.dataclass
class Cell:
  """One cell to train: its name in the table, workdir and Run."""
  name: str
  workdir: str
  run: tables_lib.Run
  job: str = ''  # unique name of its training job (default: name)

  def __post_init__(self):
    self.job = self.job or self.name


def _select(number: int, rows: Optional[Sequence[str]]):
  """(table, its selected rows); unknown tables or rows are errors."""
  if number not in tables_lib.TABLES:
    raise ValueError(f'--table must be one of {sorted(tables_lib.TABLES)}.')
  table = tables_lib.TABLES[number]
  known = [r.name for r in table.rows]
  if rows:
    unknown = sorted(set(rows) - set(known))
    if unknown:
      raise ValueError(f'Table {number} has no rows {unknown}; rows: {known}.')
  return table, [r for r in table.rows if not rows or r.name in rows]


def plan_cells(table: tables_lib.Table, selected, root: str, scale: str
               ) -> list[Cell]:
  """The cells of the selected rows that have a config at `scale`."""
  cells = []
  for row in selected:
    for column, run in zip(table.columns, row.runs):
      if run is None or run_args(run, '', scale) is None:
        continue
      # A train-split evaluation reuses the trained run of the row's first
      # column: it resumes at the last step and only evaluates.
      cell_dir = os.path.join(root, cell_name(row, table.columns[0])
                              if run.eval_split else cell_name(row, column))
      cells.append(Cell(cell_name(row, column), cell_dir, run))
  return cells


def _command(cell: Cell, scale: str, overrides, *, tpu=None, zone=None,
             project=None, remote_dir: str = '~/perceiver') -> list[str]:
  args = run_args(cell.run, cell.workdir, scale, overrides)
  if tpu:
    return sweep.tpu_command(args, tpu=tpu, zone=zone, project=project,
                             remote_dir=remote_dir)
  return [sys.executable] + args


def _train_and_score(cells: list[Cell], command, jobs: int, record) -> None:
  """Trains the cells, `jobs` at a time (train-split evaluations after the
  runs they evaluate); `command(cell)` is its command line, and
  `record(cell, score)` is called for each that finished (its score None
  when it has none). A run that failed is not recorded: the next invocation
  trains it again (it resumes from its last checkpoint)."""
  for group in ([c for c in cells if not c.run.eval_split],
                [c for c in cells if c.run.eval_split]):
    codes = train_cells([(c.job, c.workdir, command(c)) for c in group],
                        jobs)
    for cell in group:
      if codes[cell.job] == 0:
        record(cell, _score(sweep.read_metrics(cell.workdir),
                            cell.run.metric))
      else:
        print(f'[reproduce] {cell.job} failed (exit status '
              f'{codes[cell.job]}); the next invocation trains it again.',
              flush=True)


def _finish(number: int, selected, root: str, scale: str, results,
            elapsed: Optional[float], cells: list[Cell]) -> Reproduction:
  """Renders a trained table: markdown (with references, findings and the
  figure at local scale), written to ROOT/table_N.md."""
  table = tables_lib.TABLES[number]
  facts = _facts(selected)
  references = reference_scores(table) if scale == 'local' else None
  text = markdown(table, selected, facts, results, scale, references)
  if scale == 'local':
    text += '\n\n' + '\n'.join(
        r.line() for r in report.readings(number, results, references))
    report.figure(table, selected, results,
                  os.path.join(root, f'table_{number}.png'), cell_name)
  if elapsed is not None:  # None: trained in reproduce_all's queue
    text += (f'\n\nTrained and evaluated in {elapsed / 60:.1f} min '
             f'(this invocation; set-up excluded).')
  with open(os.path.join(root, f'table_{number}.md'), 'w') as f:
    f.write(text + '\n')
  missing = [c.name for c in cells if results.get(c.name) is None]
  if missing:
    text += f'\n\nRuns without a result: {missing}'
  return Reproduction(text, results, missing)


def _facts(selected) -> dict[str, dict[str, float]]:
  facts = {}
  for row in selected:
    run = next((r for r in row.runs if r is not None), None)
    if run is not None:
      facts[row.name] = model_facts(run)
  return facts


def _save(path: str, scores) -> None:
  with open(path, 'w') as f:
    json.dump(scores, f, indent=2)


def reproduce(number: int, *, scale: str, workdir: Optional[str],
              rows: Optional[Sequence[str]] = None, overrides=(),
              jobs: int = 1, dry_run: bool = False, tpu=None, zone=None,
              project=None, remote_dir: str = '~/perceiver') -> Reproduction:
  """Trains (or lists) a table's runs; returns the table and the scores.
  Cells scored by an earlier invocation (ROOT/results.json) are not trained
  again."""
  table, selected = _select(number, rows)
  root = workdir or f'workdirs/table{number}_{scale}'
  cells = plan_cells(table, selected, root, scale)
  launch = dict(tpu=tpu, zone=zone, project=project, remote_dir=remote_dir)
  if dry_run:
    text = markdown(table, selected, _facts(selected), {}, scale)
    text += '\n\nCommands:\n' + '\n'.join(
        shlex.join(_command(c, scale, overrides, **launch)) for c in cells)
    return Reproduction(text, {}, [])
  os.makedirs(root, exist_ok=True)
  results_path = os.path.join(root, 'results.json')
  results = _read_scores(results_path)
  start = time.time()

  def record(cell, score):
    results[cell.name] = score
    _save(results_path, results)

  _train_and_score([c for c in cells if c.name not in results],
                   lambda c: _command(c, scale, overrides, **launch), jobs,
                   record)
  return _finish(number, selected, root, scale, results,
                 time.time() - start, cells)


# --table=all trains the tables' cells in one queue, in this order of tables:
# those with the longest single runs first (the KiCad Transformer, the drums
# Perceivers), so that the job slots stay busy until the end.
ALL_ORDER = (4, 3, 2, 1, 6, 5, 7)


@dataclasses.dataclass
class _TablePlan:
  """A table's part of `reproduce_all`: its rows, root, scores and cells."""
  selected: list[tables_lib.Row]
  root: str
  results: dict[str, Optional[float]]
  cells: list[Cell]

  def save(self) -> None:
    _save(os.path.join(self.root, 'results.json'), self.results)


def reproduce_all(*, scale: str, workdir: Optional[str], overrides=(),
                  jobs: int = 1) -> Reproduction:
  """Every table (each in ROOT/table_N): all cells in one queue of `jobs`
  slots, an experiment shared by several tables (the same resolved config,
  `config_key`) trained once; writes ROOT/REPORT.md with each table, its
  figure and its finding's reading. Cells scored by an earlier invocation
  are not trained again (ROOT/shared_results.json: config key -> score and
  the workdir that trained it)."""
  root = workdir or f'workdirs/report_{scale}'
  os.makedirs(root, exist_ok=True)
  shared_path = os.path.join(root, 'shared_results.json')
  shared = _read_scores(shared_path)
  start = time.time()
  plans: dict[int, _TablePlan] = {}
  queue = []  # config keys to train, in ALL_ORDER
  trainer: dict[str, tuple[Cell, list]] = {}  # key -> queued cell, sharers
  keys: dict[int, str] = {}  # id(cell) -> config_key
  for number in ALL_ORDER:
    table, selected = _select(number, None)
    table_root = os.path.join(root, f'table_{number}')
    os.makedirs(table_root, exist_ok=True)
    plan = plans[number] = _TablePlan(
        selected, table_root,
        _read_scores(os.path.join(table_root, 'results.json')),
        plan_cells(table, selected, table_root, scale))
    trained_in = {}  # cell name -> the workdir that trains its experiment
    for cell in plan.cells:
      if cell.run.eval_split:  # evaluates the run that trained its row
        first = os.path.basename(cell.workdir)
        cell.workdir = trained_in.get(first, cell.workdir)
      key = keys[id(cell)] = config_key(cell.run, scale, overrides)
      if key in trainer:
        trained_in[cell.name] = trainer[key][0].workdir
      elif key in shared:
        trained_in[cell.name] = shared[key]['workdir']
      else:
        trained_in[cell.name] = cell.workdir
      if cell.name in plan.results:
        continue
      label = f'[reproduce] table {number} {cell.name}: the same experiment'
      if shared.get(key, {}).get('score') is not None:
        plan.results[cell.name] = shared[key]['score']
        print(f'{label} was scored before ({shared[key]["score"]:.1f})',
              flush=True)
      elif key in trainer:
        trainer[key][1].append(plan)
        print(f'{label} as {trainer[key][0].workdir}, trained once',
              flush=True)
      else:
        cell.job = f'table_{number}/{cell.name}'  # names repeat across tables
        trainer[key] = (cell, [plan])
        queue.append(key)
    plan.save()

  def record(cell: Cell, score: Optional[float]) -> None:
    key = keys[id(cell)]
    for plan in trainer[key][1]:
      for c in plan.cells:
        if keys.get(id(c)) == key:
          plan.results[c.name] = score
      plan.save()
    if score is not None:
      shared[key] = dict(score=score, workdir=cell.workdir)
      _save(shared_path, shared)

  _train_and_score([trainer[k][0] for k in queue],
                   lambda c: _command(c, scale, overrides), jobs, record)
  sections, results, missing = [], {}, []
  for number in sorted(plans):
    plan = plans[number]
    result = _finish(number, plan.selected, plan.root, scale, plan.results,
                     None, plan.cells)
    results.update({f'table_{number}/{k}': v
                    for k, v in result.results.items()})
    missing += [f'table_{number}/{n}' for n in result.missing]
    figure = f'table_{number}/table_{number}.png'
    sections.append(f'## Table {number}\n\n{result.text}\n\n'
                    f'![Table {number}]({figure})')
  elapsed = time.time() - start
  text = (f'# The paper\'s tables at {scale} scale\n\nEvery table of the '
          'paper with its numbers beside this run\'s, and whether its '
          'finding holds here. Written by `python -m launch.reproduce '
          f'--table=all --scale={scale}` in {elapsed / 60:.1f} min (this '
          'invocation: every table\'s cells trained in one queue, '
          f'{jobs} at a time; runs finished earlier were not repeated).\n\n'
          + '\n\n'.join(sections) + '\n')
  with open(os.path.join(root, 'REPORT.md'), 'w') as f:
    f.write(text)
  return Reproduction(text, results, missing)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  FLAGS = flags.FLAGS
  if FLAGS.table is None:
    sys.exit("launch.reproduce: error: --table is required (1-7 or 'all').")
  if FLAGS.tpu and not FLAGS.zone:
    sys.exit('launch.reproduce: error: --tpu needs --zone.')
  try:
    if FLAGS.table == 'all':
      if FLAGS.dry_run or FLAGS.tpu or FLAGS.rows:
        raise ValueError('--table=all takes no --dry_run, --tpu or --rows.')
      result = reproduce_all(scale=FLAGS.scale, workdir=FLAGS.workdir,
                             overrides=FLAGS.override, jobs=FLAGS.jobs)
    else:
      if not FLAGS.table.isdigit():
        raise ValueError(f"--table must be 1-7 or 'all', not {FLAGS.table!r}.")
      result = reproduce(int(FLAGS.table), scale=FLAGS.scale,
                         workdir=FLAGS.workdir, rows=FLAGS.rows,
                         overrides=FLAGS.override, jobs=FLAGS.jobs,
                         dry_run=FLAGS.dry_run, tpu=FLAGS.tpu,
                         zone=FLAGS.zone, project=FLAGS.project,
                         remote_dir=FLAGS.remote_dir)
  except ValueError as e:
    sys.exit(f'launch.reproduce: error: {e}')
  print(result.text, flush=True)
  if result.missing:
    sys.exit(1)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=lambda argv: flags.FLAGS(
      [a.replace('--dry-run', '--dry_run', 1) for a in argv]))

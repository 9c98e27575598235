"""Scalars to three places: the log, TensorBoard event files and a JSONL file.

Only process 0 writes files (`enabled=False` elsewhere). Files in the workdir:
  metrics.jsonl      one JSON object per write: {"step": s, name: value, ...}
  tensorboard/       a TensorBoard event file, one scalar per name, written
                     without TensorFlow (experiments/event_file.py)

A resumed run passes `resume_from=step` (the restored step, 0 for a fresh
start): metrics.jsonl then loses the lines of later steps (and a line torn by
a kill), and a scalar that the kept lines already hold for a step is not
written again, so each (step, name) appears once.
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping, Optional

from absl import logging
from etils import epath

from experiments import event_file

JSONL_NAME = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'


def _plain(value):
  value = float(value) if not isinstance(value, (int, str)) else value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/inf; keep them readable.
  return value


class MetricWriter:
  """Writes dicts of scalars against a step."""

  def __init__(self, workdir: str, *, enabled: bool = True,
               tensorboard: bool = True, resume_from: Optional[int] = None):
    self._enabled = enabled
    self._jsonl = None
    self._tb = None
    self._recorded: set[tuple[int, str]] = set()
    if not enabled:
      return
    workdir = epath.Path(workdir)  # Local paths and gs:// alike.
    workdir.mkdir(parents=True, exist_ok=True)
    if resume_from is not None:
      self._keep_until(workdir / JSONL_NAME, resume_from)
    self._jsonl = (workdir / JSONL_NAME).open('a')
    if tensorboard:
      self._tb = event_file.EventFileWriter(
          os.fspath(workdir / TENSORBOARD_DIR))

  def _keep_until(self, path: epath.Path, step: int) -> None:
    """Drops the lines of steps after `step` (and unreadable ones);
    remembers what the kept lines record."""
    if not path.exists():
      return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
      try:
        record = json.loads(line)
        if int(record['step']) > step:
          continue
      except (ValueError, KeyError, TypeError):
        continue
      kept.append(line)
      self._recorded.update((int(record['step']), k) for k in record)
    if len(kept) != len(lines):
      logging.info('%s: dropped %d lines past the restored step %d.', path,
                   len(lines) - len(kept), step)
      tmp = path.parent / (path.name + '.tmp')
      tmp.write_text(''.join(line + '\n' for line in kept))
      tmp.replace(path)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._enabled:
      return
    scalars = {k: v for k, v in scalars.items()
               if (int(step), k) not in self._recorded}
    if not scalars:
      return
    record = {'step': int(step)}
    record.update({k: _plain(v) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      for name, value in scalars.items():
        self._tb.write_scalar(name, float(value), int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def format_duration(seconds: float) -> str:
  """'1h02m', '3m05s', '42s'."""
  if not math.isfinite(seconds):
    return '?'
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f'{hours}h{minutes:02d}m'
  if minutes:
    return f'{minutes}m{secs:02d}s'
  return f'{secs}s'


def progress_line(step: int, total_steps: int,
                  scalars: Mapping[str, float]) -> str:
  """The line logged every log_every_steps steps."""
  return (f'step {step}/{total_steps}  loss {scalars["loss"]:.4f}  '
          f'lr {scalars["lr"]:.3g}  '
          f'examples/s {scalars["examples_per_sec"]:.1f}  '
          f'steps/s {scalars["steps_per_sec"]:.3f}  '
          f'time left {format_duration(scalars["seconds_left"])}')


def log_scalars(prefix: str, step: int, scalars: Mapping[str, float]) -> None:
  text = '  '.join(f'{k} {v:.5g}' if isinstance(v, float) else f'{k} {v}'
                   for k, v in scalars.items())
  logging.info('%s step %d: %s', prefix, step, text)

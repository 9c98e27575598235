"""Orbax checkpoints of the train state in `workdir/checkpoints`, verified;
the one restore function of the runner, evaluation and figures; and the stop
requests (SIGTERM / SIGINT) that trigger a last save.

What stays true:
  Atomic     orbax writes a step into a temporary directory and renames it
             when complete, so a run killed mid-save never leaves a half
             checkpoint under a step's name.
  Committed  `save` is synchronous: `Checkpoint of step N` is logged only
             after orbax committed the step and its checksum file is
             written; a save that fails raises `CheckpointError` at once,
             with one line naming the cause, the step, the directory and the
             intact checkpoints. Before a save the free space is compared
             with the size of the newest checkpoint.
  Verified   after the commit, process 0 writes `SHA256SUMS` (sha256sum's
             format: one `HASH  PATH` line per file of the step) into the
             step's directory. `restore` recomputes it first: a changed,
             missing or extra file, or a missing `SHA256SUMS` while other
             checkpoints have one (a run stopped between commit and
             checksum), makes the checkpoint damaged. Directories written
             before checksums existed (none has one) restore unverified,
             with a warning.
  Fallback   `restore` tries the checkpoints newest first, logs one line for
             each damaged one (or one that orbax cannot read) and returns the
             newest intact one. The runner moves damaged checkpoints to
             workdir/damaged_checkpoints/ so that their steps can be saved
             again.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import time
from typing import Any, Optional

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp

CHECKSUM_NAME = 'SHA256SUMS'
DAMAGED_DIR = 'damaged_checkpoints'  # beside checkpoints/, in the workdir
_TMP_MARK = '.orbax-checkpoint-tmp'
_CAUSES = {errno.ENOSPC: 'no space left on device',
           errno.EDQUOT: 'disk quota exceeded',
           errno.EACCES: 'permission denied',
           errno.EPERM: 'permission denied',
           errno.EROFS: 'read-only file system'}


class CheckpointError(RuntimeError):
  """A checkpoint could not be written, or the one asked for is damaged.
  The message is one line."""


def quiet_orbax_logs() -> None:
  """Keeps orbax's records out of the log except warnings, without their
  tracebacks: its INFO chatter is several lines per checkpoint, and its
  errors reach the caller as exceptions that are reported in one line."""
  def keep(record) -> bool:
    if f'{os.sep}orbax{os.sep}' not in record.pathname:
      return True
    if record.levelno != logging.converter.STANDARD_WARNING:
      return False
    record.exc_info, record.exc_text = None, None
    return True
  logging.get_absl_handler().addFilter(keep)


def _first_line(text: str) -> str:
  lines = [line.strip() for line in str(text).splitlines() if line.strip()]
  return lines[0] if lines else 'unknown error'


def describe_error(error: BaseException) -> str:
  """'no space left on device', 'permission denied', ... for an OSError
  anywhere in the exception's chain (orbax and tensorstore wrap them);
  otherwise the exception's first line."""
  seen, current = set(), error
  while current is not None and id(current) not in seen:
    seen.add(id(current))
    if isinstance(current, OSError) and current.errno is not None:
      return _CAUSES.get(current.errno,
                         (current.strerror or str(current)).lower())
    current = current.__cause__ or current.__context__
  text = str(error)
  for code, cause in _CAUSES.items():  # tensorstore: the OS text only
    if os.strerror(code).lower() in text.lower():
      return cause
  return _first_line(text) if text.strip() else type(error).__name__


def _files(directory: epath.Path) -> list[epath.Path]:
  """Every file under `directory`, recursively, sorted."""
  found = []
  for path in directory.iterdir():
    if path.is_dir():
      found.extend(_files(path))
    else:
      found.append(path)
  return sorted(found)


def _sha256(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open('rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def checksums(step_dir: epath.Path) -> dict[str, str]:
  """{path relative to step_dir: sha256} of the step's files but
  SHA256SUMS."""
  own = {step_dir / CHECKSUM_NAME, step_dir / (CHECKSUM_NAME + '.tmp')}
  return {os.fspath(p.relative_to(step_dir)): _sha256(p)
          for p in _files(step_dir) if p not in own}


def write_checksums(step_dir: epath.Path) -> None:
  """Writes step_dir/SHA256SUMS (via a temporary file and a rename)."""
  text = ''.join(f'{digest}  {name}\n'
                 for name, digest in sorted(checksums(step_dir).items()))
  tmp = step_dir / (CHECKSUM_NAME + '.tmp')
  tmp.write_text(text)
  tmp.replace(step_dir / CHECKSUM_NAME)


def verify(step_dir: epath.Path) -> Optional[str]:
  """None if the step's files match its SHA256SUMS, else what is wrong."""
  listed = step_dir / CHECKSUM_NAME
  if not listed.exists():
    return (f'it has no {CHECKSUM_NAME} (the run stopped between committing '
            'it and writing its checksum)')
  want = {}
  for line in listed.read_text().splitlines():
    digest, _, name = line.partition('  ')
    want[name] = digest
  try:
    have = checksums(step_dir)
  except OSError as e:
    return f'its files cannot be read ({describe_error(e)})'
  for name in sorted(want):
    if name not in have:
      return f'{name} is missing'
    if have[name] != want[name]:
      return f'{name} does not match its checksum'
  extra = sorted(set(have) - set(want))
  if extra:
    return f'{extra[0]} is not in its {CHECKSUM_NAME}'
  return None


class Checkpointer:
  """Saves and restores a pytree of jax Arrays under `directory`
  (see the module docstring for what stays true)."""

  def __init__(self, directory: str, *, max_to_keep: Optional[int] = 3,
               read_only: bool = False):
    self.directory = (directory if '://' in directory
                      else os.path.abspath(directory))
    self._path = epath.Path(self.directory)
    self._primary = jax.process_index() == 0
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=not read_only,
            read_only=read_only, enable_async_checkpointing=False))

  def step_dir(self, step: int) -> epath.Path:
    return self._path / str(step)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def intact_steps(self) -> list[int]:
    """Committed steps that have their checksum file (verified when
    written; `restore` verifies again)."""
    return [s for s in self.all_steps()
            if (self.step_dir(s) / CHECKSUM_NAME).exists()]

  def size_of(self, step: int) -> int:
    """Bytes in the files of checkpoint `step`."""
    return sum(p.stat().length for p in _files(self.step_dir(step)))

  def _kept(self, exclude: Optional[int] = None) -> str:
    steps = [s for s in self.intact_steps() if s != exclude]
    if not steps:
      return 'no earlier checkpoint exists'
    names = ', '.join(str(s) for s in steps)
    return (f'checkpoint {names} is intact' if len(steps) == 1 else
            f'checkpoints {names} are intact')

  def check_space(self, step: int) -> None:
    """CheckpointError if the device holding the directory has less free
    space than the newest checkpoint takes (local directories only)."""
    if '://' in self.directory:
      return
    steps = self.intact_steps() or self.all_steps()
    if not steps:
      return
    need = self.size_of(steps[-1])
    free = shutil.disk_usage(self.directory).free
    if free < need:
      raise CheckpointError(
          f'no space left on device for checkpoint {step} in '
          f'{self.directory} (it needs about {need / 2**20:.1f} MiB, '
          f'{free / 2**20:.1f} MiB are free); {self._kept()}.')

  def save(self, step: int, tree: Any) -> None:
    """Writes checkpoint `step`, commits it and its checksum, then logs.
    CheckpointError (one line) if any of that fails; the partial files of
    the step are removed."""
    self.check_space(step)
    try:
      self._manager.save(step, args=ocp.args.PyTreeSave(tree), force=True)
      self._manager.wait_until_finished()
      if self._primary:
        write_checksums(self.step_dir(step))
    except Exception as e:  # pylint: disable=broad-exception-caught
      self._discard(step)
      raise CheckpointError(
          f'{describe_error(e)} while writing checkpoint {step} to '
          f'{self.directory}; {self._kept(exclude=step)}.') from e
    logging.info('Checkpoint of step %d -> %s (committed, %s written).',
                 step, self.directory, CHECKSUM_NAME)

  def _discard(self, step: int) -> None:
    """Removes what a failed save of `step` left (best effort)."""
    if not self._primary:
      return
    for path in self._path.glob(f'{step}{_TMP_MARK}*'):
      shutil.rmtree(path, ignore_errors=True)
    final = self.step_dir(step)
    if final.exists() and not (final / CHECKSUM_NAME).exists():
      shutil.rmtree(final, ignore_errors=True)
    self._manager.reload()

  def set_aside(self, step: int) -> str:
    """Moves a damaged checkpoint to workdir/damaged_checkpoints/; returns
    where it went."""
    target = self._path.parent / DAMAGED_DIR / f'{step}-{int(time.time())}'
    if self._primary:
      target.parent.mkdir(parents=True, exist_ok=True)
      self.step_dir(step).rename(target)
    self._manager.reload()
    return os.fspath(target)

  def read(self, step: int, abstract_tree: Any, *, partial: bool) -> Any:
    """Orbax's restore of `step` into the shardings and dtypes of
    `abstract_tree`; with `partial`, only the subtrees it names."""
    return self._manager.restore(step, args=ocp.args.PyTreeRestore(
        item=abstract_tree,
        restore_args=ocp.checkpoint_utils.construct_restore_args(
            abstract_tree),
        partial_restore=partial))

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def restore(checkpointer: Checkpointer, abstract_tree: dict[str, Any], *,
            step: Optional[int] = None, partial: bool = False,
            set_aside: bool = False) -> tuple[Optional[int], Any]:
  """(step, tree) of the newest intact checkpoint, or of exactly `step`;
  (None, None) if there is none.

  `abstract_tree` holds jax.ShapeDtypeStruct leaves with shardings; with
  `partial`, it may name only some top-level entries (say params and model
  state: no optimizer needed). A damaged checkpoint is logged in one line
  and skipped (moved aside with `set_aside`); a damaged `step` asked for by
  number raises CheckpointError.
  """
  steps = checkpointer.all_steps()
  checked = bool(checkpointer.intact_steps())
  if not checked and steps:
    logging.warning('No checkpoint in %s has a %s (written before checksums '
                    'were kept): restoring without verification.',
                    checkpointer.directory, CHECKSUM_NAME)
  if step is not None and step not in steps:
    raise CheckpointError(f'no checkpoint of step {step} in '
                          f'{checkpointer.directory} (there are: '
                          f'{", ".join(map(str, steps)) or "none"}).')
  candidates = [step] if step is not None else sorted(steps, reverse=True)
  skipped = []
  for candidate in candidates:
    problem = verify(checkpointer.step_dir(candidate)) if checked else None
    if problem is None:
      try:
        tree = checkpointer.read(candidate, abstract_tree, partial=partial)
      except Exception as e:  # pylint: disable=broad-exception-caught
        problem = f'orbax cannot restore it: {describe_error(e)}'
    if problem is None:
      if skipped:
        logging.warning('Falling back to checkpoint %d in %s, the newest '
                        'intact one.', candidate, checkpointer.directory)
      return candidate, tree
    line = (f'checkpoint {candidate} in {checkpointer.directory} is '
            f'damaged: {problem}')
    if step is not None:
      raise CheckpointError(line + '.')
    moved = f'; moved to {checkpointer.set_aside(candidate)}' if set_aside \
        else '; skipped'
    logging.warning('%s%s.', line, moved)
    skipped.append(candidate)
  if skipped:
    logging.warning('No intact checkpoint in %s.', checkpointer.directory)
  return None, None


def abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (with sharding) describing a tree of jax Arrays."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      tree)


class StopRequest:
  """Turns SIGTERM / SIGINT into a request to stop after the current step.

  Single process: a Python handler sets a flag that the loop reads after
  every step. Several processes must stop at the same step, so there SIGTERM
  goes to jax's preemption notifier (installed by jax.distributed) and
  `should_stop(step)` asks jax for the agreed sync point; SIGINT is turned
  into a SIGTERM to this process.
  """

  def __init__(self, multi_process: bool):
    self._multi = multi_process
    self.signum: Optional[int] = None
    self._previous = {}
    signals = [signal.SIGINT] if multi_process else [signal.SIGTERM,
                                                      signal.SIGINT]
    for signum in signals:
      self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # A second Ctrl-C: stop without saving.
    logging.warning('Received signal %d: stopping after this step.', signum)
    if self._multi:
      self.signum = signum
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      self.signum = signum

  def should_stop(self, step: int) -> bool:
    if not self._multi:
      return self.signum is not None
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if multihost_utils.reached_preemption_sync_point(step):
      self.signum = self.signum or signal.SIGTERM
      return True
    return False

  def restore_handlers(self) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

"""Orbax checkpoints of the train state in `workdir/checkpoints`, and the
stop requests (SIGTERM / SIGINT) that trigger a last save.

Orbax writes each checkpoint to a temporary directory and renames it when
complete, so a run killed mid-save never leaves a half checkpoint that
`latest_step` would pick up.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Optional

from absl import logging
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores a pytree of jax Arrays under `directory`."""

  def __init__(self, directory: str, *, max_to_keep: Optional[int] = 3):
    self.directory = (directory if '://' in directory
                      else os.path.abspath(directory))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             create=True))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, tree: Any) -> None:
    """Starts an asynchronous save (arrays are copied off-device first)."""
    self._manager.save(step, args=ocp.args.StandardSave(tree), force=True)
    logging.info('Checkpoint of step %d -> %s', step, self.directory)

  def restore(self, abstract_tree: Any, step: Optional[int] = None) -> Any:
    """The tree of `step` (default latest), with the shardings and dtypes of
    `abstract_tree` (jax.ShapeDtypeStruct leaves)."""
    step = self.latest_step() if step is None else step
    return self._manager.restore(
        step, args=ocp.args.StandardRestore(abstract_tree))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


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

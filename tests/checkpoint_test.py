"""Checkpoints in-process: a failed save is one line at once (ENOSPC,
permissions, too little free space), every damaged checkpoint is named and
skipped for the newest intact one, params-only restore needs no optimizer."""

import errno
import os
import shutil

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import checkpointing
from orbax.checkpoint._src.handlers import base_pytree_checkpoint_handler


def _tree(value):
  return {'params': {'w': jnp.full((4, 8), value, jnp.float32)},
          'state': {},
          'opt_state': ({'mu': jnp.full((8,), value, jnp.float32)},),
          'step': jnp.array(int(value), jnp.int32)}


@pytest.fixture
def saved(tmp_path):
  """Checkpoints of steps 20, 40, 60 (their values equal the step)."""
  checkpointer = checkpointing.Checkpointer(str(tmp_path / 'checkpoints'),
                                            max_to_keep=None)
  for step in (20, 40, 60):
    checkpointer.save(step, _tree(step))
  yield checkpointer
  checkpointer.close()


def _restore(checkpointer, **kwargs):
  return checkpointing.restore(
      checkpointer, checkpointing.abstract(_tree(0)), **kwargs)


def _warnings(monkeypatch):
  lines = []
  monkeypatch.setattr(logging, 'warning',
                      lambda msg, *args: lines.append(msg % args))
  return lines


def test_save_writes_checksums_and_restore_verifies(saved):
  step_dir = saved.step_dir(60)
  listed = (step_dir / checkpointing.CHECKSUM_NAME).read_text().splitlines()
  names = {line.split('  ')[1] for line in listed}
  assert '_CHECKPOINT_METADATA' in names and 'default/_METADATA' in names
  assert checkpointing.verify(step_dir) is None
  step, tree = _restore(saved)
  assert step == 60
  np.testing.assert_array_equal(tree['params']['w'], 60.0)
  assert int(tree['step']) == 60


def _nosp(self, directory, **kwargs):
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC),
                os.fspath(directory / '_METADATA'))


def test_disk_full_during_save_is_one_line_at_once(saved, monkeypatch):
  monkeypatch.setattr(base_pytree_checkpoint_handler.BasePyTreeCheckpointHandler,
                      '_write_metadata_file', _nosp)
  with pytest.raises(checkpointing.CheckpointError) as raised:
    saved.save(80, _tree(80))
  assert str(raised.value) == (
      f'no space left on device while writing checkpoint 80 to '
      f'{saved.directory}; checkpoints 20, 40, 60 are intact.')
  # Nothing of step 80 is left behind, and no success line was logged.
  assert sorted(os.listdir(saved.directory)) == ['20', '40', '60']
  assert saved.all_steps() == [20, 40, 60]


def test_unwritable_checkpoints_dir_is_one_line(saved, monkeypatch):
  def denied(self, directory, **kwargs):
    raise PermissionError(errno.EACCES, 'Permission denied', str(directory))
  monkeypatch.setattr(base_pytree_checkpoint_handler.BasePyTreeCheckpointHandler,
                      '_write_metadata_file', denied)
  with pytest.raises(checkpointing.CheckpointError,
                     match='^permission denied while writing checkpoint 80'):
    saved.save(80, _tree(80))


def test_too_little_free_space_is_refused_before_writing(saved, monkeypatch):
  size = saved.size_of(60)
  usage = shutil.disk_usage(saved.directory)
  monkeypatch.setattr(shutil, 'disk_usage',
                      lambda _: usage._replace(free=size // 2))
  with pytest.raises(checkpointing.CheckpointError) as raised:
    saved.save(80, _tree(80))
  assert str(raised.value).startswith(
      f'no space left on device for checkpoint 80 in {saved.directory} (it '
      'needs about')
  assert str(raised.value).endswith('checkpoints 20, 40, 60 are intact.')
  assert saved.all_steps() == [20, 40, 60]


def test_errors_wrapped_by_orbax_or_tensorstore_keep_their_cause():
  try:
    try:
      raise OSError(errno.ENOSPC, 'No space left on device')
    except OSError as e:
      raise ValueError('commit failed') from e
  except ValueError as e:
    assert checkpointing.describe_error(e) == 'no space left on device'
  # tensorstore reports the OS text only
  assert checkpointing.describe_error(ValueError(
      'Error writing "d/abc": [OS error: No space left on device]\nmore')) == \
      'no space left on device'
  assert checkpointing.describe_error(RuntimeError('a\nb')) == 'a'


def _flip(path, offset=None, count=1):
  data = bytearray(path.read_bytes())
  start = len(data) // 2 if offset is None else offset
  for i in range(start, min(start + count, len(data))):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def _data_file(step_dir):
  return max((p for p in step_dir.glob('default/ocdbt.process_0/d/*')),
             key=lambda p: p.stat().length)


@pytest.mark.parametrize('damage', [
    'one_bit', 'garbled_1000_bytes', 'truncated', 'metadata_garbled',
    'folder_emptied', 'no_checksum'])
def test_damaged_newest_is_named_and_the_newest_intact_one_restored(
    saved, monkeypatch, damage):
  step_dir = saved.step_dir(60)
  data = _data_file(step_dir)
  if damage == 'one_bit':
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
  elif damage == 'garbled_1000_bytes':
    _flip(data, offset=0, count=1000)
  elif damage == 'truncated':
    data.write_bytes(data.read_bytes()[:-7])
  elif damage == 'metadata_garbled':
    _flip(step_dir / 'default' / '_METADATA', count=20)
  elif damage == 'folder_emptied':
    for child in list(step_dir.iterdir()):
      shutil.rmtree(child) if child.is_dir() else child.unlink()
  else:
    (step_dir / checkpointing.CHECKSUM_NAME).unlink()
  warnings = _warnings(monkeypatch)
  step, tree = _restore(saved, set_aside=True)
  assert step == 40
  np.testing.assert_array_equal(tree['opt_state'][0]['mu'], 40.0)
  assert len(warnings) == 2, warnings
  assert warnings[0].startswith(f'checkpoint 60 in {saved.directory} is '
                                'damaged: ')
  expected = {
      'one_bit': f'{data.relative_to(step_dir)} does not match its checksum',
      'garbled_1000_bytes': 'does not match its checksum',
      'truncated': 'does not match its checksum',
      'metadata_garbled': 'default/_METADATA does not match its checksum',
      'folder_emptied': 'has no SHA256SUMS',
      'no_checksum': 'has no SHA256SUMS'}[damage]
  assert expected in warnings[0]
  assert '; moved to ' in warnings[0] and 'damaged_checkpoints' in warnings[0]
  assert warnings[1] == (f'Falling back to checkpoint 40 in '
                         f'{saved.directory}, the newest intact one.')
  assert saved.all_steps() == [20, 40]  # step 60 can be saved again
  saved.save(60, _tree(60))
  assert _restore(saved)[0] == 60


def test_a_damaged_step_asked_for_by_number_is_an_error(saved):
  _flip(_data_file(saved.step_dir(40)))
  with pytest.raises(checkpointing.CheckpointError,
                     match=r'^checkpoint 40 in .* is damaged: .*checksum\.$'):
    _restore(saved, step=40)
  with pytest.raises(checkpointing.CheckpointError, match='no checkpoint of '
                     r'step 7 .*\(there are: 20, 40, 60\)'):
    _restore(saved, step=7)
  assert _restore(saved, step=20)[0] == 20


def test_all_damaged_means_no_checkpoint(saved, monkeypatch):
  for step in (20, 40, 60):
    _flip(_data_file(saved.step_dir(step)))
  warnings = _warnings(monkeypatch)
  assert _restore(saved) == (None, None)
  assert len(warnings) == 4 and warnings[-1].startswith('No intact checkpoint')
  assert saved.all_steps() == [20, 40, 60]  # not moved without set_aside


def test_checkpoints_written_before_checksums_restore_unverified(
    saved, monkeypatch):
  for step in (20, 40, 60):
    (saved.step_dir(step) / checkpointing.CHECKSUM_NAME).unlink()
  warnings = _warnings(monkeypatch)
  assert _restore(saved)[0] == 60
  assert warnings == [f'No checkpoint in {saved.directory} has a SHA256SUMS '
                      '(written before checksums were kept): restoring '
                      'without verification.']


def test_partial_restore_reads_params_without_the_optimizer(saved):
  full = checkpointing.abstract(_tree(0))
  step, tree = checkpointing.restore(
      saved, {'params': full['params'], 'step': full['step']}, partial=True)
  assert step == 60 and set(tree) == {'params', 'step'}
  np.testing.assert_array_equal(tree['params']['w'], 60.0)
  assert isinstance(tree['params']['w'], jax.Array)

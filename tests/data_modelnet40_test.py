"""ModelNet40: tiny HDF5 and text files in the official layouts, via TFDS."""
import os

import h5py
import numpy as np
import pytest

from experiments.data import modelnet40

P = modelnet40.NUM_POINTS
# file -> number of clouds; two train files as in the real release.
_FILES = {'ply_data_train0.h5': 5, 'ply_data_train1.h5': 4,
          'ply_data_test0.h5': 3}


def _clouds(num, offset):
  """Clouds with distinct centres and extents; labels from the offset."""
  rng = np.random.default_rng(offset)
  points = rng.normal(size=(num, P, 3)) * rng.uniform(0.5, 3, (num, 1, 3))
  points += rng.uniform(-5, 5, (num, 1, 3))
  labels = (np.arange(num) + offset) % modelnet40.NUM_CLASSES
  return points.astype(np.float32), labels.astype(np.uint8)


def _write_hdf5(root):
  folder = root / 'modelnet40_ply_hdf5_2048'
  folder.mkdir(parents=True)
  (folder / 'shape_names.txt').write_text(
      '\n'.join(modelnet40.CLASS_NAMES) + '\n')
  expected = {'train': [], 'test': []}
  offset = 0
  for name, num in _FILES.items():
    points, labels = _clouds(num, offset)
    offset += num
    with h5py.File(folder / name, 'w') as f:
      f['data'] = points
      f['label'] = labels[:, None]
      f['normal'] = np.zeros_like(points)
      f['faceId'] = np.zeros((num, P), np.int32)
    split = 'train' if 'train' in name else 'test'
    expected[split].append((points, labels))
  for split in ('train', 'test'):
    (folder / f'{split}_files.txt').write_text(''.join(
        f'data/modelnet40_ply_hdf5_2048/{n}\n' for n in _FILES if split in n))
  return {s: tuple(np.concatenate(a) for a in zip(*v))
          for s, v in expected.items()}


def _write_text(root, train_ids=('airplane_0001', 'bed_0002', 'xbox_0003'),
                test_ids=('chair_0004',)):
  folder = root / 'modelnet40_normal_resampled'
  folder.mkdir(parents=True)
  (folder / 'modelnet40_shape_names.txt').write_text(
      '\n'.join(modelnet40.CLASS_NAMES) + '\n')
  (folder / 'modelnet40_train.txt').write_text('\n'.join(train_ids) + '\n')
  (folder / 'modelnet40_test.txt').write_text('\n'.join(test_ids) + '\n')
  clouds = {}
  for i, shape_id in enumerate(train_ids + test_ids):
    cls = shape_id.rsplit('_', 1)[0]
    (folder / cls).mkdir(exist_ok=True)
    rows = np.random.default_rng(i).normal(size=(P + 50, 6)) + i
    np.savetxt(folder / cls / f'{shape_id}.txt', rows, fmt='%.6f',
               delimiter=',')
    clouds[shape_id] = rows[:P, :3].astype(np.float32)
  return clouds


@pytest.fixture(scope='module')
def hdf5(tmp_path_factory):
  root = tmp_path_factory.mktemp('modelnet')
  expected = _write_hdf5(root / 'manual')
  kwargs = {'data_dir': str(root / 'tfds'), 'manual_dir': str(root / 'manual')}
  assert modelnet40.num_examples('train', **kwargs) == 9
  assert modelnet40.num_examples('test', **kwargs) == 3
  return kwargs, expected


def _match(inputs, reference):
  """Index of the reference cloud each normalised input came from."""
  normalised = modelnet40.normalise(reference)  # [N, P, 3]
  dist = np.abs(inputs[:, None] - normalised[None]).max(axis=(2, 3))
  return dist.argmin(1), dist.min(1)


def test_eval_yields_each_normalised_cloud_once(hdf5):
  kwargs, expected = hdf5
  points, labels = expected['test']
  batches = list(modelnet40.load('test', batch_size=2, is_training=False,
                                 **kwargs))
  batch = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  assert batch['inputs'].shape == (4, P, 3) and batch['inputs'].dtype == np.float32
  np.testing.assert_array_equal(batch['mask'], [True, True, True, False])
  inputs = batch['inputs'][:3]
  index, dist = _match(inputs, points)
  assert sorted(index) == [0, 1, 2] and dist.max() < 1e-5
  np.testing.assert_array_equal(batch['labels'][:3], labels[index])
  np.testing.assert_allclose(inputs.mean(1), 0, atol=1e-5)
  np.testing.assert_allclose(np.abs(inputs).max((1, 2)), 1, atol=1e-6)


def test_training_scales_points_and_resumes(hdf5):
  kwargs, expected = hdf5
  points, labels = expected['train']
  it = modelnet40.load('train', batch_size=4, is_training=True, seed=1,
                       **kwargs)
  batches = [next(it) for _ in range(6)]
  inputs = np.concatenate([b['inputs'] for b in batches])
  index, dist = _match(inputs, points)
  np.testing.assert_array_equal(np.concatenate([b['labels'] for b in batches]),
                                labels[index])
  # Scaled by 0.99-1.01 per point before normalising: close, never equal.
  assert 1e-4 < dist.min() and dist.max() < 0.05
  np.testing.assert_allclose(inputs.mean(1), 0, atol=1e-5)
  np.testing.assert_allclose(np.abs(inputs).max((1, 2)), 1, atol=1e-6)
  assert sorted(index[:9]) == list(range(9))  # The first epoch.
  resumed = modelnet40.load('train', batch_size=4, is_training=True, seed=1,
                            start_step=4, **kwargs)
  for expected_batch in batches[4:]:
    got = next(resumed)
    for key in got:
      np.testing.assert_array_equal(got[key], expected_batch[key])
  plain = next(modelnet40.load('train', batch_size=9, is_training=True,
                               augment=False, **kwargs))
  assert _match(plain['inputs'], points)[1].max() < 1e-5


def test_normal_resampled_text_files(tmp_path):
  clouds = _write_text(tmp_path / 'manual')
  kwargs = {'data_dir': str(tmp_path / 'tfds'), 'variant': 'normal_resampled',
            'manual_dir': str(tmp_path / 'manual' /
                              'modelnet40_normal_resampled')}
  assert modelnet40.num_examples('train', **kwargs) == 3
  batch = next(modelnet40.load('train', batch_size=3, is_training=False,
                               **kwargs))
  names = ('airplane_0001', 'bed_0002', 'xbox_0003')
  index, dist = _match(batch['inputs'], np.stack([clouds[n] for n in names]))
  assert sorted(index) == [0, 1, 2] and dist.max() < 1e-5
  np.testing.assert_array_equal(batch['labels'], np.array([0, 2, 39])[index])


def _expect_build_error(tmp_path, exception, pattern, variant='ply_hdf5_2048'):
  with pytest.raises(exception, match=pattern):
    modelnet40.num_examples('train', data_dir=str(tmp_path / 'tfds'),
                            manual_dir=str(tmp_path / 'manual'),
                            variant=variant)


def test_missing_and_corrupt_files_are_named(tmp_path):
  _expect_build_error(tmp_path, FileNotFoundError, 'manual_dir .*manual')
  _write_hdf5(tmp_path / 'manual')
  folder = tmp_path / 'manual' / 'modelnet40_ply_hdf5_2048'
  (folder / 'ply_data_train1.h5').write_bytes(b'not an hdf5 file at all')
  _expect_build_error(tmp_path, ValueError,
                      'ply_data_train1.h5: unreadable HDF5')
  os.remove(folder / 'ply_data_train1.h5')
  _expect_build_error(tmp_path, FileNotFoundError,
                      'ply_data_train1.h5 is listed but missing')
  with h5py.File(folder / 'ply_data_train1.h5', 'w') as f:
    f['points'] = np.zeros((2, P, 3), np.float32)
  _expect_build_error(tmp_path, ValueError, 'ply_data_train1.h5: keys')
  (folder / 'shape_names.txt').write_text('airplane\nbathtub\nairplane\n')
  _expect_build_error(tmp_path, ValueError, 'shape_names.txt repeats .*airplane')
  (folder / 'shape_names.txt').write_text('airplane\nbathtub\n')
  _expect_build_error(tmp_path, ValueError,
                      'ply_data_train0.h5: labels outside \\[0, 2\\)')
  _expect_build_error(tmp_path, FileNotFoundError,
                      'modelnet40_shape_names.txt', variant='normal_resampled')
  with pytest.raises(FileNotFoundError, match='not prepared'):
    modelnet40.num_examples('test', data_dir=str(tmp_path / 'tfds'))


def test_short_text_cloud_is_named(tmp_path):
  _write_text(tmp_path / 'manual')
  path = (tmp_path / 'manual' / 'modelnet40_normal_resampled' / 'bed' /
          'bed_0002.txt')
  path.write_text('0.1,0.2,0.3,0,0,1\n' * 100)
  _expect_build_error(tmp_path, ValueError, 'bed_0002.txt: 100 points',
                      variant='normal_resampled')


def test_two_processes_building_one_new_data_dir_both_succeed(tmp_path):
  """launch.reproduce --jobs=2 starts two runs on the same new data_dir at
  once: one builds the TFDS dataset, the other waits for it and reads it."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from tests import testing  # pylint: disable=g-import-not-at-top
  _write_hdf5(tmp_path / 'manual')
  # Each build starts 4 s late, so that both processes (started together)
  # find the dataset unprepared and race, unless one waits for the other.
  code = ('import time; import tensorflow_datasets as tfds\n'
          'build = tfds.core.DatasetBuilder.download_and_prepare\n'
          'def late(self, *a, **k):\n'
          '  time.sleep(4); return build(self, *a, **k)\n'
          'tfds.core.DatasetBuilder.download_and_prepare = late\n'
          'from experiments.data import modelnet40; print(modelnet40.'
          f"num_examples('train', data_dir={str(tmp_path / 'tfds')!r}, "
          f"manual_dir={str(tmp_path / 'manual')!r}))")
  runs = [subprocess.Popen([sys.executable, '-c', code], cwd=testing.ROOT,
                           env=testing.subprocess_env(), text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
          for _ in range(2)]
  outputs = [run.communicate(timeout=300) for run in runs]
  for run, (out, err) in zip(runs, outputs):
    assert run.returncode == 0, err[-2000:]
    assert out.split()[-1] == '9'

"""Fashion-MNIST pipeline on IDX files written here in the official layout."""
import gzip
import os

import numpy as np
import pytest

from experiments.data import fashion_mnist

NUM_TRAIN, NUM_TEST = 50, 23
_REAL_DIR = fashion_mnist.DEFAULT_MANUAL_DIR


def _idx_bytes(array: np.ndarray) -> bytes:
  header = bytes([0, 0, 8, array.ndim]) + b''.join(
      d.to_bytes(4, 'big') for d in array.shape)
  return header + array.astype(np.uint8).tobytes()


def _examples(num, offset):
  """Images whose pixel (0, 0) is the example id and (1, 1) the label."""
  rng = np.random.default_rng(offset)
  images = rng.integers(0, 256, size=(num, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, size=num).astype(np.uint8)
  images[:, 0, 0] = np.arange(offset, offset + num)
  images[:, 1, 1] = labels * 20
  return images, labels


def _write(directory, stem, array, gzipped=True):
  data = _idx_bytes(array)
  path = os.path.join(directory, stem + ('.gz' if gzipped else ''))
  with open(path, 'wb') as f:
    f.write(gzip.compress(data) if gzipped else data)
  return path


@pytest.fixture
def manual_dir(tmp_path):
  fashion_mnist._arrays.cache_clear()
  d = tmp_path / 'fashion'
  d.mkdir()
  for split, num, offset in (('train', NUM_TRAIN, 0), ('t10k', NUM_TEST, 100)):
    images, labels = _examples(num, offset)
    _write(d, f'{split}-images-idx3-ubyte', images)
    # One file stored uncompressed: both forms are accepted.
    _write(d, f'{split}-labels-idx1-ubyte', labels, gzipped=split == 'train')
  yield str(d)
  fashion_mnist._arrays.cache_clear()


def _ids(batch):
  """Example ids and labels recovered from the normalised inputs."""
  pixels = np.rint((batch['inputs'] * fashion_mnist.STD + fashion_mnist.MEAN)
                   * 255).astype(int)
  return pixels[:, 0, 0, 0], pixels[:, 1, 1, 0] // 20


def test_train_batches_are_normalised_and_aligned(manual_dir):
  it = fashion_mnist.load('train', batch_size=8, is_training=True,
                          manual_dir=manual_dir)
  batch = next(it)
  assert batch['inputs'].shape == (8, 28, 28, 1)
  assert batch['inputs'].dtype == np.float32
  assert batch['labels'].dtype == np.int32 and batch['labels'].shape == (8,)
  assert batch['mask'].all()
  images, labels = _examples(NUM_TRAIN, 0)
  ids, encoded_labels = _ids(batch)
  np.testing.assert_array_equal(batch['labels'], labels[ids])
  np.testing.assert_array_equal(encoded_labels, batch['labels'])
  expected = (images[ids, :, :, None] / 255. - 0.2860406) / 0.3530242
  np.testing.assert_allclose(batch['inputs'], expected, atol=1e-5)


def test_each_epoch_is_a_new_permutation(manual_dir):
  it = fashion_mnist.load('train', batch_size=10, is_training=True, seed=3,
                          manual_dir=manual_dir)
  epochs = [np.concatenate([_ids(next(it))[0] for _ in range(5)])
            for _ in range(2)]
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(NUM_TRAIN))
  assert not np.array_equal(epochs[0], epochs[1])


@pytest.mark.parametrize('augment', [False, True])
def test_start_step_resumes_exactly(manual_dir, augment):
  kwargs = dict(batch_size=7, is_training=True, seed=5, augment=augment,
                manual_dir=manual_dir)
  fresh = fashion_mnist.load('train', **kwargs)
  batches = [next(fresh) for _ in range(12)]  # Crosses epoch boundaries.
  resumed = fashion_mnist.load('train', start_step=9, **kwargs)
  for expected in batches[9:]:
    got = next(resumed)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])
  other_seed = next(fashion_mnist.load('train', **{**kwargs, 'seed': 6}))
  assert not np.array_equal(other_seed['labels'], batches[0]['labels'])


def test_augmentation_shifts_and_flips(manual_dir):
  kwargs = dict(batch_size=NUM_TRAIN, is_training=True, manual_dir=manual_dir)
  plain = next(fashion_mnist.load('train', **kwargs))
  augmented = next(fashion_mnist.load('train', augment=True, **kwargs))
  np.testing.assert_array_equal(plain['labels'], augmented['labels'])
  background = (0 - fashion_mnist.MEAN) / fashion_mnist.STD
  changed = 0
  for x, y in zip(plain['inputs'][..., 0], augmented['inputs'][..., 0]):
    pad = np.pad(x, 2, constant_values=background)
    candidates = [c for dy in range(5) for dx in range(5)
                  for c in (pad[dy:dy + 28, dx:dx + 28],
                            pad[dy:dy + 28, dx:dx + 28][:, ::-1])]
    assert any(np.allclose(y, c, atol=1e-6) for c in candidates)
    changed += not np.array_equal(x, y)
  assert changed > NUM_TRAIN // 2


def test_eval_is_one_padded_pass_in_order(manual_dir):
  batches = list(fashion_mnist.load('test', batch_size=10, is_training=False,
                                    manual_dir=manual_dir))
  assert len(batches) == 3
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == NUM_TEST and not mask[NUM_TEST:].any()
  ids = np.concatenate([_ids(b)[0] for b in batches])[mask]
  np.testing.assert_array_equal(ids, np.arange(100, 100 + NUM_TEST))
  assert fashion_mnist.num_examples('test', manual_dir=manual_dir) == NUM_TEST


def test_processes_read_disjoint_shards(manual_dir):
  seen_eval, seen_train, counts = [], [], []
  for p in range(3):
    kwargs = dict(batch_size=4, process_index=p, process_count=3,
                  manual_dir=manual_dir)
    batches = list(fashion_mnist.load('test', is_training=False, **kwargs))
    counts.append(len(batches))
    seen_eval.append(np.concatenate([_ids(b)[0][b['mask']] for b in batches]))
    train = fashion_mnist.load('train', is_training=True, **kwargs)
    seen_train.append(
        set(np.concatenate([_ids(next(train))[0] for _ in range(10)])))
  assert len(set(counts)) == 1  # Lockstep evaluation across processes.
  np.testing.assert_array_equal(np.sort(np.concatenate(seen_eval)),
                                np.arange(100, 100 + NUM_TEST))
  assert not seen_train[0] & seen_train[1] and not seen_train[1] & seen_train[2]
  assert set.union(*seen_train) == set(range(NUM_TRAIN))


def test_num_train_examples_limits_the_split(manual_dir):
  it = fashion_mnist.load('train', batch_size=16, is_training=True,
                          manual_dir=manual_dir, num_train_examples=12)
  assert set(_ids(next(it))[0]) == set(range(12))
  assert fashion_mnist.num_examples('train', manual_dir=manual_dir,
                                    num_train_examples=12) == 12


def test_truncated_file_is_named(manual_dir):
  path = os.path.join(manual_dir, 'train-images-idx3-ubyte.gz')
  with open(path, 'rb') as f:
    data = gzip.decompress(f.read())
  with open(path, 'wb') as f:
    f.write(gzip.compress(data[:-100]))
  with pytest.raises(ValueError, match='train-images-idx3-ubyte.*truncated'):
    fashion_mnist.num_examples('train', manual_dir=manual_dir)


def test_corrupt_gzip_is_named(manual_dir):
  path = os.path.join(manual_dir, 't10k-images-idx3-ubyte.gz')
  with open(path, 'rb') as f:
    data = bytearray(f.read())
  with open(path, 'wb') as f:
    f.write(bytes(data[:len(data) // 2]))
  with pytest.raises(ValueError, match='t10k-images-idx3-ubyte.gz: corrupt'):
    fashion_mnist.load('test', batch_size=4, is_training=False,
                       manual_dir=manual_dir)


def test_wrong_magic_and_mismatched_labels_are_named(manual_dir):
  _write(manual_dir, 'train-labels-idx1-ubyte', np.zeros(NUM_TRAIN - 1))
  with pytest.raises(ValueError, match='train-labels-idx1-ubyte.gz: labels'):
    fashion_mnist.num_examples('train', manual_dir=manual_dir)
  fashion_mnist._arrays.cache_clear()
  with open(os.path.join(manual_dir, 'train-labels-idx1-ubyte.gz'), 'wb') as f:
    f.write(gzip.compress(b'\x00\x00\x0d\x01' + bytes(8)))  # float32 type.
  with pytest.raises(ValueError, match='not an IDX file of unsigned bytes'):
    fashion_mnist.num_examples('train', manual_dir=manual_dir)


def test_missing_directories_and_files(tmp_path, manual_dir):
  with pytest.raises(FileNotFoundError, match='manual_dir .*nowhere'):
    fashion_mnist.num_examples('train', manual_dir=str(tmp_path / 'nowhere'))
  with pytest.raises(FileNotFoundError, match='data_dir .*absent'):
    fashion_mnist.num_examples('train', data_dir=str(tmp_path / 'absent'),
                               manual_dir=manual_dir)
  os.remove(os.path.join(manual_dir, 't10k-labels-idx1-ubyte'))
  with pytest.raises(FileNotFoundError, match='t10k-labels-idx1-ubyte'):
    fashion_mnist.num_examples('test', manual_dir=manual_dir)
  with pytest.raises(ValueError, match='validation'):
    fashion_mnist.num_examples('validation', manual_dir=manual_dir)


def test_reads_tfds_prepared_data(tmp_path, manual_dir, monkeypatch):
  """TFDS's own fashion_mnist builder, fed the test's files, then read back."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.image_classification import mnist  # pylint: disable=g-import-not-at-top
  extracted = {}
  for key, stem in (('train_data', 'train-images-idx3-ubyte'),
                    ('train_labels', 'train-labels-idx1-ubyte'),
                    ('test_data', 't10k-images-idx3-ubyte'),
                    ('test_labels', 't10k-labels-idx1-ubyte')):
    array = fashion_mnist.read_idx(fashion_mnist._find_idx(manual_dir, stem))
    extracted[key] = _write(tmp_path, stem, array, gzipped=False)
  # The builder hard-codes the full split sizes and downloads; feed it ours.
  monkeypatch.setattr(mnist, '_TRAIN_EXAMPLES', NUM_TRAIN)
  monkeypatch.setattr(mnist, '_TEST_EXAMPLES', NUM_TEST)
  monkeypatch.setattr(tfds.download.DownloadManager, 'download_and_extract',
                      lambda self, urls: extracted)
  data_dir = str(tmp_path / 'tfds')
  tfds.builder('fashion_mnist', data_dir=data_dir).download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  os.rename(manual_dir, manual_dir + '_moved')  # Prove TFDS is the source.
  kwargs = dict(batch_size=NUM_TEST, is_training=False)
  from_tfds = next(fashion_mnist.load('test', data_dir=data_dir, **kwargs))
  fashion_mnist._arrays.cache_clear()
  from_idx = next(fashion_mnist.load('test', manual_dir=manual_dir + '_moved',
                                     **kwargs))
  # TFDS stores the split in its own order; compare as sets of examples.
  order_tfds, order_idx = (np.argsort(_ids(b)[0]) for b in (from_tfds,
                                                            from_idx))
  for key in ('inputs', 'labels'):
    np.testing.assert_array_equal(from_tfds[key][order_tfds],
                                  from_idx[key][order_idx])
  assert fashion_mnist.num_examples('train', data_dir=data_dir) == NUM_TRAIN


@pytest.mark.skipif(not os.path.isdir(_REAL_DIR), reason='no Debian files')
def test_real_debian_files():
  fashion_mnist._arrays.cache_clear()
  assert fashion_mnist.num_examples('train') == 60_000
  # The runner's config passes explicit Nones: the defaults apply.
  assert fashion_mnist.num_examples('train', data_dir=None,
                                    manual_dir=None, augment=True) == 60_000
  assert fashion_mnist.num_examples('test') == 10_000
  images, labels = fashion_mnist._arrays('train', None, _REAL_DIR)
  np.testing.assert_array_equal(np.bincount(labels), [6000] * 10)
  pixels = images / 255.
  assert abs(pixels.mean() - fashion_mnist.MEAN) < 1e-6
  assert abs(pixels.std() - fashion_mnist.STD) < 1e-6
  batch = next(fashion_mnist.load('test', batch_size=10_000,
                                  is_training=False))
  assert abs(batch['inputs'].mean()) < 0.05  # Test set ~ train statistics.
  assert 0.9 < batch['inputs'].std() < 1.1

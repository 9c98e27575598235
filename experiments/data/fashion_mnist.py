"""Fashion-MNIST: the embedded default dataset, in memory, no tf.data.

Shapes: B per-process batch. Yields inputs float32 [B, 28, 28, 1], pixels
scaled to [0, 1] then normalised with the train-set statistics MEAN, STD;
labels int32 [B]; mask bool [B]. Splits 'train' (60,000) and 'test' (10,000).

Sources, in order:
  1. TFDS-prepared `fashion_mnist` under `data_dir` (data_dir/fashion_mnist/
     <version>/dataset_info.json), read with TFDS (TensorFlow imported only
     then).
  2. The four IDX files of the official release in `manual_dir` (default the
     Debian package dataset-fashion-mnist's /usr/share/datasets/fashion-mnist;
     but an explicit `data_dir` without TFDS data and without `manual_dir`
     is read as the IDX folder itself: an explicit path never falls back to
     the system copy), gzipped or not, parsed here with gzip + numpy. No checksums are compared
     (the Debian files are re-gzipped); instead the IDX magic numbers, shapes
     and byte counts are validated and a bad file raises an error naming it.
Nothing here downloads. Decoded arrays are cached in memory per process.

Training order and augmentation follow `in_memory` (deterministic in seed and
step). `augment=True` adds a light augmentation: a random shift of up to 2
pixels (zero padding) and a random horizontal flip.
"""
import functools
import gzip
import os
import zlib
from typing import Iterator, Optional

from absl import logging
import numpy as np

from experiments.data import in_memory

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)
# Mean and standard deviation of all train-set pixels scaled to [0, 1],
# computed from the official train-images-idx3-ubyte (0.2860406, 0.3530242).
MEAN = 0.2860406
STD = 0.3530242
DEFAULT_MANUAL_DIR = '/usr/share/datasets/fashion-mnist'
SPLITS = ('train', 'test')
_IDX_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
_IDX_UBYTE = 0x08  # IDX type code of unsigned bytes.
_SHIFT = 2  # Pixels of the random shift of `augment=True`.


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file of unsigned bytes (optionally gzipped), validated.

  IDX layout: 2 zero bytes, type code 0x08, number of dims d, d big-endian
  uint32 sizes, then the data. Raises ValueError naming `path` for a bad
  magic number, a truncated or oversized payload, or a broken gzip stream.
  """
  try:
    with open(path, 'rb') as f:
      raw = f.read()
    if raw[:2] == b'\x1f\x8b':
      raw = gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as e:
    if isinstance(e, FileNotFoundError):
      raise
    raise ValueError(f'{path}: corrupt gzip stream ({e}).') from e
  if len(raw) < 4 or raw[:2] != b'\0\0' or raw[2] != _IDX_UBYTE:
    raise ValueError(f'{path}: not an IDX file of unsigned bytes (magic '
                     f'{raw[:4].hex()}, expected 000008NN).')
  ndim = raw[3]
  header = 4 + 4 * ndim
  if ndim == 0 or len(raw) < header:
    raise ValueError(f'{path}: truncated IDX header.')
  shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], 'big')
                for i in range(ndim))
  expected = int(np.prod(shape))
  if len(raw) - header != expected:
    raise ValueError(f'{path}: IDX header says shape {shape} '
                     f'({expected} bytes) but the file holds '
                     f'{len(raw) - header} bytes of data (truncated?).')
  return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _find_idx(manual_dir: str, stem: str) -> str:
  for name in (stem + '.gz', stem):
    path = os.path.join(manual_dir, name)
    if os.path.exists(path):
      return path
  raise FileNotFoundError(
      f'Fashion-MNIST file {stem}.gz (or {stem}) not found in '
      f'{manual_dir}. Install the Debian package dataset-fashion-mnist or '
      'pass manual_dir= a directory with the four official IDX files.')


def _prepared_tfds_dir(data_dir: str) -> Optional[str]:
  """Newest data_dir/fashion_mnist/<version> holding a prepared dataset."""
  root = os.path.join(data_dir, 'fashion_mnist')
  if not os.path.isdir(root):
    return None
  versions = [v for v in os.listdir(root)
              if os.path.exists(os.path.join(root, v, 'dataset_info.json'))]
  if not versions:
    return None
  newest = max(versions, key=lambda v: tuple(int(p) for p in v.split('.')))
  return os.path.join(root, newest)


def _read_tfds(path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder_from_directory(path)
  data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  return data['image'], data['label']


@functools.lru_cache(maxsize=4)
def _arrays(split: str, data_dir: Optional[str],
            manual_dir: Optional[str]) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, 28, 28, 1], labels int32 [N]) of a whole split."""
  if split not in SPLITS:
    raise ValueError(f'Fashion-MNIST split {split!r} is not one of {SPLITS}.')
  prepared = None
  if data_dir is not None:
    if not os.path.isdir(data_dir):
      raise FileNotFoundError(f'data_dir {data_dir} does not exist.')
    prepared = _prepared_tfds_dir(data_dir)
    if prepared is None and manual_dir is None:
      if not any(os.path.exists(os.path.join(data_dir, stem + ext))
                 for stems in _IDX_FILES.values() for stem in stems
                 for ext in ('', '.gz')):
        raise FileNotFoundError(
            f'data_dir {data_dir} holds neither a prepared TFDS '
            'fashion_mnist nor the Fashion-MNIST IDX files.')
      manual_dir = data_dir  # Explicit: never the system copy.
  manual_dir = manual_dir or DEFAULT_MANUAL_DIR
  if prepared is not None:
    logging.info('Fashion-MNIST %s: TFDS data in %s', split, prepared)
    images, labels = _read_tfds(prepared, split)
    source = prepared
  else:
    if not os.path.isdir(manual_dir):
      raise FileNotFoundError(
          f'Fashion-MNIST: no prepared TFDS data in data_dir={data_dir} and '
          f'manual_dir {manual_dir} does not exist.')
    image_path, label_path = (_find_idx(manual_dir, stem)
                              for stem in _IDX_FILES[split])
    logging.info('Fashion-MNIST %s: IDX files %s, %s', split, image_path,
                 label_path)
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE[:2]:
      raise ValueError(f'{image_path}: images of shape {images.shape}, '
                       'expected [N, 28, 28].')
    if labels.ndim != 1 or len(labels) != len(images):
      raise ValueError(f'{label_path}: labels of shape {labels.shape} do not '
                       f'match the {len(images)} images of {image_path}.')
    images = images[..., None]
    source = manual_dir
  if labels.size and labels.max() >= NUM_CLASSES:
    raise ValueError(f'Fashion-MNIST {split} in {source}: label '
                     f'{labels.max()} out of range.')
  return images, labels.astype(np.int32)


def _data(split, data_dir, manual_dir, num_train_examples):
  images, labels = _arrays(split, data_dir, manual_dir)
  if num_train_examples is not None and split == 'train':
    images, labels = images[:num_train_examples], labels[:num_train_examples]
  return {'image': images, 'label': labels}


def num_examples(split: str, *, data_dir: Optional[str] = None,
                 manual_dir: Optional[str] = None,
                 num_train_examples: Optional[int] = None, **unused) -> int:
  """Examples in `split` of the data that `load` would read."""
  del unused
  return len(_data(split, data_dir, manual_dir, num_train_examples)['label'])


def _transform(batch, rng):
  images = batch['image']  # [B, 28, 28, 1] uint8
  if rng is not None:
    b = len(images)
    pad = np.pad(images, ((0, 0), (_SHIFT, _SHIFT), (_SHIFT, _SHIFT), (0, 0)))
    dy, dx = rng.integers(0, 2 * _SHIFT + 1, size=(2, b))  # [B] each
    rows = dy[:, None] + np.arange(28)  # [B, 28]
    cols = dx[:, None] + np.arange(28)  # [B, 28]
    images = pad[np.arange(b)[:, None, None], rows[:, :, None],
                 cols[:, None, :]]  # [B, 28, 28, 1]
    flip = rng.random(b) < 0.5  # [B]
    images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
  inputs = (images.astype(np.float32) / 255. - MEAN) / STD  # [B, 28, 28, 1]
  return {'inputs': inputs.astype(np.float32), 'labels': batch['label']}


def load(split: str, *, batch_size: int, is_training: bool, seed: int = 0,
         start_step: int = 0, process_index: int = 0, process_count: int = 1,
         data_dir: Optional[str] = None,
         manual_dir: Optional[str] = None, augment: bool = False,
         num_train_examples: Optional[int] = None
         ) -> Iterator[dict[str, np.ndarray]]:
  """Batches of Fashion-MNIST; see the module docstring.

  Args:
    split: 'train' or 'test'.
    manual_dir: directory of the official IDX files, used when `data_dir`
      holds no prepared TFDS `fashion_mnist` (None: DEFAULT_MANUAL_DIR).
    augment: training only: random 2-pixel shift and horizontal flip.
    num_train_examples: keep only the first examples of 'train' (for tests).
  """
  arrays = _data(split, data_dir, manual_dir, num_train_examples)
  common = dict(batch_size=batch_size, process_index=process_index,
                process_count=process_count, transform=_transform)
  if is_training:
    return in_memory.train_batches(arrays, seed=seed, start_step=start_step,
                                   augment=augment, **common)
  return in_memory.eval_batches(arrays, **common)

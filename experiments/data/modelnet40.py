"""ModelNet40 point clouds: a TFDS builder over the standard files + pipeline.

Shapes: B per-process batch, P = 2,048 points, K classes (40 in ModelNet40).

Builder `modelnet40` (TFDS GeneratorBasedBuilder, manual download), two
configs reading the files most ModelNet40 work uses, from `manual_dir`:
  ply_hdf5_2048 (default): modelnet40_ply_hdf5_2048/ (PointNet's release):
      shape_names.txt, train_files.txt, test_files.txt listing
      ply_data_{train,test}N.h5, each with `data` float32 [n, 2048, 3] and
      `label` [n, 1].
  normal_resampled: modelnet40_normal_resampled/ (PointNet++'s release):
      modelnet40_shape_names.txt, modelnet40_{train,test}.txt listing ids like
      airplane_0001, and <class>/<id>.txt with lines "x,y,z,nx,ny,nz"; the
      first 2,048 points' xyz are kept.
`manual_dir` may be the folder itself or its parent. Splits 'train' (9,843)
and 'test' (2,468). The classes are the lines of the class-list file, in
order (ModelNet40's 40 names, or another set in the same layout such as
`cad_points`'s KiCad parts); the prepared dataset keeps them. A listed file
that is missing or unreadable, an empty or repeated class name, a label
outside the list or a malformed array is an error naming the file; so is a
class list whose length is not the `num_classes` the pipeline is asked for.

Pipeline (in memory, see `in_memory` for order and resumption): inputs
float32 [B, P, 3], labels int32 [B], mask bool [B]. Training multiplies each
point by its own random scale in [0.99, 1.01] (`augment`, default on); every
cloud is then moved to zero mean and scaled so that its largest absolute
coordinate is 1, i.e. into the cube [-1, 1]^3 in which the model's Fourier
position features are defined.
"""
import functools
import os
from typing import Iterator, Optional

import h5py
import numpy as np
import tensorflow_datasets as tfds

from experiments.data import in_memory
from experiments.data import tfds_pipeline

NUM_CLASSES = 40  # ModelNet40's; other sets pass num_classes=
NUM_POINTS = 2048
SCALE_RANGE = (0.99, 1.01)
CLASS_NAMES = (
    'airplane', 'bathtub', 'bed', 'bench', 'bookshelf', 'bottle', 'bowl',
    'car', 'chair', 'cone', 'cup', 'curtain', 'desk', 'door', 'dresser',
    'flower_pot', 'glass_box', 'guitar', 'keyboard', 'lamp', 'laptop',
    'mantel', 'monitor', 'night_stand', 'person', 'piano', 'plant', 'radio',
    'range_hood', 'sink', 'sofa', 'stairs', 'stool', 'table', 'tent', 'toilet',
    'tv_stand', 'vase', 'wardrobe', 'xbox')
SPLITS = ('train', 'test')
_LAYOUT = {  # config -> (folder, class list, {split: index file})
    'ply_hdf5_2048': ('modelnet40_ply_hdf5_2048', 'shape_names.txt',
                      {'train': 'train_files.txt', 'test': 'test_files.txt'}),
    'normal_resampled': (
        'modelnet40_normal_resampled', 'modelnet40_shape_names.txt',
        {'train': 'modelnet40_train.txt', 'test': 'modelnet40_test.txt'}),
}


def _lines(path):
  with open(path) as f:
    return [line.strip() for line in f if line.strip()]


class ModelNet40(tfds.core.GeneratorBasedBuilder):
  """ModelNet40 (Wu et al. 2015), or a set in its layout, as 2,048-point
  clouds; the label names come from the class-list file."""

  name = 'modelnet40'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name='ply_hdf5_2048',
                              description="PointNet's HDF5 point clouds."),
      tfds.core.BuilderConfig(name='normal_resampled',
                              description="PointNet++'s resampled text files."),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  manual_dir holds modelnet40_ply_hdf5_2048/ (shape_names.txt,
  train_files.txt, test_files.txt, ply_data_*.h5) for config ply_hdf5_2048,
  or modelnet40_normal_resampled/ (modelnet40_shape_names.txt,
  modelnet40_{train,test}.txt, <class>/<id>.txt) for normal_resampled.
  """

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'points': tfds.features.Tensor(shape=(NUM_POINTS, 3),
                                           dtype=np.float32),
            # Names set from the class list (_split_generators) and kept in
            # the prepared dataset's label.labels.txt.
            'label': tfds.features.ClassLabel(),
            'id': tfds.features.Text(),  # file:index or shape id.
        }),
        supervised_keys=('points', 'label'),
        homepage='https://modelnet.cs.princeton.edu/',
    )

  def _root(self, manual_dir):
    folder, names_file, _ = _LAYOUT[self.builder_config.name]
    for root in (os.path.join(manual_dir, folder), manual_dir):
      if os.path.exists(os.path.join(root, names_file)):
        return root
    raise FileNotFoundError(
        f'ModelNet40 {self.builder_config.name}: {names_file} found neither '
        f'in {os.path.join(manual_dir, folder)} nor in {manual_dir}.')

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    root = self._root(manual_dir)
    _, names_file, index_files = _LAYOUT[self.builder_config.name]
    names = _class_names(os.path.join(root, names_file))
    self.info.features['label'].names = list(names)
    splits = {}
    for split, index_file in index_files.items():
      index_path = os.path.join(root, index_file)
      if not os.path.exists(index_path):
        raise FileNotFoundError(f'ModelNet40 index {index_path} is missing.')
      splits[split] = self._generate_examples(root, _lines(index_path), names)
    return splits

  def _generate_examples(self, root, entries, names):
    if self.builder_config.name == 'ply_hdf5_2048':
      for entry in entries:
        # The lists name paths inside PointNet's repository; keep the file.
        yield from _hdf5_examples(os.path.join(root, os.path.basename(entry)),
                                  len(names))
    else:
      for shape_id in entries:
        cls = shape_id.rsplit('_', 1)[0]
        path = os.path.join(root, cls, shape_id + '.txt')
        if cls not in names:
          _bad(path, f'unknown class {cls!r}')
        yield shape_id, {'points': _text_points(path),
                         'label': names.index(cls), 'id': shape_id}


def _class_names(path):
  names = tuple(_lines(path))
  if not names:
    raise ValueError(f'ModelNet40 class list {path} is empty.')
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ValueError(f'ModelNet40 class list {path} repeats {repeated}.')
  return names


def _bad(path, problem):
  raise ValueError(f'ModelNet40 file {path}: {problem}.')


def _hdf5_examples(path, num_classes):
  if not os.path.exists(path):
    raise FileNotFoundError(f'ModelNet40 file {path} is listed but missing.')
  try:
    with h5py.File(path, 'r') as f:
      if 'data' not in f or 'label' not in f:
        _bad(path, f'keys {sorted(f.keys())} lack data/label')
      data, label = f['data'][:], f['label'][:]
  except OSError as e:
    raise ValueError(f'ModelNet40 file {path}: unreadable HDF5 ({e}).') from e
  label = label.reshape(-1)
  if data.ndim != 3 or data.shape[1] < NUM_POINTS or data.shape[2] != 3:
    _bad(path, f'data of shape {data.shape}, expected [n, {NUM_POINTS}, 3]')
  if len(label) != len(data):
    _bad(path, f'{len(label)} labels for {len(data)} clouds')
  if len(label) and (label.min() < 0 or label.max() >= num_classes):
    _bad(path, f'labels outside [0, {num_classes}) of the class list')
  name = os.path.basename(path)
  for i, (points, cls) in enumerate(zip(data, label)):
    yield f'{name}:{i}', {'points': points[:NUM_POINTS].astype(np.float32),
                          'label': int(cls), 'id': f'{name}:{i}'}


def _text_points(path):
  if not os.path.exists(path):
    raise FileNotFoundError(f'ModelNet40 file {path} is listed but missing.')
  try:
    points = np.loadtxt(path, delimiter=',', max_rows=NUM_POINTS,
                        dtype=np.float32, ndmin=2)
  except ValueError as e:
    raise ValueError(f'ModelNet40 file {path}: unparsable ({e}).') from e
  if points.shape[0] < NUM_POINTS or points.shape[1] < 3:
    _bad(path, f'{points.shape[0]} points of {points.shape[1]} values, '
         f'expected {NUM_POINTS} lines of x,y,z[,nx,ny,nz]')
  return points[:, :3]


def _builder(data_dir, manual_dir, variant, num_classes):
  if variant not in _LAYOUT:
    raise ValueError(f'ModelNet40 variant {variant!r} not in {list(_LAYOUT)}')
  builder = ModelNet40(data_dir=data_dir, config=variant)
  builder = tfds_pipeline.prepare(builder, data_dir=data_dir,
                                  manual_dir=manual_dir)
  names = builder.info.features['label'].names
  if num_classes is not None and len(names) != num_classes:
    raise ValueError(
        f'The point clouds prepared in {builder.data_dir} (from '
        f'{manual_dir}) have {len(names)} classes ({", ".join(names[:3])}, '
        f'...), not num_classes={num_classes}: set the config\'s '
        f'model.num_classes and data.num_classes to {len(names)}.')
  return builder


def class_names(*, data_dir: Optional[str] = None,
                manual_dir: Optional[str] = None,
                variant: str = 'ply_hdf5_2048', **unused) -> tuple[str, ...]:
  """The prepared dataset's class names, label order (builds it if needed)."""
  del unused
  builder = _builder(data_dir, manual_dir, variant, None)
  return tuple(builder.info.features['label'].names)


@functools.lru_cache(maxsize=4)
def _arrays(split, data_dir, manual_dir, variant, num_classes):
  if split not in SPLITS:
    raise ValueError(f'ModelNet40 split {split!r} is not one of {SPLITS}.')
  builder = _builder(data_dir, manual_dir, variant, num_classes)
  data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1,
                                          shuffle_files=False))
  return {'points': data['points'], 'label': data['label'].astype(np.int32)}


def num_examples(split: str, *, data_dir: Optional[str] = None,
                 manual_dir: Optional[str] = None,
                 variant: str = 'ply_hdf5_2048',
                 num_classes: Optional[int] = NUM_CLASSES, **unused) -> int:
  del unused
  return len(_arrays(split, data_dir, manual_dir, variant,
                     num_classes)['label'])


def majority_rate(config) -> float:
  """Test top-1 of always predicting the most frequent training class, on a
  config's data: the chance level that Table 4's stand-ins are read
  against."""
  data = config.data.to_dict()
  labels = {split: _arrays(split, data.get('data_dir'), data.get('manual_dir'),
                           data.get('variant', 'ply_hdf5_2048'),
                           data.get('num_classes', NUM_CLASSES))['label']
            for split in SPLITS}
  majority = np.bincount(labels['train']).argmax()
  return float(np.mean(labels['test'] == majority))


def normalise(points: np.ndarray) -> np.ndarray:
  """Zero mean, largest |coordinate| 1, per cloud: [B, P, 3] -> [B, P, 3]."""
  centred = points - points.mean(axis=1, keepdims=True)
  extent = np.abs(centred).max(axis=(1, 2), keepdims=True)  # [B, 1, 1]
  return (centred / np.maximum(extent, 1e-12)).astype(np.float32)


def _transform(batch, rng):
  points = batch['points']  # [B, P, 3]
  if rng is not None:
    points = points * rng.uniform(*SCALE_RANGE, size=points.shape[:2] + (1,))
  return {'inputs': normalise(points), 'labels': batch['label']}


def load(split: str, *, batch_size: int, is_training: bool, seed: int = 0,
         start_step: int = 0, process_index: int = 0, process_count: int = 1,
         data_dir: Optional[str] = None, manual_dir: Optional[str] = None,
         variant: str = 'ply_hdf5_2048', augment: bool = True,
         num_classes: Optional[int] = NUM_CLASSES
         ) -> Iterator[dict[str, np.ndarray]]:
  """Batches of ModelNet40 point clouds; see the module docstring.

  Args:
    split: 'train' or 'test'.
    manual_dir: folder of the downloaded files (or its parent), used to build
      `modelnet40/<variant>` in `data_dir` if it is not prepared there.
    variant: builder config, 'ply_hdf5_2048' or 'normal_resampled'.
    augment: training only: random per-point scale in [0.99, 1.01].
    num_classes: the number of classes the class list must hold (None: any).
  """
  arrays = _arrays(split, data_dir, manual_dir, variant, num_classes)
  common = dict(batch_size=batch_size, process_index=process_index,
                process_count=process_count, transform=_transform)
  if is_training:
    return in_memory.train_batches(arrays, seed=seed, start_step=start_step,
                                   augment=augment, **common)
  return in_memory.eval_batches(arrays, **common)

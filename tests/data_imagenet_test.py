"""ImageNet: real JPEGs in the ILSVRC2012 tar layout, through TFDS's builder."""
import io
import os
import tarfile

import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from experiments.data import imagenet
from experiments.data import randaugment

SYNSETS = ('n01440764', 'n01443537', 'n01484850')  # Classes 0, 1, 2.
PER_SYNSET, NUM_VAL = 4, 6
_LABELS = tfds.core.tfds_path(
    'datasets/imagenet2012/labels.txt').read_text().split()
_VAL_LABELS = tfds.core.tfds_path(
    'datasets/imagenet2012/validation_labels.txt').read_text().split()


def _colour(label):
  """A colour per class, so crops reveal the label they should carry."""
  return np.array([label * 37 % 200 + 28, label * 91 % 200 + 28,
                   label * 53 % 200 + 28], np.float32)


def _jpeg(array, quality=95):
  buf = io.BytesIO()
  Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(
      buf, 'JPEG', quality=quality)
  return buf.getvalue()


def _class_image(label, h, w, rng):
  texture = (np.linspace(-20, 20, h)[:, None, None]
             + rng.normal(0, 8, (h, w, 1)))  # Zero-mean texture.
  return _jpeg(_colour(label) + texture)


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _write_manual_dir(path):
  rng = np.random.default_rng(0)
  os.makedirs(path)
  with tarfile.open(os.path.join(path, 'ILSVRC2012_img_train.tar'),
                    'w') as train:
    for synset in SYNSETS:
      buf = io.BytesIO()
      with tarfile.open(fileobj=buf, mode='w') as inner:
        for i in range(PER_SYNSET):
          _add(inner, f'{synset}_{i}.JPEG', _class_image(
              _LABELS.index(synset), 40 + 8 * i, 64 - 4 * i, rng))
      _add(train, f'{synset}.tar', buf.getvalue())
  with tarfile.open(os.path.join(path, 'ILSVRC2012_img_val.tar'), 'w') as val:
    for i in range(NUM_VAL, 0, -1):  # TFDS sorts the names itself.
      label = _LABELS.index(_VAL_LABELS[i - 1])
      _add(val, f'ILSVRC2012_val_{i:08d}.JPEG',
           _class_image(label, 48, 36 + 6 * i, rng))


@pytest.fixture(scope='module')
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp('imagenet')
  manual_dir, data_dir = str(root / 'manual'), str(root / 'tfds')
  _write_manual_dir(manual_dir)
  # Builds imagenet2012 with TFDS's own builder from the tars.
  assert imagenet.num_examples('train', data_dir=data_dir,
                               manual_dir=manual_dir) == 12
  return {'data_dir': data_dir, 'manual_dir': manual_dir}


def _pixels(inputs):
  return inputs * np.array(imagenet.STD) * 255 + np.array(imagenet.MEAN) * 255


def test_eval_centre_crops_carry_the_official_validation_labels(dirs):
  assert imagenet.num_examples('validation', data_dir=dirs['data_dir']) == 6
  batches = list(imagenet.load('validation', batch_size=4, is_training=False,
                               data_dir=dirs['data_dir']))
  assert len(batches) == 2
  batch = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  assert batch['inputs'].shape == (8, 224, 224, 3)
  assert batch['inputs'].dtype == np.float32 and batch['labels'].dtype == np.int32
  np.testing.assert_array_equal(batch['mask'], [True] * 6 + [False] * 2)
  labels = batch['labels'][:6]
  assert sorted(labels) == sorted(_LABELS.index(s) for s in _VAL_LABELS[:6])
  for image, label in zip(_pixels(batch['inputs'][:6]), labels):
    np.testing.assert_allclose(image.mean((0, 1)), _colour(label), atol=8)
  assert not batch['inputs'][6:].any()


def test_centre_crop_window():
  # min side = S + 32, so the crop is S x S and the resize is the identity.
  y, x = np.mgrid[:64, :80]
  array = np.stack([x * 3, y * 3, np.full_like(x, 100)], -1)
  jpeg = _jpeg(array, quality=100)
  crop = imagenet.center_crop(tf.constant(jpeg), 32).numpy()
  full = tf.io.decode_jpeg(jpeg).numpy().astype(np.float32)
  # atol 2: chroma upsampling differs at the crop edge; a 1-pixel shift of
  # the window would be off by 3 everywhere.
  np.testing.assert_allclose(crop, full[16:48, 24:56], atol=2)


def test_inception_crop_area_and_aspect():
  size = 200
  y, x = np.mgrid[:size, :size]
  jpeg = tf.constant(_jpeg(np.stack([x * 255 / (size - 1), y * 255 / (size - 1),
                                     np.zeros_like(x)], -1), quality=100))
  shapes = set()
  for i in range(30):
    crop = imagenet.inception_crop(jpeg, tf.constant([i, 7]), 32).numpy()
    assert crop.shape == (32, 32, 3)
    width = (crop[:, :, 0].max() - crop[:, :, 0].min()) / 255 * size
    height = (crop[:, :, 1].max() - crop[:, :, 1].min()) / 255 * size
    assert 0.07 * size**2 <= width * height <= 1.01 * size**2
    assert 0.7 <= width / height <= 1.4
    shapes.add((round(width), round(height)))
  assert len(shapes) > 20


def _train(dirs, **kwargs):
  kwargs = {'batch_size': 4, 'is_training': True, 'image_size': 32,
            'data_dir': dirs['data_dir'], **kwargs}
  return imagenet.load('train', **kwargs)


def test_train_batches_and_exact_resume(dirs):
  it = _train(dirs, seed=1)
  batches = [next(it) for _ in range(5)]  # 20 examples: crosses an epoch.
  batch = batches[0]
  assert batch['inputs'].shape == (4, 32, 32, 3)
  assert batch['labels'].dtype == np.int32 and batch['mask'].all()
  pixels = _pixels(np.stack([b['inputs'] for b in batches]))
  assert pixels.min() > -0.01 and pixels.max() < 255.01
  assert set(np.concatenate([b['labels'] for b in batches])) <= {0, 1, 2}
  resumed = _train(dirs, seed=1, start_step=3)
  for expected in batches[3:]:
    got = next(resumed)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])
  other = next(_train(dirs, seed=2))
  assert not np.array_equal(other['inputs'], batch['inputs'])


def test_each_epoch_sees_every_training_image_once(dirs):
  it = _train(dirs, batch_size=12, randaugment_layers=0)
  for _ in range(2):
    batch = next(it)
    np.testing.assert_array_equal(np.bincount(batch['labels']), [4, 4, 4])
    for image, label in zip(_pixels(batch['inputs']), batch['labels']):
      np.testing.assert_allclose(image.mean((0, 1)), _colour(label), atol=25)


def test_processes_get_disjoint_validation_shards(dirs):
  labels, steps = [], []
  for p in range(2):
    batches = list(imagenet.load('validation', batch_size=2, is_training=False,
                                 data_dir=dirs['data_dir'], process_index=p,
                                 process_count=2, image_size=16))
    steps.append(len(batches))
    labels += [l for b in batches for l in b['labels'][b['mask']]]
  assert steps == [2, 2]  # Lockstep: 3 examples each, padded to 2 batches.
  assert sorted(labels) == sorted(_LABELS.index(s) for s in _VAL_LABELS[:6])


def test_processes_train_on_disjoint_shards(dirs):
  labels = []
  for p in range(2):  # Each shard holds 6 images; one batch = its epoch.
    batch = next(_train(dirs, batch_size=6, randaugment_layers=0,
                        process_index=p, process_count=2))
    for image, label in zip(_pixels(batch['inputs']), batch['labels']):
      np.testing.assert_allclose(image.mean((0, 1)), _colour(label), atol=25)
    labels.append(batch['labels'])
  np.testing.assert_array_equal(np.bincount(np.concatenate(labels)), [4, 4, 4])
  assert not np.array_equal(np.sort(labels[0]), np.sort(labels[1]))


def test_missing_directories(tmp_path):
  with pytest.raises(FileNotFoundError, match='manual_dir .*nowhere'):
    imagenet.num_examples('train', data_dir=str(tmp_path / 'd'),
                          manual_dir=str(tmp_path / 'nowhere'))
  with pytest.raises(FileNotFoundError, match='data_dir .*absent'):
    imagenet.load('train', batch_size=2, is_training=True,
                  data_dir=str(tmp_path / 'absent'))
  with pytest.raises(FileNotFoundError, match='not prepared'):
    imagenet.num_examples('train', data_dir=str(tmp_path))
  empty = tmp_path / 'empty_manual'
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match='empty_manual lacks '
                     'ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar'):
    imagenet.num_examples('train', data_dir=str(tmp_path / 'd2'),
                          manual_dir=str(empty))


def test_randaugment_ops_match_pil():
  rng = np.random.default_rng(0)
  array = rng.integers(0, 256, (20, 30, 3)).astype(np.uint8)
  array[:5] = 3  # An uneven histogram for equalize.
  image, pil = tf.constant(array, tf.float32), Image.fromarray(array)
  exact = [(randaugment._equalize(image), ImageOps.equalize(pil)),
           (randaugment._auto_contrast(image), ImageOps.autocontrast(pil)),
           (randaugment._solarize(image, 100.), ImageOps.solarize(pil, 100)),
           (randaugment._posterize(image, 3), ImageOps.posterize(pil, 3))]
  for ours, ref in exact:
    np.testing.assert_array_equal(np.round(ours), np.asarray(ref))
  enhance = [(randaugment._colour, ImageEnhance.Color),
             (randaugment._contrast, ImageEnhance.Contrast),
             (randaugment._brightness, ImageEnhance.Brightness),
             (randaugment._sharpness, ImageEnhance.Sharpness)]
  for ours, ref in enhance:  # PIL rounds differently: off by at most one.
    np.testing.assert_allclose(np.round(ours(image, 1.6)),
                               np.asarray(ref(pil).enhance(1.6)), atol=1)
  square = array[:, :20]
  rotated = randaugment._rotate(tf.constant(square, tf.float32), 90.)
  np.testing.assert_array_equal(rotated, np.rot90(square, -1))
  shifted = randaugment._translate_x(image, 0.1).numpy()
  np.testing.assert_array_equal(shifted[:, :-3], array[:, 3:])
  assert (shifted[:, -3:] == 128).all()


def test_randaugment_is_deterministic_and_bounded():
  image = tf.constant(np.random.default_rng(1).integers(0, 256, (24, 24, 3)),
                      tf.float32)
  outs = [randaugment.randaugment(image, tf.constant([k, 0]), num_layers=2,
                                  magnitude=9.).numpy() for k in range(12)]
  again = randaugment.randaugment(image, tf.constant([0, 0]), num_layers=2,
                                  magnitude=9.).numpy()
  np.testing.assert_array_equal(outs[0], again)
  assert len({o.tobytes() for o in outs}) > 8
  assert min(o.min() for o in outs) >= 0 and max(o.max() for o in outs) <= 255
  with pytest.raises(ValueError, match='magnitude'):
    randaugment.randaugment(image, tf.constant([0, 0]), num_layers=1,
                            magnitude=11.)

"""ImageNet (ILSVRC 2012) through TFDS's own `imagenet2012` builder.

Shapes: B per-process batch, S = image_size (224), K = 1000 classes.

Data. `data_dir` holds (or receives) the prepared TFDS `imagenet2012`; when
it is not prepared, it is built from `manual_dir`, which must hold the
official ILSVRC2012_img_train.tar (one tar per synset inside) and
ILSVRC2012_img_val.tar (validation labels come bundled with TFDS). Splits
'train' (1,281,167) and 'validation' (50,000). Nothing is downloaded.

Training (`is_training=True`): Inception-style random crop (area 0.08-1 of
the image, aspect ratio 3/4-4/3, decoded straight from the JPEG) resized
bilinearly to S x S, random horizontal flip, RandAugment (`randaugment_layers`
ops at `randaugment_magnitude`; 0 layers turns it off). MixUp and CutMix are
not done here: the runner mixes batches on the device (experiments/mixing.py,
`config.mixup`), for every dataset alike.
Evaluation: the central crop of side S/(S+32) of the short side, resized to
S x S. Both normalise with the ImageNet MEAN and STD (of pixels in [0, 1]).

Yields inputs float32 [B, S, S, 3]; labels int32 [B]; mask bool [B]. Position features and the fixed pixel permutation of the
"permuted ImageNet" experiment are the model's, applied to the crop.
Training order and randomness: see `tfds_pipeline` (deterministic in seed and
step; `start_step` resumes exactly).
"""
import os
from typing import Iterator, Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from experiments.data import randaugment
from experiments.data import tfds_pipeline

NUM_CLASSES = 1000
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
CROP_PADDING = 32
SPLITS = ('train', 'validation')
_DECODERS = {'image': tfds.decode.SkipDecoding()}


MANUAL_FILES = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')


def _builder(data_dir, manual_dir):
  builder = tfds.builder('imagenet2012', data_dir=data_dir)
  if not builder.is_prepared() and manual_dir and os.path.isdir(manual_dir):
    # TFDS's builder needs both tars (it reads the validation names eagerly).
    missing = [f for f in MANUAL_FILES
               if not os.path.exists(os.path.join(manual_dir, f))]
    if missing:
      raise FileNotFoundError(
          f'ImageNet manual_dir {manual_dir} lacks {", ".join(missing)}.')
  return tfds_pipeline.prepare(builder, data_dir=data_dir,
                               manual_dir=manual_dir)


def _check_split(split):
  if split.split('[')[0] not in SPLITS:
    raise ValueError(f'ImageNet split {split!r} is not one of {SPLITS}.')


def num_examples(split: str, *, data_dir: Optional[str] = None,
                 manual_dir: Optional[str] = None, **unused) -> int:
  del unused
  _check_split(split)
  return tfds_pipeline.num_examples(_builder(data_dir, manual_dir), split)


def _normalise(image):  # [S, S, 3] in [0, 255] -> normalised float32
  scale = tf.constant(1. / (255. * np.array(STD)), tf.float32)
  return image * scale - tf.constant(np.array(MEAN) / np.array(STD),
                                     tf.float32)


def inception_crop(jpeg, key, image_size):
  """Random crop of area 0.08-1, aspect 3/4-4/3, resized: [S, S, 3] float."""
  shape = tf.image.extract_jpeg_shape(jpeg)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([[[0., 0., 1., 1.]]]), seed=key,
      min_object_covered=0., aspect_ratio_range=(3. / 4., 4. / 3.),
      area_range=(0.08, 1.), max_attempts=10, use_image_if_no_bounding_boxes=True)
  window = tf.stack([begin[0], begin[1], size[0], size[1]])
  image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
  return tf.image.resize(image, [image_size, image_size], 'bilinear')


def center_crop(jpeg, image_size):
  """Central crop of side S/(S+32) of the short side, resized: [S, S, 3]."""
  shape = tf.image.extract_jpeg_shape(jpeg)
  h, w = shape[0], shape[1]
  side = tf.cast(tf.cast(tf.minimum(h, w), tf.float32) * image_size
                 / (image_size + CROP_PADDING), tf.int32)
  window = tf.stack([(h - side + 1) // 2, (w - side + 1) // 2, side, side])
  image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
  return tf.image.resize(image, [image_size, image_size], 'bilinear')


def load(split: str, *, batch_size: int, is_training: bool, seed: int = 0,
         start_step: int = 0, process_index: int = 0, process_count: int = 1,
         data_dir: Optional[str] = None, manual_dir: Optional[str] = None,
         image_size: int = 224, randaugment_layers: int = 2,
         randaugment_magnitude: float = 9., shuffle_buffer: int = 10_000
         ) -> Iterator[dict[str, np.ndarray]]:
  """Batches of ImageNet crops; see the module docstring.

  Args:
    split: 'train' or 'validation' (or a TFDS slice of them).
    manual_dir: directory of the ILSVRC2012 tar files, used to build
      `imagenet2012` in `data_dir` if it is not prepared there.
    randaugment_layers, randaugment_magnitude: RandAugment's N and M
      (training only; N=0 disables it).
    shuffle_buffer: records in the training shuffle buffer.
  """
  _check_split(split)
  builder = _builder(data_dir, manual_dir)
  common = dict(batch_size=batch_size, process_index=process_index,
                process_count=process_count, decoders=_DECODERS)
  if not is_training:
    def preprocess_eval(example):
      image = center_crop(example['image'], image_size)
      return {'inputs': _normalise(image),
              'labels': tf.cast(example['label'], tf.int32)}
    return tfds_pipeline.as_numpy(tfds_pipeline.eval_dataset(
        builder, split, preprocess=preprocess_eval, **common))

  def preprocess_train(example, key):
    k_crop, k_flip, k_augment = tf.unstack(
        tf.random.experimental.stateless_split(key, 3))
    image = inception_crop(example['image'], k_crop, image_size)
    image = tf.image.stateless_random_flip_left_right(image, k_flip)
    if randaugment_layers:
      image = randaugment.randaugment(
          tf.round(image), k_augment, num_layers=randaugment_layers,
          magnitude=randaugment_magnitude)
    return {'inputs': _normalise(image),
            'labels': tf.cast(example['label'], tf.int32)}

  return tfds_pipeline.as_numpy(tfds_pipeline.train_dataset(
      builder, split, seed=seed, start_step=start_step,
      shuffle_buffer=shuffle_buffer, preprocess=preprocess_train, **common))

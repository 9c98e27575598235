"""AudioSet input pipeline: audio, video or both, K-way multi-hot labels.

Shapes: B per-process batch, W = 61,440 samples (1.28 s at 48 kHz),
T = 120 mel frames, F = 40 mel bins, V = 32 video frames (1.28 s at 25 fps),
S = image_size (224), C = num_eval_clips (16), K classes (527 in AudioSet;
the prepared data's class_labels_indices.csv decides, see `num_classes`).

Data: TFDS `audioset` (see `audioset_builder`: the user's clips plus the
official CSVs in `manual_dir`), config `audio` for modality 'audio' and
`audio_video` for 'video' and 'audio_video'. Splits: 'train' (every train
split that was built: balanced_train and unbalanced_train) and 'eval', or any
TFDS split of the builder.

One window is 1.28 s. Training takes one random window per clip (for video
and audio+video the window starts on a frame, and the audio window starts at
that frame's sample, so both modalities cover the same 1.28 s); evaluation
takes C evenly spaced windows from the start to the end of the clip (clips
shorter than a window are zero-padded, videos repeat their last frame) and
yields them stacked; the runner averages the C scores.

Modalities, `inputs` per example (training; evaluation adds the C axis):
  audio, audio_format='raw'   float32 [W], samples / 32768 in [-1, 1].
  audio, audio_format='mel'   float32 [T, F]: |STFT|^2 with a 1024-sample
      Hann frame, hop 512, padded at the end (120 frames), 40 mel bins from
      0 Hz to 24 kHz, log(mel + 1e-6), then standardised over the window
      (zero mean, unit variance). Training adds SpecAugment: 2 frequency
      masks of up to 8 bins and 2 time masks of up to 24 frames, set to 0.
  video                       float32 [V, S, S, 3]: training takes one random
      crop per window (area 0.3-1 of the frame, aspect 3/4-4/3) resized to
      S, a random flip and colour jitter (brightness +-32/255, contrast and
      saturation x0.6-1.4, hue rotation +-0.05 turns in YIQ space), the same
      for every frame; evaluation the central square crop resized to S.
      Pixels in [0, 1] normalised with the ImageNet MEAN/STD.
  audio_video                 {'audio': as audio, 'video': as video}; in
      training the whole video of an example is zeroed with probability
      `video_dropout` (0.3).
labels float32 [B, K] multi-hot; mask bool [B]. Order, randomness and
resumption: `tfds_pipeline`.
"""
from typing import Iterator, Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from experiments.data import audioset_builder
from experiments.data import tfds_pipeline

NUM_CLASSES = audioset_builder.NUM_CLASSES
SAMPLE_RATE = audioset_builder.SAMPLE_RATE
FPS = audioset_builder.FPS
WINDOW = 61_440  # 1.28 s of samples.
NUM_FRAMES = 32  # 1.28 s of video frames.
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 1920
MEL_FRAME_LENGTH = 1024
MEL_FRAME_STEP = 512
NUM_MEL_BINS = 40
MEL_FRAMES = -(-WINDOW // MEL_FRAME_STEP)  # 120
MEL_LOWER_HZ, MEL_UPPER_HZ = 0., SAMPLE_RATE / 2
LOG_OFFSET = 1e-6
FREQ_MASKS, MAX_FREQ_MASK = 2, 8
TIME_MASKS, MAX_TIME_MASK = 2, 24
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
MODALITIES = ('audio', 'video', 'audio_video')
AUDIO_FORMATS = ('raw', 'mel')


def _builder(data_dir, manual_dir, modality, num_classes=None):
  """The prepared builder; ValueError if its class count is not
  `num_classes` (when given)."""
  if modality not in MODALITIES:
    raise ValueError(f'AudioSet modality {modality!r} not in {MODALITIES}.')
  config = 'audio' if modality == 'audio' else 'audio_video'
  builder = audioset_builder.AudioSet(data_dir=data_dir, config=config)
  builder = tfds_pipeline.prepare(builder, data_dir=data_dir,
                                  manual_dir=manual_dir)
  found = data_num_classes(builder)
  if num_classes is not None and found != num_classes:
    raise ValueError(
        f'AudioSet data in {builder.data_dir} have {found} classes (from '
        f'class_labels_indices.csv) but num_classes={num_classes} was asked '
        'for.')
  return builder


def data_num_classes(builder) -> int:
  """K of a prepared `audioset` builder: its class list's length."""
  found = builder.info.features['labels'].feature.num_classes
  if not found:
    raise ValueError(f'AudioSet data in {builder.data_dir} have no class '
                     'names (built by an older version?); rebuild them.')
  return found


def _resolve_split(builder, split):
  if split == 'train':
    present = [s for s in ('balanced_train', 'unbalanced_train')
               if s in builder.info.splits]
    if not present:
      raise ValueError(f'AudioSet in {builder.data_dir} has no train split.')
    return '+'.join(present)
  return split


def num_examples(split: str, *, data_dir: Optional[str] = None,
                 manual_dir: Optional[str] = None, modality: str = 'audio',
                 num_classes: Optional[int] = None, **unused) -> int:
  del unused
  builder = _builder(data_dir, manual_dir, modality, num_classes)
  return tfds_pipeline.num_examples(builder, _resolve_split(builder, split))


def log_mel(audio: tf.Tensor) -> tf.Tensor:
  """[..., W] waveform in [-1, 1] -> [..., T, F] standardised log-mel."""
  stft = tf.signal.stft(audio, MEL_FRAME_LENGTH, MEL_FRAME_STEP,
                        pad_end=True)  # [..., T, 513]
  power = tf.math.square(tf.abs(stft))
  matrix = tf.signal.linear_to_mel_weight_matrix(
      NUM_MEL_BINS, MEL_FRAME_LENGTH // 2 + 1, SAMPLE_RATE, MEL_LOWER_HZ,
      MEL_UPPER_HZ)  # [513, F]
  mel = tf.math.log(tf.tensordot(power, matrix, 1) + LOG_OFFSET)  # [..., T, F]
  mean, var = tf.nn.moments(mel, axes=[-2, -1], keepdims=True)
  return (mel - mean) / tf.sqrt(var + 1e-6)


def spec_augment(mel: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
  """Zeroes random frequency and time bands of [T, F]."""
  keys = tf.random.experimental.stateless_split(key, 2 * (FREQ_MASKS +
                                                          TIME_MASKS))
  masks = [(1, NUM_MEL_BINS, MAX_FREQ_MASK)] * FREQ_MASKS + [
      (0, MEL_FRAMES, MAX_TIME_MASK)] * TIME_MASKS
  keep = tf.ones_like(mel, tf.bool)
  for i, (axis, size, max_width) in enumerate(masks):
    width = tf.random.stateless_uniform([], keys[2 * i], 0, max_width + 1,
                                        tf.int32)
    start = tf.random.stateless_uniform([], keys[2 * i + 1], 0,
                                        size - width + 1, tf.int32)
    band = tf.logical_or(tf.range(size) < start, tf.range(size) >= start + width)
    keep = tf.logical_and(keep, band[:, None] if axis == 0 else band[None, :])
  return tf.where(keep, mel, 0.)


def _windows(audio, starts):
  """int16 [L] and [N] starts -> float32 [N, W] (zero-padded at the end)."""
  short = tf.reduce_max(starts) + WINDOW - tf.shape(audio)[0]
  audio = tf.pad(audio, [[0, tf.maximum(short, 0)]])
  windows = tf.stack([tf.slice(audio, [s], [WINDOW])  # Slices: fast copies.
                      for s in tf.unstack(starts, num=starts.shape[0])])
  return tf.cast(windows, tf.float32) / 32768.  # [N, W]


def _decode_frames(jpegs, window):
  """[n] JPEG frames, crop window [4] (y, x, h, w) -> uint8 [n, h, w, 3]."""
  return tf.map_fn(
      lambda s: tf.io.decode_and_crop_jpeg(s, window, channels=3), jpegs,
      fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8))


def _frame_index(count, starts):
  """[N] start frames -> [N, V] frame indices, repeating the last frame."""
  return tf.minimum(starts[:, None] + tf.range(NUM_FRAMES)[None], count - 1)


def _normalise_video(frames):  # float32 in [0, 1]
  # Explicit float32 constants: broadcasting Python tuples is much slower.
  scale = tf.constant(1. / np.array(STD), tf.float32)
  return frames * scale - tf.constant(np.array(MEAN), tf.float32) * scale


# RGB <-> YIQ; a hue shift is a rotation of the (I, Q) chroma plane.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322],
                        [0.211, -0.523, 0.312]], np.float32)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ).astype(np.float32)


def _colour_matrix(saturation, hue):
  """[3, 3] acting on RGB row vectors: scale chroma, rotate hue (turns)."""
  angle = 2. * np.pi * hue
  cos, sin = tf.cos(angle) * saturation, tf.sin(angle) * saturation
  yiq = tf.stack([tf.constant([1., 0., 0.]), tf.stack([0., cos, -sin]),
                  tf.stack([0., sin, cos])])  # [3, 3] on YIQ column vectors
  return tf.transpose(_YIQ_TO_RGB @ yiq @ _RGB_TO_YIQ)


def _video_train(jpegs, starts, key, image_size):
  """[F] JPEG frames, [1] start -> float32 [V, S, S, 3].

  One random crop, flip and colour jitter for all frames of the window; the
  crop is decoded straight from the JPEGs. Colour: brightness offset, then
  contrast about each frame's mean grey, then saturation and hue as one
  linear map in YIQ space.
  """
  keys = tf.unstack(tf.random.experimental.stateless_split(key, 6))
  index = _frame_index(tf.shape(jpegs)[0], starts)[0]  # [V]
  window_jpegs = tf.gather(jpegs, index)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.image.extract_jpeg_shape(window_jpegs[0]),
      tf.constant([[[0., 0., 1., 1.]]]), seed=keys[0], min_object_covered=0.,
      aspect_ratio_range=(3. / 4., 4. / 3.), area_range=(0.3, 1.),
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  crop = _decode_frames(window_jpegs, tf.stack([begin[0], begin[1], size[0],
                                                size[1]]))  # [V, h, w, 3]
  video = tf.image.resize(crop, [image_size, image_size]) / 255.
  flip = tf.random.stateless_uniform([], keys[1]) < 0.5
  video = tf.cond(flip, lambda: tf.reverse(video, [2]), lambda: video)
  uniform = lambda k, lo, hi: tf.random.stateless_uniform([], k, lo, hi)
  video = video + uniform(keys[2], -32 / 255, 32 / 255)
  grey = tf.reduce_mean(tf.tensordot(video, _RGB_TO_YIQ[0], 1), axis=[1, 2])
  grey = grey[:, None, None, None]  # [V, 1, 1, 1]
  video = grey + uniform(keys[3], 0.6, 1.4) * (video - grey)
  video = tf.tensordot(video, _colour_matrix(uniform(keys[4], 0.6, 1.4),
                                             uniform(keys[5], -0.05, 0.05)), 1)
  return _normalise_video(tf.clip_by_value(video, 0., 1.))


def _video_eval(jpegs, starts, image_size):
  """[F] JPEG frames, [C] starts -> float32 [C, V, S, S, 3], central square.

  Each frame is decoded and resized once, then gathered into the windows.
  """
  shape = tf.image.extract_jpeg_shape(jpegs[0])
  h, w = shape[0], shape[1]
  side = tf.minimum(h, w)
  window = tf.stack([(h - side) // 2, (w - side) // 2, side, side])
  frames = tf.image.resize(_decode_frames(jpegs, window),
                           [image_size, image_size]) / 255.  # [F, S, S, 3]
  return tf.gather(_normalise_video(frames),
                   _frame_index(tf.shape(jpegs)[0], starts))


def _multi_hot(labels, num_classes):
  """[n] class indices -> float32 [K] multi-hot (zeros when n = 0)."""
  return tf.minimum(tf.reduce_sum(tf.one_hot(labels, num_classes), 0), 1.)


def _make_preprocess(modality, audio_format, is_training, *, image_size,
                     num_eval_clips, specaugment, video_dropout,
                     num_classes=NUM_CLASSES):
  """Returns preprocess(example, key) -> {'inputs', 'labels'}."""
  uses_audio = modality in ('audio', 'audio_video')
  uses_video = modality in ('video', 'audio_video')

  def audio_inputs(audio, starts, key):
    windows = _windows(audio, starts)  # [N, W]
    if audio_format == 'mel':
      windows = log_mel(windows)  # [N, T, F]
      if is_training and specaugment:
        windows = spec_augment(windows[0], key)[None]
    return windows

  def preprocess(example, key=None):
    keys = (tf.unstack(tf.random.experimental.stateless_split(key, 4))
            if is_training else [None] * 4)
    audio = example['audio']  # int16 [L]
    if uses_video:  # Windows start on frames; audio follows the frame.
      count = tf.maximum(tf.shape(example['video'])[0] - NUM_FRAMES, 0)
    else:
      count = tf.maximum(tf.shape(audio)[0] - WINDOW, 0)
    if is_training:
      starts = tf.random.stateless_uniform([1], keys[0], 0, count + 1,
                                           tf.int32)  # [1]
    else:
      starts = tf.cast(tf.round(tf.linspace(0., tf.cast(count, tf.float32),
                                            num_eval_clips)), tf.int32)  # [C]
    inputs = {}
    if uses_audio:
      audio_starts = starts * SAMPLES_PER_FRAME if uses_video else starts
      inputs['audio'] = audio_inputs(audio, audio_starts, keys[1])
    if uses_video:
      if is_training:
        video = _video_train(example['video'], starts, keys[2],
                             image_size)[None]
        if modality == 'audio_video' and video_dropout:
          drop = tf.random.stateless_uniform([], keys[3]) < video_dropout
          video = tf.cond(drop, lambda: tf.zeros_like(video), lambda: video)
      else:
        video = _video_eval(example['video'], starts, image_size)
      inputs['video'] = video
    lead = [] if is_training else [num_eval_clips]
    shapes = {'audio': [WINDOW] if audio_format == 'raw'
                       else [MEL_FRAMES, NUM_MEL_BINS],
              'video': [NUM_FRAMES, image_size, image_size, 3]}
    # Training has a single window: drop the window axis.
    inputs = {k: tf.ensure_shape(v[0] if is_training else v, lead + shapes[k])
              for k, v in inputs.items()}
    return {'inputs': inputs if modality == 'audio_video' else inputs[
        'audio' if modality == 'audio' else 'video'],
            'labels': _multi_hot(example['labels'], num_classes)}
  return preprocess


def load(split: str, *, batch_size: int, is_training: bool, seed: int = 0,
         start_step: int = 0, process_index: int = 0, process_count: int = 1,
         data_dir: Optional[str] = None, manual_dir: Optional[str] = None,
         modality: str = 'audio', audio_format: str = 'raw',
         image_size: int = 224, num_eval_clips: int = 16,
         specaugment: bool = True, video_dropout: float = 0.3,
         shuffle_buffer: int = 1_000, num_classes: Optional[int] = None,
         ) -> Iterator[dict[str, np.ndarray]]:
  """Batches of AudioSet windows; see the module docstring.

  Args:
    split: 'train', 'eval' or a TFDS split of the `audioset` builder.
    manual_dir: directory of the CSVs and clips, used to build `audioset` in
      `data_dir` if it is not prepared there.
    modality: 'audio', 'video' or 'audio_video'.
    audio_format: 'raw' (waveform) or 'mel' (log-mel spectrogram).
    image_size: side of the video crops.
    num_eval_clips: windows per clip at evaluation.
    specaugment: training only, mel only: frequency and time masking.
    video_dropout: training only, audio_video only: probability of zeroing
      an example's video.
    shuffle_buffer: clips in the training shuffle buffer (~1 MB each of
      audio, a few MB with video).
    num_classes: K expected of the data (e.g. the model's); None accepts
      whatever class list the data were built with. `labels` are [B, K].
  """
  if audio_format not in AUDIO_FORMATS:
    raise ValueError(f'audio_format {audio_format!r} not in {AUDIO_FORMATS}.')
  builder = _builder(data_dir, manual_dir, modality, num_classes)
  split = _resolve_split(builder, split)
  preprocess = _make_preprocess(
      modality, audio_format, is_training, image_size=image_size,
      num_eval_clips=num_eval_clips, specaugment=specaugment,
      video_dropout=video_dropout, num_classes=data_num_classes(builder))
  decoders = ({'video': tfds.decode.SkipDecoding()}
              if modality != 'audio' else None)
  common = dict(batch_size=batch_size, process_index=process_index,
                process_count=process_count, decoders=decoders,
                preprocess=preprocess)
  if is_training:
    return tfds_pipeline.as_numpy(tfds_pipeline.train_dataset(
        builder, split, seed=seed, start_step=start_step,
        shuffle_buffer=shuffle_buffer, **common))
  return tfds_pipeline.as_numpy(tfds_pipeline.eval_dataset(
      builder, split, **common))

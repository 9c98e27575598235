"""TFDS builder `audioset` over the user's downloaded AudioSet clips.

Layout of `manual_dir` (the official CSVs as published, plus the clips):

  class_labels_indices.csv         index,mid,display_name (527 classes in
                                   AudioSet; any number K >= 1 is read)
  balanced_train_segments.csv      '#' header lines, then rows
  unbalanced_train_segments.csv      YTID, start_seconds, end_seconds,
  eval_segments.csv                  "label_mid,label_mid,..."
  audio/<NAME>.{wav,flac,ogg,opus,mp3,m4a}   the segment's audio, or
  video/<NAME>.{mp4,mkv,webm}                the segment's video (its audio
                                             stream serves when audio/ has
                                             no file for the YTID)

NAME is the YTID as the CSV spells it, or as common download scripts save
it: Y<YTID> and <YTID>_<start>_<end> with the times as 30.000 / 30.0 / 30
(also Y<YTID>_<start>_<end>); the first that exists is read.

Each file holds just its segment (start_seconds..end_seconds of the CSV row),
as AudioSet downloaders write them. Any CSV may be absent (its split is then
not built); at least one must be there. Splits: balanced_train,
unbalanced_train, eval.

Configs:
  audio        audio int16 [T]: mono, resampled to 48 kHz.
  audio_video  audio as above and video [F] JPEG frames at 25 fps, resized so
               that the short side is 256 (nearest earlier source frame for
               each 1/25 s tick). Rows without a video file are skipped.
Both store ytid, start_seconds and labels (class indices, any number); the
label feature's names are the mids of class_labels_indices.csv in index
order, so `info.features['labels'].feature.num_classes` is K.

A clip whose file is absent, fails to decode, or is more than a second longer
than its segment (a whole video where a segment was expected) is skipped,
never guessed at; each skip is logged by file name and listed in
skipped-<split>.txt beside the prepared data. A split of which no clip can be
read is an error naming the CSV and the expected paths. Decoding uses PyAV.
"""
import csv
import os

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

NUM_CLASSES = 527  # AudioSet's ontology; other class lists are read as given.
SAMPLE_RATE = 48_000
FPS = 25
VIDEO_SHORT_SIDE = 256
CSV_FILES = {
    'balanced_train': 'balanced_train_segments.csv',
    'unbalanced_train': 'unbalanced_train_segments.csv',
    'eval': 'eval_segments.csv',
}
LABELS_CSV = 'class_labels_indices.csv'
AUDIO_EXTENSIONS = ('.wav', '.flac', '.ogg', '.opus', '.mp3', '.m4a')
VIDEO_EXTENSIONS = ('.mp4', '.mkv', '.webm')
_SLACK_SECONDS = 1.0  # Allowed excess of a clip over its segment.


def read_class_labels(path: str) -> dict[str, int]:
  """mid -> class index from class_labels_indices.csv."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'AudioSet class list {path} is missing.')
  with open(path, newline='') as f:
    rows = list(csv.reader(f))
  if not rows or rows[0][:2] != ['index', 'mid']:
    raise ValueError(f'{path}: expected a header "index,mid,display_name".')
  mids = {}
  for line, row in enumerate(rows[1:], start=2):
    if len(row) < 2 or not row[0].isdigit() or not row[1]:
      raise ValueError(f'{path}:{line}: malformed row {row}.')
    mids[row[1]] = int(row[0])
  if not mids or sorted(mids.values()) != list(range(len(rows) - 1)):
    raise ValueError(f'{path}: expected indices 0..{len(rows) - 2} with '
                     f'distinct mids, one per row, found {len(mids)} distinct '
                     'mids.')
  return mids


def read_segments(path: str, mids: dict[str, int]):
  """Rows of a segments CSV as (ytid, start, end, [class index])."""
  rows = []
  with open(path, newline='') as f:
    for line, row in enumerate(
        csv.reader(f, skipinitialspace=True, quotechar='"'), start=1):
      if not row or row[0].startswith('#'):
        continue
      if len(row) != 4:
        raise ValueError(f'{path}:{line}: expected "YTID, start_seconds, '
                         f'end_seconds, "labels"", got {row}.')
      ytid, start, end, labels = row
      unknown = [m for m in labels.split(',') if m not in mids]
      if unknown:
        raise ValueError(f'{path}:{line}: unknown label mids {unknown}.')
      try:
        start, end = float(start), float(end)
      except ValueError as e:
        raise ValueError(f'{path}:{line}: bad times in {row}.') from e
      rows.append((ytid, start, end, sorted(mids[m] for m in labels.split(','))))
  if not rows:
    raise ValueError(f'{path}: no segment rows.')
  return rows


def _times(seconds: float) -> list[str]:
  """30.0 -> ['30.000', '30.0', '30']: how download scripts spell times."""
  spellings = [f'{seconds:.3f}', f'{seconds:.1f}']
  if seconds == int(seconds):
    spellings.append(str(int(seconds)))
  return list(dict.fromkeys(spellings))


def file_stems(ytid: str, start: float, end: float) -> list[str]:
  """File names (without extension) a segment's clip may have, in the
  order they are looked for."""
  spans = [f'_{a}_{b}' for a, b in zip(_times(start), _times(end))]
  return [prefix + ytid + span for span in ['', *spans]
          for prefix in ('', 'Y')]


def _find(directory, stems, extensions):
  for stem in stems:
    for ext in extensions:
      path = os.path.join(directory, stem + ext)
      if os.path.exists(path):
        return path
  return None


def decode_audio(path: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """First audio stream of a file as mono int16 [T] at `sample_rate`."""
  import av  # pylint: disable=g-import-not-at-top
  with av.open(path) as container:
    if not container.streams.audio:
      raise ValueError('no audio stream')
    stream = container.streams.audio[0]
    resampler = av.AudioResampler(format='s16', layout='mono',
                                  rate=sample_rate)
    chunks = []
    for frame in container.decode(stream):
      chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
  if not chunks:
    raise ValueError('no audio samples')
  return np.concatenate(chunks).astype(np.int16)


def decode_video(path: str, fps: int = FPS,
                 short_side: int = VIDEO_SHORT_SIDE) -> np.ndarray:
  """First video stream as uint8 [F, H, W, 3] at `fps`, short side resized.

  Output frame k shows the last source frame starting at or before k / fps.
  """
  import av  # pylint: disable=g-import-not-at-top
  with av.open(path) as container:
    if not container.streams.video:
      raise ValueError('no video stream')
    stream = container.streams.video[0]
    times, frames = [], []
    for frame in container.decode(stream):
      if frame.time is None:
        raise ValueError('video frame without a timestamp')
      scale = short_side / min(frame.width, frame.height)
      width = max(2, round(frame.width * scale / 2) * 2)
      height = max(2, round(frame.height * scale / 2) * 2)
      frames.append(frame.reformat(width=width, height=height,
                                   format='rgb24').to_ndarray())
      times.append(frame.time)
  if not frames:
    raise ValueError('no video frames')
  times = np.array(times) - times[0]
  step = np.median(np.diff(times)) if len(times) > 1 else 1. / fps
  duration = times[-1] + step
  ticks = np.arange(int(np.floor(duration * fps + 1e-6))) / fps  # [F]
  index = np.searchsorted(times, ticks + 1e-6, side='right') - 1
  return np.stack([frames[i] for i in np.maximum(index, 0)])


class AudioSet(tfds.core.GeneratorBasedBuilder):
  """AudioSet (Gemmeke et al. 2017) clips from a manual download."""

  name = 'audioset'
  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.',
                   '1.1.0': 'Any number of classes: the label names are the '
                            'mids of class_labels_indices.csv.'}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name='audio', description='48 kHz mono audio.'),
      tfds.core.BuilderConfig(
          name='audio_video',
          description='48 kHz mono audio and 25 fps JPEG video frames.'),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  manual_dir holds class_labels_indices.csv, any of balanced_train_segments.csv,
  unbalanced_train_segments.csv and eval_segments.csv, and the clips as
  audio/<YTID>.{wav,flac,ogg,opus,mp3,m4a} and/or video/<YTID>.{mp4,mkv,webm}
  (each file holding just its segment; Y<YTID> and <YTID>_<start>_<end> names
  are found too).
  """

  def _info(self):
    features = {
        'ytid': tfds.features.Text(),
        'start_seconds': np.float32,
        # Raw bytes: the default int64 list parses several times slower.
        'audio': tfds.features.Tensor(shape=(None,), dtype=np.int16,
                                      encoding=tfds.features.Encoding.BYTES),
        # Names (the mids) are set from class_labels_indices.csv when the
        # data are built and restored from labels.labels.txt when read.
        'labels': tfds.features.Sequence(tfds.features.ClassLabel()),
    }
    if self.builder_config.name == 'audio_video':
      features['video'] = tfds.features.Video(
          shape=(None, None, None, 3), encoding_format='jpeg')
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(features),
        homepage='https://research.google.com/audioset/')

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    mids = read_class_labels(os.path.join(manual_dir, LABELS_CSV))
    self.info.features['labels'].feature.names = sorted(mids, key=mids.get)
    splits = {}
    for split, name in CSV_FILES.items():
      path = os.path.join(manual_dir, name)
      if os.path.exists(path):
        splits[split] = self._generate_examples(
            manual_dir, split, path, read_segments(path, mids))
      else:
        logging.warning('AudioSet: %s not found; no %s split.', path, split)
    if not splits:
      raise FileNotFoundError(
          f'AudioSet: none of {sorted(CSV_FILES.values())} in {manual_dir}.')
    return splits

  def _clip(self, manual_dir, ytid, start, end):
    """(example fields, None) or (None, skip reason naming the file)."""
    with_video = self.builder_config.name == 'audio_video'
    stems = file_stems(ytid, start, end)
    video_path = _find(os.path.join(manual_dir, 'video'), stems,
                       VIDEO_EXTENSIONS)
    audio_path = (_find(os.path.join(manual_dir, 'audio'), stems,
                        AUDIO_EXTENSIONS) or video_path)
    if audio_path is None or (with_video and video_path is None):
      folder, extensions = (('video', VIDEO_EXTENSIONS) if with_video
                            else ('audio', AUDIO_EXTENSIONS))
      return None, (f'missing {folder}/{{{",".join(stems)}}}'
                    f'{{{",".join(extensions)}}}')
    import av  # pylint: disable=g-import-not-at-top
    errors = (OSError, ValueError, av.FFmpegError)
    limit = end - start + _SLACK_SECONDS
    fields = {}
    try:
      fields['audio'] = decode_audio(audio_path)
    except errors as e:
      return None, f'undecodable {os.path.relpath(audio_path, manual_dir)}: {e}'
    if len(fields['audio']) > limit * SAMPLE_RATE:
      return None, (f'{os.path.relpath(audio_path, manual_dir)} is '
                    f'{len(fields["audio"]) / SAMPLE_RATE:.1f} s long, more '
                    f'than its {end - start:.1f} s segment')
    if with_video:
      try:
        fields['video'] = decode_video(video_path)
      except errors as e:
        return None, (f'undecodable {os.path.relpath(video_path, manual_dir)}'
                      f': {e}')
      if len(fields['video']) > limit * FPS:
        return None, (f'{os.path.relpath(video_path, manual_dir)} is '
                      f'{len(fields["video"]) / FPS:.1f} s long, more than '
                      f'its {end - start:.1f} s segment')
    return fields, None

  def _generate_examples(self, manual_dir, split, csv_path, rows):
    skipped = []
    written = 0
    for ytid, start, end, labels in rows:
      fields, problem = self._clip(manual_dir, ytid, start, end)
      if problem:
        skipped.append(f'{ytid}\t{problem}')
        logging.warning('AudioSet %s: skipping %s: %s', split, ytid, problem)
        continue
      written += 1
      yield f'{ytid}_{start:.3f}', {'ytid': ytid, 'start_seconds': start,
                                    'labels': labels, **fields}
    logging.warning('AudioSet %s: wrote %d of %d clips of %s, skipped %d '
                    '(listed in skipped-%s.txt).', split, written, len(rows),
                    csv_path, len(skipped), split)
    with open(os.path.join(self.data_dir, f'skipped-{split}.txt'), 'w') as f:
      f.write(''.join(line + '\n' for line in skipped))
    if rows and not written:
      raise FileNotFoundError(
          f'AudioSet {split}: none of the {len(rows)} clips of {csv_path} '
          f'could be read from {manual_dir}/audio or {manual_dir}/video; '
          f'first: {skipped[0]}.')

"""Real drum recordings mixed into a small AudioSet, in AudioSet's own layout.

Shapes: L = CLIP_SAMPLES (61,440 = 1.28 s at 48 kHz), K = len(CLASSES) (9).

Source: Debian's `hydrogen-drumkits` (drum kits of the Hydrogen drum machine:
per kit a `drumkit.xml` naming its instruments, each with one or more
recorded hits, FLAC or WAV). `prepare(out_dir)` maps instrument names to the
K classes of CLASSES (instruments of no class, e.g. djembes, cajon, side
stick, or ambiguous ones such as "crash/ride", are left out), decodes every
recording with PyAV to 48 kHz mono, and mixes clips of L samples holding
1-4 hits of different classes of one kit at random onsets and gains. The
labels of a clip are the classes of its hits (multi-label, like AudioSet).

Train and test use different kits: the test clips are mixed only from
HELD_OUT_KITS, so the score measures generalisation to drums never heard in
training. Every class must occur in both; otherwise preparation fails
naming the class.

Written to `out_dir`, exactly AudioSet's layout (read by the `audioset` TFDS
builder, experiments/data/audioset_builder.py):
  class_labels_indices.csv     index,mid,display_name
  balanced_train_segments.csv  3 '#' header lines, then
  eval_segments.csv              YTID, 0.000, 1.280, "mid,mid"
  audio/<YTID>.wav             16-bit PCM mono, 48 kHz, L samples
and then the TFDS dataset in `out_dir/tfds` (built through the builder).

A recording that is missing, cannot be decoded, or is shorter than its WAV
header says (truncated) is named in one log line, counted in the summary and
left out; the rest still builds.
"""
from __future__ import annotations

import csv
import glob
import os
import re
import shutil
import subprocess
import tempfile
import time
import wave
import xml.etree.ElementTree as ET

from absl import logging
import numpy as np

from experiments.data import audioset_builder

SAMPLE_RATE = audioset_builder.SAMPLE_RATE
# chosen: a clip is exactly one window of the AudioSet pipeline (1.28 s,
# experiments/data/audioset.py WINDOW), so the training window and the single
# evaluation window are the whole clip and every labelled hit lies inside both.
CLIP_SAMPLES = 61_440
# chosen: each hit starts at least 0.32 s before the clip ends; a drum hit's
# attack and most of its decay fall within its first ~0.3 s, so every
# labelled hit is clearly audible in the clip.
MIN_AUDIBLE = 15_360
HITS_PER_CLIP = (1, 4)  # fewest, most distinct classes per clip
GAIN_DB = (-12., 0.)  # chosen: per hit, relative to its own peak
PEAK_RANGE = (0.25, 0.9)  # chosen: peak of the mixed clip (level variety)
ONSET_THRESHOLD = 0.05  # a recording starts where |x| first reaches 5% peak
# chosen: ~4,000 train and 800 test clips (~0.6 GB of WAV): preparation takes
# minutes on 2 cores; one epoch is ~125 steps at batch 32, so a ~10 minute
# CPU run sees each clip several times; 800 test clips give every class ~100+
# positives, enough for a stable AP.
NUM_TRAIN_CLIPS = 4_000
NUM_TEST_CLIPS = 800
# chosen: three kits (acoustic, sampled acoustic, electronic) holding all
# classes between them; the rest (11 kits) train. Names as in drumkit.xml.
HELD_OUT_KITS = ('The Black Pearl 1.0', 'rumpf_kit_z01_gm', 'HardElectro1')
DEFAULT_INSTALL = '/usr/share/hydrogen/data/drumkits'
PACKAGE = 'hydrogen-drumkits'

# (mid, display name); the mid is the label written to the segment CSVs.
CLASSES = (
    ('/drums/kick', 'Kick drum'),
    ('/drums/snare', 'Snare drum'),
    ('/drums/hihat_closed', 'Hi-hat, closed or pedal'),
    ('/drums/hihat_open', 'Hi-hat, open or half-open'),
    ('/drums/tom', 'Tom-tom'),
    ('/drums/crash', 'Crash cymbal'),
    ('/drums/ride', 'Ride cymbal'),
    ('/drums/clap', 'Hand clap'),
    ('/drums/cowbell', 'Cowbell'),
)
NUM_CLASSES = len(CLASSES)
_HAT = re.compile(r'\b(hi[- ]?hat|hat|hh)\b')
_OPEN = re.compile(r'\b(open|opened|op|semi[- ]?open)\b')
_CLOSED = re.compile(r'\b(closed|cl|pedal|pd)\b')


def instrument_class(name: str) -> int | None:
  """Class index of a Hydrogen instrument name, or None (left out)."""
  n = name.lower()
  if ('crash' in n and 'ride' in n) or 'choke' in n or 'stick' in n:
    return None  # Ambiguous or not one of the classes.
  rules = ((7, 'clap' in n), (8, 'cowbell' in n),
           (0, bool(re.search(r'kick|bass ?drum', n))), (1, 'snare' in n))
  for index, hit in rules:
    if hit:
      return index
  if _HAT.search(n):
    if _OPEN.search(n):
      return 3
    return 2 if _CLOSED.search(n) else None
  if re.search(r'\btom', n):
    return 4
  if re.search(r'crash|splash|china', n):
    return 5
  if 'ride' in n:
    return 6
  return None


def read_kit(xml_path: str) -> tuple[str, list[tuple[int, str]]]:
  """Kit name and [(class index, recording path)] of a drumkit.xml."""
  try:
    root = ET.parse(xml_path).getroot()
  except ET.ParseError as e:
    raise ValueError(f'{xml_path}: not valid XML ({e}).') from None
  ns = root.tag[:root.tag.index('}') + 1] if root.tag.startswith('{') else ''
  kit = (root.findtext(f'{ns}name') or '').strip() or os.path.basename(
      os.path.dirname(xml_path))
  recordings = []
  for instrument in root.iter(f'{ns}instrument'):
    index = instrument_class(instrument.findtext(f'{ns}name') or '')
    if index is None:
      continue
    for element in instrument.iter(f'{ns}filename'):
      if element.text and element.text.strip():
        recordings.append((index, os.path.join(os.path.dirname(xml_path),
                                               element.text.strip())))
  return kit, recordings


def _wav_header_frames(path: str) -> tuple[int, int] | None:
  """(frames, rate) the WAV header promises, or None if not plain PCM WAV."""
  if not path.lower().endswith('.wav'):
    return None
  try:
    with wave.open(path, 'rb') as w:
      return w.getnframes(), w.getframerate()
  except (wave.Error, EOFError, OSError):
    return None  # PyAV decides below.


def decode_hit(path: str) -> np.ndarray:
  """A recording as float32 [n] at 48 kHz mono, from its onset, peak 1.

  Raises OSError / ValueError / av.FFmpegError for a missing, corrupt,
  truncated or silent file.
  """
  if not os.path.exists(path):
    raise FileNotFoundError('file missing')
  audio = audioset_builder.decode_audio(path).astype(np.float32)
  header = _wav_header_frames(path)
  if header and len(audio) < (header[0] / header[1] - 0.01) * SAMPLE_RATE:
    raise ValueError(f'truncated: {len(audio) / SAMPLE_RATE:.3f} s decoded, '
                     f'header says {header[0] / header[1]:.3f} s')
  peak = np.abs(audio).max()
  if peak < 64:  # Below -54 dBFS everywhere.
    raise ValueError('silent')
  start = int(np.argmax(np.abs(audio) >= ONSET_THRESHOLD * peak))
  start = max(start - SAMPLE_RATE // 1000, 0)  # Keep 1 ms before the onset.
  return audio[start:start + CLIP_SAMPLES] / peak


def mix_clip(rng: np.random.Generator, pool: dict[int, list[np.ndarray]]):
  """One clip from a kit's hits by class: (int16 [L], classes, onsets)."""
  available = sorted(pool)
  count = rng.integers(HITS_PER_CLIP[0],
                       min(HITS_PER_CLIP[1], len(available)) + 1)
  classes = sorted(rng.choice(available, size=count, replace=False).tolist())
  clip = np.zeros(CLIP_SAMPLES, np.float32)  # [L]
  onsets = []
  for index in classes:
    hit = pool[index][rng.integers(len(pool[index]))]
    onset = int(rng.integers(0, CLIP_SAMPLES - MIN_AUDIBLE + 1))
    gain = 10. ** (rng.uniform(*GAIN_DB) / 20.)
    part = hit[:CLIP_SAMPLES - onset]
    clip[onset:onset + len(part)] += gain * part
    onsets.append(onset)
  clip *= rng.uniform(*PEAK_RANGE) / np.abs(clip).max()
  return np.round(clip * 32767).astype(np.int16), classes, onsets


def _write_wav(path, samples):
  with wave.open(path, 'wb') as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(SAMPLE_RATE)
    w.writeframes(samples.astype('<i2').tobytes())


def _write_segments(path, rows):
  """AudioSet's segment CSV: 3 '#' lines, then YTID, start, end, "mids"."""
  labels = [c for _, classes in rows for c in classes]
  with open(path, 'w') as f:
    f.write(f'# Segments csv created {time.ctime()} from {PACKAGE}\n'
            f'# num_ytids={len(rows)}, num_segs={len(rows)}, '
            f'num_unique_labels={len(set(labels))}, '
            f'num_positive_labels={len(labels)}\n'
            '# YTID, start_seconds, end_seconds, positive_labels\n')
    end = CLIP_SAMPLES / SAMPLE_RATE
    for ytid, classes in rows:
      mids = ','.join(CLASSES[c][0] for c in classes)
      f.write(f'{ytid}, 0.000, {end:.3f}, "{mids}"\n')


def _run(command, cwd=None):
  logging.info('drums: running %s', ' '.join(command))
  return subprocess.run(command, cwd=cwd, check=False, capture_output=True,
                        text=True)


def _download_deb(cache: str) -> str:
  """`apt-get download hydrogen-drumkits` into cache (apt-get update once
  if the first try fails); returns the .deb path."""
  os.makedirs(cache, exist_ok=True)
  debs = glob.glob(os.path.join(cache, f'{PACKAGE}_*.deb'))
  if not debs:
    result = _run(['apt-get', 'download', PACKAGE], cwd=cache)
    if result.returncode:
      _run(['apt-get', 'update'])
      result = _run(['apt-get', 'download', PACKAGE], cwd=cache)
    debs = glob.glob(os.path.join(cache, f'{PACKAGE}_*.deb'))
    if result.returncode or not debs:
      raise FileNotFoundError(
          f'apt-get download {PACKAGE} failed: '
          f'{(result.stderr or result.stdout).strip().splitlines()[-1:]}')
  return sorted(debs)[-1]


def _kit_xmls(folder: str) -> list[str]:
  for root in (folder, os.path.join(folder, DEFAULT_INSTALL.lstrip('/'))):
    found = sorted(glob.glob(os.path.join(root, '*', 'drumkit.xml')))
    if found:
      return found
  return []


def _with_source(source, out_dir, body):
  """Calls body(list of drumkit.xml paths) for a folder, a .deb or None."""
  if source is None:
    if _kit_xmls(DEFAULT_INSTALL):
      source = DEFAULT_INSTALL
    else:
      source = _download_deb(os.path.join(out_dir, 'cache'))
  if source.endswith('.deb'):
    if not os.path.isfile(source):
      raise FileNotFoundError(f'drums source {source} does not exist.')
    with tempfile.TemporaryDirectory(prefix='drumkits-') as tmp:
      result = _run(['dpkg-deb', '-x', source, tmp])
      if result.returncode:
        raise ValueError(f'dpkg-deb -x {source} failed: '
                         f'{result.stderr.strip()}')
      return body(source, _kit_xmls(tmp))
  if not os.path.isdir(source):
    raise FileNotFoundError(f'drums source {source} is neither a folder nor '
                            'a .deb file.')
  return body(source, _kit_xmls(source))


def _build(out_dir, seed, held_out, num_train, num_test, source, xmls):
  if not xmls:
    raise FileNotFoundError(f'drums: no <kit>/drumkit.xml under {source}.')
  pools, skipped = {}, []
  import av  # pylint: disable=g-import-not-at-top
  for xml_path in xmls:
    kit, recordings = read_kit(xml_path)
    for index, path in recordings:
      try:
        hit = decode_hit(path)
      except (OSError, ValueError, av.FFmpegError) as e:
        name = os.path.relpath(path, os.path.dirname(os.path.dirname(xml_path)))
        logging.warning('drums: skipping recording %s: %s', name, e)
        skipped.append(f'{name}: {e}')
        continue
      pools.setdefault(kit, {}).setdefault(index, []).append(hit)
  unknown = sorted(set(held_out) - set(pools))
  if unknown:
    raise ValueError(f'drums: held-out kits {unknown} not among the kits '
                     f'with usable recordings {sorted(pools)}.')
  sides = {'test': {k: v for k, v in pools.items() if k in held_out},
           'train': {k: v for k, v in pools.items() if k not in held_out}}
  for side, kits in sides.items():
    present = {c for pool in kits.values() for c in pool}
    missing = [CLASSES[c][1] for c in range(NUM_CLASSES) if c not in present]
    if missing:
      raise ValueError(f'drums: no {side} kit has a recording of {missing}.')
  rng = np.random.default_rng(seed)
  audio_dir = os.path.join(out_dir, 'audio')
  if os.path.isdir(audio_dir):
    shutil.rmtree(audio_dir)  # Old clips would not match the new CSVs.
  os.makedirs(audio_dir)
  summary = {'held_out_kits': sorted(sides['test']),
             'train_kits': sorted(sides['train']), 'skipped': skipped,
             'recordings': sum(len(h) for p in pools.values()
                               for h in p.values())}
  for side, count, csv_name in (
      ('train', num_train, 'balanced_train_segments.csv'),
      ('test', num_test, 'eval_segments.csv')):
    kits = sorted(sides[side])
    rows, per_class = [], np.zeros(NUM_CLASSES, int)
    for i in range(count):
      clip, classes, _ = mix_clip(rng, sides[side][kits[rng.integers(
          len(kits))]])
      ytid = f'drum{side[:2]}{i:05d}'
      _write_wav(os.path.join(audio_dir, f'{ytid}.wav'), clip)
      rows.append((ytid, classes))
      per_class[classes] += 1
    _write_segments(os.path.join(out_dir, csv_name), rows)
    summary[side] = {'clips': count, 'per_class': {
        CLASSES[c][1]: int(n) for c, n in enumerate(per_class)}}
  with open(os.path.join(out_dir, audioset_builder.LABELS_CSV), 'w',
            newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['index', 'mid', 'display_name'])
    writer.writerows((i, mid, name) for i, (mid, name) in enumerate(CLASSES))
  return summary


def prepare(out_dir: str, *, source: str | None = None, seed: int = 0,
            held_out: tuple[str, ...] = HELD_OUT_KITS,
            num_train: int = NUM_TRAIN_CLIPS, num_test: int = NUM_TEST_CLIPS,
            build_tfds: bool = True) -> dict:
  """Writes the AudioSet-layout drum set to out_dir; returns a summary.

  Args:
    out_dir: the manual_dir of the `audioset` builder; the TFDS dataset goes
      to out_dir/tfds.
    source: a folder of Hydrogen kits (<kit>/drumkit.xml), a
      hydrogen-drumkits .deb, or None: the installed kits, else the package
      downloaded with apt-get into out_dir/cache.
    seed: draws the mixes (kits, classes, recordings, onsets, gains).
    held_out: kit names (drumkit.xml <name>) mixed into the test split only.
    build_tfds: also build the TFDS dataset (config `audio`) in out_dir/tfds.

  Returns:
    {'train'/'test': {'clips', 'per_class'}, 'train_kits', 'held_out_kits',
     'recordings' (decoded), 'skipped' (['file: reason']), and with
     build_tfds 'tfds_examples' per split}.
  """
  os.makedirs(out_dir, exist_ok=True)
  summary = _with_source(source, out_dir, lambda src, xmls: _build(
      out_dir, seed, tuple(held_out), num_train, num_test, src, xmls))
  if build_tfds:
    from experiments.data import audioset  # pylint: disable=g-import-not-at-top
    tfds_dir = os.path.join(out_dir, 'tfds')
    if os.path.isdir(tfds_dir):
      shutil.rmtree(tfds_dir)  # Built from the previous clips.
    os.makedirs(tfds_dir)
    summary['tfds_examples'] = {
        split: audioset.num_examples(split, data_dir=tfds_dir,
                                     manual_dir=out_dir)
        for split in ('train', 'eval')}
  return summary


def class_prior_map(data_dir: str) -> float:
  """mAP on the eval split of a constant predictor: every clip scores each
  class by its frequency in the training split. `data_dir` is the folder of
  the segment CSVs (a prepared out_dir) or its tfds/ subfolder.
  """
  from experiments import metrics  # pylint: disable=g-import-not-at-top
  folder = data_dir
  if not os.path.exists(os.path.join(folder, audioset_builder.LABELS_CSV)):
    folder = os.path.dirname(os.path.normpath(data_dir))
  mids = audioset_builder.read_class_labels(
      os.path.join(folder, audioset_builder.LABELS_CSV))

  def multi_hot(csv_name):
    rows = audioset_builder.read_segments(os.path.join(folder, csv_name), mids)
    labels = np.zeros((len(rows), len(mids)), np.float32)  # [N, K]
    for i, (_, _, _, classes) in enumerate(rows):
      labels[i, classes] = 1.
    return labels

  prior = multi_hot(audioset_builder.CSV_FILES['balanced_train']).mean(0)
  test = multi_hot(audioset_builder.CSV_FILES['eval'])
  return metrics.mean_average_precision(np.tile(prior, (len(test), 1)), test)


def class_prior_map_of(config) -> float:
  """`class_prior_map` of a config's prepared data (config.data.manual_dir):
  the chance level that Table 3's stand-ins are read against."""
  return class_prior_map(config.data.manual_dir)

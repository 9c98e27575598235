"""Drum set: tiny Hydrogen kits written here, prepared, read by the builder."""
import csv
import logging
import os
import subprocess
import sys
import wave

import av
import numpy as np
import pytest

from configs import audioset as audioset_config
from experiments import setup
from experiments.data import audioset
from experiments.data import drums
from experiments.data import prepare as prepare_cli

L = drums.CLIP_SAMPLES
INSTRUMENTS = ('Kick', 'Snare Rock', 'Closed HH', 'Open HH', 'Tom Low',
               'Crash', 'Ride Jazz', 'Hand Clap', 'Cowbell')
TONE_HZ = {'TrainKit': 1000., 'HeldKit': 8000.}  # Tells the kits apart.
NUM_TRAIN, NUM_TEST = 24, 12


def _hit(hz, rate, channels, seconds=0.08):
  t = np.arange(int(seconds * rate)) / rate
  x = 20000 * np.sin(2 * np.pi * hz * t) * np.exp(-t / 0.02)
  x = np.r_[np.zeros(rate // 100), x]  # 10 ms of silence before the onset.
  return np.repeat(x[None], channels, 0).astype(np.int16)  # [channels, n]


def _write_wav(path, samples, rate):
  with wave.open(str(path), 'wb') as w:
    w.setnchannels(samples.shape[0])
    w.setsampwidth(2)
    w.setframerate(rate)
    w.writeframes(samples.T.astype('<i2').tobytes())


def _write_flac(path, samples, rate):
  with av.open(str(path), 'w') as container:
    layout = 'mono' if samples.shape[0] == 1 else 'stereo'
    stream = container.add_stream('flac', rate=rate, layout=layout)
    frame = av.AudioFrame.from_ndarray(
        np.ascontiguousarray(samples.T.reshape(1, -1)), format='s16',
        layout=layout)
    frame.sample_rate = rate
    for packet in (*stream.encode(frame), *stream.encode(None)):
      container.mux(packet)


def _instrument(i, name, files):
  layers = ''.join(f'<layer><filename>{f}</filename><min>0</min><max>1</max>'
                   '<gain>1</gain><pitch>0</pitch></layer>' for f in files)
  return (f'<instrument><id>{i}</id><name>{name}</name><volume>1</volume>'
          f'<isMuted>false</isMuted>{layers}</instrument>')


def write_kit(folder, kit, extra=()):
  """A Hydrogen kit: drumkit.xml (Hydrogen's namespace) and one recording
  per instrument, FLAC and WAV, stereo 44.1 kHz and mono 48 kHz."""
  folder.mkdir(parents=True)
  entries = []
  for i, name in enumerate(INSTRUMENTS):
    stereo = i % 2 == 0
    rate = 44_100 if stereo else 48_000
    hit = _hit(TONE_HZ[kit] * (1 + 0.03 * i), rate, 2 if stereo else 1)
    filename = f'{i}_{name.replace(" ", "")}.{"flac" if stereo else "wav"}'
    (_write_flac if stereo else _write_wav)(folder / filename, hit, rate)
    entries.append((name, [filename]))
  entries += [('Side Stick', ['0_Kick.flac']), *extra]
  body = ''.join(_instrument(i, n, f) for i, (n, f) in enumerate(entries))
  (folder / 'drumkit.xml').write_text(
      '<?xml version="1.0" encoding="UTF-8"?>\n<drumkit_info xmlns='
      '"http://www.hydrogen-music.org/drumkit">\n'
      f'<name>{kit}</name><author>test</author><instrumentList>{body}'
      '</instrumentList></drumkit_info>\n')


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp('drums')
  kits = root / 'drumkits'
  write_kit(kits / 'train_kit', 'TrainKit',
            extra=[('Kick 2', ['broken.wav', 'cut.wav', 'gone.flac'])])
  (kits / 'train_kit' / 'broken.wav').write_bytes(b'RIFF\0\0\0\0WAVEjunk')
  whole = (kits / 'train_kit' / '1_SnareRock.wav').read_bytes()
  (kits / 'train_kit' / 'cut.wav').write_bytes(whole[:len(whole) // 2])
  write_kit(kits / 'held_kit', 'HeldKit')
  out = root / 'out'
  summary = drums.prepare(str(out), source=str(kits), seed=3,
                          held_out=('HeldKit',), num_train=NUM_TRAIN,
                          num_test=NUM_TEST, build_tfds=False)
  return out, summary


def _rows(path):
  with open(path) as f:
    lines = f.read().splitlines()
  return lines[:3], list(csv.reader(lines[3:], skipinitialspace=True))


def test_layout_is_audiosets(prepared):
  out, summary = prepared
  with open(out / 'class_labels_indices.csv') as f:
    classes = list(csv.reader(f))
  assert classes[0] == ['index', 'mid', 'display_name']
  assert [int(r[0]) for r in classes[1:]] == list(range(drums.NUM_CLASSES))
  mids = {r[1] for r in classes[1:]}
  for name, count in (('balanced_train_segments.csv', NUM_TRAIN),
                      ('eval_segments.csv', NUM_TEST)):
    header, rows = _rows(out / name)
    assert all(line.startswith('# ') for line in header)
    assert header[1].startswith(f'# num_ytids={count}, num_segs={count},')
    assert header[2] == '# YTID, start_seconds, end_seconds, positive_labels'
    assert len(rows) == count
    sizes = []
    for ytid, start, end, labels in rows:
      assert (float(start), float(end)) == (0., L / drums.SAMPLE_RATE)
      assert set(labels.split(',')) <= mids
      sizes.append(len(labels.split(',')))
      with wave.open(str(out / 'audio' / f'{ytid}.wav')) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(),
                w.getnframes()) == (1, 2, drums.SAMPLE_RATE, L)
    assert min(sizes) >= 1 and max(sizes) <= 4 and max(sizes) > 1
  assert len(os.listdir(out / 'audio')) == NUM_TRAIN + NUM_TEST
  assert summary['train']['clips'] == NUM_TRAIN
  assert sum(summary['test']['per_class'].values()) >= NUM_TEST


def test_corrupt_truncated_and_missing_recordings_are_named_and_skipped(
    prepared):
  _, summary = prepared
  skipped = sorted(summary['skipped'])
  assert len(skipped) == 3
  assert skipped[0].startswith('train_kit/broken.wav: ')
  assert skipped[1].startswith('train_kit/cut.wav: truncated')
  assert skipped[2] == 'train_kit/gone.flac: file missing'
  # Both kits' nine recordings (the side stick is no class) were used.
  assert summary['recordings'] == 2 * drums.NUM_CLASSES


def test_test_clips_come_only_from_held_out_kits(prepared):
  out, summary = prepared
  assert summary['held_out_kits'] == ['HeldKit']
  assert summary['train_kits'] == ['TrainKit']
  for name, kit in (('balanced_train_segments.csv', 'TrainKit'),
                    ('eval_segments.csv', 'HeldKit')):
    for ytid, *_ in _rows(out / name)[1]:
      with wave.open(str(out / 'audio' / f'{ytid}.wav')) as w:
        x = np.frombuffer(w.readframes(L), '<i2').astype(float)
      spectrum = np.abs(np.fft.rfft(x))
      peak_hz = np.argmax(spectrum) * drums.SAMPLE_RATE / L
      assert abs(peak_hz / TONE_HZ[kit] - 1.12) < 0.13, (ytid, peak_hz)


def test_every_hit_starts_inside_the_window_with_room_to_sound():
  rng = np.random.default_rng(0)
  pool = {c: [np.ones(100, np.float32)] for c in range(drums.NUM_CLASSES)}
  counts = set()
  for _ in range(200):
    clip, classes, onsets = drums.mix_clip(rng, pool)
    counts.add(len(classes))
    assert len(set(classes)) == len(classes)
    assert max(onsets) <= L - drums.MIN_AUDIBLE
    for onset in onsets:
      assert clip[onset:onset + 100].min() > 0  # Each hit is in the clip.
  assert counts == {1, 2, 3, 4}


def test_builder_reads_it_through_the_config(prepared, caplog):
  out, _ = prepared
  for old, new in (('drumtr00000', 'Ydrumtr00000'),
                   ('drumtr00001', 'drumtr00001_0.000_1.280')):
    os.rename(out / 'audio' / f'{old}.wav', out / 'audio' / f'{new}.wav')
  config = audioset_config.get_config('data=drums,features=mel')
  config.data.update(manual_dir=str(out), data_dir=str(out / 'tfds'))
  os.makedirs(out / 'tfds')
  setup.check_config(config)
  caplog.set_level(logging.WARNING)
  setup.check_data(config, audioset)  # Builds; every clip is found.
  assert 'wrote 24 of 24 clips' in caplog.text
  data = config.data.to_dict()
  assert audioset.num_examples('eval', **data) == NUM_TEST
  batch = next(audioset.load('eval', batch_size=NUM_TEST, is_training=False,
                             **data))
  assert batch['inputs'].shape == (NUM_TEST, 1, 120, 40)
  assert batch['labels'].shape == (NUM_TEST, config.model.num_classes)
  assert config.model.num_classes == drums.NUM_CLASSES
  _, rows = _rows(out / 'eval_segments.csv')
  mids = [m for m, _ in drums.CLASSES]
  expected = np.zeros((NUM_TEST, drums.NUM_CLASSES))
  for i, (_, _, _, labels) in enumerate(rows):
    expected[i, [mids.index(m) for m in labels.split(',')]] = 1
  in_order = lambda a: a[np.lexsort(a.T)]  # TFDS stores clips in its order.
  np.testing.assert_array_equal(in_order(batch['labels']), in_order(expected))


def test_class_prior_map(prepared):
  out, _ = prepared
  _, rows = _rows(out / 'eval_segments.csv')
  positives = {}
  for *_, labels in rows:
    for mid in labels.split(','):
      positives[mid] = positives.get(mid, 0) + 1
  # Constant scores tie every clip: AP = the class's share of test clips.
  expected = np.mean([n / NUM_TEST for n in positives.values()])
  assert drums.class_prior_map(str(out)) == pytest.approx(expected)
  assert drums.class_prior_map(str(out / 'tfds')) == pytest.approx(expected)


def test_bad_sources_and_kits_are_one_clear_error(prepared, tmp_path):
  with pytest.raises(FileNotFoundError, match='neither a folder nor'):
    drums.prepare(str(tmp_path / 'o'), source=str(tmp_path / 'nothing'))
  with pytest.raises(FileNotFoundError, match='no <kit>/drumkit.xml'):
    drums.prepare(str(tmp_path / 'o'), source=str(tmp_path))
  kits = prepared[0].parent / 'drumkits'
  with pytest.raises(ValueError, match=r"held-out kits \['Nope'\]"):
    drums.prepare(str(tmp_path / 'o'), source=str(kits), held_out=('Nope',))
  with pytest.raises(ValueError, match='no train kit has a recording'):
    drums.prepare(str(tmp_path / 'o'), source=str(kits),
                  held_out=('HeldKit', 'TrainKit'))


def test_instrument_names_of_real_kits():
  expected = {
      'Kick (Tama Superstar 22")': 0, 'c3 - bass drum 1': 0, 'BassDrum': 0,
      'Pearl Snare Rimshot': 1, 'Hi Hat Closed': 2, 'VariBreaks Hat 1 Pd': 2,
      'Hat Op Dirty': 3, 'Sabian Hat Semi-Open': 3, 'Hi-Hat Semiopen': 3,
      'Floor Tom': 4, 'tomhi2': 4, 'crash16inch': 5, 'China (Paiste)': 5,
      'ride-cup': 6, 'Clap Hard': 7, 'Cowbell': 8,
      'ride-crash20inch': None, 'Sabian Hat Choke': None, 'Hi Hat Free': None,
      'Pearl Side Stick': None, 'Djembe1 Slap': None, 'Zap 1': None}
  assert {n: drums.instrument_class(n) for n in expected} == expected


def test_prepare_cli_errors_are_one_line(tmp_path):
  with pytest.raises(ValueError, match="Unknown dataset 'nope'"):
    prepare_cli.prepare('nope')
  with pytest.raises(FileNotFoundError, match='kits.deb does not exist'):
    prepare_cli.prepare('drums', str(tmp_path),
                        source=str(tmp_path / 'kits.deb'))
  result = subprocess.run(  # Fast: an unknown dataset imports nothing.
      [sys.executable, '-m', 'experiments.data.prepare', '--dataset=nope',
       f'--out={tmp_path}'], capture_output=True, text=True, check=False,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      "experiments.data.prepare: error: Unknown dataset 'nope'; known: "
      "['drums', 'kicad'].")

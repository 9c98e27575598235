"""AudioSet: WAV, FLAC and MP4 clips written here, official CSV layouts."""
import logging
import os
import wave

import av
import numpy as np
import pytest
import tensorflow as tf

from experiments.data import audioset

W = audioset.WINDOW
RATE = audioset.SAMPLE_RATE
TRAIN_LABELS = {'clipA': [0, 5], 'clipB': [526], 'clipC': [1, 2, 3],
                'missing1': [4], 'corrupt1': [6]}
EVAL_LABELS = {'evalA': [3, 4, 5], 'evalB': [7]}
SINE_HZ = 3000.


def _write_wav(path, samples, rate=RATE):
  with wave.open(str(path), 'wb') as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(rate)
    w.writeframes(samples.astype('<i2').tobytes())


def _audio_frame(samples, rate):
  frame = av.AudioFrame.from_ndarray(samples.astype(np.int16)[None],
                                     format='s16', layout='mono')
  frame.sample_rate = rate
  return frame


def _write_flac(path, samples, rate):
  with av.open(str(path), 'w') as container:
    stream = container.add_stream('flac', rate=rate, layout='mono')
    for packet in (*stream.encode(_audio_frame(samples, rate)),
                   *stream.encode(None)):
      container.mux(packet)


def _frame_colour(k):
  """Source frame k's colour: red counts k mod 24, green k // 24."""
  return np.array([10 * (k % 24) + 10, 100 * (k // 24) + 20, 60], np.uint8)


def _frame_index(rgb):
  return np.round((rgb[..., 0] - 10) / 10) + 24 * np.round((rgb[..., 1] - 20)
                                                           / 100)


def _write_mp4(path, num_frames, fps=30, audio=None):
  """H.264 (lossless) MP4 of colour-coded 48x64 frames, optional AAC audio."""
  with av.open(str(path), 'w') as container:
    video = container.add_stream('libx264', rate=fps)
    video.width, video.height, video.pix_fmt = 64, 48, 'yuv420p'
    video.options = {'qp': '0'}
    sound = (container.add_stream('aac', rate=RATE, layout='mono')
             if audio is not None else None)
    for k in range(num_frames):
      frame = av.VideoFrame.from_ndarray(
          np.ascontiguousarray(np.broadcast_to(_frame_colour(k), (48, 64, 3))),
          format='rgb24')
      for packet in video.encode(frame):
        container.mux(packet)
    for packet in video.encode(None):
      container.mux(packet)
    if sound is not None:
      for packet in (*sound.encode(_audio_frame(audio, RATE)),
                     *sound.encode(None)):
        container.mux(packet)


def _write_csv(path, labels, seconds):
  with open(path, 'w') as f:
    f.write('# Segments csv created Sun Mar  5 10:54:31 2017\n'
            f'# num_ytids={len(labels)}, num_segs={len(labels)}\n'
            '# YTID, start_seconds, end_seconds, positive_labels\n')
    for i, (ytid, classes) in enumerate(labels.items()):
      mids = ','.join(f'/m/t{c:03d}' for c in classes)
      start = 10. * i
      f.write(f'{ytid}, {start:.3f}, {start + seconds:.3f}, "{mids}"\n')


def write_manual_dir(root):
  """Returns the 48 kHz int16 audio each clip should decode to."""
  for sub in ('audio', 'video'):
    os.makedirs(root / sub)
  with open(root / 'class_labels_indices.csv', 'w') as f:
    f.write('index,mid,display_name\n' + ''.join(
        f'{i},/m/t{i:03d},"Class {i}, a test"\n' for i in range(527)))
  _write_csv(root / 'balanced_train_segments.csv', TRAIN_LABELS, 10.)
  _write_csv(root / 'eval_segments.csv', EVAL_LABELS, 10.)
  rng = np.random.default_rng(0)
  clips = {y: rng.integers(-20000, 20000, int(s * RATE)).astype(np.int16)
           for y, s in (('clipA', 1.6), ('evalA', 1.6), ('evalB', 1.0))}
  for ytid, samples in clips.items():
    _write_wav(root / 'audio' / f'{ytid}.wav', samples)
  t = np.arange(int(1.6 * 16_000)) / 16_000
  _write_flac(root / 'audio' / 'clipB.flac',
              (10_000 * np.sin(2 * np.pi * SINE_HZ * t)).astype(np.int16),
              16_000)  # Resampled to 48 kHz by the builder.
  (root / 'audio' / 'corrupt1.wav').write_bytes(b'RIFF\0\0\0\0WAVEnot audio')
  # clipC has only a video file; its AAC track serves as the audio.
  t48 = np.arange(int(1.6 * RATE)) / RATE
  _write_mp4(root / 'video' / 'clipC.mp4', 48,
             audio=8000 * np.sin(2 * np.pi * 1000. * t48))
  for ytid in ('clipA', 'clipB', 'evalA', 'corrupt1'):
    _write_mp4(root / 'video' / f'{ytid}.mp4', 48)  # 1.6 s at 30 fps.
  _write_mp4(root / 'video' / 'evalB.mp4', 30)  # 1.0 s.
  return clips


@pytest.fixture(scope='module')
def manual(tmp_path_factory):
  root = tmp_path_factory.mktemp('audioset')
  clips = write_manual_dir(root / 'manual')
  return root, clips


def _kwargs(manual, **kwargs):
  root, _ = manual
  return {'data_dir': str(root / 'tfds'), 'manual_dir': str(root / 'manual'),
          **kwargs}


def _offset(window, clip):
  """Where the float window sits in the int16 clip (exact match) or None."""
  samples = np.round(window * 32768).astype(np.int16)
  valid = len(clip) - W
  for start in range(max(valid, 0) + 1):
    if np.array_equal(samples[:min(W, len(clip))], clip[start:start + W]):
      return start
  return None


def test_build_skips_and_names_missing_and_corrupt_clips(manual, caplog):
  root, _ = manual
  caplog.set_level(logging.WARNING)
  assert audioset.num_examples('train', **_kwargs(manual)) == 3
  assert audioset.num_examples('eval', **_kwargs(manual)) == 2
  log = caplog.text
  assert 'missing1' in log and 'audio/corrupt1.wav' in log
  assert 'wrote 3 of 5 clips' in log
  skipped = (root / 'tfds' / 'audioset' / 'audio' / '1.1.0' /
             'skipped-balanced_train.txt').read_text().splitlines()
  assert len(skipped) == 2
  assert skipped[0].startswith(
      'missing1\tmissing audio/{missing1,Ymissing1,missing1_30.000_40.000,'
      'Ymissing1_30.000_40.000,missing1_30.0_40.0,Ymissing1_30.0_40.0,'
      'missing1_30_40,Ymissing1_30_40}{.wav,')
  assert skipped[1].startswith('corrupt1\tundecodable audio/corrupt1.wav')


def test_raw_training_windows_are_slices_with_their_labels(manual):
  _, clips = manual
  kwargs = _kwargs(manual, batch_size=3, is_training=True, seed=4)
  it = audioset.load('train', **kwargs)
  batches = [next(it) for _ in range(3)]
  batch = batches[0]
  assert batch['inputs'].shape == (3, W) and batch['inputs'].dtype == np.float32
  assert batch['labels'].shape == (3, 527)
  assert batch['labels'].dtype == np.float32 and batch['mask'].all()
  by_labels = {tuple(v): k for k, v in TRAIN_LABELS.items()}
  seen = []
  for inputs, labels in zip(batch['inputs'], batch['labels']):
    ytid = by_labels[tuple(np.flatnonzero(labels))]
    seen.append(ytid)
    if ytid == 'clipA':  # Exact samples: a slice at some offset.
      assert _offset(inputs, clips['clipA']) is not None
    assert np.abs(inputs).max() <= 1.
  assert sorted(seen) == ['clipA', 'clipB', 'clipC']  # One epoch.
  starts = {_offset(b['inputs'][i], clips['clipA']) for b in batches
            for i in range(3) if b['labels'][i, 0]}
  assert len(starts) == 3  # A new random window every epoch.
  resumed = audioset.load('train', start_step=2, **kwargs)
  for key in batch:
    np.testing.assert_array_equal(next(resumed)[key], batches[2][key])


def test_flac_is_resampled_and_mp4_audio_is_used(manual):
  batch = next(audioset.load('train', batch_size=3, is_training=False,
                             num_eval_clips=1, **_kwargs(manual)))
  index = {int(np.flatnonzero(l)[0]): i for i, l in enumerate(batch['labels'])}
  sine = batch['inputs'][index[526], 0]  # clipB: 16 kHz FLAC.
  spectrum = np.abs(np.fft.rfft(sine))
  assert abs(np.argmax(spectrum) * RATE / W - SINE_HZ) < 2
  rms = np.sqrt(np.mean(sine[W // 10:] ** 2))  # Past the resampler's onset.
  assert abs(rms - 10_000 / 32768 / np.sqrt(2)) < 0.005
  aac = batch['inputs'][index[1], 0]  # clipC: from the MP4's AAC track.
  spectrum = np.abs(np.fft.rfft(aac))
  assert abs(np.argmax(spectrum) * RATE / W - 1000.) < 2
  rms = np.sqrt(np.mean(aac[W // 10:] ** 2))
  assert abs(rms - 8000 / 32768 / np.sqrt(2)) < 0.01


def test_eval_windows_are_evenly_spaced_and_padded(manual):
  _, clips = manual
  batches = list(audioset.load('eval', batch_size=3, is_training=False,
                               **_kwargs(manual)))
  assert len(batches) == 1
  batch = batches[0]
  assert batch['inputs'].shape == (3, 16, W)
  np.testing.assert_array_equal(batch['mask'], [True, True, False])
  for inputs, labels in zip(batch['inputs'][:2], batch['labels'][:2]):
    if labels[7]:  # evalB: 1.0 s, shorter than a window: zero-padded.
      for window in inputs:
        np.testing.assert_array_equal(np.round(window[:RATE] * 32768),
                                      clips['evalB'])
        assert not window[RATE:].any()
    else:
      starts = [_offset(w, clips['evalA']) for w in inputs]
      expected = np.round(np.linspace(0, len(clips['evalA']) - W, 16))
      np.testing.assert_array_equal(starts, expected)
      np.testing.assert_array_equal(np.flatnonzero(labels), [3, 4, 5])


def test_windows_past_the_end_are_zero_padded():
  audio = tf.constant(np.arange(1, 1001), tf.int16)
  windows = audioset._windows(audio, tf.constant([0, 900])).numpy() * 32768
  assert windows.shape == (2, W)
  np.testing.assert_array_equal(windows[0, :1000], np.arange(1, 1001))
  np.testing.assert_array_equal(windows[1, :100], np.arange(901, 1001))
  assert not windows[0, 1000:].any() and not windows[1, 100:].any()


def test_log_mel_of_a_sine():
  t = np.arange(2 * W) / RATE
  audio = tf.constant(np.stack([np.sin(2 * np.pi * 3000. * t[:W]),
                                0.1 * np.sin(2 * np.pi * 440. * t[W:])]),
                      tf.float32)
  mel = audioset.log_mel(audio).numpy()
  assert mel.shape == (2, 120, 40)
  np.testing.assert_allclose(mel.mean((1, 2)), 0, atol=1e-4)
  np.testing.assert_allclose(mel.std((1, 2)), 1, atol=1e-3)
  hz_to_mel = lambda f: 1127. * np.log1p(f / 700.)
  centres = np.linspace(0, hz_to_mel(RATE / 2), 42)[1:-1]
  for spectrum, hz in zip(mel, (3000., 440.)):
    peak = np.argmax(spectrum[10:100].mean(0))
    assert abs(peak - np.argmin(np.abs(centres - hz_to_mel(hz)))) <= 1


def test_mel_training_uses_specaugment(manual):
  kwargs = _kwargs(manual, batch_size=3, is_training=True, audio_format='mel')
  it = audioset.load('train', **kwargs)
  masked_bins, masked_frames = 0, 0
  for _ in range(4):
    mel = next(it)['inputs']
    assert mel.shape == (3, 120, 40) and mel.dtype == np.float32
    for m in mel:
      zero_bins = np.flatnonzero((m == 0).all(0))
      zero_frames = np.flatnonzero((m == 0).all(1))
      assert len(zero_bins) <= 2 * audioset.MAX_FREQ_MASK
      assert len(zero_frames) <= 2 * audioset.MAX_TIME_MASK
      masked_bins += len(zero_bins)
      masked_frames += len(zero_frames)
  assert masked_bins > 12 and masked_frames > 12 * 3
  plain = next(audioset.load('train', specaugment=False, **kwargs))['inputs']
  assert not (plain == 0).all(1).any() and not (plain == 0).all(2).any()


@pytest.fixture(scope='module')
def video_kwargs(manual):
  kwargs = _kwargs(manual, modality='audio_video', image_size=32)
  assert audioset.num_examples('train', **kwargs) == 3  # corrupt1 skipped.
  return kwargs


def test_audio_video_eval_windows_are_aligned(manual, video_kwargs):
  _, clips = manual
  batch = next(audioset.load('eval', batch_size=2, is_training=False,
                             num_eval_clips=4, **video_kwargs))
  audio, video = batch['inputs']['audio'], batch['inputs']['video']
  assert audio.shape == (2, 4, W) and video.shape == (2, 4, 32, 32, 32, 3)
  pixels = (video * audioset.STD + audioset.MEAN) * 255
  a = int(np.flatnonzero(batch['labels'][:, 3])[0])  # evalA, 40 frames.
  starts = np.round(np.linspace(0, 40 - 32, 4)).astype(int)
  for i, start in enumerate(starts):
    frames = _frame_index(pixels[a, i].mean((1, 2)))  # [32]
    np.testing.assert_array_equal(  # 30 fps source sampled at 25 fps.
        frames, np.floor((start + np.arange(32)) * 30 / 25 + 1e-6))
    assert _offset(audio[a, i], clips['evalA']) == start * 1920
  frames_b = _frame_index(pixels[1 - a, :, :].mean((2, 3)))  # evalB, 25.
  np.testing.assert_array_equal(
      frames_b, np.tile(np.floor(np.minimum(np.arange(32), 24) * 1.2 + 1e-6),
                        (4, 1)))


def test_audio_video_training(manual, video_kwargs):
  kwargs = dict(video_kwargs, batch_size=3, is_training=True, seed=2)
  it = audioset.load('train', video_dropout=0., **kwargs)
  batches = [next(it) for _ in range(2)]
  video = batches[0]['inputs']['video']
  assert video.shape == (3, 32, 32, 32, 3) and video.dtype == np.float32
  assert batches[0]['inputs']['audio'].shape == (3, W)
  assert all(v.std() > 0.01 for v in video)  # Coloured frames, not dropped.
  resumed = next(audioset.load('train', video_dropout=0., start_step=1,
                               **kwargs))
  for key in ('audio', 'video'):
    np.testing.assert_array_equal(resumed['inputs'][key],
                                  batches[1]['inputs'][key])
  dropped = next(audioset.load('train', video_dropout=1., **kwargs))
  assert not dropped['inputs']['video'].any()
  np.testing.assert_array_equal(dropped['inputs']['audio'],
                                batches[0]['inputs']['audio'])
  only_video = next(audioset.load('train', **{**kwargs, 'modality': 'video'}))
  assert only_video['inputs'].shape == (3, 32, 32, 32, 3)
  assert only_video['inputs'].std() > 0.01


def test_colour_jitter_matrix():
  identity = audioset._colour_matrix(1., 0.).numpy()
  np.testing.assert_allclose(identity, np.eye(3), atol=1e-5)
  np.testing.assert_allclose(audioset._colour_matrix(1., 1.), np.eye(3),
                             atol=1e-5)  # A full turn of hue.
  rgb = np.random.default_rng(0).uniform(size=(10, 3)).astype(np.float32)
  luma = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
  grey = rgb @ audioset._colour_matrix(0., 0.3).numpy()  # No saturation.
  np.testing.assert_allclose(grey, np.repeat(luma[:, None], 3, 1), atol=1e-5)
  shifted = rgb @ audioset._colour_matrix(1.3, 0.05).numpy()
  np.testing.assert_allclose(  # Hue and saturation keep the luma.
      shifted @ np.array([0.299, 0.587, 0.114]), luma, atol=1e-5)
  assert np.abs(shifted - rgb).max() > 0.02


def _build_error(tmp_path, exception, pattern):
  with pytest.raises(exception, match=pattern):
    audioset.num_examples('eval', data_dir=str(tmp_path / 'tfds'),
                          manual_dir=str(tmp_path / 'manual'))


def test_errors_name_the_problem(tmp_path):
  _build_error(tmp_path, FileNotFoundError, 'manual_dir .*manual')
  manual = tmp_path / 'manual'
  manual.mkdir()
  _build_error(tmp_path, AssertionError, 'Manual directory .*manual .*empty')
  (manual / 'eval_segments.csv').write_text('# YTID, start, end, labels\n')
  _build_error(tmp_path, FileNotFoundError, 'class_labels_indices.csv')
  with open(manual / 'class_labels_indices.csv', 'w') as f:
    f.write('index,mid,display_name\n' + ''.join(
        f'{i},/m/t{i:03d},"Class {i}"\n' for i in range(527)))
  _build_error(tmp_path, ValueError, 'eval_segments.csv: no segment rows')
  os.remove(manual / 'eval_segments.csv')
  _build_error(tmp_path, FileNotFoundError, 'none of .*eval_segments.csv')
  _write_csv(manual / 'eval_segments.csv', {'gone1': [1], 'gone2': [2]}, 10.)
  _build_error(tmp_path, FileNotFoundError,
               'none of the 2 clips of .*eval_segments.csv.*gone1')
  _write_csv(manual / 'eval_segments.csv', {'clip1': [999]}, 10.)
  _build_error(tmp_path, ValueError, r'eval_segments.csv:4: unknown .*t999')
  # A whole video where the 10 s segment was expected: skipped, named.
  _write_csv(manual / 'eval_segments.csv', {'long1': [1]}, 1.)
  (manual / 'audio').mkdir()
  _write_wav(manual / 'audio' / 'long1.wav', np.zeros(3 * RATE))
  _build_error(tmp_path, FileNotFoundError,
               r'audio/long1.wav is 3.0 s long, more than its 1.0 s segment')
  with pytest.raises(FileNotFoundError, match='not prepared'):
    audioset.num_examples('eval', data_dir=str(tmp_path))


def test_download_script_file_names_and_any_class_count(tmp_path):
  """Y<YTID> and <YTID>_<start>_<end> names are found; K comes from the
  class list; a K other than the one asked for is an error naming both."""
  manual = tmp_path / 'manual'
  (manual / 'audio').mkdir(parents=True)
  with open(manual / 'class_labels_indices.csv', 'w') as f:
    f.write('index,mid,display_name\n' + ''.join(
        f'{i},/m/t{i:03d},"Class {i}"\n' for i in range(5)))
  labels = {'plain1': [0], 'yprefix': [1], 'span3dp': [2], 'span0dp': [3],
            'yspan01': [4], 'nofile1': [0]}
  _write_csv(manual / 'eval_segments.csv', labels, 10.)
  clip = np.arange(RATE // 10, dtype=np.int16)
  for name in ('plain1', 'Yyprefix', 'span3dp_20.000_30.000',
               'span0dp_30_40', 'Yyspan01_40.0_50.0'):
    _write_wav(manual / 'audio' / f'{name}.wav', clip)
  _write_wav(manual / 'audio' / 'nofile1_0_11.wav', clip)  # Wrong end time.
  kwargs = {'data_dir': str(tmp_path / 'tfds'), 'manual_dir': str(manual)}
  assert audioset.num_examples('eval', num_classes=5, **kwargs) == 5
  skipped = (tmp_path / 'tfds' / 'audioset' / 'audio' / '1.1.0' /
             'skipped-eval.txt').read_text()
  assert skipped.startswith('nofile1\tmissing audio/{nofile1,Ynofile1,'
                            'nofile1_50.000_60.000,')
  batch = next(audioset.load('eval', batch_size=8, is_training=False,
                             num_eval_clips=1, **kwargs))
  assert batch['labels'].shape == (8, 5)
  np.testing.assert_array_equal(batch['labels'][:5].sum(0), [1, 1, 1, 1, 1])
  with pytest.raises(ValueError, match='have 5 classes .* num_classes=527'):
    audioset.num_examples('eval', num_classes=527, **kwargs)


def test_class_list_must_be_complete(tmp_path):
  path = tmp_path / 'class_labels_indices.csv'
  path.write_text('index,mid,display_name\n0,/m/a,A\n2,/m/b,B\n')
  with pytest.raises(ValueError, match=r'expected indices 0..1'):
    audioset.audioset_builder.read_class_labels(str(path))
  path.write_text('index,mid,display_name\n0,/m/a,A\n1,/m/a,B\n')
  with pytest.raises(ValueError, match='distinct mids'):
    audioset.audioset_builder.read_class_labels(str(path))
  path.write_text('index,mid,display_name\n0,/m/a,A\n1,/m/b,B\n')
  assert audioset.audioset_builder.read_class_labels(str(path)) == {
      '/m/a': 0, '/m/b': 1}

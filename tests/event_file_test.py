"""experiments/event_file.py: event files that TensorFlow's own reader
accepts (record CRCs checked), holding exactly the scalars written."""

import glob
import os

import pytest

from experiments import event_file
from experiments import metric_writers


def test_crc32c_known_value():
  # The CRC-32C (Castagnoli) check value of the ASCII digits 1-9.
  assert event_file.crc32c(b'123456789') == 0xE3069283
  assert event_file.crc32c(b'') == 0


def test_tensorflow_reads_the_scalars_written(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  writer = metric_writers.MetricWriter(str(tmp_path))
  written = {(0, 'num_params'): 82650.0, (10, 'loss'): 2.25,
             (10, 'lr'): 1e-8, (2**40, 'eval/top1'): 0.875}
  for (step, name), value in written.items():
    writer.write_scalars(step, {name: value})
  writer.close()
  files = glob.glob(os.path.join(tmp_path, 'tensorboard',
                                 'events.out.tfevents.*'))
  assert len(files) == 1
  events = list(tf.compat.v1.train.summary_iterator(files[0]))
  assert events[0].file_version == 'brain.Event:2'
  read = {}
  for event in events[1:]:
    assert event.wall_time > 1.6e9
    value, = event.summary.value
    assert value.metadata.plugin_data.plugin_name == 'scalars'
    assert tf.make_ndarray(value.tensor).dtype == 'float32'
    read[(event.step, value.tag)] = float(tf.make_ndarray(value.tensor))
  assert read.keys() == written.keys()
  for key, value in written.items():
    assert read[key] == pytest.approx(value, rel=1e-7), key


def test_a_damaged_record_is_refused_by_the_reader(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  writer = event_file.EventFileWriter(str(tmp_path))
  writer.write_scalar('loss', 1.0, 1)
  writer.close()
  data = bytearray(writer.path.read_bytes())
  data[-6] ^= 0xFF  # a byte of the last record's data
  writer.path.write_bytes(bytes(data))
  with pytest.raises(Exception, match='(?i)corrupt|crc|checksum|data loss'):
    list(tf.compat.v1.train.summary_iterator(os.fspath(writer.path)))

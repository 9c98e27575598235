"""TensorBoard event files of scalars, written without importing TensorFlow.

An event file is a TFRecord file of `tensorflow.Event` protocol buffers. Each
record is: the data's length (uint64, little-endian), the masked CRC-32C of
those 8 bytes (uint32), the data, the masked CRC-32C of the data (uint32).
The first event names the format ('brain.Event:2'); every scalar after it is
an event with a step, a wall time and a one-value summary in TensorFlow 2's
layout (a float32 scalar tensor with the 'scalars' plugin's metadata), what
`tf.summary.write` records. TensorBoard and `tf.compat.v1.train.
summary_iterator` read them (tests/train_e2e_test.py checks the latter).

Importing TensorFlow costs every training run several seconds and ~0.5 GiB
of memory, a noticeable share of the CPU-scale runs, which need nothing else
from it; the few protocol-buffer fields below are written by hand.
"""

from __future__ import annotations

import os
import socket
import struct
import time

from etils import epath

# Protocol-buffer field numbers (tensorflow/core/util/event.proto,
# framework/summary.proto, framework/tensor.proto).
_EVENT_WALL_TIME, _EVENT_STEP, _EVENT_FILE_VERSION, _EVENT_SUMMARY = 1, 2, 3, 5
_SUMMARY_VALUE = 1
_VALUE_TAG, _VALUE_TENSOR, _VALUE_METADATA = 1, 8, 9
_METADATA_PLUGIN_DATA, _PLUGIN_NAME = 1, 1
_TENSOR_DTYPE, _TENSOR_SHAPE, _TENSOR_FLOAT_VAL = 1, 2, 5
_DT_FLOAT = 1
_VARINT, _FIXED64, _BYTES = 0, 1, 2


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
  return _varint(field << 3 | wire_type)


def _bytes_field(field: int, payload: bytes) -> bytes:
  return _key(field, _BYTES) + _varint(len(payload)) + payload


def _make_crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli, reflected
    table.append(crc)
  return table


_CRC32C_TABLE = _make_crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
  crc = crc32c(data)
  return struct.pack('<I', (((crc >> 15) | (crc << 17)) + 0xA282EAD8)
                     & 0xFFFFFFFF)


def record(data: bytes) -> bytes:
  """One TFRecord: length, its masked CRC, the data, the data's CRC."""
  length = struct.pack('<Q', len(data))
  return length + _masked_crc(length) + data + _masked_crc(data)


def _event(wall_time: float, step: int, body: bytes) -> bytes:
  return (_key(_EVENT_WALL_TIME, _FIXED64) + struct.pack('<d', wall_time)
          + _key(_EVENT_STEP, _VARINT) + _varint(step & (2**64 - 1)) + body)


def scalar_event(tag: str, value: float, step: int, wall_time: float
                 ) -> bytes:
  """An Event holding one float32 scalar summary (TF2 layout)."""
  metadata = _bytes_field(_METADATA_PLUGIN_DATA,
                          _bytes_field(_PLUGIN_NAME, b'scalars'))
  tensor = (_key(_TENSOR_DTYPE, _VARINT) + _varint(_DT_FLOAT)
            + _bytes_field(_TENSOR_SHAPE, b'')
            + _bytes_field(_TENSOR_FLOAT_VAL, struct.pack('<f', value)))
  summary_value = (_bytes_field(_VALUE_TAG, tag.encode('utf-8'))
                   + _bytes_field(_VALUE_TENSOR, tensor)
                   + _bytes_field(_VALUE_METADATA, metadata))
  summary = _bytes_field(_SUMMARY_VALUE, summary_value)
  return _event(wall_time, step, _bytes_field(_EVENT_SUMMARY, summary))


class EventFileWriter:
  """Appends scalar events to a new event file in `logdir` (local or gs://)."""

  def __init__(self, logdir: str):
    directory = epath.Path(logdir)
    directory.mkdir(parents=True, exist_ok=True)
    now = time.time()
    name = (f'events.out.tfevents.{int(now)}.{socket.gethostname()}.'
            f'{os.getpid()}.v2')
    self.path = directory / name
    self._file = self.path.open('wb')
    self._file.write(record(_event(now, 0, _bytes_field(
        _EVENT_FILE_VERSION, b'brain.Event:2'))))
    self._file.flush()

  def write_scalar(self, tag: str, value: float, step: int) -> None:
    self._file.write(record(scalar_event(tag, float(value), int(step),
                                         time.time())))

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None

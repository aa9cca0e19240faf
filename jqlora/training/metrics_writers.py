"""Where the metrics rows of a run go: ``metrics.jsonl`` and, optionally, TensorBoard.

A row is a flat mapping such as ``{"step": 3, "loss": 1.2, "learning_rate": 2e-4}``.
``metrics.jsonl`` gets every row as one JSON line (resume and ``jqlora plot`` read it);
with ``logging: [jsonl, tensorboard]`` each number in a row is also a TensorBoard
scalar (tag = key, at the row's step) in ``output_dir/tensorboard/events.out.tfevents.*``.

The event file is written here, without TensorFlow or ``tensorboard``: TFRecord framing
(little-endian length, masked CRC-32C of length and of data) around ``Event`` protos
encoded by hand (``wall_time`` 1, ``step`` 2, ``file_version`` 3, ``summary`` 5; a
``Summary.Value`` has ``tag`` 1 and ``simple_value`` 2). Each ``train`` call opens a new
event file; TensorBoard drops a resumed run's orphaned steps when the step goes back.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import struct
import time
from typing import Any, TextIO

__all__ = ["MetricsLog", "TensorBoardWriter", "crc32c"]


def _crc_table() -> list[int]:
  table = []
  for n in range(256):
    c = n
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli, reflected
    table.append(c)
  return table


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of ``data``, as TFRecord uses it."""
  c = 0xFFFFFFFF
  for b in data:
    c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
  return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  c = crc32c(data)
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1  # int64 fields: a negative value is its two's complement
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
  """A length-delimited protobuf field."""
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(step: int, *, file_version: str | None = None,
           scalars: dict[str, float] | None = None) -> bytes:
  """One serialized ``tensorflow.Event`` with the wall time now."""
  out = b"\x09" + struct.pack("<d", time.time()) + b"\x10" + _varint(step)
  if file_version is not None:
    out += _field(3, file_version.encode())
  if scalars:
    values = b"".join(_field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
                      for tag, value in scalars.items())
    out += _field(5, values)
  return out


class TensorBoardWriter:
  """Scalars to a new TensorBoard event file in ``directory`` (created if missing)."""

  def __init__(self, directory: str | os.PathLike[str]):
    folder = pathlib.Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
    self.path = folder / name
    self._file = self.path.open("wb")
    self._record(_event(0, file_version="brain.Event:2"))

  def _record(self, data: bytes) -> None:
    length = struct.pack("<Q", len(data))
    self._file.write(length + struct.pack("<I", _masked_crc(length)) + data
                     + struct.pack("<I", _masked_crc(data)))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    """Each of ``values`` as a scalar at ``step``."""
    if values:
      self._record(_event(step, scalars=values))
      self._file.flush()

  def close(self) -> None:
    self._file.close()


class MetricsLog:
  """A run's metrics rows: one JSON line each in ``jsonl``, numbers also to ``tensorboard``."""

  def __init__(self, jsonl: TextIO, tensorboard: TensorBoardWriter | None = None):
    self._jsonl, self._tensorboard = jsonl, tensorboard

  def write(self, row: dict[str, Any]) -> None:
    """Appends ``row`` (which has a ``step``) and flushes."""
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    if self._tensorboard is not None:
      numbers = {k: float(v) for k, v in row.items()
                 if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}
      self._tensorboard.scalars(row["step"], numbers)

  def close(self) -> None:
    self._jsonl.close()
    if self._tensorboard is not None:
      self._tensorboard.close()

  def __enter__(self) -> MetricsLog:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()

"""Hugging Face model folders as a ``TensorSource``.

A folder holds ``config.json`` and the weights as ``model.safetensors`` or as
shards listed by ``model.safetensors.index.json``. Tensors are read one at a
time, so a builder never holds more than the tensor it is converting, or one
block of rows and columns at a time (``get_slice``: a sharded build reads only its
devices' part); each is read into a fresh 64-byte aligned buffer rather than
through a memory map, so no file pages stay resident and JAX adopts the buffer
without copying it. Every read adds to ``jqlora.io.reads.READS``. A folder
saved by transformers with bitsandbytes 4-bit NF4 or FP4 is read as stored: each
quantized weight comes back as an ``NF4Tensor`` over the same bytes, never
re-quantized. Pickled checkpoints (``.bin``, ``.pt``, ``.pth``) are refused,
never unpickled.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import struct
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jqlora.format import (
  CODES,
  DYNAMIC_MAP_SIGNED,
  NESTED_BLOCK_SIZE,
  NF4Tensor,
  dequantize_reference,
  storage_shapes,
)
from jqlora.io.reads import READS
from jqlora.models.source import Index

__all__ = ["HFSource", "SafetensorsFile", "read_json", "refuse_pickle", "PICKLE_SUFFIXES"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: Suffixes of PyTorch pickle checkpoints, which are refused.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
_NF4_STATE = ".quant_state.bitsandbytes__nf4"
_FP4_STATE = ".quant_state.bitsandbytes__fp4"
_BNB_TYPES = {"nf4": _NF4_STATE, "fp4": _FP4_STATE}  # bnb_4bit_quant_type -> quant-state suffix
# Companion tensors transformers saves beside a bitsandbytes 4-bit weight.
_BNB_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                 _NF4_STATE, _FP4_STATE)


def read_json(path: pathlib.Path) -> Any:
  """Parses a JSON file, naming the file (and line) in every error.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: malformed JSON, with its line and column.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found")
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(
        f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


def refuse_pickle(path: pathlib.Path) -> None:
  """Raises for a pickled PyTorch checkpoint, pointing to safetensors."""
  raise ValueError(
      f"{path}: refusing to read a pickled PyTorch checkpoint ({pathlib.Path(path).suffix}): "
      "unpickling can run arbitrary code. Save the model as safetensors instead "
      "(transformers: model.save_pretrained(folder, safe_serialization=True)) and load "
      "that folder.")


# safetensors dtype names -> numpy dtypes (the format is little-endian)
_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_ALIGN = 64  # JAX's CPU client aliases host buffers aligned to 64 bytes


class SafetensorsFile:
  """One ``.safetensors`` file: its header parsed once, each tensor read on demand.

  Args:
    path: the file.

  Raises:
    ValueError: the file is not valid safetensors (named, with what is wrong).
  """

  def __init__(self, path: pathlib.Path):
    self.path = pathlib.Path(path)
    size = self.path.stat().st_size
    with open(self.path, "rb") as f:
      head = f.read(8)
      n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
      if not 0 < n <= size - 8:
        raise ValueError(f"{self.path}: not a safetensors file (bad header length)")
      try:
        header = json.loads(f.read(n))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{self.path}: not a safetensors file (header: {e})") from None
    header.pop("__metadata__", None)
    self._start = 8 + n
    self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
    for name, e in header.items():
      dtype = _DTYPES.get(e.get("dtype"))
      shape = tuple(int(d) for d in e.get("shape", ()))
      begin, end = e.get("data_offsets", (0, -1))
      if dtype is None:
        raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {e.get('dtype')!r}")
      if end - begin != math.prod(shape) * dtype.itemsize or self._start + end > size:
        raise ValueError(f"{self.path}: tensor {name!r} has inconsistent offsets for shape {shape}")
      self._entries[name] = (dtype, shape, begin, end)

  def keys(self) -> list[str]:
    return list(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name][1]

  def dtype(self, name: str) -> np.dtype:
    return self._entries[name][0]

  def read(self, name: str, index: Index | None = None,
           shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A fresh array holding tensor ``name``, or its block ``index`` (64-byte aligned).

    Args:
      name: the tensor.
      index: one step-1 ``slice`` per dimension; only these elements are read (one
        read per contiguous run of the file).
      shape: view the stored elements as this C-order shape first (same count).
    """
    dtype, stored, begin, _ = self._entries[name]
    shape = stored if shape is None else tuple(shape)
    if math.prod(shape) != math.prod(stored):
      raise ValueError(f"{self.path}: tensor {name!r} of shape {stored} cannot be read as {shape}")
    bounds = [s.indices(n)[:2] for s, n in zip(index, shape)] if index else []
    bounds += [(0, n) for n in shape[len(bounds):]]
    out_shape = tuple(max(0, b - a) for a, b in bounds)
    nbytes = math.prod(out_shape) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    skip = -raw.ctypes.data % _ALIGN
    view = memoryview(raw[skip:skip + nbytes])
    if nbytes:
      inner = len(shape)  # dimensions from `inner` on are whole: one contiguous run each
      while inner > 0 and bounds[inner - 1] == (0, shape[inner - 1]):
        inner -= 1
      strides = [math.prod(shape[d + 1:]) * dtype.itemsize for d in range(len(shape))]
      offsets = np.zeros((), np.int64)
      for d in range(inner - 1):
        offsets = offsets[..., None] + np.arange(*bounds[d], dtype=np.int64) * strides[d]
      first = self._start + begin + (bounds[inner - 1][0] * strides[inner - 1] if inner else 0)
      run = nbytes // offsets.size
      fd = os.open(self.path, os.O_RDONLY)
      try:
        for i, off in enumerate(offsets.reshape(-1).tolist()):
          self._read_run(fd, view[i * run:(i + 1) * run], first + off, name)
      finally:
        os.close(fd)
    READS.add(nbytes)
    return raw[skip:skip + nbytes].view(dtype).reshape(out_shape)

  def _read_run(self, fd: int, view: memoryview, offset: int, name: str) -> None:
    done = 0
    while done < len(view):
      got = os.preadv(fd, [view[done:]], offset + done)
      if not got:
        raise ValueError(f"{self.path}: file ends inside tensor {name!r}")
      done += got


def _require(mapping: dict, key: str, where: str) -> Any:
  if key not in mapping:
    raise KeyError(f"{where}: missing key {key!r}")
  return mapping[key]


def _weight_files(folder: pathlib.Path) -> dict[str, SafetensorsFile]:
  """Maps every tensor name to the safetensors file that holds it."""
  index = folder / INDEX_FILE
  if index.exists():
    weight_map = _require(read_json(index), "weight_map", str(index))
    shards = {}
    for shard in sorted(set(weight_map.values())):
      if not (folder / shard).is_file():
        raise FileNotFoundError(f"{folder / shard} not found: {index} lists it as a weight shard")
      shards[shard] = SafetensorsFile(folder / shard)
    for name, shard in weight_map.items():
      if name not in shards[shard]:
        raise KeyError(f"{index}: lists tensor {name!r} in {shard}, which does not hold it")
    return {name: shards[shard] for name, shard in weight_map.items()}
  single = folder / WEIGHTS_FILE
  if single.is_file():
    weights = SafetensorsFile(single)
    return {name: weights for name in weights.keys()}
  pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
  if pickles:
    refuse_pickle(pickles[0])
  raise FileNotFoundError(
      f"{folder}: no weights found; expected {WEIGHTS_FILE} or sharded safetensors "
      f"listed by {INDEX_FILE}")


def _bnb_4bit(config: dict, where: str) -> bool:
  """Whether ``config`` describes a bitsandbytes 4-bit NF4/FP4 checkpoint; refuses other quantizations."""
  qc = config.get("quantization_config")
  if qc is None:
    return False
  method = qc.get("quant_method")
  if method != "bitsandbytes":
    raise ValueError(
        f"{where}: quantization_config.quant_method {method!r} is not supported "
        "(supported: 'bitsandbytes' 4-bit NF4 or FP4, or an unquantized checkpoint)")
  if qc.get("load_in_8bit"):
    raise ValueError(
        f"{where}: bitsandbytes 8-bit (LLM.int8) checkpoints are not supported; "
        "only 4-bit (load_in_4bit with bnb_4bit_quant_type 'nf4' or 'fp4')")
  if not qc.get("load_in_4bit"):
    raise ValueError(f"{where}: quantization_config has neither load_in_4bit nor load_in_8bit")
  quant_type = qc.get("bnb_4bit_quant_type", "fp4")
  if quant_type not in _BNB_TYPES:
    raise ValueError(
        f"{where}: bitsandbytes 4-bit type {quant_type!r} is not supported; only 'nf4' or 'fp4'")
  return True


def _abstract_bnb(*, shape, dtype, block_size, absmax2, offset, quant_type) -> NF4Tensor:
  """The stored 4-bit weight without its codes (``packed``/``absmax`` as ``ShapeDtypeStruct``s)."""
  shape = tuple(int(d) for d in shape)
  packed_shape, absmax_shape = storage_shapes(shape, block_size)
  double_quant = absmax2 is not None
  if double_quant:
    absmax2 = np.asarray(absmax2, np.float32).reshape(-1)
    offset = np.asarray(offset, np.float32).reshape(())
  return NF4Tensor(jax.ShapeDtypeStruct(packed_shape, np.uint8),
                   jax.ShapeDtypeStruct(absmax_shape, np.uint8 if double_quant else np.float32),
                   absmax2, offset, shape=shape, dtype=dtype, block_size=block_size,
                   double_quant=double_quant, quant_type=quant_type)


class HFSource:
  """A ``TensorSource`` over a Hugging Face folder of safetensors, plain or bitsandbytes NF4/FP4.

  Args:
    folder: holds ``config.json`` and ``model.safetensors`` (or shards listed by
      ``model.safetensors.index.json``).

  Raises:
    FileNotFoundError: no folder, no ``config.json``, no weights, or a missing shard.
    ValueError: malformed JSON, a pickled checkpoint, or an unsupported quantization.
    KeyError: a required key missing from a JSON file.
  """

  def __init__(self, folder: str | pathlib.Path):
    self.folder = pathlib.Path(folder)
    if not self.folder.is_dir():
      raise FileNotFoundError(f"{self.folder} is not a folder")
    config_path = self.folder / CONFIG_FILE
    if not config_path.is_file():
      raise FileNotFoundError(
          f"{self.folder}: no {CONFIG_FILE}; a Hugging Face model folder holds {CONFIG_FILE} "
          f"and {WEIGHTS_FILE} (or shards with {INDEX_FILE})")
    self._config = read_json(config_path)
    if not isinstance(self._config, dict):
      raise ValueError(f"{config_path}: expected a JSON object, got {type(self._config).__name__}")
    self.quantized = _bnb_4bit(self._config, str(config_path))
    self._files = _weight_files(self.folder)
    self._info: dict[str, NF4Tensor | None] = {}

  def hf_config(self) -> dict[str, Any]:
    """``config.json`` as a dict."""
    return dict(self._config)

  def names(self) -> list[str]:
    """Tensor names, bitsandbytes companions (``.absmax``, ``.quant_state…``) left out."""
    return sorted(n for n in self._files if not n.endswith(_BNB_SUFFIXES))

  def _file(self, name: str) -> SafetensorsFile:
    file = self._files.get(name)
    if file is None:
      files = sorted({f.path.name for f in self._files.values()})
      raise KeyError(f"tensor {name!r} is not in {self.folder} (files: {', '.join(files)})")
    return file

  def _read(self, name: str) -> np.ndarray:
    return self._file(name).read(name)

  def tensor_shape(self, name: str) -> tuple[int, ...]:
    """The shape of ``name`` (a bitsandbytes 4-bit weight: the shape it represents)."""
    info = self.nf4_info(name)
    return info.shape if info is not None else self._file(name).shape(name)

  def get_slice(self, name: str, index: Index) -> np.ndarray:
    """``get(name)[index]``, reading only those elements (a stored 4-bit weight: decoded whole)."""
    if self.nf4_info(name) is not None:
      return self.get(name)[index]
    return self._file(name).read(name, index)

  def get(self, name: str) -> np.ndarray:
    """The tensor ``name`` in its stored dtype (bf16 as ``ml_dtypes.bfloat16``).

    A bitsandbytes 4-bit weight is dequantized exactly as bitsandbytes does, to the
    dtype recorded in its quant state.
    """
    t = self.get_nf4(name)
    if t is not None:
      return np.asarray(dequantize_reference(t))
    return self._read(name)

  def get_nf4(self, name: str) -> NF4Tensor | None:
    """The bitsandbytes NF4/FP4 weight ``name`` over its stored bytes, or None if not quantized.

    Raises:
      ValueError: a quant state or quant map that disagrees with the stored type.
      KeyError: a companion tensor or quant-state key is missing.
    """
    kw = self._bnb_weight(name)
    if kw is None:
      return None
    packed = self._read(name)
    if packed.dtype != np.uint8:  # bnb_4bit_quant_storage other than uint8
      packed = np.ascontiguousarray(packed).view(np.uint8)
    return NF4Tensor.from_bnb(packed, self._read(name + ".absmax"), **kw)

  def nf4_info(self, name: str) -> NF4Tensor | None:
    """The stored 4-bit weight ``name`` with ``packed``/``absmax`` as ``jax.ShapeDtypeStruct``s
    (its quant state and nested scales read, its codes not), or None if not quantized."""
    if name not in self._info:
      kw = self._bnb_weight(name)
      self._info[name] = None if kw is None else _abstract_bnb(**kw)
    return self._info[name]

  def get_nf4_slice(self, name: str, index: Index) -> tuple[np.ndarray, np.ndarray]:
    """``(packed, absmax)`` of the stored 4-bit weight ``name`` for ``index = (rows, cols)``
    over its ``[out, in]`` shape (``cols`` on whole blocks), read from disk as stored."""
    t = self.nf4_info(name)
    rows, cols = index
    start, stop, _ = cols.indices(t.shape[-1])
    packed_shape, absmax_shape = storage_shapes(t.shape, t.block_size)
    packed_cols = slice(start // 2, stop // 2)
    file = self._file(name)
    if file.dtype(name) != np.uint8:  # bnb_4bit_quant_storage other than uint8: read it whole
      packed = np.ascontiguousarray(file.read(name)).view(np.uint8).reshape(packed_shape)
      packed = packed[rows, packed_cols]
    else:
      packed = file.read(name, (rows, packed_cols), shape=packed_shape)
    absmax_cols = slice(start // t.block_size, stop // t.block_size)
    absmax = self._file(name + ".absmax").read(name + ".absmax", (rows, absmax_cols),
                                               shape=absmax_shape)
    return packed, absmax

  def _bnb_weight(self, name: str) -> dict[str, Any] | None:
    """``NF4Tensor.from_bnb``'s keyword arguments but the codes and scales for the stored
    weight ``name`` (its checked quant state and nested scales), or None if not quantized."""
    if not self.quantized:
      return None
    where = f"{name} in {self.folder}"
    stored = [t for t, suffix in _BNB_TYPES.items() if name + suffix in self._files]
    if not stored:
      return None
    state_bytes = self._read(name + _BNB_TYPES[stored[0]])
    try:
      state = json.loads(state_bytes.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{where}: unreadable bitsandbytes quant state: {e}") from None
    where_state = f"{where}, quant state"
    quant_type = state.get("quant_type", stored[0])
    if quant_type != stored[0]:
      raise ValueError(f"{where}: quant state {_BNB_TYPES[stored[0]]!r} says quant_type {quant_type!r}")
    if name + ".quant_map" in self._files:
      quant_map = self._read(name + ".quant_map")
      if not np.array_equal(quant_map.astype(np.float32).view(np.uint32),
                            CODES[quant_type].view(np.uint32)):
        raise ValueError(f"{where}: quant_map is not the {quant_type.upper()} code book")
    absmax2 = offset = None
    if name + ".nested_absmax" in self._files:
      absmax2 = self._read(name + ".nested_absmax")
      offset = _require(state, "nested_offset", where_state)
      nested_block = state.get("nested_blocksize", NESTED_BLOCK_SIZE)
      if nested_block != NESTED_BLOCK_SIZE:
        raise ValueError(f"{where}: nested_blocksize {nested_block} is not supported "
                         f"(bitsandbytes uses {NESTED_BLOCK_SIZE})")
      if name + ".nested_quant_map" in self._files:
        nested_map = self._read(name + ".nested_quant_map").astype(np.float32)
        if not np.array_equal(nested_map.view(np.uint32), DYNAMIC_MAP_SIGNED.view(np.uint32)):
          raise ValueError(f"{where}: nested_quant_map is not bitsandbytes' signed dynamic map")
    return dict(shape=_require(state, "shape", where_state),
                dtype=jnp.dtype(_require(state, "dtype", where_state)),
                block_size=_require(state, "blocksize", where_state), absmax2=absmax2,
                offset=offset, quant_type=quant_type)


"""Hugging Face model folders as a ``TensorSource``.

A folder holds ``config.json`` and the weights as ``model.safetensors`` or as
shards listed by ``model.safetensors.index.json``. Tensors are read one at a
time, so a builder never holds more than the tensor it is converting; each is
read into a fresh 64-byte aligned buffer rather than through a memory map, so no
file pages stay resident and JAX adopts the buffer without copying it. A folder
saved by transformers with bitsandbytes 4-bit NF4 is read as stored: each
quantized weight comes back as an ``NF4Tensor`` over the same bytes, never
re-quantized. Pickled checkpoints (``.bin``, ``.pt``, ``.pth``) are refused,
never unpickled.
"""

from __future__ import annotations

import json
import math
import pathlib
import struct
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jqlora.format import (
  DYNAMIC_MAP_SIGNED,
  NESTED_BLOCK_SIZE,
  NF4_CODE,
  NF4Tensor,
  dequantize_reference,
)

__all__ = ["HFSource", "SafetensorsFile", "read_json", "refuse_pickle", "PICKLE_SUFFIXES"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: Suffixes of PyTorch pickle checkpoints, which are refused.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
_NF4_STATE = ".quant_state.bitsandbytes__nf4"
_FP4_STATE = ".quant_state.bitsandbytes__fp4"
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

  def read(self, name: str) -> np.ndarray:
    """A fresh array holding tensor ``name`` (64-byte aligned)."""
    dtype, shape, begin, end = self._entries[name]
    raw = np.empty(end - begin + _ALIGN, np.uint8)
    skip = -raw.ctypes.data % _ALIGN
    view = memoryview(raw[skip:skip + end - begin])
    with open(self.path, "rb", buffering=0) as f:
      f.seek(self._start + begin)
      done = 0
      while done < len(view):
        got = f.readinto(view[done:])
        if not got:
          raise ValueError(f"{self.path}: file ends inside tensor {name!r}")
        done += got
    return raw[skip:skip + end - begin].view(dtype).reshape(shape)


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
  """Whether ``config`` describes a bitsandbytes 4-bit NF4 checkpoint; refuses other quantizations."""
  qc = config.get("quantization_config")
  if qc is None:
    return False
  method = qc.get("quant_method")
  if method != "bitsandbytes":
    raise ValueError(
        f"{where}: quantization_config.quant_method {method!r} is not supported "
        "(supported: 'bitsandbytes' 4-bit NF4, or an unquantized checkpoint)")
  if qc.get("load_in_8bit"):
    raise ValueError(
        f"{where}: bitsandbytes 8-bit (LLM.int8) checkpoints are not supported; "
        "only 4-bit NF4 (load_in_4bit with bnb_4bit_quant_type 'nf4')")
  if not qc.get("load_in_4bit"):
    raise ValueError(f"{where}: quantization_config has neither load_in_4bit nor load_in_8bit")
  quant_type = qc.get("bnb_4bit_quant_type", "fp4")
  if quant_type != "nf4":
    raise ValueError(
        f"{where}: bitsandbytes 4-bit type {quant_type!r} is not supported; only 'nf4'")
  return True


class HFSource:
  """A ``TensorSource`` over a Hugging Face folder of safetensors, plain or bitsandbytes NF4.

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

  def hf_config(self) -> dict[str, Any]:
    """``config.json`` as a dict."""
    return dict(self._config)

  def names(self) -> list[str]:
    """Tensor names, bitsandbytes companions (``.absmax``, ``.quant_state…``) left out."""
    return sorted(n for n in self._files if not n.endswith(_BNB_SUFFIXES))

  def _read(self, name: str) -> np.ndarray:
    file = self._files.get(name)
    if file is None:
      files = sorted({f.path.name for f in self._files.values()})
      raise KeyError(f"tensor {name!r} is not in {self.folder} (files: {', '.join(files)})")
    return file.read(name)

  def get(self, name: str) -> np.ndarray:
    """The tensor ``name`` in its stored dtype (bf16 as ``ml_dtypes.bfloat16``).

    A bitsandbytes NF4 weight is dequantized exactly as bitsandbytes does, to the
    dtype recorded in its quant state.
    """
    t = self.get_nf4(name)
    if t is not None:
      return np.asarray(dequantize_reference(t))
    return self._read(name)

  def get_nf4(self, name: str) -> NF4Tensor | None:
    """The bitsandbytes NF4 weight ``name`` over its stored bytes, or None if not quantized.

    Raises:
      ValueError: an FP4 weight, or a quant map that is not NF4.
      KeyError: a companion tensor or quant-state key is missing.
    """
    if not self.quantized:
      return None
    where = f"{name} in {self.folder}"
    if name + _FP4_STATE in self._files:
      raise ValueError(f"{where}: bitsandbytes FP4 weights are not supported; only NF4")
    if name + _NF4_STATE not in self._files:
      return None
    state_bytes = self._read(name + _NF4_STATE)
    try:
      state = json.loads(state_bytes.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{where}: unreadable bitsandbytes quant state: {e}") from None
    where_state = f"{where}, quant state"
    quant_type = state.get("quant_type", "nf4")
    if quant_type != "nf4":
      raise ValueError(f"{where}: bitsandbytes 4-bit type {quant_type!r} is not supported; only 'nf4'")
    if name + ".quant_map" in self._files:
      quant_map = self._read(name + ".quant_map")
      if not np.array_equal(quant_map.astype(np.float32).view(np.uint32), NF4_CODE.view(np.uint32)):
        raise ValueError(f"{where}: quant_map is not the NF4 code book")
    packed = self._read(name)
    if packed.dtype != np.uint8:  # bnb_4bit_quant_storage other than uint8
      packed = np.ascontiguousarray(packed).view(np.uint8)
    absmax = self._read(name + ".absmax")
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
    return NF4Tensor.from_bnb(
        packed, absmax, shape=_require(state, "shape", where_state),
        dtype=jnp.dtype(_require(state, "dtype", where_state)),
        block_size=_require(state, "blocksize", where_state), absmax2=absmax2, offset=offset)


"""Loading straight into shards: every stacked tensor is made in its ``NamedSharding`` on a mesh.

``ShardedTensors`` is the ``TensorMaker`` (``jqlora.models.builder``) of
``load_model(..., mesh=mesh)``. For each stacked tensor it asks the checkpoint
only for the blocks (rows x columns, all layers) that this process's devices
hold (``TensorSource.get_slice``; a replicated block is read once), quantizes
each block on its own (NF4 blocks never straddle a shard: the ``in`` split is on
whole blocks; in fixed chunks of blocks, so one compiled program serves every
shape) and assembles the global array with
``jax.make_array_from_callback``, so no device and no process ever holds a
whole tensor. Double quantization needs the whole tensor's block scales (its
``offset`` is their mean, a nested group spans 256 blocks): the float32 scales
of all shards form one global array, and ``double_quantize`` runs on it once
per layer under ``jax.jit`` (XLA gathers the scales, 1/16 of a float32 weight,
across devices and processes), so the bytes equal whole-tensor quantization.
After each weight the heap that compiling its programs freed goes back to the OS
(``malloc_trim``), so compiles do not pile up in the process's resident set.
A bitsandbytes folder's codes and scales are sliced as stored, never
re-quantized; GGUF tensors are read row by row. Storage that does not split
(flat NF4 layouts, replicated tensors) is read whole.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from jqlora.format import NF4Tensor, quantize_4bit
from jqlora.format.nf4 import double_quantize
from jqlora.models.builder import (
  BuildSettings,
  Path,
  WholeTensors,
  abstract_linear,
  check_float,
  check_shape,
)
from jqlora.models.source import Index, TensorSource

__all__ = ["ShardedTensors", "sharded_tensors"]

Key = tuple[tuple[int, int], ...]  # (start, stop) per dimension: one block of a global array


_ALIGN = 64  # JAX's CPU client adopts host buffers aligned to 64 bytes without copying them


def _empty(shape: tuple[int, ...], dtype) -> np.ndarray:
  """An uninitialized 64-byte aligned host array (so a CPU device takes it without a copy)."""
  dtype = np.dtype(dtype)
  nbytes = math.prod(shape) * dtype.itemsize
  raw = np.empty(nbytes + _ALIGN, np.uint8)
  skip = -raw.ctypes.data % _ALIGN
  return raw[skip:skip + nbytes].view(dtype).reshape(shape)


def _key(index: Index, shape: tuple[int, ...]) -> Key:
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _index(key: Key) -> Index:
  return tuple(slice(a, b) for a, b in key)


def _blocks(sharding: NamedSharding, shape: tuple[int, ...]) -> list[Key]:
  """The distinct blocks of ``shape`` that this process's devices hold."""
  keys = {_key(i, shape) for i in sharding.addressable_devices_indices_map(shape).values()}
  return sorted(keys)


def _assemble(shape: tuple[int, ...], sharding: NamedSharding,
              block: Callable[[Key], np.ndarray]) -> jax.Array:
  """The global array whose every local device block is ``block(key)`` (computed once per key)."""
  done: dict[Key, np.ndarray] = {}

  def callback(index: Index) -> np.ndarray:
    key = _key(index, shape)
    if key not in done:
      done[key] = block(key)
    return done[key]

  return jax.make_array_from_callback(tuple(shape), sharding, callback)


def _scale_last(key: Key, factor: int) -> Key:
  """A block of packed (``factor`` 2) or absmax (``factor`` block_size) in weight coordinates."""
  (a, b) = key[-1]
  return key[:-1] + ((a * factor, b * factor),)


def _double_quantize_layers(absmax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``double_quantize`` of each layer of float32 ``absmax [L, out, in/B]``, one at a time."""
  def one(a):
    codes, absmax2, offset = double_quantize(a.reshape(-1))
    return codes.reshape(a.shape), absmax2, offset

  return jax.lax.map(one, absmax)


#: Scale blocks per quantize call: every shard shape runs the one compiled program (each
#: compiled shape kept 2-5 MiB of the process resident; a 1 M-element chunk is 2 MiB of bf16).
_CHUNK_BLOCKS = 1 << 14


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize_chunk(x: jax.Array, quant_type: str, block_size: int) -> tuple[jax.Array, jax.Array]:
  """Codes ``[n, B/2]`` and float32 scales ``[n, 1]`` of ``n`` blocks ``[n, B]``."""
  t = quantize_4bit(x, quant_type, block_size, False)
  return t.packed, t.absmax


def _quantize_block(x: np.ndarray, settings: BuildSettings, block_size: int,
                    packed: np.ndarray, absmax: np.ndarray) -> None:
  """Quantizes one block ``[rows, cols]`` of a weight into ``packed [rows, cols/2]`` and
  float32 ``absmax [rows, cols/B]`` (scale blocks run along rows, so a chunk of them
  quantizes exactly as the whole block does)."""
  blocks = x.reshape(-1, block_size)
  codes, scales = packed.reshape(-1, block_size // 2), absmax.reshape(-1)
  for a in range(0, len(blocks), _CHUNK_BLOCKS):
    part = blocks[a:a + _CHUNK_BLOCKS]
    n = len(part)
    if n < _CHUNK_BLOCKS:  # zero blocks quantize to zero codes and scale; dropped below
      part = np.concatenate([part, np.zeros((_CHUNK_BLOCKS - n, block_size), part.dtype)])
    p, s = _quantize_chunk(jnp.asarray(part, settings.dtype), settings.quant_type, block_size)
    codes[a:a + n], scales[a:a + n] = np.asarray(p)[:n], np.asarray(s)[:n, 0]


def _return_free_heap() -> None:
  """glibc's ``malloc_trim(0)``: gives back the heap that XLA's compiler freed (measured:
  each double-quantize compile left ~25 MiB of freed heap resident); no-op without glibc."""
  trim = getattr(_libc(), "malloc_trim", None)
  if trim is not None:
    trim(0)


@functools.cache
def _libc() -> Any:
  try:
    return ctypes.CDLL(ctypes.util.find_library("c"))
  except (OSError, TypeError):
    return None


@functools.lru_cache(maxsize=32)
def _double_quantizer(out_shardings: tuple[NamedSharding, ...]) -> Callable:
  return jax.jit(_double_quantize_layers, out_shardings=out_shardings)


class ShardedTensors:
  """A ``TensorMaker`` whose tensors are global arrays with the shardings of ``shardings``.

  Args:
    source: the checkpoint.
    settings: dtype and quantization.
    shardings: the model's path -> ``NamedSharding`` (an ``NF4Tensor`` of them for an
      NF4 weight), from ``jqlora.parallel.model_shardings`` of the abstract model.
  """

  def __init__(self, source: TensorSource, settings: BuildSettings, *,
               shardings: Mapping[Path, Any]):
    self.source, self.settings, self.shardings = source, settings, shardings

  def _slice(self, name: str, index: Index) -> np.ndarray:
    try:
      arr = self.source.get_slice(name, index)
    except KeyError as e:
      raise KeyError(f"checkpoint is missing tensor {name!r} ({e.args[0] if e.args else ''})") \
          from None
    check_float(name, arr)
    return arr

  def _check(self, names: Sequence[str], shape: tuple[int, ...]) -> None:
    for name in names:
      try:
        got = self.source.tensor_shape(name)
      except KeyError as e:
        raise KeyError(f"checkpoint is missing tensor {name!r} ({e.args[0] if e.args else ''})") \
            from None
      check_shape(name, got, shape)

  def dense(self, path: Path, names: str | Sequence[str], shape: tuple[int, ...]) -> jax.Array:
    stacked = not isinstance(names, str)
    names = list(names) if stacked else [names]
    self._check(names, shape)
    dtype = np.dtype(self.settings.dtype)

    def block(key: Key) -> np.ndarray:
      if not stacked:
        part = self._slice(names[0], _index(key))
        if part.dtype == dtype and part.ctypes.data % _ALIGN == 0:
          return part  # read into an aligned buffer already
        out = _empty(part.shape, dtype)
        out[...] = part
        return out
      out = _empty(tuple(b - a for a, b in key), dtype)
      for j, i in enumerate(range(*key[0])):
        out[j] = self._slice(names[i], _index(key[1:]))
      return out

    full = ((len(names),) if stacked else ()) + tuple(shape)
    return _assemble(full, self.shardings[path], block)

  def linear(self, path: Path, names: Sequence[str], shape: tuple[int, int]) -> NF4Tensor | jax.Array:
    s, names = self.settings, list(names)
    info = abstract_linear(self.source, s, names, shape)
    if not isinstance(info, NF4Tensor):
      return self.dense(path, names, shape)
    target: NF4Tensor = self.shardings[path]
    if not info.row_aligned:  # flat storage is replicated: read and quantize it whole
      whole = WholeTensors(self.source, s).linear(path, names, shape)
      host = jax.tree.map(np.asarray, whole)
      return jax.tree.map(lambda x, sh: _assemble(x.shape, sh, lambda k: x[_index(k)]), host, target)
    stored = self.source.nf4_info(names[0]) is not None
    if not stored:
      self._check(names, shape)
    layers, bs = len(names), info.block_size
    weight_blocks = _blocks(NamedSharding(target.packed.mesh, target.packed.spec),
                            (layers, *shape))
    packed: dict[Key, np.ndarray] = {}
    scales: dict[Key, np.ndarray] = {}
    scale_dtype = info.absmax.dtype if stored else np.float32
    for key in weight_blocks:
      if key[0] != (0, layers):
        raise ValueError(f"{path}: the stacked layer axis is split; it must not be")
      (r0, r1), (c0, c1) = key[1:]
      packed[key] = _empty((layers, r1 - r0, (c1 - c0) // 2), np.uint8)
      scales[key] = _empty((layers, r1 - r0, (c1 - c0) // bs), scale_dtype)
    for i, name in enumerate(names):
      for key in weight_blocks:
        index = _index(key[1:])
        if stored:
          packed[key][i], scales[key][i] = map(np.asarray, self.source.get_nf4_slice(name, index))
        else:
          x = self._slice(name, index)
          check_float(name, x, finite=True)
          _quantize_block(x, s, bs, packed[key][i], scales[key][i])

    packed_array = _assemble(info.packed.shape, target.packed,
                             lambda k: packed.pop(_scale_last(k, 2)))
    absmax2 = offset = None
    scale_block = lambda k: scales[_scale_last(k, bs)]
    absmax = _assemble(info.absmax.shape, target.absmax, scale_block)
    if info.double_quant and stored:
      absmax2, offset = (_assemble(host.shape, sh, lambda k, h=host: np.asarray(h)[_index(k)])
                         for host, sh in ((info.absmax2, target.absmax2),
                                          (info.offset, target.offset)))
    elif info.double_quant:
      absmax, absmax2, offset = _double_quantizer(
          (target.absmax, target.absmax2, target.offset))(absmax)
    _return_free_heap()  # what compiling this tensor's programs freed
    return NF4Tensor(packed_array, absmax, absmax2, offset, shape=info.shape, dtype=info.dtype,
                     block_size=bs, double_quant=info.double_quant, quant_type=info.quant_type)


def sharded_tensors(shardings: Mapping[Path, Any]) -> Callable[[TensorSource, BuildSettings],
                                                                ShardedTensors]:
  """``build_model``'s ``tensors=`` for a model made straight into ``shardings``."""
  return functools.partial(ShardedTensors, shardings=shardings)

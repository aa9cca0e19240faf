"""The interface between checkpoint readers (``jqlora.io``) and model builders (``jqlora.models``).

A reader exposes a checkpoint as Hugging Face–named tensors, read one at a time
so that a builder can quantize layer by layer and never hold the full-precision
model; or read slice by slice (``get_slice``), so that a sharded build reads only
the rows and columns of its own devices.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import jax
import numpy as np

from jqlora.format import NF4Tensor, storage_shapes

__all__ = ["TensorSource", "DictSource", "Index", "abstract_nf4"]

#: A block of a tensor: one ``slice`` (step 1) per dimension.
Index = tuple[slice, ...]


class TensorSource(Protocol):
  """A checkpoint seen as Hugging Face tensor names (``model.layers.0.mlp.up_proj.weight``)."""

  def hf_config(self) -> dict[str, Any]:
    """The model's ``config.json`` as a dict (transformers' keys)."""

  def names(self) -> list[str]:
    """Names of every tensor (pre-quantized weights under their plain ``…weight`` name)."""

  def get(self, name: str) -> np.ndarray:
    """The tensor ``name`` in its stored float dtype (``ml_dtypes.bfloat16`` for bf16).

    Raises:
      KeyError: naming the checkpoint file(s) when ``name`` is missing.
    """

  def get_nf4(self, name: str) -> NF4Tensor | None:
    """The weight ``name`` as stored NF4 (a bitsandbytes checkpoint), else None."""

  def tensor_shape(self, name: str) -> tuple[int, ...]:
    """The shape of ``name`` as ``get`` returns it, nothing read but metadata.

    Raises:
      KeyError: naming the checkpoint file(s) when ``name`` is missing.
    """

  def get_slice(self, name: str, index: Index) -> np.ndarray:
    """``get(name)[index]``, reading (close to) only those elements from disk."""

  def nf4_info(self, name: str) -> NF4Tensor | None:
    """The stored NF4 weight ``name`` without its codes: ``packed`` and ``absmax`` are
    ``jax.ShapeDtypeStruct``s, the small nested ``absmax2`` and ``offset`` are read. None
    when ``name`` is not stored as NF4."""

  def get_nf4_slice(self, name: str, index: Index) -> tuple[np.ndarray, np.ndarray]:
    """``(packed[rows, cols / 2], absmax[rows, cols / block_size])`` of the stored NF4 weight
    ``name`` for ``index = (rows, cols)`` over its ``[out, in]`` shape (row-aligned storage,
    ``cols`` on whole blocks), read from disk as stored."""


def abstract_nf4(t: NF4Tensor) -> NF4Tensor:
  """``t`` with ``packed`` and ``absmax`` replaced by their ``jax.ShapeDtypeStruct``s."""
  packed_shape, absmax_shape = storage_shapes(t.shape, t.block_size)
  return NF4Tensor(jax.ShapeDtypeStruct(packed_shape, t.packed.dtype),
                   jax.ShapeDtypeStruct(absmax_shape, t.absmax.dtype), t.absmax2, t.offset,
                   shape=t.shape, dtype=t.dtype, block_size=t.block_size,
                   double_quant=t.double_quant, quant_type=t.quant_type)


class DictSource:
  """A ``TensorSource`` over in-memory arrays (tests, synthetic models)."""

  def __init__(self, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray],
               nf4: Mapping[str, NF4Tensor] | None = None):
    self._config = dict(config)
    self._tensors = dict(tensors)
    self._nf4 = dict(nf4 or {})

  def hf_config(self) -> dict[str, Any]:
    return dict(self._config)

  def names(self) -> list[str]:
    return sorted(set(self._tensors) | set(self._nf4))

  def get(self, name: str) -> np.ndarray:
    if name not in self._tensors:
      raise KeyError(f"tensor {name!r} is not in the in-memory checkpoint")
    return np.asarray(self._tensors[name])

  def get_nf4(self, name: str) -> NF4Tensor | None:
    return self._nf4.get(name)

  def tensor_shape(self, name: str) -> tuple[int, ...]:
    if name in self._nf4:
      return self._nf4[name].shape
    return tuple(self.get(name).shape)

  def get_slice(self, name: str, index: Index) -> np.ndarray:
    return np.array(self.get(name)[index])

  def nf4_info(self, name: str) -> NF4Tensor | None:
    t = self._nf4.get(name)
    return None if t is None else abstract_nf4(t)

  def get_nf4_slice(self, name: str, index: Index) -> tuple[np.ndarray, np.ndarray]:
    t = self._nf4[name]
    rows, cols = index
    start, stop, _ = cols.indices(t.shape[-1])
    packed = np.asarray(t.packed)[rows, start // 2:stop // 2]
    absmax = np.asarray(t.absmax)[rows, start // t.block_size:stop // t.block_size]
    return packed, absmax

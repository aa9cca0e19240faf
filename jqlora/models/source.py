"""The interface between checkpoint readers (``jqlora.io``) and model builders (``jqlora.models``).

A reader exposes a checkpoint as Hugging Face–named tensors, read one at a time
so that a builder can quantize layer by layer and never hold the full-precision
model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from jqlora.format import NF4Tensor

__all__ = ["TensorSource", "DictSource"]


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

"""The NNX Variable types of a frozen base with LoRA adapters, and their sharding metadata.

State is partitioned by Variable type, so a filter decides what trains:

- ``NF4Weight``: a frozen ``NF4Tensor`` (never a ``Param``: no gradient, no
  optimizer state);
- ``Frozen``: every other frozen base array (embeddings, norms, float linear
  weights, biases);
- ``nnx.LoRAParam``: the adapters (and DoRA magnitudes), the only trainable state;
- ``LoRAScale``: the adapters' fixed scaling (per stacked layer);
- ``DoRANorm``: DoRA's weight norms saved by ``merge_lora`` for ``unmerge_lora``;
- ``AdapterWeight``: the stored named adapters of a layer (``jqlora.nn.adapters``),
  never trained (the active one trains in its ``LoRAParam`` copy);
- ``AdapterIndex``: int32 adapter slots, the active one or one per batch row (data, so
  switching adapters does not recompile).

How a Variable shards is said where it is made: ``axes(names)`` is its metadata,
one logical axis name per dimension (``"embed"``, ``"mlp"``, ``"heads"``,
``"vocab"``, ``STACK_AXIS`` for stacked layers, None for never split), stored as
NNX's ``out_sharding`` without eager sharding and read back by
``nnx.get_partition_spec`` under logical-axis rules (``jqlora.parallel``). An NF4
weight's names describe the weight ``[*layers, out, in]``; its packed codes and
block scales follow them. ``optional`` dimensions (a LoRA rank) are split only
where the mesh axis divides them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flax import nnx

__all__ = ["NF4Weight", "Frozen", "LoRAScale", "DoRANorm", "AdapterWeight", "AdapterIndex",
           "STACK_AXIS", "OPTIONAL_KEY", "LABELS_KEY", "axes", "logical_axes"]

#: The logical name of stacked-layer axes (never split by jqlora's rules).
STACK_AXIS = "layers"
#: Metadata key: dimensions whose split is dropped where the mesh axis does not divide them.
OPTIONAL_KEY = "optional_sharding"
#: Metadata key: a label per trailing dimension for error messages (``"out"``, ``"in"``, ``"r"``).
LABELS_KEY = "dim_labels"


class NF4Weight(nnx.Variable):
  """A frozen NF4-quantized weight (value: ``NF4Tensor``, leaves possibly stacked)."""


class Frozen(nnx.Variable):
  """A frozen float base array: embeddings, norms, float linear weights, biases."""


class LoRAScale(nnx.Variable):
  """The fixed LoRA scaling, shape ``batch_shape`` (one value per stacked layer)."""


class DoRANorm(nnx.Variable):
  """float32 DoRA weight norms ``[*batch, out]`` of a merged layer, kept for unmerging."""


class AdapterWeight(nnx.Variable):
  """Named adapters of one layer stacked on a slot axis: ``a [*batch, n, in, r]``,
  ``b [*batch, n, r, out]``, scale float32 ``[*batch, n]`` (frozen)."""


class AdapterIndex(nnx.Variable):
  """int32 adapter slots: the active one ``[*batch]``, or one per row ``[*batch, B]`` (-1: none)."""


def axes(names: Sequence[str | None] | None, *, stack: int = 0, optional: Sequence[int] = (),
         labels: Sequence[str] | None = None) -> dict[str, Any]:
  """Variable metadata naming each dimension's logical axis (None: no metadata, replicated).

  Args:
    names: logical names of the trailing dimensions, e.g. ``("mlp", "embed")`` for a
      ``[out, in]`` weight; None for a Variable that is never split.
    stack: leading stacked-layer dimensions, named ``STACK_AXIS``.
    optional: indices (negative: from the end) of dimensions split only where the
      mesh axis divides them.
    labels: what each trailing dimension is (``("out", "in")``), for error messages.

  Returns:
    Keyword arguments for an ``nnx.Variable`` constructor.
  """
  if names is None:
    return {}
  meta: dict[str, Any] = {"out_sharding": (STACK_AXIS,) * stack + tuple(names),
                          "eager_sharding": False}
  if optional:
    meta[OPTIONAL_KEY] = tuple(int(d) for d in optional)
  if labels is not None:
    meta[LABELS_KEY] = tuple(labels)
  return meta


def logical_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
  """The logical axis names a Variable was made with (``axes``), or None."""
  names = variable.get_metadata().get("out_sharding")
  return None if not names else tuple(names)

"""Partition specs read from the Variables' own metadata: no table of module names.

Every Variable that splits says so where it is made (``jqlora.nn.variables.axes``):
one logical axis name per dimension. ``RULES`` maps logical names to mesh axes
(``jqlora.parallel.mesh.AXES``), and ``nnx.get_partition_spec`` reads the specs
back under those rules. With the default rules:

- column-parallel linears (``[*layers, out, in]`` with ``out`` named ``heads``,
  ``kv_heads``, ``mlp`` or ``vocab``): ``out`` on ``tensor``, ``in`` (``embed``) on
  ``fsdp``; row-parallel linears (``in`` named ``heads`` or ``mlp``): ``in`` on
  ``tensor``, ``out`` on ``fsdp``; the stacked ``layers`` axis is never split;
- NF4 storage ``packed [*layers, out, in/2]`` and ``absmax [*layers, out, in/B]``
  follows the weight it encodes; ``in`` is split on whole ``block_size`` blocks
  (the check is on ``in/B``). The nested scales ``absmax2`` and ``offset`` are a
  few bytes per tensor and stay replicated (under ``jax.jit`` each shard of
  ``absmax`` finds its group in the replicated copy; the storage stays the exact
  bitsandbytes bytes). Flat NF4 storage (rows not holding whole blocks) is replicated;
- adapters derive their names from their base (``jqlora.nn.linear``): ``lora_a
  [*layers, in, r]`` and ``lora_b [*layers, r, out]`` are split like the base's
  ``(in, out)``, the rank only where the mesh axis divides it, so each device holds
  1/(fsdp*tensor) of every adapter, moments included;
- biases follow ``out``; embeddings ``[vocab, embed]`` split ``vocab`` on ``tensor``
  and ``embed`` on ``fsdp``; Variables without names (norms, LoRA scales, RNG state)
  are replicated.

The same rules read the state of an ``nnx.Optimizer`` (its moments carry their
parameter's metadata), so optimizer state is sharded like the adapters.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jqlora.format import NF4Tensor
from jqlora.nn.variables import LABELS_KEY, OPTIONAL_KEY, STACK_AXIS

__all__ = ["RULES", "partition_specs", "model_shardings"]

#: Logical axis name -> mesh axis (None: never split).
RULES: tuple[tuple[str, str | None], ...] = (
    (STACK_AXIS, None), ("vocab", "tensor"), ("embed", "fsdp"), ("heads", "tensor"),
    ("kv_heads", "tensor"), ("mlp", "tensor"))
_SHOWN = 6  # tensors named in the unsplit warning
_log = logging.getLogger("jqlora.parallel")


def _key_name(k: Any) -> str | None:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return None


def _where(path: tuple) -> str:
  """``layers/mlp/up_proj/lora_a`` for a pytree path."""
  names = [n for n in (_key_name(k) for k in path) if n is not None and n != "value"]
  return "/".join(names) or "<root>"


def _mesh_size(axis: str | tuple[str, ...], mesh_shape: Mapping[str, int]) -> int:
  return math.prod(mesh_shape[a] for a in ((axis,) if isinstance(axis, str) else axis))


class _Unsplit(list):
  """What ``partition_specs`` left unsplit: one ``"where (label = size on axis of n)"`` each."""

  def __init__(self, strict: bool):
    super().__init__()
    self.strict = strict


def _fit(spec: P, shape: tuple[int, ...], where: str, mesh_shape: Mapping[str, int],
         labels: Sequence[str], unsplit: _Unsplit, optional: Sequence[int] = ()) -> P:
  """``spec`` for an array of ``shape``. A dimension its mesh axis does not divide is left
  unsplit: silently where ``optional`` (a LoRA rank), else noted in ``unsplit`` (or, when
  ``unsplit.strict``, a ValueError naming the tensor, the dimension and the axis)."""
  axes = list(tuple(spec) + (None,) * (len(shape) - len(tuple(spec))))[:len(shape)]
  optional = {d % len(shape) for d in optional} if shape else set()
  for dim, (size, axis) in enumerate(zip(shape, axes)):
    if axis is None:
      continue
    n = _mesh_size(axis, mesh_shape)
    if size % n == 0:
      continue
    axes[dim] = None
    if dim in optional:
      continue
    if unsplit.strict:
      raise ValueError(
          f"sharding: {where} has {labels[dim]} = {size}, not divisible by mesh axis {axis!r} of "
          f"size {n} (shape {shape}); change the mesh or the model size")
    unsplit.append(f"{where} ({labels[dim]} = {size} on {axis!r} of size {n})")
  return P(*axes) if any(a is not None for a in axes) else P()


def _labels(variable: nnx.Variable, ndim: int) -> list[str]:
  """Per-dimension labels: the Variable's ``dim_labels``, else its logical names."""
  meta = variable.get_metadata()
  labels = list(meta.get(LABELS_KEY) or meta.get("out_sharding") or ())
  labels = [str(x) if x is not None else None for x in labels]
  labels = [None] * (ndim - len(labels)) + labels[-ndim:] if ndim else []
  return [lab if lab is not None else f"dimension {i}" for i, lab in enumerate(labels)]


def _nf4_specs(t: NF4Tensor, spec: P, variable: nnx.Variable, where: str,
               mesh_shape: Mapping[str, int], unsplit: _Unsplit) -> NF4Tensor:
  """The weight's spec applied to its storage, as an ``NF4Tensor`` of specs."""
  rep = lambda x: None if x is None else P()
  if not t.row_aligned or not any(a is not None for a in tuple(spec)):
    spec_p = spec_a = P()
  else:
    ndim = len(t.full_shape)
    labels = _labels(variable, ndim)
    labels[-1] = f"in/block_size ({labels[-1]} = {t.shape[-1]}, block_size = {t.block_size})"
    spec_a = _fit(spec, tuple(t.absmax.shape), f"{where} (NF4 absmax)", mesh_shape, labels,
                  unsplit)
    spec_p = spec_a  # packed [.., in/2] splits exactly where absmax [.., in/B] does
  return NF4Tensor(spec_p, spec_a, rep(t.absmax2), rep(t.offset), shape=t.shape, dtype=t.dtype,
                   block_size=t.block_size, double_quant=t.double_quant, quant_type=t.quant_type)


def _as_state(model_or_state: Any) -> Any:
  """The state of an NNX module or optimizer; any other pytree as it is."""
  if isinstance(model_or_state, nnx.Pytree):
    return nnx.state(model_or_state)
  return model_or_state


def partition_specs(model_or_state: Any, mesh: Mesh | AbstractMesh, *,
                    rules: Sequence[tuple[str, str | None]] = RULES, strict: bool = False) -> Any:
  """``PartitionSpec`` of every leaf of a model's (or optimizer's) state, from its metadata.

  A dimension that its mesh axis does not divide (SmolLM2's 576 inputs are 9 blocks
  of 64, which ``fsdp=2`` cannot halve) is left unsplit for that tensor, and one
  warning line on the ``jqlora.parallel`` logger names every such tensor.

  Args:
    model_or_state: an NNX module/optimizer, or a state of its Variables (a pytree
      of bare arrays is replicated).
    mesh: a ``Mesh`` or ``jax.sharding.AbstractMesh`` (only axis sizes are read).
    rules: logical axis name -> mesh axis (``RULES`` by default).
    strict: raise instead of leaving a dimension unsplit.

  Returns:
    A pytree of the state's structure with a ``PartitionSpec`` per array (NF4
    weights hold an ``NF4Tensor`` of specs).

  Raises:
    ValueError: with ``strict``, a split dimension is not divisible by its mesh axis
      (names the tensor's path, the dimension and the axis).
  """
  state = _as_state(model_or_state)
  mesh_shape = dict(mesh.shape)
  unsplit = _Unsplit(strict)
  with nnx.logical_axis_rules(tuple(rules)):
    specs = nnx.get_partition_spec(state)

  def rule(path, variable, spec):
    if not isinstance(variable, nnx.Variable):
      return None if variable is None else P()
    spec = spec.get_value() if isinstance(spec, nnx.Variable) else spec
    value = variable.get_value()
    where = _where(path)
    if isinstance(value, NF4Tensor):
      out = _nf4_specs(value, spec if spec is not None else P(), variable, where, mesh_shape,
                       unsplit)
    elif spec is None or not hasattr(value, "shape"):
      out = P()
    else:
      shape = tuple(value.shape)
      optional = variable.get_metadata().get(OPTIONAL_KEY, ())
      out = _fit(spec, shape, where, mesh_shape, _labels(variable, len(shape)), unsplit, optional)
    return variable.replace(out)

  is_var = lambda x: isinstance(x, nnx.Variable)
  out = jax.tree_util.tree_map_with_path(rule, state, specs, is_leaf=is_var)
  if unsplit:
    shown = "; ".join(unsplit[:_SHOWN]) + (f"; and {len(unsplit) - _SHOWN} more"
                                           if len(unsplit) > _SHOWN else "")
    _log.warning("sharding: %d tensor(s) left unsplit where the mesh does not divide them: %s",
                 len(unsplit), shown)
  return out


def model_shardings(model_or_state: Any, mesh: Mesh, **kwargs) -> Any:
  """``NamedSharding`` of every leaf of a model's or optimizer's state (see ``partition_specs``)."""
  specs = partition_specs(model_or_state, mesh, **kwargs)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda s: isinstance(s, P))

"""Device meshes and sharding rules for QLoRA models (FSDP x tensor parallel x data parallel).

A mesh has three named axes: ``data`` (pure data parallelism), ``fsdp`` (data
parallelism with the frozen weights split across it) and ``tensor`` (Megatron
tensor parallelism). Rules, by Variable and module name:

- column-parallel linears (``q/k/v/gate/up_proj``, ``lm_head``): the base weight
  ``[*layers, out, in]`` is split along ``out`` on ``tensor`` and ``in`` on ``fsdp``;
- row-parallel linears (``o_proj``, ``down_proj``): ``in`` on ``tensor``, ``out`` on ``fsdp``;
- NF4 storage ``packed [*layers, out, in/2]`` and ``absmax [*layers, out, in/B]``
  follow the weight they encode; ``in`` is split on whole ``block_size`` blocks
  (the check is on ``in/B``). The nested scales ``absmax2`` and ``offset`` are a
  few bytes per tensor and stay replicated: ``absmax2[g]`` scales the blocks
  ``256g .. 256g+255`` of the flattened tensor, and under ``jax.jit`` each shard
  of ``absmax`` finds its group in the replicated copy (the storage stays the
  exact bitsandbytes bytes). Flat NF4 storage (``in`` not a multiple of the
  block size) is replicated;
- adapters follow their base: ``lora_a [*layers, in, r]`` takes the base's ``in``
  split, ``lora_b [*layers, r, out]`` its ``out`` split, and ``r`` takes the
  other axis where it divides (so each device holds 1/(fsdp*tensor) of every
  adapter, moments included; adapters are gathered for use like FSDP weights);
- biases follow ``out``; embeddings ``[vocab, d]`` are split ``vocab`` on
  ``tensor`` and ``d`` on ``fsdp``; norms, LoRA scales and RNG state are replicated;
- the stacked layer axis is never split; batches ``[B, T]`` split ``B`` over
  ``data`` x ``fsdp``.

The same rules read the state of an ``nnx.Optimizer`` (its moments sit under the
adapters' paths), so optimizer state is sharded like the adapters.

Training: shard the model, the optimizer and each batch, then call
``jqlora.train_step`` as usual. Its step is one ``jax.jit`` whose inputs carry
``NamedSharding``; XLA (GSPMD) partitions the computation and inserts the
collectives, and nothing leaves the devices between steps. In the compiled step
the NF4 codes of one layer are all-gathered along ``in`` as bytes (FSDP-style,
4x less traffic than 16-bit weights) and decoded on each device; the ``out``
split of column-parallel linears is kept.

Multi-process (``jax.distributed``): the mesh spans the devices of every
process; each process loads the same model and the same global batches and
fills only its own devices (``shard_model`` and ``shard_batch`` slice host
copies), so no weights or data cross processes outside the compiled step.
Checkpoints (``jqlora.training.checkpoint``) restore onto any mesh.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

from jqlora.nf4 import NF4Tensor

__all__ = ["AXES", "COLUMN", "ROW", "make_mesh", "mesh_from_config", "partition_specs",
           "model_shardings", "shard_model", "shard_batch", "batch_sharding", "process_rows",
           "replicate", "shard_shapes"]

#: Mesh axis names, outermost first.
AXES = ("data", "fsdp", "tensor")
#: Linears whose output features are split over ``tensor`` (column-parallel).
COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")
#: Linears whose input features are split over ``tensor`` (row-parallel).
ROW = ("o_proj", "down_proj")
_BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all devices).

  Args:
    data, fsdp, tensor: axis sizes; their product must equal the device count.
    devices: the devices, in mesh order (``jax.devices()`` by default).

  Returns:
    A ``jax.sharding.Mesh`` with axis names ``AXES``.

  Raises:
    ValueError: a size is not a positive integer, or the product differs from
      the number of devices.
  """
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  for name, size in sizes.items():
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
      raise ValueError(f"make_mesh: mesh.{name} must be a positive integer, got {size!r}")
  devices = list(jax.devices() if devices is None else devices)
  product = data * fsdp * tensor
  if product != len(devices):
    raise ValueError(
        f"make_mesh: mesh.data * mesh.fsdp * mesh.tensor = {data} * {fsdp} * {tensor} = "
        f"{product}, but there are {len(devices)} devices; the product must equal the device "
        "count")
  return Mesh(np.array(devices, dtype=object).reshape(data, fsdp, tensor), AXES)


def mesh_from_config(config: Mapping[str, Any] | None,
                     devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh from ``{"data": d, "fsdp": f, "tensor": t}`` (the ``mesh.*`` config keys).

  Missing sizes default to 1, except that when none is given all devices go to
  ``data``.
  """
  config = dict(config or {})
  unknown = set(config) - set(AXES)
  if unknown:
    raise ValueError(f"mesh: unknown axis {sorted(unknown)}; the axes are {list(AXES)}")
  if not config:
    config = {"data": len(jax.devices() if devices is None else devices)}
  return make_mesh(**config, devices=devices)


# -- rules -------------------------------------------------------------------------

def _key_name(k: Any) -> str | None:
  for attr in ("key", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return None


def _names(path: tuple) -> list[str]:
  """The string keys of a pytree path (``['layers', 'mlp', 'up_proj', 'lora_a', 'value']``)."""
  return [n for n in (_key_name(k) for k in path) if n is not None]


def _linear_kind(names: list[str], column: Sequence[str], row: Sequence[str]) -> str | None:
  """``"column"``/``"row"`` for a leaf of a known linear (``…/<linear>/<leaf>``), else None."""
  leaf = [n for n in names if n != "value"]
  if len(leaf) < 2:
    return None
  module = leaf[-2]
  if module in column:
    return "column"
  if module in row:
    return "row"
  return None


def _linear_axes(kind: str) -> tuple[str, str]:
  """Mesh axes of ``(out, in)`` for a column- or row-parallel linear."""
  return ("tensor", "fsdp") if kind == "column" else ("fsdp", "tensor")


def _spec(ndim: int, tail: tuple) -> P:
  """A spec splitting the last ``len(tail)`` dimensions; leading (layer) axes unsplit."""
  return P(*((None,) * (ndim - len(tail)) + tail))


def _check(where: str, shape: tuple[int, ...], spec: P, mesh_shape: Mapping[str, int],
           what: tuple[str, ...] | None = None) -> None:
  """Raises if a split dimension is not divisible by its mesh axis size."""
  for dim, (size, axis) in enumerate(zip(shape, tuple(spec))):
    if axis is None:
      continue
    n = math.prod(mesh_shape[a] for a in ((axis,) if isinstance(axis, str) else axis))
    if size % n:
      label = what[dim] if what else f"dimension {dim}"
      raise ValueError(
          f"sharding: {where} has {label} = {size}, not divisible by mesh axis {axis!r} of "
          f"size {n} (shape {shape}); change the mesh or the model size")


def _nf4_specs(t: NF4Tensor, where: str, kind: str | None,
               mesh_shape: Mapping[str, int]) -> NF4Tensor:
  """Specs for the leaves of one (possibly stacked) NF4 weight, as an ``NF4Tensor`` of specs."""
  packed, absmax = t.packed, t.absmax
  two_d = len(t.shape) >= 2 and t.shape[-1] % t.block_size == 0
  if kind is None or not two_d:
    spec_p, spec_a = P(), P()
  else:
    tail = _linear_axes(kind)
    spec_p, spec_a = _spec(packed.ndim, tail), _spec(absmax.ndim, tail)
    nd = absmax.ndim
    labels = tuple(f"dimension {i}" for i in range(nd - 2)) + (
        "out", f"in/block_size (in = {t.shape[-1]}, block_size = {t.block_size})")
    _check(f"{where} (NF4 absmax)", tuple(absmax.shape), spec_a, mesh_shape, labels)
  rep = lambda x: None if x is None else P()
  return NF4Tensor(spec_p, spec_a, rep(t.absmax2), rep(t.offset), shape=t.shape,
                   dtype=t.dtype, block_size=t.block_size, double_quant=t.double_quant)


def _array_spec(x: Any, names: list[str], where: str, mesh_shape: Mapping[str, int],
                column: Sequence[str], row: Sequence[str]) -> P:
  shape = tuple(getattr(x, "shape", ()))
  leaf = [n for n in names if n != "value"]
  last = leaf[-1] if leaf else ""
  kind = _linear_kind(names, column, row)
  if kind is not None and last in ("weight", "lora_a", "lora_b", "bias"):
    out_axis, in_axis = _linear_axes(kind)
    tail, labels = {
        "weight": ((out_axis, in_axis), ("out", "in")),
        "lora_a": ((in_axis, out_axis), ("in", "r")),
        "lora_b": ((in_axis, out_axis), ("r", "out")),
        "bias": ((out_axis,), ("out",)),
    }[last]
    if len(shape) < len(tail):
      return P()
    if last in ("lora_a", "lora_b"):  # r takes the other axis only where it divides
      r_dim, r_axis = (-1, tail[1]) if last == "lora_a" else (-2, tail[0])
      if shape[r_dim] % mesh_shape[r_axis]:
        tail = (tail[0], None) if last == "lora_a" else (None, tail[1])
    spec = _spec(len(shape), tail)
    _check(where, shape, spec, mesh_shape,
           tuple(f"dimension {i}" for i in range(len(shape) - len(tail))) + labels)
    return spec
  if "embed_tokens" in leaf and len(shape) == 2:
    spec = P("tensor", "fsdp")
    _check(where, shape, spec, mesh_shape, ("vocab", "hidden"))
    return spec
  return P()


def _as_state(model_or_state: Any) -> Any:
  """The state of an NNX module or optimizer; any other pytree as it is."""
  if isinstance(model_or_state, nnx.Pytree):
    return nnx.state(model_or_state)
  return model_or_state


def partition_specs(model_or_state: Any, mesh: Mesh | AbstractMesh, *,
                    column: Sequence[str] = COLUMN, row: Sequence[str] = ROW) -> Any:
  """``PartitionSpec`` of every leaf of a jqlora model's (or optimizer's) state.

  Args:
    model_or_state: an NNX module/optimizer, or a state/pytree of its arrays.
    mesh: a ``Mesh`` or ``jax.sharding.AbstractMesh`` (only axis sizes are read).
    column / row: module names of column- and row-parallel linears; leaves of
      other modules are replicated (except embeddings).

  Returns:
    A pytree of the state's structure with a ``PartitionSpec`` per array (NF4
    weights hold an ``NF4Tensor`` of specs).

  Raises:
    ValueError: a split dimension is not divisible by its mesh axis (names the
      tensor's path and the axis).
  """
  state = _as_state(model_or_state)
  mesh_shape = dict(mesh.shape)

  def rule(path, x):
    names = _names(path)
    where = "/".join(n for n in names if n != "value") or "<root>"
    if isinstance(x, NF4Tensor):
      return _nf4_specs(x, where, _linear_kind(names, column, row), mesh_shape)
    return _array_spec(x, names, where, mesh_shape, column, row)

  return jax.tree_util.tree_map_with_path(rule, state,
                                          is_leaf=lambda x: isinstance(x, NF4Tensor))


def model_shardings(model_or_state: Any, mesh: Mesh, **kwargs) -> Any:
  """``NamedSharding`` of every leaf of a model's or optimizer's state (see ``partition_specs``)."""
  specs = partition_specs(model_or_state, mesh, **kwargs)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda s: isinstance(s, P))


def shard_model(model: Any, mesh: Mesh, **kwargs) -> Any:
  """Moves an NNX model's (or ``nnx.Optimizer``'s) state onto ``mesh``, in place.

  Args:
    model: an NNX module or optimizer; call it on the model and on the
      optimizer made from it.
    mesh: from ``make_mesh``.
    **kwargs: ``column`` / ``row`` module names (see ``partition_specs``).

  Returns:
    ``model``, its arrays now ``jax.Array``s with ``NamedSharding`` on ``mesh``.

  Multi-process: every process holds the same host-local model (same
  checkpoint, same seed) and keeps only its devices' shards of it.
  """
  state = nnx.state(model)
  nnx.update(model, jax.tree.map(_put, state, model_shardings(state, mesh, **kwargs)))
  return model


def _put(x: Any, s: NamedSharding) -> jax.Array:
  """``x`` placed with ``s``, each device's shard sliced from a host copy of a local ``x``.

  Slicing on the host needs no compiled reshard per shape and works across
  processes (each process fills its own devices from its own copy).
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return jax.device_put(x, s)  # already global: XLA reshards
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(_put(jax.random.key_data(x), s), impl=jax.random.key_impl(x))
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, s, lambda index: host[index])


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a batch ``[B, T]`` (``[A, B, T]`` with micro-batches): ``B`` on data x fsdp."""
  return NamedSharding(mesh, P(*((None,) * (ndim - 2)), _BATCH_AXES, None))


def process_rows(mesh: Mesh, batch_size: int) -> slice:
  """The rows of a global batch ``[B, T]`` that this process's devices hold (``batch_sharding``).

  Raises:
    ValueError: this process's rows are not one contiguous range (a device
      order that interleaves processes along the batch axes).
  """
  index_map = batch_sharding(mesh).addressable_devices_indices_map((batch_size, 1))
  rows = sorted({idx[0].indices(batch_size)[:2] for idx in index_map.values()})
  start, stop = rows[0][0], rows[-1][1]
  if sum(b - a for a, b in rows) != stop - start:
    raise ValueError(f"process_rows: process {jax.process_index()} holds rows {rows} of the "
                     "batch, not one contiguous range; order the mesh devices by process")
  return slice(start, stop)


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Places a batch dict of ``[B, T]`` / ``[A, B, T]`` arrays on ``mesh`` (``B`` split).

  Multi-process: every process passes the same global batch, keeps only the
  rows its devices hold (``process_rows``), and the global arrays are
  assembled with ``jax.make_array_from_process_local_data``; no data crosses
  processes.

  Args:
    batch: host (numpy) or device arrays; None values are dropped.
    mesh: from ``make_mesh``.

  Returns:
    Global ``jax.Array``s with ``batch_sharding``.

  Raises:
    ValueError: ``B`` is not divisible by ``data * fsdp`` (names the key).
  """
  out = {}
  n = mesh.shape["data"] * mesh.shape["fsdp"]
  multi_process = not batch_sharding(mesh).is_fully_addressable
  for key, value in batch.items():
    if value is None:
      continue
    value = np.asarray(value) if not isinstance(value, jax.Array) else value
    if value.ndim < 2:
      raise ValueError(f"shard_batch: batch[{key!r}] must be [B, T] or [A, B, T], got shape "
                       f"{value.shape}")
    sharding = batch_sharding(mesh, value.ndim)
    b = value.shape[value.ndim - 2]
    if b % n:
      raise ValueError(
          f"shard_batch: batch[{key!r}] has batch size {b}, not divisible by mesh axes "
          f"('data', 'fsdp') of total size {n}")
    if multi_process:
      rows = (slice(None),) * (value.ndim - 2) + (process_rows(mesh, b),)
      out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(value[rows]),
                                                        value.shape)
    else:
      out[key] = jax.device_put(value, sharding)
  return out


def replicate(tree: Any, mesh: Mesh) -> Any:
  """``tree``'s arrays replicated on every device of ``mesh`` (readable on every process)."""
  return jax.tree.map(lambda x: _put(x, NamedSharding(mesh, P())), tree)


def shard_shapes(x: jax.Array) -> set[tuple[int, ...]]:
  """The set of per-device shard shapes of a (sharded) array."""
  return {tuple(s.data.shape) for s in x.addressable_shards}

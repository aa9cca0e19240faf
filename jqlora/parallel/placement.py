"""Placing models, optimizers and batches on a mesh, in one process or many.

Multi-process (``jax.distributed``): the mesh spans the devices of every
process; each process loads the same model and the same global batches and
fills only its own devices (``shard_model`` and ``shard_batch`` slice host
copies), so no weights or data cross processes outside the compiled step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jqlora.parallel.partition import model_shardings

__all__ = ["shard_model", "shard_activations", "shard_batch", "batch_sharding", "process_rows",
           "replicate", "shard_shapes", "BATCH_AXES"]

#: Mesh axes a batch's ``B`` dimension is split over.
BATCH_AXES = ("data", "fsdp")


def shard_model(model: Any, mesh: Mesh, **kwargs) -> Any:
  """Moves an NNX model's (or ``nnx.Optimizer``'s) state onto ``mesh``, in place.

  Args:
    model: an NNX module or optimizer; call it on the model and on the
      optimizer made from it.
    mesh: from ``make_mesh``.
    **kwargs: ``rules`` (see ``partition_specs``).

  Returns:
    ``model``, its arrays now ``jax.Array``s with ``NamedSharding`` on ``mesh``.
    Variables already on ``mesh`` (``load_model(..., mesh=mesh)``) stay as they
    are unless ``rules`` are given; the rest are placed. A model's hidden states
    are held batch-split (``shard_activations``).

  Multi-process: every process holds the same host-local model (same
  checkpoint, same seed) and keeps only its devices' shards of it.
  """
  if kwargs:
    state = nnx.state(model)
  else:
    state = nnx.state(model, lambda path, v: not _on_mesh(v, mesh))
  nnx.update(model, jax.tree.map(_put, state, model_shardings(state, mesh, **kwargs)))
  return shard_activations(model, mesh)


def shard_activations(model: Any, mesh: Mesh | None) -> Any:
  """Sets ``hidden_sharding`` of each module of ``model`` that has one (jqlora's ``Llama``), in place.

  On ``mesh`` the hidden states ``[B, T, hidden]`` are held with ``B`` split over
  ``BATCH_AXES`` (replicated over ``tensor``), like the batch: a partitioned step then
  keeps each device's rows and gathers each layer's NF4 codes on ``fsdp`` (FSDP), rather
  than letting XLA split the activations' features like the weights and hold every
  device's copy of the global batch. ``mesh=None`` unsets it. Returns ``model``.
  """
  sharding = None if mesh is None else NamedSharding(mesh, P(BATCH_AXES))
  if isinstance(model, nnx.Module):
    for _, module in nnx.iter_graph(model):
      if isinstance(module, nnx.Module) and hasattr(module, "hidden_sharding"):
        module.hidden_sharding = sharding
  return model


def _on_mesh(variable: Any, mesh: Mesh) -> bool:
  """Whether every array of ``variable`` is a ``jax.Array`` with a ``NamedSharding`` on ``mesh``."""
  leaves = jax.tree.leaves(variable.get_value() if isinstance(variable, nnx.Variable) else variable)
  return bool(leaves) and all(
      isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
      for x in leaves)


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
  return NamedSharding(mesh, P(*((None,) * (ndim - 2)), BATCH_AXES, None))


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

"""Orbax checkpoints of a run: adapters, optimizer state, RNG state, step and data position.

Frozen base weights are never written: a checkpoint holds only what training
changes (the optimizer's ``wrt`` state: the adapters, or with ``finetune: full``
every float weight). Orbax writes each step into a temporary folder and renames it when
complete, so a process killed during a save leaves the previous step usable.

Any mesh restores any checkpoint: arrays are stored whole (each process writes
its shards), and ``restore`` reads them into the shardings the target model
and optimizer have now (``jqlora.parallel.shard_model`` first to restore onto
a mesh, nothing for one device). Multi-process runs call ``save``/``restore``
on every process, on a folder all of them see.

The folder is any path orbax accepts, a local one or a bucket URL (``gs://bucket/run``),
held as an ``etils.epath.Path`` as orbax holds it: never turned into a local path.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

__all__ = ["Checkpointer", "is_local"]


def is_local(path: str | os.PathLike) -> bool:
  """Whether ``path`` is on this machine's file system, not a URL (``gs://``, ``s3://``)."""
  return "://" not in os.fspath(path)


def _is_key(x: Any) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _trainable_state(model: nnx.Module, optimizer: nnx.Optimizer) -> dict[str, Any]:
  """Everything a step changes, as a tree of plain arrays (PRNG keys as their data)."""
  tree = {"adapter": nnx.to_pure_dict(nnx.state(model, optimizer.wrt)),
          "rng": nnx.to_pure_dict(nnx.state(model, nnx.RngState)),
          "optimizer": nnx.to_pure_dict(nnx.state(optimizer))}
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


class Checkpointer:
  """Saves and restores the training state under ``directory`` (one sub-folder per step).

  ``directory`` (a local path, made absolute, or a URL such as ``gs://bucket/run``) is
  created by the first ``save``, not before: a run that fails before its first
  checkpoint leaves no trace.
  """

  def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 2):
    path = epath.Path(directory)
    self.directory = path.resolve() if is_local(path) else path
    self._options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=False)
    self._opened: ocp.CheckpointManager | None = None

  @property
  def _manager(self) -> ocp.CheckpointManager:
    if self._opened is None:
      self._opened = ocp.CheckpointManager(self.directory, options=self._options)
    return self._opened

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step (unfinished temporary folders are ignored)."""
    if self._opened is None and not self.directory.is_dir():
      return None
    self._manager.reload()
    return self._manager.latest_step()

  def save(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer,
           meta: dict[str, Any]) -> None:
    """Writes step ``step``: the trainable state and ``meta`` (JSON: data position, …)."""
    state = _trainable_state(model, optimizer)
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({**meta, "step": step})))
    self._manager.wait_until_finished()

  def meta(self, step: int) -> dict[str, Any]:
    """Step ``step``'s ``meta`` alone (no arrays are read)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored.meta)

  def restore(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer) -> dict[str, Any]:
    """Loads step ``step`` into ``model`` and ``optimizer`` in place; returns its ``meta``.

    Each array is read straight into the sharding of the one it replaces.
    """
    template = _trainable_state(model, optimizer)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    current = {"adapter": nnx.state(model, optimizer.wrt), "rng": nnx.state(model, nnx.RngState),
               "optimizer": nnx.state(optimizer)}
    for part, state in current.items():
      pure = jax.tree.map(
          lambda new, old: jax.random.wrap_key_data(new, impl=jax.random.key_impl(old))
          if _is_key(old) else jnp.asarray(new, old.dtype),
          restored.state[part], nnx.to_pure_dict(state))
      nnx.replace_by_pure_dict(state, pure)
      nnx.update(optimizer if part == "optimizer" else model, state)
    return dict(restored.meta)

  def close(self) -> None:
    if self._opened is not None:
      self._opened.close()

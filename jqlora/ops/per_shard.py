"""The NF4 kernels run once per shard under a mesh (``jax.experimental.custom_partitioning``).

A Pallas call or an FFI custom call has no partitioning rule of its own: under
``jax.jit`` with ``NamedSharding``s XLA would gather its operands and run it whole on
every device. ``dequantize`` and ``matmul`` wrap a kernel with a rule, so that each
device calls it on its own shard (the shardings are read where XLA partitions the
program, so nothing above the ops needs to name a mesh):

- ``dequantize``: each device decodes its shard of ``packed [..., in/2]`` into its
  shard of ``[..., in]`` (split on whole blocks).
- ``matmul`` (``x @ W.T``, or ``dy @ W`` with ``transposed``) for ``W [out, in]``: a
  mesh axis that splits the activations' batch dimensions is gathered on ``W``'s
  storage, the uint8 codes and scale codes (FSDP), and decoded locally; an axis
  splitting ``W``'s free dimension (``out``; ``in`` when transposed) stays split
  (column-parallel), and so does the result's last dimension; an axis splitting the
  contracted dimension on whole blocks stays split (row-parallel): ``x`` is split to
  match and the float32 partial products are summed with ``psum``.

Nested scales (double quantization) are replicated and indexed by the flat block
number, which a shard's blocks no longer start at: a split tensor reaches the kernel
with its block scales decoded in the shard, to float32, exactly as the kernels decode
them. Without a mesh (one device) the kernel is called as it is. No batching rule:
under ``jax.vmap`` the kernel is vmapped whole (``jax.custom_batching.custom_vmap``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jqlora.format import DYNAMIC_MAP_SIGNED, NESTED_BLOCK_SIZE, NF4Tensor, storage_shapes
from pallas_kernels.common import rounded_product

__all__ = ["dequantize", "matmul"]

Axes = tuple[str, ...]


def _axes(entry: Any) -> Axes:
  """The mesh axes of one ``PartitionSpec`` entry."""
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _entries(sharding: Any, ndim: int) -> list[Axes]:
  """Per-dimension mesh axes of a ``NamedSharding`` (replicated for any other sharding)."""
  spec = tuple(sharding.spec) if isinstance(sharding, NamedSharding) else ()
  return [_axes(e) for e in spec + (None,) * (ndim - len(spec))][:ndim]


def _spec(entries: Sequence[Axes]) -> P:
  return P(*[None if not a else a[0] if len(a) == 1 else tuple(a) for a in entries])


def _size(axes: Axes, mesh) -> int:
  return math.prod(mesh.shape[a] for a in axes)


def _dividing(axes: Axes, n: int, mesh) -> Axes:
  """The longest prefix of ``axes`` whose mesh size divides ``n``."""
  for k in range(len(axes), -1, -1):
    if n % _size(axes[:k], mesh) == 0:
      return axes[:k]
  return ()


def _shard_index(axes: Axes, mesh) -> jax.Array:
  """This device's shard number along a dimension split over ``axes`` (major to minor)."""
  index = jnp.int32(0)
  for a in axes:
    index = index * mesh.shape[a] + jax.lax.axis_index(a)
  return index


def _storage_shardings(t: NF4Tensor, entries: Sequence[Axes], mesh) -> NF4Tensor:
  """An ``NF4Tensor`` of shardings: ``packed`` and ``absmax`` split by ``entries``."""
  split = NamedSharding(mesh, _spec(entries))
  rep = NamedSharding(mesh, P())
  return NF4Tensor(split, split, None if t.absmax2 is None else rep,
                   None if t.offset is None else rep, shape=t.shape, dtype=t.dtype,
                   block_size=t.block_size, double_quant=t.double_quant, quant_type=t.quant_type)


def _local(t: NF4Tensor, entries: Sequence[Axes], mesh) -> NF4Tensor:
  """Inside a shard: this device's ``[..., in]`` piece of ``t`` as an ``NF4Tensor``.

  ``entries`` are the mesh axes splitting each storage dimension. Split double-quantized
  scales are decoded here (``code2[q] * absmax2[block // 256] + offset`` with the global
  flat block number), bit-identically to the kernels' own decode.
  """
  shape = (*t.absmax.shape[:-1], t.packed.shape[-1] * 2)
  if not any(entries):
    return t
  absmax = t.absmax
  if t.double_quant:
    full = storage_shapes(t.shape, t.block_size)[1]
    block = jnp.zeros(absmax.shape, jnp.int32)
    stride = 1
    for dim in reversed(range(absmax.ndim)):
      start = _shard_index(entries[dim], mesh) * absmax.shape[dim]
      block = block + (start + jax.lax.broadcasted_iota(jnp.int32, absmax.shape, dim)) * stride
      stride *= full[dim]
    code2 = jnp.asarray(DYNAMIC_MAP_SIGNED)[absmax.astype(jnp.int32)]
    absmax = rounded_product(code2, t.absmax2[block // NESTED_BLOCK_SIZE]) + t.offset
  return NF4Tensor(t.packed, absmax, None, None, shape=shape, dtype=t.dtype,
                   block_size=t.block_size, double_quant=False, quant_type=t.quant_type)


def _storage_rule(t: NF4Tensor, dims: str) -> list[str]:
  """Shardy factors of ``t``'s leaves, ``dims`` naming the dimensions before the blocks."""
  rule = [f"{dims} (n p)", f"{dims} n"]
  return rule + (["g", ""] if t.double_quant else [])


def _inner(fn: Callable, *args: Any) -> Any:
  """``fn(*args)`` inside a ``jit`` of its own, whose constants (code tables) stay in its jaxpr:
  ``custom_partitioning`` accepts no constants. A new function each call: traced anew."""
  return jax.jit(lambda *a: fn(*a))(*args)


def _def_rule(op: custom_partitioning, partition: Callable, infer: Callable, rule: str,
              t: NF4Tensor, reduction: tuple[str, ...] = ()) -> None:
  """Gives ``op`` its partitioning callbacks and its Shardy rule (``rule`` in einsum notation).

  Factors: ``n`` blocks, ``p``/``c`` bytes/elements inside a block and ``g`` nested-scale
  groups, which never split.
  """
  factors = rule.replace("(", " ").replace(")", " ").replace(",", " ").split()
  replicated = sorted({"p", "c", "g"} & set(factors), key=factors.index)  # Shardy wants them in order
  op.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule,
                   reduction_factors=reduction, need_replication_factors=tuple(replicated),
                   p=t.block_size // 2, c=t.block_size)


def _vmappable(fn: Callable, kernel: Callable, n_args: int) -> Callable:
  """``fn`` (per-shard) with a batching rule: under ``vmap``, ``kernel`` vmapped whole."""

  @jax.custom_batching.custom_vmap
  def call(*args):
    return fn(*args)

  @call.def_vmap
  def _rule(axis_size, in_batched, *args):
    del axis_size
    axes = [jax.tree.map(lambda b: 0 if b else None, batched) for batched in in_batched]
    return jax.vmap(kernel, in_axes=tuple(axes[:n_args]))(*args), True

  return call


def dequantize(kernel: Callable[[NF4Tensor, Any], jax.Array], t: NF4Tensor, dtype) -> jax.Array:
  """``kernel(t, dtype)`` run on each shard of ``t``'s storage.

  Args:
    kernel: decodes one ``NF4Tensor`` to ``dtype[t.shape]``.
    t: an unstacked tensor; flat storage (rows not holding whole blocks) is decoded whole.
    dtype: the output dtype.

  Returns:
    ``dtype[t.shape]``, split like ``t``'s storage on whole blocks.
  """
  if not t.row_aligned or t.packed.ndim != len(t.shape):
    return kernel(t, dtype)
  ndim = len(t.shape)

  @custom_partitioning
  def decode(t):
    return _inner(lambda t: kernel(t, dtype), t)

  def plan(mesh, t_shape: NF4Tensor):
    entries = _entries(t_shape.packed.sharding, ndim)
    entries[-1] = _dividing(entries[-1], t.absmax.shape[-1], mesh)  # whole blocks only
    return entries

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    (t_shape,) = arg_shapes
    entries = plan(mesh, t_shape)
    lower = lambda t: kernel(_local(t, entries, mesh), dtype)
    return (mesh, lower, NamedSharding(mesh, _spec(entries)),
            (_storage_shardings(t, entries, mesh),))

  def infer(mesh, arg_shapes, result_shape):
    del result_shape
    return NamedSharding(mesh, _spec(plan(mesh, arg_shapes[0])))

  dims = " ".join(f"d{i}" for i in range(ndim - 1))
  _def_rule(decode, partition, infer, ", ".join(_storage_rule(t, dims)) + f" -> {dims} (n c)", t)
  return _vmappable(decode, lambda t: kernel(t, dtype), 1)(t)


def matmul(kernel: Callable[[jax.Array, NF4Tensor], jax.Array], x: jax.Array, w: NF4Tensor, *,
           transposed: bool = False) -> jax.Array:
  """``kernel(x, w)`` (``x @ W.T``; ``x @ W`` when ``transposed``) run on each device's shards.

  Args:
    kernel: the one-device kernel for a 2-D ``w`` with whole blocks per row.
    x: ``[..., k]`` activations, ``k`` the contracted dimension of ``w``.
    w: NF4 ``[out, in]``.
    transposed: ``w``'s ``out`` is contracted (the input gradient ``dy @ W``).

  Returns:
    ``x.dtype[..., n]`` (``n`` the other dimension of ``w``), its batch dimensions split
    like ``x``'s and its last dimension like ``w``'s free dimension where kept.
  """
  batch = x.ndim - 1
  free, contracted = (1, 0) if transposed else (0, 1)
  n_blocks = w.absmax.shape[1]

  @custom_partitioning
  def product(x, w):
    return _inner(kernel, x, w)

  def plan(mesh, x_shape, w_shape: NF4Tensor):
    x_entries = _entries(x_shape.sharding, x.ndim)
    w_entries = _entries(w_shape.packed.sharding, 2)
    in_batch = {a for e in x_entries[:batch] for a in e}
    keep = [tuple(a for a in e if a not in in_batch) for e in w_entries]  # FSDP: gathered
    keep[1] = _dividing(keep[1], n_blocks, mesh)  # ``in`` on whole blocks only
    return x_entries[:batch], keep

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    x_batch, keep = plan(mesh, *arg_shapes)
    summed = keep[contracted]

    def lower(x, w):
      y = kernel(x, _local(w, keep, mesh))
      if summed:
        y = jax.lax.psum(y.astype(jnp.float32), summed).astype(y.dtype)
      return y

    x_sharding = NamedSharding(mesh, _spec([*x_batch, summed]))
    return (mesh, lower, NamedSharding(mesh, _spec([*x_batch, keep[free]])),
            (x_sharding, _storage_shardings(w, keep, mesh)))

  def infer(mesh, arg_shapes, result_shape):
    del result_shape
    x_batch, keep = plan(mesh, *arg_shapes)
    return NamedSharding(mesh, _spec([*x_batch, keep[free]]))

  b = " ".join(f"b{i}" for i in range(batch))
  x_rule, y_rule = ("o", "(n c)") if transposed else ("(n c)", "o")
  rule = ", ".join([f"{b} {x_rule}", *_storage_rule(w, "o")]) + f" -> {b} {y_rule}"
  _def_rule(product, partition, infer, rule, w, reduction=("o",) if transposed else ("n",))
  return _vmappable(product, kernel, 2)(x, w)

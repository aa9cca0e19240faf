"""``nf4_matmul``: the frozen-base matmul of QLoRA, ``x @ dequantize_nf4(W).T``.

Each backend is a differentiable pair (forward ``x @ W.T``, input gradient
``dy @ W``) under one ``jax.custom_vjp`` whose only residuals are ``W``'s packed
codes and scales; the backward pass recomputes the decode with the same backend,
and no gradient flows to ``W``. Backends, in automatic order: ``"pallas"`` (the
fused Triton kernels, on a GPU) and ``"xla"`` (decode, then XLA's dot). Named
only: ``"native"`` (the C decode, then XLA's dot: it did not shorten the CPU
training step, ``benchmarks/compare_torch.py``, and XLA fuses its own decode) and
``"interpret"`` (the Pallas kernels interpreted, for CPU tests). Under a mesh every
backend but ``"xla"`` (which XLA partitions itself) runs once per device on its shards
(``jqlora.ops.per_shard``): column-parallel, row-parallel (``psum`` of the partial
products) and FSDP (the uint8 storage gathered, decoded locally), forward and backward.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jqlora.format import NF4Tensor
from jqlora.ops import per_shard
from jqlora.ops.dequantize import dequantize_nf4
from jqlora.ops.registry import Implementation, Op
from pallas_kernels import nf4_matmul as nf4_matmul_kernels
from pallas_kernels.nf4_matmul import check_operands, matmul_reference, matmul_transposed_reference

__all__ = ["NF4_MATMUL", "matmul_wt", "nf4_matmul"]

Kernel = Callable[[jax.Array, NF4Tensor], jax.Array]


def matmul_wt(x: jax.Array, w: jax.Array) -> jax.Array:
  """``x @ w.T`` for ``x [..., in]`` and a float ``w [out, in]`` (same dtype) -> ``[..., out]``.

  One ``dot_general`` contracting ``w``'s last axis, never ``w.T`` as a value: inside a
  scanned layer loop, a transposed frozen weight would be a residual of the backward pass,
  copied into a ``[layers, in, out]`` stack on every step.
  """
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (w.ndim - 1,)), ((), ())))


def _differentiable(forward: Kernel, transposed: Kernel) -> Kernel:
  """``forward`` with ``transposed`` as its input gradient; ``w`` gets zero cotangents."""

  @jax.custom_vjp
  def matmul(x: jax.Array, w: NF4Tensor) -> jax.Array:
    return forward(x, w)

  def fwd(x, w):
    return forward(x, w), w  # residuals: the NF4 storage only

  def bwd(w, dy):
    return transposed(dy, w), None  # None: zero cotangents for every leaf of w

  matmul.defvjp(fwd, bwd)
  return matmul


def _per_shard(forward: Kernel, transposed: Kernel) -> Kernel:
  """``_differentiable``, each kernel run on each device's shards under a mesh (``per_shard``)."""
  return _differentiable(lambda x, w: per_shard.matmul(forward, x, w),
                         lambda dy, w: per_shard.matmul(transposed, dy, w, transposed=True))


def _kernels(**kwargs) -> Kernel:
  """The fused Pallas kernels (``kwargs``: ``interpret``) as a differentiable pair."""
  return _per_shard(lambda x, w: nf4_matmul_kernels.matmul(x, w, **kwargs),
                    lambda dy, w: nf4_matmul_kernels.matmul_transposed(dy, w, **kwargs))


def _native_decode(x: jax.Array, w: NF4Tensor, transposed: bool) -> jax.Array:
  dense = dequantize_nf4(w, x.dtype, backend="native")
  return jnp.dot(x, dense if transposed else dense.T,
                 preferred_element_type=jnp.float32).astype(x.dtype)


#: The op and its backends (see the module docstring).
NF4_MATMUL = Op("nf4_matmul", [
    Implementation("pallas", _kernels(), preferred=lambda x, w: jax.default_backend() == "gpu"),
    Implementation("native", _per_shard(lambda x, w: _native_decode(x, w, False),
                                        lambda dy, w: _native_decode(dy, w, True)),
                   automatic=False),
    Implementation("xla", _differentiable(matmul_reference, matmul_transposed_reference)),
    Implementation("interpret", _kernels(interpret=True), automatic=False),
])


def nf4_matmul(x: jax.Array, w: NF4Tensor, *, backend: str | tuple[str, ...] | None = None
               ) -> jax.Array:
  """``x @ dequantize_nf4(w, x.dtype).T`` without a float copy of ``w`` kept for the backward.

  Args:
    x: bfloat16/float16/float32 activations ``[..., in]``.
    w: NF4 weight of shape ``[out, in]`` with whole blocks per row (``w.row_aligned``;
      one tensor: map over stacked layers with ``jax.lax.scan`` or ``jax.vmap``).
    backend: None for the automatic order (``"pallas"`` on a GPU, ``"xla"``
      elsewhere), a name (``"pallas"``, ``"native"``, ``"xla"``, ``"interpret"``) or
      a tuple of names tried in order (see ``jqlora.ops.registry``).

  Returns:
    ``x.dtype[..., out]``, accumulated in float32. Differentiable in ``x``
    (``dx = dy @ dequantize_nf4(w)``); ``w`` gets zero cotangents.

  Raises:
    TypeError/ValueError: ``w`` is not a 2-D unstacked NF4Tensor with whole blocks
      per row, or ``x`` has the wrong last dimension or dtype (before any kernel runs).
  """
  check_operands(x, w, "nf4_matmul")
  return NF4_MATMUL(x, w, backend=backend)

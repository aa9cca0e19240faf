"""``dequantize_nf4``: an ``NF4Tensor`` (NF4, FP4 or Int4) to a dense array, on the best backend.

Backends, in automatic order: ``"pallas"`` (the Triton kernel, on a GPU),
``"native"`` (the C kernel of ``jqlora.kernels.native``, on a CPU with AVX2 or
AVX-512, float32/bfloat16 output), ``"xla"`` (``jqlora.format.dequantize_reference``,
everywhere). Named only: ``"mosaic_gpu"`` (the Mosaic GPU kernel) and
``"interpret"`` (the Triton kernel in the Pallas interpreter, for CPU tests). All
are bit-identical, for each code table (NF4, FP4, Int4: ``NF4Tensor.quant_type``).
Under a mesh every backend but ``"xla"`` (which XLA partitions itself) decodes
each device's shard of the storage in place (``jqlora.ops.per_shard``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jqlora.format import NF4Tensor, dequantize_absmax, dequantize_reference
from jqlora.kernels import native
from jqlora.ops import per_shard
from jqlora.ops.registry import Implementation, Op
from pallas_kernels.nf4_dequantize import api as kernels

__all__ = ["DEQUANTIZE", "dequantize_nf4"]


def _on(platform: str):
  return lambda *args, **kwargs: jax.default_backend() == platform


def _pallas(t: NF4Tensor, dtype) -> jax.Array:
  return per_shard.dequantize(kernels.dequantize, t, dtype)


def _mosaic_gpu(t: NF4Tensor, dtype) -> jax.Array:
  decode = lambda t, dtype: kernels.dequantize(t, dtype, implementation="mosaic_gpu")
  return per_shard.dequantize(decode, t, dtype)


def _interpret(t: NF4Tensor, dtype) -> jax.Array:
  return per_shard.dequantize(lambda t, dtype: kernels.dequantize(t, dtype, interpret=True), t, dtype)


def _native(t: NF4Tensor, dtype) -> jax.Array:
  return per_shard.dequantize(_native_one, t, dtype)


def _native_one(t: NF4Tensor, dtype) -> jax.Array:
  flat = native.dequantize(t.packed.reshape(-1), dequantize_absmax(t), t.code, n=t.size,
                           block_size=t.block_size, dtype=dtype)
  return flat.reshape(t.shape)


def _native_preferred(t: NF4Tensor, dtype) -> bool:
  """On a CPU, to float32/bfloat16, with a SIMD path (its portable C loses to XLA)."""
  del t
  return (jax.default_backend() == "cpu" and jnp.dtype(dtype) in native.DTYPES
          and native.available() and native.isa() >= 1)


#: The op and its backends (see the module docstring).
DEQUANTIZE = Op("dequantize_nf4", [
    Implementation("pallas", _pallas, preferred=_on("gpu")),
    Implementation("mosaic_gpu", _mosaic_gpu, automatic=False),
    Implementation("native", _native, preferred=_native_preferred),
    Implementation("xla", dequantize_reference),
    Implementation("interpret", _interpret, automatic=False),
])


def dequantize_nf4(t: NF4Tensor, dtype=None, *, backend: str | tuple[str, ...] | None = None
                   ) -> jax.Array:
  """Decodes an ``NF4Tensor`` to a dense array.

  Each element is ``float32(code) * float32(scale)``, rounded once to ``dtype``.

  Args:
    t: the quantized tensor.
    dtype: output dtype; defaults to ``t.dtype`` (the quantized input's dtype).
    backend: None for the automatic order (``jqlora.ops.registry``: ``"pallas"`` on a
      GPU, ``"native"`` on a CPU where it runs, else ``"xla"``), a backend name
      (``"pallas"``, ``"mosaic_gpu"``, ``"native"``, ``"xla"``, ``"interpret"``) or a
      tuple of names tried in order. All are bit-identical.

  Returns:
    An array of shape ``t.shape`` and dtype ``dtype``. Works under ``jit`` and
    ``vmap`` (over stacked leaves).

  Raises:
    TypeError: ``t`` is not an ``NF4Tensor``.
    ValueError: an unknown backend.
    NotImplementedError: a named backend cannot run here (the message says why).
  """
  if not isinstance(t, NF4Tensor):
    raise TypeError(f"dequantize_nf4: expected an NF4Tensor, got {type(t).__name__}")
  dtype = t.dtype if dtype is None else jnp.dtype(dtype)
  return DEQUANTIZE(t, dtype, backend=backend)

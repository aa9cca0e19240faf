"""Backend-neutral entry point of the NF4 dequantize kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jqlora.format import NF4Tensor, dequantize_absmax
from pallas_kernels import common
from pallas_kernels.nf4_dequantize import mosaic_gpu, triton

__all__ = ["IMPLEMENTATIONS", "check_tensor", "dequantize"]

#: Kernel implementations (``jqlora.ops`` exposes them as the backends "pallas" and "mosaic_gpu").
IMPLEMENTATIONS = ("triton", "mosaic_gpu")


def _blocks(t: NF4Tensor) -> jax.Array:
  """``t``'s codes as uint8 ``[n_blocks, B/2]`` (padding the last block if it is partial)."""
  packed = t.packed.reshape(-1)
  size = t.n_blocks * t.block_size // 2
  if packed.size != size:
    packed = jnp.pad(packed, (0, size - packed.size))
  return packed.reshape(t.n_blocks, t.block_size // 2)


def check_tensor(t: NF4Tensor, what: str) -> None:
  """Raises unless ``t`` is an unstacked ``NF4Tensor`` (leaves hold exactly one tensor)."""
  if not isinstance(t, NF4Tensor):
    raise TypeError(f"{what}: expected an NF4Tensor, got {type(t).__name__}")
  if t.packed.size != (t.size + 1) // 2:
    raise ValueError(
        f"{what}: {t!r} has packed leaves of shape {tuple(t.packed.shape)}, which hold "
        f"{t.packed.size} bytes instead of {(t.size + 1) // 2}; stacked tensors must be "
        "unstacked with jax.vmap or jax.lax.scan first")


def dequantize(t: NF4Tensor, dtype=None, *, interpret: bool = False,
               implementation: str = "triton") -> jax.Array:
  """Decodes an ``NF4Tensor`` (any of its code tables: NF4, FP4, Int4) with a Pallas GPU kernel.

  Args:
    t: the quantized tensor (any shape; vmap over stacked leaves).
    dtype: bfloat16, float16 or float32; defaults to ``t.dtype``.
    interpret: run the Triton kernel in the Pallas interpreter (CPU tests).
    implementation: ``"triton"`` or ``"mosaic_gpu"``. The Mosaic kernel has no
      interpreted form.

  Returns:
    ``dtype[t.shape]``, bit-exact with ``jqlora.format.dequantize_reference(t, dtype)``.
  """
  check_tensor(t, "dequantize")
  dtype = common.check_float_dtype(t.dtype if dtype is None else dtype, "dequantize")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"dequantize: implementation must be one of {IMPLEMENTATIONS}, "
                     f"got {implementation!r}")
  packed = _blocks(t)
  if implementation == "mosaic_gpu":
    if interpret:
      raise NotImplementedError("dequantize: the mosaic_gpu kernel cannot be interpreted; "
                                "use implementation='triton' with interpret=True")
    blocks = mosaic_gpu.dequantize_blocks(packed, dequantize_absmax(t), dtype,
                                          code=common.code_table(t))
  else:
    scales = common.scale_operands(t, t.absmax.reshape(-1))
    blocks = triton.dequantize_blocks(packed, scales, dtype, interpret=interpret,
                                      code=common.code_table(t))
  values = blocks.reshape(-1)
  if values.size != t.size:
    values = values[:t.size]
  return values.reshape(t.shape)

"""What every NF4 kernel shares: its operands, in-kernel decoding and tile-size helpers.

The kernels read ``NF4Tensor`` storage as it is (bitsandbytes layout): packed
codes ``uint8[..., in/2]`` (element ``2i`` in the high nibble), one scale per
``block_size`` inputs (float32, or a uint8 code under double quantization, decoded
in-kernel as ``code2[q] * absmax2[block // 256] + offset`` with two roundings).

The in-kernel helpers take refs and values and use only operations that the
Triton lowering and the interpreter both support (ref gathers, shifts, bitcasts).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jqlora.format import DYNAMIC_MAP_SIGNED, NESTED_BLOCK_SIZE, NF4_CODE, NF4Tensor

__all__ = ["FLOAT_DTYPES", "ScaleOperands", "scale_operands", "nf4_table", "rounded_product",
           "load_scales", "decode_nibbles", "widen_rounded", "pow2_divisor", "next_pow2",
           "check_float_dtype"]

#: Floating dtypes the kernels read and write.
FLOAT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


class ScaleOperands(NamedTuple):
  """The arrays that decode block scales: ``absmax`` and, under double quantization, the rest.

  Attributes:
    absmax: float32 scales or uint8 codes, one per block.
    absmax2: float32 ``[n_groups]`` nested scales (double quantization) or None.
    offset: float32 ``[1]`` offset (double quantization) or None.
    code2: float32 ``[256]`` ``DYNAMIC_MAP_SIGNED`` table (double quantization) or None.
  """
  absmax: jax.Array
  absmax2: jax.Array | None
  offset: jax.Array | None
  code2: jax.Array | None

  def arrays(self) -> tuple[jax.Array, ...]:
    """The non-None operands, in kernel argument order."""
    return tuple(a for a in self if a is not None)


def scale_operands(t: NF4Tensor, absmax: jax.Array) -> ScaleOperands:
  """Kernel operands for ``t``'s scales, with ``absmax`` already reshaped by the caller."""
  if not t.double_quant:
    return ScaleOperands(absmax, None, None, None)
  return ScaleOperands(absmax, t.absmax2.reshape(-1), t.offset.reshape(1),
                       jnp.asarray(DYNAMIC_MAP_SIGNED))


def nf4_table() -> jax.Array:
  """float32 ``[16]`` NF4 code values: the table kernels gather from."""
  return jnp.asarray(NF4_CODE)


def rounded_product(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a * b`` rounded to float32 even if the caller adds to it; ``b`` must be >= 0.

  Compilers (XLA, LLVM, ptxas) contract ``a * b + c`` into one fused multiply-add;
  bitsandbytes rounds the product first. OR-ing the product's bits with the sign
  bit of ``b`` changes nothing for ``b >= 0`` (nested scales are absolute maxima),
  but no compiler can prove that, so the multiply and the add stay apart.
  """
  bits = jax.lax.bitcast_convert_type(a * b, jnp.uint32)
  sign = jax.lax.bitcast_convert_type(b, jnp.uint32) >> 31
  return jax.lax.bitcast_convert_type(bits | sign, jnp.float32)


def load_scales(refs: tuple, absmax: jax.Array, block: jax.Array) -> jax.Array:
  """float32 block scales inside a kernel.

  Args:
    refs: ``(absmax2_ref, offset_ref, code2_ref)`` under double quantization, else ``()``.
    absmax: the loaded ``absmax`` values (float32 scales or uint8 codes), any shape.
    block: int32 flat block indices of ``absmax``, same shape (used by double quant).

  Returns:
    float32 scales of ``absmax``'s shape.
  """
  if not refs:
    return absmax.astype(jnp.float32)
  absmax2_ref, offset_ref, code2_ref = refs
  code2 = code2_ref[absmax.astype(jnp.int32)]
  nested = absmax2_ref[block // NESTED_BLOCK_SIZE]
  return rounded_product(code2, nested) + offset_ref[0]


def decode_nibbles(packed: jax.Array, scales: jax.Array, table_ref, dtype) -> tuple[jax.Array, jax.Array]:
  """Dequantized values of the high and low nibbles of ``packed`` inside a kernel.

  Args:
    packed: uint8 codes ``[..., n]``.
    scales: float32 scales broadcastable to ``packed`` (one per block).
    table_ref: float32 ``[16]`` ref of the NF4 values.
    dtype: output dtype.

  Returns:
    ``(even, odd)``: ``dtype[..., n]`` values of elements ``2i`` and ``2i + 1``,
    each ``float32(code) * float32(scale)`` rounded once.
  """
  codes = packed.astype(jnp.int32)
  even = table_ref[codes >> 4] * scales
  odd = table_ref[codes & 0xF] * scales
  return even.astype(dtype), odd.astype(dtype)


def widen_rounded(v: jax.Array) -> jax.Array:
  """float32 of ``v``, a value just rounded to its dtype, keeping that rounding.

  XLA (with its default excess precision, e.g. in interpret mode) may drop an
  ``f32 -> bf16 -> f32`` round trip; bfloat16 is therefore widened through its
  bits (``bits << 16``), which is exact and as cheap as a convert.
  """
  if v.dtype == jnp.bfloat16:
    bits = jax.lax.bitcast_convert_type(v, jnp.uint16).astype(jnp.uint32) << 16
    return jax.lax.bitcast_convert_type(bits, jnp.float32)
  return v.astype(jnp.float32)


def pow2_divisor(n: int, cap: int) -> int:
  """The largest power of two that divides ``n`` and is at most ``cap``."""
  return int(min(n & -n, 1 << (int(cap).bit_length() - 1)))


def next_pow2(n: int) -> int:
  """The smallest power of two >= ``n`` (``n >= 1``)."""
  return 1 << (int(n) - 1).bit_length()


def check_float_dtype(dtype, what: str) -> np.dtype:
  """``dtype`` as a numpy dtype if the kernels support it, else a ValueError naming ``what``."""
  dtype = jnp.dtype(dtype)
  if dtype not in FLOAT_DTYPES:
    raise ValueError(f"{what}: dtype must be one of "
                     f"{[d.name for d in FLOAT_DTYPES]}, got {dtype.name}")
  return dtype

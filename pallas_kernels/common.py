"""What every NF4 kernel shares: its operands, in-kernel decoding and tile-size helpers.

The kernels read ``NF4Tensor`` storage as it is (bitsandbytes layout): packed
codes ``uint8[..., in/2]`` (element ``2i`` in the high nibble), one scale per
``block_size`` inputs (float32, or a uint8 code under double quantization, decoded
in-kernel as ``code2[q] * absmax2[block // 256] + offset`` with two roundings).

The in-kernel helpers take refs and values and use only operations that the
Triton lowering, the Mosaic GPU lowering and the interpreter all support (shifts,
selects, bitcasts). The 16-entry code table is a static tuple of floats (NF4,
FP4 or Int4, ``jqlora.format.CODES``): a 4-level select tree on the code bits, held
in instructions, never a gather from memory.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jqlora.format import CODES, DYNAMIC_MAP_SIGNED, NESTED_BLOCK_SIZE, NF4Tensor

__all__ = ["FLOAT_DTYPES", "SM_COUNT", "MIN_PROGRAMS", "Code", "NF4", "ScaleOperands", "scale_operands",
           "code_table", "select_code", "rounded_product", "load_scales", "decode_pairs",
           "widen_rounded", "pow2_divisor", "next_pow2", "check_float_dtype"]

#: Floating dtypes the kernels read and write.
FLOAT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
#: Streaming multiprocessors of the GPU the launch geometry is sized for (H200, H100 SXM: 132).
SM_COUNT = 132
#: Fewest programs a bandwidth-bound launch should have: two per SM, so that every SM stays busy.
MIN_PROGRAMS = 2 * SM_COUNT

#: A 16-entry code table as a static kernel parameter: value ``code[q]`` for the 4-bit code ``q``.
Code = tuple[float, ...]
#: The NF4 table, every kernel's default.
NF4: Code = tuple(float(v) for v in np.asarray(CODES["nf4"], np.float32))


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


def code_table(t: NF4Tensor) -> Code:
  """The 16 float32 values ``t``'s codes index (its ``quant_type``: NF4, FP4 or Int4)."""
  return tuple(float(v) for v in np.asarray(CODES[t.quant_type], np.float32))


def select_code(codes: jax.Array, code: Code) -> jax.Array:
  """float32 ``code[codes]`` for integer ``codes`` in ``0..15``, by a select tree on the code bits.

  Four levels of selects (8 + 4 + 2 + 1) on bits 0..3: no table in memory, so the same
  arithmetic runs in Triton, Mosaic GPU and the interpreter, for any static table.
  """
  if len(code) != 16:
    raise ValueError(f"a 4-bit code table has 16 values, got {len(code)}")
  level = [jnp.float32(v) for v in code]
  for bit in range(4):
    set_ = ((codes >> bit) & 1) == 1
    level = [jnp.where(set_, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
  return level[0]


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


def decode_pairs(packed: jax.Array, scales: jax.Array, code: Code, dtype) -> jax.Array:
  """Dequantized values of ``packed`` inside a kernel, in element order.

  Args:
    packed: uint8 codes ``[..., n]``, element ``2i`` in the high nibble.
    scales: float32 scales broadcastable to ``packed`` (one per block).
    code: the 16 values of the code table (static).
    dtype: output dtype.

  Returns:
    ``dtype[..., 2n]``: each value ``float32(code) * float32(scale)`` rounded once, the
    high and low nibbles' values interleaved in registers (a join, no memory traffic).
  """
  codes = packed.astype(jnp.int32)
  even = (select_code(codes >> 4, code) * scales).astype(dtype)
  odd = (select_code(codes & 0xF, code) * scales).astype(dtype)
  return jnp.stack([even, odd], axis=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


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

"""NF4 dequantize as a Pallas kernel for the Triton backend.

The tensor is read as its sequence of blocks: packed ``uint8[n_blocks, B/2]`` and
one scale per block. Each program decodes ``tile`` blocks: a select tree per nibble
(the 16 values of the code table are constants of the kernel, NF4 by default), one
multiply by the block scale, and an in-register interleave of the two nibbles'
values into ``[tile, B]``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import common

__all__ = ["TILE_BLOCKS", "NUM_WARPS", "NUM_STAGES", "dequantize_blocks"]

#: Untuned launch parameters (sweep on a GPU and record per device):
#: blocks per program (a power of two dividing n_blocks, at most this), warps, stages.
TILE_BLOCKS = 256
NUM_WARPS = 4
NUM_STAGES = 1


def _kernel(packed_ref, absmax_ref, *refs, tile: int, dtype, code: common.Code):
  *scale_refs, out_ref = refs
  i = pl.program_id(0)
  rows = pl.ds(i * tile, tile)
  block = i * tile + jax.lax.broadcasted_iota(jnp.int32, (tile,), 0)
  scales = common.load_scales(tuple(scale_refs), absmax_ref[rows], block)
  out_ref[rows, :] = common.decode_pairs(packed_ref[rows, :], scales[:, None], code, dtype)


def dequantize_blocks(packed: jax.Array, scales: common.ScaleOperands, dtype, *,
                      interpret: bool = False, code: common.Code = common.NF4) -> jax.Array:
  """Dequantizes a sequence of 4-bit blocks.

  Args:
    packed: uint8 ``[n_blocks, B/2]`` codes, element ``2i`` of a block in the high nibble.
    scales: operands of the ``n_blocks`` block scales (``absmax`` flat ``[n_blocks]``).
    dtype: output dtype (bfloat16, float16 or float32).
    interpret: run the kernel in the Pallas interpreter (CPU).
    code: the 16 values of the code table (static; NF4 by default).

  Returns:
    ``dtype[n_blocks, B]``, bit-exact with ``jqlora.dequantize_nf4``.
  """
  n_blocks, half = packed.shape
  tile = common.pow2_divisor(n_blocks, TILE_BLOCKS)
  kernel = functools.partial(_kernel, tile=tile, dtype=jnp.dtype(dtype), code=tuple(code))
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((n_blocks, 2 * half), dtype),
      grid=(n_blocks // tile,),
      compiler_params=plt.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
      interpret=interpret,
      name="nf4_dequantize",
  )(packed, *scales.arrays())

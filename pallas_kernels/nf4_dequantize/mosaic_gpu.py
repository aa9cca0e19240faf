"""NF4 dequantize as a Mosaic GPU kernel (``plgpu.kernel``), the backend JAX is heading to.

Mosaic GPU has no ref gather, so one thing differs from the Triton kernel: the block
scales (double quantization included) are decoded by ``jqlora.format.dequantize_absmax``
in XLA first (float32 ``[n_blocks]``: 1/16 byte per weight on top of the 1/2
byte of codes). Values stay bit-exact: one float32 product per element, rounded
once. 16-bit outputs leave the kernel as ``uint32`` words holding an (even, odd)
pair (element ``2i`` in the low half, i.e. first in memory), so the
interleave is a free bitcast; float32 output leaves as even/odd arrays that XLA
interleaves.

Testing without a GPU: the kernel lowers for CUDA on a CPU machine, but neither
Pallas interpreter of JAX 0.10 runs it (the HLO interpreter has no rule for
``copy_gmem_to_smem``; the GPU interpreter rejects ``plgpu.load`` with layouts).
The tile arithmetic, :func:`decode_tile`, is therefore a pure function that the
tests run on whole arrays against the reference.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import common

__all__ = ["TILE_BLOCKS", "MAX_STEPS", "PIPELINE_DEPTH", "decode_tile", "words_to_values",
           "dequantize_blocks"]

# JAX 0.10 needs the index argument of ``plgpu.load``; 0.11 deprecates passing one.
_LOAD_NEEDS_INDEX = inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty


def _load(ref, layout) -> jax.Array:
  """The whole of ``ref`` in registers with ``layout`` (any JAX version)."""
  return plgpu.load(ref, (), layout=layout) if _LOAD_NEEDS_INDEX else plgpu.load(ref, layout=layout)

#: Untuned launch parameters: blocks per tile (a multiple of 64, the WGMMA layout's
#: row count) and the most tiles one program pipelines.
TILE_BLOCKS = 128
MAX_STEPS = 8
PIPELINE_DEPTH = 2


def decode_tile(packed: jax.Array, scales: jax.Array, dtype,
                code: common.Code = common.NF4) -> tuple[jax.Array, ...]:
  """Dequantizes a tile: uint8 ``[T, H]`` codes and float32 ``[T, H]`` (broadcast) scales.

  ``code`` is the static 16-entry table (NF4 by default), decoded by ``common.select_code``.

  Returns:
    For 16-bit ``dtype``: ``(uint32[T, H],)`` words, value ``2i`` in the low half.
    For float32: ``(even, odd)``, each ``float32[T, H]``.
  """
  codes = packed.astype(jnp.uint32)
  even = (common.select_code(codes >> 4, code) * scales).astype(dtype)
  odd = (common.select_code(codes & 0xF, code) * scales).astype(dtype)
  if jnp.dtype(dtype).itemsize == 4:
    return even, odd
  bits = lambda v: jax.lax.bitcast_convert_type(v, jnp.uint16).astype(jnp.uint32)
  return (bits(even) | (bits(odd) << 16),)


def words_to_values(outs: tuple[jax.Array, ...], dtype) -> jax.Array:
  """``dtype[n, 2H]`` values from :func:`decode_tile`'s outputs of shape ``[n, H]``."""
  if len(outs) == 2:
    return jnp.stack(outs, axis=-1).reshape(outs[0].shape[0], -1)
  pairs = jax.lax.bitcast_convert_type(outs[0], jnp.dtype(dtype))  # [n, H, 2], low half first
  return pairs.reshape(outs[0].shape[0], -1)


def dequantize_blocks(packed: jax.Array, scales: jax.Array, dtype,
                      code: common.Code = common.NF4) -> jax.Array:
  """Dequantizes ``n_blocks`` 4-bit blocks on a GPU with Mosaic (``code``: NF4 by default).

  Args:
    packed: uint8 ``[n_blocks, H]`` codes (``H = B/2``, a multiple of 8).
    scales: float32 ``[n_blocks]`` decoded block scales.
    dtype: bfloat16, float16 or float32.

  Returns:
    ``dtype[n_blocks, 2H]``.
  """
  n_valid, half = packed.shape
  n_blocks = -(-n_valid // 64) * 64  # the WGMMA layout tiles rows by 64
  if n_blocks != n_valid:
    packed = jnp.pad(packed, ((0, n_blocks - n_valid), (0, 0)))
    scales = jnp.pad(scales, (0, n_blocks - n_valid))
  dtype = jnp.dtype(dtype)
  tile = TILE_BLOCKS if n_blocks % TILE_BLOCKS == 0 else 64
  n_tiles = n_blocks // tile
  steps = min(n_tiles & -n_tiles, MAX_STEPS)
  row = plgpu.Layout.WGMMA
  out_dtypes = (dtype, dtype) if dtype.itemsize == 4 else (jnp.uint32,)

  def tile_body(_, packed_ref, scales_ref, *out_refs):
    codes = _load(packed_ref, row)
    block_scales = _load(scales_ref, row.reduce(1))
    block_scales = jax.lax.broadcast_in_dim(block_scales, (tile, half), (0,))
    for ref, value in zip(out_refs, decode_tile(codes, block_scales, dtype, code)):
      ref[...] = value

  def body(packed_gmem, scales_gmem, *out_gmem):
    first = jax.lax.axis_index("tiles") * steps
    spec = lambda: plgpu.BlockSpec((tile, half), lambda s: (first + s, 0))
    plgpu.emit_pipeline(
        tile_body, grid=(steps,),
        in_specs=[spec(), plgpu.BlockSpec((tile,), lambda s: (first + s,))],
        out_specs=[spec() for _ in out_dtypes],
        max_concurrent_steps=PIPELINE_DEPTH,
    )(packed_gmem, scales_gmem, *out_gmem)

  outs = plgpu.kernel(
      body,
      out_type=[jax.ShapeDtypeStruct((n_blocks, half), d) for d in out_dtypes],
      grid=(n_tiles // steps,),
      grid_names=("tiles",),
  )(packed, scales)
  return words_to_values(tuple(outs), dtype)[:n_valid]

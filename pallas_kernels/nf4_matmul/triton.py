"""Fused NF4 matmul kernels for the Triton backend: ``y = x @ W.T`` and ``dx = dy @ W``.

``W`` is read in its stored layout, packed ``uint8[out, in/2]`` plus one scale per
``B`` inputs, and decoded in registers; the dequantized weight never reaches
memory. A nibble pair holds inputs ``2i`` (high) and ``2i + 1`` (low), so the
activations are split into even and odd columns once, outside the kernel, and
each K step contracts both halves: ``x_even @ W_high.T + x_odd @ W_low.T``.

Two contractions per orientation: a SIMT broadcast-multiply-reduce for M <= 3
(GEMV, memory-bound: two table gathers and one multiply per weight) and
``jnp.dot`` on tensor cores for larger M (rows padded to 16). Accumulation is
float32; each weight is rounded to the activation dtype first, exactly as
``x @ dequantize_nf4(W, x.dtype).T`` sees it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jqlora.format import NF4Tensor
from pallas_kernels import common

__all__ = ["GEMV_MAX_M", "MMA_MAX_M", "MMA_MIN_DIM", "TARGET_PROGRAMS", "TILES", "Tiles", "kind",
           "forward", "transposed"]

#: Largest M served by the GEMV kernels, and by the tensor-core kernels.
GEMV_MAX_M = 3
MMA_MAX_M = 64
#: Tensor-core tiles need at least this many rows/columns.
MMA_MIN_DIM = 16


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Launch parameters of one kernel (caps: the sizes used are powers of two dividing the problem).

  Attributes:
    rows: rows of W per program (forward) or per K step (transposed).
    blocks: scale blocks of W per K step (forward) or per program (transposed).
    m: activation rows per program (tensor-core kernels; GEMV takes all M).
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining depth.
  """
  rows: int
  blocks: int
  m: int
  num_warps: int
  num_stages: int


#: Untuned starting points (sweep on a GPU; Pallas has no autotuner).
TILES = {
    ("gemv", False): Tiles(rows=64, blocks=4, m=4, num_warps=4, num_stages=3),
    ("mma", False): Tiles(rows=64, blocks=2, m=64, num_warps=4, num_stages=3),
    ("gemv", True): Tiles(rows=64, blocks=2, m=4, num_warps=4, num_stages=3),
    ("mma", True): Tiles(rows=64, blocks=2, m=64, num_warps=4, num_stages=3),
}
#: The transposed kernels split ``out`` across programs until about this many run.
TARGET_PROGRAMS = 256


def _decode(packed_ref, absmax_ref, scale_refs, table_ref, rows, first_row, k, *, nb, kb, dtype):
  """Decodes W rows ``rows`` (from ``first_row``), blocks ``[k*kb, (k+1)*kb)``.

  Returns:
    ``(even, odd)``: ``dtype[n_rows, kb*B/2]`` weights of the even and odd inputs.
  """
  n = rows.size
  half = packed_ref.shape[1] // nb
  packed = packed_ref[rows, pl.ds(k * kb * half, kb * half)]
  block = ((first_row + jax.lax.broadcasted_iota(jnp.int32, (n, kb), 0)) * nb
           + k * kb + jax.lax.broadcasted_iota(jnp.int32, (n, kb), 1))
  scales = common.load_scales(scale_refs, absmax_ref[rows, pl.ds(k * kb, kb)], block)
  even, odd = common.decode_nibbles(packed.reshape(n, kb, half), scales[:, :, None], table_ref, dtype)
  return even.reshape(n, kb * half), odd.reshape(n, kb * half)


def _dot(a: jax.Array, w: jax.Array, contract_b: int, gemv: bool) -> jax.Array:
  """float32 ``a @ w.T`` (``contract_b=1``) or ``a @ w`` (``contract_b=0``) for decoded ``w``."""
  if gemv:
    a, b = a.astype(jnp.float32), common.widen_rounded(w)
    if contract_b == 1:
      return jnp.sum(a[:, None, :] * b[None, :, :], axis=2)
    return jnp.sum(a[:, :, None] * b[None, :, :], axis=1)
  return jax.lax.dot_general(a, w, (((1,), (contract_b,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _forward_kernel(x_even_ref, x_odd_ref, packed_ref, absmax_ref, *refs, tiles, nb, kb, gemv):
  *scale_refs, table_ref, y_ref = refs
  bm, bn = tiles.m, tiles.rows
  i, j = pl.program_id(0), pl.program_id(1)
  rows, m_rows = pl.ds(i * bn, bn), pl.ds(j * bm, bm)
  width = x_even_ref.shape[1] // nb * kb

  def step(k, acc):
    even, odd = _decode(packed_ref, absmax_ref, tuple(scale_refs), table_ref, rows, i * bn, k,
                        nb=nb, kb=kb, dtype=x_even_ref.dtype)
    cols = pl.ds(k * width, width)
    return (acc + _dot(x_even_ref[m_rows, cols], even, 1, gemv)
            + _dot(x_odd_ref[m_rows, cols], odd, 1, gemv))

  acc = jax.lax.fori_loop(0, nb // kb, step, jnp.zeros((bm, bn), jnp.float32))
  y_ref[m_rows, rows] = acc.astype(y_ref.dtype)


def _transposed_kernel(dy_ref, packed_ref, absmax_ref, *refs, tiles, nb, kb, rows_per_split, gemv):
  *scale_refs, table_ref, dx_even_ref, dx_odd_ref = refs
  bm, bo = tiles.m, tiles.rows
  c, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  m_rows = pl.ds(j * bm, bm)
  width = dx_even_ref.shape[2] // nb * kb

  def step(r, accs):
    first = s * rows_per_split + r * bo
    rows = pl.ds(first, bo)
    even, odd = _decode(packed_ref, absmax_ref, tuple(scale_refs), table_ref, rows, first, c,
                        nb=nb, kb=kb, dtype=dy_ref.dtype)
    g = dy_ref[m_rows, rows]
    return accs[0] + _dot(g, even, 0, gemv), accs[1] + _dot(g, odd, 0, gemv)

  zeros = jnp.zeros((bm, width), jnp.float32)
  acc_even, acc_odd = jax.lax.fori_loop(0, rows_per_split // bo, step, (zeros, zeros))
  cols = pl.ds(c * width, width)
  dx_even_ref[s, m_rows, cols] = acc_even
  dx_odd_ref[s, m_rows, cols] = acc_odd


def kind(m: int, t: NF4Tensor) -> str | None:
  """``"gemv"``, ``"mma"`` or None (no fused kernel: dequantize and use XLA's dot) for ``m`` rows."""
  if m <= GEMV_MAX_M:
    return "gemv"
  if m <= MMA_MAX_M and t.shape[0] % MMA_MIN_DIM == 0:
    return "mma"
  return None


def _launch(kernel, grid, out_shape, tiles: Tiles, interpret: bool):
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, interpret=interpret,
      compiler_params=plt.CompilerParams(num_warps=tiles.num_warps,
                                         num_stages=tiles.num_stages),
      name=f"nf4_{kernel.func.__name__.strip('_')}")


def _pad_rows(a: jax.Array, gemv: bool) -> jax.Array:
  """Pads ``a``'s rows to a power of two (GEMV) or a multiple of 16 (tensor cores)."""
  m = a.shape[0]
  rows = common.next_pow2(m) if gemv else -(-m // MMA_MIN_DIM) * MMA_MIN_DIM
  return jnp.pad(a, ((0, rows - m), (0, 0))) if rows != m else a


def _operands(t: NF4Tensor) -> tuple[jax.Array, ...]:
  return (t.packed, *common.scale_operands(t, t.absmax).arrays(), common.nf4_table())


def forward(x: jax.Array, t: NF4Tensor, *, interpret: bool = False) -> jax.Array:
  """Fused ``x @ dequantize(t).T`` for ``x[M, in]``, ``M <= MMA_MAX_M`` (see :func:`kind`).

  Returns:
    ``x.dtype[M, out]``, accumulated in float32.
  """
  gemv = kind(x.shape[0], t) == "gemv"
  tiles = TILES[("gemv" if gemv else "mma", False)]
  out, nb = t.shape[0], t.shape[1] // t.block_size
  xp = _pad_rows(x, gemv)
  bm = xp.shape[0] if gemv else common.pow2_divisor(xp.shape[0], tiles.m)
  tiles = dataclasses.replace(tiles, m=bm, rows=common.pow2_divisor(out, tiles.rows))
  kb = common.pow2_divisor(nb, tiles.blocks)
  kernel = functools.partial(_forward_kernel, tiles=tiles, nb=nb, kb=kb, gemv=gemv)
  y = _launch(kernel, (out // tiles.rows, xp.shape[0] // bm),
              jax.ShapeDtypeStruct((xp.shape[0], out), x.dtype), tiles, interpret)(
                  xp[:, 0::2], xp[:, 1::2], *_operands(t))
  return y[:x.shape[0]]


def transposed(dy: jax.Array, t: NF4Tensor, *, interpret: bool = False) -> jax.Array:
  """Fused ``dy @ dequantize(t)`` for ``dy[M, out]``, ``M <= MMA_MAX_M`` (see :func:`kind`).

  Returns:
    ``dy.dtype[M, in]``, accumulated in float32.
  """
  gemv = kind(dy.shape[0], t) == "gemv"
  tiles = TILES[("gemv" if gemv else "mma", True)]
  out, inputs = t.shape
  nb = inputs // t.block_size
  dyp = _pad_rows(dy, gemv)
  bm = dyp.shape[0] if gemv else common.pow2_divisor(dyp.shape[0], tiles.m)
  bo = common.pow2_divisor(out, tiles.rows)
  kb = common.pow2_divisor(nb, tiles.blocks)
  col_tiles, m_tiles = nb // kb, dyp.shape[0] // bm
  splits = common.pow2_divisor(out // bo, max(1, TARGET_PROGRAMS // (col_tiles * m_tiles)))
  tiles = dataclasses.replace(tiles, m=bm, rows=bo)
  kernel = functools.partial(_transposed_kernel, tiles=tiles, nb=nb, kb=kb,
                             rows_per_split=out // splits, gemv=gemv)
  half = jax.ShapeDtypeStruct((splits, dyp.shape[0], inputs // 2), jnp.float32)
  dx_even, dx_odd = _launch(kernel, (col_tiles, m_tiles, splits), (half, half), tiles, interpret)(
      dyp, *_operands(t))
  dx = jnp.stack([dx_even.sum(0), dx_odd.sum(0)], axis=-1).reshape(dyp.shape[0], inputs)
  return dx[:dy.shape[0]].astype(dy.dtype)

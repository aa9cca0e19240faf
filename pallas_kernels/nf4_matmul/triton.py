"""Fused NF4 matmul kernels for the Triton backend: ``y = x @ W.T`` and ``dx = dy @ W``.

``W`` is read in its stored layout, packed ``uint8[out, in/2]`` plus one scale per
``B`` inputs, and decoded in registers; the dequantized weight never reaches
memory. A nibble pair holds inputs ``2i`` (high) and ``2i + 1`` (low); the kernel
decodes both by a select tree on the code bits (the 16-entry code table is a
static parameter, NF4 by default) and interleaves them in registers, so ``x``
and ``dx`` are read and written in their own layout, with no slicing outside.

Two contractions per orientation: a SIMT broadcast-multiply-reduce for M <= 3
(GEMV, memory-bound) and ``jnp.dot`` on tensor cores for larger M (rows padded
to 16). Accumulation is float32; each weight is rounded to the activation dtype
first, exactly as ``x @ dequantize_nf4(W, x.dtype).T`` sees it.

Launch geometry: at least ``common.MIN_PROGRAMS`` programs (two per SM of an
H200) wherever the problem allows, by splitting the contraction (``in`` for the
forward kernel, ``out`` for the transposed one) into partial float32 sums that
XLA adds, and by taking fewer rows per program; :func:`geometry` says which.
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

__all__ = ["GEMV_MAX_M", "MMA_MAX_M", "MMA_MIN_DIM", "MIN_ROWS", "TILES", "Tiles", "Geometry", "kind",
           "geometry", "forward", "transposed"]

#: Largest M served by the GEMV kernels, and by the tensor-core kernels.
GEMV_MAX_M = 3
MMA_MAX_M = 64
#: Tensor-core tiles need at least this many rows/columns.
MMA_MIN_DIM = 16
#: Fewest W rows per program (or per K step of the transposed kernels) when splitting for more programs.
MIN_ROWS = 16


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


@dataclasses.dataclass(frozen=True)
class Geometry:
  """One launch: the tiles used, the contraction split and the grid.

  Attributes:
    kind: ``"gemv"`` or ``"mma"``.
    tiles: the :class:`Tiles` actually used (``rows``, ``blocks``, ``m`` fitted to the problem).
    m_pad: activation rows after padding (a power of two for GEMV, a multiple of 16 otherwise).
    splits: partial sums the contraction is cut into (added by XLA after the kernel).
    grid: the Pallas grid.
  """
  kind: str
  tiles: Tiles
  m_pad: int
  splits: int
  grid: tuple[int, ...]

  @property
  def programs(self) -> int:
    """Programs (CTAs) of the launch."""
    n = 1
    for g in self.grid:
      n *= g
    return n


def _decode(packed_ref, absmax_ref, scale_refs, rows, first_row, k, *, nb, kb, dtype, code):
  """Decodes W rows ``rows`` (from ``first_row``), blocks ``[k*kb, (k+1)*kb)``.

  Returns:
    ``dtype[n_rows, kb*B]``: the weights of those inputs, in input order.
  """
  n = rows.size
  half = packed_ref.shape[1] // nb
  packed = packed_ref[rows, pl.ds(k * kb * half, kb * half)]
  block = ((first_row + jax.lax.broadcasted_iota(jnp.int32, (n, kb), 0)) * nb
           + k * kb + jax.lax.broadcasted_iota(jnp.int32, (n, kb), 1))
  scales = common.load_scales(scale_refs, absmax_ref[rows, pl.ds(k * kb, kb)], block)
  w = common.decode_pairs(packed.reshape(n, kb, half), scales[:, :, None], code, dtype)
  return w.reshape(n, kb * 2 * half)


def _dot(a: jax.Array, w: jax.Array, contract_b: int, gemv: bool) -> jax.Array:
  """float32 ``a @ w.T`` (``contract_b=1``) or ``a @ w`` (``contract_b=0``) for decoded ``w``."""
  if gemv:
    a, b = a.astype(jnp.float32), common.widen_rounded(w)
    if contract_b == 1:
      return jnp.sum(a[:, None, :] * b[None, :, :], axis=2)
    return jnp.sum(a[:, :, None] * b[None, :, :], axis=1)
  return jax.lax.dot_general(a, w, (((1,), (contract_b,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _forward_kernel(x_ref, packed_ref, absmax_ref, *refs, g: Geometry, nb, code):
  *scale_refs, y_ref = refs
  bm, bn, kb = g.tiles.m, g.tiles.rows, g.tiles.blocks
  i, s, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  rows, m_rows = pl.ds(i * bn, bn), pl.ds(j * bm, bm)
  width = x_ref.shape[1] // nb * kb
  steps = nb // kb // g.splits

  def step(k, acc):
    k = s * steps + k
    w = _decode(packed_ref, absmax_ref, tuple(scale_refs), rows, i * bn, k,
                nb=nb, kb=kb, dtype=x_ref.dtype, code=code)
    return acc + _dot(x_ref[m_rows, pl.ds(k * width, width)], w, 1, g.kind == "gemv")

  y_ref[s, m_rows, rows] = jax.lax.fori_loop(0, steps, step, jnp.zeros((bm, bn), jnp.float32))


def _transposed_kernel(dy_ref, packed_ref, absmax_ref, *refs, g: Geometry, nb, code):
  *scale_refs, dx_ref = refs
  bm, bo, kb = g.tiles.m, g.tiles.rows, g.tiles.blocks
  c, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  m_rows = pl.ds(j * bm, bm)
  width = dx_ref.shape[2] // nb * kb
  rows_per_split = packed_ref.shape[0] // g.splits

  def step(r, acc):
    first = s * rows_per_split + r * bo
    rows = pl.ds(first, bo)
    w = _decode(packed_ref, absmax_ref, tuple(scale_refs), rows, first, c,
                nb=nb, kb=kb, dtype=dy_ref.dtype, code=code)
    return acc + _dot(dy_ref[m_rows, rows], w, 0, g.kind == "gemv")

  acc = jax.lax.fori_loop(0, rows_per_split // bo, step, jnp.zeros((bm, width), jnp.float32))
  dx_ref[s, m_rows, pl.ds(c * width, width)] = acc


def kind(m: int, t: NF4Tensor) -> str | None:
  """``"gemv"``, ``"mma"`` or None (no fused kernel: dequantize and use XLA's dot) for ``m`` rows."""
  if m <= GEMV_MAX_M:
    return "gemv"
  if m <= MMA_MAX_M and t.shape[0] % MMA_MIN_DIM == 0:
    return "mma"
  return None


def geometry(m: int, t: NF4Tensor, *, transposed: bool = False) -> Geometry:
  """The launch of the fused kernel for ``m`` activation rows and the ``[out, in]`` weight ``t``.

  Starting from ``TILES``, the contraction is split (``in`` forward, ``out`` transposed)
  into up to the power of two that brings the grid to ``common.MIN_PROGRAMS``; where
  that is not enough, a program takes fewer W rows (down to ``MIN_ROWS``), then fewer
  blocks per K step.
  """
  kind_ = kind(m, t)
  if kind_ is None:
    raise ValueError(f"no fused kernel for M={m} and weight {t.shape} (see kind())")
  cap = TILES[(kind_, transposed)]
  m_pad = common.next_pow2(m) if kind_ == "gemv" else -(-m // MMA_MIN_DIM) * MMA_MIN_DIM
  bm = m_pad if kind_ == "gemv" else common.pow2_divisor(m_pad, cap.m)
  out, nb = t.shape[0], t.shape[1] // t.block_size
  rows, kb = common.pow2_divisor(out, cap.rows), common.pow2_divisor(nb, cap.blocks)
  while True:
    base, split_over = ((nb // kb, out // rows) if transposed else (out // rows, nb // kb))
    base *= m_pad // bm
    splits = common.pow2_divisor(split_over, common.next_pow2(-(-common.MIN_PROGRAMS // base)))
    if base * splits >= common.MIN_PROGRAMS or (rows <= MIN_ROWS and kb == 1):
      break
    if rows > MIN_ROWS:
      rows //= 2
    else:
      kb //= 2
  tiles = dataclasses.replace(cap, rows=rows, blocks=kb, m=bm)
  grid = ((nb // kb, m_pad // bm, splits) if transposed else (out // rows, splits, m_pad // bm))
  return Geometry(kind_, tiles, m_pad, splits, grid)


def _launch(kernel, g: Geometry, out_shape, interpret: bool):
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=g.grid, interpret=interpret,
      compiler_params=plt.CompilerParams(num_warps=g.tiles.num_warps,
                                         num_stages=g.tiles.num_stages),
      name=f"nf4_{kernel.func.__name__.strip('_')}")


def _operands(t: NF4Tensor) -> tuple[jax.Array, ...]:
  return (t.packed, *common.scale_operands(t, t.absmax).arrays())


def _fused(a: jax.Array, t: NF4Tensor, *, transposed: bool, interpret: bool) -> jax.Array:
  """``a @ W.T`` (or ``a @ W``) by the fused kernel: ``a.dtype[M, n_out]``."""
  g = geometry(a.shape[0], t, transposed=transposed)
  m = a.shape[0]
  ap = jnp.pad(a, ((0, g.m_pad - m), (0, 0))) if g.m_pad != m else a
  n_out = t.shape[1] if transposed else t.shape[0]
  kernel = functools.partial(_transposed_kernel if transposed else _forward_kernel, g=g,
                             nb=t.shape[1] // t.block_size, code=common.code_table(t))
  partial = _launch(kernel, g, jax.ShapeDtypeStruct((g.splits, g.m_pad, n_out), jnp.float32),
                    interpret)(ap, *_operands(t))
  return partial.sum(0)[:m].astype(a.dtype)


def forward(x: jax.Array, t: NF4Tensor, *, interpret: bool = False) -> jax.Array:
  """Fused ``x @ dequantize(t).T`` for ``x[M, in]``, ``M <= MMA_MAX_M`` (see :func:`kind`).

  Returns:
    ``x.dtype[M, out]``, accumulated in float32.
  """
  return _fused(x, t, transposed=False, interpret=interpret)


def transposed(dy: jax.Array, t: NF4Tensor, *, interpret: bool = False) -> jax.Array:
  """Fused ``dy @ dequantize(t)`` for ``dy[M, out]``, ``M <= MMA_MAX_M`` (see :func:`kind`).

  Returns:
    ``dy.dtype[M, in]``, accumulated in float32.
  """
  return _fused(dy, t, transposed=True, interpret=interpret)

"""PyTorch's and bitsandbytes' CPU float32 arithmetic, reproduced bit for bit.

NF4 double quantization is only byte-exact if three details follow the
reference libraries: the 256-entry dynamic map (torch's ``linspace``), the mean
of the block scales (torch's summation order) and the 8-bit code search
(bitsandbytes' CPU lookup table). Each is written here from the arithmetic the
libraries perform, and checked against their outputs in ``tests/test_torch_numerics.py``
and ``tests/test_nf4.py``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["linspace_f32", "mean_f32", "dynamic_codes"]

_F32 = np.float32
_LANES, _ILP = 8, 4  # torch's sum kernel: 8-wide vectors, 4 accumulators (and 4 cascade levels)
_LUT_STEPS = 65535  # bitsandbytes' CPU code search: a table over 65 536 points of [-1, 1]


def linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
  """``torch.linspace(start, end, steps, dtype=torch.float32)`` on the CPU.

  torch fills the first half as ``start + step * i`` and the second half as
  ``end - step * (steps - 1 - i)``, each a fused multiply-add (one rounding):
  the float64 product of two float32 values is exact, so one float32 rounding
  of the float64 sum reproduces it.

  Returns:
    float32 ``[steps]``.
  """
  start32, end32 = _F32(start), _F32(end)
  step = np.float64((end32 - start32) / _F32(steps - 1))
  idx = np.arange(steps, dtype=np.float64)
  out = np.where(idx < steps // 2, np.float64(start32) + step * idx,
                 np.float64(end32) - step * (steps - 1 - idx))
  return out.astype(_F32)


def _sequential_sum(rows: jax.Array, axis: int) -> jax.Array:
  """Left-to-right float32 sum along a short static ``axis`` (one rounding per add)."""
  total = jnp.take(rows, 0, axis=axis)
  for j in range(1, rows.shape[axis]):
    total = total + jnp.take(rows, j, axis=axis)
  return total


def mean_f32(x: jax.Array) -> jax.Array:
  """``torch.mean`` of a float32 vector as torch computes it on one CPU thread.

  torch sums 8-lane vectors into 4 interleaved accumulators, cascading partial
  sums through 4 levels every ``2**lp`` rows, then adds the leftover vectors,
  the accumulators, the scalar tail and the lanes, in that order, and divides
  by the count. Vectors of more than 32 768 elements are split across threads
  by torch, so there the result also depends on torch's thread count.

  Args:
    x: float32 ``[n]``, n >= 1. Works under ``jit`` (n is static).

  Returns:
    A float32 scalar.
  """
  n = x.shape[0]
  n_vec = n // _LANES
  if n_vec == 0:
    return _divide(_short_sum(x), n)
  size = n_vec // _ILP
  vectors = x[:n_vec * _LANES].reshape(n_vec, _LANES)
  rows = vectors[:size * _ILP].reshape(size, _ILP, _LANES)
  lp = max(4, (math.ceil(math.log2(size)) if size > 1 else 0) // 4)
  step, mask = 1 << lp, (1 << lp) - 1
  n_chunks = size // step

  zero = jnp.zeros((_ILP, _LANES), jnp.float32)
  levels = (zero, zero, zero)
  if n_chunks:
    chunks = rows[:n_chunks * step].reshape(n_chunks, step, _ILP, _LANES)
    chunk_sums = _sequential_sum(chunks, axis=1)
    ends = (jnp.arange(n_chunks, dtype=jnp.int32) + 1) * step

    def cascade(carry, chunk):
      a1, a2, a3 = carry
      total, end = chunk
      a1 = a1 + total
      up1 = (end & (mask << lp)) == 0
      a2 = jnp.where(up1, a2 + a1, a2)
      a1 = jnp.where(up1, 0.0, a1)
      up2 = up1 & ((end & (mask << (2 * lp))) == 0)
      a3 = jnp.where(up2, a3 + a2, a3)
      a2 = jnp.where(up2, 0.0, a2)
      return (a1, a2, a3), None

    levels, _ = jax.lax.scan(cascade, levels, (chunk_sums, ends))
  acc = _sequential_sum(rows[n_chunks * step:], axis=0) if size > n_chunks * step else zero
  for level in levels:
    acc = acc + level
  first = acc[0]
  for r in range(size * _ILP, n_vec):
    first = first + vectors[r]
  lanes = first
  for k in range(1, _ILP):
    lanes = lanes + acc[k]
  total = jnp.float32(0)
  for k in range(n_vec * _LANES, n):
    total = total + x[k]
  for k in range(_LANES):
    total = total + lanes[k]
  return _divide(total, n)


def _short_sum(x: jax.Array) -> jax.Array:
  """torch's scalar sum of fewer than 8 elements: 4 accumulators, leftovers into the first."""
  n = x.shape[0]
  acc = [x[k] for k in range(min(n, _ILP))] + [jnp.float32(0)] * max(0, _ILP - n)
  for k in range(_ILP, n):
    acc[0] = acc[0] + x[k]
  total = acc[0]
  for k in range(1, _ILP):
    total = total + acc[k]
  return total


def _divide(total: jax.Array, n: int) -> jax.Array:
  # A true division: XLA rewrites division by a constant as a reciprocal multiply.
  return total / jax.lax.optimization_barrier(jnp.float32(n))


@functools.lru_cache(maxsize=4)
def _lut_thresholds(code_bytes: bytes) -> np.ndarray:
  """float32 thresholds ``T`` with ``code index = #{j : t >= T[j]}`` for t in [0, 1].

  bitsandbytes' CPU path maps ``t = (v + 1) / 2`` to ``floor(t * 65535 + 0.5)``
  (float32, product and sum each rounded) and looks the code up in a table built as
  ``#{midpoints < -1 + 2 i / 65535}`` in float32. Each midpoint turns into the
  smallest float32 ``t`` that reaches the first table index past it.
  """
  code = np.frombuffer(code_bytes, _F32)
  mid = (_F32(0.5) * (code[:-1] + code[1:]).astype(_F32)).astype(_F32)
  i = np.arange(_LUT_STEPS + 1)
  grid = (_F32(-1) + ((_F32(2) * i.astype(_F32)).astype(_F32) / _F32(_LUT_STEPS))).astype(_F32)
  first_index = np.searchsorted(grid, mid, side="right")  # first i with grid[i] > mid

  def reaches(t: np.float32, idx: int) -> bool:  # float32 t * 65535, rounded, + 0.5, rounded
    return _F32(_F32(t * _F32(_LUT_STEPS)) + _F32(0.5)) >= idx

  thresholds = []
  for idx in first_index:  # the smallest float32 t that reaches idx (rounding is monotone)
    t = _F32((idx - 0.5) / _LUT_STEPS)
    while not reaches(t, idx):
      t = np.nextafter(t, _F32(np.inf))
    while reaches(np.nextafter(t, _F32(-np.inf)), idx):
      t = np.nextafter(t, _F32(-np.inf))
    thresholds.append(t if idx <= _LUT_STEPS else _F32(np.inf))
  return np.array(thresholds, dtype=_F32)


def dynamic_codes(values: jax.Array, absmax: jax.Array, code: np.ndarray) -> jax.Array:
  """bitsandbytes' CPU 8-bit blockwise quantization codes (``quantize_blockwise``).

  Each value is scaled by the float32 reciprocal of its block's absmax, clamped
  to [-1, 1], mapped to ``t = (v + 1) / 2`` and looked up in a 65 536-point table
  of the nearest ``code`` entry.

  Args:
    values: float32 ``[n_blocks, block]``.
    absmax: float32 ``[n_blocks]`` (> 0; the caller handles all-zero blocks).
    code: float32 ``[256]`` sorted codebook.

  Returns:
    uint8 ``[n_blocks, block]``.
  """
  inv = 1.0 / absmax
  v = jnp.clip(values * inv[:, None], -1.0, 1.0)
  t = (v + 1.0) * 0.5
  thresholds = jnp.asarray(_lut_thresholds(np.asarray(code, _F32).tobytes()))  # ascending
  return jnp.searchsorted(thresholds, t, side="right").astype(jnp.uint8)  # #{j: t >= T[j]}

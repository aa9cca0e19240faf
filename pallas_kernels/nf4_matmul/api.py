"""Backend-neutral entry points of the NF4 matmul kernels.

Each picks a path by the number of activation rows ``M``: the fused Triton
kernels for ``M <= 64`` (GEMV up to 3 rows, tensor cores above), else the
dequantize kernel followed by XLA's dot, where the 4-bit read no longer
matters (compute-bound).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jqlora.format import NF4Tensor
from pallas_kernels import common
from pallas_kernels.nf4_dequantize import api as dequantize_api
from pallas_kernels.nf4_matmul import triton

__all__ = ["check_operands", "matmul", "matmul_transposed"]


def check_operands(x: jax.Array, t: NF4Tensor, what: str, *, transposed: bool = False) -> None:
  """Raises a clear error unless ``x[..., k]`` can multiply the ``[out, in]`` NF4 weight ``t``.

  ``k`` is ``in`` (``x @ W.T``) or, with ``transposed``, ``out`` (``x @ W``). Rows of
  ``t`` must hold whole blocks (``in % block_size == 0``); ``x`` must be bfloat16,
  float16 or float32.
  """
  dequantize_api.check_tensor(t, what)
  if len(t.shape) != 2:
    raise ValueError(f"{what}: the weight must be 2-D [out, in], got shape {t.shape}")
  out, inputs = t.shape
  if not t.row_aligned:
    raise ValueError(
        f"{what}: weight shape {t.shape} has in={inputs}, not a multiple of its "
        f"block_size={t.block_size}; the kernels need whole blocks per row")
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{what}: x must be an array, got {type(x).__name__}")
  common.check_float_dtype(x.dtype, f"{what} (x)")
  k = out if transposed else inputs
  if x.ndim < 1 or x.shape[-1] != k:
    side = "out" if transposed else "in"
    raise ValueError(f"{what}: x has shape {tuple(x.shape)} but the weight {t.shape} "
                     f"needs x[..., {k}] (its {side} dimension)")


def _dispatch(x: jax.Array, t: NF4Tensor, *, transposed: bool, interpret: bool) -> jax.Array:
  """``x @ W.T`` (or ``x @ W`` when ``transposed``) by the fused kernel or dequantize + dot."""
  n_out = t.shape[1] if transposed else t.shape[0]
  rows = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
  if rows.shape[0] == 0:
    return jnp.zeros((*x.shape[:-1], n_out), x.dtype)
  if triton.kind(rows.shape[0], t):
    kernel = triton.transposed if transposed else triton.forward
    y = kernel(rows, t, interpret=interpret)
  else:
    w = dequantize_api.dequantize(t, x.dtype, interpret=interpret)
    y = jnp.dot(rows, w if transposed else w.T,
                preferred_element_type=jnp.float32).astype(x.dtype)
  return y.reshape(*x.shape[:-1], n_out)


def matmul(x: jax.Array, t: NF4Tensor, *, interpret: bool = False) -> jax.Array:
  """``x @ dequantize_nf4(t).T`` with the Pallas kernels.

  Args:
    x: bfloat16/float16/float32 ``[..., in]`` activations.
    t: NF4 weight ``[out, in]`` with ``in % block_size == 0``.
    interpret: run the kernels in the Pallas interpreter (CPU tests).

  Returns:
    ``x.dtype[..., out]``, accumulated in float32.
  """
  check_operands(x, t, "nf4 matmul")
  return _dispatch(x, t, transposed=False, interpret=interpret)


def matmul_transposed(dy: jax.Array, t: NF4Tensor, *, interpret: bool = False) -> jax.Array:
  """``dy @ dequantize_nf4(t)`` with the Pallas kernels (the input gradient of :func:`matmul`).

  Args:
    dy: bfloat16/float16/float32 ``[..., out]``.
    t: NF4 weight ``[out, in]`` with ``in % block_size == 0``.
    interpret: run the kernels in the Pallas interpreter (CPU tests).

  Returns:
    ``dy.dtype[..., in]``, accumulated in float32.
  """
  check_operands(dy, t, "nf4 matmul (transposed)", transposed=True)
  return _dispatch(dy, t, transposed=True, interpret=interpret)

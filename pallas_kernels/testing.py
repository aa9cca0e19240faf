"""Shared cases and checks for the kernel tests and benchmarks (no test framework needed)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jqlora.format import NF4Tensor, dequantize_reference, quantize_nf4
from pallas_kernels import sm90

__all__ = ["SHAPES", "M_VALUES", "DTYPES", "DEQUANTIZE_CASES", "MATMUL_CASES", "TARGET_GPU",
           "INTERPRET", "KERNEL_BACKEND", "make_weight", "make_activations", "float32_sum_bound",
           "assert_within_float32_bound", "check_dequantize", "check_matmul", "case_id",
           "lower_for_cuda"]

#: ``[out, in]`` weight shapes: powers of two and non-power-of-two multiples of 64.
SHAPES = ((64, 128), (192, 320), (48, 192))
#: Activation row counts: GEMV (1-3), tensor cores (8, 64), dequantize + XLA dot (256).
M_VALUES = (1, 2, 3, 8, 64, 256)
#: Dtypes the kernels read and write.
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
#: Dequantize cases ``(shape, double_quant, dtype)``: partial last blocks included.
DEQUANTIZE_CASES = tuple((shape, dq, dtype) for shape, dq in (((192, 320), True), ((48, 192), False),
                                                              ((5, 7), True), ((3, 64), False))
                         for dtype in DTYPES)
#: Matmul cases ``(m, dtype, shape, double_quant)``: each M once per activation dtype,
#: shapes and single/double quantization rotating.
MATMUL_CASES = tuple((m, dtype, SHAPES[i % 3], i % 2 == 0)
                     for i, (m, dtype) in enumerate((m, d) for m in M_VALUES
                                                    for d in (jnp.bfloat16, jnp.float32)))


def case_id(case) -> str:
  """A readable pytest id for a case of ``DEQUANTIZE_CASES`` or ``MATMUL_CASES``."""
  return "-".join(jnp.dtype(v).name if isinstance(v, type) else
                  "x".join(map(str, v)) if isinstance(v, tuple) else
                  ("dq" if v else "sq") if isinstance(v, bool) else f"M{v}" for v in case)


@functools.cache
def make_weight(shape: tuple[int, ...], double_quant: bool = True, seed: int = 0,
                block_size: int = 64) -> NF4Tensor:
  """NF4 quantization of a float32 normal array of ``shape`` (scaled by 2); cached."""
  w = 2.0 * jax.random.normal(jax.random.key(seed), shape, jnp.float32)
  return quantize_nf4(w, block_size=block_size, double_quant=double_quant)


def make_activations(shape: tuple[int, ...], dtype, seed: int = 1) -> jax.Array:
  """Standard-normal activations of ``shape`` and ``dtype``."""
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def float32_sum_bound(a, b, want, k: int) -> np.ndarray:
  """Per-element bound on ``|got - want|`` for two float32-accumulated ``a @ b`` in ``want.dtype``.

  Any summation order of ``k`` float32 products errs by at most ``k * 2**-24 * (|a| @ |b|)``
  (twice that between two orders); rounding to ``want.dtype`` adds up to an ulp of the result.
  """
  magnitude = np.abs(np.asarray(a, np.float64)) @ np.abs(np.asarray(b, np.float64))
  accumulation = 2 * k * 2.0**-24 * magnitude
  eps_out = float(jnp.finfo(want.dtype).eps)
  return accumulation + eps_out * (np.abs(np.asarray(want, np.float64)) + accumulation)


def assert_within_float32_bound(got, want, a, b, k: int) -> None:
  """``got`` equals ``want`` (same dtype and shape) within :func:`float32_sum_bound`."""
  bound = float32_sum_bound(a, b, want, k)
  err = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
  assert got.dtype == want.dtype and got.shape == want.shape
  assert np.all(err <= bound), f"max excess {np.max(err - bound)}"


def check_dequantize(case, *, interpret: bool, implementation: str = "triton") -> None:
  """The dequantize kernel on ``case`` equals the reference bit for bit."""
  from pallas_kernels.nf4_dequantize import dequantize, dequantize_reference

  shape, double_quant, dtype = case
  t = make_weight(shape, double_quant)
  got = jax.jit(lambda t: dequantize(t, dtype, interpret=interpret,
                                     implementation=implementation))(t)
  want = dequantize_reference(t, dtype)
  assert got.shape == shape and got.dtype == jnp.dtype(dtype)
  np.testing.assert_array_equal(np.asarray(got).view(np.uint8), np.asarray(want).view(np.uint8))


def check_matmul(case, *, interpret: bool) -> None:
  """``matmul`` and ``matmul_transposed`` on ``case`` equal the references within the float32 bound."""
  from pallas_kernels.nf4_matmul import (
    matmul,
    matmul_reference,
    matmul_transposed,
    matmul_transposed_reference,
  )

  m, dtype, shape, double_quant = case
  t = make_weight(shape, double_quant)
  x = make_activations((m, shape[1]), dtype)
  dy = make_activations((m, shape[0]), dtype, seed=2)
  y, dx = jax.jit(lambda x, dy, t: (matmul(x, t, interpret=interpret),
                                    matmul_transposed(dy, t, interpret=interpret)))(x, dy, t)
  w = np.asarray(dequantize_reference(t, dtype), np.float64)
  assert_within_float32_bound(y, matmul_reference(x, t), x, w.T, shape[1])
  assert_within_float32_bound(dx, matmul_transposed_reference(dy, t), dy, w, shape[0])


#: Whether kernel tests run the kernels in the Pallas interpreter: everywhere but on a GPU,
#: so the same case lists run compiled on a GPU machine.
INTERPRET = jax.default_backend() != "gpu"
#: The ``jqlora.ops`` backend that runs the Pallas kernels here ("interpret" or "pallas").
KERNEL_BACKEND = "interpret" if INTERPRET else "pallas"

#: The GPU the lowering tests target when no GPU is present (Triton reads its compute capability).
TARGET_GPU = sm90.TARGET_GPU


def lower_for_cuda(f: Callable, *args) -> str:
  """Traces ``jit(f)(*args)`` and lowers it for CUDA (works without a GPU); the StableHLO text."""
  return sm90.lowered_for_cuda(f, *args).as_text()

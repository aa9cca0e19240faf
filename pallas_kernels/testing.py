"""Shared cases and checks for the kernel tests and benchmarks (no test framework needed)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jqlora.format import NF4Tensor, quantize_nf4

__all__ = ["SHAPES", "M_VALUES", "DTYPES", "TARGET_GPU", "INTERPRET", "KERNEL_BACKEND",
           "make_weight", "make_activations", "float32_sum_bound", "lower_for_cuda"]

#: ``[out, in]`` weight shapes: powers of two and non-power-of-two multiples of 64.
SHAPES = ((64, 128), (192, 320), (48, 192))
#: Activation row counts: GEMV (1-3), tensor cores (8, 64), dequantize + XLA dot (256).
M_VALUES = (1, 2, 3, 8, 64, 256)
#: Dtypes the kernels read and write.
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


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


#: Whether kernel tests run the kernels in the Pallas interpreter: everywhere but on a GPU,
#: so the same case lists run compiled on a GPU machine.
INTERPRET = jax.default_backend() != "gpu"
#: The ``jqlora.ops`` backend that runs the Pallas kernels here ("interpret" or "pallas").
KERNEL_BACKEND = "interpret" if INTERPRET else "pallas"

#: The GPU the lowering tests target when no GPU is present (Triton reads its compute capability).
TARGET_GPU = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="gpu")


def lower_for_cuda(f: Callable, *args) -> str:
  """Traces ``jit(f)(*args)`` and lowers it for CUDA (works without a GPU); the StableHLO text.

  Lowering runs under an abstract one-device mesh whose device is ``TARGET_GPU``:
  from JAX 0.11 on, Pallas' Triton lowering needs a GPU model to target.
  """
  mesh = jax.sharding.AbstractMesh((1,), ("gpu",), abstract_device=TARGET_GPU)
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()

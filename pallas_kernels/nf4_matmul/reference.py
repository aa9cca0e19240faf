"""Pure-jnp references of the NF4 matmul kernels (they import only the format)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jqlora.format import NF4Tensor, dequantize_reference

__all__ = ["matmul_reference", "matmul_transposed_reference"]


def matmul_reference(x: jax.Array, t: NF4Tensor) -> jax.Array:
  """``x @ dequantize_reference(t, x.dtype).T`` with float32 accumulation: ``x.dtype[..., out]``."""
  w = dequantize_reference(t, x.dtype)
  return jnp.dot(x, w.T, preferred_element_type=jnp.float32).astype(x.dtype)


def matmul_transposed_reference(dy: jax.Array, t: NF4Tensor) -> jax.Array:
  """``dy @ dequantize_reference(t, dy.dtype)`` with float32 accumulation: ``dy.dtype[..., in]``."""
  w = dequantize_reference(t, dy.dtype)
  return jnp.dot(dy, w, preferred_element_type=jnp.float32).astype(dy.dtype)

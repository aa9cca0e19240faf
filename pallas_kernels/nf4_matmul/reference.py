"""Pure-jnp references of the NF4 matmul kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jqlora.nf4 import NF4Tensor, dequantize_nf4


def matmul_reference(x: jax.Array, t: NF4Tensor, decode: str = "xla") -> jax.Array:
  """``x @ dequantize_nf4(t, x.dtype).T`` with float32 accumulation: ``x.dtype[..., out]``.

  ``decode`` is the ``dequantize_nf4`` backend (all are bit-identical).
  """
  w = dequantize_nf4(t, x.dtype, backend=decode)
  return jnp.dot(x, w.T, preferred_element_type=jnp.float32).astype(x.dtype)


def matmul_transposed_reference(dy: jax.Array, t: NF4Tensor, decode: str = "xla") -> jax.Array:
  """``dy @ dequantize_nf4(t, dy.dtype)`` with float32 accumulation: ``dy.dtype[..., in]``."""
  w = dequantize_nf4(t, dy.dtype, backend=decode)
  return jnp.dot(dy, w, preferred_element_type=jnp.float32).astype(dy.dtype)

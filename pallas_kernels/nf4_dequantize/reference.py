"""Pure-jnp reference of the NF4 dequantize kernels."""

from __future__ import annotations

import jax

from jqlora.nf4 import NF4Tensor, dequantize_nf4


def dequantize_reference(t: NF4Tensor, dtype=None) -> jax.Array:
  """``jqlora.dequantize_nf4`` on its pure-jnp path: ``dtype[t.shape]`` (default ``t.dtype``)."""
  return dequantize_nf4(t, dtype, backend="xla")

"""Backend choice for the NF4 operations: ``pallas`` (GPU), ``xla`` (pure jnp), ``interpret``."""

from __future__ import annotations

import jax

BACKENDS = ("pallas", "xla", "interpret")


def resolve_backend(backend: str | None) -> str:
  """Returns ``backend``, or the default: ``"pallas"`` on GPU, ``"xla"`` elsewhere."""
  if backend is None:
    return "pallas" if jax.default_backend() == "gpu" else "xla"
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
  return backend


def dequantize_kernel(t, dtype, backend: str):
  """Dequantizes with the Pallas kernel (``backend`` is ``"pallas"`` or ``"interpret"``)."""
  from pallas_kernels.nf4_dequantize import api
  return api.dequantize(t, dtype, interpret=backend == "interpret")

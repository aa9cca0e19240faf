"""NF4 operations behind one backend switch: ``pallas`` (GPU), ``native`` (the compiled CPU
kernel of ``jqlora.native``), ``xla`` (pure jnp), ``interpret``.

``nf4_matmul`` is the frozen-base matmul of QLoRA: ``x @ dequantize_nf4(W).T`` with
a custom VJP whose only residuals are ``W``'s packed codes and scales; the backward
pass recomputes the decode (``dx = dy @ dequantize_nf4(W)``) with the same kernels,
and no gradient flows to ``W``.
"""

from __future__ import annotations

import functools

import jax

from jqlora.nf4 import NF4Tensor

BACKENDS = ("pallas", "native", "xla", "interpret")


def resolve_backend(backend: str | None, dtype=None) -> str:
  """Returns ``backend``, or the default: ``"pallas"`` on GPU; on CPU ``"native"`` when
  ``dtype`` (the decoded dtype) is given and ``jqlora.native.usable(dtype)``, else ``"xla"``.

  ``dequantize_nf4`` passes its dtype; ``nf4_matmul`` does not and stays on XLA on
  the CPU: the native decode did not shorten the training step there
  (``benchmarks/compare_torch.py``), and XLA can fuse and partition its own decode.
  """
  if backend is None:
    if jax.default_backend() == "gpu":
      return "pallas"
    from jqlora import native
    return "native" if dtype is not None and native.usable(dtype) else "xla"
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
  return backend


def dequantize_kernel(t: NF4Tensor, dtype, backend: str) -> jax.Array:
  """Dequantizes with the Pallas kernel (``backend`` is ``"pallas"`` or ``"interpret"``)."""
  from pallas_kernels.nf4_dequantize import api
  return api.dequantize(t, dtype, interpret=backend == "interpret")


def _forward(x: jax.Array, w: NF4Tensor, backend: str) -> jax.Array:
  from pallas_kernels import nf4_matmul
  if backend in ("xla", "native"):  # decode, then XLA's dot
    return nf4_matmul.matmul_reference(x, w, decode=backend)
  return nf4_matmul.matmul(x, w, interpret=backend == "interpret")


def _input_grad(dy: jax.Array, w: NF4Tensor, backend: str) -> jax.Array:
  from pallas_kernels import nf4_matmul
  if backend in ("xla", "native"):
    return nf4_matmul.matmul_transposed_reference(dy, w, decode=backend)
  return nf4_matmul.matmul_transposed(dy, w, interpret=backend == "interpret")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x: jax.Array, w: NF4Tensor, backend: str) -> jax.Array:
  return _forward(x, w, backend)


def _matmul_fwd(x: jax.Array, w: NF4Tensor, backend: str):
  return _forward(x, w, backend), w  # residuals: the NF4 storage only


def _matmul_bwd(backend: str, w: NF4Tensor, dy: jax.Array):
  return _input_grad(dy, w, backend), None  # None: zero cotangents for every leaf of w


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def nf4_matmul(x: jax.Array, w: NF4Tensor, *, backend: str | None = None) -> jax.Array:
  """``x @ dequantize_nf4(w, x.dtype).T`` without a float copy of ``w`` kept for the backward.

  Args:
    x: bfloat16/float16/float32 activations ``[..., in]``.
    w: NF4 weight of shape ``[out, in]`` with ``in % w.block_size == 0`` (one tensor:
      map over stacked layers with ``jax.lax.scan`` or ``jax.vmap``).
    backend: ``"pallas"``, ``"native"``, ``"xla"`` or ``"interpret"``; None picks
      ``"pallas"`` on GPU and ``"xla"`` elsewhere.

  Returns:
    ``x.dtype[..., out]``, accumulated in float32. Differentiable in ``x``
    (``dx = dy @ dequantize_nf4(w)``); ``w`` gets zero cotangents.

  Raises:
    TypeError/ValueError: ``w`` is not a 2-D unstacked NF4Tensor with whole blocks
      per row, or ``x`` has the wrong last dimension or dtype (before any kernel runs).
  """
  from pallas_kernels.nf4_matmul import check_operands
  check_operands(x, w, "nf4_matmul")
  backend = resolve_backend(backend)
  return _matmul(x, w, backend)

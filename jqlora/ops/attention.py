"""``attention``: grouped-query softmax attention under a boolean mask, behind the backend registry.

Backends, in automatic order: ``"cudnn"`` (``jax.nn.dot_product_attention`` on cuDNN's
fused flash kernel, on a GPU; a call it cannot lower falls through) and ``"einsum"``
(the reference: float32 scores ``[B, KV, G, T, S]``, softmax, probabilities in the
activation dtype). Named only: ``"xla"`` (``jax.nn.dot_product_attention``'s XLA
implementation; on the CPU it measured no faster than the einsum). GQA never repeats
K/V: each of the ``KV`` heads serves ``G = H / KV`` query heads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jqlora.ops.registry import Implementation, Op

__all__ = ["ATTENTION", "attention", "attention_reference"]


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """The reference attention.

  Args:
    q: ``[B, T, H, Dh]`` queries (after RoPE).
    k, v: ``[B, S, KV, Dh]`` keys and values, ``H % KV == 0``.
    mask: bool ``[B, T, S]``, True where a query may attend to a key.

  Returns:
    ``q.dtype[B, T, H, Dh]``: scores and softmax in float32, scaled by ``Dh**-0.5``.
  """
  b, t, h, dh = q.shape
  kvh = k.shape[2]
  q = q.reshape(b, t, kvh, h // kvh, dh)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype),
                      preferred_element_type=jnp.float32) * (dh ** -0.5)
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  return jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(q.dtype)).reshape(b, t, h, dh)


def _dot_product_attention(implementation: str):
  def run(q, k, v, mask):
    try:
      return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype),
                                          mask=mask[:, None], implementation=implementation)
    except (ValueError, RuntimeError) as e:  # a layout, dtype or mask the kernel rejects
      raise NotImplementedError(f"jax.nn.dot_product_attention ({implementation}): {e}") from e
  return run


#: The op and its backends (see the module docstring).
ATTENTION = Op("attention", [
    Implementation("cudnn", _dot_product_attention("cudnn"),
                   preferred=lambda *args: jax.default_backend() == "gpu"),
    Implementation("einsum", attention_reference),
    Implementation("xla", _dot_product_attention("xla"), automatic=False),
])


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
              backend: str | tuple[str, ...] | None = None) -> jax.Array:
  """Softmax attention of ``q [B, T, H, Dh]`` over ``k, v [B, S, KV, Dh]`` where ``mask [B, T, S]``.

  Causal order, packed segments and padding are all in ``mask``. Returns
  ``q.dtype[B, T, H, Dh]``; ``backend`` as for ``jqlora.ops.registry``.
  """
  if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape or q.shape[2] % k.shape[2]:
    raise ValueError(f"attention: q must be [B, T, H, Dh] and k, v [B, S, KV, Dh] with H % KV == 0, "
                     f"got {q.shape}, {k.shape}, {v.shape}")
  return ATTENTION(q, k, v, mask, backend=backend)

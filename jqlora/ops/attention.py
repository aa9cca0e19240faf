"""``attention``: grouped-query softmax attention under a boolean mask, behind the backend registry.

Backends, in automatic order: ``"cudnn"`` (``jax.nn.dot_product_attention`` on cuDNN's
fused flash kernel, on a GPU; a call it cannot lower falls through), ``"blockwise"`` (below;
on the CPU when there is more than one block of keys, ``S > BLOCK``: SmolLM2-135M QLoRA at
1 x 2048 on the 2-core Xeon, ``benchmarks/profile_step.py``, measured 3.9x faster steps and
2.9x less XLA temporary memory than the einsum) and ``"einsum"``
(the reference: float32 scores ``[B, KV, G, T, S]``, softmax, probabilities in the
activation dtype). Named only: ``"xla"`` (``jax.nn.dot_product_attention``'s XLA
implementation; on the CPU it measured no faster than the einsum). ``"blockwise"``
(``attention_blockwise``): keys taken ``BLOCK`` at a time with an online softmax, and a
backward pass that recomputes each block's probabilities from the saved log-sum-exp, so
that neither pass holds more than ``[B, H, T, BLOCK]`` scores: memory O(T) per layer
instead of the einsum's O(T²). GQA never repeats K/V: each of the ``KV`` heads serves
``G = H / KV`` query heads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jqlora.ops.registry import Implementation, Op

__all__ = ["ATTENTION", "BLOCK", "attention", "attention_blockwise", "attention_reference"]

#: Keys per block of ``attention_blockwise``.
BLOCK = 512


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


def _blocks(k: jax.Array, v: jax.Array, mask: jax.Array, block: int):
  """Keys, values and mask split into ``n`` blocks of ``block`` keys along ``S`` (zero-padded):
  ``k, v [n, B, block, KV, Dh]``, ``mask [n, B, T, block]``, ``real [n, block]`` (not padding)."""
  s = k.shape[1]
  n = -(-s // block)
  pad = n * block - s
  split = lambda x, axis: jnp.moveaxis(
      jnp.pad(x, [(0, pad if i == axis else 0) for i in range(x.ndim)]).reshape(
          *x.shape[:axis], n, block, *x.shape[axis + 1:]), axis, 0)
  real = (jnp.arange(n * block) < s).reshape(n, block)
  return split(k, 1), split(v, 1), split(mask, 2), real


def _block_scores(q: jax.Array, k: jax.Array, mask: jax.Array, real: jax.Array, scale: float):
  """float32 scores ``[B, KV, G, T, block]`` of ``q [B, KV, G, T, Dh]`` against one key block,
  ``finfo.min`` where masked (as the reference) and ``-inf`` on padding (no weight at all)."""
  scores = jnp.einsum("bkgtd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  return jnp.where(real, scores, -jnp.inf)


def _blockwise_forward(q, k, v, mask, block):
  """``(out [B, KV, G, T, Dh], (m, l))`` of ``q [B, KV, G, T, Dh]``, float32: the softmax's running
  max and sum ``[B, KV, G, T]`` (kept apart: ``m + log(l)`` loses ``l`` when ``m`` is ``finfo.min``,
  a row that masks every key)."""
  scale = q.shape[-1] ** -0.5
  kb, vb, mb, real = _blocks(k, v, mask, block)

  def body(carry, xs):
    m, l, acc = carry
    kj, vj, mj, rj = xs
    scores = _block_scores(q, kj, mj, rj, scale)
    m_new = jnp.maximum(m, scores.max(-1))
    p = jnp.exp(scores - m_new[..., None])
    alpha = jnp.exp(m - m_new)
    acc = acc * alpha[..., None] + jnp.einsum("bkgts,bskd->bkgtd", p.astype(q.dtype), vj,
                                              preferred_element_type=jnp.float32)
    return (m_new, l * alpha + p.sum(-1), acc), None

  shape = q.shape[:-1]
  init = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros(q.shape, jnp.float32))
  (m, l, acc), _ = jax.lax.scan(body, init, (kb, vb, mb, real))
  return acc / l[..., None], (m, l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blockwise(q, k, v, mask, block):
  return _blockwise_forward(q, k, v, mask, block)[0]


def _blockwise_fwd(q, k, v, mask, block):
  out, stats = _blockwise_forward(q, k, v, mask, block)
  return out, (q, k, v, mask, out, stats)


def _blockwise_bwd(block, residuals, d_out):
  q, k, v, mask, out, (m, l) = residuals
  scale = q.shape[-1] ** -0.5
  kb, vb, mb, real = _blocks(k, v, mask, block)
  d_out = d_out.astype(jnp.float32)
  delta = jnp.sum(d_out * out, axis=-1)  # [B, KV, G, T]
  f32 = dict(preferred_element_type=jnp.float32)

  def body(dq, xs):
    kj, vj, mj, rj = xs
    p = jnp.exp(_block_scores(q, kj, mj, rj, scale) - m[..., None]) / l[..., None]
    dv = jnp.einsum("bkgts,bkgtd->bskd", p, d_out, **f32)
    dp = jnp.einsum("bkgtd,bskd->bkgts", d_out, vj.astype(jnp.float32), **f32)
    ds = jnp.where(mj[:, None, None] & rj, p * (dp - delta[..., None]), 0.0) * scale
    dq = dq + jnp.einsum("bkgts,bskd->bkgtd", ds, kj.astype(jnp.float32), **f32)
    dk = jnp.einsum("bkgts,bkgtd->bskd", ds, q.astype(jnp.float32), **f32)
    return dq, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(body, jnp.zeros(q.shape, jnp.float32), (kb, vb, mb, real))
  unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, *x.shape[3:])[:, :k.shape[1]]
  return (dq.astype(q.dtype), unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype), None)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def attention_blockwise(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                        block: int = BLOCK) -> jax.Array:
  """``attention_reference``'s result with at most ``block`` keys' scores alive at once.

  Args and returns as ``attention_reference``; ``block``: keys per block (``S`` is
  zero-padded to a multiple; padding gets no weight, even in a row that masks every key).
  Probabilities are accumulated in float32 (an online softmax); the gradient recomputes
  them block by block, so the residuals are ``q, k, v``, the output and the float32
  softmax max and sum ``[B, H, T]``.
  """
  b, t, h, dh = q.shape
  kvh = k.shape[2]
  qh = jnp.moveaxis(q.reshape(b, t, kvh, h // kvh, dh), 1, 3)  # [B, KV, G, T, Dh]
  out = _blockwise(qh, k.astype(q.dtype), v.astype(q.dtype), mask, min(block, k.shape[1]))
  return jnp.moveaxis(out, 3, 1).reshape(b, t, h, dh).astype(q.dtype)


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
    Implementation("blockwise", attention_blockwise,
                   preferred=lambda q, k, v, mask: jax.default_backend() == "cpu" and k.shape[1] > BLOCK),
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

"""``Llama``: the Llama family (Llama 2/3/3.1, Mistral, Qwen2, SmolLM2) as one NNX model.

GQA attention with RoPE (default, linear and llama3 scaling), RMSNorm, SwiGLU, a
causal mask that honours segment ids (packing) and an optional sliding window,
and a KV cache. The decoder layers are stored stacked (every Variable, NF4
storage included, has a leading layer axis) and run with ``jax.lax.scan``, so
compile time does not grow with depth.

Module paths mirror Hugging Face names: ``layers.self_attn.q_proj`` is
``model.layers.{i}.self_attn.q_proj``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from jqlora.models.config import LlamaConfig
from jqlora.models.layers import SELECTIVE_SAVES, Block, RMSNorm, rope_inv_freq
from jqlora.nn import Frozen, Linear, LoRALinear, axes
from jqlora.ops import matmul_wt

__all__ = ["KVCache", "Llama", "EMBED_AXES"]

#: Logical axes of the embedding table ``[vocab, hidden]`` (and of an untied LM head).
EMBED_AXES = ("vocab", "embed")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Keys and values of every layer for incremental decoding.

  Attributes:
    k, v: ``[layers, B, max_len, kv_heads, head_dim]`` in the compute dtype.
    segment_ids: int32 ``[B, max_len]`` segment id of each cached slot.
    index: int32 scalar, the number of slots filled.

  Writing past ``max_len`` raises ``ValueError`` (see ``check_room``) instead of
  overwriting the last slots.
  """

  k: jax.Array
  v: jax.Array
  segment_ids: jax.Array
  index: jax.Array

  @property
  def max_len(self) -> int:
    return self.segment_ids.shape[1]

  def check_room(self, t: int) -> None:
    """Raises ``ValueError`` unless ``t`` more tokens fit after ``index``.

    Checked at once when ``index`` is known (outside ``jax.jit``); under a trace
    the compiled computation raises when it runs (a ``jax.debug.callback``, which
    JAX reports as a ``JaxRuntimeError`` carrying this message).
    """
    def fail(index) -> None:
      raise ValueError(f"KV cache overrun: {t} new token(s) after the {int(index)} cached do not "
                       f"fit in max_len = {self.max_len}; make the cache longer (init_cache)")

    if t > self.max_len:
      fail(0)
    if not isinstance(self.index, jax.core.Tracer):
      if int(self.index) + t > self.max_len:
        fail(self.index)
      return
    jax.lax.cond(self.index + t > self.max_len, lambda: jax.debug.callback(fail, self.index),
                 lambda: None)


class Llama(nnx.Module):
  """A Llama-family causal LM with stacked, scanned decoder layers.

  Attributes:
    config: the ``LlamaConfig``.
    dtype: compute dtype (adapters stay float32).
    remat: what the backward pass recomputes. False (the default): nothing, XLA keeps
      every intermediate it needs; ``"selective"``: each layer keeps only its
      projections, attention output and mid-layer residual (``SELECTIVE_SAVES``) and
      recomputes its norms, RoPE, softmax, SwiGLU and adapter products, no frozen matmul
      (on a CPU both faster and about half the saved activations,
      ``benchmarks/profile_step.py``); True: the whole layer from its input (gradient
      checkpointing).
    loss_chunk_size: tokens per chunk of the training loss's LM head and
      cross-entropy (``jqlora.train_step`` never holds the whole ``[B, T, vocab]``
      logits), or None (the default) for the whole batch at once (see
      ``loss_chunking``). Chunking caps the logits at ``chunk x vocab`` floats: worth
      it for large vocabularies and long batches; on a small CPU batch it costs ~10 %.
    rngs: dropout keys for the stacked layers' adapters in training mode.
    hidden_sharding: where the hidden states ``[B, T, hidden]`` are held: at the
      embedding output and at each layer's output, ``with_sharding_constraint`` to it
      (when it divides ``B``), or None (the default: wherever XLA puts them).
      ``jqlora.parallel.shard_model`` sets it to ``B`` split over the mesh's batch
      axes, so a partitioned step keeps each device's rows and gathers a layer's NF4
      codes (FSDP) instead of splitting the activations' features like the weights.
  """

  def __init__(self, config: LlamaConfig, embed_tokens: jax.Array, layers: Block, norm: RMSNorm,
               lm_head: Linear | None, *, dtype=jnp.bfloat16, rngs: nnx.Rngs | None = None):
    self.config = config
    self.embed_tokens = Frozen(jnp.asarray(embed_tokens), **axes(EMBED_AXES))
    self.layers = layers
    self.norm = norm
    self.lm_head = lm_head
    self.dtype = jnp.dtype(dtype)
    self.remat = False
    self.loss_chunk_size: int | None = None
    self.hidden_sharding: NamedSharding | None = None
    self.rngs = rngs if rngs is not None else nnx.Rngs(dropout=0)

  # -- naming ---------------------------------------------------------------
  def module_names(self, path: tuple[str, ...]) -> list[str]:
    """Hugging Face module names of the (possibly stacked) module at ``path``, one per layer."""
    dotted = ".".join(str(p) for p in path)
    if path and path[0] == "layers":
      rest = dotted[len("layers."):]
      return [f"model.layers.{i}.{rest}" for i in range(self.config.num_hidden_layers)]
    if path and path[0] == "lm_head":
      return [dotted]
    return [f"model.{dotted}"]

  # -- forward ----------------------------------------------------------------
  def init_cache(self, batch_size: int, max_len: int) -> KVCache:
    """An empty cache for ``batch_size`` sequences of up to ``max_len`` tokens."""
    c = self.config
    shape = (c.num_hidden_layers, batch_size, max_len, c.num_key_value_heads, c.head_dim)
    return KVCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype),
                   jnp.zeros((batch_size, max_len), jnp.int32), jnp.zeros((), jnp.int32))

  def _needs_dropout(self) -> bool:
    return any(isinstance(m, LoRALinear) and not m.deterministic and m.dropout > 0
               for _, m in nnx.iter_graph(self.layers))

  def __call__(self, input_ids: jax.Array, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, cache: KVCache | None = None,
               return_hidden: bool = False):
    """Runs the model.

    Args:
      input_ids: int32 ``[B, T]``.
      positions: int32 ``[B, T]`` RoPE positions; default ``arange(T)`` (after the
        cached tokens when ``cache`` is given).
      segment_ids: int32 ``[B, T]``; tokens attend only within their segment.
      cache: a ``KVCache`` to read and extend (incremental decoding); ``ValueError``
        when the ``T`` tokens do not fit in it.
      return_hidden: return the final hidden states (after the final norm, in
        the compute dtype, ``[B, T, hidden]``) instead of the logits; ``logits``
        maps them to the logits.

    Returns:
      float32 logits ``[B, T, vocab]`` (or the hidden states), and the updated
      cache when ``cache`` is given.
    """
    c = self.config
    b, t = input_ids.shape
    if cache is not None:
      cache.check_room(t)
    start = jnp.zeros((), jnp.int32) if cache is None else cache.index
    if positions is None:
      positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    segment_ids = segment_ids.astype(jnp.int32)

    q_idx = start + jnp.arange(t)
    if cache is None:
      k_idx, k_seg = jnp.arange(t), segment_ids
    else:
      k_seg = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (0, start))
      k_idx = jnp.arange(k_seg.shape[1])
    mask = (k_idx[None, :] <= q_idx[:, None])[None] & (segment_ids[:, :, None] == k_seg[:, None, :])
    if c.sliding_window is not None:
      mask &= (q_idx[:, None] - k_idx[None, :] < c.sliding_window)[None]

    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(c))
    freqs = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(freqs).astype(self.dtype), jnp.sin(freqs).astype(self.dtype)

    x = self._hold(jnp.take(self.embed_tokens.get_value(), input_ids, axis=0).astype(self.dtype))
    graphdef, state = nnx.split(self.layers)
    keys = (jax.random.split(self.rngs.dropout(), c.num_hidden_layers)
            if self._needs_dropout() else None)

    def body(h, xs):
      layer_state, kv, key = xs
      layer = nnx.merge(graphdef, layer_state)
      h, kv = layer(h, cos, sin, mask, kv, start, key)
      return self._hold(h), kv if cache is not None else None

    if isinstance(self.remat, str):
      if self.remat != "selective":
        raise ValueError(f"Llama.remat must be False, True or 'selective', got {self.remat!r}")
      policy = jax.checkpoint_policies.save_only_these_names(*SELECTIVE_SAVES)
      body = jax.checkpoint(body, policy=policy)
    elif self.remat:
      body = jax.checkpoint(body)
    kvs = None if cache is None else (cache.k, cache.v)
    x, new_kv = jax.lax.scan(body, x, (state, kvs, keys))

    x = self.norm(x)
    out = x if return_hidden else self.logits(x)
    if cache is None:
      return out
    return out, KVCache(new_kv[0], new_kv[1], k_seg, start + t)

  def _hold(self, h: jax.Array) -> jax.Array:
    """``h [B, T, hidden]`` constrained to ``hidden_sharding``; as it is when that is None or
    does not divide ``h`` (a batch of one in generation)."""
    s = self.hidden_sharding
    if s is None:
      return h
    try:
      s.shard_shape(h.shape)
    except ValueError:
      return h
    return jax.lax.with_sharding_constraint(h, s)

  def loss_chunking(self) -> int | None:
    """Tokens per chunk for the training loss: ``loss_chunk_size``, or None (whole batch)
    when the LM head has an adapter with active dropout (its keys are drawn per call)."""
    head = self.lm_head
    if isinstance(head, LoRALinear) and not head.deterministic and head.dropout > 0:
      return None
    return self.loss_chunk_size

  def logits(self, hidden: jax.Array) -> jax.Array:
    """The LM head (tied to the embeddings or not): ``hidden [..., hidden]`` (after the
    final norm) -> float32 logits ``[..., vocab]``."""
    if self.lm_head is None:
      logits = matmul_wt(hidden, self.embed_tokens.get_value().astype(hidden.dtype))
    else:
      logits = self.lm_head(hidden)
    return logits.astype(jnp.float32)


"""The Llama family: Llama 2/3/3.1, Mistral, Qwen2 and SmolLM2 in one model.

GQA attention with RoPE (default, linear and llama3 scaling), RMSNorm, SwiGLU, a
causal mask that honours segment ids (packing) and an optional sliding window,
and a KV cache. The decoder layers are stored stacked (every Variable, NF4
storage included, has a leading layer axis) and run with ``jax.lax.scan``, so
compile time does not grow with depth.

Module paths mirror Hugging Face names: ``layers.self_attn.q_proj`` is
``model.layers.{i}.self_attn.q_proj``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jqlora import lora as lora_lib
from jqlora.io.source import DictSource, TensorSource
from jqlora.nf4 import NF4Tensor, quantize_nf4
from jqlora.nn import Frozen, Linear, LoRALinear, dense_weight

__all__ = ["LlamaConfig", "KVCache", "Llama", "build_model", "export_hf_state_dict",
           "SUPPORTED_MODEL_TYPES"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_ROPE_TYPES = ("default", "linear", "llama3")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM"}

#: (submodule, linear) of each decoder layer, in Hugging Face naming.
LINEARS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
           ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"),
           ("mlp", "down_proj"))
_NORMS = ("input_layernorm", "post_attention_layernorm")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyper-parameters of a Llama-family model (transformers' names).

  Attributes:
    rope_scaling: None, or ``{"rope_type": "linear", "factor": f}`` or
      ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
      "original_max_position_embeddings"}``.
    qkv_bias / o_bias / mlp_bias: which linears have a bias (Qwen2: qkv only).
    sliding_window: attend to at most this many previous tokens (Mistral), or None.
    hf: the original ``config.json`` dict, kept for ``to_hf``.
  """

  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: dict | None = None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  sliding_window: int | None = None
  hf: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"LlamaConfig: {name} must be a positive integer, got {value!r}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"LlamaConfig: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
          f"num_key_value_heads ({self.num_key_value_heads})")
    if self.head_dim % 2:
      raise ValueError(f"LlamaConfig: head_dim must be even for RoPE, got {self.head_dim}")

  @classmethod
  def from_hf(cls, cfg: dict[str, Any]) -> "LlamaConfig":
    """Reads a transformers ``config.json`` dict (rope settings old or new style).

    Raises:
      ValueError: unsupported ``model_type``, activation or RoPE type, or a missing key.
    """
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"unsupported model_type {model_type!r}: jqlora supports "
                       f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama 2/3/3.1, Mistral, Qwen2, "
                       "SmolLM2)")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"config.json: hidden_act {act!r} is not supported (only 'silu')")

    def need(key):
      if cfg.get(key) is None:
        raise ValueError(f"config.json: missing required key {key!r} for model_type {model_type!r}")
      return cfg[key]

    heads = int(need("num_attention_heads"))
    rope = dict(cfg.get("rope_parameters") or {})
    legacy = dict(cfg.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0
    scaling = rope or legacy
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if rope_type not in _ROPE_TYPES:
      raise ValueError(f"config.json: rope_type {rope_type!r} is not supported; jqlora supports "
                       f"{', '.join(_ROPE_TYPES)}")
    if model_type == "qwen2" and cfg.get("use_sliding_window"):
      raise ValueError("config.json: Qwen2 with use_sliding_window=True is not supported")
    sliding = cfg.get("sliding_window") if model_type == "mistral" else None
    attention_bias = bool(cfg.get("attention_bias", False))
    return cls(
        model_type=model_type,
        vocab_size=int(need("vocab_size")),
        hidden_size=int(need("hidden_size")),
        intermediate_size=int(need("intermediate_size")),
        num_hidden_layers=int(need("num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or need("hidden_size") // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6 if model_type == "qwen2" else 1e-5)),
        rope_theta=float(theta),
        rope_scaling=None if rope_type == "default" else {"rope_type": rope_type, **scaling},
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=attention_bias and model_type != "qwen2",
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        sliding_window=None if sliding is None else int(sliding),
        hf=dict(cfg),
    )

  def to_hf(self) -> dict[str, Any]:
    """A ``config.json`` dict that transformers loads (old and new rope keys both written)."""
    out = {k: v for k, v in copy.deepcopy(self.hf).items()
           if k not in ("rope_scaling", "rope_parameters")}
    rope = {"rope_type": "default", **(self.rope_scaling or {})}
    out.update(
        architectures=[_ARCHITECTURES[self.model_type]],
        model_type=self.model_type,
        vocab_size=self.vocab_size,
        hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size,
        num_hidden_layers=self.num_hidden_layers,
        num_attention_heads=self.num_attention_heads,
        num_key_value_heads=self.num_key_value_heads,
        head_dim=self.head_dim,
        hidden_act="silu",
        rms_norm_eps=self.rms_norm_eps,
        rope_theta=self.rope_theta,
        rope_scaling=None if self.rope_scaling is None else dict(self.rope_scaling),
        rope_parameters={**rope, "rope_theta": self.rope_theta},
        max_position_embeddings=self.max_position_embeddings,
        tie_word_embeddings=self.tie_word_embeddings,
    )
    if self.model_type == "llama":
      out.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
    if self.model_type == "mistral":
      out.update(sliding_window=self.sliding_window)
    return out

  def linear_shapes(self) -> dict[str, tuple[int, int]]:
    """``[out, in]`` of each decoder-layer linear, keyed ``"self_attn.q_proj"`` etc."""
    d, i, dh = self.hidden_size, self.intermediate_size, self.head_dim
    q, kv = self.num_attention_heads * dh, self.num_key_value_heads * dh
    return {"self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
            "self_attn.o_proj": (d, q), "mlp.gate_proj": (i, d), "mlp.up_proj": (i, d),
            "mlp.down_proj": (d, i)}

  def has_bias(self, linear: str) -> bool:
    """Whether the decoder-layer linear ``"self_attn.q_proj"`` etc. has a bias."""
    if linear.startswith("mlp."):
      return self.mlp_bias
    return self.o_bias if linear.endswith("o_proj") else self.qkv_bias


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """float32 ``[head_dim / 2]`` inverse frequencies, with linear or llama3 scaling."""
  dh = config.head_dim
  inv = 1.0 / (config.rope_theta ** (np.arange(0, dh, 2, dtype=np.int64).astype(np.float32) / dh))
  inv = inv.astype(np.float32)
  s = config.rope_scaling or {}
  if s.get("rope_type") == "linear":
    inv = inv / np.float32(s["factor"])
  elif s.get("rope_type") == "llama3":
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    inv = np.where(medium, smoothed, scaled).astype(np.float32)
  return inv


def _rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates ``x [B, T, heads, Dh]`` by ``cos``/``sin`` ``[B, T, Dh]`` (rotate-half layout)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Keys and values of every layer for incremental decoding.

  Attributes:
    k, v: ``[layers, B, max_len, kv_heads, head_dim]`` in the compute dtype.
    segment_ids: int32 ``[B, max_len]`` segment id of each cached slot.
    index: int32 scalar, the number of slots filled.
  """

  k: jax.Array
  v: jax.Array
  segment_ids: jax.Array
  index: jax.Array


class RMSNorm(nnx.Module):
  """``weight * x / sqrt(mean(x^2) + eps)``, statistics in float32."""

  def __init__(self, weight: jax.Array, eps: float):
    self.weight = Frozen(jnp.asarray(weight))
    self.eps = float(eps)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight.get_value().astype(x.dtype) * y.astype(x.dtype)


class Attention(nnx.Module):
  """Grouped-query attention with RoPE and an optional KV cache (one layer)."""

  def __init__(self, q_proj: Linear, k_proj: Linear, v_proj: Linear, o_proj: Linear, *,
               num_heads: int, num_kv_heads: int, head_dim: int):
    self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim

  def __call__(self, x, cos, sin, mask, kv=None, index=None, rngs=(None,) * 4):
    """Args: x ``[B, T, D]``; cos/sin ``[B, T, Dh]``; mask bool ``[B, T, S]``; kv cached
    ``(k, v)`` ``[B, S, KV, Dh]`` written at ``index``. Returns ``(out [B, T, D], (k, v))``."""
    b, t, _ = x.shape
    h, kvh, dh = self.num_heads, self.num_kv_heads, self.head_dim
    q = _rope(self.q_proj(x, rng=rngs[0]).reshape(b, t, h, dh), cos, sin)
    k = _rope(self.k_proj(x, rng=rngs[1]).reshape(b, t, kvh, dh), cos, sin)
    v = self.v_proj(x, rng=rngs[2]).reshape(b, t, kvh, dh)
    if kv is not None:
      k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, index, 0, 0))
      v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, index, 0, 0))
    q = q.reshape(b, t, kvh, h // kvh, dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype),
                        preferred_element_type=jnp.float32) * (dh ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(x.dtype)).reshape(b, t, h * dh)
    return self.o_proj(out, rng=rngs[3]), (k, v)


class MLP(nnx.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, gate_proj: Linear, up_proj: Linear, down_proj: Linear):
    self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

  def __call__(self, x, rngs=(None,) * 3):
    h = jax.nn.silu(self.gate_proj(x, rng=rngs[0])) * self.up_proj(x, rng=rngs[1])
    return self.down_proj(h, rng=rngs[2])


class Block(nnx.Module):
  """One pre-norm decoder layer (stored stacked; called on one layer's slice)."""

  def __init__(self, input_layernorm: RMSNorm, self_attn: Attention,
               post_attention_layernorm: RMSNorm, mlp: MLP):
    self.input_layernorm, self.self_attn = input_layernorm, self_attn
    self.post_attention_layernorm, self.mlp = post_attention_layernorm, mlp

  def __call__(self, x, cos, sin, mask, kv=None, index=None, rng=None):
    rngs = (None,) * 7 if rng is None else tuple(jax.random.split(rng, 7))
    attn, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, index, rngs[:4])
    x = x + attn
    return x + self.mlp(self.post_attention_layernorm(x), rngs[4:]), kv


class Llama(nnx.Module):
  """A Llama-family causal LM with stacked, scanned decoder layers.

  Attributes:
    config: the ``LlamaConfig``.
    dtype: compute dtype (adapters stay float32).
    remat: recompute each layer in the backward pass (gradient checkpointing).
    loss_chunk_size: tokens per chunk of the training loss's LM head and
      cross-entropy (``jqlora.train_step`` never holds the whole ``[B, T, vocab]``
      logits), or None (the default) for the whole batch at once (see
      ``loss_chunking``). Chunking caps the logits at ``chunk x vocab`` floats: worth
      it for large vocabularies and long batches; on a small CPU batch it costs ~10 %.
    rngs: dropout keys for the stacked layers' adapters in training mode.
  """

  def __init__(self, config: LlamaConfig, embed_tokens: jax.Array, layers: Block, norm: RMSNorm,
               lm_head: Linear | None, *, dtype=jnp.bfloat16, rngs: nnx.Rngs | None = None):
    self.config = config
    self.embed_tokens = Frozen(jnp.asarray(embed_tokens))
    self.layers = layers
    self.norm = norm
    self.lm_head = lm_head
    self.dtype = jnp.dtype(dtype)
    self.remat = False
    self.loss_chunk_size: int | None = None
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
      cache: a ``KVCache`` to read and extend (incremental decoding).
      return_hidden: return the final hidden states (after the final norm, in
        the compute dtype, ``[B, T, hidden]``) instead of the logits; ``logits``
        maps them to the logits.

    Returns:
      float32 logits ``[B, T, vocab]`` (or the hidden states), and the updated
      cache when ``cache`` is given.
    """
    c = self.config
    b, t = input_ids.shape
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

    x = jnp.take(self.embed_tokens.get_value(), input_ids, axis=0).astype(self.dtype)
    graphdef, state = nnx.split(self.layers)
    keys = (jax.random.split(self.rngs.dropout(), c.num_hidden_layers)
            if self._needs_dropout() else None)

    def body(h, xs):
      layer_state, kv, key = xs
      layer = nnx.merge(graphdef, layer_state)
      h, kv = layer(h, cos, sin, mask, kv, start, key)
      return h, kv if cache is not None else None

    if self.remat:
      body = jax.checkpoint(body)
    kvs = None if cache is None else (cache.k, cache.v)
    x, new_kv = jax.lax.scan(body, x, (state, kvs, keys))

    x = self.norm(x)
    out = x if return_hidden else self.logits(x)
    if cache is None:
      return out
    return out, KVCache(new_kv[0], new_kv[1], k_seg, start + t)

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
      logits = hidden @ self.embed_tokens.get_value().astype(hidden.dtype).T
    else:
      logits = self.lm_head(hidden)
    return logits.astype(jnp.float32)


# -- building from a checkpoint ------------------------------------------------

def _read(source: TensorSource, name: str, shape: tuple[int, ...]) -> np.ndarray:
  try:
    arr = source.get(name)
  except KeyError as e:
    raise KeyError(f"checkpoint is missing tensor {name!r} ({e.args[0] if e.args else ''})") \
        from None
  if tuple(arr.shape) != tuple(shape):
    raise ValueError(f"tensor {name!r} has shape {tuple(arr.shape)}, the config needs {shape}")
  if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.name != "bfloat16":
    raise ValueError(f"tensor {name!r} has dtype {arr.dtype}, expected a float dtype")
  return arr


_quantize = jax.jit(quantize_nf4, static_argnums=(1, 2))


def _linear_weight(source: TensorSource, name: str, shape: tuple[int, int], *, quantize: bool,
                   dtype, block_size: int, double_quant: bool) -> NF4Tensor | jax.Array:
  """One linear weight: stored NF4 as is, else read and quantized (or cast) right away."""
  nf4 = source.get_nf4(name)
  if nf4 is not None:
    if tuple(nf4.shape) != tuple(shape):
      raise ValueError(f"NF4 tensor {name!r} has shape {nf4.shape}, the config needs {shape}")
    return nf4
  arr = _read(source, name, shape)
  w = jnp.asarray(arr, dtype)
  if not quantize:
    return w
  if not bool(jnp.isfinite(w).all()):
    raise ValueError(f"tensor {name!r} has NaN or Inf values; refusing to quantize it")
  return _quantize(w, block_size, double_quant)


def _stack(items: list, name: str):
  """Stacks per-layer arrays or NF4Tensors along a new leading axis."""
  structs = {jax.tree.structure(x) for x in items}
  if len(structs) != 1:
    raise ValueError(f"{name}: layers are stored differently (e.g. NF4 in some layers, "
                     "float or another block size in others); cannot stack them")
  return jax.tree.map(lambda *xs: jnp.stack(xs), *items)


def build_model(config: LlamaConfig, source: TensorSource, *, quantize: bool = True,
                dtype=jnp.bfloat16, block_size: int = 64, double_quant: bool = True,
                progress: bool = True) -> Llama:
  """Builds a ``Llama`` from Hugging Face–named tensors, one tensor at a time.

  Args:
    config: the model's config.
    source: the checkpoint; stored NF4 weights (``get_nf4``) are used as they are.
    quantize: quantize float linear weights to NF4 as they are read (else keep
      them in ``dtype``). Embeddings, norms, biases and the LM head stay float.
    dtype: compute dtype and dtype of the float base weights.
    block_size, double_quant: NF4 settings for weights quantized here.
    progress: show a tqdm progress bar.

  Returns:
    The model, deterministic (eval mode), without adapters.

  Raises:
    KeyError: a tensor is missing (named).
    ValueError: a tensor has the wrong shape or non-finite values.
  """
  c = config
  d, n = c.hidden_size, c.num_hidden_layers
  shapes = c.linear_shapes()
  bar = tqdm(total=n + 2, desc="loading", unit="layer", disable=not progress)
  embed = jnp.asarray(_read(source, "model.embed_tokens.weight", (c.vocab_size, d)), dtype)
  bar.update()

  weights = {k: [] for k in shapes}
  biases = {k: [] for k in shapes if c.has_bias(k)}
  norms = {k: [] for k in _NORMS}
  for i in range(n):
    prefix = f"model.layers.{i}."
    for key, shape in shapes.items():
      weights[key].append(_linear_weight(
          source, f"{prefix}{key}.weight", shape, quantize=quantize, dtype=dtype,
          block_size=block_size, double_quant=double_quant))
      if key in biases:
        biases[key].append(jnp.asarray(_read(source, f"{prefix}{key}.bias", shape[:1]), dtype))
    for key in _NORMS:
      norms[key].append(jnp.asarray(_read(source, f"{prefix}{key}.weight", (d,)), dtype))
    bar.update()

  def linear(key: str) -> Linear:
    w = _stack(weights.pop(key), f"model.layers.*.{key}.weight")
    bias = _stack(biases.pop(key), f"model.layers.*.{key}.bias") if key in biases else None
    return Linear(w, bias)

  attn = Attention(linear("self_attn.q_proj"), linear("self_attn.k_proj"),
                   linear("self_attn.v_proj"), linear("self_attn.o_proj"),
                   num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
                   head_dim=c.head_dim)
  mlp = MLP(linear("mlp.gate_proj"), linear("mlp.up_proj"), linear("mlp.down_proj"))
  layers = Block(RMSNorm(_stack(norms["input_layernorm"], "input_layernorm"), c.rms_norm_eps), attn,
                 RMSNorm(_stack(norms["post_attention_layernorm"], "post_attention_layernorm"),
                         c.rms_norm_eps), mlp)
  norm = RMSNorm(jnp.asarray(_read(source, "model.norm.weight", (d,)), dtype), c.rms_norm_eps)
  lm_head = None
  if not c.tie_word_embeddings:
    lm_head = Linear(jnp.asarray(_read(source, "lm_head.weight", (c.vocab_size, d)), dtype))
  bar.update()
  bar.close()
  return Llama(c, embed, layers, norm, lm_head, dtype=dtype)


def random_source(config: LlamaConfig, *, std: float = 0.02, seed: int = 0) -> DictSource:
  """Random float32 checkpoint tensors for ``config`` (tests, benchmarks, memory plans).

  Weights and biases are normal with standard deviation ``std``; norms are ones.
  The LM head is omitted when the embeddings are tied.

  Returns:
    A ``DictSource`` with Hugging Face tensor names, ready for ``build_model``.
  """
  c = config
  rng = np.random.default_rng(seed)
  normal = lambda *shape: (std * rng.standard_normal(shape)).astype(np.float32)
  d = c.hidden_size
  tensors = {"model.embed_tokens.weight": normal(c.vocab_size, d),
             "model.norm.weight": np.ones(d, np.float32)}
  if not c.tie_word_embeddings:
    tensors["lm_head.weight"] = normal(c.vocab_size, d)
  for i in range(c.num_hidden_layers):
    for key, shape in c.linear_shapes().items():
      tensors[f"model.layers.{i}.{key}.weight"] = normal(*shape)
      if c.has_bias(key):
        tensors[f"model.layers.{i}.{key}.bias"] = normal(shape[0])
    for key in _NORMS:
      tensors[f"model.layers.{i}.{key}.weight"] = np.ones(d, np.float32)
  return DictSource(c.to_hf(), tensors)


# -- merged export ---------------------------------------------------------------

@jax.jit
def _merge(w, a, b, scale, magnitude):
  """float32 dense ``w`` with its adapter folded in (``a``/``b`` None: no adapter)."""
  w = dense_weight(w, jnp.float32)
  if a is None:
    return w
  return lora_lib.merged_weight(w, a, b, scale, magnitude)


def _merged_weight(lin: Linear, index: int | None, dtype) -> np.ndarray:
  """Layer ``index`` of ``lin`` as a ``[out, in]`` weight with its adapter merged in."""
  pick = (lambda x: x) if index is None else (lambda x: jax.tree.map(lambda l: l[index], x))
  a = b = scale = magnitude = None
  if isinstance(lin, LoRALinear) and not lin.merged:
    a, b = pick(lin.lora_a.get_value()), pick(lin.lora_b.get_value())
    scale = pick(lin.scale.get_value())
    if lin.use_dora:
      magnitude = pick(lin.lora_magnitude.get_value())
  return np.asarray(_merge(pick(lin.weight.get_value()), a, b, scale, magnitude)).astype(dtype)


def export_hf_state_dict(model: Llama, dtype=np.float32) -> Iterator[tuple[str, np.ndarray]]:
  """Hugging Face–named full-precision tensors with every adapter merged in.

  NF4 weights are dequantized (never re-quantized); yields one tensor at a time,
  so a writer can stream them to disk. Pair with ``model.config.to_hf()``.

  Args:
    model: a ``Llama``, with or without adapters.
    dtype: numpy dtype of the yielded tensors.

  Yields:
    ``(name, array)`` such as ``("model.layers.0.self_attn.q_proj.weight", [out, in])``.
  """
  as_np = lambda x: np.asarray(jnp.asarray(x, jnp.float32)).astype(dtype)
  yield "model.embed_tokens.weight", as_np(model.embed_tokens.get_value())
  layers = model.layers
  for i in range(model.config.num_hidden_layers):
    prefix = f"model.layers.{i}."
    for sub, name in LINEARS:
      lin = getattr(getattr(layers, sub), name)
      yield f"{prefix}{sub}.{name}.weight", _merged_weight(lin, i, dtype)
      if lin.bias is not None:
        yield f"{prefix}{sub}.{name}.bias", as_np(lin.bias.get_value()[i])
    for name in _NORMS:
      yield f"{prefix}{name}.weight", as_np(getattr(layers, name).weight.get_value()[i])
  yield "model.norm.weight", as_np(model.norm.weight.get_value())
  if model.lm_head is not None:
    yield "lm_head.weight", _merged_weight(model.lm_head, None, dtype)

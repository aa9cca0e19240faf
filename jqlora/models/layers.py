"""The layers of a Llama-family decoder: RoPE, RMSNorm, grouped-query attention, SwiGLU, a block.

Module paths mirror Hugging Face names (``self_attn.q_proj``); a ``Block`` is
stored stacked (every Variable has a leading layer axis) and called on one
layer's slice inside a scan.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jqlora.models.config import LlamaConfig
from jqlora.nn import Frozen, Linear
from jqlora.ops import attention

__all__ = ["rope_inv_freq", "rope", "RMSNorm", "Attention", "MLP", "Block", "SELECTIVE_SAVES"]

#: ``jax.ad_checkpoint.checkpoint_name`` tags a layer puts on the values that selective
#: checkpointing (``Llama.remat = "selective"``) keeps for the backward pass: every projection
#: whose output a nonlinear op reads (q, k, v, gate, up), the attention output and the residual
#: stream between attention and MLP. Norms, RoPE, the softmax, SwiGLU and the adapters' rank-r
#: products are recomputed from them; no frozen matmul is.
SELECTIVE_SAVES = ("q_proj", "k_proj", "v_proj", "attention", "attention_residual", "gate_proj",
                   "up_proj")


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


def rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates ``x [B, T, heads, Dh]`` by ``cos``/``sin`` ``[B, T, Dh]`` (rotate-half layout)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]



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
  """Grouped-query attention with RoPE and an optional KV cache (one layer); the softmax
  attention itself is ``jqlora.ops.attention`` (cuDNN's flash kernel on a GPU)."""

  def __init__(self, q_proj: Linear, k_proj: Linear, v_proj: Linear, o_proj: Linear, *,
               num_heads: int, num_kv_heads: int, head_dim: int):
    self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim

  def __call__(self, x, cos, sin, mask, kv=None, index=None, rngs=(None,) * 4):
    """Args: x ``[B, T, D]``; cos/sin ``[B, T, Dh]``; mask bool ``[B, T, S]``; kv cached
    ``(k, v)`` ``[B, S, KV, Dh]`` written at ``index``. Returns ``(out [B, T, D], (k, v))``."""
    b, t, _ = x.shape
    h, kvh, dh = self.num_heads, self.num_kv_heads, self.head_dim
    q = rope(checkpoint_name(self.q_proj(x, rng=rngs[0]), "q_proj").reshape(b, t, h, dh), cos, sin)
    k = rope(checkpoint_name(self.k_proj(x, rng=rngs[1]), "k_proj").reshape(b, t, kvh, dh), cos,
             sin)
    v = checkpoint_name(self.v_proj(x, rng=rngs[2]), "v_proj").reshape(b, t, kvh, dh)
    if kv is not None:
      k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, index, 0, 0))
      v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, index, 0, 0))
    out = checkpoint_name(attention(q.astype(x.dtype), k, v, mask).reshape(b, t, h * dh),
                          "attention")
    return self.o_proj(out, rng=rngs[3]), (k, v)


class MLP(nnx.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, gate_proj: Linear, up_proj: Linear, down_proj: Linear):
    self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

  def __call__(self, x, rngs=(None,) * 3):
    gate = checkpoint_name(self.gate_proj(x, rng=rngs[0]), "gate_proj")
    h = jax.nn.silu(gate) * checkpoint_name(self.up_proj(x, rng=rngs[1]), "up_proj")
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
    x = checkpoint_name(x + attn, "attention_residual")
    return x + self.mlp(self.post_attention_layernorm(x), rngs[4:]), kv


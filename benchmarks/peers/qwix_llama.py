"""The qwix peer stack: a plain Flax NNX Llama that qwix's ``LoraProvider`` wraps.

qwix (Google's JAX quantization library, tunix's LoRA/QLoRA) works by
intercepting ``jax.lax.dot_general`` / ``jnp.einsum`` inside a Flax module's
``__call__`` and matching the calling module's path against its rules. It
cannot wrap jqlora's model: jqlora's frozen linears hold NF4 tensors of its own
and its layers are stacked under one ``nnx.scan`` (qwix finds a weight by
looking the operand up among the calling module's attributes, and a scanned
slice is not one). So this file is the model a JAX user would hand to qwix: one
``nnx.Linear`` (``use_bias=False``) per projection, in Hugging Face's names
(``layers/<i>/self_attn/q_proj`` ...), a Python loop over layers, float32
statistics for the norms, softmax and loss, the same SmolLM2/Llama maths as
transformers' ``LlamaForCausalLM`` (RoPE rotate-half, grouped-query attention,
SwiGLU, tied or separate LM head).

qwix's NF4 (``weight_qtype="nf4"``, ``tile_size=64``): absmax scale per block of
64 inputs of one output (the same blocks as bitsandbytes' block 64 over the
row-major ``[out, in]`` weight), codes by nearest NF4 level, scale kept in the
weight's float dtype -- no double quantization of the block scales (bitsandbytes
stores them as 8-bit codes with a float32 scale per 256 blocks). The weights
are quantized by qwix at wrap time from the float checkpoint, so its step-1
loss differs from the bitsandbytes checkpoint's by the scales' quantization.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jqlora.models.config import LlamaConfig
from jqlora.models.layers import rope_inv_freq

__all__ = ["LINEAR_PATTERN", "Llama", "load", "loss_fn", "set_adapter"]

#: qwix ``module_path`` regex of the seven decoder linears (``target_modules="all-linear"``).
LINEAR_PATTERN = r"layers/\d+/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"


def _linear(w: np.ndarray, dtype) -> nnx.Linear:
  """``nnx.Linear`` holding the Hugging Face weight ``[out, in]`` as its kernel ``[in, out]``."""
  out_f, in_f = w.shape
  lin = nnx.Linear(in_f, out_f, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
  lin.kernel.set_value(jnp.asarray(w.T, dtype))
  return lin


class _Norm(nnx.Module):
  def __init__(self, w: np.ndarray, eps: float, dtype):
    self.weight = nnx.Param(jnp.asarray(w, dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight[...] * x32.astype(x.dtype)


class _Attention(nnx.Module):
  def __init__(self, get, p: str, c: LlamaConfig, dtype):
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
      setattr(self, name, _linear(get(f"{p}.{name}.weight"), dtype))
    self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.kv_heads, self.head_dim)

    def rope(y):
      half = self.head_dim // 2
      rotated = jnp.concatenate([-y[..., half:], y[..., :half]], axis=-1)
      return y * cos[None, :, None, :] + rotated * sin[None, :, None, :]

    q, k = rope(q), rope(k)
    group = self.heads // self.kv_heads
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(self.head_dim)
    causal = jnp.tril(jnp.ones((t, t), bool))
    probs = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1).astype(x.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, self.heads * self.head_dim)
    return self.o_proj(out)


class _MLP(nnx.Module):
  def __init__(self, get, p: str, dtype):
    for name in ("gate_proj", "up_proj", "down_proj"):
      setattr(self, name, _linear(get(f"{p}.{name}.weight"), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class _Block(nnx.Module):
  def __init__(self, get, i: int, c: LlamaConfig, dtype):
    p = f"model.layers.{i}"
    self.input_layernorm = _Norm(get(f"{p}.input_layernorm.weight"), c.rms_norm_eps, dtype)
    self.self_attn = _Attention(get, f"{p}.self_attn", c, dtype)
    self.post_attention_layernorm = _Norm(get(f"{p}.post_attention_layernorm.weight"),
                                          c.rms_norm_eps, dtype)
    self.mlp = _MLP(get, f"{p}.mlp", dtype)

  def __call__(self, x, cos, sin):
    x = x + self.self_attn(self.input_layernorm(x), cos, sin)
    return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nnx.Module):
  """Llama causal LM: ``int32 ids [B, T] -> logits [B, T, vocab]`` in ``dtype``."""

  def __init__(self, get, c: LlamaConfig, dtype=jnp.float32, remat: bool = False):
    self.config = c
    self.embed_tokens = nnx.Param(jnp.asarray(get("model.embed_tokens.weight"), dtype))
    self.layers = nnx.List([_Block(get, i, c, dtype) for i in range(c.num_hidden_layers)])
    self.norm = _Norm(get("model.norm.weight"), c.rms_norm_eps, dtype)
    self.lm_head = None if c.tie_word_embeddings else nnx.Param(
        jnp.asarray(get("lm_head.weight"), dtype))
    self.inv_freq = nnx.Variable(jnp.asarray(rope_inv_freq(c)))
    self.remat = remat

  def __call__(self, ids: jax.Array) -> jax.Array:
    x = jnp.take(self.embed_tokens[...], ids, axis=0)
    angles = jnp.arange(ids.shape[1], dtype=jnp.float32)[:, None] * self.inv_freq[...][None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    for block in self.layers:
      x = nnx.remat(lambda blk, y: blk(y, cos, sin))(block, x) if self.remat else block(x, cos, sin)
    head = self.embed_tokens if self.lm_head is None else self.lm_head
    return jnp.einsum("btd,vd->btv", self.norm(x), head[...])


def loss_fn(logits: jax.Array, ids: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy, float32 (transformers' ``labels=input_ids`` loss)."""
  logits = logits[:, :-1].astype(jnp.float32)
  targets = ids[:, 1:]
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.mean(logz - picked)


def load(path: str | pathlib.Path, dtype=jnp.float32, remat: bool = False) -> Llama:
  """The float model from a Hugging Face safetensors folder (any dtype, sharded or not)."""
  from jqlora.io.loading import open_source

  folder = pathlib.Path(path)
  config = LlamaConfig.from_hf(json.loads((folder / "config.json").read_text()))
  source = open_source(str(folder))
  return Llama(lambda k: np.asarray(source.get(k), np.float32), config, dtype, remat)


def set_adapter(model: nnx.Module, adapter_dir: str | pathlib.Path) -> int:
  """Copies a PEFT adapter (``lora_A [r, in]``, ``lora_B [out, r]``) into qwix's ``kernel_lora_a
  [in, r]`` / ``kernel_lora_b [r, out]``; returns the number of adapted linears."""
  from safetensors.numpy import load_file

  tensors = load_file(pathlib.Path(adapter_dir) / "adapter_model.safetensors")
  n = 0
  for key, a in tensors.items():
    if not key.endswith("lora_A.weight"):
      continue
    b = tensors[key.replace("lora_A", "lora_B")]
    path = key.split("model.layers.", 1)[1].removesuffix(".lora_A.weight").split(".")
    module = model.layers[int(path[0])]
    for part in path[1:]:
      module = getattr(module, part)
    module.kernel_lora_a.set_value(jnp.asarray(a.T, module.kernel_lora_a.get_value().dtype))
    module.kernel_lora_b.set_value(jnp.asarray(b.T, module.kernel_lora_b.get_value().dtype))
    n += 1
  return n

"""``build_model``: a ``Llama`` from Hugging Face–named tensors, read and quantized one at a time.

Each decoder-layer linear gets its logical axes (``LINEAR_AXES``) where it is
made, so the model shards by its Variables' metadata (``jqlora.parallel``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jqlora.format import NF4Tensor, quantize_nf4
from jqlora.models.config import LINEAR_AXES, NORMS, LlamaConfig
from jqlora.models.layers import MLP, Attention, Block, RMSNorm
from jqlora.models.llama import EMBED_AXES, Llama
from jqlora.models.source import TensorSource
from jqlora.nn import Linear

__all__ = ["build_model"]


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
  norms = {k: [] for k in NORMS}
  for i in range(n):
    prefix = f"model.layers.{i}."
    for key, shape in shapes.items():
      weights[key].append(_linear_weight(
          source, f"{prefix}{key}.weight", shape, quantize=quantize, dtype=dtype,
          block_size=block_size, double_quant=double_quant))
      if key in biases:
        biases[key].append(jnp.asarray(_read(source, f"{prefix}{key}.bias", shape[:1]), dtype))
    for key in NORMS:
      norms[key].append(jnp.asarray(_read(source, f"{prefix}{key}.weight", (d,)), dtype))
    bar.update()

  def linear(key: str) -> Linear:
    w = _stack(weights.pop(key), f"model.layers.*.{key}.weight")
    bias = _stack(biases.pop(key), f"model.layers.*.{key}.bias") if key in biases else None
    return Linear(w, bias, axes=LINEAR_AXES[key])

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
    lm_head = Linear(jnp.asarray(_read(source, "lm_head.weight", (c.vocab_size, d)), dtype),
                     axes=EMBED_AXES)
  bar.update()
  bar.close()
  return Llama(c, embed, layers, norm, lm_head, dtype=dtype)


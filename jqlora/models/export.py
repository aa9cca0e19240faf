"""``export_hf_state_dict``: a model's Hugging Face tensors with every adapter merged in."""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jqlora.models.config import LINEARS, NORMS
from jqlora.models.llama import Llama
from jqlora.nn import Linear, LoRALinear, dense_weight
from jqlora.nn import lora as lora_lib

__all__ = ["export_hf_state_dict"]


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
    for name in NORMS:
      yield f"{prefix}{name}.weight", as_np(getattr(layers, name).weight.get_value()[i])
  yield "model.norm.weight", as_np(model.norm.weight.get_value())
  if model.lm_head is not None:
    yield "lm_head.weight", _merged_weight(model.lm_head, None, dtype)

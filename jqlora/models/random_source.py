"""``random_source``: a random float32 checkpoint for a config (tests, benchmarks, memory plans)."""

from __future__ import annotations

import numpy as np

from jqlora.models.config import NORMS, LlamaConfig
from jqlora.models.source import DictSource

__all__ = ["random_source"]


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
    for key in NORMS:
      tensors[f"model.layers.{i}.{key}.weight"] = np.ones(d, np.float32)
  return DictSource(c.to_hf(), tensors)

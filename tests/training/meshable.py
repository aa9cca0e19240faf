"""A tiny Llama checkpoint whose every sharded dimension splits over a (2, 2, 2) mesh."""

from __future__ import annotations

import json
import pathlib

import numpy as np

#: HF config: 2 layers, 64-input blocks that split in two along every axis.
CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128,
              hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=32,
              max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2)


def write_meshable_model(out: pathlib.Path, seed: int = 0, tokenizer: bool = True) -> pathlib.Path:
  """Writes ``config.json``, ``model.safetensors`` (random float32) and the char tokenizer."""
  from safetensors.numpy import save_file

  out.mkdir(parents=True, exist_ok=True)
  c = CONFIG
  d, v, i = c["hidden_size"], c["vocab_size"], c["intermediate_size"]
  q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
  rng = np.random.default_rng(seed)
  normal = lambda *shape: (0.05 * rng.normal(size=shape)).astype(np.float32)
  tensors = {"model.embed_tokens.weight": normal(v, d), "model.norm.weight": np.ones(d, np.float32),
             "lm_head.weight": normal(v, d)}
  shapes = {"self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
            "self_attn.o_proj": (d, q), "mlp.gate_proj": (i, d), "mlp.up_proj": (i, d),
            "mlp.down_proj": (d, i)}
  for layer in range(c["num_hidden_layers"]):
    for name, shape in shapes.items():
      tensors[f"model.layers.{layer}.{name}.weight"] = normal(*shape)
    for name in ("input_layernorm", "post_attention_layernorm"):
      tensors[f"model.layers.{layer}.{name}.weight"] = np.ones(d, np.float32)
  save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
  (out / "config.json").write_text(json.dumps(c))
  if tokenizer:
    from .toy import char_tokenizer

    char_tokenizer().save_pretrained(out)
  return out

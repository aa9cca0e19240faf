"""A tiny NNX language model with the jqlora model contract, for training tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class ToyLM(nnx.Module):
  """Embedding -> one causal, segment-aware attention mix -> LoRA linear -> frozen head."""

  def __init__(self, vocab: int = 32, dim: int = 16, max_len: int = 64, r: int = 4,
               dropout: float = 0.0, *, rngs: nnx.Rngs):
    self.embed = nnx.Variable(jax.random.normal(rngs.params(), (vocab, dim)))
    self.pos = nnx.Variable(0.1 * jax.random.normal(rngs.params(), (max_len, dim)))
    self.proj = nnx.Variable(jax.random.normal(rngs.params(), (dim, dim)) / dim**0.5)
    self.head = nnx.Variable(jax.random.normal(rngs.params(), (dim, vocab)) / dim**0.5)
    self.lora_a = nnx.LoRAParam(jax.random.normal(rngs.params(), (dim, r)) / dim**0.5)
    self.lora_b = nnx.LoRAParam(0.1 * jax.random.normal(rngs.params(), (r, dim)))
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, input_ids, *, positions=None, segment_ids=None, cache=None):
    b, t = input_ids.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    h = self.embed[...][input_ids] + self.pos[...][positions]
    mask = (jnp.tril(jnp.ones((t, t), bool))[None]
            & (segment_ids[:, :, None] == segment_ids[:, None, :]))
    scores = jnp.where(mask, jnp.einsum("bqd,bkd->bqk", h, h) / h.shape[-1]**0.5, -1e9)
    ctx = jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(scores, axis=-1), h)
    out = ctx @ self.proj[...] + self.dropout(ctx) @ self.lora_a[...] @ self.lora_b[...]
    return (jnp.tanh(out) + h) @ self.head[...]


def toy_batch(key, shape=(4, 12), vocab: int = 32) -> dict[str, jax.Array]:
  """Random ids with a random half of the labels ignored."""
  k1, k2 = jax.random.split(key)
  ids = jax.random.randint(k1, shape, 0, vocab, dtype=jnp.int32)
  labels = jnp.where(jax.random.bernoulli(k2, 0.5, shape), ids, -100)
  return {"input_ids": ids, "labels": labels}


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def char_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
  """A character-level transformers tokenizer (ids < 128) with a ChatML-like template."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  specials = ["<unk>", "<s>", "<|im_end|>", "<|im_start|>"]
  vocab = {t: i for i, t in enumerate(specials)}
  for c in map(chr, range(32, 127)):
    vocab[c] = len(vocab)
  vocab["\n"] = len(vocab)
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
  tok.decoder = decoders.Fuse()
  out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                eos_token="<|im_end|>", pad_token="<|im_end|>",
                                additional_special_tokens=["<|im_start|>"])
  out.chat_template = chat_template
  return out


def tiny_model_dir(data_dir, tmp_path):
  """tests/data/hf/tiny-llama/base plus the char tokenizer, in a temporary folder."""
  import shutil

  out = tmp_path / "tiny-llama"
  shutil.copytree(data_dir / "hf" / "tiny-llama" / "base", out)
  char_tokenizer().save_pretrained(out)
  return out


def write_reverse_task(path, n: int, seed: int = 0) -> None:
  """Alpaca records: reverse a 3-letter word (a task a tiny model learns a little)."""
  import json
  import random

  rng = random.Random(seed)
  with open(path, "w") as f:
    for _ in range(n):
      word = "".join(rng.choice("abcdef") for _ in range(3))
      f.write(json.dumps({"instruction": "rev", "input": word, "output": word[::-1]}) + "\n")

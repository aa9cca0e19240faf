"""``jqlora plan`` against the measured peak of the compiled training step, for a few model sizes.

For each size, with and without per-layer activation checkpointing, compares
``plan(...).total`` (bytes per device) with the peak XLA assigns to the real
jitted ``jqlora.train_step`` (``jqlora.plan.measure``: arguments + outputs -
donated + temporaries) on this backend in float32, NF4 base, LoRA r=8 on all
linears. Target: within 10 %. Prints a table and writes
``benchmarks/results/bench_plan.json``.

Usage: python benchmarks/bench_plan.py
"""

from __future__ import annotations

import json
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
from flax import nnx

import jqlora
from jqlora.models import LlamaConfig, build_model, random_source
from jqlora.plan import measure, plan

RESULTS = pathlib.Path(__file__).parent / "results" / "bench_plan.json"
TARGET = 0.10

#: name (parameters) -> (HF config fields, batch, seq); shapes unlike the grid that fixed
#: plan's activation coefficients
SIZES = {
    "11M": (dict(vocab_size=1536, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                 num_attention_heads=6, num_key_value_heads=2, head_dim=64), 3, 96),
    "20M": (dict(vocab_size=3072, hidden_size=512, intermediate_size=1536, num_hidden_layers=5,
                 num_attention_heads=4, num_key_value_heads=4, head_dim=128), 2, 160),
    "63M": (dict(vocab_size=8192, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                 num_attention_heads=12, num_key_value_heads=4, head_dim=64), 2, 256),
}


def random_model(fields: dict, r: int = 8) -> nnx.Module:
  """A random float32 Llama of ``fields`` with an NF4 base and LoRA on every linear."""
  config = dict(model_type="llama", tie_word_embeddings=False, **fields)
  c = LlamaConfig.from_hf(config)
  model = build_model(c, random_source(c), dtype=jnp.float32, progress=False)
  jqlora.apply_lora(model, jqlora.LoraConfig(r=r), rngs=nnx.Rngs(0))
  return model


def main() -> None:
  rows = []
  for name, (fields, batch, seq) in SIZES.items():
    model = random_model(fields)
    c = model.config
    params = (c.num_hidden_layers * sum(o * i for o, i in c.linear_shapes().values())
              + 2 * c.vocab_size * c.hidden_size)  # linears, embeddings and head
    for checkpointing in (False, True):
      model.remat = checkpointing
      start = time.perf_counter()
      measured = measure(model, batch=batch, seq=seq)
      seconds = time.perf_counter() - start
      p = plan(dict(model_type="llama", tie_word_embeddings=False, **fields), batch=batch,
               seq=seq, lora_r=8, checkpointing=checkpointing, dtype="float32")
      rows.append({"size": name, "params": int(params), "batch": batch, "seq": seq,
                   "checkpointing": checkpointing, "plan_bytes": p.total,
                   "measured_bytes": measured, "error": p.total / measured - 1,
                   "activations_plan_bytes": p.activations, "compile_s": seconds})
  print(f"{'size':>5} {'batch x seq':>11} {'remat':>5} {'plan MiB':>9} {'measured MiB':>12} "
        f"{'error':>7}")
  for r in rows:
    print(f"{r['size']:>5} {r['batch']:>5} x {r['seq']:<4} {str(r['checkpointing']):>5} "
          f"{r['plan_bytes'] / 2**20:9.1f} {r['measured_bytes'] / 2**20:12.1f} "
          f"{r['error']:+7.1%}")
  worst = max(abs(r["error"]) for r in rows)
  print(f"worst error {worst:.1%} (target within {TARGET:.0%})")
  RESULTS.parent.mkdir(exist_ok=True)
  RESULTS.write_text(json.dumps({
      "benchmark": "jqlora plan vs XLA's measured peak of the compiled train_step "
                   "(float32, NF4 base, LoRA r=8 on all linears)",
      "rows": rows, "worst_error": worst, "target": TARGET, "passed": worst <= TARGET,
      "backend": jax.default_backend(), "jax": jax.__version__, "machine": platform.machine(),
  }, indent=2) + "\n")
  print(f"wrote {RESULTS}")


if __name__ == "__main__":
  main()

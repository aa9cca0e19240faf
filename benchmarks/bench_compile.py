"""Compile time vs depth: a 30-layer tiny QLoRA Llama against a 2-layer one.

The decoder layers are stacked and scanned, so compile time should not grow
with depth (target: 30 layers < 2x the 2-layer time). Measures ``jit`` lowering +
compilation of the forward pass and of a LoRA gradient step, prints a table and
writes ``benchmarks/results/bench_compile.json``.

Usage: python benchmarks/bench_compile.py [--hidden 128] [--layers 2 30]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jqlora
from jqlora.models import DictSource, LlamaConfig, build_model

RESULTS = pathlib.Path(__file__).parent / "results" / "bench_compile.json"


def random_source(layers: int, hidden: int) -> DictSource:
  """A random Llama checkpoint with ``layers`` decoder layers, Hugging Face names."""
  config = dict(model_type="llama", vocab_size=256, hidden_size=hidden,
                intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=False)
  c = LlamaConfig.from_hf(config)
  rng = np.random.default_rng(0)
  tensors = {"model.embed_tokens.weight": rng.normal(0, 0.02, (256, hidden)),
             "model.norm.weight": np.ones(hidden), "lm_head.weight": rng.normal(0, 0.02, (256, hidden))}
  for i in range(layers):
    for key, shape in c.linear_shapes().items():
      tensors[f"model.layers.{i}.{key}.weight"] = rng.normal(0, 0.02, shape)
    for key in ("input_layernorm", "post_attention_layernorm"):
      tensors[f"model.layers.{i}.{key}.weight"] = np.ones(hidden)
  return DictSource(config, {k: v.astype(np.float32) for k, v in tensors.items()})


def compile_seconds(fn, *args) -> float:
  start = time.perf_counter()
  fn.lower(*args).compile()
  return time.perf_counter() - start


def measure(layers: int, hidden: int) -> dict[str, float]:
  source = random_source(layers, hidden)
  model = build_model(LlamaConfig.from_hf(source.hf_config()), source, dtype=jnp.bfloat16,
                      progress=False)
  jqlora.apply_lora(model, jqlora.LoraConfig(r=8), rngs=nnx.Rngs(0))
  graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
  ids = jnp.zeros((2, 64), jnp.int32)

  @jax.jit
  def forward(lora, rest, ids):
    return nnx.merge(graphdef, lora, rest)(ids)

  @jax.jit
  def grad_step(lora, rest, ids):
    def loss(lora):
      logits = nnx.merge(graphdef, lora, rest)(ids[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()
    return jax.grad(loss)(lora)

  return {"forward_s": compile_seconds(forward, lora, rest, ids),
          "grad_step_s": compile_seconds(grad_step, lora, rest, ids)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hidden", type=int, default=128)
  parser.add_argument("--layers", type=int, nargs=2, default=(2, 30))
  args = parser.parse_args()
  shallow, deep = args.layers
  measure(shallow, args.hidden)  # warm-up: imports, jit of helpers, quantization kernels
  results = {n: measure(n, args.hidden) for n in (shallow, deep)}
  ratios = {k: results[deep][k] / results[shallow][k] for k in results[shallow]}
  print(f"{'layers':>8} {'forward compile (s)':>20} {'grad step compile (s)':>22}")
  for n, r in results.items():
    print(f"{n:>8} {r['forward_s']:>20.3f} {r['grad_step_s']:>22.3f}")
  print(f"{'ratio':>8} {ratios['forward_s']:>20.2f} {ratios['grad_step_s']:>22.2f}   (target < 2)")
  RESULTS.parent.mkdir(parents=True, exist_ok=True)
  RESULTS.write_text(json.dumps({
      "benchmark": "compile time vs depth (stacked, scanned layers; NF4 base + LoRA r=8)",
      "hidden_size": args.hidden, "layers": [shallow, deep],
      "seconds": {str(n): r for n, r in results.items()},
      "ratio_deep_over_shallow": ratios, "target_ratio": 2.0,
      "passed": all(v < 2.0 for v in ratios.values()),
      "backend": jax.default_backend(), "jax": jax.__version__, "machine": platform.machine(),
  }, indent=2))
  print(f"wrote {RESULTS}")


if __name__ == "__main__":
  main()

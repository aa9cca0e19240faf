"""Peak memory of ``load_model(..., quantize=True)`` on a >= 1B-parameter bf16 checkpoint.

Writes a random Llama-shaped bf16 safetensors checkpoint (sharded, one shard at
a time, never whole in memory), then loads it with NF4 quantization in a fresh
subprocess and reads that process's peak resident set size. The target is

    peak RSS < 1.5 x (final model bytes + largest single tensor bytes)

reported twice: on the raw peak, and on the peak less the process's baseline
(its resident set with Python, JAX, Flax and jqlora imported and the CPU
backend started, just before loading).

  python benchmarks/bench_load.py [--dir /tmp/jqlora_bench_load] [--keep]
      [--out benchmarks/results/bench_load.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import resource
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

# TinyLlama-1.1B's shape: 1.10B parameters, untied head.
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
}
LAYERS_PER_SHARD = 2


def layer_shapes(c: dict) -> dict[str, tuple[int, ...]]:
  """Hugging Face name suffix -> shape of one decoder layer's tensors."""
  d, f = c["hidden_size"], c["intermediate_size"]
  kv = c["num_key_value_heads"] * d // c["num_attention_heads"]
  return {
      "self_attn.q_proj.weight": (d, d), "self_attn.k_proj.weight": (kv, d),
      "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, d),
      "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
      "mlp.down_proj.weight": (d, f),
      "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
  }


def shard_contents(c: dict) -> list[dict[str, tuple[int, ...]]]:
  """Names and shapes of each shard: the embedding, groups of layers, then norm + head."""
  d, v = c["hidden_size"], c["vocab_size"]
  shards = [{"model.embed_tokens.weight": (v, d)}]
  for start in range(0, c["num_hidden_layers"], LAYERS_PER_SHARD):
    stop = min(start + LAYERS_PER_SHARD, c["num_hidden_layers"])
    shards.append({f"model.layers.{i}.{k}": s for i in range(start, stop)
                   for k, s in layer_shapes(c).items()})
  shards.append({"model.norm.weight": (d,), "lm_head.weight": (v, d)})
  return shards


def write_checkpoint(folder: pathlib.Path, c: dict, seed: int = 0) -> dict:
  """Writes random bf16 shards + index + config; returns parameter and byte counts."""
  from safetensors.numpy import save_file

  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  shards = shard_contents(c)
  weight_map, n_params, largest = {}, 0, 0
  for i, contents in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    tensors = {}
    for key, shape in contents.items():
      if len(shape) == 1:
        x = np.ones(shape, np.float32)
      else:
        x = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
      tensors[key] = x.astype(ml_dtypes.bfloat16)
      weight_map[key] = name
      n_params += int(np.prod(shape))
      largest = max(largest, tensors[key].nbytes)
    save_file(tensors, folder / name, metadata={"format": "pt"})
    del tensors
  (folder / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {"total_size": 2 * n_params}, "weight_map": weight_map}))
  (folder / "config.json").write_text(json.dumps(c, indent=2))
  return {"params": n_params, "checkpoint_bytes": 2 * n_params, "largest_tensor_bytes": largest}


def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _current_rss_bytes() -> int:
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmRSS:"):
      return int(line.split()[1]) * 1024
  raise RuntimeError("no VmRSS in /proc/self/status")


def child(folder: str) -> None:
  """Runs in the subprocess: load with quantize=True, print one JSON line."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  import jqlora
  import jqlora.models
  from jqlora.io.loading import load_model

  jax.block_until_ready(jqlora.quantize_nf4(jnp.ones((64, 64), jnp.bfloat16)).packed)
  baseline = _current_rss_bytes()
  start = time.perf_counter()
  model = load_model(folder, quantize=True, dtype=jnp.bfloat16, progress=False)
  leaves = jax.tree.leaves(nnx.state(model))
  jax.block_until_ready(leaves)
  seconds = time.perf_counter() - start
  model_bytes = sum(int(x.nbytes) for x in leaves if hasattr(x, "nbytes"))
  print(json.dumps({"baseline_rss_bytes": baseline, "peak_rss_bytes": _peak_rss_bytes(),
                    "final_rss_bytes": _current_rss_bytes(), "model_bytes": model_bytes,
                    "load_seconds": seconds}))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dir", default="/tmp/jqlora_bench_load", help="checkpoint folder")
  parser.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
  parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "bench_load.json"))
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args.child)
    return

  folder = pathlib.Path(args.dir)
  start = time.perf_counter()
  ckpt = write_checkpoint(folder, CONFIG)
  write_seconds = time.perf_counter() - start
  try:
    proc = subprocess.run([sys.executable, __file__, "--child", str(folder)],
                          check=True, capture_output=True, text=True)
  finally:
    if not args.keep:
      shutil.rmtree(folder, ignore_errors=True)
  run = json.loads(proc.stdout.strip().splitlines()[-1])

  budget = run["model_bytes"] + ckpt["largest_tensor_bytes"]
  peak, base = run["peak_rss_bytes"], run["baseline_rss_bytes"]
  result = {
      **ckpt, **run,
      "budget_bytes": budget,
      "ratio_raw": peak / budget,
      "ratio_minus_baseline": (peak - base) / budget,
      "target_ratio": 1.5,
      "write_seconds": write_seconds,
      "config": CONFIG,
      "machine": {"platform": platform.platform(), "python": platform.python_version()},
  }
  gib = 2.0 ** 30
  rows = [
      ("parameters", f"{ckpt['params'] / 1e9:.3f} B"),
      ("checkpoint (bf16)", f"{ckpt['checkpoint_bytes'] / gib:.3f} GiB"),
      ("largest tensor", f"{ckpt['largest_tensor_bytes'] / gib:.3f} GiB"),
      ("final model (NF4 + float)", f"{run['model_bytes'] / gib:.3f} GiB"),
      ("baseline RSS (python+jax)", f"{base / gib:.3f} GiB"),
      ("peak RSS", f"{peak / gib:.3f} GiB"),
      ("RSS after load", f"{run['final_rss_bytes'] / gib:.3f} GiB"),
      ("load time", f"{run['load_seconds']:.1f} s"),
      ("peak / (model + largest)", f"{result['ratio_raw']:.3f}  (target < 1.5)"),
      ("(peak - baseline) / (model + largest)", f"{result['ratio_minus_baseline']:.3f}  (target < 1.5)"),
  ]
  width = max(len(k) for k, _ in rows)
  print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()

"""Times a Llama-3-8B-shaped QLoRA train step: random NF4 weights, bf16, r=16 on all linears.

The model has Llama-3-8B's shapes (``jqlora.plan.PRESETS["llama-3-8b"]``) with random
NF4 codes and scales drawn on the device (no checkpoint, no float copy), LoRA r=16 /
alpha=32 on every linear, per-layer activation checkpointing. For each batch shape
(1x2048 and 4x512) it compiles the step, runs ``--steps`` more and prints the median
step time, tokens/s and the device's peak memory. ``--dry-run`` runs the same code on a
2-layer model of tiny shapes (CPU, seconds).

Usage: python benchmarks/gpu_train_step.py [--dry-run] [--steps N] --out PATH
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jqlora
from jqlora.models.config import LlamaConfig
from jqlora.plan import PRESETS, abstract_model

BATCHES = ((1, 2048), (4, 512))
TINY = dict(model_type="llama", vocab_size=256, hidden_size=128, intermediate_size=256,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256)
TINY_BATCHES = ((1, 64), (4, 16))
LORA = jqlora.LoraConfig(r=16, alpha=32, target_modules="all-linear")


def _random_leaf(key: jax.Array, leaf: jax.ShapeDtypeStruct) -> jax.Array:
  """Random values of ``leaf``'s shape and dtype: codes uniform, floats small normals."""
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # nnx.Rngs' keys
    return jax.random.split(key, leaf.shape) if leaf.shape else key
  if jnp.issubdtype(leaf.dtype, jnp.integer):
    return jax.random.bits(key, leaf.shape, leaf.dtype)
  return (0.02 * jax.random.normal(key, leaf.shape, jnp.float32)).astype(leaf.dtype)


def random_model(config: LlamaConfig) -> nnx.Module:
  """A QLoRA ``Llama`` of ``config``'s shapes with random NF4 base, norms and adapters."""
  model = abstract_model(config, LORA, dtype=jnp.bfloat16, remat=True)
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  filled = [jax.jit(_random_leaf, static_argnums=1)(k, leaf) for k, leaf in zip(keys, leaves)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, filled))


def _peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats()
  return None if stats is None else stats.get("peak_bytes_in_use")


def time_steps(model: nnx.Module, vocab: int, batch: int, seq: int, steps: int) -> dict:
  """Compile + ``steps`` timed train steps on a random ``[batch, seq]`` batch."""
  optimizer = jqlora.make_optimizer(model, optax.adamw(2e-4))
  ids = np.random.default_rng(0).integers(0, vocab, (batch, seq), dtype=np.int32)
  data = {"input_ids": ids, "labels": ids}
  start = time.perf_counter()
  loss = float(jqlora.train_step(model, optimizer, data)["loss"])
  first = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    loss = float(jqlora.train_step(model, optimizer, data)["loss"])
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  return dict(batch=[batch, seq], first_step_seconds=first, step_seconds=seconds,
              tokens_per_s=batch * seq / seconds, loss=loss, finite=bool(np.isfinite(loss)),
              peak_device_bytes=_peak_bytes())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dry-run", action="store_true", help="tiny 2-layer model (CPU)")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--out", type=pathlib.Path, required=True)
  args = parser.parse_args()
  name = "tiny" if args.dry_run else "llama-3-8b"
  config = LlamaConfig.from_hf(TINY if args.dry_run else PRESETS["llama-3-8b"])
  device = jax.devices()[0]
  print(f"{name} QLoRA step (NF4 base, bf16, r=16 all-linear, checkpointing) on {device.device_kind}")
  model = random_model(config)
  rows = []
  for batch, seq in (TINY_BATCHES if args.dry_run else BATCHES):
    r = time_steps(model, config.vocab_size, batch, seq, args.steps)
    peak = r["peak_device_bytes"]
    print(f"  batch {batch}x{seq}: {r['step_seconds'] * 1e3:.1f} ms/step, "
          f"{r['tokens_per_s']:.0f} tokens/s, first step (compile) {r['first_step_seconds']:.1f} s, "
          f"peak device memory {'n/a' if peak is None else f'{peak / 2**30:.2f} GiB'}, loss {r['loss']:.3f}")
    rows.append(r)
  result = dict(model=name, device=device.device_kind, platform=device.platform,
                jax=jax.__version__, lora=dict(r=16, alpha=32, target_modules="all-linear"),
                dtype="bfloat16", checkpointing=True, steps=args.steps, rows=rows)
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(result, indent=1) + "\n")
  print(f"wrote {args.out}")
  if not all(r["finite"] for r in rows):
    raise SystemExit("non-finite loss")


if __name__ == "__main__":
  main()

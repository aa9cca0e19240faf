"""NF4 quantize/dequantize throughput: jqlora (jit, CPU) side by side with bitsandbytes (CPU).

Runs both libraries round-robin in one process on the same inputs, reports the
median of several runs per operation, and writes a table and JSON. ``fresh output``
is the time XLA takes just to fill a newly allocated output of the dequantized
size: the page-fault floor that both libraries pay on every call.

  python benchmarks/bench_nf4.py [--repeats 7] [--out benchmarks/results/bench_nf4.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jqlora

# 2048x4096 (16 MiB in bf16) stays under the mmap threshold: no page faults, the lookup shows.
SHAPES = [(4096, 4096), (4096, 11008), (2048, 4096)]


def _interleaved_medians(runs: dict, repeats: int) -> dict:
  """Median seconds per callable, timing them round-robin so noise hits all alike."""
  for fn in runs.values():
    fn()  # warm-up (and compilation for jax)
  times = {key: [] for key in runs}
  for _ in range(repeats):
    for key, fn in runs.items():
      start = time.perf_counter()
      fn()
      times[key].append(time.perf_counter() - start)
  return {key: statistics.median(ts) for key, ts in times.items()}


def bench_shape(shape, dtype: str, repeats: int) -> list[dict]:
  import bitsandbytes.functional as bnbf
  import torch

  torch.set_num_threads(os.cpu_count() or 1)
  x_np = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  x_jax = jnp.asarray(x_np, dtype)
  x_torch = torch.from_numpy(x_np).to(getattr(torch, dtype))

  quantize = jax.jit(lambda x: jqlora.quantize_nf4(x, 64, True))
  dequantize = jax.jit(lambda t: jqlora.dequantize_nf4(t))
  t = quantize(x_jax)
  q, state = bnbf.quantize_4bit(x_torch, blocksize=64, quant_type="nf4",
                                compress_statistics=True)

  # The floor both libraries share: writing a freshly allocated output of this
  # size (first-touch page faults dominate above glibc's 32 MiB mmap threshold).
  fill = jax.jit(lambda v: jnp.broadcast_to(v.astype(x_jax.dtype), shape))
  scalar = jnp.float32(1.5)
  runs = {
      ("quantize", "jqlora"): lambda: jax.block_until_ready(quantize(x_jax)),
      ("quantize", "bitsandbytes"): lambda: bnbf.quantize_4bit(
          x_torch, blocksize=64, quant_type="nf4", compress_statistics=True),
      ("dequantize", "jqlora"): lambda: jax.block_until_ready(dequantize(t)),
      ("dequantize", "bitsandbytes"): lambda: bnbf.dequantize_4bit(q, state),
      ("dequantize", "fresh_output"): lambda: jax.block_until_ready(fill(scalar)),
  }
  seconds = {}
  for op in ("quantize", "dequantize"):  # round-robin within one operation
    seconds.update(_interleaved_medians({k: fn for k, fn in runs.items() if k[0] == op}, repeats))
  rows = []
  n = int(np.prod(shape))
  for op in ("quantize", "dequantize"):
    ours, theirs = seconds[(op, "jqlora")], seconds[(op, "bitsandbytes")]
    rows.append({
        "op": op, "shape": list(shape), "dtype": dtype,
        "jqlora_ms": ours * 1e3, "bitsandbytes_ms": theirs * 1e3,
        "jqlora_gelem_s": n / ours / 1e9, "bitsandbytes_gelem_s": n / theirs / 1e9,
        "speedup": theirs / ours,
    })
  rows[-1]["fresh_output_ms"] = seconds[("dequantize", "fresh_output")] * 1e3
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
  parser.add_argument("--out", default="benchmarks/results/bench_nf4.json")
  args = parser.parse_args()

  rows = [row for shape in SHAPES for row in bench_shape(shape, args.dtype, args.repeats)]
  machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
             "cpus": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend()}
  print(f"NF4 (block 64, double quant, {args.dtype}) on {machine['cpus']} CPUs, "
        f"median of {args.repeats}")
  print(f"{'op':<11}{'shape':>14}{'jqlora ms':>11}{'bnb ms':>10}{'speed-up':>10}"
        f"{'fresh output ms':>17}")
  for r in rows:
    floor = f"{r['fresh_output_ms']:>17.1f}" if "fresh_output_ms" in r else ""
    print(f"{r['op']:<11}{'x'.join(map(str, r['shape'])):>14}{r['jqlora_ms']:>11.1f}"
          f"{r['bitsandbytes_ms']:>10.1f}{r['speedup']:>9.2f}x{floor}")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"machine": machine, "repeats": args.repeats, "rows": rows}, indent=2))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()

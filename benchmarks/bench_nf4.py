"""NF4 quantize/dequantize throughput: jqlora (jit, CPU) side by side with bitsandbytes (CPU).

Runs the candidates in one process on the same inputs, in alternating blocks of
calls: each block's first call is dropped, because after torch returns its OpenMP
workers keep spinning for a while and slow whatever runs next on a small machine.
Reports medians. jqlora's dequantize runs on its default CPU path (the compiled
kernel of ``jqlora.kernels.native`` where available), and for comparison on the pure-XLA
path and on the native kernel without transparent huge pages. ``fresh output``
is the time XLA takes just to fill a newly allocated output of the dequantized
size: the page-fault floor of a 4 KiB-page allocation.

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
import jqlora.ops

# 2048x4096 (16 MiB in bf16) stays under the mmap threshold: no page faults, the lookup shows.
SHAPES = [(4096, 4096), (4096, 11008), (2048, 4096)]


def _block_medians(runs: dict, repeats: int, block: int = 4) -> dict:
  """Median seconds per callable over ``repeats`` alternating blocks of ``block`` calls."""
  times = {key: [] for key in runs}
  for _ in range(repeats):
    for key, fn in runs.items():
      fn()  # dropped: warm-up (compilation the first time) and the other library's threads
      for _ in range(block - 1):
        start = time.perf_counter()
        fn()
        times[key].append(time.perf_counter() - start)
  return {key: statistics.median(ts) for key, ts in times.items()}


def _without_huge_pages(fn):
  def run():
    os.environ["JQLORA_NATIVE_THP"] = "0"  # read by the kernel at every call
    try:
      return fn()
    finally:
      del os.environ["JQLORA_NATIVE_THP"]
  return run


def bench_shape(shape, dtype: str, repeats: int) -> list[dict]:
  import bitsandbytes.functional as bnbf
  import torch

  torch.set_num_threads(os.cpu_count() or 1)
  x_np = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  x_jax = jnp.asarray(x_np, dtype)
  x_torch = torch.from_numpy(x_np).to(getattr(torch, dtype))

  quantize = jax.jit(lambda x: jqlora.quantize_nf4(x, 64, True))
  dequantize = jax.jit(lambda t: jqlora.dequantize_nf4(t))
  dequantize_xla = jax.jit(lambda t: jqlora.dequantize_nf4(t, backend="xla"))
  t = quantize(x_jax)
  q, state = bnbf.quantize_4bit(x_torch, blocksize=64, quant_type="nf4",
                                compress_statistics=True)
  fill = jax.jit(lambda v: jnp.broadcast_to(v.astype(x_jax.dtype), shape))
  scalar = jnp.float32(1.5)
  runs = {
      ("quantize", "jqlora"): lambda: jax.block_until_ready(quantize(x_jax)),
      ("quantize", "bitsandbytes"): lambda: bnbf.quantize_4bit(
          x_torch, blocksize=64, quant_type="nf4", compress_statistics=True),
      ("dequantize", "jqlora"): lambda: jax.block_until_ready(dequantize(t)),
      ("dequantize", "bitsandbytes"): lambda: bnbf.dequantize_4bit(q, state),
      ("dequantize", "xla"): lambda: jax.block_until_ready(dequantize_xla(t)),
      ("dequantize", "fresh_output"): lambda: jax.block_until_ready(fill(scalar)),
  }
  native = jqlora.ops.DEQUANTIZE.order(t, jnp.dtype(dtype))[0] == "native"  # the default path
  if native:
    runs[("dequantize", "no_thp")] = _without_huge_pages(runs[("dequantize", "jqlora")])
  seconds = {}
  for op in ("quantize", "dequantize"):
    seconds.update(_block_medians({k: fn for k, fn in runs.items() if k[0] == op}, repeats))
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
  rows[-1]["path"] = "native" if native else "xla"
  rows[-1]["xla_ms"] = seconds[("dequantize", "xla")] * 1e3
  rows[-1]["native_no_thp_ms"] = seconds.get(("dequantize", "no_thp"), float("nan")) * 1e3
  rows[-1]["fresh_output_ms"] = seconds[("dequantize", "fresh_output")] * 1e3
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
  parser.add_argument("--shapes", nargs="+", default=[f"{r}x{c}" for r, c in SHAPES],
                      help="ROWSxCOLS ... (default: %(default)s)")
  parser.add_argument("--out", default="benchmarks/results/bench_nf4.json")
  args = parser.parse_args()

  shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes]
  rows = [row for shape in shapes for row in bench_shape(shape, args.dtype, args.repeats)]
  machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
             "cpus": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend()}
  print(f"NF4 (block 64, double quant, {args.dtype}) on {machine['cpus']} CPUs, "
        f"median of {args.repeats}")
  print(f"{'op':<11}{'shape':>11}{'jqlora ms':>11}{'bnb ms':>8}{'speed-up':>10}"
        f"{'XLA ms':>8}{'no-THP ms':>11}{'fresh output ms':>17}")
  for r in rows:
    extra = ""
    if r["op"] == "dequantize":
      extra = (f"{r['xla_ms']:>8.1f}{r['native_no_thp_ms']:>11.1f}"
               f"{r['fresh_output_ms']:>17.1f}   ({r['path']})")
    print(f"{r['op']:<11}{'x'.join(map(str, r['shape'])):>11}{r['jqlora_ms']:>11.1f}"
          f"{r['bitsandbytes_ms']:>8.1f}{r['speedup']:>9.2f}x{extra}")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"machine": machine, "repeats": args.repeats, "rows": rows}, indent=2))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()

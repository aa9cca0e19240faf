"""How exactly jqlora's NF4 quantization reproduces bitsandbytes on real weights.

Quantizes every 2-D weight of the embedded default model (SmolLM2-135M, read from
its GGUF file, bfloat16 like a training load) with ``jqlora.quantize_nf4`` and with
bitsandbytes 0.50.2 on the CPU, and counts the differing 4-bit codes, nested 8-bit
scale codes and offsets. bitsandbytes takes the offset from ``torch.mean``, whose
summation order for more than 32 768 block scales depends on torch's thread count,
so the comparison runs once with one torch thread and once with all of them.

  python benchmarks/nf4_exactness.py [--out benchmarks/results/nf4_exactness.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import jqlora
from jqlora.io import loading


def compare(weights: dict[str, np.ndarray], threads: int) -> dict:
  """Counts of differing codes between jqlora and bitsandbytes over ``weights``."""
  import bitsandbytes.functional as bnbf
  import torch

  torch.set_num_threads(threads)
  quantize = jax.jit(lambda x: jqlora.quantize_nf4(x, 64, True))
  totals = dict(tensors=0, codes=0, codes_differ=0, scales=0, scales_differ=0,
                scales_differ_by_2_or_more=0, offsets_differ=0, tensors_with_offset_diff=[])
  for name, w in tqdm(weights.items(), desc=f"{threads} torch thread(s)", leave=False):
    x = jnp.asarray(w, jnp.bfloat16)
    ours = quantize(x)
    q, state = bnbf.quantize_4bit(torch.from_numpy(np.array(x.astype(jnp.float32))).bfloat16(),
                                  blocksize=64, quant_type="nf4", compress_statistics=True)
    codes = np.asarray(ours.packed).reshape(-1)
    scales = np.asarray(ours.absmax).reshape(-1).astype(int)
    ref_scales = state.absmax.numpy().astype(int)
    totals["tensors"] += 1
    totals["codes"] += codes.size * 2
    totals["codes_differ"] += int((codes != q.numpy().reshape(-1)).sum())
    totals["scales"] += scales.size
    totals["scales_differ"] += int((scales != ref_scales).sum())
    totals["scales_differ_by_2_or_more"] += int((np.abs(scales - ref_scales) >= 2).sum())
    if np.asarray(ours.offset).tobytes() != state.offset.numpy().astype(np.float32).tobytes():
      totals["offsets_differ"] += 1
      totals["tensors_with_offset_diff"].append(name)
  return totals


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results/nf4_exactness.json")
  args = parser.parse_args()

  source = loading.open_source(jqlora.DEFAULT_MODEL)
  weights = {n: source.get(n) for n in source.names() if n.endswith(".weight")}
  weights = {n: w for n, w in weights.items() if w.ndim == 2}
  runs = {threads: compare(weights, threads) for threads in sorted({1, os.cpu_count() or 1})}

  print(f"{len(weights)} weights of {jqlora.DEFAULT_MODEL}, bf16, block 64, double quant")
  print(f"{'torch threads':>13}{'4-bit codes differ':>20}{'scale codes differ':>20}"
        f"{'by >= 2':>9}{'offsets differ':>16}")
  for threads, r in runs.items():
    print(f"{threads:>13}{r['codes_differ']:>11} / {r['codes']:<7}{r['scales_differ']:>11} / "
          f"{r['scales']:<7}{r['scales_differ_by_2_or_more']:>9}{r['offsets_differ']:>9} / "
          f"{r['tensors']}")
  machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__}
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"machine": machine, "model": jqlora.DEFAULT_MODEL,
                             "runs": {str(k): v for k, v in runs.items()}}, indent=2))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()

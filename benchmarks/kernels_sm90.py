"""Compiles every Pallas Triton kernel to sm_90a machine code (no GPU needed) and records its budget.

For the Llama-3-8B and Llama-3-70B projections (``[out, in]``: q/o, k/v, gate/up, down) it
lowers the GEMV (M=1), tensor-core (M=16, 64) forward and transposed kernels and the
dequantize kernel for CUDA, compiles each launch with the pip ``triton`` package and its
bundled ptxas (``pallas_kernels.sm90``), and writes registers, spill bytes, shared memory
and the grid per kernel. Needs ``pip install 'jqlora[gpu-tools]'``.

Usage: python benchmarks/kernels_sm90.py [--quick] [--out PATH]
Writes benchmarks/results/kernels_sm90.json (or PATH) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp

from jqlora.format import quantize_nf4
from pallas_kernels import common, sm90
from pallas_kernels.nf4_dequantize import dequantize
from pallas_kernels.nf4_matmul import matmul, matmul_transposed

MODELS = {
    "llama-3-8b": ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)),
    "llama-3-70b": ((8192, 8192), (1024, 8192), (28672, 8192), (8192, 28672)),
}
M_VALUES = (1, 16, 64)
QUICK_MODELS = {"llama-3-8b": ((1024, 4096),)}
QUICK_M_VALUES = (1,)
DEFAULT_OUT = pathlib.Path(__file__).parent / "results" / "kernels_sm90.json"


def _abstract(shape):
  return jax.eval_shape(lambda: quantize_nf4(jnp.zeros(shape, jnp.bfloat16)))


def _launches(models, m_values):
  """(model, [out, in], op, M, function, abstract args) for each kernel launch to compile."""
  for model, shapes in models.items():
    for out, inputs in shapes:
      t = _abstract((out, inputs))
      yield model, (out, inputs), "dequantize", None, lambda t: dequantize(t, jnp.bfloat16), (t,)
      for m in m_values:
        for entry, k in ((matmul, inputs), (matmul_transposed, out)):
          x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
          yield model, (out, inputs), entry.__name__, m, entry, (x, t)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="one shape, M=1 (a smoke run)")
  parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
  args = parser.parse_args()
  models, m_values = (QUICK_MODELS, QUICK_M_VALUES) if args.quick else (MODELS, M_VALUES)

  rows = []
  print(f"{'model':<12}{'out x in':>12}{'op':>18}{'M':>4}{'grid':>16}{'regs':>6}{'spill':>7}"
        f"{'smem KiB':>10}{'tc':>10}{'s':>6}")
  for model, shape, op, m, f, f_args in _launches(models, m_values):
    for call in sm90.triton_calls(f, *f_args):
      start = time.perf_counter()
      r = sm90.compile_sm90(call)
      seconds = time.perf_counter() - start
      rows.append(dict(model=model, shape=list(shape), op=op, m=m, dtype="bfloat16", **r))
      print(f"{model:<12}{'x'.join(map(str, shape)):>12}{op:>18}{m or '':>4}"
            f"{'x'.join(map(str, r['grid'])):>16}{r['registers']:>6}"
            f"{r['spill_store_bytes'] + r['spill_load_bytes']:>7}{r['shared_bytes'] / 1024:>10.1f}"
            f"{r['tensor_cores'] or '-':>10}{seconds:>6.1f}", flush=True)
  gemv = [r for r in rows if r["m"] == 1]
  summary = dict(kernels=len(rows), spilling=sum(r["spill_store_bytes"] + r["spill_load_bytes"] > 0
                                                 for r in rows),
                 gemv_min_programs=min((r["programs"] for r in gemv), default=None),
                 target_programs=common.MIN_PROGRAMS)
  result = dict(target="sm_90a (H100/H200), compiled without a GPU", jax=jax.__version__,
                python=sys.version.split()[0], host=platform.machine(), **sm90.toolchain(),
                quick=args.quick, summary=summary, rows=rows,
                note="pip triton + its ptxas on the IR Pallas emits; XLA builds the same IR with "
                     "its own Triton/LLVM, so these are close estimates, not XLA's exact build")
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(result, indent=1) + "\n")
  print(f"\n{summary}\nwrote {args.out}")


if __name__ == "__main__":
  main()

"""Benchmarks the NF4 kernels: dequantize bandwidth and nf4_matmul against a bf16 dot.

On a GPU: dequantize GB/s (bytes read + written) against the device's HBM
bandwidth (a measured device-to-device copy), and ``nf4_matmul`` (backend
``pallas``) against ``jnp.dot`` of bf16 activations and a bf16 weight for
M in {1, 4, 16, 64, 512, 4096} on Llama-7B shapes. On a CPU only the ``xla``
backend runs (Pallas GPU kernels need a GPU), and the output says so. Every timed
result is checked against the ``xla`` backend's: dequantize bit for bit, the matmul
within the float32 summation bound (``pallas_kernels.testing``); a mismatch exits 1.

Usage: python benchmarks/bench_kernels.py [--quick] [--repeats N] [--backend B] [--out PATH]
Writes benchmarks/results/bench_kernels_<device>.json (or PATH) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jqlora.format import quantize_nf4
from jqlora.ops import dequantize_nf4, nf4_matmul
from pallas_kernels import testing

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
M_VALUES = (1, 4, 16, 64, 512, 4096)
QUICK_SHAPES = ((256, 512), (512, 256))
QUICK_M_VALUES = (1, 4, 64)


def _median_seconds(f, *args, repeats: int) -> float:
  jax.block_until_ready(f(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _copy_bandwidth(repeats: int) -> float:
  """Measured bytes/s of a device copy of 1 GiB (read + write)."""
  x = jnp.zeros((1 << 28,), jnp.float32)
  seconds = _median_seconds(jax.jit(lambda a: a + 1), x, repeats=repeats)
  return 2 * x.nbytes / seconds


def _check_dequantize(got: jax.Array, want: jax.Array) -> bool:
  return bool(np.array_equal(np.asarray(got).view(np.uint16), np.asarray(want).view(np.uint16)))


def _check_matmul(got: jax.Array, want: jax.Array, x: jax.Array, w: jax.Array) -> bool:
  try:
    testing.assert_within_float32_bound(got, want, x, np.asarray(w, np.float64).T, x.shape[1])
  except AssertionError:
    return False
  return True


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--backend", help="jqlora.ops backend to time (default: pallas on a GPU, "
                      "else xla; interpret runs the Pallas kernels on a CPU)")
  parser.add_argument("--out", type=pathlib.Path, help="JSON path (default: benchmarks/results/"
                      "bench_kernels_<device>.json)")
  args = parser.parse_args()

  device = jax.devices()[0]
  on_gpu = device.platform == "gpu"
  backend = args.backend or ("pallas" if on_gpu else "xla")
  shapes = QUICK_SHAPES if args.quick else SHAPES
  m_values = QUICK_M_VALUES if args.quick else M_VALUES
  if not on_gpu:
    print(f"No GPU ({device.platform}): timing the {backend} backend; compiled Pallas kernels "
          "need a GPU, and the bandwidth/bf16 targets apply to GPUs.")
  hbm = _copy_bandwidth(args.repeats) if on_gpu else None

  rows = []
  for out, inputs in shapes:
    t = quantize_nf4(jax.random.normal(jax.random.key(0), (out, inputs), jnp.float32)
                     .astype(jnp.bfloat16))
    deq = jax.jit(lambda t: dequantize_nf4(t, jnp.bfloat16, backend=backend))
    seconds = _median_seconds(deq, t, repeats=args.repeats)
    moved = t.nbytes + out * inputs * 2
    w_bf16 = dequantize_nf4(t, jnp.bfloat16, backend="xla")
    rows.append(dict(op="dequantize", shape=[out, inputs], m=None, backend=backend,
                     seconds=seconds, gb_per_s=moved / seconds / 1e9,
                     fraction_of_hbm=None if hbm is None else moved / seconds / hbm,
                     matches_xla=_check_dequantize(deq(t), w_bf16)))
    for m in m_values:
      x = jax.random.normal(jax.random.key(1), (m, inputs), jnp.bfloat16)
      matmul = jax.jit(lambda x, t: nf4_matmul(x, t, backend=backend))
      fused = _median_seconds(matmul, x, t, repeats=args.repeats)
      dense = _median_seconds(jax.jit(lambda x, w: jnp.dot(x, w.T)), x, w_bf16,
                              repeats=args.repeats)
      bound = t.nbytes / hbm if hbm else None
      want = jax.jit(lambda x, t: nf4_matmul(x, t, backend="xla"))(x, t)
      rows.append(dict(op="nf4_matmul", shape=[out, inputs], m=m, backend=backend,
                       seconds=fused, bf16_dot_seconds=dense, ratio_to_bf16=fused / dense,
                       ratio_to_nf4_read_bound=None if bound is None else fused / bound,
                       matches_xla=_check_matmul(matmul(x, t), want, x, w_bf16)))

  fmt = lambda v, spec: "" if v is None else format(v, spec)
  print(f"\n{'op':<11}{'shape':>12}{'M':>6}{'ms':>10}{'bf16 ms':>10}{'/bf16':>7}{'GB/s':>8}{'/HBM':>6}"
        f"{'=xla':>6}")
  for r in rows:
    shape = "x".join(map(str, r["shape"]))
    bf16 = r.get("bf16_dot_seconds")
    print(f"{r['op']:<11}{shape:>12}{fmt(r['m'], 'd'):>6}{r['seconds'] * 1e3:>10.3f}"
          f"{fmt(bf16 and bf16 * 1e3, '.3f'):>10}{fmt(r.get('ratio_to_bf16'), '.2f'):>7}"
          f"{fmt(r.get('gb_per_s'), '.1f'):>8}{fmt(r.get('fraction_of_hbm'), '.0%'):>6}"
          f"{'yes' if r['matches_xla'] else 'NO':>6}")
  name = re.sub(r"[^A-Za-z0-9]+", "_", device.device_kind).strip("_").lower()
  result = dict(device=device.device_kind, platform=device.platform, jax=jax.__version__,
                host=platform.machine(), quick=args.quick, repeats=args.repeats,
                hbm_copy_bytes_per_s=hbm, backend=backend, rows=rows,
                note=None if on_gpu else f"CPU: {backend} backend; Pallas GPU kernels not timed")
  path = args.out or pathlib.Path(__file__).parent / "results" / f"bench_kernels_{name}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=1) + "\n")
  print(f"\nwrote {path}")
  if not all(r["matches_xla"] for r in rows):
    raise SystemExit("some results differ from the xla backend's (matches_xla: false above)")


if __name__ == "__main__":
  main()

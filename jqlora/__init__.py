"""jqlora: QLoRA for JAX.

Frozen base weights in bitsandbytes-exact NF4 (double-quantized scales), LoRA
adapters as Flax NNX modules, Pallas GPU kernels, optax-masked training and
PEFT/transformers interop both ways.

The public names are re-exported here and imported on first use, so that
``import jqlora`` stays fast and a CLI call loads only what it needs.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "NF4Tensor": "jqlora.nf4",
    "quantize_nf4": "jqlora.nf4",
    "dequantize_nf4": "jqlora.nf4",
    "nf4_matmul": "jqlora.ops",
    "LoraConfig": "jqlora.lora",
    "apply_lora": "jqlora.surgery",
    "merge_lora": "jqlora.surgery",
    "unmerge_lora": "jqlora.surgery",
    "trainable_params": "jqlora.surgery",
    "DEFAULT_MODEL": "jqlora.loading",
    "load_model": "jqlora.loading",
    "load_tokenizer": "jqlora.loading",
    "save_adapter": "jqlora.io.peft",
    "load_adapter": "jqlora.io.peft",
    "make_optimizer": "jqlora.training",
    "train_step": "jqlora.training",
}
_SUBMODULES = ("nn", "models", "training", "io", "ops", "nf4", "lora")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name: str) -> Any:
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
  if name in _SUBMODULES:
    return importlib.import_module(f"jqlora.{name}")
  raise AttributeError(f"module 'jqlora' has no attribute {name!r}")


def __dir__() -> list[str]:
  return __all__

"""jqlora: QLoRA for JAX.

Frozen base weights in bitsandbytes-exact NF4 (double-quantized scales), LoRA
adapters as Flax NNX modules, Pallas GPU kernels, optax-masked training and
PEFT/transformers interop both ways.

The public names are re-exported here and imported on first use, so that
``import jqlora`` stays fast and a CLI call loads only what it needs. The package
is layered, each layer importing only those below it (checked in CI):
format -> kernels (and ``pallas_kernels``) -> ops -> nn -> models -> parallel ->
io -> generate -> training -> plan -> cli.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "NF4Tensor": "jqlora.format",
    "quantize_nf4": "jqlora.format",
    "quantize_4bit": "jqlora.format",
    "dequantize_nf4": "jqlora.ops",
    "nf4_matmul": "jqlora.ops",
    "LoraConfig": "jqlora.nn",
    "apply_lora": "jqlora.nn",
    "merge_lora": "jqlora.nn",
    "unmerge_lora": "jqlora.nn",
    "trainable_params": "jqlora.nn",
    "add_adapter": "jqlora.nn",
    "set_adapter": "jqlora.nn",
    "active_adapter": "jqlora.nn",
    "list_adapters": "jqlora.nn",
    "disable_adapters": "jqlora.nn",
    "DEFAULT_MODEL": "jqlora.io",
    "load_model": "jqlora.io",
    "load_tokenizer": "jqlora.io",
    "save_adapter": "jqlora.io",
    "load_adapter": "jqlora.io",
    "make_optimizer": "jqlora.training",
    "train_step": "jqlora.training",
}
# the layers, bottom to top (see pyproject.toml's import-linter contract), by attribute
_SUBMODULES = {"format": "jqlora.format", "kernels": "jqlora.kernels", "ops": "jqlora.ops",
               "nn": "jqlora.nn", "models": "jqlora.models", "parallel": "jqlora.parallel",
               "io": "jqlora.io", "generate": "jqlora.generate", "training": "jqlora.training",
               "plan": "jqlora.plan", "cli": "jqlora.cli",
               # the format's and the modules' own files, as before the layering
               "nf4": "jqlora.format.nf4", "lora": "jqlora.nn.lora"}

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name: str) -> Any:
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
  if name in _SUBMODULES:
    return importlib.import_module(_SUBMODULES[name])
  raise AttributeError(f"module 'jqlora' has no attribute {name!r}")


def __dir__() -> list[str]:
  return __all__

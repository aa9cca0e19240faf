"""A model with its adapters merged in, written as a transformers folder."""

from __future__ import annotations

import json
import pathlib
from typing import Any

from safetensors.numpy import save_file

from jqlora.models import Llama, export_hf_state_dict

__all__ = ["save_merged"]


def save_merged(model: Llama, out: str | pathlib.Path, tokenizer: Any | None = None) -> None:
  """Writes ``model`` with every adapter merged in, float32, to the folder ``out``.

  The adapters are merged into whatever base ``model`` holds: NF4 weights are
  dequantized and the adapter added, ``W_nf4 + s·BA`` (as PEFT's
  ``merge_and_unload`` on a 4-bit base; never re-quantized), full-precision
  weights give ``W + s·BA``. A QLoRA adapter was trained against the NF4 base, so
  load the base as training did (``load_model(path, quantize=True)``) to keep its
  answers; ``jqlora export --merged --merge-into {nf4,original}`` chooses.

  Args:
    model: a jqlora model, with or without adapters.
    out: the output folder (created): float32 ``model.safetensors`` and ``config.json``.
    tokenizer: a transformers tokenizer to save beside them, or None.
  """
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  tensors = dict(export_hf_state_dict(model))
  save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
  (out / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2))
  if tokenizer is not None:
    tokenizer.save_pretrained(out)

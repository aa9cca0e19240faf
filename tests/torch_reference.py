"""Reference outputs computed live with the PyTorch stack (transformers, bitsandbytes, PEFT)."""

from __future__ import annotations

import bitsandbytes as bnb
import numpy as np
import torch


def bnb_float32_logits(folder, input_ids: np.ndarray, adapter=None) -> np.ndarray:
  """transformers + bitsandbytes logits of a saved NF4 folder, computed in float32.

  On CPUs with AVX512-BF16, bitsandbytes' inference path casts activations and
  scales to bfloat16; it is switched off so the reference is exact float32 NF4.
  """
  from transformers import AutoModelForCausalLM
  model = AutoModelForCausalLM.from_pretrained(folder)
  for module in model.modules():
    if isinstance(module, bnb.nn.Linear4bit):
      module.support_avx512bf16_for_cpu = False
  if adapter is not None:
    from peft import PeftModel
    model = PeftModel.from_pretrained(model, adapter)
  with torch.no_grad():
    return model(torch.from_numpy(input_ids).long()).logits.numpy()

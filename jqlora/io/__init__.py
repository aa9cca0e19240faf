"""The io layer: checkpoints and adapters in and out of the PyTorch ecosystem's files.

- readers (``TensorSource`` implementations, tensor by tensor): ``hf`` (safetensors,
  bitsandbytes 4-bit folders as stored), ``gguf`` (llama.cpp) and ``gguf_tokenizer``;
- ``loading``: ``load_model`` / ``load_tokenizer`` for every checkpoint kind, and
  ``DEFAULT_MODEL``;
- ``peft``: ``save_adapter`` / ``load_adapter`` in PEFT's format;
- ``export``: a merged model written as a transformers folder (adapters folded into
  the base the model holds: dequantized NF4, or full precision).

Readers need only the format; loading builds ``jqlora.models``; adapters go
through ``jqlora.nn``'s surgery.
"""

from jqlora.io.export import save_merged
from jqlora.io.loading import (
                               DEFAULT_MODEL,
                               default_model_path,
                               load_model,
                               load_tokenizer,
                               open_source,
)
from jqlora.io.peft import load_adapter, save_adapter

__all__ = ["DEFAULT_MODEL", "default_model_path", "load_adapter", "load_model", "load_tokenizer",
           "open_source", "save_adapter", "save_merged"]

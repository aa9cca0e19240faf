"""The models layer: model families as NNX modules, their configs, builders and merged export.

One family per file set: ``config.py`` (``LlamaConfig``), ``layers.py``, ``llama.py``
(the model and its KV cache), ``builder.py`` (``build_model`` from a
``TensorSource``), ``export.py`` (merged HF tensors), ``random_source.py`` (random
checkpoints), ``source.py`` (the ``TensorSource`` protocol readers implement).
Models know nothing of files: ``jqlora.io`` reads and writes them.
"""

from jqlora.models.builder import build_model
from jqlora.models.config import SUPPORTED_MODEL_TYPES, LlamaConfig
from jqlora.models.export import export_hf_state_dict
from jqlora.models.llama import KVCache, Llama
from jqlora.models.random_source import random_source
from jqlora.models.source import DictSource, TensorSource

__all__ = ["SUPPORTED_MODEL_TYPES", "DictSource", "KVCache", "Llama", "LlamaConfig",
           "TensorSource", "build_model", "export_hf_state_dict", "random_source"]

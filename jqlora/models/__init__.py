"""Model families. One family per file; ``build_model`` builds from a ``TensorSource``."""

from jqlora.models.llama import (SUPPORTED_MODEL_TYPES, KVCache, Llama, LlamaConfig, build_model,
                                 export_hf_state_dict, random_source)

__all__ = ["SUPPORTED_MODEL_TYPES", "KVCache", "Llama", "LlamaConfig", "build_model",
           "export_hf_state_dict", "random_source"]

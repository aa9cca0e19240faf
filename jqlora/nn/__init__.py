"""The modules layer: NNX Variable types, frozen and LoRA linears, LoRA maths and model surgery.

- ``jqlora.nn.variables``: ``NF4Weight``, ``Frozen``, ``LoRAScale``, ``DoRANorm`` and the
  logical-axis metadata that says how each Variable shards;
- ``jqlora.nn.linear``: ``Linear``, ``LoRALinear``, ``QLoRALinear``;
- ``jqlora.nn.lora``: ``LoraConfig`` and the adapter maths as pure functions;
- ``jqlora.nn.surgery``: ``apply_lora``, ``merge_lora``, ``unmerge_lora``, ``trainable_params``;
- ``jqlora.nn.adapters``: several named adapters: ``add_adapter``, ``set_adapter``,
  ``disable_adapters``, ``route_adapters`` (one per batch row).
"""

from jqlora.nn.adapters import (
                                BASE,
                                active_adapter,
                                adapter_rows,
                                add_adapter,
                                disable_adapters,
                                list_adapters,
                                route_adapters,
                                set_adapter,
)
from jqlora.nn.linear import (
                                Linear,
                                LoRALinear,
                                QLoRALinear,
                                base_matmul,
                                batch_shape,
                                dense_weight,
                                dora_norm,
)
from jqlora.nn.lora import LoraConfig
from jqlora.nn.surgery import (
                                apply_lora,
                                lora_modules,
                                merge_lora,
                                module_names,
                                trainable_params,
                                unmerge_lora,
)
from jqlora.nn.variables import (
                                AdapterIndex,
                                AdapterWeight,
                                DoRANorm,
                                Frozen,
                                LoRAScale,
                                NF4Weight,
                                axes,
                                logical_axes,
)

__all__ = ["BASE", "AdapterIndex", "AdapterWeight", "DoRANorm", "Frozen", "Linear", "LoRALinear",
           "LoRAScale", "LoraConfig", "NF4Weight", "QLoRALinear", "active_adapter", "adapter_rows",
           "add_adapter", "apply_lora", "axes", "base_matmul", "batch_shape", "dense_weight",
           "disable_adapters", "dora_norm", "list_adapters", "logical_axes", "lora_modules",
           "merge_lora", "module_names", "route_adapters", "set_adapter", "trainable_params",
           "unmerge_lora"]

"""The planning layer: will a QLoRA run fit? The analytic budget and XLA's own count.

- ``budget``: ``plan`` (bytes per device of weights, scales, adapters, optimizer
  state and activations), ``format_plan``, ``parse_size``, ``PRESETS``;
- ``measure``: ``measure``, XLA's buffer assignment of one compiled train step (on
  a real model or on shapes alone: ``abstract_model``), ``measure_plan``;
- ``fit``: does a checkpoint fit the devices at all (``jqlora train`` asks before
  loading), ``device_memory``.

It sits above training (``measure`` compiles the real step); ``jqlora plan`` is
its command line.
"""

from jqlora.plan.budget import DTYPE_BYTES, PRESETS, Plan, format_plan, parse_size, plan
from jqlora.plan.measure import (
                                 PAPER_LORA,
                                 Measurement,
                                 abstract_model,
                                 format_measured,
                                 measure,
                                 measure_plan,
)

__all__ = ["DTYPE_BYTES", "PAPER_LORA", "PRESETS", "Measurement", "Plan", "abstract_model",
           "format_measured", "format_plan", "measure", "measure_plan", "parse_size", "plan"]

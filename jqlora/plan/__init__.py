"""The planning layer: will a QLoRA run fit? The analytic budget and XLA's own count.

- ``budget``: ``plan`` (bytes per device of weights, scales, adapters, optimizer
  state and activations), ``format_plan``, ``parse_size``, ``PRESETS``;
- ``measure``: ``measure``, the peak XLA assigns to one compiled train step.

It sits above training (``measure`` compiles the real step); ``jqlora plan`` is
its command line.
"""

from jqlora.plan.budget import DTYPE_BYTES, PRESETS, Plan, format_plan, parse_size, plan
from jqlora.plan.measure import measure

__all__ = ["DTYPE_BYTES", "PRESETS", "Plan", "format_plan", "measure", "parse_size", "plan"]

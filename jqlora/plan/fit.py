"""Does the checkpoint fit the devices at all? Decided from its config alone, before any loading.

The memory of a device, first match wins:

1. the environment variable ``JQLORA_DEVICE_MEMORY`` (a size such as ``24GiB``);
2. the smallest ``bytes_limit`` of the local devices' ``memory_stats()`` (GPUs,
   TPUs: what XLA may allocate);
3. CPU devices: the host's physical memory divided by the number of local devices
   (simulated CPU devices share it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax

from jqlora.parallel import distributed
from jqlora.plan.budget import DTYPE_BYTES, Plan, parse_size, plan
from jqlora.plan.budget import _human as human
from jqlora.training.config import ConfigError, TrainConfig

__all__ = ["ENV_MEMORY", "CheckpointTooLarge", "check_train_config", "checkpoint_bytes",
           "device_memory", "too_large"]

#: Environment variable overriding the memory of each device.
ENV_MEMORY = "JQLORA_DEVICE_MEMORY"


class CheckpointTooLarge(ConfigError):
  """The frozen base alone needs more bytes per device than a device has."""


def device_memory(environ: Mapping[str, str] | None = None) -> tuple[int, str]:
  """Bytes per local device and where that figure came from (see the module docstring).

  Raises:
    ConfigError: ``JQLORA_DEVICE_MEMORY`` is not a size.
  """
  environ = os.environ if environ is None else environ
  if environ.get(ENV_MEMORY, "").strip():
    try:
      return parse_size(environ[ENV_MEMORY]), ENV_MEMORY
    except ValueError as e:
      raise ConfigError(f"{ENV_MEMORY}: {e}") from None
  devices = jax.local_devices()
  limits = [(d.memory_stats() or {}).get("bytes_limit") for d in devices]
  if all(limits):
    return min(limits), f"the {devices[0].platform} devices' bytes_limit; {ENV_MEMORY} overrides"
  host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  n = len(devices)
  return host // n, (f"host memory / {n} {devices[0].platform} device{'s' if n > 1 else ''}; "
                     f"{ENV_MEMORY} overrides")


def checkpoint_bytes(p: Plan, quantized: bool = True) -> int:
  """Bytes per device of the frozen base as loaded: NF4 storage and float weights (``p.weights``),
  or the linears in ``p.base_dtype`` when not ``quantized``."""
  if quantized:
    return p.weights
  return p.nf4_weights * 2 * DTYPE_BYTES[p.base_dtype] + p.frozen_weights


def too_large(p: Plan, memory: int, source: str, quantized: bool = True) -> str | None:
  """One line with the numbers when the checkpoint of ``p`` cannot fit ``memory`` bytes per device,
  else None."""
  needed = checkpoint_bytes(p, quantized)
  if needed <= memory:
    return None
  mesh = " x ".join(f"{k}={v}" for k, v in p.mesh.items())
  base = "NF4" if quantized else f"{p.base_dtype} (load_in_4bit: false)"
  return (f"{p.model}: the checkpoint is too large for the devices: its {base} base needs "
          f"{human(needed)} per device over the mesh {mesh}, and each device has {human(memory)} "
          f"({source}); split it over more devices (mesh.fsdp, mesh.tensor)")


def check_train_config(config: TrainConfig) -> Plan | None:
  """Raises ``CheckpointTooLarge`` when ``config.base_model`` cannot fit its mesh's devices.

  Reads only the checkpoint's config (``config.json`` or the GGUF header);
  starts ``jax.distributed`` first when the run is multi-process (as ``train``
  does), then reads the local devices' memory (``device_memory``). A config the
  planner cannot read is left to training to report.

  Returns:
    The plan it checked, or None when it could not plan.
  """
  distributed.initialize(config.distributed)
  m = config.mesh
  kwargs: dict[str, Any] = dict(devices=m.size, data=m.data, fsdp=m.fsdp, tensor=m.tensor,
                                batch=config.micro_batch_size, seq=config.sequence_len,
                                lora_r=config.lora_r, target_modules=config.lora_target_modules,
                                checkpointing=config.gradient_checkpointing, dtype=config.dtype)
  try:
    p = plan(config.base_model, **kwargs)
  except (ValueError, KeyError, OSError):
    return None
  memory, source = device_memory()
  message = too_large(p, memory, source, quantized=config.load_in_4bit)
  if message is not None:
    raise CheckpointTooLarge(message)
  return p

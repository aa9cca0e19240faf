"""The settings of the parallel layer: ``mesh.*`` and ``distributed.*``, and ``ConfigError``.

``jqlora.training.config.TrainConfig`` holds one of each; the training config
loader fills them from YAML keys and overrides.
"""

from __future__ import annotations

import dataclasses

__all__ = ["ConfigError", "MeshConfig", "DistributedConfig"]


class ConfigError(ValueError):
  """A config file or override that cannot be used (message names the key)."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """``mesh.*``: axis sizes of the device mesh (see ``jqlora.parallel``).

  The product must equal the number of devices (of all processes), except
  the default 1 x 1 x 1, which trains unsharded on one device.
  """

  data: int = 1
  fsdp: int = 1
  tensor: int = 1

  def __post_init__(self) -> None:
    for key in ("data", "fsdp", "tensor"):
      if getattr(self, key) < 1:
        raise ConfigError(f"mesh.{key} must be >= 1, got {getattr(self, key)}")

  @property
  def size(self) -> int:
    """Devices the mesh spans: ``data * fsdp * tensor``."""
    return self.data * self.fsdp * self.tensor


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """``distributed.*``: ``jax.distributed.initialize`` arguments for multi-process training.

  Unset values come from the environment (see ``jqlora.parallel.distributed``).
  """

  coordinator_address: str | None = None  # "host:port" of process 0
  num_processes: int | None = None
  process_id: int | None = None

  def __post_init__(self) -> None:
    if self.num_processes is not None and self.num_processes < 1:
      raise ConfigError(f"distributed.num_processes must be >= 1, got {self.num_processes}")
    if self.process_id is not None and not (
        0 <= self.process_id < (self.num_processes or self.process_id + 1)):
      raise ConfigError(f"distributed.process_id must be in [0, num_processes), got "
                        f"{self.process_id} of {self.num_processes}")

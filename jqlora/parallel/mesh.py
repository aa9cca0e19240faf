"""Device meshes with jqlora's three axes: ``data``, ``fsdp`` and ``tensor``.

``data`` is pure data parallelism, ``fsdp`` data parallelism with the frozen
weights split across it, ``tensor`` Megatron tensor parallelism. Batches ``[B, T]``
split ``B`` over ``data`` x ``fsdp``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

__all__ = ["AXES", "make_mesh", "mesh_from_config"]

#: Mesh axis names, outermost first.
AXES = ("data", "fsdp", "tensor")


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all devices).

  Args:
    data, fsdp, tensor: axis sizes; their product must equal the device count.
    devices: the devices, in mesh order (``jax.devices()`` by default).

  Returns:
    A ``jax.sharding.Mesh`` with axis names ``AXES``.

  Raises:
    ValueError: a size is not a positive integer, or the product differs from
      the number of devices.
  """
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  for name, size in sizes.items():
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
      raise ValueError(f"make_mesh: mesh.{name} must be a positive integer, got {size!r}")
  devices = list(jax.devices() if devices is None else devices)
  product = data * fsdp * tensor
  if product != len(devices):
    raise ValueError(
        f"make_mesh: mesh.data * mesh.fsdp * mesh.tensor = {data} * {fsdp} * {tensor} = "
        f"{product}, but there are {len(devices)} devices; the product must equal the device "
        "count")
  return Mesh(np.array(devices, dtype=object).reshape(data, fsdp, tensor), AXES)


def mesh_from_config(config: Mapping[str, Any] | None,
                     devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh from ``{"data": d, "fsdp": f, "tensor": t}`` (the ``mesh.*`` config keys).

  Missing sizes default to 1, except that when none is given all devices go to
  ``data``.
  """
  config = dict(config or {})
  unknown = set(config) - set(AXES)
  if unknown:
    raise ValueError(f"mesh: unknown axis {sorted(unknown)}; the axes are {list(AXES)}")
  if not config:
    config = {"data": len(jax.devices() if devices is None else devices)}
  return make_mesh(**config, devices=devices)

"""Multi-process (multi-host) start-up: ``jax.distributed.initialize`` from config or environment.

Where the settings come from, first match wins per value:

1. the config keys ``distributed.coordinator_address`` / ``num_processes`` /
   ``process_id``;
2. the environment variables ``JQLORA_COORDINATOR`` (``host:port`` of process 0),
   ``JQLORA_NUM_PROCESSES`` and ``JQLORA_PROCESS_ID``;
3. JAX's own cluster auto-detection (SLURM, Open MPI, Kubernetes, Cloud TPU,
   ``JAX_COORDINATOR_ADDRESS``), used when a launcher of several processes is
   visible (``JAX_COORDINATOR_ADDRESS``, ``SLURM_NTASKS`` > 1,
   ``OMPI_COMM_WORLD_SIZE`` > 1, several ``TPU_WORKER_HOSTNAMES``).

With none of these the run is single-process and nothing is initialized. Every
process then runs the same program; JAX sees the devices of all processes and
the mesh spans them (``jqlora.parallel``). On CPU the processes talk through
JAX's CPU collectives (gloo by default).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax

from jqlora.parallel.config import ConfigError, DistributedConfig

__all__ = ["ENV", "distributed_args", "initialize"]

#: ``DistributedConfig`` field -> environment variable.
ENV = {"coordinator_address": "JQLORA_COORDINATOR", "num_processes": "JQLORA_NUM_PROCESSES",
       "process_id": "JQLORA_PROCESS_ID"}


def _launcher_present(environ: Mapping[str, str]) -> bool:
  """A multi-process launcher that JAX's auto-detection understands."""
  def more_than_one(key: str) -> bool:
    value = environ.get(key, "").strip()
    return value.isdigit() and int(value) > 1

  hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  return ("JAX_COORDINATOR_ADDRESS" in environ or more_than_one("SLURM_NTASKS")
          or more_than_one("OMPI_COMM_WORLD_SIZE") or len(hosts) > 1)


def distributed_args(config: DistributedConfig,
                     environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
  """The ``jax.distributed.initialize`` keyword arguments, or None for a single process.

  Args:
    config: the ``distributed.*`` settings.
    environ: the environment (default ``os.environ``).

  Returns:
    The values set by config or ``JQLORA_*`` variables (``{}``: JAX
    auto-detects everything), or None when nothing asks for several processes.

  Raises:
    ConfigError: a ``JQLORA_NUM_PROCESSES`` / ``JQLORA_PROCESS_ID`` that is not an integer.
  """
  environ = os.environ if environ is None else environ
  args: dict[str, Any] = {}
  for field, var in ENV.items():
    value = getattr(config, field)
    if value is None and environ.get(var, "").strip():
      value = environ[var].strip()
      if field != "coordinator_address":
        try:
          value = int(value)
        except ValueError:
          raise ConfigError(f"environment variable {var} must be an integer, got {value!r}") \
              from None
    if value is not None:
      args[field] = value
  if args.get("num_processes") == 1:
    return None
  if args or _launcher_present(environ):
    return args
  return None


def initialize(config: DistributedConfig, environ: Mapping[str, str] | None = None) -> bool:
  """Starts ``jax.distributed`` when the config or environment asks for it (once per process).

  Call before any other JAX work of the process (the CLI and ``train`` do).

  Returns:
    Whether the run is multi-process (``jax.distributed`` is initialized).

  Raises:
    ConfigError: incomplete settings, JAX already running in this process, or
      a coordinator that cannot be reached (names the keys to set).
  """
  if jax.distributed.is_initialized():
    return True
  args = distributed_args(config, environ)
  if args is None:
    return False
  try:
    jax.distributed.initialize(**args)
  except (ValueError, TypeError, RuntimeError) as e:  # missing values, JAX already started, …
    keys = ", ".join(f"distributed.{k} (or {v})" for k, v in ENV.items())
    raise ConfigError(f"distributed: {e} (settings: {keys})") from None
  return True

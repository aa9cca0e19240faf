"""Where a benchmark's numbers come from: CPU model and ISA flags, cores, memory, load average.

Standard library only, so any script here can import it before JAX starts: the scripts
run as ``python benchmarks/<name>.py``, which puts this folder on ``sys.path``::

    from machine import machine_info
    result["machine"] = machine_info()
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import platform

__all__ = ["ISA_FLAGS", "cpu_info", "machine_info"]

#: The flags of ``/proc/cpuinfo`` that matter to matmul and decode speed (x86, then Arm).
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
             "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16",
             "amx_int8", "asimd", "sve")


def cpu_info() -> tuple[str, list[str]]:
  """``(model name, the ISA_FLAGS it has)`` from ``/proc/cpuinfo``; the machine type off Linux."""
  name, flags = "", set()
  try:
    lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    lines = []
  for line in lines:
    key, _, value = (part.strip() for part in line.partition(":"))
    if key == "model name" and not name:
      name = value
    elif key in ("flags", "Features") and not flags:
      flags = set(value.split())
  return name or platform.processor() or platform.machine(), [f for f in ISA_FLAGS if f in flags]


def machine_info(packages: tuple[str, ...] = ("jax", "jaxlib", "flax")) -> dict:
  """The machine and its state now: platform, CPU model, ISA flags, cores, memory, the
  1/5/15-minute load averages, Python and ``packages``' versions (the installed ones)."""
  cpu, flags = cpu_info()
  pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
  versions = {}
  for name in packages:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      continue
  return {"platform": platform.platform(), "cpu": cpu, "isa_flags": flags, "cpus": os.cpu_count(),
          "memory_gib": round(pages * os.sysconf("SC_PAGE_SIZE") / 2**30, 1) if pages else None,
          "load_average": [round(x, 2) for x in os.getloadavg()],
          "python": platform.python_version(), "versions": versions}

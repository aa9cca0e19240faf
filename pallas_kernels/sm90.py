"""sm_90 (H100/H200) machine code for the Pallas Triton kernels, built on a machine without a GPU.

Pallas lowers a kernel to Triton IR and hands it to XLA inside a ``__gpu$xla.gpu.triton``
custom call (the module as MLIR bytecode in ``mhlo.backend_config.ir``, with the grid,
``num_warps`` and ``num_stages`` beside it). :func:`triton_calls` reads those calls out of
the CUDA lowering of any jitted function (jaxlib only); :func:`compile_sm90` compiles one
with the PyPI ``triton`` package (pinned in the ``gpu-tools`` extra) to PTX and a cubin
and reads the resources ptxas assigned (registers, spills, shared memory). No driver or
device is touched.

XLA builds the same IR with its own Triton and LLVM, so the figures are close estimates
of what runs, not XLA's exact build. Mosaic GPU kernels are not covered: the CPU jaxlib
has no Mosaic GPU compiler (``_mosaic_gpu_ext`` ships in the ``jax-cuda*-plugin``), and it
turns the kernel into PTX only inside XLA's GPU custom call, with a CUDA client.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import re
import subprocess
import tempfile
from collections.abc import Callable

import jax
from jax._src.lib.mlir import ir

__all__ = ["TARGET_GPU", "TritonCall", "lowered_for_cuda", "triton_calls", "compile_sm90", "toolchain"]

#: The GPU the CUDA lowering targets (Triton reads its compute capability).
TARGET_GPU = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="gpu")
_TRITON_TARGET = "__gpu$xla.gpu.triton"


@dataclasses.dataclass(frozen=True)
class TritonCall:
  """One Triton kernel launch of a lowered function.

  Attributes:
    name: the kernel name (``pallas_call(name=...)``).
    ttir: the kernel as Triton IR text (what ``triton.compile`` reads).
    grid: ``(x, y, z)`` programs of the launch.
    num_warps: warps per program.
    num_stages: software-pipelining depth.
  """
  name: str
  ttir: str
  grid: tuple[int, int, int]
  num_warps: int
  num_stages: int

  @property
  def programs(self) -> int:
    """Programs (CTAs) of the launch."""
    x, y, z = self.grid
    return x * y * z


def lowered_for_cuda(f: Callable, *args) -> jax.stages.Lowered:
  """``jit(f)`` traced on ``args`` (arrays or ``jax.ShapeDtypeStruct`` pytrees) and lowered for CUDA.

  Lowering runs under an abstract one-device mesh whose device is ``TARGET_GPU``:
  from JAX 0.11 on, Pallas' Triton lowering needs a GPU model to target.
  """
  mesh = jax.sharding.AbstractMesh((1,), ("gpu",), abstract_device=TARGET_GPU)
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))


def _custom_calls(op, found: list) -> list:
  for region in op.regions:
    for block in region.blocks:
      for inner in block.operations:
        if inner.name == "stablehlo.custom_call":
          found.append(inner)
        _custom_calls(inner, found)
  return found


def triton_calls(f: Callable, *args) -> list[TritonCall]:
  """The Triton kernels that ``jit(f)(*args)`` launches on a GPU, in program order."""
  from jaxlib.triton import dialect  # jaxlib's Triton dialect bindings

  module = lowered_for_cuda(f, *args).compiler_ir("stablehlo")
  calls = []
  for op in _custom_calls(module.operation, []):
    if ir.StringAttr(op.attributes["call_target_name"]).value != _TRITON_TARGET:
      continue
    config = {named.name: named.attr for named in op.attributes["mhlo.backend_config"]}
    with ir.Context() as ctx:
      dialect.register_dialect(ctx)
      ttir = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes).operation.get_asm(
          enable_debug_info=False)
    value = lambda key, config=config: ir.IntegerAttr(config[key]).value
    calls.append(TritonCall(ir.StringAttr(config["name"]).value, ttir,
                            (value("grid_x"), value("grid_y"), value("grid_z")),
                            value("num_warps"), value("num_stages")))
  return calls


def toolchain() -> dict[str, str]:
  """Versions of the pip ``triton`` package and its bundled ptxas (ImportError if absent)."""
  import triton

  version = subprocess.run([_tool("ptxas"), "--version"], capture_output=True, text=True,
                           check=True).stdout
  return {"triton": triton.__version__,
          "ptxas": re.search(r"release ([\d.]+), V([\d.]+)", version).group(2)}


def _tool(name: str) -> str:
  import triton.backends.nvidia

  return str(pathlib.Path(triton.backends.nvidia.__file__).parent / "bin" / name)


def _resources(cubin: pathlib.Path, name: str) -> dict[str, int]:
  """Registers, stack, static shared and local bytes of ``name`` from ``cuobjdump``."""
  text = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cubin)],
                        capture_output=True, text=True, check=True).stdout
  line = text[text.index(f"Function {name}"):].splitlines()[1]
  fields = dict(re.findall(r"(\w+):(\d+)", line))
  return {"registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"]),
          "static_shared_bytes": int(fields["SHARED"]), "local_bytes": int(fields["LOCAL"])}


def _spills(ptx: pathlib.Path, arch: str) -> dict[str, int]:
  """Spill stores and loads (bytes) that ptxas reports for the PTX (same ptxas, same arch)."""
  log = subprocess.run([_tool("ptxas"), "-v", f"--gpu-name={arch}", str(ptx), "-o", os.devnull],
                       capture_output=True, text=True, check=True).stderr
  stores, loads = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups()
  return {"spill_store_bytes": int(stores), "spill_load_bytes": int(loads)}


@contextlib.contextmanager
def _triton_cache(root: pathlib.Path):
  """``root`` (created), with ``TRITON_CACHE_DIR`` at ``root/cache`` unless set, for the block."""
  root.mkdir(parents=True, exist_ok=True)
  before = os.environ.get("TRITON_CACHE_DIR")
  os.environ["TRITON_CACHE_DIR"] = before or str(root / "cache")
  try:
    yield root
  finally:
    if before is None:
      del os.environ["TRITON_CACHE_DIR"]


def compile_sm90(call: TritonCall, workdir: str | os.PathLike | None = None) -> dict:
  """Compiles ``call`` to an sm_90a cubin with pip ``triton``; its resources as a dict.

  Args:
    call: a kernel from :func:`triton_calls`.
    workdir: where the IR, PTX and cubin are written (a temporary folder if None); the
      Triton cache goes to ``workdir/cache`` unless ``TRITON_CACHE_DIR`` is set.

  Returns:
    ``name``, ``grid``, ``num_warps``, ``num_stages``, ``registers``, ``spill_store_bytes``,
    ``spill_load_bytes``, ``stack_bytes``, ``local_bytes``, ``shared_bytes`` (what the launch
    asks for, Triton's ``metadata.shared``), ``static_shared_bytes``, ``tensor_cores``
    (``"wgmma"``, ``"mma.sync"`` or None, from the PTX) and ``cubin_bytes``.

  Raises:
    ImportError: without the ``triton`` package (``pip install 'jqlora[gpu-tools]'``).
    RuntimeError: whatever Triton or ptxas reported when the kernel does not compile.
  """
  import triton
  from triton.backends.compiler import GPUTarget

  with tempfile.TemporaryDirectory() as tmp, _triton_cache(pathlib.Path(workdir or tmp)) as root:
    source = root / f"{call.name}.ttir"
    source.write_text(call.ttir)
    try:
      kernel = triton.compile(str(source), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": call.num_warps, "num_stages": call.num_stages,
                                       "enable_fp_fusion": True})  # Triton's default, said aloud
    except Exception as e:  # Triton raises plain Exceptions carrying the compiler's message
      raise RuntimeError(f"{call.name}: Triton could not compile it for sm_90: {e}") from e
    ptx, cubin = root / f"{call.name}.ptx", root / f"{call.name}.cubin"
    ptx.write_text(kernel.asm["ptx"])
    cubin.write_bytes(kernel.asm["cubin"])
    arch = re.search(r"^\.target (\S+)", kernel.asm["ptx"], re.M).group(1)
    text = kernel.asm["ptx"]
    tensor_cores = "wgmma" if "wgmma" in text else "mma.sync" if "mma.sync" in text else None
    return {"name": call.name, "grid": list(call.grid), "programs": call.programs,
            "num_warps": call.num_warps, "num_stages": call.num_stages, "arch": arch,
            **_resources(cubin, kernel.metadata.name), **_spills(ptx, arch),
            "shared_bytes": int(kernel.metadata.shared), "tensor_cores": tensor_cores,
            "cubin_bytes": len(kernel.asm["cubin"])}

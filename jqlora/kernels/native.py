"""The CPU NF4 dequantize kernel: C compiled on first use, called through XLA's FFI.

XLA emits the 16-entry NF4 lookup and the interleaving of the two nibbles of a
byte as scalar code on the CPU. ``csrc/nf4_dequantize.c`` computes each block's
16 possible outputs once and looks codes up in registers (AVX-512 or AVX2, 32
elements per step) on all cores, and asks for transparent huge pages for large
outputs (first-touch page faults otherwise dominate; ``JQLORA_NATIVE_THP=0``
turns that off). It is built once
per machine with the system C compiler (``$CC``, else ``cc``; ``make`` installs the
``ziglang`` package's compiler where there is none) into
``$JQLORA_CACHE_DIR`` (default ``~/.cache/jqlora``) and registered as the XLA FFI
target ``jqlora_nf4_dequantize``. Its results are bit-identical to the pure-jnp
reference (``jqlora.format.dequantize_reference``). Where it cannot run (no
compiler, float16 output) it raises ``NotImplementedError`` saying why, and the
backend registry of ``jqlora.ops`` falls through to the next implementation.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import logging
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["TARGET", "DTYPES", "cache_dir", "build", "available", "isa", "dequantize"]

TARGET = "jqlora_nf4_dequantize"
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_SOURCE = pathlib.Path(__file__).with_name("csrc") / "nf4_dequantize.c"
_FLAGS = ("-O3", "-std=c11", "-shared", "-fPIC", "-pthread", "-ffp-contract=off")
_log = logging.getLogger(__name__)


def cache_dir() -> pathlib.Path:
  """Where the compiled kernel is kept: ``$JQLORA_CACHE_DIR`` or ``~/.cache/jqlora``."""
  if os.environ.get("JQLORA_CACHE_DIR"):
    return pathlib.Path(os.environ["JQLORA_CACHE_DIR"])
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "jqlora"


def _compiler() -> list[str] | None:
  """``$CC``, else the first of cc/gcc/clang on PATH, else the ``ziglang`` package's cc."""
  if os.environ.get("CC"):
    return shlex.split(os.environ["CC"])
  for name in ("cc", "gcc", "clang"):
    if shutil.which(name):
      return [shutil.which(name)]
  if importlib.util.find_spec("ziglang"):
    return [sys.executable, "-m", "ziglang", "cc"]
  return None


def build(compiler: list[str] | None = None) -> pathlib.Path:
  """Compiles the kernel (once: the library is cached under a hash of its inputs).

  Returns:
    The path of the shared library.

  Raises:
    RuntimeError: no C compiler, or compilation failed (its output included).
  """
  compiler = compiler or _compiler()
  if compiler is None:
    raise RuntimeError("no C compiler found (set $CC, install cc/gcc/clang, or pip install ziglang)")
  include = pathlib.Path(jax.ffi.include_dir())
  key = hashlib.sha256()
  for part in (_SOURCE.read_bytes(), (include / "xla/ffi/api/c_api.h").read_bytes(),
               " ".join(compiler).encode(), " ".join(_FLAGS).encode(),
               f"{sys.platform} {platform.machine()}".encode()):  # a home shared across machines
    key.update(part)
  library = cache_dir() / f"nf4_dequantize-{key.hexdigest()[:16]}.so"
  if library.exists():
    return library
  library.parent.mkdir(parents=True, exist_ok=True)
  partial = library.with_suffix(f".{os.getpid()}.tmp")
  command = [*compiler, *_FLAGS, f"-I{include}", str(_SOURCE), "-o", str(partial)]
  done = subprocess.run(command, capture_output=True, text=True)
  if done.returncode:
    partial.unlink(missing_ok=True)
    raise RuntimeError(f"compiling {_SOURCE.name} failed:\n{' '.join(command)}\n{done.stderr}")
  os.replace(partial, library)  # atomic: concurrent builders never see a partial file
  return library


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
  """Builds, loads and registers the kernel once per process: (library, "") or (None, why)."""
  try:
    library = ctypes.CDLL(str(build()))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(getattr(library, TARGET)),
                                platform="cpu")
  except (RuntimeError, OSError, AttributeError) as error:
    # No compiler is a set-up choice; a failing build or load is a bug worth seeing.
    level = logging.INFO if _compiler() is None else logging.WARNING
    _log.log(level, "native NF4 kernel unavailable, using XLA: %s", error)
    return None, str(error)
  library.jqlora_nf4_isa.argtypes = [ctypes.c_int]
  return library, ""


def _library() -> ctypes.CDLL:
  """The loaded kernel library; ``NotImplementedError`` saying why when there is none."""
  library, why = _load()
  if library is None:
    raise NotImplementedError(f"the native NF4 kernel is unavailable here: {why}")
  return library


def available() -> bool:
  """Whether the kernel is built and registered with XLA (built at the first call).

  False when it cannot be compiled (the reason is logged on ``jqlora.kernels.native``:
  INFO without a compiler, WARNING if a build failed).
  """
  return _load()[0] is not None


def isa(cap: int | None = None) -> int:
  """The kernel's widest code path here: 2 AVX-512, 1 AVX2, 0 portable C.

  Args:
    cap: if given, the widest path allowed from now on in this process (tests
      use it to run the narrower paths; 2 restores the default).

  Raises:
    NotImplementedError: the kernel is unavailable here (the message says why).
  """
  return int(_library().jqlora_nf4_isa(-1 if cap is None else cap))


def dequantize(packed: jax.Array, scales: jax.Array, table: np.ndarray, *, n: int,
               block_size: int, dtype) -> jax.Array:
  """Decodes flat NF4 codes on the CPU kernel.

  Args:
    packed: uint8 ``[..., ceil(n / 2)]`` (element 2i in the high nibble).
    scales: float32 ``[..., ceil(n / block_size)]`` decoded block scales.
    table: float32 ``[16]``, the NF4 code values.
    n: elements per item; ``block_size``: elements per scale (a multiple of 32).
    dtype: float32 or bfloat16.

  Returns:
    ``dtype[..., n]``, each ``dtype(table[code] * scale)``. Works under ``jit``
    and ``vmap``.

  Raises:
    NotImplementedError: the kernel is unavailable here, or ``dtype`` is neither
      float32 nor bfloat16 (the message says which).
  """
  _library()  # raises, saying why, where the kernel is unavailable
  if jnp.dtype(dtype) not in DTYPES:
    raise NotImplementedError(
        f"the native NF4 kernel writes float32 or bfloat16, not {jnp.dtype(dtype)}")
  out = jax.ShapeDtypeStruct((*packed.shape[:-1], n), jnp.dtype(dtype))
  call = jax.ffi.ffi_call(TARGET, out, vmap_method="broadcast_all")
  return call(packed, scales.astype(jnp.float32), jnp.asarray(table, jnp.float32),
              block_size=np.int64(block_size))

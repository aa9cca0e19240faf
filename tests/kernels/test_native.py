"""The compiled CPU NF4 dequantize kernel: bit-identical to the pure-jnp path."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqlora
from jqlora.format import NF4Tensor
from jqlora.kernels import native

pytestmark = pytest.mark.skipif(not native.available(),
                                reason="native NF4 kernel not built (no C compiler?)")


def _isas() -> list[int]:
  return list(range(native.isa() + 1)) if native.available() else [0]


@pytest.fixture(params=_isas(), ids=lambda cap: ["c", "avx2", "avx512"][cap])
def isa(request):
  """Runs a test on each code path this CPU has (portable C, AVX2, AVX-512)."""
  full = native.isa()
  native.isa(request.param)
  yield request.param
  native.isa(full)


def _bits(x) -> np.ndarray:
  x = np.asarray(x)
  return x.view(np.uint16 if x.itemsize == 2 else np.uint32)


def _assert_same(t: NF4Tensor, dtype) -> None:
  ours = jqlora.dequantize_nf4(t, dtype, backend="native")
  ref = jqlora.dequantize_nf4(t, dtype, backend="xla")
  assert ours.shape == ref.shape == t.shape and ours.dtype == ref.dtype
  np.testing.assert_array_equal(_bits(ours), _bits(ref))


@pytest.mark.parametrize("shape,block_size,double_quant", [
    ((64, 128), 64, True),
    ((37, 101), 32, True),       # odd count: partial last block, a pad nibble
    ((3, 5, 129), 128, False),
    ((7,), 64, True),            # fewer elements than one SIMD step
    ((96, 4096), 4096, True),
    ((300, 257), 256, False),
])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matches_xla(isa, shape, block_size, double_quant, dtype):
  x = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32) * 3
  t = jqlora.quantize_nf4(jnp.asarray(x, dtype), block_size, double_quant)
  _assert_same(t, dtype)
  _assert_same(t, "float32" if dtype == "bfloat16" else "bfloat16")  # either output dtype


@pytest.mark.parametrize("quant_type", ["fp4", "int4"])
@pytest.mark.parametrize("shape,block_size,double_quant", [((64, 128), 64, True), ((37, 101), 32, False)])
def test_other_code_tables_match_xla(isa, quant_type, shape, block_size, double_quant):
  # The kernel takes the 16-entry table: FP4 (with its +0 at code 8) and Int4 decode the same way.
  x = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
  x.reshape(-1)[::7] = 0.0
  t = jqlora.quantize_4bit(jnp.asarray(x), quant_type, block_size, double_quant)
  for dtype in ("float32", "bfloat16"):
    _assert_same(t, dtype)


def test_large_output_on_threads_and_huge_pages(isa):
  # 16 MiB of float32 output: several threads, and the huge-page advice applies.
  x = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
  t = jqlora.quantize_nf4(jnp.asarray(x), 64, True)
  _assert_same(t, "float32")
  _assert_same(t, "bfloat16")


def test_special_scales_round_like_xla(isa):
  # Zero, subnormal, overflowing, infinite and NaN scales: the bfloat16 rounding of
  # every product (ties to even, overflow to inf, NaN stays NaN) matches XLA's.
  scales = np.array([0.0, 1e-40, 3e-39, 1.0, 3.3e38, np.inf, np.nan, -0.0,
                     1.0 + 2 ** -8, 65504.0, 1e-45, 2.0], np.float32)
  codes = np.arange(len(scales) * 64) % 16
  packed = (codes[0::2] << 4 | codes[1::2]).astype(np.uint8)
  t = NF4Tensor.from_bnb(packed, scales, shape=(len(scales), 64), dtype=jnp.float32,
                         block_size=64)
  _assert_same(t, "bfloat16")
  _assert_same(t, "float32")


def test_jit_and_vmap(isa):
  x = np.random.default_rng(1).standard_normal((4, 48, 80)).astype(np.float32)
  stacked = jax.vmap(lambda w: jqlora.quantize_nf4(w, 64, True))(jnp.asarray(x))
  decode = lambda backend: jax.jit(jax.vmap(
      lambda t: jqlora.dequantize_nf4(t, jnp.bfloat16, backend=backend)))(stacked)
  ours, ref = decode("native"), decode("xla")
  assert ours.shape == (4, 48, 80)
  np.testing.assert_array_equal(_bits(ours), _bits(ref))


def test_kernel_rejects_operands_that_do_not_fit():
  with pytest.raises(Exception, match="do not fit 200 outputs per item in blocks of 64"):
    native.dequantize(jnp.zeros((100,), jnp.uint8), jnp.ones((3,)), jqlora.nf4.NF4_CODE,
                      n=200, block_size=64, dtype=jnp.float32).block_until_ready()


def test_default_backend_on_cpu(monkeypatch):
  t = jqlora.quantize_nf4(jnp.ones((64, 64)), 64, True)
  assert "ffi_call" in str(jax.make_jaxpr(jqlora.dequantize_nf4)(t))
  # float16 output has no native path: XLA, and asking for native explicitly is refused.
  assert "ffi_call" not in str(jax.make_jaxpr(lambda t: jqlora.dequantize_nf4(t, jnp.float16))(t))
  with pytest.raises(NotImplementedError, match="float32 or bfloat16"):
    jqlora.dequantize_nf4(t, jnp.float16, backend="native")
  monkeypatch.setenv("JQLORA_BACKEND", "xla")  # the one switch turns it off
  assert "ffi_call" not in str(jax.make_jaxpr(lambda t: jqlora.dequantize_nf4(t))(t))
  monkeypatch.delenv("JQLORA_BACKEND")
  # a kernel that cannot be built: the automatic order falls through, a named one says why
  monkeypatch.setattr(native, "_load", lambda: (None, "no C compiler found"))
  assert not native.available()
  assert "ffi_call" not in str(jax.make_jaxpr(lambda t: jqlora.dequantize_nf4(t))(t))
  with pytest.raises(RuntimeError, match="unavailable here: no C compiler found"):
    jqlora.dequantize_nf4(t, backend="native")


def test_bad_backend_names_the_choices():
  t = jqlora.quantize_nf4(jnp.ones((64,)), 64)
  with pytest.raises(ValueError, match="native.*xla"):
    jqlora.dequantize_nf4(t, backend="cuda")


def test_build_is_cached_and_reports_compiler_errors(tmp_path, monkeypatch):
  library = native.build()
  stamp = library.stat().st_mtime_ns
  assert native.build() == library and library.stat().st_mtime_ns == stamp  # not rebuilt
  monkeypatch.setenv("JQLORA_CACHE_DIR", str(tmp_path))
  with pytest.raises(RuntimeError, match="compiling nf4_dequantize.c failed"):
    native.build(["false"])
  assert not list(tmp_path.glob("*.tmp"))  # no partial library left behind
  monkeypatch.setenv("CC", "/nonexistent/cc --flag")
  assert native._compiler() == ["/nonexistent/cc", "--flag"]

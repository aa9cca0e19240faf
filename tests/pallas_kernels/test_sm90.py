"""The Triton kernels as an H200 runs them: launch geometry, table decode, sm_90 machine code.

The launch-parameter tests read the grid XLA would launch from the CUDA lowering
(jaxlib only). The compile tests build sm_90a cubins with the pip ``triton`` package
(the ``gpu-tools`` extra) and read what ptxas assigned.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jqlora.format import quantize_4bit, quantize_nf4
from pallas_kernels import common, sm90, testing
from pallas_kernels.nf4_dequantize import dequantize, dequantize_reference
from pallas_kernels.nf4_matmul import matmul, matmul_reference, matmul_transposed, triton

#: ``[out, in]`` projections of Llama-3-8B (q/o, k/v, gate/up, down) and Llama-3-70B.
LLAMA3_8B = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))
LLAMA3_70B = ((8192, 8192), (1024, 8192), (28672, 8192), (8192, 28672))


def _abstract(shape, double_quant=True):
  """An ``NF4Tensor`` of ``ShapeDtypeStruct`` leaves: lowering needs no data."""
  return jax.eval_shape(lambda: quantize_nf4(jnp.zeros(shape, jnp.bfloat16), double_quant=double_quant))


def _kernel_call(entry, m, shape, dtype=jnp.bfloat16, double_quant=True):
  """The single Triton launch of ``entry`` (matmul or matmul_transposed) for ``m`` rows."""
  k = shape[0] if entry is matmul_transposed else shape[1]
  x = jax.ShapeDtypeStruct((m, k), dtype)
  [call] = sm90.triton_calls(entry, x, _abstract(shape, double_quant))
  return call


@pytest.mark.parametrize("shape", LLAMA3_8B + LLAMA3_70B, ids=lambda s: f"{s[1]}to{s[0]}")
@pytest.mark.parametrize("entry", [matmul, matmul_transposed], ids=lambda f: f.__name__)
def test_gemv_grid_fills_an_h200_twice(entry, shape):
  call = _kernel_call(entry, 1, shape)
  g = triton.geometry(1, _abstract(shape), transposed=entry is matmul_transposed)
  assert call.programs >= 2 * common.SM_COUNT == 264
  assert call.programs == g.programs and g.kind == "gemv"
  assert call.grid == g.grid  # Pallas' grid is XLA's launch grid


def test_geometry_shrinks_rows_only_when_splitting_is_not_enough():
  # 4096 -> 1024: 16 tiles of 64 rows x at most 16 K steps = 256 < 264, so 32-row tiles.
  g = triton.geometry(1, _abstract((1024, 4096)))
  assert (g.tiles.rows, g.splits, g.grid) == (32, 16, (32, 16, 1))
  g = triton.geometry(1, _abstract((4096, 4096)))
  assert (g.tiles.rows, g.splits) == (64, 8)
  small = triton.geometry(2, testing.make_weight((64, 128)))  # too small to fill: smallest tiles
  assert (small.tiles.rows, small.tiles.blocks, small.m_pad) == (triton.MIN_ROWS, 1, 2)


def _signature_and_loads(call) -> tuple[int, list[str]]:
  """Kernel arguments, and the pointer types every ``tt.load`` reads."""
  signature = call.ttir.split("tt.func public", 1)[1].split("\n", 1)[0]
  loads = re.findall(r"tt\.load %\w+ : tensor<([^>]*>)", call.ttir)
  return signature.count("%arg"), loads


def test_no_code_table_in_memory():
  # The decode is a select tree on constants: no table operand, no load besides the data
  # (Pallas' ref store reads the old output first; Triton drops that dead load).
  t = testing.make_weight((64, 128), double_quant=False)
  [call] = sm90.triton_calls(lambda t: dequantize(t, jnp.bfloat16), t)
  assert _signature_and_loads(call) == (
      3, ["128x!tt.ptr<f32>", "128x32x!tt.ptr<i8>", "128x64x!tt.ptr<bf16>"])
  [call] = sm90.triton_calls(matmul, jnp.zeros((1, 128), jnp.bfloat16), t)
  n_args, loads = _signature_and_loads(call)
  assert n_args == 4 and sorted(p.split("!tt.ptr<")[1] for p in loads) == ["bf16>", "f32>", "f32>", "i8>"]


@pytest.mark.parametrize("quant_type", ["fp4", "int4"])
def test_other_code_tables_reuse_the_kernels(quant_type):
  w = 2.0 * jax.random.normal(jax.random.key(0), (48, 192), jnp.float32)
  t = quantize_4bit(w, quant_type=quant_type)
  assert common.code_table(t) != common.NF4
  got = jax.jit(lambda t: dequantize(t, jnp.bfloat16, interpret=testing.INTERPRET))(t)
  want = dequantize_reference(t, jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(got).view(np.uint16), np.asarray(want).view(np.uint16))
  x = testing.make_activations((1, 192), jnp.float32)
  y = jax.jit(lambda x, t: matmul(x, t, interpret=testing.INTERPRET))(x, t)
  want_y = matmul_reference(x, t)
  bound = testing.float32_sum_bound(x, np.asarray(dequantize_reference(t, jnp.float32)).T, want_y, 192)
  assert np.all(np.abs(np.asarray(y, np.float64) - np.asarray(want_y, np.float64)) <= bound)


def _compile(call):
  pytest.importorskip("triton", reason="the gpu-tools extra (pip triton) is not installed")
  return sm90.compile_sm90(call)


#: One launch of every Triton kernel at the test shapes: (name, function, args).
KERNELS = [
    ("dequantize-bf16-dq", lambda t: dequantize(t, jnp.bfloat16), (testing.make_weight((192, 320)),)),
    ("dequantize-f32-sq", lambda t: dequantize(t, jnp.float32),
     (testing.make_weight((48, 192), double_quant=False),)),
    *[(f"{entry.__name__}-M{m}", entry, (jnp.zeros((m, 192 if entry is matmul_transposed else 320),
                                                   jnp.bfloat16), testing.make_weight((192, 320))))
      for entry in (matmul, matmul_transposed) for m in (1, 8, 64)],
]


@pytest.mark.slow
@pytest.mark.parametrize("name,f,args", KERNELS, ids=[k[0] for k in KERNELS])
def test_each_kernel_compiles_to_sm90_without_spills(name, f, args):
  [call] = sm90.triton_calls(f, *args)
  r = _compile(call)
  assert r["arch"] == "sm_90a" and r["cubin_bytes"] > 0
  assert 0 < r["registers"] <= 255 and r["shared_bytes"] <= 227 * 1024
  assert r["spill_store_bytes"] == r["spill_load_bytes"] == r["local_bytes"] == 0
  if "-M8" in name or "-M64" in name:
    assert r["tensor_cores"] is not None  # the MMA kernels use tensor cores


@pytest.mark.slow
@pytest.mark.parametrize("shape", LLAMA3_8B, ids=lambda s: f"{s[1]}to{s[0]}")
@pytest.mark.parametrize("entry", [matmul, matmul_transposed], ids=lambda f: f.__name__)
def test_llama3_8b_gemv_has_no_spills(entry, shape):
  r = _compile(_kernel_call(entry, 1, shape))
  assert r["spill_store_bytes"] == r["spill_load_bytes"] == r["stack_bytes"] == 0
  assert r["programs"] >= 264

"""NF4 dequantize kernels: bit-exact in interpret mode, CUDA lowering, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jqlora.format import DYNAMIC_MAP_SIGNED, NF4Tensor, dequantize_absmax
from pallas_kernels import common, testing
from pallas_kernels.nf4_dequantize import api, dequantize, dequantize_reference, mosaic_gpu

DTYPES = [jnp.bfloat16, jnp.float16, jnp.float32]


def _bits(a) -> np.ndarray:
  return np.asarray(a).view(np.uint8)


@pytest.mark.parametrize("case", testing.DEQUANTIZE_CASES, ids=testing.case_id)
def test_interpret_is_bit_exact(case):
  testing.check_dequantize(case, interpret=testing.INTERPRET)


def test_block_size_128_and_default_dtype():
  t = testing.make_weight((32, 256), block_size=128)
  got = jax.jit(lambda t: dequantize(t, interpret=testing.INTERPRET))(t)
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(_bits(got), _bits(dequantize_reference(t)))


def _fma_sensitive_tensor(n_blocks: int = 512) -> tuple[NF4Tensor, np.ndarray]:
  """A double-quantized tensor whose scales differ between FMA and two roundings.

  Returns the tensor and the float32 scales bitsandbytes computes
  (``round(round(code2 * absmax2) + offset)``).
  """
  rng = np.random.default_rng(0)
  n_groups = n_blocks // 256
  codes = rng.integers(0, 256, n_blocks).astype(np.uint8)
  absmax2 = rng.uniform(0.5, 2.0, n_groups).astype(np.float32)
  offset = np.float32(0.3712)
  code2 = DYNAMIC_MAP_SIGNED[codes]
  nested = np.repeat(absmax2, 256)
  two_roundings = (code2 * nested).astype(np.float32) + offset
  fused = (code2.astype(np.float64) * nested + offset).astype(np.float32)
  # The case is only informative if a fused multiply-add would get many scales wrong.
  assert np.mean(two_roundings != fused) > 0.2
  packed = rng.integers(0, 256, n_blocks * 32).astype(np.uint8)
  t = NF4Tensor.from_bnb(packed, codes, shape=(n_blocks // 4, 256), dtype=jnp.float32,
                         absmax2=absmax2, offset=offset)
  return t, two_roundings


def test_rounded_product_keeps_xla_from_fusing_multiply_add():
  rng = np.random.default_rng(1)
  a = DYNAMIC_MAP_SIGNED[rng.integers(0, 256, 4096)]
  b = rng.uniform(0.5, 2.0, 4096).astype(np.float32)
  c = np.float32(0.3712)
  two_roundings = (a * b).astype(np.float32) + c
  naive = jax.jit(lambda a, b, c: a * b + c)(a, b, c)
  ours = jax.jit(lambda a, b, c: common.rounded_product(a, b) + c)(a, b, c)
  assert np.mean(np.asarray(naive) != two_roundings) > 0.05  # XLA contracts a*b+c here
  np.testing.assert_array_equal(np.asarray(ours), two_roundings)


def test_double_quant_scales_round_product_and_sum_separately():
  t, scales = _fma_sensitive_tensor()
  np.testing.assert_array_equal(np.asarray(dequantize_absmax(t)), scales)
  got = jax.jit(lambda t: dequantize(t, jnp.float32, interpret=testing.INTERPRET))(t)
  np.testing.assert_array_equal(_bits(got), _bits(dequantize_reference(t, jnp.float32)))


def test_vmap_over_stacked_leaves():
  ts = [testing.make_weight((64, 128), seed=s) for s in range(3)]
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *ts)
  got = jax.jit(jax.vmap(lambda t: dequantize(t, jnp.bfloat16, interpret=testing.INTERPRET)))(stacked)
  for i, t in enumerate(ts):
    np.testing.assert_array_equal(_bits(got[i]), _bits(dequantize_reference(t, jnp.bfloat16)))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_mosaic_tile_arithmetic_is_bit_exact(dtype):
  # Neither Pallas interpreter runs the Mosaic GPU kernel on a CPU (see the module
  # docstring); its per-tile arithmetic is a pure function, checked here on whole arrays.
  t = testing.make_weight((5, 7 * 64 + 3), double_quant=True)
  packed = api._blocks(t)
  scales = jnp.broadcast_to(dequantize_absmax(t)[:, None], packed.shape)
  values = mosaic_gpu.words_to_values(mosaic_gpu.decode_tile(packed, scales, dtype), dtype)
  got = values.reshape(-1)[:t.size].reshape(t.shape)
  np.testing.assert_array_equal(_bits(got), _bits(dequantize_reference(t, dtype)))


@pytest.mark.parametrize("implementation", api.IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=lambda d: jnp.dtype(d).name)
def test_lowers_for_cuda(implementation, dtype):
  t = testing.make_weight((192, 320))
  text = testing.lower_for_cuda(
      lambda t: dequantize(t, dtype, implementation=implementation), t)
  target = "xla.gpu.triton" if implementation == "triton" else "mosaic_gpu"
  assert target in text


def test_bad_input():
  t = testing.make_weight((64, 128))
  with pytest.raises(TypeError, match="expected an NF4Tensor"):
    dequantize(jnp.zeros((64, 128)))
  with pytest.raises(ValueError, match="dtype must be one of"):
    dequantize(t, jnp.int8, interpret=testing.INTERPRET)
  with pytest.raises(NotImplementedError, match="cannot be interpreted"):
    dequantize(t, jnp.bfloat16, interpret=True, implementation="mosaic_gpu")
  stacked = jax.tree.map(lambda a: jnp.stack([a, a]), t)
  with pytest.raises(ValueError, match="unstacked with jax.vmap"):
    dequantize(stacked, interpret=testing.INTERPRET)

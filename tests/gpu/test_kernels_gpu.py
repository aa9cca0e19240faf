"""The kernel case lists compiled and run on a GPU (``interpret=False``), Mosaic GPU included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jqlora.format import quantize_4bit
from jqlora.ops import dequantize_nf4, nf4_matmul
from pallas_kernels import testing
from pallas_kernels.nf4_dequantize import dequantize_reference


@pytest.mark.parametrize("implementation", ["triton", "mosaic_gpu"])
@pytest.mark.parametrize("case", testing.DEQUANTIZE_CASES, ids=testing.case_id)
def test_dequantize_is_bit_exact(case, implementation):
  testing.check_dequantize(case, interpret=False, implementation=implementation)


@pytest.mark.parametrize("case", testing.MATMUL_CASES, ids=testing.case_id)
def test_matmul_matches_references(case):
  testing.check_matmul(case, interpret=False)


@pytest.mark.parametrize("quant_type", ["fp4", "int4"])
def test_other_code_tables(quant_type):
  t = quantize_4bit(2.0 * jax.random.normal(jax.random.key(0), (192, 320)), quant_type=quant_type)
  got = jax.jit(lambda t: dequantize_nf4(t, jnp.bfloat16, backend="pallas"))(t)
  np.testing.assert_array_equal(np.asarray(got).view(np.uint16),
                                np.asarray(dequantize_reference(t, jnp.bfloat16)).view(np.uint16))


@pytest.mark.parametrize("m", [1, 16, 256])
def test_llama_shaped_gradients_match_xla(m):
  # One q/o-sized projection through the custom VJP, Pallas against the XLA path.
  t = testing.make_weight((4096, 4096))
  x = testing.make_activations((m, 4096), jnp.bfloat16)
  loss = lambda x, backend: jnp.sum(nf4_matmul(x, t, backend=backend).astype(jnp.float32) ** 2)
  y_p, g_p = jax.jit(jax.value_and_grad(lambda x: loss(x, "pallas")))(x)
  y_x, g_x = jax.jit(jax.value_and_grad(lambda x: loss(x, "xla")))(x)
  np.testing.assert_allclose(float(y_p), float(y_x), rtol=2e-2)
  np.testing.assert_allclose(np.asarray(g_p, np.float32), np.asarray(g_x, np.float32),
                             rtol=5e-2, atol=5e-2 * float(jnp.max(jnp.abs(g_x.astype(jnp.float32)))))

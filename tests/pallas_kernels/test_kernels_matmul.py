"""Fused NF4 matmul kernels: interpret mode against the references, CUDA lowering, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jqlora.format import dequantize_reference
from pallas_kernels import testing
from pallas_kernels.nf4_matmul import (
  matmul,
  matmul_reference,
  matmul_transposed,
  matmul_transposed_reference,
  triton,
)

# Each M once per activation dtype; shapes and single/double quantization rotate.
CASES = [(m, dtype, testing.SHAPES[i % 3], i % 2 == 0)
         for i, (m, dtype) in enumerate((m, d) for m in testing.M_VALUES
                                        for d in (jnp.bfloat16, jnp.float32))]


def _ids(case):
  m, dtype, shape, dq = case
  return f"M{m}-{jnp.dtype(dtype).name}-{shape[0]}x{shape[1]}-{'dq' if dq else 'sq'}"


def _assert_close(got, want, a, b, k):
  bound = testing.float32_sum_bound(a, b, want, k)
  err = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
  assert got.dtype == want.dtype and got.shape == want.shape
  assert np.all(err <= bound), f"max excess {np.max(err - bound)}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_forward_and_transposed_match_references(case):
  m, dtype, shape, double_quant = case
  t = testing.make_weight(shape, double_quant)
  x = testing.make_activations((m, shape[1]), dtype)
  dy = testing.make_activations((m, shape[0]), dtype, seed=2)
  y, dx = jax.jit(lambda x, dy, t: (matmul(x, t, interpret=testing.INTERPRET),
                                    matmul_transposed(dy, t, interpret=testing.INTERPRET)))(x, dy, t)
  w = np.asarray(dequantize_reference(t, dtype), np.float64)
  _assert_close(y, matmul_reference(x, t), x, w.T, shape[1])
  _assert_close(dx, matmul_transposed_reference(dy, t), dy, w, shape[0])


def test_leading_axes_and_empty_rows():
  t = testing.make_weight((64, 128))
  x = testing.make_activations((2, 1, 128), jnp.bfloat16)
  y = jax.jit(lambda x: matmul(x, t, interpret=testing.INTERPRET))(x)
  assert y.shape == (2, 1, 64)
  one = matmul(x[1], t, interpret=testing.INTERPRET)
  np.testing.assert_array_equal(np.asarray(y[1, 0]), np.asarray(one[0]))
  assert matmul(jnp.zeros((0, 128), jnp.bfloat16), t, interpret=testing.INTERPRET).shape == (0, 64)
  assert matmul_transposed(jnp.zeros((3, 0, 64)), t, interpret=testing.INTERPRET).shape == (3, 0, 128)


def test_path_choice():
  t = testing.make_weight((192, 320))
  assert [triton.kind(m, t) for m in (1, 3, 4, 64, 65)] == ["gemv", "gemv", "mma", "mma", None]
  assert triton.kind(8, testing.make_weight((40, 64))) is None  # out=40: no 16-row MMA tile


@pytest.mark.parametrize("m", [1, 8, 256])
@pytest.mark.parametrize("entry", [matmul, matmul_transposed], ids=lambda f: f.__name__)
def test_lowers_for_cuda(entry, m):
  t = testing.make_weight((192, 320))
  k = 192 if entry is matmul_transposed else 320
  text = testing.lower_for_cuda(entry, jnp.zeros((m, k), jnp.bfloat16), t)
  assert text.count("xla.gpu.triton") == 1


@pytest.mark.parametrize("bad,match", [
    (lambda t: matmul(jnp.zeros((4, 96), jnp.bfloat16), t), r"needs x\[..., 128\]"),
    (lambda t: matmul(jnp.zeros((4, 128), jnp.int32), t), "dtype must be one of"),
    (lambda t: matmul_transposed(jnp.zeros((4, 128)), t), r"needs x\[..., 64\]"),
    (lambda t: matmul(jnp.zeros((4, 96)), testing.make_weight((64, 96))), "not a multiple"),
    (lambda t: matmul(jnp.zeros((4, 16)), testing.make_weight((4, 4, 16), block_size=32)),
     "must be 2-D"),
])
def test_bad_input(bad, match):
  with pytest.raises(ValueError, match=match):
    bad(testing.make_weight((64, 128)))

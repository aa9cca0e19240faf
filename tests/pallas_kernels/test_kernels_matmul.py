"""Fused NF4 matmul kernels: interpret mode against the references, CUDA lowering, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import testing
from pallas_kernels.nf4_matmul import matmul, matmul_transposed, triton


@pytest.mark.parametrize("case", testing.MATMUL_CASES, ids=testing.case_id)
def test_forward_and_transposed_match_references(case):
  testing.check_matmul(case, interpret=testing.INTERPRET)


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

"""jqlora.ops: backend choice and nf4_matmul (forward, custom VJP, residuals, scan/vmap, errors)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqlora
from jqlora import ops
from jqlora.format import dequantize_reference
from jqlora.kernels import native
from pallas_kernels import testing
from pallas_kernels.nf4_matmul import matmul_reference

SHAPE = (192, 320)
NATIVE = pytest.param("native", marks=pytest.mark.skipif(
    not native.available(), reason="native NF4 kernel not built (no C compiler?)"))


def _dense_loss(x, t):
  w = dequantize_reference(t, x.dtype)
  return jnp.sum(jnp.dot(x, w.T, preferred_element_type=jnp.float32) ** 2)


def test_automatic_backend_order(monkeypatch):
  t = testing.make_weight((64, 128))
  x = jnp.zeros((2, 128), jnp.float32)
  assert ops.NF4_MATMUL.order(x, t) == ["xla"]  # nf4_matmul on the CPU: XLA's own decode
  decode = ["native", "xla"] if native.available() and native.isa() >= 1 else ["xla"]
  assert ops.DEQUANTIZE.order(t, jnp.float32) == ops.DEQUANTIZE.order(t, jnp.bfloat16) == decode
  assert ops.DEQUANTIZE.order(t, jnp.float16) == ["xla"]  # the native kernel has no float16
  assert ops.NF4_MATMUL.order(x, t, backend="interpret") == ["interpret"]
  assert ops.NF4_MATMUL.order(x, t, backend=("pallas", "xla")) == ["pallas", "xla"]
  monkeypatch.setenv(ops.ENV_VAR, "mosaic_gpu, xla")  # one switch for every op
  assert ops.DEQUANTIZE.order(t, jnp.float32) == ["mosaic_gpu", "xla"]
  assert ops.NF4_MATMUL.order(x, t) == ["xla"]  # names an op lacks are skipped
  with pytest.raises(ValueError, match="backend must be one of"):
    ops.NF4_MATMUL.order(x, t, backend="cuda")
  monkeypatch.setenv(ops.ENV_VAR, "cuda_c")
  with pytest.raises(ValueError, match="names none of its backends"):
    jqlora.dequantize_nf4(t)


@pytest.mark.parametrize("backend", ["xla", NATIVE, testing.KERNEL_BACKEND])
def test_forward_matches_reference(backend):
  t = testing.make_weight(SHAPE)
  x = testing.make_activations((2, 3, SHAPE[1]), jnp.bfloat16)
  y = jax.jit(lambda x, t: jqlora.nf4_matmul(x, t, backend=backend))(x, t)
  want = matmul_reference(x, t)
  assert y.shape == (2, 3, SHAPE[0]) and y.dtype == jnp.bfloat16
  w = np.asarray(dequantize_reference(t, jnp.bfloat16), np.float64)
  bound = testing.float32_sum_bound(x.reshape(6, -1), w.T, want.reshape(6, -1), SHAPE[1])
  assert np.all(np.abs(np.asarray(y, np.float64) - np.asarray(want, np.float64)).reshape(6, -1) <= bound)


@pytest.mark.parametrize("backend", ["xla", NATIVE, testing.KERNEL_BACKEND])
def test_grad_matches_dense(backend):
  t = testing.make_weight(SHAPE, double_quant=False)
  x = testing.make_activations((4, SHAPE[1]), jnp.float32)
  loss = lambda x: jnp.sum(jqlora.nf4_matmul(x, t, backend=backend).astype(jnp.float32) ** 2)
  got = jax.jit(jax.grad(loss))(x)
  want = jax.grad(_dense_loss)(x, t)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", ["xla", NATIVE])
def test_no_float_weight_residual_and_no_weight_gradient(backend):
  t = testing.make_weight(SHAPE)
  x = testing.make_activations((8, SHAPE[1]), jnp.bfloat16)
  y, vjp = jax.vjp(lambda x, w: jqlora.nf4_matmul(x, w, backend=backend), x, t)
  residuals = jax.tree_util.tree_leaves(vjp)
  # The saved residuals are exactly W's storage: packed codes, scale codes, nested scales, offset.
  assert [(r.shape, r.dtype) for r in residuals] == [
      (leaf.shape, leaf.dtype) for leaf in jax.tree_util.tree_leaves(t)]
  assert not any(jnp.issubdtype(r.dtype, jnp.floating) and r.size >= SHAPE[0] * SHAPE[1]
                 for r in residuals)
  dx, dw = vjp(jnp.ones_like(y))
  assert dx.shape == x.shape and dx.dtype == x.dtype
  assert dw.packed.dtype == jax.dtypes.float0 and dw.absmax.dtype == jax.dtypes.float0
  assert not np.any(np.asarray(dw.absmax2)) and not np.any(np.asarray(dw.offset))
  # The forward rule's residual pytree is the NF4Tensor itself.
  _, saved = ops.NF4_MATMUL.implementations[backend].fn.fwd(x, t)
  assert saved is t


def test_scan_and_vmap_over_stacked_layers():
  layers = [testing.make_weight((64, 64), seed=s) for s in range(3)]
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *layers)
  x = testing.make_activations((2, 64), jnp.float32)

  def body(h, w):
    return jnp.tanh(jqlora.nf4_matmul(h, w, backend=testing.KERNEL_BACKEND)), None

  got, _ = jax.jit(lambda x, s: jax.lax.scan(body, x, s))(x, stacked)
  want = x
  for w in layers:
    want = jnp.tanh(matmul_reference(want, w))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
  ys = jax.vmap(lambda w: jqlora.nf4_matmul(x, w, backend=testing.KERNEL_BACKEND))(stacked)
  np.testing.assert_allclose(np.asarray(ys[1]), np.asarray(matmul_reference(x, layers[1])),
                             rtol=1e-5, atol=1e-5)


def test_grad_lowers_for_cuda():
  t = testing.make_weight(SHAPE)
  loss = lambda x, t: jnp.sum(jqlora.nf4_matmul(x, t, backend="pallas").astype(jnp.float32) ** 2)
  for m in (1, 16, 128):
    text = testing.lower_for_cuda(jax.grad(loss), jnp.zeros((m, SHAPE[1]), jnp.bfloat16), t)
    assert text.count("xla.gpu.triton") == 2  # forward and input-gradient kernels


@pytest.mark.parametrize("backend", ["xla", "interpret", "pallas"])
def test_bad_input_raises_before_any_kernel(backend):
  t = testing.make_weight((64, 128))
  with pytest.raises(ValueError, match=r"needs x\[..., 128\]"):
    jqlora.nf4_matmul(jnp.zeros((2, 64), jnp.bfloat16), t, backend=backend)
  with pytest.raises(ValueError, match="dtype must be one of"):
    jqlora.nf4_matmul(jnp.zeros((2, 128), jnp.int8), t, backend=backend)
  with pytest.raises(ValueError, match="not a multiple of its block_size"):
    jqlora.nf4_matmul(jnp.zeros((2, 96)), testing.make_weight((64, 96)), backend=backend)
  stacked = jax.tree.map(lambda a: jnp.stack([a, a]), t)
  with pytest.raises(ValueError, match="unstacked with jax.vmap or jax.lax.scan"):
    jqlora.nf4_matmul(jnp.zeros((2, 128)), stacked, backend=backend)
  with pytest.raises(TypeError, match="expected an NF4Tensor"):
    jqlora.nf4_matmul(jnp.zeros((2, 128)), jnp.zeros((64, 128)), backend=backend)

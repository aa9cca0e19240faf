"""FP4 (bitsandbytes' E2M1) byte for byte against the installed bitsandbytes, and the Int4 baseline."""

import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jqlora
from jqlora.format import CODES, FP4_CODE, INT4_CODE, nf4

torch = pytest.importorskip("torch")
bnbf = pytest.importorskip("bitsandbytes.functional")

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def test_fp4_table_is_bitsandbytes():
  theirs = bnbf.get_4bit_type("fp4", device="cpu").numpy()
  assert FP4_CODE.tobytes() == theirs.tobytes()  # bit for bit, +0.0 at code 8 too
  assert sorted(FP4_CODE.tolist()) == sorted(CODES["fp4"].tolist())


# Same level as NF4's live test (tests/format/test_nf4.py): codes, scales, nested scales and
# offset equal; dequantized output equal bit for bit. Zeros and tiny values test the +0/-0 pair.
_SLOW = pytest.mark.slow
LIVE = [((128, 256), "float32", 64, True), pytest.param((300, 77), "bfloat16", 32, True, marks=_SLOW),
        ((1000,), "float16", 128, False), pytest.param((64, 4096), "float32", 4096, True, marks=_SLOW),
        ((17, 1024), "bfloat16", 256, False), ((513, 65), "float32", 64, False),
        pytest.param((7, 333), "float32", 64, True, marks=_SLOW),
        pytest.param((2, 999), "float32", 256, False, marks=_SLOW)]


def _input(shape, dtype, block_size):
  rng = np.random.default_rng(zlib.crc32(repr(("fp4", shape, dtype, block_size)).encode()))
  x32 = (rng.standard_normal(shape) * rng.uniform(0.01, 5)).astype(np.float32)
  flat = x32.reshape(-1)
  flat[::11] = 0.0
  flat[1::13] *= 1e-3  # within half a step of zero: the ±0 codes
  return x32


@pytest.mark.parametrize("shape,dtype,block_size,double", LIVE)
def test_live_bitsandbytes_fp4(shape, dtype, block_size, double):
  x32 = _input(shape, dtype, block_size)
  x = x32.astype(DTYPES[dtype])
  xt = torch.from_numpy(x32).to(getattr(torch, dtype))
  q, s = bnbf.quantize_4bit(xt, blocksize=block_size, quant_type="fp4", compress_statistics=double)
  t = jqlora.quantize_4bit(jnp.asarray(x), "fp4", block_size, double)
  assert t.quant_type == "fp4" and t.shape == shape and t.dtype == jnp.dtype(DTYPES[dtype])

  np.testing.assert_array_equal(np.asarray(t.packed).reshape(-1), q.numpy().reshape(-1))
  state = {}
  if double:
    np.testing.assert_array_equal(np.asarray(t.absmax).reshape(-1), s.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(t.absmax2), s.state2.absmax.numpy())
    assert np.asarray(t.offset).tobytes() == s.offset.numpy().astype(np.float32).tobytes()
    state = dict(absmax2=s.state2.absmax.numpy(), offset=s.offset.numpy())
  else:
    assert np.asarray(t.absmax).reshape(-1).tobytes() == s.absmax.numpy().tobytes()
  loaded = jqlora.NF4Tensor.from_bnb(q.numpy(), s.absmax.numpy(), shape=shape, dtype=x.dtype,
                                     block_size=block_size, quant_type="fp4", **state)
  # bnb's CPU C kernel is wrong on rows shorter than a block (see GOLDEN_README.md): there,
  # compare with its pure-torch implementation, which the CUDA kernel agrees with.
  if shape[-1] >= block_size or len(shape) == 1:
    ref = bnbf.dequantize_4bit(q, s).float().numpy().reshape(shape)
  else:
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    scales = bnbf.dequantize_blockwise(s.absmax, s.state2) + s.offset if double else s.absmax
    ref = _dequantize_4bit_compute(q.reshape(-1), scales, s.code, block_size, shape,
                                   getattr(torch, dtype)).float().numpy()
  for fn in (jqlora.dequantize_nf4, jax.jit(jqlora.dequantize_nf4)):
    got = np.asarray(fn(loaded)).astype(np.float32)
    # Equal values; the sign of a zero may differ: code 8 is +0.0 in bnb's table (and here),
    # while its float16 CPU kernel decodes the sign bit into -0.0.
    np.testing.assert_array_equal(got, ref)
    assert (got.view(np.uint32) != ref.view(np.uint32)).sum() == ((got == 0) & (
        np.signbit(got) != np.signbit(ref))).sum()
  np.testing.assert_array_equal(np.asarray(t.packed), np.asarray(loaded.packed))


def test_fp4_codes_of_zero_and_padding():
  # bitsandbytes' search goes through the stable argsort: (-half step, 0] -> code 0 (+0), and
  # (0, half step] -> code 8 (also +0); odd counts are padded with the code of 0.0, which is 0.
  x = np.array([1.0, 0.0, 1e-4, -1e-4, -1.0], np.float32)
  t = jqlora.quantize_4bit(x, "fp4", double_quant=False)
  q, _ = bnbf.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type="fp4")
  assert np.asarray(t.packed).tolist() == q.numpy().reshape(-1).tolist() == [0x30, 0x80, 0xB0]


def test_fp4_bnb_roundtrip_names_its_quant_state():
  t = jqlora.quantize_4bit(jnp.asarray(_input((64, 128), "float32", 64)), "fp4")
  out = t.to_bnb("w")
  assert "w.quant_state.bitsandbytes__fp4" in out
  assert out["w.quant_map"].tobytes() == FP4_CODE.tobytes()
  back = jqlora.NF4Tensor.from_bnb(out["w"], out["w.absmax"], shape=t.shape, dtype=t.dtype,
                                   absmax2=out["w.nested_absmax"], offset=t.offset,
                                   quant_type="fp4")
  np.testing.assert_array_equal(np.asarray(jqlora.dequantize_nf4(back)),
                                np.asarray(jqlora.dequantize_nf4(t)))
  with pytest.raises(ValueError, match="int4 is not a bitsandbytes format"):
    jqlora.quantize_4bit(np.ones(64, np.float32), "int4").to_bnb()


# -- Int4: symmetric absmax per block, q / 7 for q in -7..7 -------------------------------------

def test_int4_is_nearest_of_fifteen_levels():
  rng = np.random.default_rng(4)
  x = rng.standard_normal((48, 256)).astype(np.float32)
  t = jqlora.quantize_4bit(jnp.asarray(x), "int4", 64, double_quant=False)
  y = np.asarray(jqlora.dequantize_nf4(t))
  scale = np.abs(x.reshape(-1, 64)).max(1, keepdims=True)
  q = np.rint(x.reshape(-1, 64) / scale * 7)
  # Ties go to the lower level; away from ties this is round-to-nearest.
  tie = np.abs(np.abs(x.reshape(-1, 64) / scale * 7 % 1) - 0.5) < 1e-5
  expect = (q.astype(np.float32) / np.float32(7) * scale).reshape(x.shape)
  np.testing.assert_allclose(y[~tie.reshape(x.shape)], expect[~tie.reshape(x.shape)], rtol=1e-6)
  levels = np.unique(np.rint(y.reshape(-1, 64) / scale * 7))
  assert levels.min() == -7 and levels.max() == 7 and len(levels) == 15
  assert np.abs(y - x).max() <= scale.max() / 14 * (1 + 1e-5)
  assert len(np.unique(INT4_CODE)) == 15


@pytest.mark.slow
def test_mean_error_ordering_on_gaussian_weights():
  # On normal data NF4 is the best 4-bit code book, then FP4, then Int4 (the paper's premise).
  x = jnp.asarray(np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32))
  err = {k: float(jnp.abs(jqlora.dequantize_nf4(jqlora.quantize_4bit(x, k)) - x).mean())
         for k in CODES}
  assert err["nf4"] < err["fp4"] and err["nf4"] < err["int4"]
  assert abs(err["nf4"] - 0.0728) < 2e-3  # the figure of ../shared/notes/nf4-format.md


# -- the tensor type and the backends ---------------------------------------------------------

@pytest.mark.parametrize("quant_type", ["fp4", "int4"])
def test_pytree_keeps_quant_type_and_backends_agree(quant_type):
  x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 64, 128)).astype(np.float32))
  ts = [jqlora.quantize_4bit(x[i], quant_type) for i in range(4)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *ts)
  assert stacked.quant_type == quant_type and f"quant_type='{quant_type}'" in repr(stacked)
  leaves, treedef = jax.tree.flatten(ts[0])
  assert jax.tree.unflatten(treedef, leaves).quant_type == quant_type
  assert treedef != jax.tree.structure(jqlora.quantize_nf4(x[0]))  # a static field, not a leaf

  ref = np.stack([np.asarray(nf4.dequantize_reference(t)) for t in ts])
  np.testing.assert_array_equal(np.asarray(jax.vmap(jqlora.dequantize_nf4)(stacked)), ref)
  for backend in ("xla", "native", "interpret", None):  # the Pallas kernel takes the table too
    got = jax.jit(lambda t, b=backend: jqlora.dequantize_nf4(t, backend=b))(ts[0])
    assert np.asarray(got).tobytes() == ref[0].tobytes(), backend


@pytest.mark.slow
@pytest.mark.parametrize("quant_type", ["fp4", "int4"])
def test_matmul_and_its_gradient(quant_type):
  rng = np.random.default_rng(2)
  w = jqlora.quantize_4bit(jnp.asarray(rng.standard_normal((96, 128)).astype(np.float32)),
                           quant_type)
  x = jnp.asarray(rng.standard_normal((3, 128)).astype(np.float32))
  dense = jqlora.dequantize_nf4(w)
  y = jqlora.nf4_matmul(x, w)
  np.testing.assert_allclose(np.asarray(y), np.asarray(x @ dense.T), rtol=1e-5, atol=1e-5)
  dx = jax.grad(lambda x: jqlora.nf4_matmul(x, w).sum())(x)
  np.testing.assert_allclose(np.asarray(dx), np.asarray(jnp.ones((3, 96)) @ dense),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(jqlora.nf4_matmul(x, w, backend="interpret")),
                             np.asarray(y), rtol=1e-5, atol=1e-5)


def test_rejects_unknown_quant_type():
  with pytest.raises(ValueError, match="quant_type must be one of"):
    jqlora.quantize_4bit(np.ones(64, np.float32), "af4")
  with pytest.raises(ValueError, match="quant_type must be one of"):
    jqlora.NF4Tensor.from_bnb(np.zeros(32, np.uint8), np.ones(1, np.float32), shape=(64,),
                              dtype="float32", quant_type="e3m0")

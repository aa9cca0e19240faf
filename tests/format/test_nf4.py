"""NF4 core: bit-exactness against bitsandbytes, properties, transforms, errors."""

import json
import zlib

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

import jqlora
from jqlora.format import nf4

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


@pytest.fixture(scope="module")
def golden(data_dir):
  return np.load(data_dir / "bnb_nf4_golden.npz")


def _cases(data_dir):
  index = np.load(data_dir / "bnb_nf4_golden.npz")["index"]
  return [str(k) for k in index]


def test_codebooks_match_bitsandbytes(golden):
  np.testing.assert_array_equal(nf4.NF4_CODE, golden["nf4_code"])
  # Built with torch's float32 linspace arithmetic: must match bit for bit.
  assert nf4.DYNAMIC_MAP_SIGNED.tobytes() == golden["dynamic_map_signed"].tobytes()


def test_golden_case_count(golden):
  assert len(golden["index"]) == 108


@pytest.mark.parametrize("key", _cases(__import__("pathlib").Path(__file__).parents[1] / "data"))
def test_golden(golden, key):
  p, _, shape, dtype, block_size, double = key.split("|")
  shape, block_size, double = tuple(json.loads(shape)), int(block_size), double == "1"
  x = golden[p + "input_f32"].astype(DTYPES[dtype]).reshape(shape)

  t = jqlora.quantize_nf4(jnp.asarray(x), block_size=block_size, double_quant=double)
  assert t.shape == shape and t.dtype == jnp.dtype(DTYPES[dtype])
  np.testing.assert_array_equal(np.asarray(t.packed).reshape(-1), golden[p + "packed"])
  if double:
    # Byte-exact, beyond the tolerance (2 % of nested codes one step away).
    np.testing.assert_array_equal(np.asarray(t.absmax).reshape(-1), golden[p + "absmax_q"])
    assert np.asarray(t.offset).tobytes() == golden[p + "offset"].astype(np.float32).tobytes()
    np.testing.assert_array_equal(np.asarray(t.absmax2), golden[p + "absmax2"])
    state = dict(absmax2=golden[p + "absmax2"], offset=golden[p + "offset"])
    absmax = golden[p + "absmax_q"]
  else:
    np.testing.assert_array_equal(np.asarray(t.absmax).reshape(-1), golden[p + "absmax"])
    state, absmax = {}, golden[p + "absmax"]

  ref = golden[p + "dequant_f32"].reshape(shape)
  loaded = jqlora.NF4Tensor.from_bnb(golden[p + "packed"], absmax, shape=shape, dtype=x.dtype,
                                     block_size=block_size, **state)
  for fn in (jqlora.dequantize_nf4, jax.jit(jqlora.dequantize_nf4)):
    y = np.asarray(fn(loaded))
    assert y.dtype == x.dtype
    assert y.astype(np.float32).tobytes() == ref.astype(np.float32).tobytes()


# -- live cross-check against the installed bitsandbytes ----------------------

LIVE = [((128, 256), "float32", 64, True), ((300, 77), "bfloat16", 32, True),
        ((1000,), "float16", 128, False), ((64, 4096), "float32", 4096, True),
        ((17, 1024), "bfloat16", 256, False), ((513, 65), "float32", 64, False)]


@pytest.mark.parametrize("shape,dtype,block_size,double", LIVE)
def test_live_bitsandbytes(shape, dtype, block_size, double):
  torch = pytest.importorskip("torch")
  import bitsandbytes.functional as bnbf

  rng = np.random.default_rng(zlib.crc32(repr((shape, dtype, block_size)).encode()))
  x32 = (rng.standard_normal(shape) * rng.uniform(0.01, 5)).astype(np.float32)
  x = x32.astype(DTYPES[dtype])
  xt = torch.from_numpy(x32).to(getattr(torch, dtype))
  q, s = bnbf.quantize_4bit(xt, blocksize=block_size, quant_type="nf4", compress_statistics=double)
  t = jqlora.quantize_nf4(jnp.asarray(x), block_size=block_size, double_quant=double)

  np.testing.assert_array_equal(np.asarray(t.packed).reshape(-1), q.numpy().reshape(-1))
  if double:
    np.testing.assert_array_equal(np.asarray(t.absmax).reshape(-1), s.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(t.absmax2), s.state2.absmax.numpy())
    assert np.asarray(t.offset).tobytes() == s.offset.numpy().astype(np.float32).tobytes()
    loaded = jqlora.NF4Tensor.from_bnb(q.numpy(), s.absmax.numpy(), shape=shape, dtype=x.dtype,
                                       block_size=block_size, absmax2=s.state2.absmax.numpy(),
                                       offset=s.offset.numpy())
  else:
    np.testing.assert_array_equal(np.asarray(t.absmax).reshape(-1), s.absmax.numpy())
    loaded = jqlora.NF4Tensor.from_bnb(q.numpy(), s.absmax.numpy(), shape=shape, dtype=x.dtype,
                                       block_size=block_size)
  # (Rows are at least a block long here: bnb's CPU kernel is wrong on shorter ones.)
  ref = bnbf.dequantize_4bit(q, s).float().numpy().reshape(shape)
  got = np.asarray(jqlora.dequantize_nf4(loaded)).astype(np.float32)
  np.testing.assert_array_equal(got, ref)


# -- properties -------------------------------------------------------------

# One compilation per shape instead of one per operation keeps the property tests quick.
_quantize = jax.jit(jqlora.quantize_nf4, static_argnums=(1, 2))
_dequantize = jax.jit(jqlora.dequantize_nf4, static_argnums=1)

_NF4_HALF_GAP = float(np.max(np.diff(nf4.NF4_CODE)) / 2)
_DYN_HALF_GAP = float(np.max(np.diff(nf4.DYNAMIC_MAP_SIGNED)) / 2)

arrays = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float16]),
    shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=70),
    elements=st.floats(-1e3, 1e3, width=16, allow_nan=False, allow_infinity=False),
)


@settings(max_examples=40, deadline=None)
@given(x=arrays, block_size=st.sampled_from([32, 64, 256]), double=st.booleans())
@pytest.mark.slow
def test_roundtrip_error_within_step_bound(x, block_size, double):
  t = _quantize(x, block_size, double)
  y = np.asarray(_dequantize(t, jnp.float32)).reshape(-1)
  flat = x.astype(np.float32).reshape(-1)
  pad = -flat.size % block_size
  absmax = np.abs(np.pad(flat, (0, pad))).reshape(-1, block_size).max(1)
  absmax = np.repeat(absmax, block_size)[:flat.size]
  bound = absmax * _NF4_HALF_GAP * (1 + 1e-5) + 1e-30
  if double:
    # The decoded scale is off by at most half a step of the dynamic map (times the nested
    # absmax, itself at most max|absmax - mean|), and codes are at most 1 in magnitude.
    bound = bound + (absmax.max() * _DYN_HALF_GAP * (1 + 1e-5) + 1e-7 * absmax.max())
  assert np.all(np.abs(flat - y) <= bound)


@settings(max_examples=25, deadline=None)
@given(x=arrays, block_size=st.sampled_from([32, 64]), double=st.booleans())
@pytest.mark.slow
def test_codes_stable_under_requantization(x, block_size, double):
  t = _quantize(x, block_size, double)
  # Double quantization can decode a tiny block scale to <= 0 when a block's absmax is
  # far below the others' (the format's own limit, bitsandbytes alike): then signs flip.
  assume(bool(np.all(np.asarray(nf4.dequantize_absmax(t)) > 0)))
  again = _quantize(_dequantize(t, None), block_size, double)
  np.testing.assert_array_equal(np.asarray(again.packed), np.asarray(t.packed))
  if not double:
    np.testing.assert_array_equal(np.asarray(again.absmax), np.asarray(t.absmax))


def test_error_figures_match_notes():
  x = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
  y = np.asarray(jqlora.dequantize_nf4(jqlora.quantize_nf4(x, double_quant=False)))
  assert abs(np.abs(x - y).mean() - 0.0728) < 0.002


# -- transforms ---------------------------------------------------------------

def test_jit_quantize_equals_eager():
  x = jax.random.normal(jax.random.key(0), (96, 320), jnp.bfloat16)
  eager = jqlora.quantize_nf4(x)
  jitted = jax.jit(jqlora.quantize_nf4, static_argnums=(1, 2))(x, 64, True)
  np.testing.assert_array_equal(np.asarray(jitted.packed), np.asarray(eager.packed))
  for name in ("absmax", "absmax2", "offset"):
    np.testing.assert_array_equal(np.asarray(getattr(jitted, name)), np.asarray(getattr(eager, name)))
  assert jitted.shape == (96, 320) and jitted.dtype == jnp.bfloat16


def test_vmap_dequantize_over_stacked_axis():
  xs = jax.random.normal(jax.random.key(1), (3, 64, 128))
  ts = [jqlora.quantize_nf4(x) for x in xs]
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *ts)
  assert stacked.packed.shape == (3, 64, 64) and stacked.absmax2.shape == (3, 1)
  out = jax.vmap(jqlora.dequantize_nf4)(stacked)
  for i, t in enumerate(ts):
    np.testing.assert_array_equal(np.asarray(out[i]), np.asarray(jqlora.dequantize_nf4(t)))


def test_dequantize_dtype_and_device_put():
  t = jqlora.quantize_nf4(np.linspace(-2, 2, 4096, dtype=np.float32).reshape(64, 64))
  t = jax.device_put(t, jax.devices()[0])
  y16 = jqlora.dequantize_nf4(t, jnp.bfloat16)
  y32 = jqlora.dequantize_nf4(t)
  assert y16.dtype == jnp.bfloat16 and y32.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(y16), np.asarray(y32.astype(jnp.bfloat16)))


# -- storage and interop ------------------------------------------------------

def test_nbytes_4096_square_double_quant():
  t = jqlora.quantize_nf4(jnp.ones((4096, 4096), jnp.bfloat16))
  # codes + uint8 scales + float32 nested scale per 256 blocks + float32 offset
  expected = 4096 * 4096 // 2 + 4096 * 4096 // 64 + 4 * (4096 * 4096 // 64 // 256) + 4
  assert t.nbytes == expected == 8_654_852
  assert t.nbytes * 8 / (4096 * 4096) <= 4.127
  assert jqlora.quantize_nf4(jnp.ones((4096, 4096)), double_quant=False).nbytes == (
      4096 * 4096 // 2 + 4 * 4096 * 4096 // 64)


def test_odd_count_padded_with_code_7():
  t = jqlora.quantize_nf4(np.array([1.0, -1.0, 0.5], np.float32), double_quant=False)
  assert np.asarray(t.packed).tolist() == [0xF0, (12 << 4) | 7]


def test_to_bnb_matches_transformers_checkpoint(data_dir):
  saved = load_file(str(data_dir / "hf/tiny-llama/base-bnb-nf4/model.safetensors"))
  name = "model.layers.0.self_attn.q_proj.weight"
  state = json.loads(bytes(saved[f"{name}.quant_state.bitsandbytes__nf4"]))
  t = jqlora.NF4Tensor.from_bnb(saved[name], saved[f"{name}.absmax"], shape=state["shape"],
                                dtype=state["dtype"], block_size=state["blocksize"],
                                absmax2=saved[f"{name}.nested_absmax"],
                                offset=state["nested_offset"])
  out = t.to_bnb(name)
  assert set(out) == {k for k in saved if k.startswith(name)}
  for key, value in out.items():
    assert value.shape == saved[key].shape and value.dtype == saved[key].dtype, key
    np.testing.assert_array_equal(value, saved[key])


def test_pytree_roundtrip_and_metadata():
  t = jqlora.quantize_nf4(jnp.ones((64, 128)), block_size=32, double_quant=False)
  leaves, treedef = jax.tree.flatten(t)
  assert len(leaves) == 2  # packed and absmax; None leaves vanish
  back = jax.tree.unflatten(treedef, leaves)
  assert (back.shape, back.block_size, back.double_quant) == ((64, 128), 32, False)
  assert "NF4Tensor(shape=(64, 128)" in repr(back)


# -- bad input ---------------------------------------------------------------

def test_rejects_integer_input():
  with pytest.raises(TypeError, match="floating-point"):
    jqlora.quantize_nf4(np.arange(64))


def test_rejects_empty_input():
  with pytest.raises(ValueError, match="empty"):
    jqlora.quantize_nf4(np.zeros((0, 64), np.float32))


@pytest.mark.parametrize("block_size", [0, 16, 48, 8192, 63.5])
def test_rejects_bad_block_size(block_size):
  with pytest.raises(ValueError, match="block_size"):
    jqlora.quantize_nf4(np.ones(64, np.float32), block_size=block_size)


def test_reports_non_finite_count_and_first_index():
  x = np.ones((4, 8), np.float32)
  x[1, 3], x[2, 0], x[3, 7] = np.nan, np.inf, -np.inf
  with pytest.raises(ValueError, match=r"3 non-finite .* index \(1, 3\)"):
    jqlora.quantize_nf4(x)


def test_from_bnb_size_mismatches():
  packed = np.zeros(32, np.uint8)
  with pytest.raises(ValueError, match="packed has 32 bytes but shape .* needs 64"):
    jqlora.NF4Tensor.from_bnb(packed, np.ones(2, np.float32), shape=(8, 16), dtype=jnp.float32)
  with pytest.raises(ValueError, match="absmax has 3 entries .* 1 blocks"):
    jqlora.NF4Tensor.from_bnb(packed, np.ones(3, np.float32), shape=(8, 8), dtype=jnp.float32)
  with pytest.raises(ValueError, match="absmax2 has 2 entries"):
    jqlora.NF4Tensor.from_bnb(packed, np.ones(1, np.uint8), shape=(8, 8), dtype=jnp.float32,
                              absmax2=np.ones(2, np.float32), offset=0.0)
  with pytest.raises(ValueError, match="together"):
    jqlora.NF4Tensor.from_bnb(packed, np.ones(1, np.uint8), shape=(8, 8), dtype=jnp.float32,
                              absmax2=np.ones(1, np.float32))


def test_dequantize_rejects_non_nf4():
  with pytest.raises(TypeError, match="NF4Tensor"):
    jqlora.dequantize_nf4(np.ones(4))

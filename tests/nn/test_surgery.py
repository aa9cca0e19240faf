"""apply_lora, merge/unmerge, trainable_params, and that only adapters train."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jqlora
from jqlora import nn
from jqlora.format import quantize_nf4
from jqlora.nn.lora import LoraConfig


class ToyLM(nnx.Module):
  """A generic NNX model: two float layers, one NF4 layer and an LM head."""

  def __init__(self, rngs: nnx.Rngs):
    self.up = nnx.Linear(16, 32, rngs=rngs)
    self.mid = nn.Linear(quantize_nf4(jax.random.normal(rngs.params(), (32, 64)) * 0.1))
    self.down = nnx.Linear(32, 16, rngs=rngs)
    self.lm_head = nnx.Linear(16, 10, use_bias=False, rngs=rngs)

  def __call__(self, x):
    h = jax.nn.relu(self.up(x))
    h = jnp.concatenate([h, h], axis=-1)
    return self.lm_head(self.down(self.mid(h)))


def _randomize_b(model):
  """Non-zero B, and DoRA magnitudes away from their init."""
  for i, (_, m) in enumerate(jqlora.nn.lora_modules(model)):
    b = m.lora_b.get_value()
    m.lora_b.set_value(jax.random.normal(jax.random.key(i), b.shape, b.dtype) * 0.1)
    if m.use_dora:
      mag = m.lora_magnitude.get_value()
      m.lora_magnitude.set_value(mag * jax.random.uniform(jax.random.key(100 + i), mag.shape,
                                                           minval=0.5, maxval=1.5))


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_apply_lora_on_any_nnx_model(use_dora):
  model = ToyLM(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, 16))
  before = model(x)
  jqlora.apply_lora(model, LoraConfig(r=4, use_dora=use_dora), rngs=nnx.Rngs(1))
  assert model.mid.use_dora == use_dora
  assert isinstance(model.up, nn.LoRALinear) and isinstance(model.down, nn.LoRALinear)
  assert isinstance(model.mid, nn.QLoRALinear)
  assert type(model.lm_head) is nnx.Linear  # "all-linear" leaves the head alone
  np.testing.assert_allclose(model(x), before, atol=1e-6)  # B = 0
  with pytest.raises(ValueError, match="already has LoRA"):
    jqlora.apply_lora(model, LoraConfig(), rngs=nnx.Rngs(1))
  other = jqlora.apply_lora(ToyLM(nnx.Rngs(0)), LoraConfig(target_modules=["lm_head", "up"]),
                            rngs=nnx.Rngs(1))
  assert isinstance(other.lm_head, nn.LoRALinear) and isinstance(other.mid, nn.Linear)
  with pytest.raises(ValueError, match="matched no linear"):
    jqlora.apply_lora(ToyLM(nnx.Rngs(0)), LoraConfig(target_modules=["q_proj"]), rngs=nnx.Rngs(1))


def test_trainable_params_counts_nf4_by_elements(capsys):
  model = jqlora.apply_lora(ToyLM(nnx.Rngs(0)), LoraConfig(r=4), rngs=nnx.Rngs(1))
  trainable, total, percent = jqlora.trainable_params(model)
  lora = 4 * (16 + 32) + 4 * (64 + 32) + 4 * (32 + 16)
  base = 16 * 32 + 32 + 32 * 64 + 32 * 16 + 16 + 16 * 10
  assert (trainable, total) == (lora, lora + base)
  assert percent == pytest.approx(100 * lora / (lora + base))
  assert f"trainable params: {lora:,d} || all params: {lora + base:,d}" in capsys.readouterr().out


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merge_and_unmerge_float_bases(use_dora):
  model = jqlora.apply_lora(ToyLM(nnx.Rngs(0)),
                            LoraConfig(r=4, target_modules=["up", "down"], use_dora=use_dora),
                            rngs=nnx.Rngs(1))
  _randomize_b(model)
  x = jax.random.normal(jax.random.key(1), (4, 16))
  expected = model(x)
  w0 = np.array(model.up.weight.get_value())
  jqlora.merge_lora(model)
  assert model.up.merged
  assert not np.allclose(model.up.weight.get_value(), w0)
  np.testing.assert_allclose(model(x), expected, atol=1e-5)
  if use_dora:  # as PEFT: rows of the merged weight have the magnitudes as norms
    np.testing.assert_allclose(jnp.linalg.norm(model.up.weight.get_value(), axis=1),
                               model.up.lora_magnitude.get_value(), rtol=1e-5)
  jqlora.unmerge_lora(model)
  assert model.up.dora_norm is None
  np.testing.assert_allclose(model.up.weight.get_value(), w0, atol=1e-6)
  np.testing.assert_allclose(model(x), expected, atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merge_never_requantizes_nf4(use_dora):
  model = jqlora.apply_lora(ToyLM(nnx.Rngs(0)), LoraConfig(r=4, use_dora=use_dora),
                            rngs=nnx.Rngs(1))
  _randomize_b(model)
  x = jax.random.normal(jax.random.key(1), (4, 16))
  with pytest.raises(ValueError, match="export_hf_state_dict"):
    jqlora.merge_lora(model)
  merged = jqlora.merge_lora(model, copy=True)
  assert isinstance(model.mid, nn.QLoRALinear)  # the original is untouched
  assert type(merged.mid) is nn.Linear and not merged.mid.quantized
  np.testing.assert_allclose(merged(x), model(x), atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_pissa_keeps_the_output_and_refuses_nf4(use_dora):
  config = LoraConfig(r=4, init="pissa", target_modules=["up"], use_dora=use_dora)
  model = jqlora.apply_lora(ToyLM(nnx.Rngs(0)), config, rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(1), (4, 16))
  reference = ToyLM(nnx.Rngs(0))
  np.testing.assert_allclose(model(x), reference(x), atol=1e-5)
  if use_dora:  # the magnitude is initialised after PiSSA: the original weight's row norms
    np.testing.assert_allclose(model.up.lora_magnitude.get_value(),
                               jnp.linalg.norm(reference.up.kernel.get_value(), axis=0), rtol=1e-5)
  assert float(jnp.abs(model.up.lora_b.get_value()).max()) > 0
  with pytest.raises(ValueError, match="PiSSA|pissa"):
    jqlora.apply_lora(ToyLM(nnx.Rngs(0)), LoraConfig(r=4, init="pissa", target_modules=["mid"]),
                      rngs=nnx.Rngs(1))

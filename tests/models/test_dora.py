"""QDoRA on an NF4 Llama: only adapters and magnitudes train, and the adapter loads in PEFT on
the bitsandbytes model with the same logits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from torch_reference import bnb_float32_logits

import jqlora
from jqlora import nn
from jqlora.models import export_hf_state_dict
from jqlora.nn.lora import LoraConfig

from .test_lora_training import _frozen_leaves


@pytest.mark.slow
def test_qdora_trains_only_adapters_and_loads_in_peft(data_dir, tmp_path):
  folder = data_dir / "hf" / "tiny-llama" / "base-bnb-nf4"
  ids = np.load(data_dir / "hf" / "tiny-llama" / "reference_logits.npz")["input_ids"]
  model = jqlora.load_model(folder, dtype=jnp.float32, progress=False)
  config = LoraConfig(r=4, alpha=8, use_dora=True,
                      target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
  jqlora.apply_lora(model, config, rngs=nnx.Rngs(0))
  assert isinstance(model.layers.mlp.up_proj, nn.QLoRALinear)
  before = _frozen_leaves(model)
  magnitude0 = np.array(model.layers.mlp.down_proj.lora_magnitude.get_value())
  optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.LoRAParam)
  x = jnp.asarray(ids, jnp.int32)

  @nnx.jit
  def step(m, opt):
    def loss_fn(m):
      return optax.softmax_cross_entropy_with_integer_labels(m(x[:, :-1]), x[:, 1:]).mean()
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(m)
    opt.update(m, grads)
    return loss, grads

  losses = [float(step(model, optimizer)[0]) for _ in range(4)]
  _, grads = step(model, optimizer)
  assert losses[-1] < losses[0]
  flat = nnx.to_flat_state(grads)
  assert {path[-1] for path, _ in flat} == {"lora_a", "lora_b", "lora_magnitude"}
  assert all(isinstance(v, nnx.LoRAParam) for _, v in flat)
  after = _frozen_leaves(model)
  assert any(v.dtype == np.uint8 for v in after.values())
  for path, value in before.items():
    np.testing.assert_array_equal(after[path], value, err_msg=str(path))
  assert not np.allclose(model.layers.mlp.down_proj.lora_magnitude.get_value(), magnitude0)

  logits = np.asarray(model(x))
  jqlora.save_adapter(model, tmp_path)
  np.testing.assert_allclose(logits, bnb_float32_logits(folder, ids, adapter=tmp_path),
                             atol=1e-4, rtol=0)
  merged = jqlora.merge_lora(model, copy=True)  # a float copy with the DoRA factors folded in
  np.testing.assert_allclose(merged(x), logits, atol=1e-4, rtol=0)
  assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
  exported = dict(export_hf_state_dict(model))  # merged HF export folds the DoRA factor in too
  for i in range(model.config.num_hidden_layers):
    np.testing.assert_allclose(exported[f"model.layers.{i}.mlp.down_proj.weight"],
                               np.asarray(merged.layers.mlp.down_proj.weight.get_value()[i]),
                               atol=1e-6, rtol=0)

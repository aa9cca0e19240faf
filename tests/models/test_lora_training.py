"""Only adapters train: 10 optax steps on an NF4 Llama leave every base weight bit-identical."""

import jax
import numpy as np
import optax
from flax import nnx

import jqlora
from jqlora import nn
from jqlora.nn.lora import LoraConfig


def _frozen_leaves(model):
  state = nnx.state(model, nnx.Any(nn.NF4Weight, nn.Frozen))
  return {p: np.array(v) for p, v in jax.tree_util.tree_leaves_with_path(state)}


def test_only_adapters_train(tiny_model):
  model = tiny_model("tiny-llama", quantize=True)
  config = LoraConfig(r=4, dropout=0.1, rank_pattern={"model.layers.1.mlp.down_proj": 2})
  jqlora.apply_lora(model, config, rngs=nnx.Rngs(0))
  model.train()
  before = _frozen_leaves(model)
  lora_before = jax.tree.map(np.array, nnx.state(model, nnx.LoRAParam))
  optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.LoRAParam)
  ids = jax.random.randint(jax.random.key(0), (2, 12), 0, model.config.vocab_size)

  def loss_fn(m, ids):
    logits = m(ids[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  @nnx.jit
  def step(m, opt, ids):
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(m, ids)
    opt.update(m, grads)
    return loss, grads

  losses = []
  for _ in range(10):
    loss, grads = step(model, optimizer, ids)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  flat = nnx.to_flat_state(grads)
  assert flat and all(path[-1] in ("lora_a", "lora_b") and isinstance(v, nnx.LoRAParam)
                      for path, v in flat)
  after = _frozen_leaves(model)
  assert before.keys() == after.keys() and any(v.dtype == np.uint8 for v in after.values())
  for path, value in before.items():
    np.testing.assert_array_equal(after[path], value, err_msg=str(path))
  lora_after = nnx.state(model, nnx.LoRAParam)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), lora_before, lora_after)
  assert all(jax.tree.leaves(changed))
  down = model.layers.mlp.down_proj
  assert down.ranks == (4, 2, 4)
  assert not down.lora_a.get_value()[1, :, 2:].any()  # padded rank stays zero
  assert not down.lora_b.get_value()[1, 2:, :].any()

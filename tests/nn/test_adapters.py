"""Named adapters on a generic NNX model: add, switch, disable, one per row, and their errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jqlora
from jqlora import nn
from jqlora.format import quantize_nf4
from jqlora.nn import lora as lora_lib
from jqlora.nn.lora import LoraConfig


class ToyLM(nnx.Module):
  """Two float layers around an NF4 one."""

  def __init__(self, rngs: nnx.Rngs):
    self.up = nnx.Linear(16, 32, rngs=rngs)
    self.mid = nn.Linear(quantize_nf4(jax.random.normal(rngs.params(), (32, 64)) * 0.1))
    self.down = nnx.Linear(32, 16, rngs=rngs)

  def __call__(self, x):
    h = jax.nn.relu(self.up(x))
    return self.down(self.mid(jnp.concatenate([h, h], axis=-1)))


def _randomize_b(model, name, seed):
  """Non-zero B for adapter ``name`` of every layer."""
  for i, (_, m) in enumerate(nn.lora_modules(model)):
    w = nn.adapters.adapter_weights(m, name)
    b = jax.random.normal(jax.random.key(seed + i), w.b.shape) * 0.3
    nn.adapters.set_adapter_weights(m, name, w.a, b, w.scale, w.info.ranks)


def _two_adapters():
  model = ToyLM(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (3, 5, 16))
  base = model(x)
  jqlora.apply_lora(model, LoraConfig(r=4, target_modules=["up", "mid"]), rngs=nnx.Rngs(1))
  _randomize_b(model, "default", 10)
  first = model(x)
  nn.add_adapter(model, "b", LoraConfig(r=6, alpha=3, target_modules=["down", "mid"]),
                 rngs=nnx.Rngs(2))
  _randomize_b(model, "b", 20)
  return model, x, base, first


@pytest.mark.slow
def test_add_switch_and_disable():
  model, x, base, first = _two_adapters()
  assert nn.list_adapters(model) == ("default", "b") and nn.active_adapter(model) == "default"
  assert isinstance(model.down, nn.LoRALinear) and model.down.ranks == (0,)  # only "b" adapts it
  assert (model.up.rank, model.mid.rank) == (4, 6)  # a layer pads its adapters to one rank
  np.testing.assert_allclose(model(x), first, atol=1e-6)  # adding "b" leaves "default" as it was
  nn.set_adapter(model, "b")
  second = model(x)
  assert float(jnp.abs(second - first).max()) > 1e-2 and model.up.ranks == (0,)
  with nn.disable_adapters(model):
    np.testing.assert_allclose(model(x), base, atol=1e-6)
  np.testing.assert_array_equal(model(x), second)
  nn.set_adapter(model, "default")
  np.testing.assert_array_equal(model(x), first)


def test_one_adapter_per_row_equals_each_alone():
  model, x, base, first = _two_adapters()
  nn.set_adapter(model, "b")
  second = model(x)
  nn.route_adapters(model, ["b", "__base__", "default"])
  mixed = model(x)
  nn.route_adapters(model, None)
  np.testing.assert_allclose(mixed, jnp.stack([second[0], base[1], first[2]]), atol=1e-5)
  np.testing.assert_array_equal(model(x), second)  # routing cleared


def test_routed_delta_is_each_rows_lora_delta():
  k = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k[0], (3, 2, 8))
  a, b = jax.random.normal(k[1], (2, 8, 4)), jax.random.normal(k[2], (2, 4, 5))
  scale, rows = jnp.array([0.5, 2.0]), jnp.array([1, -1, 0], jnp.int32)
  got = lora_lib.routed_lora_delta(x, a, b, scale, rows)
  want = [lora_lib.lora_delta(x[i], a[r], b[r], scale[r]) if r >= 0 else jnp.zeros((2, 5))
          for i, r in enumerate(rows.tolist())]
  np.testing.assert_allclose(got, jnp.stack(want), atol=1e-5)


def test_mistakes_name_what_is_wrong():
  model, x, *_ = _two_adapters()
  with pytest.raises(ValueError, match=r"no adapter named 'c'; the model has \['default', 'b'\]"):
    nn.set_adapter(model, "c")
  with pytest.raises(ValueError, match="already has an adapter named 'b'"):
    nn.add_adapter(model, "b", LoraConfig(target_modules=["up"]), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="'__base__' is not a valid adapter name"):
    nn.add_adapter(model, "__base__", LoraConfig(target_modules=["up"]), rngs=nnx.Rngs(0))
  with pytest.raises(NotImplementedError, match="plain LoRA only"):
    nn.add_adapter(model, "d", LoraConfig(target_modules=["up"], use_dora=True), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"no adapter named 'c'.*'__base__' for none"):
    nn.route_adapters(model, ["c", "b", "b"])
  with pytest.raises(ValueError, match="no LoRA adapters"):
    nn.set_adapter(ToyLM(nnx.Rngs(0)), "b")
  dora = jqlora.apply_lora(ToyLM(nnx.Rngs(0)), LoraConfig(target_modules=["up"], use_dora=True),
                           rngs=nnx.Rngs(0))
  with pytest.raises(NotImplementedError, match="not supported for DoRA"):
    nn.route_adapters(dora, ["default"])
  merged = jqlora.merge_lora(jqlora.apply_lora(ToyLM(nnx.Rngs(0)), LoraConfig(target_modules=["up"]),
                                               rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="merged into the base; unmerge_lora first"):
    with nn.disable_adapters(merged):
      pass
  model.train()
  model.up.dropout = 0.1
  nn.route_adapters(model, ["b", "b", "b"])
  with pytest.raises(ValueError, match=r"for inference; call model.eval\(\)"):
    model.up(x, rng=jax.random.key(0))

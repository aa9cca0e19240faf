"""Variable types and LoRA linear modules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jqlora import nn
from jqlora.nf4 import dequantize_nf4, quantize_nf4


def _weight(shape=(48, 64), seed=0):
  return jax.random.normal(jax.random.key(seed), shape) * 0.1


def test_qlora_linear_is_nf4_base_plus_scaled_adapter():
  w = quantize_nf4(_weight(), block_size=64)
  layer = nn.QLoRALinear(w, jnp.arange(48.0), r=4, alpha=8, rngs=nnx.Rngs(0))
  layer.lora_b.set_value(jax.random.normal(jax.random.key(1), (4, 48)))
  x = jax.random.normal(jax.random.key(2), (3, 5, 64))
  a, b = layer.lora_a.get_value(), layer.lora_b.get_value()
  expected = x @ dequantize_nf4(w).T + jnp.arange(48.0) + 2.0 * (x @ a @ b)
  np.testing.assert_allclose(layer(x), expected, atol=1e-5)
  assert isinstance(layer.weight, nn.NF4Weight) and not isinstance(layer.weight, nnx.Param)
  assert isinstance(layer.bias, nn.Frozen) and not isinstance(layer.bias, nnx.Param)
  assert {p for p, _ in nnx.to_flat_state(nnx.state(layer, nnx.Param))} == {("lora_a",), ("lora_b",)}


def test_adapters_are_float32_on_a_bf16_base():
  layer = nn.LoRALinear(_weight().astype(jnp.bfloat16), r=4, rngs=nnx.Rngs(0))
  assert layer.lora_a.get_value().dtype == jnp.float32
  assert layer(jnp.ones((2, 64), jnp.bfloat16)).dtype == jnp.bfloat16
  with pytest.raises(TypeError, match="NF4Tensor"):
    nn.QLoRALinear(_weight(), r=4, rngs=nnx.Rngs(0))


def test_dropout_only_in_training_mode():
  layer = nn.LoRALinear(_weight(), r=4, dropout=0.5, rngs=nnx.Rngs(0))
  layer.lora_b.set_value(jnp.ones((4, 48)))
  x = jnp.ones((8, 64))
  assert layer.deterministic
  np.testing.assert_array_equal(layer(x), layer(x))
  layer.train()
  first, second = layer(x), layer(x)
  assert not np.allclose(first, second)
  layer.eval()
  expected = layer.base(x) + 4.0 * (x @ layer.lora_a.get_value() @ layer.lora_b.get_value())
  np.testing.assert_allclose(layer(x), expected, rtol=1e-6)


def test_stacked_weights_keep_their_layer_axes():
  w = jax.vmap(lambda k: quantize_nf4(jax.random.normal(k, (32, 64))))(
      jax.random.split(jax.random.key(0), 3))
  layer = nn.QLoRALinear(w, r=2, rngs=nnx.Rngs(0))
  assert layer.batch_shape == (3,) and (layer.out_features, layer.in_features) == (32, 64)
  assert layer.lora_a.get_value().shape == (3, 64, 2)
  assert layer.scale.get_value().shape == (3,)
  dense = nn.dense_weight(w)
  assert dense.shape == (3, 32, 64)
  np.testing.assert_array_equal(dense[1], dequantize_nf4(jax.tree.map(lambda l: l[1], w)))

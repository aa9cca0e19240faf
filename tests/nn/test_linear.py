"""Variable types and LoRA linear modules (DoRA against PEFT on torch / bitsandbytes layers)."""

import bitsandbytes as bnb
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx

from jqlora import nn
from jqlora.format import quantize_nf4
from jqlora.nn import lora
from jqlora.ops import dequantize_nf4


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


class _Masked(torch.nn.Module):
  """Stands in for PEFT's ``nn.Dropout`` with a given mask, so both sides drop the same units."""

  def __init__(self, mask):
    super().__init__()
    self.mask = torch.tensor(np.asarray(mask))

  def forward(self, x):
    return x * self.mask


def _peft_dora(base, x, *, r, alpha, dropout_mask):
  """PEFT's DoRA on ``base`` (torch ``nn.Linear`` or bitsandbytes ``Linear4bit``) with random B
  and magnitude: ``(y, lora_A, lora_B, magnitude)`` with ``sum(y**2)`` backpropagated."""
  class Wrap(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.lin = base

  config = peft.LoraConfig(r=r, lora_alpha=alpha, use_dora=True, target_modules=["lin"],
                           lora_dropout=0.0 if dropout_mask is None else 0.5)
  lin = peft.inject_adapter_in_model(config, Wrap()).lin
  generator = torch.Generator().manual_seed(0)
  a, b = lin.lora_A["default"].weight, lin.lora_B["default"].weight
  magnitude = lin.lora_magnitude_vector["default"].weight
  with torch.no_grad():
    b.copy_(torch.randn(b.shape, generator=generator) * 0.1)
    magnitude.mul_(torch.rand(magnitude.shape, generator=generator) + 0.5)
  if dropout_mask is not None:
    lin.lora_dropout["default"] = _Masked(dropout_mask)
  lin.train(dropout_mask is not None)
  y = lin(torch.tensor(np.asarray(x)))
  y.pow(2).sum().backward()
  return y.detach().numpy(), a, b, magnitude


def _torch_base(w, bias, quantized):
  """A torch ``nn.Linear``, or a float32-compute bitsandbytes ``Linear4bit`` holding NF4 ``w``."""
  out_features, in_features = w.shape
  if not quantized:
    base = torch.nn.Linear(in_features, out_features)
    with torch.no_grad():
      base.weight.copy_(torch.tensor(np.asarray(w)))
  else:
    stored = {k: torch.from_numpy(np.array(v)) for k, v in w.to_bnb("weight").items()}
    base = bnb.nn.Linear4bit(in_features, out_features, compute_dtype=torch.float32,
                             quant_type="nf4", device="cpu")
    base.weight = bnb.nn.Params4bit.from_prequantized(
        stored.pop("weight"), {k[len("weight."):]: v for k, v in stored.items()}, device="cpu",
        module=base)
    base.support_avx512bf16_for_cpu = False  # exact float32 NF4 on AVX512-BF16 CPUs
  base.bias = torch.nn.Parameter(torch.tensor(np.asarray(bias)))
  return base


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "nf4"])
@pytest.mark.parametrize("dropout", [False, True], ids=["eval", "dropout"])
def test_dora_matches_peft(quantized, dropout):
  w, bias = _weight((48, 128)), jnp.linspace(-1.0, 1.0, 48)
  x = jax.random.normal(jax.random.key(2), (2, 5, 128))
  rng = jax.random.key(3)
  mask = lora.apply_dropout(jnp.ones_like(x), 0.5, rng) if dropout else None
  base = quantize_nf4(w, block_size=64) if quantized else w
  expected, a, b, magnitude = _peft_dora(_torch_base(base, bias, quantized), x, r=4, alpha=8,
                                         dropout_mask=mask)
  cls = nn.QLoRALinear if quantized else nn.LoRALinear
  layer = cls(base, bias, r=4, alpha=8, dropout=0.5 if dropout else 0.0, use_dora=True,
              rngs=nnx.Rngs(0))
  # PEFT's magnitude init (before we randomised it) is the row norm of the base weight
  dense = dequantize_nf4(base) if quantized else w
  np.testing.assert_allclose(layer.lora_magnitude.get_value(), jnp.linalg.norm(dense, axis=1),
                             rtol=1e-6)
  layer.lora_a.set_value(jnp.asarray(a.detach().numpy().T))
  layer.lora_b.set_value(jnp.asarray(b.detach().numpy().T))
  layer.lora_magnitude.set_value(jnp.asarray(magnitude.detach().numpy()))
  if dropout:
    layer.train()

  def loss(layer):
    y = layer(x, rng=rng)
    return (y ** 2).sum(), y

  grads, y = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam), has_aux=True)(layer)
  np.testing.assert_allclose(y, expected, atol=1e-4 if quantized else 1e-5, rtol=0)
  assert {p for p, _ in nnx.to_flat_state(grads)} == {("lora_a",), ("lora_b",), ("lora_magnitude",)}
  for ours, theirs in ((grads.lora_a, a.grad.numpy().T), (grads.lora_b, b.grad.numpy().T),
                       (grads.lora_magnitude, magnitude.grad.numpy())):
    err = np.abs(np.asarray(ours.get_value()) - theirs).max() / np.abs(theirs).max()
    assert err < 1e-4, err

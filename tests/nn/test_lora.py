"""LoraConfig validation and the LoRA maths against PEFT's definitions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key

from jqlora.nn import lora
from jqlora.nn.lora import LoraConfig


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "r must be a positive integer"),
    (dict(r=2.5), "r must be a positive integer"),
    (dict(alpha=-1), "alpha must be a positive number"),
    (dict(dropout=1.0), "dropout"),
    (dict(init="olora"), "init must be one of"),
    (dict(target_modules=[]), "target_modules"),
    (dict(target_modules="q_proj("), "not a valid regex"),
    (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\]"),
    (dict(alpha_pattern={"q_proj": float("nan")}), r"alpha_pattern\['q_proj'\]"),
])
def test_config_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    LoraConfig(**kwargs)


def test_dora_maths():
  assert LoraConfig(use_dora=True).use_dora
  keys = jax.random.split(jax.random.key(0), 4)
  w = jax.random.normal(keys[0], (2, 6, 10))
  a, b = jax.random.normal(keys[1], (2, 10, 3)), jax.random.normal(keys[2], (2, 3, 6))
  scale = jnp.array([0.5, 0.0])  # layer 1 of the stack has no adapter
  norm = lora.weight_norm(w, a, b, scale)
  adapted = np.asarray(w) + np.asarray(scale)[:, None, None] * np.swapaxes(a @ b, -1, -2)
  np.testing.assert_allclose(norm, np.linalg.norm(adapted, axis=-1), rtol=1e-6)
  m = jax.random.uniform(keys[3], (2, 6), minval=0.5, maxval=2.0)
  merged = lora.merged_weight(w, a, b, scale, m)
  np.testing.assert_allclose(np.linalg.norm(merged[0], axis=-1), m[0], rtol=1e-5)  # rows get |m|
  np.testing.assert_allclose(merged[1], w[1], rtol=1e-6)  # no adapter: untouched
  grad = jax.grad(lambda m: lora.dora_factor(m, norm, scale).sum())(m)
  np.testing.assert_allclose(grad[0], 1 / norm[0], rtol=1e-6)
  assert not grad[1].any()  # and its magnitude gets no gradient
  # the norm is a constant: no gradient flows through it to the adapter
  assert not jax.grad(lambda a: lora.weight_norm(w, a, b, scale).sum())(a).any()


def test_scaling():
  assert lora.scaling(16, 8) == 2.0
  assert lora.scaling(16, 16, use_rslora=True) == 4.0


NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.11.mlp.down_proj",
         "model.layers.1.self_attn.k_proj", "lm_head", "model.layers.3.self_attn.o_proj"]


@pytest.mark.parametrize("targets", [["q_proj", "down_proj"], ["layers.1.self_attn.k_proj"],
                                     r".*layers\.1\d?\..*", r".*q_proj", "q_proj"])
def test_target_matching_follows_peft(targets):
  import peft
  peft_config = peft.LoraConfig(target_modules=targets)
  for name in NAMES:
    expected = bool(check_target_module_exists(peft_config, name))
    assert lora.matches_target(LoraConfig(target_modules=targets), name) == expected, name


def test_all_linear_excludes_the_head_and_exclude_modules_wins():
  config = LoraConfig(exclude_modules=["k_proj"])
  assert lora.matches_target(config, NAMES[0])
  assert not lora.matches_target(config, "lm_head", is_output_head=True)
  assert not lora.matches_target(config, NAMES[2])


def test_rank_and_alpha_patterns_follow_peft():
  ranks = {"layers.0.self_attn.q_proj": 16, "down_proj": 4}
  alphas = {"q_proj": 32}
  config = LoraConfig(r=8, alpha=16, rank_pattern=ranks, alpha_pattern=alphas, use_rslora=True)
  for name in NAMES:
    r = ranks.get(get_pattern_key(list(ranks), name), 8)
    alpha = alphas.get(get_pattern_key(list(alphas), name), 16)
    assert lora.resolve(config, name) == (r, alpha / math.sqrt(r)), name


def test_kaiming_init_matches_peft_bounds():
  a, b = lora.init_adapter(jax.random.key(0), 400, 30, 64, batch_shape=(3,))
  assert a.shape == (3, 400, 64) and b.shape == (3, 64, 30) and a.dtype == jnp.float32
  bound = 1 / math.sqrt(400)  # kaiming_uniform_(a=sqrt(5)) on [r, in]
  assert float(jnp.abs(a).max()) <= bound and float(jnp.abs(a).max()) > 0.95 * bound
  assert not np.array_equal(a[0], a[1])
  assert not b.any()
  g, _ = lora.init_adapter(jax.random.key(0), 400, 30, 64, init="gaussian")
  assert abs(float(g.std()) - 1 / 64) < 1e-3


def test_pissa_split_moves_principal_directions():
  w = jax.random.normal(jax.random.key(1), (2, 24, 40))
  a, b, residual = lora.pissa_split(w, 4, 0.5)
  np.testing.assert_allclose(residual + 0.5 * jnp.swapaxes(a @ b, -1, -2), w, atol=1e-5)
  s_w = np.linalg.svd(np.asarray(w[0]), compute_uv=False)
  s_res = np.linalg.svd(np.asarray(residual[0]), compute_uv=False)
  np.testing.assert_allclose(s_res[:20], s_w[4:24], rtol=1e-4)


def test_lora_delta_dropout_only_with_rng():
  x = jnp.ones((4, 16))
  a, b = jnp.ones((16, 2)), jnp.ones((2, 3))
  np.testing.assert_allclose(lora.lora_delta(x, a, b, 0.5, dropout=0.5), 16.0)
  dropped = lora.lora_delta(x, a, b, 0.5, dropout=0.5, rng=jax.random.key(0))
  assert not np.allclose(dropped, 16.0)
  assert abs(float(dropped.mean()) - 16.0) < 6.0

"""jqlora.ops.attention: jax.nn.dot_product_attention against the einsum reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqlora
from jqlora import ops


def _packed_mask(b: int, t: int) -> jax.Array:
  """Causal within three packed segments per row, plus left padding (segment 0) on row 0."""
  segments = np.repeat(np.arange(1, 4), -(-t // 3))[:t][None].repeat(b, 0)
  segments[0, :2] = 0
  seg = jnp.asarray(segments)
  causal = jnp.tril(jnp.ones((t, t), bool))[None]
  return causal & (seg[:, :, None] == seg[:, None, :])


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2), (8, 1)])
def test_dot_product_attention_equals_the_einsum(heads, kv_heads):
  b, t, dh = 2, 11, 16
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(k1, (b, t, heads, dh))
  k = jax.random.normal(k2, (b, t, kv_heads, dh))
  v = jax.random.normal(k3, (b, t, kv_heads, dh))
  mask = _packed_mask(b, t)
  want = ops.attention_reference(q, k, v, mask)
  got = jax.jit(lambda q, k, v, m: ops.attention(q, k, v, m, backend="xla"))(q, k, v, mask)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
  # gradients too (the training step differentiates through it)
  loss = lambda backend: lambda q, k, v: jnp.sum(ops.attention(q, k, v, mask, backend=backend) ** 2)
  for g_got, g_want in zip(jax.jit(jax.grad(loss("xla"), (0, 1, 2)))(q, k, v),
                           jax.jit(jax.grad(loss("einsum"), (0, 1, 2)))(q, k, v)):
    np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_want), atol=1e-4, rtol=0)


def test_automatic_order_and_bad_shapes():
  q = jnp.zeros((1, 4, 6, 8))
  k = jnp.zeros((1, 4, 2, 8))
  mask = jnp.ones((1, 4, 4), bool)
  want = ["cudnn", "einsum"] if jax.default_backend() == "gpu" else ["einsum"]
  assert ops.ATTENTION.order(q, k, k, mask) == want
  with pytest.raises(ValueError, match=r"H % KV == 0"):
    ops.attention(q, jnp.zeros((1, 4, 4, 8)), jnp.zeros((1, 4, 4, 8)), mask)


@pytest.mark.slow
def test_model_and_kv_cache_decoding_equal_across_backends(monkeypatch):
  from jqlora.models import LlamaConfig, build_model, random_source

  c = LlamaConfig.from_hf(dict(model_type="llama", vocab_size=64, hidden_size=64,
                               intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16))
  model = build_model(c, random_source(c, std=0.1), dtype=jnp.float32, progress=False)
  ids = jax.random.randint(jax.random.key(1), (2, 9), 0, 64)
  seg = jnp.asarray([[1] * 4 + [2] * 5, [1] * 9])
  outs = {}
  for order in ("xla,einsum", "einsum"):  # attention's first backend; the NF4 ops take "xla"
    monkeypatch.setenv(ops.ENV_VAR, order if order != "einsum" else "einsum,xla")
    full = model(ids, segment_ids=seg)
    cache = model.init_cache(2, 12)
    _, cache = model(ids[:, :5], cache=cache)
    step, _ = model(ids[:, 5:6], cache=cache)
    outs[order] = (np.asarray(full), np.asarray(step))
  np.testing.assert_allclose(outs["xla,einsum"][0], outs["einsum"][0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(outs["xla,einsum"][1], outs["einsum"][1], atol=1e-5, rtol=0)
  assert jqlora.ops.ATTENTION.order(jnp.zeros((1, 1, 4, 16)), jnp.zeros((1, 1, 2, 16)),
                                    jnp.zeros((1, 1, 2, 16)), jnp.ones((1, 1, 1), bool)) \
      == ["einsum", "xla"]

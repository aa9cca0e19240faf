"""jqlora.ops.attention: jax.nn.dot_product_attention against the einsum reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

import jqlora
from jqlora import ops
from jqlora.ops.attention import attention_blockwise


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


@pytest.mark.slow
@pytest.mark.parametrize("heads, kv_heads, t, block", [(6, 2, 11, 4), (4, 4, 16, 8), (8, 1, 13, 64)])
def test_blockwise_equals_the_einsum(heads, kv_heads, t, block):
  """Several key blocks (a padded last one), one block, GQA; a row that masks every key averages
  every real key as the reference does; gradients of all three inputs agree."""
  b, dh = 2, 16
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(k1, (b, t, heads, dh))
  k = jax.random.normal(k2, (b, t, kv_heads, dh))
  v = jax.random.normal(k3, (b, t, kv_heads, dh))
  mask = _packed_mask(b, t).at[1, 3].set(False)
  blockwise = lambda q, k, v, m: attention_blockwise(q, k, v, m, block=block)
  want = ops.attention_reference(q, k, v, mask)
  got = jax.jit(blockwise)(q, k, v, mask)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v, mask)))
  for g_got, g_want in zip(jax.jit(jax.grad(loss(blockwise), (0, 1, 2)))(q, k, v),
                           jax.grad(loss(ops.attention_reference), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_want), atol=1e-5, rtol=0)
  # named through the registry, in bfloat16 (probabilities rounded as the reference's)
  bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  got16 = ops.attention(*bf, mask, backend="blockwise").astype(jnp.float32)
  want16 = ops.attention_reference(*bf, mask).astype(jnp.float32)
  np.testing.assert_allclose(np.asarray(got16), np.asarray(want16), atol=3e-2, rtol=0)


def test_blockwise_backward_holds_no_full_scores():
  """The gradient's float residuals and temporaries stay O(T): no [B, H, T, S] float array is
  saved or built (the einsum saves its probabilities)."""
  b, t, h, kvh, dh, block = 1, 256, 4, 2, 8, 32
  q = jnp.zeros((b, t, h, dh))
  k = v = jnp.zeros((b, t, kvh, dh))
  mask = jnp.tril(jnp.ones((t, t), bool))[None]
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v, mask) ** 2)
  full = b * h * t * t
  saved = saved_residuals(loss(lambda *a: attention_blockwise(*a, block=block)), q, k, v)
  floats = lambda saved: [a.size for a, _ in saved if jnp.issubdtype(a.dtype, jnp.floating)]
  assert max(floats(saved)) < full // 8  # the bool mask [B, T, S] is the model's, shared by layers
  assert full in floats(saved_residuals(loss(ops.attention_reference), q, k, v))
  grad = jax.jit(jax.grad(loss(lambda *a: attention_blockwise(*a, block=block)), (0, 1, 2)))
  temp = grad.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
  assert temp < full * 4  # one float32 [B, H, T, S] would be full * 4 bytes

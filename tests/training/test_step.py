"""Adapter-only optimizer, token-normalised accumulation, clipping and the non-finite guard."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jqlora
from jqlora.training import token_loss_sums
from jqlora.training.step import chunked_token_loss_sums

from .toy import ToyLM, toy_batch


def _np(tree):
  """Host copies of every array leaf (PRNG keys as their raw data)."""
  def host(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.array(x)  # a copy: donated buffers are reused
  return jax.tree.map(host, nnx.to_pure_dict(tree))


def _frozen(model):
  return _np(nnx.state(model, nnx.Not(nnx.LoRAParam)))


def test_only_adapters_change_and_carry_optimizer_state():
  model = ToyLM(rngs=nnx.Rngs(0))
  before = _frozen(model)
  lora_before = _np(nnx.state(model, nnx.LoRAParam))
  optimizer = jqlora.make_optimizer(model, optax.adam(1e-2))
  n_adapter = len(jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
  moments = [x for x in jax.tree.leaves(optimizer.opt_state) if x.ndim > 0]
  assert len(moments) == 2 * n_adapter  # adam mu and nu, adapters only
  for i in range(3):
    metrics = jqlora.train_step(model, optimizer, toy_batch(jax.random.key(i)))
    assert np.isfinite(float(metrics["loss"]))
  chex.assert_trees_all_equal(_frozen(model), before)
  after = _np(nnx.state(model, nnx.LoRAParam))
  assert all(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(after), jax.tree.leaves(lora_before)))


def test_make_optimizer_without_adapters_is_an_error():
  with pytest.raises(ValueError, match="apply_lora"):
    jqlora.make_optimizer(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), optax.sgd(1.0))


def test_loss_is_shifted_and_ignores_minus_100():
  logits = jax.random.normal(jax.random.key(0), (1, 4, 5))
  labels = jnp.array([[3, 1, -100, 4]])
  total, count = token_loss_sums(logits, labels)
  logp = jax.nn.log_softmax(logits[0])
  assert int(count) == 2
  np.testing.assert_allclose(float(total), -(logp[0, 1] + logp[2, 4]), rtol=1e-6)
  # a packed boundary (segment 1 -> 2) is not a target
  total, count = token_loss_sums(logits, labels, jnp.array([[1, 1, 2, 2]]))
  assert int(count) == 2  # positions 1 (same segment) and 3 (same segment)
  total, count = token_loss_sums(logits, labels, jnp.array([[1, 2, 2, 2]]))
  assert int(count) == 1
  np.testing.assert_allclose(float(total), -logp[2, 4], rtol=1e-6)


def test_accumulation_equals_large_batch_gradient():
  """4 micro-batches of 2 with unequal target counts == one batch of 8 (SGD lr 1: update = -grad)."""
  big = toy_batch(jax.random.key(7), (8, 10))
  big["labels"] = big["labels"].at[:2, :].set(-100).at[0, 3].set(5)  # uneven counts
  micro = {k: v.reshape(4, 2, 10) for k, v in big.items()}
  results = []
  for batch in (big, micro):
    model = ToyLM(rngs=nnx.Rngs(1))
    start = _np(nnx.state(model, nnx.LoRAParam))
    optimizer = jqlora.make_optimizer(model, optax.sgd(1.0))
    metrics = jqlora.train_step(model, optimizer, batch)
    end = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    results.append((float(metrics["loss"]), float(metrics["grad_norm"]),
                    jax.tree.map(lambda a, b: np.asarray(a) - b, end, start)))
  (l1, n1, d1), (l2, n2, d2) = results
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  np.testing.assert_allclose(n1, n2, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), d1, d2)


def test_grad_clipping_bounds_the_update():
  model = ToyLM(rngs=nnx.Rngs(2))
  start = _np(nnx.state(model, nnx.LoRAParam))
  tx = optax.chain(optax.clip_by_global_norm(1e-3), optax.sgd(1.0))
  optimizer = jqlora.make_optimizer(model, tx)
  metrics = jqlora.train_step(model, optimizer, toy_batch(jax.random.key(3)))
  end = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
  delta = optax.tree.norm(jax.tree.map(lambda a, b: np.asarray(a) - b, end, start))
  assert float(metrics["grad_norm"]) > 1e-2
  np.testing.assert_allclose(float(delta), 1e-3, rtol=1e-4)


def test_non_finite_step_changes_nothing_and_is_counted():
  from jqlora.training import make_tx, nonfinite_counts

  model = ToyLM(rngs=nnx.Rngs(3))
  optimizer = jqlora.make_optimizer(model, make_tx(optax.constant_schedule(1e-2),
                                                   max_nonfinite_steps=3))
  jqlora.train_step(model, optimizer, toy_batch(jax.random.key(0)))
  good = np.array(model.lora_b[...])  # a copy: the step donates its buffers
  model.lora_b[...] = jnp.asarray(good).at[0, 0].set(jnp.nan)
  inner = lambda: jax.tree.map(np.array, optimizer.opt_state.inner_state)  # moments, count
  moments = inner()
  for i in (1, 2):
    metrics = jqlora.train_step(model, optimizer, toy_batch(jax.random.key(i)))
    assert not np.isfinite(float(metrics["loss"]))
    assert nonfinite_counts(optimizer) == (i, i)
  lora_b = np.asarray(model.lora_b[...])
  assert np.isnan(lora_b[0, 0])  # the update was skipped: the (poisoned) adapter is as it was
  np.testing.assert_array_equal(np.delete(lora_b.ravel(), 0), np.delete(good.ravel(), 0))
  jax.tree.map(np.testing.assert_array_equal, inner(), moments)
  model.lora_b[...] = jnp.asarray(good)  # a finite step again: applied, the run of skips ends
  jqlora.train_step(model, optimizer, toy_batch(jax.random.key(3)))
  assert nonfinite_counts(optimizer) == (0, 2)
  assert not np.array_equal(np.asarray(model.lora_b[...]), good)


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_schedules_warm_up_then_follow_their_shape(kind):
  s = jqlora.training.make_schedule(kind, 1.0, total_steps=20, warmup_steps=4)
  assert float(s(0)) == 0.0 and float(s(2)) == pytest.approx(0.5)
  assert float(s(4)) == pytest.approx(1.0)
  end = {"constant": 1.0, "linear": 0.0, "cosine": 0.0}[kind]
  assert float(s(20)) == pytest.approx(end, abs=1e-6)
  if kind != "constant":
    assert 0.0 < float(s(12)) < 1.0


@pytest.mark.slow
@pytest.mark.parametrize("chunk_size", [1, 5, 33, 1024])
def test_chunked_loss_equals_full_logits_loss_and_gradients(chunk_size):
  """Chunks that do (33 = B * T) and do not divide the tokens; packed segments; -100 labels."""
  kh, kw, kl = jax.random.split(jax.random.key(4), 3)
  hidden = jax.random.normal(kh, (3, 11, 8))
  weight = jax.random.normal(kw, (8, 40))
  labels = jnp.where(jax.random.bernoulli(kl, 0.7, (3, 11)),
                     jax.random.randint(kl, (3, 11), 0, 40), -100)
  segments = jnp.array([[1] * 6 + [2] * 5, [1] * 11, [1] * 3 + [2] * 8])

  def full(hidden, weight):
    return token_loss_sums(hidden @ weight, labels, segments)

  def chunked(hidden, weight):
    return chunked_token_loss_sums(lambda h: h @ weight, hidden, labels, segments,
                                   chunk_size=chunk_size)

  (t1, c1), (t2, c2) = full(hidden, weight), jax.jit(chunked)(hidden, weight)
  assert int(c1) == int(c2) > 0
  np.testing.assert_allclose(float(t2), float(t1), rtol=1e-6)
  g1 = jax.grad(lambda *a: full(*a)[0], argnums=(0, 1))(hidden, weight)
  g2 = jax.jit(jax.grad(lambda *a: chunked(*a)[0], argnums=(0, 1)))(hidden, weight)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)


def test_chunked_loss_rejects_a_non_positive_chunk():
  with pytest.raises(ValueError, match="chunk_size"):
    chunked_token_loss_sums(lambda h: h, jnp.zeros((1, 2, 3)), jnp.zeros((1, 2), jnp.int32),
                            chunk_size=0)


def test_functional_step_equals_train_step_and_lowers_on_abstract_states():
  batch = toy_batch(jax.random.key(3))
  eager = ToyLM(rngs=nnx.Rngs(0))
  eager_opt = jqlora.make_optimizer(eager, optax.adam(1e-2))
  want = jqlora.train_step(eager, eager_opt, batch)

  model = ToyLM(rngs=nnx.Rngs(0))
  step, state, opt_state = jqlora.training.functional_step(
      model, jqlora.make_optimizer(model, optax.adam(1e-2)))
  state, opt_state, got = jax.jit(step)(state, opt_state, batch)
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
  chex.assert_trees_all_close(_np(state), _np(nnx.state(eager)), rtol=1e-6)

  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (state, opt_state, batch))
  assert jax.jit(step).lower(*abstract).compile().memory_analysis() is not None

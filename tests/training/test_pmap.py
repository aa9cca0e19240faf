"""``pmap_train_step`` trains like ``train_step`` (4 CPU devices in a subprocess)."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # 8 simulated devices in a subprocess

TESTS = pathlib.Path(__file__).parents[1]

WORKER = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    import jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    import jqlora
    from jqlora.training import pmap_train_step
    from training.toy import ToyLM, toy_batch

    D = 4
    assert jax.local_device_count() == D, jax.devices()
    rng = np.random.default_rng(0)
    batches = []  # [A=2, B=8, T=16] each: 2 accumulated micro-batches; 2 batches, seen twice
    for _ in range(2):
      ids = rng.integers(0, 128, size=(2, 8, 16)).astype(np.int32)
      labels = np.where(rng.random(ids.shape) < 0.3, -100, ids).astype(np.int32)
      batches.append({{"input_ids": ids, "labels": labels}})

    def per_device(batch):  # [A, B, T] -> [D, A, B / D, T]: device d takes rows d*B/D...
      return {{k: np.moveaxis(v.reshape(2, D, -1, 16), 1, 0) for k, v in batch.items()}}

    def nf4_model():
      model = jqlora.load_model({model!r}, quantize=True, dtype=jnp.float32, progress=False)
      jqlora.apply_lora(model, jqlora.LoraConfig(r=4, init="gaussian"), rngs=nnx.Rngs(0))
      for _, m in jqlora.nn.lora_modules(model):  # B != 0: A gets gradients too
        m.lora_b.set_value(jnp.full(m.lora_b.get_value().shape, 0.01, jnp.float32))
      return model

    out = {{}}
    for mode in ("jit", "pmap"):
      model = nf4_model()
      optimizer = jqlora.make_optimizer(model, optax.adam(1e-2))
      losses, tokens = [], []
      for batch in batches * 2:
        if mode == "jit":
          metrics = jqlora.train_step(model, optimizer, batch)
        else:
          metrics = pmap_train_step(model, optimizer, per_device(batch))
        losses.append(float(metrics["loss"]))
        tokens.append(int(metrics["n_tokens"]))
      adapters = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))
      out[mode] = {{"losses": losses, "tokens": tokens,
                    "adapters": [np.asarray(a).ravel().tolist() for a in adapters],
                    "devices": len(adapters[0].sharding.device_set)}}

    # dropout: every device folds its index into the key, but the streams advance as in jit
    rng_states = []
    for step in (jqlora.train_step, pmap_train_step):
      model = ToyLM(vocab=128, dropout=0.3, rngs=nnx.Rngs(1))
      model.train()
      optimizer = jqlora.make_optimizer(model, optax.adam(1e-2))
      batch = toy_batch(jax.random.key(2), (8, 12), vocab=128)
      if step is pmap_train_step:
        batch = {{k: v.reshape(D, 2, 12) for k, v in batch.items()}}
      loss = float(step(model, optimizer, batch)["loss"])
      keys = jax.tree.map(lambda x: np.asarray(jax.random.key_data(x)
                                               if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
                                               else x).tolist(),
                          nnx.to_pure_dict(nnx.state(model, nnx.RngState)))
      rng_states.append({{"loss": loss, "rng": keys}})
    out["dropout"] = rng_states
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
  from .meshable import write_meshable_model

  model = write_meshable_model(tmp_path_factory.mktemp("pmap") / "model", tokenizer=False)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", WORKER.format(tests=str(TESTS), model=str(model))],
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_pmap_step_matches_the_jit_step_on_nf4_qlora(runs):
  jit, pmap = runs["jit"], runs["pmap"]
  assert pmap["tokens"] == jit["tokens"]  # token counts psum-ed over the 4 devices
  np.testing.assert_allclose(pmap["losses"], jit["losses"], rtol=0, atol=1e-5)
  losses = jit["losses"]
  assert losses[2] < losses[0] - 0.05 and losses[3] < losses[1] - 0.05  # it learns both batches
  for a, b in zip(pmap["adapters"], jit["adapters"]):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
  assert pmap["devices"] == 4 and jit["devices"] == 1  # adapters come back replicated


def test_pmap_dropout_advances_the_rng_streams_like_jit(runs):
  jit, pmap = runs["dropout"]
  assert np.isfinite(pmap["loss"]) and pmap["loss"] != pytest.approx(jit["loss"], abs=1e-6)
  assert pmap["rng"] == jit["rng"]  # same keys, same counts: per-device folding is not kept


def test_pmap_batch_needs_the_device_axis():
  import jax
  import optax
  from flax import nnx

  import jqlora
  from jqlora.training import pmap_train_step

  from .toy import ToyLM, toy_batch

  model = ToyLM(rngs=nnx.Rngs(0))
  optimizer = jqlora.make_optimizer(model, optax.adam(1e-2))
  with pytest.raises(ValueError, match=r"input_ids must be \[D, B, T\] or \[D, A, B, T\], got "
                                       r"shape \(8, 12\)"):  # a plain [B, T] batch
    pmap_train_step(model, optimizer, toy_batch(jax.random.key(0), (8, 12)))

"""Checkpoints restore onto any mesh: saved on 8 devices, restored on 1, and the reverse."""

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
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    import jqlora
    from jqlora import parallel
    from jqlora.training import make_schedule, make_tx
    from jqlora.training.checkpoint import Checkpointer

    assert len(jax.devices()) == 8, jax.devices()
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(3):
      ids = rng.integers(0, 128, size=(8, 16)).astype(np.int32)
      batches.append({{"input_ids": ids, "labels": ids}})

    def setup(on_mesh):
      model = jqlora.load_model({model!r}, quantize=True, dtype=jnp.float32, progress=False)
      jqlora.apply_lora(model, jqlora.LoraConfig(r=4, dropout=0.1, init="gaussian"),
                        rngs=nnx.Rngs(0))
      model.train()
      optimizer = jqlora.make_optimizer(model, make_tx(make_schedule("constant", 1e-2, 10)))
      if on_mesh:
        parallel.shard_model(model, mesh)
        parallel.shard_model(optimizer, mesh)
      return model, optimizer

    def step(model, optimizer, batch, on_mesh):
      batch = parallel.shard_batch(batch, mesh) if on_mesh else batch
      return float(jqlora.train_step(model, optimizer, batch)["loss"])

    def host(model, optimizer):  # adapters, moments and RNG state as lists
      tree = nnx.to_pure_dict(nnx.state((model, optimizer),
                                        nnx.Any(nnx.LoRAParam, nnx.OptState, nnx.RngState)))
      as_list = lambda x: np.asarray(jax.random.key_data(x) if jnp.issubdtype(
          x.dtype, jax.dtypes.prng_key) else x).tolist()
      return jax.tree.leaves(jax.tree.map(as_list, tree), is_leaf=lambda x: isinstance(x, list))

    def devices(model):
      a = model.layers.mlp.up_proj.lora_a.get_value()
      return len(a.sharding.device_set), sorted(parallel.shard_shapes(a))

    out = {{}}
    for name, (save_on_mesh, restore_on_mesh) in {{"8_to_1": (True, False),
                                                   "1_to_8": (False, True)}}.items():
      model, optimizer = setup(save_on_mesh)
      for batch in batches[:2]:
        step(model, optimizer, batch, save_on_mesh)
      directory = {tmp!r} + "/" + name
      Checkpointer(directory).save(2, model, optimizer, {{"data": {{"epoch": 0, "index": 2}}}})
      fresh, fresh_opt = setup(restore_on_mesh)
      before = host(fresh, fresh_opt)
      meta = Checkpointer(directory).restore(2, fresh, fresh_opt)
      out[name] = {{
          "saved": host(model, optimizer), "restored": host(fresh, fresh_opt),
          "before": before, "meta": meta, "devices": devices(fresh),
          "next_loss": [step(model, optimizer, batches[2], save_on_mesh),
                        step(fresh, fresh_opt, batches[2], restore_on_mesh)]}}
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
  from .meshable import write_meshable_model

  tmp = tmp_path_factory.mktemp("reshard")
  model = write_meshable_model(tmp / "model", tokenizer=False)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  script = WORKER.format(tests=str(TESTS), model=str(model), tmp=str(tmp))
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_equal_leaves(got, expected):
  assert len(got) == len(expected)
  for a, b in zip(got, expected):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("direction", ["8_to_1", "1_to_8"])
def test_checkpoint_restores_onto_another_mesh(runs, direction):
  run = runs[direction]
  assert run["meta"] == {"data": {"epoch": 0, "index": 2}, "step": 2}
  _assert_equal_leaves(run["restored"], run["saved"])  # adapters, Adam moments, RNG state
  assert any(not np.array_equal(a, b) for a, b in zip(run["before"], run["saved"]))
  # restored onto the target's shardings: one device, or 1/(fsdp*tensor) of A on each of 8
  # (up_proj A is [layers, in, r] = [2, 128, 4]: in on fsdp, r on tensor)
  assert run["devices"] == ([1, [[2, 128, 4]]] if direction == "8_to_1" else [8, [[2, 64, 2]]])
  # and training goes on identically from the restored state (dropout stream included)
  np.testing.assert_allclose(run["next_loss"][1], run["next_loss"][0], rtol=0, atol=1e-5)

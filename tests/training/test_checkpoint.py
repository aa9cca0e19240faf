"""Checkpoints restore the trainable state exactly; a kill during a save keeps the last one."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import jqlora
from jqlora.training.checkpoint import Checkpointer

from .toy import ToyLM, toy_batch

TESTS = pathlib.Path(__file__).parents[1]


def _state(model, optimizer):
  tree = nnx.to_pure_dict(nnx.state((model, optimizer), nnx.Any(nnx.LoRAParam, nnx.OptState)))
  return jax.tree.map(np.array, tree)


def _trained(steps, seed=0):
  model = ToyLM(dropout=0.2, rngs=nnx.Rngs(seed))
  model.train()
  optimizer = jqlora.make_optimizer(model, optax.adam(1e-2))
  for i in range(steps):
    jqlora.train_step(model, optimizer, toy_batch(jax.random.key(i)))
  return model, optimizer


@pytest.mark.slow
def test_restore_gives_identical_state_and_next_losses(tmp_path):
  model, optimizer = _trained(3)
  ckpt = Checkpointer(tmp_path)
  ckpt.save(3, model, optimizer, {"data": {"epoch": 0, "index": 7}})
  expected = [float(jqlora.train_step(model, optimizer, toy_batch(jax.random.key(10 + i)))["loss"])
              for i in range(2)]
  fresh, fresh_opt = _trained(0)  # same frozen base, initial adapters, then restored
  meta = Checkpointer(tmp_path).restore(3, fresh, fresh_opt)
  assert meta["data"] == {"epoch": 0, "index": 7} and meta["step"] == 3
  got = [float(jqlora.train_step(fresh, fresh_opt, toy_batch(jax.random.key(10 + i)))["loss"])
         for i in range(2)]
  np.testing.assert_allclose(got, expected, rtol=1e-6)  # dropout RNG restored too
  jax.tree.map(np.testing.assert_array_equal, _state(fresh, fresh_opt), _state(model, optimizer))


KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import jax, optax, jqlora
    from flax import nnx
    from orbax.checkpoint._src.path import atomicity
    from training.toy import ToyLM, toy_batch
    from jqlora.training.checkpoint import Checkpointer
    model = ToyLM(rngs=nnx.Rngs(0))
    optimizer = jqlora.make_optimizer(model, optax.adam(1e-2))
    ckpt = Checkpointer({directory!r})
    jqlora.train_step(model, optimizer, toy_batch(jax.random.key(0)))
    ckpt.save(1, model, optimizer, {{"data": {{"epoch": 0, "index": 1}}}})
    jqlora.train_step(model, optimizer, toy_batch(jax.random.key(1)))
    async def die(*args, **kwargs):  # everything is written; the final rename never happens
      os.kill(os.getpid(), signal.SIGKILL)
    atomicity.AtomicRenameTemporaryPath.finalize = die
    ckpt.save(2, model, optimizer, {{"data": {{"epoch": 0, "index": 2}}}})
""")


@pytest.mark.slow
def test_a_process_killed_during_save_leaves_the_previous_checkpoint(tmp_path):
  script = KILLED_SAVE.format(tests=str(TESTS), directory=str(tmp_path))
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr
  assert any("orbax-checkpoint-tmp" in p.name for p in tmp_path.iterdir())  # the torn save
  ckpt = Checkpointer(tmp_path)
  assert ckpt.latest_step() == 1
  model = ToyLM(rngs=nnx.Rngs(0))
  optimizer = jqlora.make_optimizer(model, optax.adam(1e-2))
  reference, reference_opt = ToyLM(rngs=nnx.Rngs(0)), None
  reference_opt = jqlora.make_optimizer(reference, optax.adam(1e-2))
  jqlora.train_step(reference, reference_opt, toy_batch(jax.random.key(0)))
  assert ckpt.restore(1, model, optimizer)["data"]["index"] == 1
  jax.tree.map(np.testing.assert_array_equal, _state(model, optimizer),
               _state(reference, reference_opt))
  ckpt.save(2, model, optimizer, {"data": {"epoch": 0, "index": 2}})  # saving again works
  assert Checkpointer(tmp_path).latest_step() == 2

"""Checkpoints restore the trainable state exactly; a kill during a save keeps the last one."""

import logging
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import fsspec
import jax
import numpy as np
import optax
import pytest
from etils import epath
from flax import nnx
from fsspec.implementations.memory import MemoryFileSystem

import jqlora
from jqlora.training.checkpoint import Checkpointer
from jqlora.training.config import TrainConfig

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


# -- outputs to a bucket: fsspec's in-memory file system stands in for gs:// ----------------

class _Bucket(MemoryFileSystem):
  """``gs://`` served from memory: fsspec's memory file system under the GCS protocol names,
  so that ``etils.epath`` sends every ``gs://`` operation here (as it would to gcsfs)."""

  protocol = ("gs", "gcs")

  @classmethod
  def _strip_protocol(cls, path):
    path = str(path)
    for prefix in ("gs://", "gcs://"):
      path = path.removeprefix(prefix)
    return super()._strip_protocol(path)


@pytest.fixture
def bucket(monkeypatch, tmp_path):
  """A fresh in-memory bucket; the working directory is an empty folder, to show that nothing
  is written there instead (``pathlib.Path('gs://b/run')`` would be the local ``gs:/b/run``)."""
  monkeypatch.setattr(_Bucket, "store", {})
  monkeypatch.setattr(_Bucket, "pseudo_dirs", [""])
  fsspec.register_implementation("gcs", _Bucket, clobber=True)
  monkeypatch.chdir(tmp_path)
  yield _Bucket.store
  assert list(tmp_path.iterdir()) == []


def _tiny_lora_model():
  from jqlora.models import LlamaConfig, build_model, random_source

  c = LlamaConfig.from_hf(dict(model_type="llama", vocab_size=64, hidden_size=64,
                               intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=1, head_dim=32))
  model = build_model(c, random_source(c), progress=False)
  return jqlora.apply_lora(model, jqlora.LoraConfig(r=4, init="gaussian"), rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_a_bucket_output_dir_gets_the_adapter_and_metrics_without_a_local_path(bucket, tmp_path,
                                                                             caplog):
  from jqlora.training import loop

  output = loop._output_dir("gs://bucket/run")
  assert str(output) == "gs://bucket/run" and output.is_dir()
  model = _tiny_lora_model()
  adapter = output / "adapter"
  loop._save_adapter(model, adapter, "base")  # staged locally, copied, then renamed
  loop._save_adapter(model, adapter, "base")  # a second save replaces the first whole
  names = ("adapter_config.json", "adapter_model.safetensors")
  assert loop._adapter_saved(adapter) and not (output / "adapter.tmp").exists()
  assert sorted(k for k in bucket if k.startswith("/bucket/run/adapter/")) == sorted(
      f"/bucket/run/adapter/{n}" for n in names)
  local = tmp_path.parent / f"{tmp_path.name}-local-adapter"  # the same adapter, on disk
  jqlora.save_adapter(model, local, base_model_name_or_path="base")
  for name in names:
    assert (adapter / name).read_bytes() == (local / name).read_bytes(), name
  metrics = output / "metrics.jsonl"
  config = TrainConfig(dataset="train.jsonl", output_dir="gs://bucket/run",
                       logging=["jsonl", "tensorboard"])
  with caplog.at_level(logging.WARNING, "jqlora"), \
      loop._metrics_log(config, metrics, append=False, lead=True) as log:
    for step in (1, 2, 3):
      log.write({"step": step, "loss": 1.0 / step})
  loop._cut_metrics(metrics, 2, redo_final=False)
  assert [r["step"] for r in loop._read_rows(metrics)] == [1, 2]
  assert "TensorBoard events skipped" in caplog.text  # its writer is local-only


def test_a_bucket_checkpoint_directory_stays_a_url(bucket):
  ckpt = Checkpointer("gs://bucket/run/checkpoints")
  assert isinstance(ckpt.directory, epath.Path) and str(ckpt.directory) == "gs://bucket/run/checkpoints"
  assert ckpt.latest_step() is None and not bucket  # nothing is created before the first save
  local = Checkpointer("relative/checkpoints")
  assert str(local.directory) == os.path.join(os.getcwd(), "relative", "checkpoints")

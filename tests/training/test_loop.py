"""The training loop on the tiny Llama: packing, remat, resume exactness, non-finite stop."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jqlora
from jqlora.training.config import load_config
from jqlora.training.data import BatchIterator, Example, eval_batches
from jqlora.training.loop import TrainingError, train
from jqlora.training.step import eval_loss_sums

from .toy import tiny_model_dir, write_reverse_task


def _tiny(data_dir, remat=False):
  model = jqlora.load_model(data_dir / "hf" / "tiny-llama" / "base", quantize=True,
                            dtype=jnp.float32, progress=False)
  jqlora.apply_lora(model, jqlora.LoraConfig(r=4, alpha=8), rngs=nnx.Rngs(0))
  model.remat = remat
  return model


def test_packed_loss_equals_unpacked_per_example_losses(data_dir):
  model = _tiny(data_dir)
  rng = np.random.default_rng(0)
  examples = []
  for n in (7, 5, 9, 4):
    ids = rng.integers(3, 500, n).astype(np.int32)
    examples.append(Example(ids, ids.copy()))  # every token a target, as in raw text
  packed = next(BatchIterator(examples, micro_batch_size=1, accumulation=1, sequence_len=25,
                              packing=True, seed=0))
  assert packed["segment_ids"].max() == 4  # all four share one row
  total, count = eval_loss_sums(model, {k: v[0] for k, v in packed.items()})
  singles = [eval_loss_sums(model, b) for b in eval_batches(examples, 1, 25)]
  assert int(count) == sum(int(c) for _, c in singles) == sum(len(e) - 1 for e in examples)
  np.testing.assert_allclose(float(total), sum(float(t) for t, _ in singles), rtol=1e-5)


@pytest.mark.slow
def test_remat_trains_the_adapters_of_a_frozen_base_like_no_remat(data_dir):
  batch = {"input_ids": jnp.asarray(np.random.default_rng(1).integers(3, 500, (2, 16)), jnp.int32)}
  batch["labels"] = batch["input_ids"]
  losses = {}
  for remat in (False, True):
    model = _tiny(data_dir, remat)
    optimizer = jqlora.make_optimizer(model, optax.adam(1e-2))
    losses[remat] = [float(jqlora.train_step(model, optimizer, batch)["loss"]) for _ in range(6)]
  np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
  assert losses[True][-1] < losses[True][0] - 0.1


def _config(data_dir, tmp_path, name, **kw):
  model = tiny_model_dir(data_dir, tmp_path) if not (tmp_path / "tiny-llama").exists() \
      else tmp_path / "tiny-llama"
  data = tmp_path / "train.jsonl"
  if not data.exists():
    write_reverse_task(data, 40)
  values = dict(base_model=str(model), dataset=str(data), dtype="float32", lora_r=4,
                lora_dropout=0.1, sequence_len=48, sample_packing=True, micro_batch_size=2,
                gradient_accumulation_steps=2, max_steps=6, learning_rate=1e-2,
                lr_scheduler="cosine", warmup_steps=2, output_dir=str(tmp_path / name),
                save_steps=3, seed=1)
  values.update(kw)
  return load_config(None, values)


def _losses(out_dir):
  rows = [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines()]
  return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow
def test_stopped_and_resumed_run_equals_uninterrupted_run(data_dir, tmp_path, capsys):
  full = train(_config(data_dir, tmp_path, "full"))
  first = train(_config(data_dir, tmp_path, "resumed"), stop_at_step=3)
  assert first["step"] == 3 and "adapter_dir" not in first
  second = train(_config(data_dir, tmp_path, "resumed"))
  assert "resumed from" in capsys.readouterr().out
  assert second["step"] == full["step"] == 6
  np.testing.assert_allclose(_losses(tmp_path / "resumed"), _losses(tmp_path / "full"), rtol=1e-6)
  assert (tmp_path / "resumed" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(data_dir, tmp_path, monkeypatch):
  import jqlora.training.loop as loop

  real = loop.train_step
  calls = []

  def poisoned(model, optimizer, batch):
    metrics = real(model, optimizer, batch)
    calls.append(1)
    return {**metrics, "loss": jnp.float32(jnp.nan)} if len(calls) == 4 else metrics

  monkeypatch.setattr(loop, "train_step", poisoned)
  config = _config(data_dir, tmp_path, "nan", save_steps=2)
  with pytest.raises(TrainingError, match=r"loss is nan at step 4.*last good checkpoint \(step 2\)"):
    train(config)
  from jqlora.training.checkpoint import Checkpointer
  assert Checkpointer(tmp_path / "nan" / "checkpoints").latest_step() == 2


@pytest.mark.slow
def test_use_dora_trains_and_saves_a_peft_dora_adapter(data_dir, tmp_path):
  from safetensors.numpy import load_file

  result = train(_config(data_dir, tmp_path, "dora", use_dora=True, max_steps=2, save_steps=None))
  assert result["step"] == 2 and all(np.isfinite(_losses(tmp_path / "dora")))
  adapter = pathlib.Path(result["adapter_dir"])
  assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
  keys = load_file(str(adapter / "adapter_model.safetensors"))
  assert any(k.endswith("lora_magnitude_vector") for k in keys)


def _rows(out_dir):
  return [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_running_a_complete_run_again_changes_nothing(data_dir, tmp_path, capsys):
  import signal

  handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  config = _config(data_dir, tmp_path, "done", max_steps=4, val_set_size=4, eval_batch_size=4,
                   eval_exact_match=True, eval_max_new_tokens=3)
  first = train(config)
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
  metrics = (tmp_path / "done" / "metrics.jsonl").read_text()
  adapter = tmp_path / "done" / "adapter"
  saved = {p.name: p.read_bytes() for p in adapter.iterdir()}
  assert _rows(tmp_path / "done")[-1] == {
      "step": 4, "eval_loss": first["eval_loss"], "eval_perplexity": first["eval_perplexity"],
      "exact_match": first["accuracy_after"], "adapter_dir": str(adapter)}
  # the adapter names its base model, for PEFT
  assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == \
      config.base_model
  capsys.readouterr()
  again = train(config)
  printed = capsys.readouterr().out
  assert "the run is already complete (step 4 of 4" in printed
  assert f"recorded: last loss {first['loss']:.4f}, held-out loss {first['eval_loss']:.4f}" in printed
  assert again == first
  assert (tmp_path / "done" / "metrics.jsonl").read_text() == metrics  # no duplicate last row
  assert {p.name: p.read_bytes() for p in adapter.iterdir()} == saved


@pytest.mark.slow
def test_a_resumed_run_cuts_the_metrics_back_to_its_checkpoint(data_dir, tmp_path, monkeypatch):
  import jqlora.training.loop as loop

  full = train(_config(data_dir, tmp_path, "full"))
  real = loop.train_step
  calls = []

  def poisoned(model, optimizer, batch):  # steps 1-3 logged, then a NaN at step 4
    metrics = real(model, optimizer, batch)
    calls.append(1)
    return {**metrics, "loss": jnp.float32(jnp.nan)} if len(calls) == 4 else metrics

  monkeypatch.setattr(loop, "train_step", poisoned)
  with pytest.raises(TrainingError):
    train(_config(data_dir, tmp_path, "cut", save_steps=2))
  assert [r["step"] for r in _rows(tmp_path / "cut")] == [1, 2, 3]  # the checkpoint is step 2
  with (tmp_path / "cut" / "metrics.jsonl").open("a") as f:
    f.write('{"step": 4, "lo')  # as a process killed while writing leaves it
  monkeypatch.setattr(loop, "train_step", real)
  resumed = train(_config(data_dir, tmp_path, "cut", save_steps=2))
  assert resumed["step"] == full["step"] == 6
  rows = _rows(tmp_path / "cut")
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 6]  # each step once, then the final row
  np.testing.assert_allclose(_losses(tmp_path / "cut"), _losses(tmp_path / "full"), rtol=1e-6)

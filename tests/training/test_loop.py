"""The training loop on the tiny Llama: packing, remat, resume exactness, non-finite stop."""

import dataclasses
import json
import pathlib

import jax
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
  """Per-layer and selective checkpointing: the same losses as keeping everything."""
  batch = {"input_ids": jnp.asarray(np.random.default_rng(1).integers(3, 500, (2, 16)), jnp.int32)}
  batch["labels"] = batch["input_ids"]
  losses = {}
  for remat in (False, "selective", True):
    model = _tiny(data_dir, remat)
    optimizer = jqlora.make_optimizer(model, optax.adam(1e-2))
    losses[remat] = [float(jqlora.train_step(model, optimizer, batch)["loss"]) for _ in range(6)]
  np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
  np.testing.assert_allclose(losses["selective"], losses[False], rtol=1e-5)
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


def _poisoned(monkeypatch, calls):
  """``train_step`` on an adapter with NaN entries at the given call numbers (put back after)."""
  import jqlora.training.loop as loop

  real, n = loop.train_step, []

  def step(model, optimizer, batch):
    n.append(1)
    if len(n) not in calls:
      return real(model, optimizer, batch)
    state = nnx.state(model, nnx.LoRAParam)
    good = jax.tree.map(jnp.array, state)  # copies: the step donates its buffers
    nnx.update(model, jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), state))
    metrics = real(model, optimizer, batch)
    nnx.update(model, good)
    return metrics

  monkeypatch.setattr(loop, "train_step", step)


@pytest.mark.slow
def test_a_non_finite_update_is_skipped_counted_and_the_run_goes_on(data_dir, tmp_path,
                                                                     monkeypatch):
  _poisoned(monkeypatch, {4})
  result = train(_config(data_dir, tmp_path, "nan"))
  rows = [r for r in _rows(tmp_path / "nan") if "loss" in r]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and result["step"] == 6
  assert [r["skipped_steps"] for r in rows] == [0, 0, 0, 1, 1, 1]
  assert np.isnan(rows[3]["loss"]) and all(np.isfinite(r["loss"]) for r in rows[4:])
  from safetensors.numpy import load_file
  adapter = load_file(str(tmp_path / "nan" / "adapter" / "adapter_model.safetensors"))
  assert all(np.isfinite(w).all() for w in adapter.values())


@pytest.mark.slow
def test_max_nonfinite_steps_in_a_row_stop_and_keep_the_last_checkpoint(data_dir, tmp_path,
                                                                         monkeypatch):
  _poisoned(monkeypatch, {4, 5, 6})
  config = _config(data_dir, tmp_path, "nan", save_steps=2, max_nonfinite_steps=2)
  with pytest.raises(TrainingError, match=r"loss is nan at step 5: 2 non-finite updates in a row.*"
                                          r"last good checkpoint \(step 4\)"):
    train(config)
  from jqlora.training.checkpoint import Checkpointer
  assert Checkpointer(tmp_path / "nan" / "checkpoints").latest_step() == 4


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
  _poisoned(monkeypatch, {4})  # steps 1-3 logged, then a non-finite update stops the run
  with pytest.raises(TrainingError):
    train(_config(data_dir, tmp_path, "cut", save_steps=2, max_nonfinite_steps=1))
  assert [r["step"] for r in _rows(tmp_path / "cut")] == [1, 2, 3]  # the checkpoint is step 2
  with (tmp_path / "cut" / "metrics.jsonl").open("a") as f:
    f.write('{"step": 4, "lo')  # as a process killed while writing leaves it
  monkeypatch.setattr(loop, "train_step", real)
  resumed = train(_config(data_dir, tmp_path, "cut", save_steps=2))
  assert resumed["step"] == full["step"] == 6
  rows = _rows(tmp_path / "cut")
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 6]  # each step once, then the final row
  np.testing.assert_allclose(_losses(tmp_path / "cut"), _losses(tmp_path / "full"), rtol=1e-6)


def test_dropout_masks_follow_the_seed(data_dir, tmp_path):
  import jqlora.training.loop as loop

  ids = jnp.asarray(np.random.default_rng(0).integers(3, 100, (2, 12)), jnp.int32)
  outs = []
  for seed in (0, 0, 1):
    run = loop._prepare(_config(data_dir, tmp_path, "seed", lora_dropout=0.5, seed=seed))
    loop._build(run)
    lora = nnx.state(run.model, nnx.LoRAParam)  # the same adapters: only the masks differ
    nnx.update(run.model, jax.tree.map(lambda x: jnp.full_like(x, 0.05), lora))
    run.model.train()
    outs.append(np.asarray(run.model(ids)))
  np.testing.assert_array_equal(outs[0], outs[1])
  assert np.abs(outs[0] - outs[2]).max() > 1e-3


@pytest.mark.slow
def test_a_resume_with_changed_settings_stops_naming_them(data_dir, tmp_path):
  from jqlora.training.config import ConfigError

  kw = dict(max_steps=2, save_steps=1, sample_packing=False)
  train(_config(data_dir, tmp_path, "fp", **kw), stop_at_step=1)
  with pytest.raises(ConfigError, match=r"checkpoint at step 1 was trained with other settings: "
                                        r"lora_alpha \(16\.0 -> 32\.0\), learning_rate \(0\.01 -> "
                                        r"0\.02\);.*resume_changed_settings: true"):
    train(_config(data_dir, tmp_path, "fp", lora_alpha=32, learning_rate=2e-2, **kw))
  data = tmp_path / "train.jsonl"
  data.write_text(data.read_text().replace("rev", "reverse"))
  with pytest.raises(ConfigError, match=r"settings: dataset \(its content differs"):
    train(_config(data_dir, tmp_path, "fp", **kw))
  assert [r["step"] for r in _rows(tmp_path / "fp")] == [1]  # nothing was touched
  resumed = train(_config(data_dir, tmp_path, "fp", resume_changed_settings=True, eval_steps=5,
                          **kw))  # allowed; and eval_* keys do not shape the run
  assert resumed["step"] == 2


@pytest.mark.slow
def test_a_crash_while_writing_the_adapter_leaves_no_torn_adapter(data_dir, tmp_path, monkeypatch):
  import jqlora.training.loop as loop

  def crash(model, folder, **kw):
    (pathlib.Path(folder) / "adapter_config.json").parent.mkdir(parents=True, exist_ok=True)
    (pathlib.Path(folder) / "adapter_config.json").write_text("{}")
    raise OSError("disk full")

  monkeypatch.setattr(loop, "save_adapter", crash)
  config = _config(data_dir, tmp_path, "torn", max_steps=1, save_steps=None)
  with pytest.raises(OSError, match="disk full"):
    train(config)
  assert not (tmp_path / "torn" / "adapter").exists()
  monkeypatch.undo()
  train(config)  # the rerun writes it whole
  assert loop._adapter_saved(tmp_path / "torn" / "adapter")


def _warnings_of(fn):
  """The messages ``jqlora.training.loop`` logs during ``fn()``, and its result."""
  import logging

  records, handler = [], logging.Handler(logging.WARNING)
  handler.emit = records.append
  logger = logging.getLogger("jqlora.training.loop")
  logger.addHandler(handler)
  try:
    result = fn()
  finally:
    logger.removeHandler(handler)
  return [r.getMessage() for r in records], result


def test_pad_equal_to_eos_warns_and_the_end_of_turn_is_trained(data_dir, tmp_path):
  import shutil

  import jqlora.training.loop as loop

  from .toy import char_tokenizer

  config = _config(data_dir, tmp_path, "pad")
  messages, run = _warnings_of(lambda: loop._prepare(config))
  eot = run.tokenizer.convert_tokens_to_ids("<|im_end|>")
  assert run.pad_id == run.tokenizer.eos_token_id == eot
  assert messages == ["the tokenizer's pad token is its EOS token '<|im_end|>' (id 2); jqlora masks "
                      "padding by position, so the end of turn stays a target (40 of 40 examples "
                      "train it)"]
  assert all((ex.labels == eot).sum() == 1 for ex in run.train_set.examples)  # the answer's end
  batch = next(run.batches)
  rows = batch["segment_ids"].reshape(-1, config.sequence_len)
  examples = sum(len(np.unique(r[r > 0])) for r in rows)
  assert (batch["labels"] == eot).sum() == examples > 0  # one end-of-turn target per example
  # a template that closes no turn: the examples train no stop token, which is said
  other = tmp_path / "no-end"
  shutil.copytree(tmp_path / "tiny-llama", other)
  char_tokenizer("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}").save_pretrained(other)
  messages, _ = _warnings_of(lambda: loop._prepare(
      dataclasses.replace(config, base_model=str(other))))
  assert messages[-1].endswith("40 of 40 examples train no stop token (ids [2]): the model may "
                               "not learn to stop")

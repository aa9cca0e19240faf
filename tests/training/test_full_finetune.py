"""``finetune: full``: every float weight of a float base trains; NF4 bases refuse it."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from flax import nnx

import jqlora
from jqlora.cli import main
from jqlora.nn import Frozen
from jqlora.training.config import ConfigError, load_config
from jqlora.training.fingerprint import changed_settings, settings
from jqlora.training.loop import train

from .toy import char_tokenizer, tiny_model_dir, write_reverse_task

MESSAGE = "finetune: full needs a float base: set load_in_4bit: false"


def _weights(model):
  return jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, Frozen)))


@pytest.mark.slow  # ~6 s: compiles a step of the tiny Llama
def test_full_mode_changes_every_float_weight_and_lowers_the_loss(data_dir):
  model = jqlora.load_model(data_dir / "hf" / "tiny-llama" / "base", quantize=False,
                            dtype=jnp.float32, progress=False)
  ids = jnp.asarray(np.random.default_rng(0).integers(3, 500, (2, 16)), jnp.int32)
  batch = {"input_ids": ids, "labels": ids}
  before = _weights(model)
  optimizer = jqlora.make_optimizer(model, optax.adam(1e-3), wrt=Frozen)
  losses = [float(jqlora.train_step(model, optimizer, batch)["loss"]) for _ in range(5)]
  after = _weights(model)
  old_embed, new_embed = before.pop("embed_tokens"), after.pop("embed_tokens")
  seen = np.isin(np.arange(old_embed.shape[0]), np.asarray(ids))
  assert (old_embed[seen] != new_embed[seen]).all()  # the rows of the batch's tokens moved,
  np.testing.assert_array_equal(old_embed[~seen], new_embed[~seen])  # no gradient, no Adam step
  pairs = list(zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True))
  assert len(pairs) == 2 + 9  # lm head, final norm; 7 linears + 2 norms (stacked layers)
  for old, new in pairs:  # every element of every other weight moved
    assert (old != new).all(), old.shape
  assert losses[-1] < losses[0] - 0.5, losses
  assert not nnx.state(model, nnx.LoRAParam)  # no adapters were needed


def _values(tmp_path, **kw):
  data = tmp_path / "train.jsonl"
  write_reverse_task(data, 24)
  values = dict(base_model="unused", dataset=str(data), dtype="float32", sequence_len=48,
                sample_packing=True, micro_batch_size=2, max_steps=4, learning_rate=1e-3,
                lr_scheduler="constant", output_dir=str(tmp_path / "out"), seed=0)
  values.update(kw)
  return values


def test_an_nf4_base_refuses_full_mode_naming_the_keys(tmp_path):
  with pytest.raises(ConfigError) as e:
    load_config(None, _values(tmp_path, finetune="full"))  # load_in_4bit defaults to true
  assert str(e.value).endswith(MESSAGE)
  with pytest.raises(ConfigError, match="finetune must be"):
    load_config(None, _values(tmp_path, finetune="half"))
  assert load_config(None, _values(tmp_path)).finetune == "lora"


@pytest.mark.slow  # ~7 s: reads the tokenizer, data and NF4 folder first
def test_a_bnb_4bit_folder_refuses_full_mode_even_with_load_in_4bit_false(data_dir, tmp_path):
  base = tmp_path / "bnb"
  shutil.copytree(data_dir / "hf" / "tiny-llama" / "base-bnb-nf4", base)
  char_tokenizer().save_pretrained(base)
  config = load_config(None, _values(tmp_path, base_model=str(base), finetune="full",
                                     load_in_4bit=False))
  with pytest.raises(ConfigError, match="finetune: full needs a float base: .* holds NF4 weights"):
    train(config)
  assert not (tmp_path / "out" / "checkpoints").exists()


def test_finetune_is_a_shaping_setting(tmp_path):
  lora = load_config(None, _values(tmp_path, load_in_4bit=False))
  full = load_config(None, _values(tmp_path, load_in_4bit=False, finetune="full"))
  assert settings(lora)["finetune"] == "lora"
  assert changed_settings(settings(lora), full) == ["finetune ('lora' -> 'full')"]
  recorded = {k: v for k, v in settings(lora).items() if k != "finetune"}  # an older checkpoint
  assert changed_settings(recorded, lora) == []


@pytest.mark.slow
def test_full_run_through_the_cli_resumes_exactly_and_writes_the_whole_model(data_dir, tmp_path,
                                                                             capsys):
  model_dir = tiny_model_dir(data_dir, tmp_path)
  values = _values(tmp_path, base_model=str(model_dir), save_steps=2)
  cfg = tmp_path / "run.yaml"
  cfg.write_text(yaml.safe_dump({k: v for k, v in values.items() if k != "output_dir"}))
  args = ["--config", str(cfg), "finetune=full", "load_in_4bit=false"]
  assert main(["train", *args, f"output_dir={tmp_path / 'whole'}"]) == 0
  out = capsys.readouterr().out
  assert "full fine-tuning" in out and "(100.000%)" in out
  split = {"finetune": "full", "load_in_4bit": False, "output_dir": str(tmp_path / "split")}
  assert train(load_config(cfg, split), stop_at_step=2)["step"] == 2  # a checkpoint at step 2
  assert main(["train", *args, f"output_dir={tmp_path / 'split'}"]) == 0  # resumes from step 2
  assert "resumed from" in capsys.readouterr().out

  rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text()
                 .splitlines()] for name in ("whole", "split")}
  losses = {name: [r["loss"] for r in rs if "loss" in r] for name, rs in rows.items()}
  np.testing.assert_allclose(losses["split"], losses["whole"], rtol=1e-5)
  assert rows["whole"][-1]["model_dir"] == str(tmp_path / "whole" / "model")
  assert not (tmp_path / "whole" / "adapter").exists()

  base = jqlora.load_model(model_dir, quantize=False, dtype=jnp.float32, progress=False)
  tuned = {name: jqlora.load_model(tmp_path / name / "model", quantize=False, dtype=jnp.float32,
                                   progress=False) for name in ("whole", "split")}
  for old, new, again in zip(*(jax.tree.leaves(_weights(m)) for m in (base, *tuned.values())),
                             strict=True):
    assert (old != new).any()  # every weight was trained and written
    np.testing.assert_allclose(again, new, rtol=1e-5, atol=1e-7)
  assert jqlora.load_tokenizer(tmp_path / "whole" / "model")("abc")["input_ids"]

  assert main(["train", *args, f"output_dir={tmp_path / 'whole'}"]) == 0  # complete: nothing to do
  assert "already complete" in capsys.readouterr().out


@pytest.mark.slow  # ~10 s: one step of the tiny Llama through train()
@pytest.mark.parametrize("quant_type", ["fp4", "int4"])
def test_bnb_4bit_quant_type_chooses_the_base_code_table(data_dir, tmp_path, monkeypatch, quant_type):
  from jqlora.format import NF4Tensor
  from jqlora.training import loop

  built = []
  load = loop.load_model
  monkeypatch.setattr(loop, "load_model", lambda *a, **kw: built.append(load(*a, **kw)) or built[-1])
  values = _values(tmp_path, base_model=str(tiny_model_dir(data_dir, tmp_path)), max_steps=1,
                   bnb_4bit_quant_type=quant_type)
  assert train(load_config(None, values))["step"] == 1
  weights = [x for x in jax.tree.leaves(nnx.state(built[0]), is_leaf=lambda v: isinstance(v, NF4Tensor))
             if isinstance(x, NF4Tensor)]
  assert weights and {w.quant_type for w in weights} == {quant_type}

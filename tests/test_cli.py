"""`jqlora train / generate / export` end to end on the tiny Llama, checked against PEFT and transformers."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import jqlora
from jqlora.cli import main
from training.toy import tiny_model_dir, write_reverse_task


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  """A 4-step CLI run: (tmp dir, base model dir, run output dir, captured stdout)."""
  tmp = tmp_path_factory.mktemp("cli")
  model_dir = tiny_model_dir(data_dir, tmp)
  write_reverse_task(tmp / "train.jsonl", 48)
  write_reverse_task(tmp / "eval.jsonl", 8, seed=1)
  cfg = tmp / "run.yaml"
  cfg.write_text(yaml.safe_dump({
      "base_model": str(model_dir), "dataset": "train.jsonl", "eval_dataset": "eval.jsonl",
      "dtype": "float32", "lora_r": 4, "sequence_len": 48, "sample_packing": True,
      "micro_batch_size": 4, "max_steps": 4, "learning_rate": 2e-2, "lr_scheduler": "constant",
      "output_dir": "out", "eval_exact_match": True, "eval_max_new_tokens": 4}))
  return tmp, model_dir, cfg


def test_train_prints_banner_progress_metrics_and_saves_the_adapter(trained, capsys):
  tmp, _, cfg = trained
  assert main(["train", "--config", str(cfg), "max_steps=8", "logging_steps=2"]) == 0
  out = capsys.readouterr()
  assert "trainable parameters:" in out.out and "%" in out.out
  assert "tokens per step: 4 x 1 x 48 = 192" in out.out
  assert "first step includes compilation" in out.out
  assert "held-out exact match before training" in out.out and "after training" in out.out
  assert "train:" in out.err and "loss=" in out.err and "tok_s=" in out.err  # tqdm bar
  rows = [json.loads(l) for l in (tmp / "out" / "metrics.jsonl").read_text().splitlines()]
  steps = [r for r in rows if "loss" in r]
  assert [r["step"] for r in steps] == [2, 4, 6, 8]
  assert set(steps[0]) >= {"step", "loss", "learning_rate", "grad_norm", "tokens_per_second"}
  assert steps[-1]["loss"] < steps[0]["loss"]  # it learns
  assert "eval_perplexity" in rows[-1]
  assert (tmp / "out" / "adapter" / "adapter_config.json").is_file()


def _jqlora_logits(model_dir, adapter, ids):
  model = jqlora.load_model(model_dir, quantize=False, dtype=jnp.float32, progress=False)
  if adapter is not None:
    jqlora.load_adapter(model, adapter)
  return np.asarray(model(jnp.asarray(ids)))


def test_exported_adapter_loads_in_peft_and_merged_model_in_transformers(trained):
  torch = pytest.importorskip("torch")
  from peft import PeftModel
  from transformers import AutoModelForCausalLM

  tmp, model_dir, cfg = trained
  assert main(["train", "--config", str(cfg), "output_dir=out4", "eval_exact_match=false"]) == 0
  adapter = tmp / "out4" / "adapter"
  ids = np.random.default_rng(0).integers(3, 500, (2, 12)).astype(np.int32)
  expected = _jqlora_logits(model_dir, adapter, ids)
  assert main(["export", "--model", str(model_dir), "--adapter", str(adapter),
               "--out", str(tmp / "peft")]) == 0
  assert main(["export", "--model", str(model_dir), "--adapter", str(adapter),
               "--out", str(tmp / "merged"), "--merged"]) == 0
  with torch.no_grad():
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_logits = PeftModel.from_pretrained(base, tmp / "peft")(torch.tensor(ids)).logits.numpy()
    merged = AutoModelForCausalLM.from_pretrained(tmp / "merged", dtype=torch.float32)
    merged_logits = merged(torch.tensor(ids)).logits.numpy()
  assert np.abs(expected - _jqlora_logits(model_dir, None, ids)).max() > 1e-3  # adapter matters
  np.testing.assert_allclose(peft_logits, expected, atol=1e-4)
  np.testing.assert_allclose(merged_logits, expected, atol=1e-4)


def test_generate_command_prints_the_greedy_answer(trained, capsys):
  from jqlora.generate import generate

  _, model_dir, _ = trained
  assert main(["generate", "--model", str(model_dir), "--prompt", "rev\n\nabc",
               "--max-new-tokens", "3"]) == 0
  model = jqlora.load_model(model_dir, quantize=True, dtype=jnp.float32, progress=False)
  expected = generate(model, jqlora.load_tokenizer(model_dir), ["rev\n\nabc"], max_new_tokens=3)
  assert capsys.readouterr().out == expected[0] + "\n"


def test_user_errors_exit_2_with_one_line(trained, capsys):
  tmp, _, cfg = trained
  assert main(["train", "--config", str(cfg), "lora_rr=3"]) == 2
  err = capsys.readouterr().err
  assert "unknown config key 'lora_rr'; did you mean 'lora_r'" in err and "Traceback" not in err
  (tmp / "bad.jsonl").write_text('{"text": "a"}\n{oops\n')
  assert main(["train", "--config", str(cfg), f"dataset={tmp / 'bad.jsonl'}"]) == 2
  assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err

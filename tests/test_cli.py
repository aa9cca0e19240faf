"""`jqlora train / generate / export` end to end on the tiny Llama, checked against PEFT and transformers."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from training.toy import tiny_model_dir, write_reverse_task

import jqlora
from jqlora.cli import main
from jqlora.plan import PRESETS

pytestmark = pytest.mark.slow  # trains through the CLI, one run on 8 devices in a subprocess


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


def _jqlora_logits(model_dir, adapter, ids, *, quantize=False):
  model = jqlora.load_model(model_dir, quantize=quantize, dtype=jnp.float32, progress=False)
  if adapter is not None:
    jqlora.load_adapter(model, adapter)
  return np.asarray(model(jnp.asarray(ids)))


def test_exported_adapter_loads_in_peft_and_merged_model_in_transformers(trained, capsys):
  torch = pytest.importorskip("torch")
  from peft import PeftModel
  from transformers import AutoModelForCausalLM

  tmp, model_dir, cfg = trained
  assert main(["train", "--config", str(cfg), f"output_dir={tmp / 'out4'}", "eval_exact_match=false"]) == 0
  adapter = tmp / "out4" / "adapter"
  ids = np.random.default_rng(0).integers(3, 500, (2, 12)).astype(np.int32)
  expected = _jqlora_logits(model_dir, adapter, ids)  # full-precision base + adapter
  qlora = _jqlora_logits(model_dir, adapter, ids, quantize=True)  # NF4 base + adapter, as trained
  capsys.readouterr()
  assert main(["export", "--model", str(model_dir), "--adapter", str(adapter),
               "--out", str(tmp / "peft")]) == 0
  assert main(["export", "--model", str(model_dir), "--adapter", str(adapter),
               "--out", str(tmp / "merged"), "--merged"]) == 0
  assert "merged into the dequantized NF4 base" in capsys.readouterr().out
  assert main(["export", "--model", str(model_dir), "--adapter", str(adapter),
               "--out", str(tmp / "merged-original"), "--merged", "--merge-into", "original"]) == 0
  assert "merged into the full-precision checkpoint" in capsys.readouterr().out

  def hf_logits(folder):
    with torch.no_grad():
      merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
      return merged(torch.tensor(ids)).logits.numpy()

  with torch.no_grad():
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_logits = PeftModel.from_pretrained(base, tmp / "peft")(torch.tensor(ids)).logits.numpy()
  merged_logits, original_logits = hf_logits(tmp / "merged"), hf_logits(tmp / "merged-original")
  assert np.abs(expected - _jqlora_logits(model_dir, None, ids)).max() > 1e-3  # adapter matters
  np.testing.assert_allclose(peft_logits, expected, atol=1e-4)
  # the default merges into the dequantized NF4 base, the weights the adapter was trained against
  np.testing.assert_allclose(merged_logits, qlora, atol=1e-4)
  # --merge-into original: the full-precision checkpoint + adapter, which answers differently
  np.testing.assert_allclose(original_logits, expected, atol=1e-4)
  assert np.abs(merged_logits - original_logits).max() > 1e-3


def test_merge_into_without_merged_is_a_one_line_error(trained, capsys):
  tmp, model_dir, _ = trained
  assert main(["export", "--model", str(model_dir), "--adapter", str(tmp / "none"),
               "--out", str(tmp / "x"), "--merge-into", "original"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "--merge-into" in err and "add --merged" in err
  assert not (tmp / "x").exists()


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
  assert main(["train", "--config", str(cfg), f"dataset={tmp / 'bad.jsonl'}",
               f"output_dir={tmp / 'bad-data-run'}"]) == 2
  assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err


# -- scale-out: mesh.* keys, 8 CPU devices in a subprocess, and `jqlora plan` -----------

MESH_WORKER = """
import contextlib, io, json, sys
import jax
from jqlora.cli import main
assert len(jax.devices()) == 8, jax.devices()
config = sys.argv[1]
out = {}
for name, extra in {"single": [], "mesh": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]}.items():
  out[name] = main(["train", "--config", config, f"output_dir={name}", *extra])
for name, extra in {"count": ["mesh.data=4", "mesh.fsdp=4"], "tensor": ["mesh.tensor=8"],
                    "rows": ["mesh.data=4", "mesh.fsdp=2", "micro_batch_size=2"]}.items():
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    out[name] = [main(["train", "--config", config, f"output_dir={name}", *extra]),
                 err.getvalue()]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory):
  """``jqlora train`` on 1 device and on a data=2 x fsdp=2 x tensor=2 mesh of 8 CPU devices."""
  import os
  import subprocess
  import sys

  from training.meshable import write_meshable_model

  tmp = tmp_path_factory.mktemp("mesh")
  write_meshable_model(tmp / "model")
  write_reverse_task(tmp / "train.jsonl", 40)
  cfg = tmp / "run.yaml"
  cfg.write_text(yaml.safe_dump({
      "base_model": str(tmp / "model"), "dataset": "train.jsonl", "dtype": "float32",
      "lora_r": 4, "lora_dropout": 0.1, "sequence_len": 32, "sample_packing": True,
      "micro_batch_size": 4, "max_steps": 5, "learning_rate": 1e-2, "lr_scheduler": "cosine",
      "warmup_steps": 1, "seed": 3, "val_set_size": 4, "eval_batch_size": 4}))
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", MESH_WORKER, str(cfg)], cwd=tmp, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return tmp, json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout


def test_train_on_a_2x2x2_mesh_gives_the_losses_of_one_device(mesh_runs):
  tmp, result, stdout = mesh_runs
  assert result["single"] == result["mesh"] == 0
  assert "mesh: data=2 x fsdp=2 x tensor=2 over 8 devices of 1 process(es)" in stdout
  losses, held_out = {}, {}
  for name in ("single", "mesh"):
    rows = [json.loads(l) for l in (tmp / name / "metrics.jsonl").read_text().splitlines()]
    losses[name] = [r["loss"] for r in rows if "loss" in r]
    held_out[name] = rows[-1]["eval_loss"]  # evaluated on the mesh too
  assert len(losses["mesh"]) == 5 and len(set(losses["mesh"])) == 5
  np.testing.assert_allclose(losses["mesh"], losses["single"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(held_out["mesh"], held_out["single"], rtol=0, atol=1e-5)


def test_mesh_errors_name_the_devices_and_the_batch_in_one_line(mesh_runs):
  _, result, _ = mesh_runs
  for name, expected in {
      "count": "mesh.data * mesh.fsdp * mesh.tensor = 4 * 4 * 1 = 16, but there are 8 devices",
      "rows": "micro_batch_size = 2 must be divisible by mesh.data * mesh.fsdp = 4 * 2 = 8"}.items():
    rc, err = result[name]
    line = err.rstrip("\n").splitlines()[-1]  # (after the loading bar, where a model loads)
    assert rc == 2 and "Traceback" not in err, (name, err)
    assert line.startswith("jqlora train: error: ") and expected in line, err


def test_an_axis_that_does_not_divide_a_tensor_leaves_it_unsplit_with_one_warning(mesh_runs):
  tmp, result, _ = mesh_runs
  rc, err = result["tensor"]  # mesh.tensor=8: down_proj's 4 input blocks cannot split 8 ways
  assert rc == 0 and "Traceback" not in err, err
  losses = {name: [json.loads(l)["loss"] for l in (tmp / name / "metrics.jsonl").read_text()
                   .splitlines() if "loss" in json.loads(l)] for name in ("single", "tensor")}
  np.testing.assert_allclose(losses["tensor"], losses["single"], rtol=0, atol=1e-5)
  warnings = [line for line in err.splitlines() if "left unsplit" in line]
  assert len(warnings) == 1, err
  assert "layers/mlp/down_proj/weight (NF4 absmax) (in/block_size (in = 256, block_size = 64) " \
         "= 4 on 'tensor' of size 8)" in warnings[0]


def test_mesh_keys_nested_or_dotted_and_bad_values(trained, capsys):
  from jqlora.training.config import load_config, parse_overrides

  tmp, _, cfg = trained
  nested = tmp / "nested.yaml"
  nested.write_text(cfg.read_text() + "mesh:\n  data: 2\n  tensor: 4\nmesh.fsdp: 3\n")
  c = load_config(nested, parse_overrides(["mesh.tensor=2"]))
  assert (c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.size) == (2, 3, 2, 12)
  assert load_config(cfg).mesh.size == 1
  for override, expected in {"mesh.data=0": "mesh.data must be >= 1, got 0",
                             "mesh.tensr=2": "unknown config key 'mesh.tensr'; did you mean "
                                             "'mesh.tensor'",
                             "mesh.fsdp=two": "mesh.fsdp must be int, got 'two'"}.items():
    assert main(["train", "--config", str(cfg), override]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err
  (tmp / "flat.yaml").write_text(cfg.read_text() + "mesh: 8\n")
  assert main(["train", "--config", str(tmp / "flat.yaml")]) == 2
  assert "mesh must be a mapping with keys data, fsdp, tensor, got 8" in capsys.readouterr().err


def test_plan_command_exits_0_when_it_fits_and_1_when_not(capsys):
  assert main(["plan", "--model", "llama-65b", "--memory-per-device", "48GiB", "--lora-r",
               "64", "--checkpointing"]) == 0
  out = capsys.readouterr().out
  assert "NF4 weights (codes)" in out and "fits" in out and "NOT" not in out
  assert main(["plan", "--model", "llama-7b", "--devices", "8", "--tensor", "2",
               "--memory-per-device", "512MiB", "--json"]) == 1
  p = json.loads(capsys.readouterr().out)
  assert p["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2} and p["fits"] is False
  with pytest.raises(SystemExit) as e:
    main(["plan", "--model", "llama-7b", "--memory-per-device", "lots"])
  assert e.value.code == 2 and "memory size 'lots'" in capsys.readouterr().err


def test_plan_prints_the_table_and_exits_1_when_it_does_not_fit(capsys, tmp_path):
  assert main(["plan", "--model", "llama-65b", "--devices", "1", "--memory-per-device", "48GiB",
               "--batch", "1", "--seq", "512", "--lora-r", "64", "--checkpointing"]) == 0
  out = capsys.readouterr().out
  assert "NF4 weights (codes)" in out and "fits" in out and "NOT" not in out
  config = tmp_path / "config.json"
  config.write_text(json.dumps(PRESETS["llama-7b"]))
  assert main(["plan", "--model", str(config), "--memory-per-device", "4GB", "--json"]) == 1
  assert json.loads(capsys.readouterr().out)["fits"] is False
  with pytest.raises(SystemExit):
    main(["plan", "--model", "llama-7b", "--memory-per-device", "lots"])

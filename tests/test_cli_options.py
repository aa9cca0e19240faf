"""Fast command-line checks: ``jqlora --version`` and ``jqlora plan``'s flags and ``--config``."""

import json

import pytest
import yaml

import jqlora
from jqlora.cli import _plan_parser, main
from jqlora.plan import plan


def test_version_prints_the_package_version_and_exits_0(capsys):
  with pytest.raises(SystemExit) as e:
    main(["--version"])
  assert e.value.code == 0
  assert capsys.readouterr().out == f"jqlora {jqlora.__version__}\n"


def _plan_json(capsys, *argv) -> tuple[int, dict]:
  rc = main(["plan", *argv, "--json"])
  return rc, json.loads(capsys.readouterr().out)


@pytest.fixture
def run_yaml(data_dir, tmp_path):
  """A training config for the tiny Llama whose dataset file does not exist."""
  path = tmp_path / "train.yaml"
  path.write_text(yaml.safe_dump({
      "base_model": str(data_dir / "hf" / "tiny-llama" / "base"), "dataset": "missing.jsonl",
      "micro_batch_size": 8, "sequence_len": 64, "lora_r": 4,
      "lora_target_modules": ["q_proj", "v_proj"], "gradient_checkpointing": True,
      "dtype": "float32", "mesh": {"data": 2, "fsdp": 2}}))
  return path


def test_plan_reads_the_run_from_a_training_config(run_yaml, data_dir, capsys):
  rc, p = _plan_json(capsys, "--config", str(run_yaml))
  expected = plan(data_dir / "hf" / "tiny-llama" / "base", devices=4, data=2, fsdp=2, batch=8,
                  seq=64, lora_r=4, target_modules=["q_proj", "v_proj"], checkpointing=True,
                  dtype="float32")
  assert rc == 0 and p["total"] == expected.total > 0
  assert p["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
  assert (p["batch"], p["seq"], p["lora_r"], p["target_modules"], p["checkpointing"],
          p["dtype"]) == (8, 64, 4, ["q_proj", "v_proj"], True, "float32")
  assert "tiny-llama" in p["model"]


def test_plan_flags_override_the_config(run_yaml, capsys):
  _, p = _plan_json(capsys, "--config", str(run_yaml), "--batch", "16", "--seq", "32",
                    "--lora-r", "2", "--target-modules", "all-linear", "--no-checkpointing",
                    "--dtype", "bfloat16", "--tensor", "2")
  assert (p["batch"], p["seq"], p["lora_r"], p["checkpointing"], p["dtype"]) == \
      (16, 32, 2, False, "bfloat16")
  assert len(p["target_modules"]) == 7
  assert p["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}  # one axis over the config's mesh
  _, p = _plan_json(capsys, "--config", str(run_yaml), "--devices", "8")
  assert p["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}  # another size: N-way fsdp
  _, p = _plan_json(capsys, "--config", str(run_yaml), "--model", "llama-7b")
  assert p["model"].startswith("llama-7b (llama L=32")


def test_plan_defaults_to_no_checkpointing_like_training(capsys):
  _, default = _plan_json(capsys, "--model", "llama-7b")
  _, off = _plan_json(capsys, "--model", "llama-7b", "--no-checkpointing")  # still accepted
  _, on = _plan_json(capsys, "--model", "llama-7b", "--checkpointing")
  assert default["checkpointing"] is off["checkpointing"] is False and on["checkpointing"] is True
  assert default["total"] == off["total"] > on["total"]
  assert default["lora_r"] == 8 and default["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
  # the QLoRA paper's 65B on one 48 GB GPU needs checkpointing, and says so
  assert main(["plan", "--model", "llama-65b", "--memory-per-device", "48GiB", "--lora-r", "64"]) == 1
  out = capsys.readouterr().out
  assert "checkpointing      off" in out and "does NOT fit" in out
  assert main(["plan", "--model", "llama-65b", "--memory-per-device", "48GiB", "--lora-r", "64",
               "--checkpointing"]) == 0


def test_plan_prints_its_assumptions_first(run_yaml, capsys):
  assert main(["plan", "--config", str(run_yaml), "--batch", "4"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == (f"assumptions (from {run_yaml}, then command-line flags; the rest as "
                      "jqlora train's defaults):")
  labels = [line.split("  ")[1] for line in lines[1:8]]
  assert labels == ["model", "devices, mesh", "batch x seq", "LoRA", "checkpointing", "dtype",
                    "optimizer offload"]
  assert "4 devices: data=2 x fsdp=2 x tensor=1" in lines[2] and "4 x 64" in lines[3]
  assert "r=4 on q_proj,v_proj" in lines[4] and lines[5].endswith("on: each layer recomputed in "
                                                                  "the backward pass")
  assert lines[9].startswith("NF4 weights (codes)")


def test_every_plan_flag_says_its_default():
  for action in _plan_parser()._actions:
    if action.dest != "help":
      assert "default" in (action.help or ""), action.option_strings


@pytest.mark.parametrize("content, flags, expected", [
    (None, [], "config file {path} does not exist"),
    ("lora_rr: 3\n", [], "{path}: unknown config key 'lora_rr'; did you mean 'lora_r'?"),
    ("lora_r: three\n", [], "{path}: lora_r must be int, got 'three'"),
    ("base_model: no/such/model\n", [], "{path}: base_model no/such/model not found"),
    ("lora_target_modules: [lm_head]\n", [], "target_modules ['lm_head'] are not decoder linears"),
    ("mesh: {data: 2, fsdp: 2}\n", ["--devices", "4", "--tensor", "2"],
     "mesh data * fsdp * tensor = 2 * 2 * 2 must equal devices = 4"),
], ids=["missing", "unknown-key", "bad-type", "no-model", "bad-target", "bad-mesh"])
def test_plan_config_errors_are_one_line_exit_2(tmp_path, capsys, content, flags, expected):
  path = tmp_path / "train.yaml"
  if content is not None:
    path.write_text(f"base_model: llama-7b\n{content}")  # no dataset key: plan needs none
  with pytest.raises(SystemExit) as e:
    main(["plan", "--config", str(path), *flags])
  err = capsys.readouterr().err
  last = err.splitlines()[-1]  # after argparse's usage lines
  assert e.value.code == 2 and "Traceback" not in err
  assert last.startswith("jqlora plan: error: ") and expected.format(path=path) in last, err


def test_plan_needs_a_model_or_a_config(capsys):
  with pytest.raises(SystemExit) as e:
    main(["plan", "--devices", "2"])
  assert e.value.code == 2
  assert "required: --model (or --config TRAIN.yaml)" in capsys.readouterr().err.splitlines()[-1]


def test_plan_config_needs_no_dataset_and_keeps_training_defaults(tmp_path, capsys):
  path = tmp_path / "train.yaml"
  path.write_text("base_model: llama-7b\nlora_r: 64\n")
  rc, p = _plan_json(capsys, "--config", str(path))
  assert rc == 0 and p["lora_r"] == 64 and p["model"].startswith("llama-7b")
  assert (p["batch"], p["seq"], p["checkpointing"], p["dtype"]) == (1, 512, False, "bfloat16")
  assert p["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}

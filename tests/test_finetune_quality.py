"""``benchmarks/finetune_quality.py --quick`` on the tiny Llama: every method trains, finite numbers."""

import importlib.util
import json
import math
import pathlib
import sys

import pytest
from training.toy import tiny_model_dir

ROOT = pathlib.Path(__file__).resolve().parents[1]
METHODS = ["full", "lora", "qlora_nf4_dq", "qlora_fp4"]


def _benchmark():
  path = ROOT / "benchmarks" / "finetune_quality.py"
  spec = importlib.util.spec_from_file_location("finetune_quality", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # its dataclass looks its module up there
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow  # ~60 s: compiles a step and a decode for each of the four methods
def test_quick_run_writes_every_method_with_finite_numbers(data_dir, tmp_path):
  out = tmp_path / "fq.json"
  returned = _benchmark().main(["--quick", "--base", str(tiny_model_dir(data_dir, tmp_path)),
                                "--out", str(out)])
  result = json.loads(out.read_text())
  assert result == json.loads(json.dumps(returned))
  assert result["quick"] and result["complete"] and result["seeds"] == 1
  assert (tmp_path / "fq.png").stat().st_size > 0
  assert result["settings"]["max_steps"] == 3
  assert result["tasks"]["arithmetic"]["test_examples"] == 8
  assert [(r["task"], r["method"], r["seed"]) for r in result["runs"]] == [
      ("arithmetic", m, 0) for m in METHODS]
  for run in result["runs"]:
    assert 0.0 <= run["exact_match"] <= 1.0
    assert all(math.isfinite(run[k]) and run[k] > 0 for k in ("eval_loss", "first_loss", "last_loss",
                                                               "seconds", "cpu_seconds"))
    assert len(run["load_average_1min"]) == 2
  summary = result["summary"]["arithmetic"]
  assert list(summary) == METHODS
  for method, cell in summary.items():
    run = next(r for r in result["runs"] if r["method"] == method)
    assert cell["exact_match"] == {"mean": run["exact_match"], "std": 0.0, "values": [run["exact_match"]]}
    assert cell["eval_loss"]["values"] == [run["eval_loss"]]
  # four different models were trained: the float, NF4 and FP4 bases and full vs LoRA differ
  losses = [summary[m]["eval_loss"]["mean"] for m in METHODS]
  assert len(set(losses)) == 4, losses
  machine = result["machine"]
  assert machine["cpu"] and machine["cpus"] >= 1 and "jax" in machine["versions"]

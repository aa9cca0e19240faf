"""Smoke test of benchmarks/compare_torch.py: the four stacks run and train the same maths.

Runs the script's ``--quick`` setting (SmolLM2-135M, batch 2 x 64, 6 steps) in a
subprocess, offline, into a temporary folder, as CI's end-to-end check of the
benchmark. No timing is asserted.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # runs the benchmark's stacks in subprocesses

SCRIPT = pathlib.Path(__file__).parents[1] / "benchmarks" / "compare_torch.py"
STACKS = ("jqlora-qlora", "jqlora-lora", "peft-bnb", "peft-lora")


def test_quick_run_agrees_with_peft(tmp_path):
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
  proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out-dir", str(tmp_path)],
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]

  stem = "compare_torch_quick" + ("_gpu" if "_gpu" in proc.stdout else "")
  for ext in ("json", "md", "png"):
    assert (tmp_path / f"{stem}.{ext}").stat().st_size > 0
  report = json.loads((tmp_path / f"{stem}.json").read_text())
  (run,) = report["runs"]
  assert tuple(run["stacks"]) == STACKS
  for name, stack in run["stacks"].items():
    assert len(stack["losses"]) >= 5, name
    assert all(math.isfinite(x) for x in stack["losses"]), name
    assert stack["tokens_per_s"] > 0 and stack["peak_rss_bytes"] > 0, name
    assert stack["trainable_params"] == run["stacks"]["peft-lora"]["trainable_params"], name
  # acceptance: the same adapter, batch and optimizer give the same losses over 5 steps
  agreement = run["loss_agreement"]
  assert agreement["jqlora-qlora vs peft-bnb"]["steps"] == 5
  assert agreement["jqlora-qlora vs peft-bnb"]["max_abs_diff"] < 1e-3
  assert agreement["jqlora-lora vs peft-lora"]["max_abs_diff"] < 1e-3
  # the adapter really trains, and the float and NF4 bases really differ
  losses = run["stacks"]["jqlora-qlora"]["losses"]
  assert losses[-1] < losses[0] - 0.1
  assert abs(losses[0] - run["stacks"]["jqlora-lora"]["losses"][0]) > 1e-3
  # both libraries' NF4 (block 64, double quant) have the same error on the same weights
  q, b = run["stacks"]["jqlora-qlora"]["nf4_mae"], run["stacks"]["peft-bnb"]["nf4_mae"]
  assert 0 < q < 0.05 and math.isclose(q, b, rel_tol=1e-3)
  assert set(run["ratios"]) == {"tokens_per_s_vs_peft_bnb", "peak_memory_vs_peft_bnb",
                                "step_time_vs_jqlora_lora"}
  assert "SmolLM2-135M" in (tmp_path / f"{stem}.md").read_text()

"""``benchmarks/gpu_check.sh --dry-run``: the GPU check's code, on the CPU with tiny shapes."""

import json
import os
import pathlib
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

ROOT = pathlib.Path(__file__).parent.parent
RESULTS = ROOT / "benchmarks" / "results"


@pytest.mark.slow
def _ours() -> dict:
  """The committed results the check's scripts write by default (others may change the rest)."""
  return {p: p.read_bytes() for p in [*RESULTS.glob("bench_kernels_*.json"), *RESULTS.glob("gpu/*")]}


def test_dry_run_runs_every_stage_and_leaves_committed_results_alone(tmp_path):
  committed = _ours()
  env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
  proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  for stage in ("tests/gpu", "bench_kernels", "train_step"):
    assert f"gpu_check: {stage} passed" in proc.stdout

  suite = ET.parse(tmp_path / "tests_gpu.xml").getroot().find("testsuite")
  assert int(suite.get("tests")) > 40 and suite.get("skipped") == suite.get("tests")  # no GPU here

  bench = json.loads((tmp_path / "bench_kernels.json").read_text())
  assert bench["backend"] == "interpret" and bench["quick"]
  assert {r["op"] for r in bench["rows"]} == {"dequantize", "nf4_matmul"}
  assert all(r["matches_xla"] and r["seconds"] > 0 for r in bench["rows"])

  train = json.loads((tmp_path / "train_step.json").read_text())
  assert train["model"] == "tiny" and train["checkpointing"] and train["lora"]["r"] == 16
  assert [r["batch"] for r in train["rows"]] == [[1, 64], [4, 16]]
  assert all(r["finite"] and r["tokens_per_s"] > 0 for r in train["rows"])
  assert "tokens/s" in proc.stdout and "peak device memory" in proc.stdout

  assert _ours() == committed

"""Runs the DPO demo (configs/smollm2-135m-dpo.yaml) and records what it measured, as JSON.

`jqlora train` on the bundled preference set (scripts/make_dpo_data.py), in a fresh
output folder; records the held-out preference accuracy before and after (the
model's own: log p(chosen) > log p(rejected), and TRL's reward accuracy), the DPO
losses of every step, the wall time, and the machine: CPU model and ISA flags
(from /proc/cpuinfo), core count and the load average at the start and the end
(the CPU may be shared; ``cpu_seconds``, the run's user + system CPU time, does not
depend on what else the machine runs).

  python benchmarks/bench_dpo.py [--out benchmarks/results/bench_dpo.json] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

from machine import machine_info  # the benchmarks' shared machine description

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smollm2-135m-dpo.yaml"
HELD_OUT = ("eval_logps/accuracies", "eval_rewards/accuracies", "eval_rewards/margins", "eval_loss")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=str(ROOT / "benchmarks/results/bench_dpo.json"))
  parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
  args = parser.parse_args()

  machine = machine_info(("jax", "jaxlib", "flax", "optax", "transformers"))
  with tempfile.TemporaryDirectory(prefix="jqlora-dpo-") as tmp:
    cmd = [sys.executable, "-m", "jqlora.cli", "train", "--config", str(CONFIG), f"output_dir={tmp}",
           *args.overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    sys.stdout.write(proc.stdout[-3000:])
    if proc.returncode:
      raise SystemExit(f"jqlora train failed with exit code {proc.returncode}")
    rows = [json.loads(line) for line in (pathlib.Path(tmp) / "metrics.jsonl").read_text().splitlines()]
  before = next(r for r in rows if r["step"] == 0 and HELD_OUT[0] in r)
  after = rows[-1]
  steps = [r for r in rows if "loss" in r]
  n_pairs = sum(1 for line in (ROOT / "data/dpo/test.jsonl").read_text().splitlines() if line.strip())
  result = {
      "command": "jqlora train --config configs/smollm2-135m-dpo.yaml " + " ".join(args.overrides),
      "wall_seconds": round(seconds, 1),
      "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
      "steps": len(steps),
      "held_out_pairs": n_pairs,
      "before": {k.removeprefix("eval_"): before[k] for k in HELD_OUT},
      "after": {k.removeprefix("eval_"): after[k] for k in HELD_OUT},
      "train_loss": [round(r["loss"], 5) for r in steps],
      "train_rewards_accuracies": [round(r["rewards/accuracies"], 4) for r in steps],
      "machine": {**machine, "load_average_end": [round(x, 2) for x in os.getloadavg()]},
  }
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  b, a = result["before"], result["after"]
  print(f"\nDPO demo: {seconds / 60:.1f} min on {os.cpu_count()} CPUs ({machine['cpu']}); "
        f"held-out preference accuracy {b['logps/accuracies']:.1%} -> {a['logps/accuracies']:.1%}, "
        f"reward accuracy {b['rewards/accuracies']:.1%} -> {a['rewards/accuracies']:.1%}; wrote {out}")


if __name__ == "__main__":
  main()

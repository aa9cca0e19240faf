"""Times the README's main command, `make demo`, from a fresh clone (install included).

Clones this repository into a temporary folder, runs `make demo` there (which builds
its own `.venv`, installs jqlora and the embedded model, and runs the QLoRA fine-tune
of SmolLM2-135M-Instruct), and records the wall time, the held-out exact-match accuracy
before and after training, and the machine, as JSON.

  python benchmarks/bench_demo.py [--out benchmarks/results/demo.json] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
ACCURACY = re.compile(r"held-out exact match (before|after) training: ([\d.]+)% \((\d+)/(\d+)")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=str(ROOT / "benchmarks/results/demo.json"))
  parser.add_argument("--keep", action="store_true", help="keep the temporary clone")
  args = parser.parse_args()

  work = pathlib.Path(tempfile.mkdtemp(prefix="jqlora-demo-"))
  clone = work / "jqlora"
  subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
  env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
  start = time.perf_counter()
  proc = subprocess.run(["make", "demo"], cwd=clone, env=env, text=True,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  seconds = time.perf_counter() - start
  log = proc.stdout
  (work / "demo.log").write_text(log)
  sys.stdout.write(log[-4000:])
  if proc.returncode:
    raise SystemExit(f"make demo failed with exit code {proc.returncode}; log: {work / 'demo.log'}")

  accuracy = {m[0]: {"percent": float(m[1]), "correct": int(m[2]), "total": int(m[3])}
              for m in ACCURACY.findall(log)}
  result = {
      "command": "make demo (fresh clone, fresh .venv: install included)",
      "wall_seconds": round(seconds, 1),
      "accuracy": accuracy,
      "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                  "processor": platform.processor() or platform.machine()},
  }
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2))
  print(f"\nmake demo: {seconds / 60:.1f} min on {os.cpu_count()} CPUs; "
        f"exact match {accuracy.get('before', {}).get('percent')}% -> "
        f"{accuracy.get('after', {}).get('percent')}%; wrote {out}")
  if not args.keep:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()

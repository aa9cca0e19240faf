"""The demo config as it is, on a data=2 x fsdp=2 x tensor=2 mesh of 8 CPU devices.

SmolLM2-135M has 576 inputs per q/k/v/gate/up row, 9 blocks of 64 that ``fsdp=2`` cannot
halve, and ``eval_batch_size: 50`` is not a multiple of the 4 batch shards: those
tensors stay unsplit (one warning line) and the held-out batches are padded, and the run
gives the losses of one device.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # the 135M default model, twice, on 8 devices in a subprocess

ROOT = pathlib.Path(__file__).parents[2]
WORKER = textwrap.dedent("""
    import json, pathlib, sys
    import jax
    from jqlora.cli import main
    assert len(jax.devices()) == 8
    config, out = sys.argv[1], pathlib.Path(sys.argv[2])
    common = ["max_steps=3", "eval_exact_match=false", "save_steps=100"]
    codes = [main(["train", "--config", config, f"output_dir={out / 'single'}", *common]),
             main(["train", "--config", config, f"output_dir={out / 'mesh'}", "mesh.data=2",
                   "mesh.fsdp=2", "mesh.tensor=2", *common])]
    print(json.dumps(codes))
""")


def test_demo_config_trains_on_a_2x2x2_mesh_like_one_device(tmp_path):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
  proc = subprocess.run([sys.executable, "-c", WORKER, str(ROOT / "configs" / "smollm2-135m-demo.yaml"),
                         str(tmp_path)], env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == [0, 0]
  warnings = [line for line in proc.stderr.splitlines() if "left unsplit" in line]
  assert len(warnings) == 1 and "(in = 576, block_size = 64) = 9 on 'fsdp' of size 2" in warnings[0]
  rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text()
                 .splitlines()] for name in ("single", "mesh")}
  losses = {name: [r["loss"] for r in rs if "loss" in r] for name, rs in rows.items()}
  held_out = {name: [r["eval_loss"] for r in rs if "eval_loss" in r] for name, rs in rows.items()}
  assert len(losses["mesh"]) == 3
  np.testing.assert_allclose(losses["mesh"], losses["single"], rtol=0, atol=1e-4)
  assert held_out["mesh"] and len(held_out["mesh"]) == len(held_out["single"])
  np.testing.assert_allclose(held_out["mesh"], held_out["single"], rtol=0, atol=1e-4)

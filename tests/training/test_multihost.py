"""Multi-process training: settings from config or environment, and two processes on localhost.

The two-process test starts both ``jqlora train`` processes itself (4 CPU
devices each, a ``fsdp=2 x tensor=4`` mesh across them, gloo collectives),
stops them at a timeout and compares losses, adapters and held-out exact match
(generation on the mesh) with a single-process run. The model loads straight
into its shards: each process reads only its half of the checkpoint (counted by
``jqlora.io.reads.READS``).
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import yaml

from jqlora.cli import main
from jqlora.parallel.distributed import distributed_args, initialize
from jqlora.training.config import ConfigError, DistributedConfig

pytestmark = pytest.mark.slow  # two processes over gloo

TESTS = pathlib.Path(__file__).parents[1]


def test_settings_come_from_config_then_jqlora_variables():
  env = {"JQLORA_COORDINATOR": "10.0.0.1:1234", "JQLORA_NUM_PROCESSES": "4",
         "JQLORA_PROCESS_ID": "3"}
  assert distributed_args(DistributedConfig(), env) == {
      "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
  config = DistributedConfig(coordinator_address="h:1", num_processes=2, process_id=0)
  assert distributed_args(config, env) == {"coordinator_address": "h:1", "num_processes": 2,
                                           "process_id": 0}
  with pytest.raises(ConfigError, match="JQLORA_PROCESS_ID must be an integer, got 'first'"):
    distributed_args(DistributedConfig(), {**env, "JQLORA_PROCESS_ID": "first"})


def test_launchers_go_to_jax_auto_detection_and_one_process_stays_local():
  assert distributed_args(DistributedConfig(), {}) is None
  assert distributed_args(DistributedConfig(), {"SLURM_NTASKS": "1"}) is None
  assert distributed_args(DistributedConfig(num_processes=1), {"SLURM_NTASKS": "8"}) is None
  for env in ({"SLURM_NTASKS": "8"}, {"OMPI_COMM_WORLD_SIZE": "2"},
              {"JAX_COORDINATOR_ADDRESS": "h:1"}, {"TPU_WORKER_HOSTNAMES": "a,b"}):
    assert distributed_args(DistributedConfig(), env) == {}, env
  assert initialize(DistributedConfig(), {}) is False  # nothing asked: single process


def test_distributed_errors_are_one_line_from_the_cli(tmp_path, capsys):
  (tmp_path / "t.jsonl").write_text('{"text": "a"}\n')
  (tmp_path / "run.yaml").write_text("dataset: t.jsonl\n")
  args = ["train", "--config", str(tmp_path / "run.yaml")]
  assert main([*args, "distributed.process_id=2", "distributed.num_processes=2"]) == 2
  assert capsys.readouterr().err == (
      "jqlora train: error: command line: override distributed.process_id=2: "
      "distributed.process_id must be in [0, num_processes), got 2 of 2\n")
  # JAX already started in this process (as in a notebook): JAX's reason, in one line
  import jax

  jax.devices()
  assert main([*args, "distributed.num_processes=2"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("jqlora train: error: distributed: jax.distributed.initialize() must be "
                        "called before any JAX calls") and err.count("\n") == 1, err
  assert "distributed.coordinator_address (or JQLORA_COORDINATOR)" in err


WORKER = textwrap.dedent("""
    import sys
    from jqlora.cli import main
    from jqlora.io.reads import READS
    args = sys.argv[1:]
    # 2 steps, then a second run that resumes from the step-2 checkpoint to step 4
    code = main(args + ["max_steps=2"]) or main(args + ["max_steps=4",
                                                        "resume_changed_settings=true"])
    print(f"checkpoint bytes read: {READS.bytes}", flush=True)
    sys.exit(code)
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _rows(out_dir: pathlib.Path) -> list[dict]:
  return [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(out_dir: pathlib.Path) -> list[float]:
  return [r["loss"] for r in _rows(out_dir) if "loss" in r]


def _exact_match(out_dir: pathlib.Path) -> dict[int, float]:
  """Held-out exact match by step (0: before training)."""
  return {r["step"]: r["exact_match"] for r in _rows(out_dir) if "exact_match" in r}


def _generated(out: str) -> list[str]:
  """The sample answers a run prints after its exact-match lines."""
  return [l.split("generated:", 1)[1].strip() for l in out.splitlines() if "generated:" in l]


def _adapter(out_dir: pathlib.Path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file

  return load_file(out_dir / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  """(tmp, [(returncode, output) per process]) of a 2-process run."""
  from .meshable import write_meshable_model
  from .toy import write_reverse_task

  tmp = tmp_path_factory.mktemp("multihost")
  write_meshable_model(tmp / "model")
  write_reverse_task(tmp / "train.jsonl", 40)
  (tmp / "run.yaml").write_text(yaml.safe_dump({
      "base_model": str(tmp / "model"), "dataset": "train.jsonl", "dtype": "float32",
      "lora_r": 4, "lora_target_modules": ["q_proj", "v_proj", "down_proj"],
      "sequence_len": 32, "sample_packing": True, "micro_batch_size": 4,
      "learning_rate": 1e-2, "lr_scheduler": "constant", "save_steps": 1,
      # held-out generation on the mesh: 6 prompts in batches of 4 (the last one padded)
      "val_set_size": 6, "eval_batch_size": 4, "eval_exact_match": True,
      "eval_max_new_tokens": 4, "eval_print_samples": 6}))
  port = _free_port()
  common = ["--config", str(tmp / "run.yaml"), f"output_dir={tmp / 'multi'}",
            "mesh.fsdp=2", "mesh.tensor=4"]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
  for var in ("JQLORA_COORDINATOR", "JQLORA_NUM_PROCESSES", "JQLORA_PROCESS_ID"):
    env.pop(var, None)
  launches = [  # process 0 configured by keys, process 1 by environment variables
      ([*common, f"distributed.coordinator_address=127.0.0.1:{port}",
        "distributed.num_processes=2", "distributed.process_id=0"], env),
      (common, {**env, "JQLORA_COORDINATOR": f"127.0.0.1:{port}", "JQLORA_NUM_PROCESSES": "2",
                "JQLORA_PROCESS_ID": "1"}),
  ]
  procs = [subprocess.Popen([sys.executable, "-c", WORKER, "train", *args], env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for args, e in launches]
  results = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=1000)  # a busy 2-core machine: 8 devices compile slowly
      results.append((p.returncode, out))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return tmp, results


def test_two_processes_train_together_like_one(two_processes, capsys):
  tmp, results = two_processes
  for rc, out in results:
    assert rc == 0, out[-4000:]
  (out0, out1) = (out for _, out in results)
  assert "mesh: data=1 x fsdp=2 x tensor=4 over 8 devices of 2 process(es)" in out0
  assert "resumed from" in out0 and "trainable parameters" not in out1  # only process 0 prints
  assert "held-out exact match" not in out1
  assert main(["train", "--config", str(tmp / "run.yaml"), f"output_dir={tmp / 'single'}",
               "max_steps=4"]) == 0
  # held-out exact match before and after (the resumed run's step 4) as in one process
  single_out = capsys.readouterr().out
  multi_acc = _exact_match(tmp / "multi")
  assert sorted(multi_acc) == [0, 2, 4]  # the first run ends at step 2, the resumed one at 4
  assert _exact_match(tmp / "single") == {0: multi_acc[0], 4: multi_acc[4]}
  # the same greedy answers: 6 before and 6 after in one process; 6 more at step 2 in two
  answers = _generated(single_out)
  assert len(answers) == 12 and any(answers), single_out[-2000:]
  multi_answers = _generated(out0)
  assert len(multi_answers) == 18
  assert multi_answers[:6] == answers[:6] and multi_answers[12:] == answers[6:]
  single, multi = _losses(tmp / "single"), _losses(tmp / "multi")
  assert len(multi) == 4 and len(set(multi)) == 4
  np.testing.assert_allclose(multi, single, rtol=0, atol=1e-5)
  # the adapter written after the resumed run (orbax save and restore across the 2 processes)
  expected = _adapter(tmp / "single")
  got = _adapter(tmp / "multi")
  assert sorted(got) == sorted(expected)
  # 4 Adam steps at lr 1e-2 move each entry by ~1e-2; the mesh sums row-parallel partial
  # products in another order (jqlora/ops/per_shard.py), measured to differ by up to 1.03e-5
  for key in expected:
    np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=3e-5)
  assert sorted(int(p.name) for p in (tmp / "multi" / "checkpoints").iterdir()) == [3, 4]


def _bytes_read(out: str) -> int:
  return int(next(l for l in out.splitlines() if l.startswith("checkpoint bytes read:"))
             .rsplit(":", 1)[1])


def test_each_process_reads_only_its_shards(two_processes):
  """Process p's devices hold fsdp block p of every split tensor (and all of its tensor
  blocks): it reads that half of the checkpoint and the few replicated norms, twice (the
  run and the resumed run each load the model)."""
  from safetensors import safe_open

  tmp, results = two_processes
  with safe_open(tmp / "model" / "model.safetensors", "np") as f:
    sizes = {name: f.get_tensor(name).nbytes for name in f.keys()}
  norms = sum(n for name, n in sizes.items() if "norm" in name)
  half = (sum(sizes.values()) - norms) // 2 + norms
  for rc, out in results:
    assert rc == 0, out[-4000:]
    assert _bytes_read(out) == 2 * half, (_bytes_read(out), half)

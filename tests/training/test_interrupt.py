"""SIGINT / SIGTERM during ``jqlora train``: a checkpoint at the step, exit 130 / 143, exact resume."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import yaml

from jqlora.training.checkpoint import Checkpointer
from jqlora.training.config import load_config
from jqlora.training.interrupt import Signalled, StopSignals
from jqlora.training.loop import train

from .toy import tiny_model_dir, write_reverse_task

# ``jqlora train`` with steps slowed to JQLORA_TEST_STEP_S seconds (a tiny model's steps take
# milliseconds, too fast to interrupt on purpose) and the save after a signal slowed to
# JQLORA_TEST_SAVE_S (after the first signal, the handlers are back to SIG_DFL).
DRIVER = """
import os, signal, sys, time
import jqlora.training.loop as loop
from jqlora.training.checkpoint import Checkpointer
real_step, real_save = loop.train_step, Checkpointer.save
step_s = float(os.environ.get("JQLORA_TEST_STEP_S", "0"))
save_s = float(os.environ.get("JQLORA_TEST_SAVE_S", "0"))
def slow_step(*args):
  out = real_step(*args)
  time.sleep(step_s)
  return out
def slow_save(self, *args):
  if signal.getsignal(signal.SIGINT) == signal.SIG_DFL:
    time.sleep(save_s)
  return real_save(self, *args)
loop.train_step, Checkpointer.save = slow_step, slow_save
from jqlora.cli import main
sys.exit(main(sys.argv[1:]))
"""

STEPS = 8


@pytest.fixture(scope="module")
def setup(data_dir, tmp_path_factory):
  """(tmp, config file, the uninterrupted run's output folder)."""
  tmp = tmp_path_factory.mktemp("interrupt")
  model = tiny_model_dir(data_dir, tmp)
  write_reverse_task(tmp / "train.jsonl", 40)
  cfg = tmp / "run.yaml"
  cfg.write_text(yaml.safe_dump({
      "base_model": str(model), "dataset": "train.jsonl", "dtype": "float32", "lora_r": 4,
      "lora_dropout": 0.1, "sequence_len": 48, "sample_packing": True, "micro_batch_size": 2,
      "max_steps": STEPS, "learning_rate": 1e-2, "lr_scheduler": "cosine", "warmup_steps": 2,
      "save_steps": None, "logging_steps": 1, "seed": 1}))
  train(load_config(cfg, {"output_dir": str(tmp / "full")}))
  return tmp, cfg, tmp / "full"


def _start(tmp, cfg, out_dir, *overrides, step_s=0.5, save_s=0.0):
  env = {**os.environ, "JQLORA_TEST_STEP_S": str(step_s), "JQLORA_TEST_SAVE_S": str(save_s),
         "PYTHONUNBUFFERED": "1"}
  with open(out_dir.with_suffix(".out"), "w") as stdout, \
       open(out_dir.with_suffix(".err"), "w") as stderr:
    return subprocess.Popen([sys.executable, "-c", DRIVER, "train", "--config", str(cfg),
                             f"output_dir={out_dir.name}", *overrides], cwd=tmp, env=env,
                            stdout=stdout, stderr=stderr)


def _wait_for(predicate, proc, what, timeout=180):
  deadline = time.monotonic() + timeout
  while not predicate():
    assert proc.poll() is None, f"the run ended ({proc.returncode}) before {what}"
    assert time.monotonic() < deadline, f"timed out waiting for {what}"
    time.sleep(0.02)


def _rows(out_dir):
  path = out_dir / "metrics.jsonl"
  return [json.loads(l) for l in path.read_text().splitlines()] if path.is_file() else []


def _losses(out_dir):
  return [r["loss"] for r in _rows(out_dir) if "loss" in r]


def _adapter(out_dir):
  from safetensors.numpy import load_file

  return load_file(out_dir / "adapter" / "adapter_model.safetensors")


def _resume_and_compare(tmp, cfg, out_dir, full, *overrides):
  """The same command again: it resumes, finishes, and equals the uninterrupted run."""
  proc = _start(tmp, cfg, out_dir, *overrides, step_s=0)
  assert proc.wait(timeout=300) == 0, out_dir.with_suffix(".err").read_text()[-3000:]
  assert "resumed from" in out_dir.with_suffix(".out").read_text()
  assert [r["step"] for r in _rows(out_dir) if "loss" in r] == list(range(1, STEPS + 1))
  np.testing.assert_allclose(_losses(out_dir), _losses(full), rtol=0, atol=1e-6)
  expected, got = _adapter(full), _adapter(out_dir)
  assert sorted(got) == sorted(expected)
  for key in expected:
    np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_the_step_exits_128_plus_signum_and_the_same_command_resumes(
    setup, sig, code):
  tmp, cfg, full = setup
  out_dir = tmp / f"run-{sig.name}"
  proc = _start(tmp, cfg, out_dir)
  _wait_for(lambda: any(r.get("step") == 1 for r in _rows(out_dir)), proc, "step 1")
  proc.send_signal(sig)
  assert proc.wait(timeout=120) == code
  err = out_dir.with_suffix(".err").read_text()
  assert "Traceback" not in err, err[-3000:]
  last = err.rstrip("\n").splitlines()[-1]
  prefix = "jqlora train: stopped at step "
  assert last.startswith(prefix), err[-3000:]
  step = int(last[len(prefix):].split()[0])
  assert last == (f"{prefix}{step} of {STEPS}; checkpoint saved; run the same command to resume")
  assert 1 <= step < STEPS
  assert f"{sig.name} received: saving a checkpoint at step {step}" in \
      out_dir.with_suffix(".out").read_text()
  assert Checkpointer(out_dir / "checkpoints").latest_step() == step  # save_steps is null
  assert [r["step"] for r in _rows(out_dir)] == list(range(1, step + 1))
  _resume_and_compare(tmp, cfg, out_dir, full)


@pytest.mark.slow
def test_a_second_signal_ends_the_process_at_once_and_the_last_checkpoint_resumes(setup):
  tmp, cfg, full = setup
  out_dir = tmp / "twice"
  proc = _start(tmp, cfg, out_dir, "save_steps=1", save_s=60)  # the save after a signal: 60 s
  _wait_for(lambda: any(r.get("step") == 2 for r in _rows(out_dir)), proc, "step 2")
  proc.send_signal(signal.SIGINT)
  stdout = out_dir.with_suffix(".out")
  _wait_for(lambda: "SIGINT received: saving a checkpoint" in stdout.read_text(), proc,
            "the save after the signal")
  t = time.monotonic()
  proc.send_signal(signal.SIGINT)
  assert proc.wait(timeout=30) == -signal.SIGINT  # the default action: no waiting for the save
  assert time.monotonic() - t < 30
  stopped_at = int(stdout.read_text().split("saving a checkpoint at step ")[1].split()[0])
  assert Checkpointer(out_dir / "checkpoints").latest_step() == stopped_at - 1
  _resume_and_compare(tmp, cfg, out_dir, full, "save_steps=1")


def test_handlers_are_installed_for_the_block_only_and_the_first_signal_stops_at_once():
  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  with pytest.raises(Signalled) as e:
    with StopSignals() as signals:
      assert signal.getsignal(signal.SIGINT) not in before
      signal.raise_signal(signal.SIGTERM)  # outside the steps: stops at once
  assert e.value.signum == signal.SIGTERM and signals.signum == signal.SIGTERM
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_during_the_steps_the_first_signal_only_asks_and_a_second_gets_the_default():
  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  with StopSignals() as signals:
    signals.deferring = True
    assert signals.requested() is None
    signal.raise_signal(signal.SIGINT)
    assert signals.requested() == signal.SIGINT
    # a second SIGINT or SIGTERM would now end the process (not sent here: it would end pytest)
    assert signal.getsignal(signal.SIGINT) == signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_no_handlers_outside_the_main_thread():
  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  seen = []

  def worker():
    with StopSignals():
      seen.append((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))

  thread = threading.Thread(target=worker)
  thread.start()
  thread.join()
  assert seen == [before]

"""A checkpoint too large for the devices: one line with the numbers, exit 2, before any loading."""

import os

import pytest
import yaml

import jqlora.training.loop as loop
from jqlora.cli import main
from jqlora.plan import plan
from jqlora.plan.fit import ENV_MEMORY, CheckpointTooLarge, checkpoint_bytes, device_memory, too_large
from jqlora.training.config import ConfigError

GiB = 2**30


def test_device_memory_comes_from_the_environment_then_the_devices(monkeypatch):
  assert device_memory({ENV_MEMORY: "24GiB"}) == (24 * GiB, ENV_MEMORY)
  with pytest.raises(ConfigError, match=f"{ENV_MEMORY}: memory size 'lots'"):
    device_memory({ENV_MEMORY: "lots"})
  memory, source = device_memory({})  # the CPU: host memory shared by the local devices
  host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  assert memory == host // 1 and source.startswith("host memory / 1 cpu device")


def test_too_large_names_needed_and_available_per_device():
  p = plan("llama-65b", lora_r=64)
  assert too_large(p, 48 * GiB, "test") is None  # 65B in NF4 fits one 48 GiB GPU
  line = too_large(p, 24 * GiB, "test")
  assert line.startswith("llama-65b (llama L=80") and "\n" not in line
  assert f"needs {p.weights / GiB:.2f} GiB per device over the mesh data=1 x fsdp=1 x tensor=1" in line
  assert 32 * GiB < p.weights < 34 * GiB  # 4.127 bits per linear weight + 16-bit embeddings
  assert "each device has 24.00 GiB (test)" in line
  eight = plan("llama-65b", devices=8, lora_r=64)
  assert too_large(eight, 24 * GiB, "test") is None and eight.weights < p.weights / 7
  # a full-precision base (load_in_4bit: false) is counted in its dtype
  linears = 80 * (4 * 8192**2 + 3 * 8192 * 22016)
  assert checkpoint_bytes(p, quantized=False) == 2 * linears + p.frozen_weights
  assert "bfloat16 (load_in_4bit: false) base needs" in too_large(p, 48 * GiB, "t", False)


def test_plan_reports_a_checkpoint_too_large_as_one_line_exit_2(capsys, monkeypatch):
  assert main(["plan", "--model", "llama-65b", "--memory-per-device", "24GiB"]) == 2
  captured = capsys.readouterr()
  assert "NF4 weights (codes)" in captured.out  # the table, then the verdict
  assert captured.err.count("\n") == 1 and captured.err.startswith("jqlora plan: error: llama-65b")
  assert "the checkpoint is too large for the devices" in captured.err
  monkeypatch.setenv(ENV_MEMORY, "48GiB")  # --memory-per-device auto: this machine's figure
  assert main(["plan", "--model", "llama-65b", "--memory-per-device", "auto", "--lora-r", "64",
               "--checkpointing", "--optimizer-offload"]) == 0


def test_train_stops_before_loading_when_the_checkpoint_is_too_large(data_dir, tmp_path, capsys,
                                                                     monkeypatch):
  (tmp_path / "train.jsonl").write_text('{"text": "hello"}\n')
  cfg = tmp_path / "run.yaml"
  cfg.write_text(yaml.safe_dump({"base_model": str(data_dir / "hf" / "tiny-llama" / "base"),
                                 "dataset": "train.jsonl", "output_dir": "out"}))

  def no_loading(*args, **kwargs):
    raise AssertionError("loaded before the check")

  monkeypatch.setattr(loop, "load_model", no_loading)
  monkeypatch.setattr(loop, "load_tokenizer", no_loading)
  monkeypatch.setenv(ENV_MEMORY, "64KiB")
  assert main(["train", "--config", str(cfg)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("jqlora train: error: ")
  assert "the checkpoint is too large for the devices" in err and "(JQLORA_DEVICE_MEMORY)" in err
  assert "each device has 64.00 KiB" in err
  assert not (tmp_path / "out").exists()
  assert issubclass(CheckpointTooLarge, ConfigError)

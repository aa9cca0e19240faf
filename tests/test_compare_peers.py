"""benchmarks/compare_peers.py: the five stacks run and train the same maths; its parts are right.

The end-to-end test runs the script's ``--quick`` setting (SmolLM2-135M, batch
2 x 64, 6 steps, all five stacks) in a subprocess, offline, into a temporary
folder, as CI's check of the benchmark. No timing is asserted.
"""

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

BENCHMARKS = pathlib.Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import compare_peers  # noqa: E402

STACKS = ("jqlora-qlora", "jqlora-lora", "peft-bnb", "peft-lora", "qwix-qlora")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.mark.slow  # all five stacks, each in its own subprocess
def test_quick_run_agrees_with_peft(tmp_path):
  proc = subprocess.run([sys.executable, str(BENCHMARKS / "compare_peers.py"), "--quick",
                         "--out-dir", str(tmp_path)], env=ENV, capture_output=True, text=True,
                        timeout=1500)
  assert proc.returncode == 0, proc.stderr[-4000:]

  stem = "compare_peers_quick" + ("_gpu" if "_gpu" in proc.stdout else "")
  for ext in ("json", "md", "png"):
    assert (tmp_path / f"{stem}.{ext}").stat().st_size > 0
  report = json.loads((tmp_path / f"{stem}.json").read_text())
  assert report["machine"]["versions"]["qwix"] == "0.1.8"
  assert isinstance(report["machine"]["isa_flags"], list)
  (run,) = report["runs"]
  assert set(run["stacks"]) == set(STACKS)
  assert run["calibration"]["flop_per_s"] > 1e8
  for name, stack in run["stacks"].items():
    assert len(stack["losses"]) >= 5, name
    assert all(math.isfinite(x) for x in stack["losses"]), name
    assert stack["tokens_per_s"] > 0 and stack["peak_rss_bytes"] > 0, name
    assert 0 < stack["train_peak_rss_bytes"] <= stack["peak_rss_bytes"], name
    assert stack["trainable_params"] == run["stacks"]["peft-lora"]["trainable_params"], name
    assert 0 < stack["mfu"] and stack["model_flops"] == run["flops"]["total"], name
    assert len(stack["load_avg_1min"]) == 2, name
  # acceptance: the same adapter, batch and optimizer give the same losses over 5 steps
  agreement = run["loss_agreement"]
  assert agreement["jqlora-qlora vs peft-bnb"]["steps"] == 5
  assert agreement["jqlora-qlora vs peft-bnb"]["max_abs_diff"] < 1e-3
  assert agreement["jqlora-lora vs peft-lora"]["max_abs_diff"] < 1e-3
  # the adapter really trains, and the float and NF4 bases really differ
  for name in ("jqlora-qlora", "qwix-qlora"):
    losses = run["stacks"][name]["losses"]
    assert losses[-1] < losses[0] - 0.1, name
  assert abs(run["stacks"]["jqlora-qlora"]["losses"][0]
             - run["stacks"]["jqlora-lora"]["losses"][0]) > 1e-3
  # qwix's own NF4 (float block scales) is as close to the float weights as bitsandbytes', and
  # its loss is nearer the NF4 stacks' than the float base's is
  q, b, w = (run["stacks"][n]["nf4_mae"] for n in ("jqlora-qlora", "peft-bnb", "qwix-qlora"))
  assert 0 < q < 0.05 and math.isclose(q, b, rel_tol=1e-3)
  assert 0 < w <= b * 1.01
  qwix_vs_bnb = abs(agreement["qwix-qlora vs peft-bnb"]["step1_diff"])
  assert 0 < qwix_vs_bnb < 0.05
  # ... and the gap is the block scales' double quantization: jqlora's NF4 without it starts where
  # qwix does
  single = run["stacks"]["jqlora-qlora"]["own_single_quant_loss_step1"]
  assert abs(run["stacks"]["qwix-qlora"]["losses"][0] - single) < qwix_vs_bnb / 10
  assert agreement["qwix-qlora vs peft-lora"]["steps"] == 5
  assert {"tokens_per_s_vs_peft_bnb", "peak_memory_vs_peft_bnb", "tokens_per_s_vs_qwix",
          "step_time_vs_jqlora_lora", "lora_peak_memory_vs_peft_lora", "mfu"} == set(run["ratios"])
  table = (tmp_path / f"{stem}.md").read_text()
  assert "SmolLM2-135M" in table and "qwix-qlora" in table


def test_compare_torch_is_compare_peers_without_qwix():
  proc = subprocess.run([sys.executable, str(BENCHMARKS / "compare_torch.py"), "--help"],
                        env={**ENV, "COLUMNS": "400"}, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert "(default: jqlora-qlora,jqlora-lora,peft-bnb,peft-lora)" in proc.stdout


def test_model_flops_counts_base_adapters_and_attention():
  c = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
       "num_key_value_heads": 1, "vocab_size": 32}
  s = compare_peers.Setting("m", batch=3, seq=5, steps=1, warmup=0, r=2)
  f = compare_peers.model_flops(c, s)
  # q 8x8, k/v 8x4 (one kv head of 4), o 8x8, gate/up 8x16, down 16x8: 576 a layer; LM head 32x8
  assert f["base_params"] == 2 * 576 + 256
  assert f["adapter_params"] == 2 * 2 * (16 + 12 + 12 + 16 + 24 + 24 + 24)
  tokens, attention = 15, 2 * 4 * 3 * 25 * 8
  assert f["forward"] == 2 * f["base_params"] * tokens + 2 * f["adapter_params"] * tokens + attention
  assert f["total"] == f["forward"] + 4 * f["base_params"] * tokens // 2 \
      + 4 * f["adapter_params"] * tokens + 2 * attention


def test_curves_keep_batch_times_length_and_add_the_model_sizes():
  args = argparse.Namespace(smoke=False, quick=False, big=False, curves=True, remat=False,
                            jqlora_saves="selective",
                            steps=None, batch=None, curve_tokens=2048,
                            curve_seqs=[128, 512, 1024, 2048], curve_models=list(compare_peers.CURVE_MODELS))
  settings = compare_peers.presets(args)
  seq = [s for s in settings if s.model == compare_peers.SMOLLM2 and s.batch * s.seq == 2048]
  assert [s.seq for s in seq] == [128, 512, 1024, 2048]
  sizes = [s.model for s in settings if (s.batch, s.seq) == (4, 128)]
  assert sizes == [compare_peers.SMOLLM2, compare_peers.MID, compare_peers.BIG]


def _fake_result(loss: float) -> dict:
  return {"load_s": 1.0, "first_step_s": 3.0, "median_step_s": 2.0, "tokens_per_s": 256.0,
          "peak_rss_bytes": 2**30, "vocab_size": 8, "losses": [loss] * 3,
          "load_avg_1min": [0.5, 0.5]}


CALIBRATION = {"flop_per_s": 1e9, "jax_flop_per_s": 1e9, "torch_flop_per_s": 1e9, "shape": [8, 8, 8]}


def test_a_failing_stack_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
  """One stack dying (say, out of memory at a large setting) leaves the rest of the run."""
  setting = compare_peers.Setting(compare_peers.SMOLLM2, batch=1, seq=8, steps=3, warmup=1)
  config = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 8}

  def prepare(model, workdir, *_):
    (workdir / model).mkdir(parents=True)  # where the real one writes the model's files
    return {"config": config, "adapter_dir": str(workdir / "adapter"), "dtype": "float32"}

  monkeypatch.setattr(compare_peers, "prepare", prepare)
  ran = []

  def child(spec, workdir, env):
    name = spec.get("stack", spec["kind"])
    ran.append(name)
    if name == "calibrate":
      return CALIBRATION
    if name == "qwix-qlora":
      raise RuntimeError("qwix-qlora failed (exit -9):\nKilled")
    return _fake_result(1.0)

  monkeypatch.setattr(compare_peers, "_run_child", child)
  out = compare_peers.compare(setting, tmp_path, {}, gpu=False)
  assert ran == ["calibrate", *STACKS]
  assert sorted(out["stacks"]) == sorted(set(STACKS) - {"qwix-qlora"})
  assert out["failed"]["qwix-qlora"].endswith("Killed")
  assert "tokens_per_s_vs_qwix" not in out["ratios"] and "tokens_per_s_vs_peft_bnb" in out["ratios"]
  assert "| qwix-qlora | failed: Killed |" in "\n".join(compare_peers._run_tables(out, False))
  # without the adapter jqlora-qlora writes, the others cannot start: that failure stops the run
  monkeypatch.setattr(compare_peers, "_run_child", lambda spec, *a: (
      CALIBRATION if spec["kind"] == "calibrate" else (_ for _ in ()).throw(
          RuntimeError("jqlora-qlora failed"))))
  with pytest.raises(RuntimeError, match="jqlora-qlora failed"):
    compare_peers.compare(setting, tmp_path / "again", {}, gpu=False)


@pytest.mark.slow  # builds a transformers model and traces qwix's wrapped one
def test_qwix_llama_matches_transformers_and_qwix_wraps_it(tmp_path):
  import jax.numpy as jnp
  import qwix
  import torch
  from flax import nnx
  from peers import qwix_llama
  from transformers import LlamaConfig, LlamaForCausalLM

  torch.manual_seed(0)
  config = LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                       rope_theta=100000.0)
  reference = LlamaForCausalLM(config).float()
  reference.save_pretrained(tmp_path)
  ids = np.random.default_rng(0).integers(0, 96, (2, 12)).astype(np.int32)
  with torch.no_grad():
    out = reference(input_ids=torch.from_numpy(ids).long(), labels=torch.from_numpy(ids).long())

  model = qwix_llama.load(tmp_path)
  logits = model(jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(logits), out.logits.numpy(), atol=2e-5)
  assert abs(float(qwix_llama.loss_fn(logits, jnp.asarray(ids))) - out.loss.item()) < 1e-5

  provider = qwix.LoraProvider(module_path=qwix_llama.LINEAR_PATTERN, rank=4, alpha=8.0,
                               weight_qtype="nf4", tile_size=64)
  wrapped = qwix.apply_lora_to_model(model, provider, jnp.asarray(ids), rngs=nnx.Rngs(0))
  down = wrapped.layers[1].mlp.down_proj
  assert down.kernel.array.qtype == "nf4"
  assert down.kernel.array.scale.shape == (192 // 64, 128)  # blocks of 64 inputs per output
  assert down.kernel_lora_a.shape == (192, 4) and down.kernel_lora_b.shape == (4, 128)
  lora = nnx.state(wrapped, nnx.LoRAParam)
  assert len(nnx.to_flat_state(lora)) == 2 * 7 * 2  # A and B of 7 linears in 2 layers

  # a PEFT adapter file lands in qwix's parameters, transposed
  from safetensors.numpy import save_file
  rng = np.random.default_rng(1)
  a, b = rng.standard_normal((4, 192), np.float32), rng.standard_normal((128, 4), np.float32)
  prefix = "base_model.model.model.layers.1.mlp.down_proj"
  save_file({f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b},
            str(tmp_path / "adapter_model.safetensors"))
  assert qwix_llama.set_adapter(wrapped, tmp_path) == 1
  np.testing.assert_array_equal(np.asarray(down.kernel_lora_a.get_value()), a.T)
  np.testing.assert_array_equal(np.asarray(down.kernel_lora_b.get_value()), b.T)


@pytest.mark.slow  # imports qwix, jax and jqlora's kernels (~4 s idle)
def test_qwix_nf4_is_bitsandbytes_nf4_with_float_block_scales():
  """Why qwix's loss differs from bitsandbytes': its NF4 (blocks of 64 inputs, ``tile_size=64``)
  is bitsandbytes' NF4 without double quantization, value for value."""
  import jax.numpy as jnp
  import qwix
  from qwix._src.core import qarray

  import jqlora

  w = np.random.default_rng(0).standard_normal((96, 192)).astype(np.float32) * 0.02  # [out, in]
  how = qarray.HowToQuantize(qtype="nf4", channelwise_axes=[1], tiled_axes={0: 64})
  theirs = np.asarray(qwix.dequantize(qarray.quantize(jnp.asarray(w.T), how))).T
  for double_quant, equal in ((False, True), (True, False)):
    ours = np.asarray(jqlora.dequantize_nf4(jqlora.quantize_nf4(jnp.asarray(w), 64, double_quant),
                                            jnp.float32))
    assert np.array_equal(theirs, ours) == equal, double_quant
  assert np.mean(np.abs(theirs - w)) < np.mean(np.abs(ours - w))  # float scales: a bit closer

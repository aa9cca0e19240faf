"""``jqlora.plan``: storage bytes, the QLoRA paper's figures, measured peaks of the real step."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from flax import nnx

import jqlora
from jqlora.plan import format_plan, measure, parse_size, plan

MB = 10**6
GiB = 2**30


def test_parse_size_units():
  assert parse_size("48GiB") == 48 * GiB
  assert parse_size("80GB") == 80 * 10**9
  assert parse_size("1.5 MiB") == 3 * 2**19
  assert parse_size("1024") == 1024
  with pytest.raises(ValueError, match="memory size '48 parsecs'"):
    parse_size("48 parsecs")


def test_nf4_storage_is_4_127_bits_per_weight_and_splits_over_the_mesh():
  one = plan("llama-7b")
  linear_params = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
  assert one.nf4_weights == linear_params // 2
  # double quantization: 8 bits per 64 weights + 32 bits per 256 blocks (the paper's 4.127)
  bits = 8 * (one.nf4_weights + one.nf4_scales) / linear_params
  assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-4)
  eight = plan("llama-7b", devices=8, tensor=2)
  assert eight.mesh == {"data": 1, "fsdp": 4, "tensor": 2}
  assert eight.nf4_weights == one.nf4_weights // 8
  assert eight.adapters == pytest.approx(one.adapters / 8, abs=1)
  assert eight.tokens_per_device == one.tokens_per_device  # batch 1: no data split
  with pytest.raises(ValueError, match=r"= 2 \* 2 \* 1 must equal devices = 8"):
    plan("llama-7b", devices=8, data=2, fsdp=2)


def test_qlora_paper_7b_base_is_about_5048_mb():
  # The QLoRA reference setup: NF4 + double quantization for every decoder linear, the other
  # weights in float32 (peft's prepare_model_for_kbit_training), r=64 adapters on all linears.
  p = plan("llama-7b", lora_r=64, base_dtype="float32", adapter_dtype="float32")
  assert (p.weights + p.adapters) / MB == pytest.approx(5048, rel=0.01)
  # the 4-bit base alone (16-bit embeddings and head, as jqlora keeps them) is far below 16-bit
  assert plan("llama-7b", dtype="bfloat16").weights / MB == pytest.approx(3865, rel=0.01)


def test_qlora_paper_65b_fits_one_48gb_gpu_with_checkpointing():
  kw = dict(memory_per_device="48GiB", batch=1, seq=512, lora_r=64)
  on_device = plan("llama-65b", checkpointing=True, **kw)
  assert on_device.fits and on_device.weights < 34 * GiB
  paged = plan("llama-65b", checkpointing=True, optimizer_offload=True, **kw)
  assert paged.total == on_device.total - on_device.optimizer > 0
  assert not plan("llama-65b", checkpointing=False, **kw).fits
  assert not plan("llama-65b", checkpointing=True, **{**kw, "batch": 16}).fits
  # 33B on one 24 GB GPU (bf16 adapters, paged optimizer and checkpointing, as in the paper)
  assert plan("llama-33b", memory_per_device="24GiB", batch=1, seq=512, lora_r=64,
              adapter_dtype="bfloat16", optimizer_offload=True, checkpointing=True).fits


def test_defaults_are_those_of_jqlora_train():
  from jqlora.training.config import TrainConfig

  train, p = TrainConfig(dataset="-"), plan("llama-7b")
  assert (p.batch, p.seq, p.lora_r, p.dtype) == (train.micro_batch_size, train.sequence_len,
                                                 train.lora_r, train.dtype)
  assert p.checkpointing is train.gradient_checkpointing is False  # training keeps activations
  assert p.activations == p.activations_full > p.activations_checkpointed
  assert p.target_modules == plan("llama-7b", target_modules=train.lora_target_modules).target_modules
  assert len(p.target_modules) == 7 and not p.optimizer_offload


def test_format_plan_starts_with_the_assumptions():
  p = plan("llama-7b", devices=4, tensor=2, batch=8, seq=256, lora_r=32,
           target_modules=["q_proj", "v_proj"], checkpointing=True, dtype="float32",
           optimizer_offload=True)
  lines = format_plan(p, "assumptions (test):").splitlines()
  assert lines[0] == "assumptions (test):"
  head = "\n".join(lines[1:8])
  for expected in ("llama-7b (llama L=32 d=4096 ffn=11008 vocab=32000)",
                   "4 devices: data=1 x fsdp=2 x tensor=2", "8 x 256 (global; 1024 tokens per device)",
                   "r=32 on q_proj,v_proj", "checkpointing      on", "float32 activations",
                   "optimizer offload  on"):
    assert expected in head, (expected, head)
  assert lines[8] == "" and lines[9].startswith("NF4 weights (codes)")
  assert p.optimizer == 0 and p.activations == p.activations_checkpointed


# -- against XLA's measured peak of the real training step (float32, CPU) --------------

def _model(cfg: dict, r: int):
  from jqlora.models import LlamaConfig, build_model, random_source

  c = LlamaConfig.from_hf(cfg)
  model = build_model(c, random_source(c, std=1.0), dtype=jnp.float32, progress=False)
  jqlora.apply_lora(model, jqlora.LoraConfig(r=r), rngs=nnx.Rngs(0))
  return model


@pytest.mark.parametrize("size", [
    # shapes, batch and seq unlike the grid that fixed the activation coefficients
    dict(vocab_size=1536, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
         num_attention_heads=6, num_key_value_heads=2, head_dim=64, batch=3, seq=96),
    dict(vocab_size=3072, hidden_size=512, intermediate_size=1536, num_hidden_layers=5,
         num_attention_heads=4, num_key_value_heads=4, head_dim=128, batch=2, seq=160),
])
@pytest.mark.slow
def test_plan_is_within_10_percent_of_the_measured_peak(size):
  size = dict(size)
  batch, seq = size.pop("batch"), size.pop("seq")
  cfg = dict(model_type="llama", **size)
  model = _model(cfg, r=8)
  for checkpointing in (False, "selective", True):
    model.remat = checkpointing
    measured = measure(model, batch=batch, seq=seq).total
    p = plan(cfg, batch=batch, seq=seq, lora_r=8, checkpointing=checkpointing,
             dtype="float32")
    assert p.total == pytest.approx(measured, rel=0.10), (checkpointing, format_plan(p), measured)

"""DPO: TRL's losses and metrics on the same model and adapter, the mesh, memory, ``jqlora train``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

import jqlora
from jqlora.cli import main
from jqlora.nn import Frozen
from jqlora.training import DPOLoss, dpo_loss, dpo_step, functional_step, make_optimizer, sft_loss
from jqlora.training.config import load_config
from jqlora.training.data import eval_batches
from jqlora.training.loop import train
from jqlora.training.preference import PairBatches, encode_pair, load_preferences, split_prompt
from jqlora.training.records import DataError

from .toy import char_tokenizer, tiny_model_dir

WORDS = ["abc", "bad", "cab", "fed", "dab", "ace", "bed", "cafe", "face", "deed", "bead", "dace"]


def _records(form: str, n: int = len(WORDS)) -> list[dict]:
  """Reverse-a-word preferences: chosen the reversed word, rejected the word as is."""
  out = []
  for w in (WORDS * 4)[:n]:
    prompt, good, bad = f"rev {w}", w[::-1], w + "!"
    if form == "standard":
      out.append({"prompt": prompt + " =", "chosen": " " + good, "rejected": " " + bad})
    elif form == "explicit":
      out.append({"prompt": [{"role": "user", "content": prompt}],
                  "chosen": [{"role": "assistant", "content": good}],
                  "rejected": [{"role": "assistant", "content": bad}]})
    else:  # implicit: two whole conversations sharing the prompt
      user = {"role": "user", "content": prompt}
      out.append({"chosen": [user, {"role": "assistant", "content": good}],
                  "rejected": [user, {"role": "assistant", "content": bad}]})
  return out


def _write(path, records) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


# --- the loss formulas ---------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_losses_and_rewards_are_trls_formulas(loss_type):
  rng = np.random.default_rng(0)
  pc, pr, rc, rr = (rng.normal(-20, 5, 16).astype(np.float32) for _ in range(4))
  nc, nr = rng.integers(1, 30, 16), rng.integers(1, 30, 16)
  beta = 0.3
  losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type,
                                      chosen_tokens=nc, rejected_tokens=nr)
  delta = (pc - rc) - (pr - rr)
  expected = {"sigmoid": np.log1p(np.exp(-beta * delta)),
              "hinge": np.maximum(0.0, 1 - beta * delta),
              "ipo": ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2}[loss_type]
  np.testing.assert_allclose(losses, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(chosen, beta * (pc - rc), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(rejected, beta * (pr - rr), rtol=1e-5, atol=1e-5)
  # the gradient flows through the policy only: d loss / d pi_c = -d loss / d pi_r
  g = jax.grad(lambda p: dpo_loss(p, pr, rc, rr, beta=beta, loss_type=loss_type, chosen_tokens=nc,
                                  rejected_tokens=nr)[0].sum())(jnp.asarray(pc))
  assert np.abs(np.asarray(g)).max() > 0


def test_ipo_without_token_counts_and_unknown_losses_are_refused():
  x = jnp.zeros(2)
  with pytest.raises(ValueError, match="needs chosen_tokens"):
    dpo_loss(x, x, x, x, beta=0.1, loss_type="ipo")
  with pytest.raises(ValueError, match="loss_type must be one of"):
    dpo_loss(x, x, x, x, beta=0.1, loss_type="kto")


# --- records and batches -------------------------------------------------------------------------


def test_prompt_forms_explicit_implicit_and_standard():
  explicit, implicit, standard = (_records(f, 1)[0] for f in ("explicit", "implicit", "standard"))
  assert split_prompt(implicit) == (explicit["prompt"], explicit["chosen"], explicit["rejected"])
  assert split_prompt(standard) == ("rev abc =", " cba", " abc!")
  # implicit text: the shared text, not ending on the space before the answers
  assert split_prompt({"chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: green"}) == \
      ("Q: sky? A:", " blue", " green")
  # TRL: a text prompt beside conversations is dropped (the prompt is in the conversations)
  assert split_prompt({**implicit, "prompt": "rev abc"})[0] == explicit["prompt"]


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "chosen": "a"}, r"'rejected' is missing"),
    ({"prompt": "p", "chosen": " ", "rejected": "b"}, r"'chosen' is empty"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, r"'chosen' must be a string or a list of .* int 3"),
    ({"prompt": "p", "chosen": "a", "rejected": [{"role": "assistant"}]},
     r"'rejected' must be a string or a list of .*not all"),
    ({"prompt": 5, "chosen": "a", "rejected": "b"}, r"'prompt' must be a string"),
    ({"prompt": [{"role": "user", "content": "p"}], "chosen": "a", "rejected": "b"},
     r"'prompt' is a message list but"),
    ({"chosen": [{"role": "user", "content": "p"}], "rejected": [{"role": "user", "content": "p"}]},
     r"'chosen' is empty after the prompt both conversations share"),
])
def test_bad_records_name_the_place_and_the_field(record, message):
  with pytest.raises(DataError, match=r"^f\.jsonl:7: " + message):
    split_prompt(record, "f.jsonl:7")


@pytest.mark.parametrize("form", ["standard", "explicit"])
def test_completion_tokens_are_the_targets_end_of_turn_included(form):
  tok = char_tokenizer()
  (chosen, rejected), n = encode_pair(_records(form, 1)[0], tok)
  targets = lambda ex: tok.decode(ex.input_ids[ex.labels >= 0])
  end = "<|im_end|>" + ("\n" if form == "explicit" else "")
  assert targets(chosen) == (" cba" if form == "standard" else "cba") + end
  assert targets(rejected) == (" abc!" if form == "standard" else "abc!") + end
  assert (chosen.input_ids[:n] == rejected.input_ids[:n]).all()
  assert (chosen.labels[:n] < 0).all()


def test_pair_batches_interleave_pairs_and_resume_exactly(tmp_path):
  data = load_preferences(_write(tmp_path / "p.jsonl", _records("explicit")), char_tokenizer(),
                          sequence_len=64)
  it = PairBatches(data.pairs, micro_batch_size=3, accumulation=2, sequence_len=64, seed=1)
  assert it.steps_per_epoch() == 2
  first = next(it)
  assert first["input_ids"].shape == (2, 6, 64)
  tok = char_tokenizer()
  ids, labels = first["input_ids"][0], first["labels"][0]
  text = lambda r: tok.decode(ids[r][labels[r] >= 0])
  for r in range(0, 6, 2):  # a pair: the same prompt, the rejected answer is the word itself + "!"
    chosen, rejected = text(r).split("<|im_end|>")[0], text(r + 1).split("<|im_end|>")[0]
    assert rejected == chosen[::-1] + "!"
  state = it.state()
  expected = [next(it) for _ in range(3)]
  again = PairBatches(data.pairs, micro_batch_size=3, accumulation=2, sequence_len=64, seed=1)
  again.restore(state)
  for want in expected:
    got = next(again)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


# --- agreement with TRL's DPOTrainer -------------------------------------------------------------


def _trl_trainer(model_dir, tmp_path, records, beta, loss_type):
  """TRL's DPOTrainer on the tiny Llama with a fresh random PEFT adapter (non-zero B)."""
  import datasets
  import peft
  import torch
  import transformers
  from trl import DPOConfig, DPOTrainer

  torch.manual_seed(0)
  base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                         target_modules=["q_proj", "v_proj", "down_proj"])
  args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss_type], report_to=[],
                   use_cpu=True, max_length=None, bf16=False, disable_dropout=True,
                   per_device_train_batch_size=len(records), logging_strategy="no", save_strategy="no")
  trainer = DPOTrainer(model=base, args=args, processing_class=char_tokenizer(),
                       train_dataset=datasets.Dataset.from_list(records), peft_config=lora)
  with torch.no_grad():  # B away from PEFT's init too, so that policy != reference
    for name, p in trainer.model.named_parameters():
      if "lora_B" in name:
        p.add_(0.05 * torch.randn(p.shape))
  return trainer


@pytest.mark.slow
@pytest.mark.parametrize("form, loss_type", [("standard", "sigmoid"), ("explicit", "sigmoid"),
                                             ("implicit", "ipo"), ("standard", "hinge")])
def test_loss_rewards_and_lora_gradients_equal_trls_dpo_trainer(data_dir, tmp_path, form, loss_type):
  import torch

  model_dir = tiny_model_dir(data_dir, tmp_path)
  records, beta = _records(form, 6), 0.5
  trainer = _trl_trainer(model_dir, tmp_path, records, beta, loss_type)
  inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(records))])
  trainer.model.train()
  loss = trainer.compute_loss(trainer.model, inputs)
  loss.backward()
  logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
  grads = {n: p.grad.numpy() for n, p in trainer.model.named_parameters() if "lora_" in n}
  trainer.model.save_pretrained(tmp_path / "adapter")

  # jqlora: the same tokens, adapter and beta
  tok = char_tokenizer()
  pairs = [encode_pair(r, tok)[0] for r in records]
  t = inputs["input_ids"].shape[1]
  for i, (chosen, rejected) in enumerate(pairs):  # TRL's batch is [chosen..., rejected...]
    for ex, row in ((chosen, i), (rejected, len(pairs) + i)):
      n = len(ex)
      np.testing.assert_array_equal(ex.input_ids, inputs["input_ids"][row, :n].numpy())
      np.testing.assert_array_equal(ex.labels >= 0, inputs["completion_mask"][row, :n].numpy() == 1)
  batch = next(eval_batches([ex for p in pairs for ex in p], 2 * len(pairs), t))
  model = jqlora.load_adapter(jqlora.load_model(model_dir, quantize=False, dtype=jnp.float32,
                                                progress=False), tmp_path / "adapter")
  fn = DPOLoss(beta, loss_type)

  def mean_loss(lora, rest):
    total, count, extras = fn(nnx.merge(graphdef, lora, rest), batch)
    return total / count, (extras, count)

  graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
  (ours, (extras, count)), g = jax.value_and_grad(mean_loss, has_aux=True)(lora, rest)
  assert abs(float(ours) - float(loss.detach())) < 1e-4
  for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
    assert abs(float(extras[key]) / int(count) - logged[key]) < 1e-4, key
  assert abs(logged["rewards/chosen"]) > 1e-3  # policy != reference
  checked = 0
  for path, leaf in nnx.to_flat_state(g):
    module, kind = ".".join(map(str, path[:-1])), path[-1]  # e.g. layers.self_attn.q_proj, lora_a
    for layer in range(leaf.get_value().shape[0]):
      name = (f"base_model.model.model.layers.{layer}.{module.removeprefix('layers.')}."
              f"{'lora_A' if kind == 'lora_a' else 'lora_B'}.default.weight")
      np.testing.assert_allclose(np.asarray(leaf.get_value()[layer]).T, grads[name], atol=1e-4, rtol=0)
      checked += 1
  assert checked == 2 * 3 * 3  # A and B of 3 modules in 3 layers
  assert max(np.abs(v).max() for v in grads.values()) > 1e-3
  del torch


# --- one compiled step: no second copy of the base; 8 devices equal one --------------------------


def _lora_model(model_dir):
  model = jqlora.load_model(model_dir, quantize=False, dtype=jnp.float32, progress=False)
  jqlora.apply_lora(model, jqlora.LoraConfig(r=4, alpha=8, target_modules="all-linear"), rngs=nnx.Rngs(0))
  return model


def _tiny(data_dir, tmp_path):
  model_dir = tiny_model_dir(data_dir, tmp_path)
  return model_dir, _lora_model(model_dir)


@pytest.mark.slow
def test_dpo_step_holds_no_second_copy_of_the_base(data_dir, tmp_path):
  import optax

  _, model = _tiny(data_dir, tmp_path)
  optimizer = make_optimizer(model, optax.adam(1e-3))
  batch = {"input_ids": jnp.ones((4, 32), jnp.int32), "labels": jnp.ones((4, 32), jnp.int32),
           "segment_ids": jnp.ones((4, 32), jnp.int32), "positions": jnp.tile(jnp.arange(32), (4, 1))}
  stats = {}
  for name, loss in (("sft", sft_loss), ("dpo", DPOLoss(0.1))):
    step, state, opt_state = functional_step(model, optimizer, loss=loss)
    compiled = jax.jit(step).lower(state, opt_state, batch).compile()
    stats[name] = compiled.memory_analysis()
  weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, Frozen)))
  sft, dpo = stats["sft"], stats["dpo"]
  assert dpo.argument_size_in_bytes == sft.argument_size_in_bytes
  assert dpo.output_size_in_bytes <= sft.output_size_in_bytes + 4096  # the few reward scalars
  # the reference pass adds activations, not a weight-sized buffer
  assert dpo.temp_size_in_bytes - sft.temp_size_in_bytes < 0.25 * weights, (
      dpo.temp_size_in_bytes, sft.temp_size_in_bytes, weights)


@pytest.mark.slow
def test_dpo_step_accumulated_micro_batches_equal_one_batch_and_train_only_the_adapters(data_dir, tmp_path):
  import optax

  model_dir, model = _tiny(data_dir, tmp_path)
  data = load_preferences(_write(tmp_path / "p.jsonl", _records("explicit", 8)), char_tokenizer(),
                          sequence_len=48)
  whole = next(eval_batches(data.examples, 16, 48))  # [2B, T] = 8 pairs
  halves = {k: v.reshape(2, 8, 48) for k, v in whole.items()}  # [A, 2B, T] = 2 x 4 pairs
  base = jax.tree.map(np.asarray, nnx.state(model, Frozen))
  lora0 = jax.tree.map(np.asarray, nnx.state(model, nnx.LoRAParam))
  results = []
  for m, batch in ((model, whole), (_lora_model(model_dir), halves)):  # the same initial adapters
    metrics = dpo_step(m, make_optimizer(m, optax.sgd(0.5)), batch, beta=0.2)
    results.append(({k: float(v) for k, v in metrics.items()}, nnx.state(m, nnx.LoRAParam), m))
  (one, lora_one, m_one), (acc, lora_acc, _) = results
  assert one.keys() == acc.keys() == {"loss", "grad_norm", "n_tokens", "rewards/chosen", "rewards/rejected",
                                      "rewards/margins", "rewards/accuracies"}
  for k in one:
    assert abs(one[k] - acc[k]) < 1e-5, k
  assert one["n_tokens"] == sum(int((ex.labels[1:] >= 0).sum()) for ex in data.examples)  # completions
  assert abs(one["loss"] - np.log(2)) < 1e-5  # B = 0: policy == reference
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), lora_one, lora_acc)
  moved = lambda a, b: float(np.abs(np.asarray(a) - b).max())
  changed = jax.tree.leaves(jax.tree.map(moved, lora_one, lora0))
  assert max(changed) > 1e-4  # the adapters trained ...
  jax.tree.map(np.testing.assert_array_equal, nnx.state(m_one, Frozen), base)  # the base not


MESH_WORKER = """
import json, sys
import jax
from jqlora.cli import main
assert len(jax.devices()) == 8, jax.devices()
out = {}
for name, extra in {"single": [], "mesh": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]}.items():
  out[name] = main(["train", "--config", sys.argv[1], f"output_dir={name}", *extra])
print(json.dumps(out))
"""


def _config(tmp_path, model_dir, dataset, **kw) -> str:
  values = dict(base_model=str(model_dir), dataset=dataset, method="dpo", beta=0.5, dtype="float32",
                load_in_4bit=False, lora_r=4, lora_target_modules=["q_proj", "v_proj"], sequence_len=32,
                micro_batch_size=4, max_steps=4, learning_rate=3e-2, lr_scheduler="constant",
                val_set_size=4, eval_batch_size=4, seed=0)
  values.update(kw)
  path = tmp_path / "dpo.yaml"
  path.write_text(yaml.safe_dump(values))
  return str(path)


@pytest.mark.slow
def test_dpo_on_an_8_device_mesh_equals_one_device(tmp_path):
  from .meshable import write_meshable_model

  model_dir = write_meshable_model(tmp_path / "model")
  cfg = _config(tmp_path, model_dir, _write(tmp_path / "p.jsonl", _records("explicit", 24)),
                lora_dropout=0.0)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", MESH_WORKER, cfg], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"single": 0, "mesh": 0}
  assert "mesh: data=2 x fsdp=2 x tensor=2 over 8 devices" in proc.stdout
  rows = {n: [json.loads(l) for l in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
          for n in ("single", "mesh")}
  keys = ["loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies"]
  trained = {n: np.asarray([[r[k] for k in keys] for r in rs if "loss" in r]) for n, rs in rows.items()}
  assert trained["mesh"].shape == (4, 5)
  np.testing.assert_allclose(trained["mesh"][:, :4], trained["single"][:, :4], rtol=1e-4, atol=1e-5)
  # at step 1 policy == reference: the rewards are rounding noise, and so is their order
  np.testing.assert_array_equal(trained["mesh"][1:, 4], trained["single"][1:, 4])
  final = {n: [rs[-1][k] for k in ("eval_loss", "eval_rewards/margins", "eval_logps/accuracies")]
           for n, rs in rows.items()}
  np.testing.assert_allclose(final["mesh"], final["single"], rtol=0, atol=1e-5)


# --- jqlora train --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("form", ["explicit", "implicit", "standard"])
def test_jqlora_train_dpo_raises_the_held_out_preference_and_resumes(data_dir, tmp_path, capsys, form):
  model_dir = tiny_model_dir(data_dir, tmp_path)
  data = _write(tmp_path / "p.jsonl", _records(form, 40))
  cfg = _config(tmp_path, model_dir, data, max_steps=12, save_steps=4, val_set_size=8, sequence_len=64,
                gradient_accumulation_steps=2, micro_batch_size=2, output_dir=str(tmp_path / "run"))
  train(load_config(cfg), stop_at_step=6)
  assert main(["train", "--config", cfg]) == 0  # resumes at 6
  out = capsys.readouterr().out
  assert "resumed from" in out and "DPO (sigmoid loss, beta 0.5)" in out
  found = re.findall(r"held-out preference accuracy (before|after) training: ([\d.]+)%", out)
  assert [k for k, _ in found] == ["before", "after"]
  rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  steps = [r["step"] for r in rows if "loss" in r]
  assert steps == list(range(1, 13))  # one history, no step twice
  first, last = rows[0], rows[-1]
  assert first["step"] == 0 and first["eval_rewards/accuracies"] == 0.0  # policy == reference
  assert last["eval_rewards/accuracies"] > 0.5 and last["eval_rewards/margins"] > 0
  assert last["eval_loss"] < first["eval_loss"]
  assert all(0 <= r["rewards/accuracies"] <= 1 for r in rows if "loss" in r)
  assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
  # a changed beta is a changed run
  assert main(["train", "--config", cfg, "beta=0.2", "max_steps=14"]) == 2
  assert "beta (0.5 -> 0.2)" in capsys.readouterr().err


def _one_line_error(capsys, argv) -> str:
  capsys.readouterr()
  assert main(argv) == 2
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
  assert len(lines) == 1 and "Traceback" not in err, err
  return lines[0]


@pytest.mark.parametrize("record, expected", [
    ({"prompt": "rev abc", "chosen": "cba"}, r"bad\.jsonl:3: 'rejected' is missing"),
    ({"prompt": "rev abc", "chosen": "", "rejected": "abc"}, r"bad\.jsonl:3: 'chosen' is empty"),
    ({"prompt": "rev abc", "chosen": ["cba"], "rejected": "abc"},
     r"bad\.jsonl:3: 'chosen' must be a string or a list of"),
    ({"prompt": "rev abc", "chosen": "cba", "rejected": 7}, r"bad\.jsonl:3: 'rejected' must be .* int 7"),
], ids=["missing_rejected", "empty_chosen", "chosen_list_of_str", "rejected_int"])
def test_bad_preference_records_end_train_with_one_line_naming_line_and_field(
    data_dir, tmp_path, capsys, record, expected):
  model_dir = tiny_model_dir(data_dir, tmp_path)
  good = _records("standard", 2)
  data = tmp_path / "bad.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in [*good, record]))  # line 3 is the bad one
  cfg = _config(tmp_path, model_dir, str(data), output_dir=str(tmp_path / "out"))
  line = _one_line_error(capsys, ["train", "--config", cfg])
  assert line.startswith("jqlora train: error: ") and re.search(expected, line), line
  assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("setting, expected", [
    ({"finetune": "full"}, r"finetune is not supported with method: dpo \(finetune: full: its reference"),
    ({"beta": 0}, r"beta must be > 0, got 0"),
    ({"sample_packing": True}, r"sample_packing is not supported with method: dpo"),
    ({"dataset_type": "alpaca"}, r"dataset_type is not supported with method: dpo \(dataset_type: alpaca"),
    ({"dpo_loss": "kto"}, r"dpo_loss must be 'sigmoid' \| 'ipo' \| 'hinge', got 'kto'"),
])
def test_dpo_settings_it_cannot_honour_are_refused_by_name(data_dir, tmp_path, capsys, setting, expected):
  cfg = _config(tmp_path, tmp_path, _write(tmp_path / "p.jsonl", _records("standard", 2)), **setting)
  line = _one_line_error(capsys, ["train", "--config", cfg])
  assert re.search(expected, line), line

"""`jqlora train` on each dataset format and file type: it ends, the loss is finite, the prompt is masked.

Each case trains the tiny Llama one step on four records (one micro batch of 4
rows, so every record once) with the same file as its held-out set. The runs
share the shapes, so the step compiles once for all of them.
"""

import json
import math

import pytest
import yaml
from training.test_records import RECORDS, write_dataset
from training.toy import char_tokenizer, tiny_model_dir

import jqlora.training.loop
from jqlora.cli import main
from jqlora.training.data import to_messages

pytestmark = pytest.mark.slow  # trains through the CLI


def _n_tokens(tok, text):
  return len(tok(text, add_special_tokens=False)["input_ids"])


def _targets(tok, fmt, record):
  """Target tokens of a record, counted from the chat template (TRL's way), not from jqlora's masks.

  Text: every token and EOS, less the first (nothing predicts it); string
  prompt/completion: the completion and EOS; else each trained assistant turn:
  the conversation up to its end less the prompt that asks for it.
  """
  if fmt == "text":
    return _n_tokens(tok, record["text"])
  if fmt == "prompt_completion":
    return _n_tokens(tok, record["completion"]) + 1
  messages = to_messages(record, fmt.removesuffix("_chat"))
  first = len(record["prompt"]) if fmt == "prompt_completion_chat" else 0
  render = lambda msgs, gen: tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
  return sum(_n_tokens(tok, render(messages[:i + 1], False)) - _n_tokens(tok, render(messages[:i], True))
             for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first)


#: case -> (records in tests/training/test_records.py, file type)
CASES = {
    "sharegpt.jsonl": ("sharegpt", "jsonl"),
    "prompt_completion.jsonl": ("prompt_completion", "jsonl"),
    "prompt_completion_chat.jsonl": ("prompt_completion_chat", "jsonl"),
    "alpaca.json": ("alpaca", "json"),
    "chat.parquet": ("chat", "parquet"),
    "text.csv": ("text", "csv"),
    "sharegpt-save_to_disk": ("sharegpt", "save_to_disk"),
    "alpaca-save_to_disk-DatasetDict": ("alpaca", "dataset_dict"),
}


@pytest.fixture(scope="module")
def model_dir(data_dir, tmp_path_factory):
  """The tiny Llama; meanwhile compiled steps persist, so the runs after the first reuse them.

  (Each run builds its own optimizer, so the in-memory jit cache misses; the
  persistent cache keys on the program and hits.)
  """
  import jax
  from jax.experimental.compilation_cache import compilation_cache

  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  before = {k: getattr(jax.config, k) for k in keys}
  for k, v in zip(keys, (str(tmp_path_factory.mktemp("jit")), 0, -1)):
    jax.config.update(k, v)
  yield tiny_model_dir(data_dir, tmp_path_factory.mktemp("formats"))
  for k, v in before.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()  # the next tests in this process compile as before


@pytest.mark.parametrize("case", CASES)
def test_train_reads_the_format_and_masks_the_prompt(model_dir, tmp_path, monkeypatch, case):
  fmt, kind = CASES[case]
  records = RECORDS[fmt] * 2
  data = write_dataset(tmp_path, "data", records, kind)
  steps = []
  step = jqlora.training.loop.train_step
  monkeypatch.setattr(jqlora.training.loop, "train_step",
                      lambda *a, **kw: steps.append(step(*a, **kw)) or steps[-1])
  out = tmp_path / "out"
  config = tmp_path / "run.yaml"
  config.write_text(yaml.safe_dump({
      "base_model": str(model_dir), "dataset": str(data), "eval_dataset": str(data), "dtype": "float32",
      "lora_r": 4, "sequence_len": 48, "micro_batch_size": 4, "max_steps": 1, "output_dir": str(out)}))
  assert main(["train", "--config", str(config)]) == 0
  rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  assert rows[0]["step"] == 1 and math.isfinite(rows[0]["loss"])
  assert math.isfinite(rows[-1]["eval_loss"])
  assert (out / "adapter" / "adapter_config.json").is_file()
  tok = char_tokenizer()
  assert int(steps[0]["n_tokens"]) == sum(_targets(tok, fmt, r) for r in records)

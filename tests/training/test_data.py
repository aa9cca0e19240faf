"""Prompt masking, formats, packing, seeded resumable iteration and bad-input errors."""

import json

import numpy as np
import pytest

from jqlora.training.data import (
  BatchIterator,
  DataError,
  Example,
  detect_format,
  encode,
  eval_batches,
  load_dataset,
  read_jsonl,
  to_messages,
)

from .toy import char_tokenizer

ALPACA = {"instruction": "Add", "input": "1 2", "output": "3"}


def _targets(tok, ex):
  return tok.decode(ex.input_ids[ex.labels != -100])


def test_alpaca_with_chat_template_trains_only_the_answer_and_end_of_turn():
  tok = char_tokenizer()
  ex = encode(ALPACA, tok, "alpaca")
  assert _targets(tok, ex) == "3<|im_end|>\n"
  assert tok.eos_token_id in ex.labels
  full = tok.decode(ex.input_ids)
  assert full.startswith("<|im_start|>user\nAdd\n\n1 2<|im_end|>")
  ex_all = encode(ALPACA, tok, "alpaca", train_on_inputs=True)
  np.testing.assert_array_equal(ex_all.labels, ex_all.input_ids)


def test_alpaca_without_chat_template_appends_a_trained_eos():
  tok = char_tokenizer(chat_template=None)
  ex = encode(ALPACA, tok, "alpaca")
  assert tok.decode(ex.input_ids).startswith("### Instruction:\nAdd\n\n### Input:\n1 2")
  assert _targets(tok, ex) == "3<|im_end|>"
  assert ex.labels[-1] == tok.eos_token_id


def test_chat_trains_every_assistant_turn_only():
  tok = char_tokenizer()
  record = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
                         {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
                         {"role": "assistant", "content": "a2"}]}
  ex = encode(record, tok, "chat")
  assert _targets(tok, ex) == "a1<|im_end|>\na2<|im_end|>\n"


def test_sharegpt_maps_its_speakers_to_roles_and_trains_like_chat():
  tok = char_tokenizer()
  turns = [("system", "S"), ("human", "u1"), ("gpt", "a1"), ("user", "u2"), ("model", "a2")]
  record = {"conversations": [{"from": f, "value": v} for f, v in turns]}
  chat = {"messages": [{"role": {"human": "user", "gpt": "assistant", "model": "assistant"}.get(f, f),
                        "content": v} for f, v in turns]}
  ex, ref = encode(record, tok, "sharegpt"), encode(chat, tok, "chat")
  np.testing.assert_array_equal(ex.input_ids, ref.input_ids)
  np.testing.assert_array_equal(ex.labels, ref.labels)
  assert _targets(tok, ex) == "a1<|im_end|>\na2<|im_end|>\n"
  as_messages = encode(chat, tok, "sharegpt")  # dataset_type: sharegpt takes role/content messages too
  np.testing.assert_array_equal(as_messages.labels, ref.labels)
  assert to_messages(record, "sharegpt") == chat["messages"]


def test_prompt_completion_strings_train_the_completion_and_eos_only():
  tok = char_tokenizer()
  ex = encode({"prompt": "2+2=", "completion": "4"}, tok, "prompt_completion")
  assert tok.decode(ex.input_ids) == "2+2=4<|im_end|>"  # raw text: no chat template
  assert _targets(tok, ex) == "4<|im_end|>"
  assert (ex.labels[:4] == -100).all()
  ex_all = encode({"prompt": "2+2=", "completion": "4"}, tok, "prompt_completion", train_on_inputs=True)
  np.testing.assert_array_equal(ex_all.labels, ex_all.input_ids)
  with pytest.raises(DataError, match="no chat turns"):
    to_messages({"prompt": "2+2=", "completion": "4"}, "prompt_completion")


def test_conversational_prompt_completion_trains_the_completion_turns_only():
  tok = char_tokenizer()
  prompt = [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "u2"}]
  record = {"prompt": prompt, "completion": [{"role": "assistant", "content": "a2"}]}
  ex = encode(record, tok, "prompt_completion")
  assert _targets(tok, ex) == "a2<|im_end|>\n"  # the prompt's assistant turn a1 is masked
  assert tok.decode(ex.input_ids) == tok.apply_chat_template(prompt + record["completion"], tokenize=False)
  rendered = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
  n_prompt = len(tok(rendered, add_special_tokens=False)["input_ids"])
  assert (ex.labels[:n_prompt] == -100).all() and (ex.labels[n_prompt:] != -100).all()
  assert to_messages(record, "prompt_completion")[-1] == {"role": "assistant", "content": "a2"}


@pytest.mark.parametrize("keys, fmt", [
    (("prompt", "chosen", "rejected"), "preference"), (("chosen", "rejected"), "preference"),
    (("prompt", "completion"), "prompt_completion"), (("messages", "text"), "chat"),
    (("conversations",), "sharegpt"), (("instruction", "output", "text"), "alpaca"), (("text",), "text")])
def test_detect_format_by_keys(keys, fmt):
  assert detect_format(dict.fromkeys(keys, "")) == fmt


def test_preference_records_are_not_encoded_for_sft():
  with pytest.raises(DataError, match=r"at:1: preference records .* method: dpo"):
    encode({"chosen": "a", "rejected": "b"}, char_tokenizer(), "preference", where="at:1")


def test_text_is_fully_trained_with_eos():
  tok = char_tokenizer()
  ex = encode({"text": "abc"}, tok, "text")
  assert tok.decode(ex.input_ids) == "abc<|im_end|>"
  np.testing.assert_array_equal(ex.labels, ex.input_ids)


def _examples(lengths, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for n in lengths:
    ids = rng.integers(1, 50, n).astype(np.int32)
    out.append(Example(ids, np.where(rng.random(n) < 0.5, ids, -100).astype(np.int32)))
  return out


def test_packing_segments_positions_and_one_pass_per_epoch():
  examples = _examples([5, 3, 7, 2, 6, 4, 8, 1])
  it = BatchIterator(examples, micro_batch_size=2, accumulation=1, sequence_len=10, packing=True,
                     seed=3)
  seen = []
  for _ in range(3):
    b = next(it)
    assert b["input_ids"].shape == (1, 2, 10)
    for ids, seg, pos, lab in zip(b["input_ids"][0], b["segment_ids"][0], b["positions"][0],
                                  b["labels"][0]):
      for s in range(1, seg.max() + 1):
        sel = seg == s
        np.testing.assert_array_equal(pos[sel], np.arange(sel.sum()))
        seen.append(tuple(ids[sel]))
      assert (lab[seg == 0] == -100).all()
  first_epoch = {tuple(e.input_ids) for e in examples}
  assert first_epoch <= set(seen)  # 36 tokens fit in 3 batches of 2 x 10: every example once


def test_shuffle_is_seeded_and_position_restores_exactly():
  examples = _examples(range(1, 12))
  make = lambda seed: BatchIterator(examples, micro_batch_size=2, accumulation=2, sequence_len=12,
                                    packing=False, seed=seed)
  a, b, c = make(0), make(0), make(1)
  batches_a = [next(a) for _ in range(4)]
  assert all(np.array_equal(x["input_ids"], next(b)["input_ids"]) for x in batches_a)
  assert not all(np.array_equal(x["input_ids"], next(c)["input_ids"]) for x in batches_a)
  it = make(0)
  next(it)
  state = json.loads(json.dumps(it.state()))
  expected = [next(it) for _ in range(5)]  # crosses an epoch boundary (11 examples, 4 per batch)
  fresh = make(0)
  fresh.restore(state)
  for e in expected:
    np.testing.assert_array_equal(next(fresh)["input_ids"], e["input_ids"])


def test_eval_batches_pad_the_last_batch():
  batches = list(eval_batches(_examples([3, 4, 5]), batch_size=2, sequence_len=6))
  assert len(batches) == 2 and batches[1]["input_ids"].shape == (2, 6)
  assert (batches[1]["labels"][1] == -100).all() and (batches[1]["segment_ids"][1] == 0).all()


def _write(tmp_path, lines):
  p = tmp_path / "d.jsonl"
  p.write_text("\n".join(lines) + "\n")
  return p


def test_bad_inputs_name_the_file_and_line(tmp_path):
  tok = char_tokenizer()
  with pytest.raises(DataError, match="does not exist"):
    read_jsonl(tmp_path / "missing.jsonl")
  with pytest.raises(DataError, match="empty"):
    read_jsonl(_write(tmp_path, ["", "  "]))
  p = _write(tmp_path, [json.dumps(ALPACA), "{not json"])
  with pytest.raises(DataError, match=r"d\.jsonl:2: not valid JSON.*expected one JSON object"):
    read_jsonl(p)
  p = _write(tmp_path, [json.dumps(ALPACA), json.dumps({"instruction": "x"})])
  with pytest.raises(DataError, match=r"d\.jsonl:2: expected a string 'output'"):
    load_dataset(p, tok, sequence_len=64)
  p = _write(tmp_path, [json.dumps({"foo": 1})])
  with pytest.raises(DataError, match=r"d\.jsonl:1: cannot tell the format"):
    load_dataset(p, tok, sequence_len=64)


def test_too_long_examples_are_counted_truncated_and_warned_once(tmp_path):
  tok = char_tokenizer()
  p = _write(tmp_path, [json.dumps({"text": "x" * n}) for n in (3, 30, 40, 5)])
  with pytest.warns(UserWarning, match="2 of 4 examples are longer than sequence_len=10") as rec:
    ds = load_dataset(p, tok, sequence_len=10)
  assert len(rec) == 1 and ds.n_truncated == 2
  assert [len(e) for e in ds.examples] == [4, 10, 10, 6]

"""Every format from every file type (JSONL, JSON, Parquet, CSV, save_to_disk folders) and their errors."""

import json
import re
import sys

import numpy as np
import pytest

from jqlora.training.data import DataError, load_dataset
from jqlora.training.records import read_located, read_records

from .toy import char_tokenizer

#: Two records of each format (the second alpaca record has no 'input': a null once in a table).
RECORDS = {
    "alpaca": [{"instruction": "rev", "input": "abc", "output": "cba"},
               {"instruction": "say hi", "output": "hi"}],
    "chat": [{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
             {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                           {"role": "assistant", "content": "r"}]}],
    "sharegpt": [{"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]},
                 {"conversations": [{"from": "system", "value": "s"}, {"from": "user", "value": "q"},
                                    {"from": "model", "value": "r"}]}],
    "prompt_completion": [{"prompt": "2+2=", "completion": "4"}, {"prompt": "1+1=", "completion": "2"}],
    "prompt_completion_chat": [
        {"prompt": [{"role": "user", "content": "2+2"}],
         "completion": [{"role": "assistant", "content": "4"}]},
        {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "1+1"}],
         "completion": [{"role": "assistant", "content": "2"}]}],
    "text": [{"text": "hello"}, {"text": "world"}],
}
FLAT = ("alpaca", "prompt_completion", "text")  # the formats a CSV can hold
KINDS = ("jsonl", "json", "json_lines", "parquet", "csv", "save_to_disk", "dataset_dict")


def write_dataset(folder, name, records, kind):
  """``records`` saved as ``kind`` (one of ``KINDS``) under ``folder``; returns the path to read."""
  import datasets

  suffix = {"json_lines": ".json", "save_to_disk": "", "dataset_dict": ""}.get(kind, f".{kind}")
  path = folder / f"{name}{suffix}"
  if kind in ("jsonl", "json_lines"):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
  if kind == "json":
    path.write_text(json.dumps(records))
    return path
  keys = list(dict.fromkeys(k for r in records for k in r))  # every record's keys (from_list: the first's)
  table = datasets.Dataset.from_dict({k: [r.get(k) for r in records] for k in keys})
  if kind == "save_to_disk":
    table.save_to_disk(str(path))
  elif kind == "dataset_dict":
    datasets.DatasetDict({"test": table.select([0]), "train": table}).save_to_disk(str(path))
  else:
    getattr(table, f"to_{kind}")(str(path), **({"index": False} if kind == "csv" else {}))
  return path


CASES = [(fmt, kind) for fmt in RECORDS for kind in KINDS if kind != "csv" or fmt in FLAT]


@pytest.mark.parametrize("fmt, kind", CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_every_format_reads_the_same_from_every_file_type(tmp_path, fmt, kind):
  tok = char_tokenizer()
  records = RECORDS[fmt]
  path = write_dataset(tmp_path, "d", records, kind)
  got, want = (load_dataset(p, tok, sequence_len=64)
               for p in (path, write_dataset(tmp_path, "ref", records, "jsonl")))
  assert got.fmt == want.fmt == fmt.removesuffix("_chat")
  csv_alpaca = kind == "csv" and fmt == "alpaca"
  expected = [{**r, "input": r.get("input", "")} for r in records] if csv_alpaca else records
  assert got.records == expected  # nulls dropped; a CSV's empty cell is ""
  for a, b in zip(got.examples, want.examples, strict=True):
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.labels, b.labels)
  places = [p for p, _ in read_located(path)]
  assert places == ([f"{path}:1", f"{path}:2"] if kind == "jsonl" else [f"{path} row 1", f"{path} row 2"])


def test_a_null_field_is_a_missing_one_in_every_file_type(tmp_path):
  records = [{"instruction": "a", "input": None, "output": "b"},
             {"text": None, "instruction": "c", "output": "d"}]
  for kind in ("jsonl", "json", "parquet"):
    assert read_records(write_dataset(tmp_path, kind, records, kind)) == [
        {"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}], kind


def test_csv_cells_stay_text(tmp_path):
  path = tmp_path / "d.csv"
  path.write_text("instruction,input,output\npad,7,007\n")
  assert read_records(path) == [{"instruction": "pad", "input": "7", "output": "007"}]


def _raises(path, match, fmt="auto"):
  """The DataError of loading ``path``; ``match`` is a regex after the file's name."""
  with pytest.raises(DataError, match=re.escape(str(path)) + match):
    load_dataset(path, char_tokenizer(), fmt=fmt, sequence_len=64)


def test_record_errors_name_the_file_row_and_field(tmp_path):
  alpaca = RECORDS["alpaca"][0]
  _raises(write_dataset(tmp_path, "missing", [alpaca, {"instruction": "x", "input": "y"}], "parquet"),
          r" row 2: expected a string 'output', got nothing \(alpaca format, detected from row 1\)")
  _raises(write_dataset(tmp_path, "wrong_type", [{"text": "a"}, {"text": 5}], "json_lines"),
          r" row 2: expected a string 'text', got int")
  conv = lambda *turns: {"conversations": [{"from": f, "value": v} for f, v in turns]}
  _raises(write_dataset(tmp_path, "empty", [conv(("human", "u"), ("gpt", "a")), {"conversations": []}],
                        "save_to_disk"),
          r" row 2: expected 'conversations': a non-empty list of \{\"from\": str, \"value\": str\}, "
          "got an empty list")
  _raises(write_dataset(tmp_path, "role", [conv(("human", "u"), ("bot", "a"))], "jsonl"),
          r":1: conversations\[1\]\.from: unknown role 'bot'; expected one of human, user, gpt")
  _raises(write_dataset(tmp_path, "no_answer", [conv(("human", "u"))], "json"),
          r" row 1: a sharegpt record needs at least one assistant message")
  pc = [{"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]}]
  _raises(write_dataset(tmp_path, "pc_role", pc, "parquet"), r" row 1: completion\[0\]\.role: expected "
          "'assistant', got 'user'")
  _raises(write_dataset(tmp_path, "pc_mixed", [{"prompt": "q", "completion": ["a"]}], "jsonl"),
          r":1: expected 'prompt' and 'completion' both strings or both lists of messages .* got str "
          "and list")
  _raises(write_dataset(tmp_path, "chat_content", [{"messages": [{"role": "user", "content": 3}]}], "jsonl"),
          r":1: messages\[0\]\.content: expected a string, got int")


def test_a_csv_missing_a_column_names_it(tmp_path):
  path = tmp_path / "d.csv"
  path.write_text("instruction,input\nrev,abc\n")
  _raises(path, r" row 1: cannot tell the format from keys \['input', 'instruction'\]")
  _raises(path, r" row 1: expected a string 'output', got nothing \(alpaca format, as dataset_type says\)",
          fmt="alpaca")


def test_mixed_formats_name_the_first_record_that_differs(tmp_path):
  records = [*RECORDS["alpaca"], {"text": "t"}, {"messages": []}]
  for kind, at, first in (("jsonl", ":3", "line 1"), ("parquet", " row 3", "row 1")):
    _raises(write_dataset(tmp_path, "mixed", records, kind),
            f"{at}: a text record \\(keys \\['text'\\]\\), but {first} is alpaca: a dataset holds one format")


def test_preference_records_ask_for_dpo(tmp_path):
  pref = [{"prompt": "p", "chosen": "good", "rejected": "bad"}]
  _raises(write_dataset(tmp_path, "pref", pref, "jsonl"), r":1: preference records .* set method: dpo")
  _raises(write_dataset(tmp_path, "pref_only", [{"chosen": "a", "rejected": "b"}], "parquet"),
          r" row 1: preference records .* set method: dpo")


def test_unreadable_files_and_folders(tmp_path):
  bad = tmp_path / "corrupt.parquet"
  bad.write_bytes(b"PAR1 not really parquet")
  _raises(bad, r": cannot be read as a PARQUET file: .*magic bytes")
  truncated = tmp_path / "cut.json"
  truncated.write_text('[{"text": "a"}, {"text": ')
  _raises(truncated, r": cannot be read as a JSON file: ")
  import datasets

  folder = tmp_path / "dd"
  datasets.DatasetDict({"test": datasets.Dataset.from_list(RECORDS["text"][:1])}).save_to_disk(str(folder))
  _raises(folder, r": this DatasetDict folder has no 'train' split \(it has test\); point dataset at "
          f"{re.escape(str(folder))}/<split>")
  assert read_records(folder / "test") == RECORDS["text"][:1]  # a split's own folder
  (tmp_path / "plain").mkdir()
  _raises(tmp_path / "plain", r": cannot be read as a save_to_disk folder")
  (tmp_path / "d.txt").write_text("{}")
  _raises(tmp_path / "d.txt", r": unknown dataset file type '\.txt'; expected \.jsonl, \.ndjson, \.json")
  _raises(tmp_path / "nope.parquet", r" does not exist")


def test_without_the_datasets_library_jsonl_still_reads_and_the_rest_names_the_extra(tmp_path, monkeypatch):
  parquet = write_dataset(tmp_path, "d", RECORDS["text"], "parquet")
  jsonl = write_dataset(tmp_path, "d", RECORDS["text"], "jsonl")
  monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
  assert load_dataset(jsonl, char_tokenizer(), sequence_len=64).records == RECORDS["text"]
  _raises(parquet, r": reading \.parquet files needs the datasets library: pip install 'jqlora\[data\]'$")

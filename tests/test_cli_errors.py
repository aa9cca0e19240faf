"""Every error a user's input causes ends ``jqlora`` with one line naming the culprit, exit 2.

Each case runs ``jqlora.cli.main`` on a workspace of files (a tiny model, data,
an adapter, a non-empty output folder) and asserts: exit status 2, exactly one
line on stderr besides progress bars, no traceback, the culprit named, and no
file in the workspace created, changed or removed.
"""

import json
import pathlib
import re
import shutil

import pytest
import yaml
from training.toy import char_tokenizer, write_reverse_task

from jqlora.cli import main

_DATA = pathlib.Path(__file__).parent / "data" / "hf"
_PROGRESS = re.compile(r"[\w ]+:\s+\d+%\|[^\r\n]*?\]")  # a tqdm bar (one refresh of it)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
  """The workspace: every file a case names."""
  t = tmp_path_factory.mktemp("ws")
  model = t / "model"
  shutil.copytree(_DATA / "tiny-llama" / "base", model)
  tok = char_tokenizer()
  tok.pad_token = "<unk>"  # pad != EOS: no warning line
  tok.save_pretrained(model)
  write_reverse_task(t / "train.jsonl", 8)
  (t / "latin1.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
  (t / "bad_line.jsonl").write_text('{"text": "a"}\n{"text": \n')
  (t / "no_output.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "x"}\n')
  _write_format_cases(t)
  (t / "afile").write_text("not a folder")
  (t / "empty").mkdir()
  garbled = t / "garbled_model"  # tokenizer fine, config.json not JSON
  shutil.copytree(model, garbled)
  (garbled / "config.json").write_text("{not json")
  misshapen = t / "misshapen_model"  # the config says wider layers than the weights have
  shutil.copytree(model, misshapen)
  cfg = json.loads((model / "config.json").read_text())
  wider = {**cfg, "intermediate_size": 2 * cfg["intermediate_size"]}
  (misshapen / "config.json").write_text(json.dumps(wider))
  (t / "out").mkdir()
  (t / "out" / "notes.txt").write_text("the user's own file")
  (t / "bad.yaml").write_text("lora_r: [1,\n")
  return t


def _write_format_cases(t):
  """Bad records and files of each dataset format and file type (tests/training/test_records.py)."""
  import datasets
  from training.test_records import write_dataset

  turns = lambda *pairs: {"conversations": [{"from": f, "value": v} for f, v in pairs]}
  write_dataset(t, "bad_role", [turns(("human", "u"), ("bot", "a"))], "jsonl")
  write_dataset(t, "empty_conv", [{"conversations": []}], "json")
  write_dataset(t, "mixed", [{"instruction": "a", "output": "b"}, {"text": "t"}], "jsonl")
  write_dataset(t, "pref", [{"prompt": "p", "chosen": "a", "rejected": "b"}], "jsonl")
  write_dataset(t, "eval_bad", [{"instruction": "a", "output": "b"}, {"instruction": "x"}], "parquet")
  datasets.DatasetDict({"test": datasets.Dataset.from_list([{"text": "a"}])}).save_to_disk(str(t / "dd"))
  (t / "corrupt.parquet").write_bytes(b"PAR1 garbage")
  (t / "missing_col.csv").write_text("instruction,input\nrev,abc\n")
  (t / "data.txt").write_text('{"text": "a"}\n')


def _yaml(ws, name, **kw):
  values = dict(base_model=str(ws / "model"), dataset=str(ws / "train.jsonl"), dtype="float32",
                lora_r=4, sequence_len=48, max_steps=1, output_dir=str(ws / "out"))
  values.update(kw)
  path = ws / "configs" / f"{name}.yaml"
  path.parent.mkdir(exist_ok=True)
  path.write_text(yaml.safe_dump(values))
  return str(path)


def _train(**kw):
  return lambda ws, name: ["train", "--config", _yaml(ws, name, **kw)]


def _ws(name):
  return lambda ws: str(ws / name)


slow = pytest.mark.slow
ADAPTER, QWEN_ADAPTER = str(_DATA / "tiny-llama" / "adapter"), str(_DATA / "tiny-qwen2" / "adapter")
_GEN = ["generate", "--model", "{model}", "--prompt", "hi"]

#: name -> (argv builder, a regex the error line must match)
CASES = [
    ("yaml_not_valid", lambda ws, n: ["train", "--config", str(ws / "bad.yaml")],
     r"bad\.yaml:2:1: not valid YAML: expected the node content"),
    ("config_missing", lambda ws, n: ["train", "--config", str(ws / "nope.yaml")],
     r"config file .*nope\.yaml does not exist"),
    ("config_unknown_key", _train(lora_rank=4), r"unknown config key 'lora_rank'; did you mean 'lora_r'"),
    ("config_wrong_type", _train(lora_r="four"), r"lora_r must be int, got 'four'"),
    ("override_bad", lambda ws, n: ["train", "--config", _yaml(ws, n), "max_steps=x"],
     r"override max_steps=x"),
    ("dataset_missing", _train(dataset="nope.jsonl"), r"dataset file .*nope\.jsonl does not exist"),
    ("dataset_latin1", _train(dataset="../latin1.jsonl"),
     r"latin1\.jsonl:1: not UTF-8 text \(byte 0xe9\)"),
    ("dataset_bad_json_line", _train(dataset="../bad_line.jsonl"), r"bad_line\.jsonl:2: not valid JSON"),
    ("dataset_missing_field", _train(dataset="../no_output.jsonl"),
     r"no_output\.jsonl:2: expected a string 'output'"),
    ("sharegpt_unknown_role", _train(dataset="../bad_role.jsonl"),
     r"bad_role\.jsonl:1: conversations\[1\]\.from: unknown role 'bot'; expected one of human"),
    ("sharegpt_empty_conversation", _train(dataset="../empty_conv.json"),
     r"empty_conv\.json row 1: expected 'conversations': a non-empty list .* got an empty list"),
    ("dataset_mixed_formats", _train(dataset="../mixed.jsonl"),
     r"mixed\.jsonl:2: a text record \(keys \['text'\]\), but line 1 is alpaca"),
    ("preference_records_in_sft", _train(dataset="../pref.jsonl"),
     r"pref\.jsonl:1: preference records \(chosen/rejected\) train with method: dpo"),
    ("eval_dataset_missing_field", _train(eval_dataset="../eval_bad.parquet"),
     r"eval_bad\.parquet row 2: expected a string 'output', got nothing"),
    ("parquet_corrupt", _train(dataset="../corrupt.parquet"),
     r"corrupt\.parquet: cannot be read as a PARQUET file: .*magic bytes"),
    ("csv_missing_column", _train(dataset="../missing_col.csv", dataset_type="alpaca"),
     r"missing_col\.csv row 1: expected a string 'output', got nothing \(alpaca format"),
    ("dataset_dict_without_train", _train(dataset="../dd"),
     r"dd: this DatasetDict folder has no 'train' split \(it has test\)"),
    ("dataset_unknown_file_type", _train(dataset="../data.txt"),
     r"data\.txt: unknown dataset file type '\.txt'; expected \.jsonl"),
    ("model_missing", _train(base_model="/nonexistent/model"), r"/nonexistent/model not found"),
    ("model_empty_folder", _train(base_model="../empty"), r"empty: no tokenizer files"),
    pytest.param("model_config_not_json", _train(base_model="../garbled_model"),
                 r"base_model: .*garbled_model/config\.json' is not a valid JSON", marks=slow),
    pytest.param("model_misshapen", _train(base_model="../misshapen_model"),
                 r"base_model .*misshapen_model.*has shape", marks=slow),
    ("output_dir_is_a_file", _train(output_dir="../afile"),
     r"output_dir .*afile is a file; expected a folder"),
    ("output_dir_under_a_file", _train(output_dir="../afile/run"), r"output_dir .*afile is a file"),
    ("output_dir_cannot_be_made", _train(output_dir="/proc/jqlora-run"),
     r"output_dir /proc/jqlora-run: cannot"),
    pytest.param("targets_match_nothing", _train(lora_target_modules=["nothing_proj"]),
                 r"lora_target_modules .*matched no linear layer", marks=slow),
    ("gen_model_missing", lambda ws, n: ["generate", "--model", str(ws / "nope"), "--prompt", "hi"],
     r"--model: .*nope not found"),
    pytest.param("gen_adapter_missing", lambda ws, n: [*_GEN, "--adapter", str(ws / "nope")],
                 r"--adapter: .*nope/adapter_config\.json not found", marks=slow),
    pytest.param("gen_adapter_empty", lambda ws, n: [*_GEN, "--adapter", str(ws / "empty")],
                 r"--adapter: .*adapter_config\.json not found", marks=slow),
    pytest.param("gen_adapter_misshapen", lambda ws, n: [*_GEN, "--adapter", QWEN_ADAPTER],
                 r"--adapter: .*do not fit", marks=slow),
    ("gen_negative_tokens", lambda ws, n: [*_GEN, "--max-new-tokens", "-1"],
     r"--max-new-tokens must be >= 0"),
    ("gen_empty_prompt", lambda ws, n: ["generate", "--model", "{model}", "--prompt", " "],
     r"--prompt must not be empty"),
    ("export_out_is_a_file", lambda ws, n: ["export", "--model", "{model}", "--adapter", ADAPTER,
                                            "--out", str(ws / "afile")], r"--out .*afile is a file"),
    pytest.param("export_adapter_misshapen",
                 lambda ws, n: ["export", "--model", "{model}", "--adapter", QWEN_ADAPTER,
                                "--out", str(ws / "out")], r"--adapter: .*do not fit", marks=slow),
    ("export_merge_into_alone", lambda ws, n: ["export", "--model", "{model}", "--adapter", ADAPTER,
                                               "--out", str(ws / "out"), "--merge-into", "original"],
     r"--merge-into .* add --merged"),
    ("plan_yaml_not_valid", lambda ws, n: ["plan", "--config", str(ws / "bad.yaml")],
     r"bad\.yaml:2:1: not valid YAML"),
    ("plan_config_missing", lambda ws, n: ["plan", "--config", str(ws / "nope.yaml")],
     r"config file .*nope\.yaml does not exist"),
    ("plan_memory_not_a_size", lambda ws, n: ["plan", "--model", "{model}", "--memory-per-device", "lots"],
     r"memory size 'lots': expected a number with a unit"),
    ("plan_model_missing", lambda ws, n: ["plan", "--model", str(ws / "nope")],
     r"nope not found: expected a Hugging Face model folder"),
]


def _snapshot(root):
  return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
          for p in sorted(root.rglob("*")) if "configs" not in p.parts}


@pytest.mark.parametrize("name, argv, expected", CASES, ids=[
    c.values[0] if hasattr(c, "values") else c[0] for c in CASES])
def test_input_errors_are_one_line_and_exit_2(ws, capsys, name, argv, expected):
  argv = [a.replace("{model}", str(ws / "model")) for a in argv(ws, name)]
  before = _snapshot(ws)
  capsys.readouterr()
  try:
    rc = main(argv)
  except SystemExit as e:  # argparse's way (plan's parser): one line, then exit 2
    rc = e.code
  assert rc == 2
  err = capsys.readouterr().err
  lines = [l for l in re.split(r"[\r\n]+", _PROGRESS.sub("", err)) if l.strip()]
  assert len(lines) == 1, err
  assert "Traceback" not in err
  assert lines[0].startswith(f"jqlora {argv[0]}: error: ")
  assert re.search(expected, lines[0]), lines[0]
  assert _snapshot(ws) == before  # nothing created, changed or removed

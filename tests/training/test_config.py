"""Config loading: flat YAML keys, overrides, and errors that name the key."""

import pytest

from jqlora.training.config import ConfigError, load_config, parse_overrides


@pytest.fixture
def files(tmp_path):
  (tmp_path / "train.jsonl").write_text('{"text": "hi"}\n')
  cfg = tmp_path / "run.yaml"
  cfg.write_text("dataset: train.jsonl\nlora_r: 16\nlearning_rate: 1\nlr_scheduler: linear\n")
  return tmp_path, cfg


def test_yaml_overrides_and_relative_paths(files):
  tmp_path, cfg = files
  c = load_config(cfg, parse_overrides(["lora_r=32", "lora_target_modules=[q_proj, v_proj]",
                                        "max_steps=null"]))
  assert c.lora_r == 32 and c.learning_rate == 1.0 and isinstance(c.learning_rate, float)
  assert c.lora_target_modules == ["q_proj", "v_proj"] and c.max_steps is None
  assert c.dataset == str(tmp_path / "train.jsonl") and c.lr_scheduler == "linear"
  assert c.tokens_per_step == c.micro_batch_size * c.gradient_accumulation_steps * c.sequence_len


def test_unknown_key_suggests_the_nearest(files):
  tmp_path, cfg = files
  cfg.write_text(cfg.read_text() + "learning_rat: 0.1\n")
  with pytest.raises(ConfigError, match=r"run\.yaml: unknown config key 'learning_rat'; "
                                        r"did you mean 'learning_rate'"):
    load_config(cfg)
  with pytest.raises(ConfigError, match="did you mean 'lora_alpha'"):
    parse_overrides(["lora_alhpa=3"])
  with pytest.raises(ConfigError, match="not of the form key=value"):
    parse_overrides(["lora_r"])


@pytest.mark.parametrize("key,value,expected", [
    ("lora_r", "eight", "lora_r must be int"),
    ("sample_packing", "yes please", "sample_packing must be bool"),
    ("lr_scheduler", "step", "lr_scheduler must be 'constant' | 'linear' | 'cosine'"),
    ("max_steps", 2.5, "max_steps must be int | null"),
    ("lora_r", 0, "lora_r must be >= 1"),
    ("gradient_checkpointing", "sometimes", "gradient_checkpointing must be bool | 'selective'"),
])
def test_wrong_values_name_the_key_and_the_type(files, key, value, expected):
  _, cfg = files
  with pytest.raises(ConfigError, match=expected.replace("|", r"\|")):
    load_config(cfg, {key: value})


def test_missing_dataset_file_and_missing_key(files):
  tmp_path, cfg = files
  with pytest.raises(ConfigError, match=r"dataset file .*nope\.jsonl does not exist"):
    load_config(cfg, {"dataset": "nope.jsonl"})
  cfg.write_text("lora_r: 4\n")
  with pytest.raises(ConfigError, match="dataset is required"):
    load_config(cfg)
  with pytest.raises(ConfigError, match="does not exist"):
    load_config(tmp_path / "missing.yaml")


def test_gradient_checkpointing_takes_a_bool_or_selective(files):
  _, cfg = files
  assert load_config(cfg, parse_overrides(["gradient_checkpointing=selective"])) \
      .gradient_checkpointing == "selective"
  assert load_config(cfg, parse_overrides(["gradient_checkpointing=true"])) \
      .gradient_checkpointing is True


def test_loss_chunk_size_must_be_positive_or_null():
  from jqlora.training.config import ConfigError, TrainConfig
  assert TrainConfig(dataset="x.jsonl", loss_chunk_size=512).loss_chunk_size == 512
  assert TrainConfig(dataset="x.jsonl").loss_chunk_size is None
  with pytest.raises(ConfigError, match="loss_chunk_size must be >= 1 or null"):
    TrainConfig(dataset="x.jsonl", loss_chunk_size=0)


def test_paths_on_the_command_line_resolve_against_the_current_directory(files, tmp_path,
                                                                         monkeypatch):
  folder, cfg = files
  cfg.write_text(cfg.read_text() + "output_dir: runs/a\n")
  cwd = tmp_path / "elsewhere"
  cwd.mkdir()
  (cwd / "mine.jsonl").write_text('{"text": "hi"}\n')
  monkeypatch.chdir(cwd)
  c = load_config(cfg, parse_overrides(["dataset=mine.jsonl", "output_dir=runs/a"]))
  assert c.dataset == str(cwd / "mine.jsonl") and c.output_dir == str(cwd / "runs" / "a")
  c = load_config(cfg)  # the same keys in the YAML: against the YAML's folder
  assert c.dataset == str(folder / "train.jsonl") and c.output_dir == str(folder / "runs" / "a")
  (cwd / "train.jsonl").unlink(missing_ok=True)
  with pytest.raises(ConfigError, match=r"^command line: override dataset=train\.jsonl: dataset "
                                        r"file .*elsewhere/train\.jsonl does not exist$"):
    load_config(cfg, parse_overrides(["dataset=train.jsonl"]))


def test_a_url_output_dir_is_kept_as_given(files):
  _, cfg = files
  cfg.write_text(cfg.read_text() + "output_dir: gs://bucket/runs/a\n")
  assert load_config(cfg).output_dir == "gs://bucket/runs/a"
  c = load_config(cfg, parse_overrides(["output_dir=gs://other/b"]))
  assert c.output_dir == "gs://other/b"


@pytest.mark.parametrize("text,key,expected", [
    ("2e-4", "learning_rate", 2e-4), ("5E-3", "learning_rate", 5e-3),
    ("-1e-3", "weight_decay", -1e-3), ("1e4", "max_steps", 10000),
    ("1.0e4", "save_steps", 10000), ("3e-1", "max_grad_norm", 0.3), ("1e1", "lora_alpha", 10.0),
])
def test_numbers_parse_as_written_in_overrides_and_in_yaml(files, text, key, expected):
  tmp_path, cfg = files
  from_cli = getattr(load_config(cfg, parse_overrides([f"{key}={text}"])), key)
  cfg.write_text(cfg.read_text() + f"{key}: {text}\n")  # YAML 1.1 reads these as strings
  from_yaml = getattr(load_config(cfg), key)
  assert from_cli == from_yaml == expected and type(from_cli) is type(from_yaml) is type(expected)


def test_an_int_key_takes_a_whole_number_only(files):
  _, cfg = files
  with pytest.raises(ConfigError, match=r"override max_steps=1\.5e0: max_steps must be int \| null, "
                                        r"got '1\.5e0'$"):
    load_config(cfg, parse_overrides(["max_steps=1.5e0"]))


def test_comma_lists_wherever_a_list_is(files):
  _, cfg = files
  c = load_config(cfg, parse_overrides(["lora_target_modules=q_proj,v_proj"]))
  assert c.lora_target_modules == ["q_proj", "v_proj"]
  assert load_config(cfg, {"lora_target_modules": "q_proj, v_proj,"}).lora_target_modules == \
      ["q_proj", "v_proj"]
  cfg.write_text(cfg.read_text() + "lora_target_modules: q_proj, k_proj, o_proj\n")
  assert load_config(cfg).lora_target_modules == ["q_proj", "k_proj", "o_proj"]
  # one name and regular expressions stay strings
  for text in ("all-linear", r".*\.(q|v)_proj", "layers[.][0-9]{1,2}[.].*q_proj"):
    assert load_config(cfg, {"lora_target_modules": text}).lora_target_modules == text


def test_an_override_error_names_the_override_not_the_file(files):
  tmp_path, cfg = files
  for items, expected in {
      ("lora_r=abc",): "command line: override lora_r=abc: lora_r must be int, got 'abc'",
      ("lora_r=0",): "command line: override lora_r=0: lora_r must be >= 1, got 0",
      ("sample_packing=maybe",): "command line: override sample_packing=maybe: sample_packing "
                                 "must be bool, got 'maybe'",
      ("lora_alhpa=3",): "command line: override lora_alhpa=3: unknown config key 'lora_alhpa'; "
                         "did you mean 'lora_alpha'?",
      ("lora_target_modules=[q_proj",): "command line: override lora_target_modules=[q_proj: not a "
                                        "valid value",
      ("mesh.data=0",): "command line: override mesh.data=0: mesh.data must be >= 1, got 0",
  }.items():
    with pytest.raises(ConfigError) as e:
      load_config(cfg, parse_overrides(list(items)))
    assert str(e.value).startswith(expected) and "\n" not in str(e.value), str(e.value)
  cfg.write_text(cfg.read_text().replace("lora_r: 16", "lora_r: abc"))
  with pytest.raises(ConfigError, match=r"^.*run\.yaml: lora_r must be int, got 'abc'$"):
    load_config(cfg)


def test_shipped_configs_detect_the_dataset_format():
  import pathlib

  from jqlora.training.data import detect_format, read_jsonl

  root = pathlib.Path(__file__).parents[2]
  for name in ("smollm2-135m-demo", "llama-3.1-8b-qlora", "mistral-7b-qlora"):
    c = load_config(root / "configs" / f"{name}.yaml")
    assert c.dataset_type == "auto", name
    for path in filter(None, (c.dataset, c.eval_dataset)):
      assert {detect_format(r) for r in read_jsonl(path)} == {"alpaca"}, path  # as it pinned


def test_a_format_error_names_the_detected_format_and_the_key_to_set(tmp_path):
  from jqlora.training.data import DataError, load_dataset

  from .toy import char_tokenizer

  data = tmp_path / "x.jsonl"
  data.write_text('{"instruction": "a", "output": "b"}\n\n{"messages": []}\n')
  with pytest.raises(DataError) as e:
    load_dataset(data, char_tokenizer(), sequence_len=16)
  assert str(e.value) == (f"{data}:3: a chat record (keys ['messages']), but line 1 is alpaca: a dataset "
                          "holds one format; convert the records or split the file")
  with pytest.raises(DataError, match=r"x\.jsonl:1: expected 'messages'.* \(chat format, as "
                                      r"dataset_type says\); set dataset_type"):
    load_dataset(data, char_tokenizer(), fmt="chat", sequence_len=16)

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


def test_loss_chunk_size_must_be_positive_or_null():
  from jqlora.training.config import ConfigError, TrainConfig
  assert TrainConfig(dataset="x.jsonl", loss_chunk_size=512).loss_chunk_size == 512
  assert TrainConfig(dataset="x.jsonl").loss_chunk_size is None
  with pytest.raises(ConfigError, match="loss_chunk_size must be >= 1 or null"):
    TrainConfig(dataset="x.jsonl", loss_chunk_size=0)

"""The training configuration: flat, axolotl-like YAML keys with ``key=value`` overrides.

A config file is one mapping of the keys of :class:`TrainConfig`. Relative paths
(datasets, output directory, a local base model) are resolved against the folder
of the YAML file when written in it, and against the current directory when given
on the command line (``jqlora train --config configs/x.yaml dataset=my.jsonl``
reads ``./my.jsonl``). The ``mesh`` and ``distributed`` sections are written either
as nested mappings (``mesh: {data: 2, tensor: 2}``) or as dotted keys
(``mesh.data: 2``, and ``mesh.data=2`` on the command line).

Values are read as users write them: numbers such as ``2e-4``, ``1e4`` or ``5E-3``
(which YAML 1.1 reads as strings) are numbers for float and int keys (an int key
takes a whole number only), and a list key also takes a comma list
(``lora_target_modules=q_proj,v_proj``). Every error is one line that names its
culprit, the file and key or the override (``command line: override lora_r=abc:
lora_r must be int, got 'abc'``), and says what was expected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import pathlib
import re
import types
import typing
from collections.abc import Iterator
from typing import Any, Literal

import yaml

from jqlora.parallel.config import ConfigError, DistributedConfig, MeshConfig

__all__ = ["ConfigError", "DistributedConfig", "MeshConfig", "TrainConfig", "blame", "load_config",
           "parse_overrides"]


@contextlib.contextmanager
def blame(culprit: str) -> Iterator[None]:
  """Inside, an error that input causes becomes ``ConfigError("culprit: message")``.

  For code that reads what the user named (a model or adapter folder, an output
  path): its ValueError, KeyError, OSError or NotImplementedError carries a good
  message; this adds which setting or flag it came from. A ConfigError passes
  through unchanged.
  """
  try:
    yield
  except ConfigError:
    raise
  except (ValueError, KeyError, OSError, NotImplementedError) as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    raise ConfigError(f"{culprit}: {message}") from None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Every setting of ``jqlora train``; field names are the YAML keys."""

  # model
  base_model: str = "SmolLM2-135M-Instruct"
  load_in_4bit: bool = True
  bnb_4bit_quant_type: Literal["nf4", "fp4", "int4"] = "nf4"  # load_in_4bit's code table (bnb's key)
  dtype: Literal["bfloat16", "float32"] = "bfloat16"
  gradient_checkpointing: bool | Literal["selective"] = False  # Llama.remat
  loss_chunk_size: int | None = None
  # adapter
  lora_r: int = 8
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_target_modules: str | list[str] = "all-linear"
  use_rslora: bool = False
  use_dora: bool = False
  finetune: Literal["lora", "full"] = "lora"  # full: every float weight trains, no adapters
  method: Literal["sft", "dpo"] = "sft"  # dpo: preference pairs, reference = the base (adapters off)
  beta: float = 0.1  # DPO's KL strength (TRL's name)
  dpo_loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"  # TRL's loss_type
  # data
  dataset: str = ""
  dataset_type: Literal["auto", "alpaca", "chat", "sharegpt", "prompt_completion", "text",
                        "preference"] = "auto"  # auto: from the first record's keys
  eval_dataset: str | None = None
  val_set_size: float = 0.0
  sequence_len: int = 512
  sample_packing: bool = False
  train_on_inputs: bool = False
  # optimisation
  micro_batch_size: int = 1
  gradient_accumulation_steps: int = 1
  num_epochs: float = 1.0
  max_steps: int | None = None
  learning_rate: float = 2e-4
  lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
  warmup_steps: int = 0
  weight_decay: float = 0.0
  adam_beta1: float = 0.9
  adam_beta2: float = 0.999
  adam_epsilon: float = 1e-8
  max_grad_norm: float | None = 1.0
  max_nonfinite_steps: int = 10  # consecutive non-finite updates skipped before the run stops
  # run
  output_dir: str = "outputs"
  save_steps: int | None = None
  save_total_limit: int | None = 2
  resume_from_checkpoint: bool = True
  resume_changed_settings: bool = False  # resume a checkpoint whose run had other settings
  eval_steps: int | None = None
  eval_batch_size: int = 8
  logging_steps: int = 1
  logging: list[Literal["jsonl", "tensorboard"]] = dataclasses.field(  # metrics.jsonl is always
      default_factory=lambda: ["jsonl"])  # written; tensorboard adds output_dir/tensorboard/
  seed: int = 0
  # held-out generation check (exact match of the reference answer)
  eval_exact_match: bool = False
  eval_max_new_tokens: int = 32
  eval_print_samples: int = 3
  eval_merged_copy: bool = False  # decode from a merged float copy: faster, more memory
  # scale-out
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)

  def __post_init__(self) -> None:
    positive = ("lora_r", "sequence_len", "micro_batch_size", "gradient_accumulation_steps",
                "eval_batch_size", "logging_steps", "eval_max_new_tokens", "max_nonfinite_steps")
    for key in positive:
      if getattr(self, key) < 1:
        raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
    for key in ("max_steps", "save_steps", "eval_steps", "loss_chunk_size"):
      value = getattr(self, key)
      if value is not None and value < 1:
        raise ConfigError(f"{key} must be >= 1 or null, got {value}")
    if not 0.0 <= self.lora_dropout < 1.0:
      raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
    if self.val_set_size < 0:
      raise ConfigError(f"val_set_size must be >= 0 (a fraction < 1 or a count), got {self.val_set_size}")
    if not self.dataset:
      raise ConfigError("dataset is required: a .jsonl, .json, .parquet or .csv file or a save_to_disk "
                        "folder (see configs/README.md for the formats)")
    if "jsonl" not in self.logging:
      raise ConfigError(f"logging must include jsonl (resume and jqlora plot read metrics.jsonl), "
                        f"got {self.logging}")
    if self.finetune == "full" and self.load_in_4bit:
      raise ConfigError("finetune: full needs a float base: set load_in_4bit: false")
    if self.beta <= 0:
      raise ConfigError(f"beta must be > 0, got {self.beta}")
    if self.method == "dpo":
      self._check_dpo()

  def _check_dpo(self) -> None:
    """Settings ``method: dpo`` cannot honour, each refused by name."""
    refused = {"finetune": (self.finetune == "full", "full: its reference model is the base with the "
                            "LoRA adapters switched off; use finetune: lora"),
               "sample_packing": (self.sample_packing, "true: each sequence of a pair takes its own row"),
               "loss_chunk_size": (self.loss_chunk_size is not None, f"{self.loss_chunk_size}: the DPO "
                                   "loss computes whole logits; set loss_chunk_size: null"),
               "eval_exact_match": (self.eval_exact_match, "true: a DPO run reports held-out "
                                    "preference accuracy instead"),
               "dataset_type": (self.dataset_type not in ("auto", "preference"), f"{self.dataset_type}: "
                                "DPO reads preference records; use auto or preference")}
    for key, (bad, why) in refused.items():
      if bad:
        raise ConfigError(f"{key} is not supported with method: dpo ({key}: {why})")

  @property
  def tokens_per_step(self) -> int:
    """Token slots per optimizer step: micro batch x accumulation x sequence length."""
    return self.micro_batch_size * self.gradient_accumulation_steps * self.sequence_len


#: Sections: a nested mapping in YAML, dotted keys (``mesh.data``) everywhere.
_SECTIONS: dict[str, type] = {"mesh": MeshConfig, "distributed": DistributedConfig}
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name not in _SECTIONS}
_KEYS = list(_FIELDS) + [f"{name}.{f.name}" for name, cls in _SECTIONS.items()
                         for f in dataclasses.fields(cls)]
_PATH_KEYS = ("dataset", "eval_dataset", "output_dir")


def _key_type(key: str) -> Any:
  section, _, sub = key.rpartition(".")
  return typing.get_type_hints(_SECTIONS[section] if section else TrainConfig)[sub]


def _type_name(tp: Any) -> str:
  if typing.get_origin(tp) is Literal:
    return " | ".join(repr(a) for a in typing.get_args(tp))
  if typing.get_origin(tp) in (typing.Union, types.UnionType):
    return " | ".join(_type_name(a) for a in typing.get_args(tp))
  if typing.get_origin(tp) is list:
    return f"list[{_type_name(typing.get_args(tp)[0])}]"
  return "null" if tp is type(None) else tp.__name__


#: A number as users write it; YAML 1.1 leaves ``2e-4``, ``1e4``, ``1.0e4`` as strings.
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
#: A comma list of names (``q_proj, v_proj``), not a regex such as ``x{1,3}``.
_NAME_LIST = re.compile(r"[\w.\-]+(?:\s*,\s*[\w.\-]+)+\s*,?")


def _coerce(value: Any, tp: Any) -> Any:
  """``value`` as type ``tp``, else raises TypeError.

  Ints are accepted for floats, whole numbers for ints, number strings
  (``"2e-4"``) for both, and a comma string for a list.
  """
  origin = typing.get_origin(tp)
  if origin is Literal:
    if value in typing.get_args(tp):
      return value
    raise TypeError
  if origin in (typing.Union, types.UnionType):
    options = typing.get_args(tp)
    if isinstance(value, str) and _NAME_LIST.fullmatch(value.strip()):
      options = sorted(options, key=lambda o: typing.get_origin(o) is not list)  # lists first
    for option in options:
      try:
        return _coerce(value, option)
      except TypeError:
        pass
    raise TypeError
  if origin is list:
    if isinstance(value, str):
      value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list):
      return [_coerce(v, typing.get_args(tp)[0]) for v in value]
    raise TypeError
  if tp is type(None):
    if value is None:
      return None
    raise TypeError
  if tp in (int, float) and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
    value = float(value)
  if tp is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if tp is int and isinstance(value, float) and value.is_integer():
    return int(value)
  if tp is bool and not isinstance(value, bool):
    raise TypeError
  if tp is int and isinstance(value, bool):
    raise TypeError
  if isinstance(value, tp):
    return value
  raise TypeError


def _render(value: Any) -> str:
  """An override's value as it would be typed (``lora_r=abc``, ``max_steps=null``)."""
  if value is None:
    return "null"
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, list):
    return ",".join(map(_render, value))
  return str(value)


def _check_key(key: str, where: str) -> None:
  if key not in _KEYS:
    near = difflib.get_close_matches(key, _KEYS, n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else f"; known keys: {', '.join(_KEYS)}"
    raise ConfigError(f"{where}: unknown config key {key!r}{hint}")


def _flatten(loaded: dict[Any, Any], where: str) -> dict[str, Any]:
  """A YAML mapping with nested sections (``mesh: {data: 2}``) as dotted keys (``mesh.data``)."""
  out: dict[str, Any] = {}
  for key, value in loaded.items():
    key = str(key)
    if key not in _SECTIONS:
      out[key] = value
      continue
    if value is not None and not isinstance(value, dict):
      subkeys = ", ".join(f.name for f in dataclasses.fields(_SECTIONS[key]))
      raise ConfigError(f"{where}: {key} must be a mapping with keys {subkeys}, got {value!r}")
    out.update({f"{key}.{sub}": v for sub, v in (value or {}).items()})
  return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
  """``["lora_r=16", "mesh.data=2"]`` -> dict, values parsed as YAML scalars.

  Raises:
    ConfigError: for an item without ``=``, an unknown key or a value that is not YAML;
      the message names the override.
  """
  out: dict[str, Any] = {}
  for item in items:
    key, sep, raw = item.partition("=")
    if not sep or not key:
      raise ConfigError(f"command line: override {item!r} is not of the form key=value")
    _check_key(key, f"command line: override {item}")
    try:
      out[key] = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as e:
      problem = getattr(e, "problem", None) or str(e).splitlines()[0]
      raise ConfigError(f"command line: override {item}: not a valid value ({problem})") from None
  return out


def load_config(path: str | pathlib.Path | None, overrides: dict[str, Any] | None = None,
                *, check_files: bool = True) -> TrainConfig:
  """Reads a YAML config, applies overrides and validates every value.

  Args:
    path: the YAML file (None: only ``overrides``).
    overrides: ``key -> value`` applied over the file (``parse_overrides``), as
      given on the command line: their relative paths are resolved against the
      current directory, those of the file against the file's folder.
    check_files: require the dataset files to exist.

  Returns:
    The validated ``TrainConfig`` with file paths made absolute.

  Raises:
    ConfigError: unknown key (with the nearest known one), wrong type, bad
      value or missing dataset file; the message names the file and key, or
      the override (``command line: override lora_r=abc: ...``).
  """
  raw: dict[str, Any] = {}
  where = "command line"
  file_base = cwd = pathlib.Path.cwd()
  if path is not None:
    path = pathlib.Path(path)
    where = str(path)
    if not path.is_file():
      raise ConfigError(f"config file {path} does not exist")
    try:
      loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:  # one line: the problem and where
      mark = getattr(e, "problem_mark", None)
      at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
      problem = " ".join(str(getattr(e, "problem", None) or e).split())
      raise ConfigError(f"{path}{at}: not valid YAML: {problem}") from None
    if loaded is None:
      loaded = {}
    if not isinstance(loaded, dict):
      raise ConfigError(f"{path}: expected a mapping of config keys, got {type(loaded).__name__}")
    loaded = _flatten(loaded, where)
    for key in loaded:
      _check_key(key, where)
    raw.update(loaded)
    file_base = path.resolve().parent
  overridden: set[str] = set()
  for key, value in (overrides or {}).items():
    _check_key(key, f"command line: override {key}={_render(value)}")
    raw[key] = value
    overridden.add(key)

  def culprit(key: str) -> str:
    return f"command line: override {key}={_render(raw[key])}" if key in overridden else where

  def base(key: str) -> pathlib.Path:
    return cwd if key in overridden else file_base

  values: dict[str, Any] = {}
  for key, value in raw.items():
    tp = _key_type(key)
    try:
      values[key] = _coerce(value, tp)
    except TypeError:
      kind = "" if isinstance(value, str) else f" ({type(value).__name__})"
      raise ConfigError(f"{culprit(key)}: {key} must be {_type_name(tp)}, got {value!r}{kind}") from None
  for key in _PATH_KEYS:
    if values.get(key) and "://" not in values[key]:  # a URL (gs://...) goes to etils.epath as is
      values[key] = str((base(key) / values[key]).resolve())
  model = values.get("base_model")
  if model and (model.startswith(".") or "/" in model) and (base("base_model") / model).exists():
    values["base_model"] = str((base("base_model") / model).resolve())
  sections = {name: {k.partition(".")[2]: values.pop(k) for k in list(values)
                     if k.startswith(name + ".")} for name in _SECTIONS}
  try:
    sections = {name: _SECTIONS[name](**kw) for name, kw in sections.items()}
    config = TrainConfig(**values, **sections)
  except ConfigError as e:
    key = str(e).split(" ", 1)[0]  # the messages start with the key: "lora_r must be >= 1"
    raise ConfigError(f"{culprit(key)}: {e}") from None
  if check_files:
    for key in ("dataset", "eval_dataset"):
      file = getattr(config, key)
      if file and not pathlib.Path(file).exists():  # a file, or a save_to_disk folder
        raise ConfigError(f"{culprit(key)}: {key} file {file} does not exist")
  return config

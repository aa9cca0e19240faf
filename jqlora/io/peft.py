"""LoRA adapters in PEFT's on-disk format, both ways.

``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and ``….lora_B.weight``
``[out, r]`` (torch layouts), and for DoRA (``"use_dora": true``)
``….lora_magnitude_vector`` ``[out]``, as ``peft.PeftModel.save_pretrained`` writes them.
Several named adapters use PEFT's layout: ``"default"`` in the folder itself, any other
adapter ``name`` in its subfolder ``name/``.
"""

from __future__ import annotations

import collections
import json
import math
import os
import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from jqlora.nn import Linear, LoRALinear, lora_modules, module_names
from jqlora.nn import lora as lora_lib
from jqlora.nn.adapters import (
  active_adapter,
  adapter_weights,
  add_adapter,
  list_adapters,
  set_adapter_weights,
)

__all__ = ["save_adapter", "load_adapter", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_MAGNITUDE = "lora_magnitude_vector"
_UNSUPPORTED = {"fan_in_fan_out": False, "modules_to_save": None,
                "layers_to_transform": None, "trainable_token_indices": None}


def _entries(model: nnx.Module, adapter: str) -> dict[str, tuple[LoRALinear, int]]:
  """PEFT module name -> (module, flat layer index) for every layer that ``adapter`` adapts."""
  out = {}
  for path, m in lora_modules(model):
    ranks = adapter_weights(m, adapter).info.ranks
    for i, name in enumerate(module_names(model, path, m.batch_shape)):
      if ranks[i]:
        out[name] = (m, i)
  return out


def _flat(x, ndim: int = 2) -> np.ndarray:
  """A float32 copy of ``x`` with the stacked axes (all but the last ``ndim``) flattened to one."""
  x = np.array(x, np.float32)
  return x.reshape(-1, *x.shape[x.ndim - ndim:])


def save_adapter(model: nnx.Module, directory: str | os.PathLike, *, adapter_name: str | None = None,
                 base_model_name_or_path: str | None = None,
                 task_type: str | None = "CAUSAL_LM") -> None:
  """Writes the model's adapters as PEFT LoRA (or DoRA) adapters.

  Args:
    model: a model with adapters (``apply_lora``, ``load_adapter``).
    directory: created if needed; gets ``adapter_config.json`` and
      ``adapter_model.safetensors`` of the ``"default"`` adapter, and those of any other
      adapter in a subfolder named after it (PEFT's ``save_pretrained`` layout).
    adapter_name: write only this adapter (PEFT's ``selected_adapters=[adapter_name]``);
      None: every adapter.
    base_model_name_or_path: recorded in the config for PEFT.
    task_type: PEFT task type.

  Raises:
    ValueError: the model has no adapters (or none named ``adapter_name``), or mixes
      settings PEFT keeps per adapter (rsLoRA, DoRA) across modules.
  """
  names = list_adapters(model)
  if not names:
    raise ValueError("save_adapter: the model has no LoRA adapters (call jqlora.apply_lora first)")
  if adapter_name is not None and adapter_name not in names:
    raise ValueError(f"save_adapter: no adapter named {adapter_name!r}; the model has {list(names)}")
  for name in names if adapter_name is None else (adapter_name,):
    out = pathlib.Path(directory)
    _save_one(model, name, out if name == "default" else out / name, base_model_name_or_path,
              task_type)


def _save_one(model: nnx.Module, adapter: str, out: pathlib.Path,
              base_model_name_or_path: str | None, task_type: str | None) -> None:
  """Writes the adapter named ``adapter`` to the folder ``out`` (see ``save_adapter``)."""
  entries = _entries(model, adapter)
  if not entries:
    raise ValueError(f"save_adapter: adapter {adapter!r} adapts no layer")
  use_dora = {m.use_dora for m, _ in entries.values()}
  if len(use_dora) != 1:
    raise ValueError("save_adapter: PEFT needs one use_dora setting for every module")
  tensors, ranks, alphas = {}, {}, {}
  weights = {id(m): adapter_weights(m, adapter) for m, _ in entries.values()}
  flat = {id(m): (_flat(weights[id(m)].a), _flat(weights[id(m)].b),
                  np.asarray(weights[id(m)].scale, np.float32).reshape(-1),
                  _flat(m.lora_magnitude.get_value(), 1) if m.use_dora else None)
          for m, _ in entries.values()}
  for name, (m, i) in entries.items():
    a, b, scale, magnitude = flat[id(m)]
    info = weights[id(m)].info
    r = info.ranks[i]
    tensors[f"{_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a[i, :, :r].T)
    tensors[f"{_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b[i, :r, :].T)
    if magnitude is not None:
      tensors[f"{_PREFIX}{name}.{_MAGNITUDE}"] = magnitude[i]
    ranks[name] = r
    alphas[name] = float(scale[i]) * (math.sqrt(r) if info.use_rslora else r)
  use_rslora = {weights[id(m)].info.use_rslora for m, _ in entries.values()}
  if len(use_rslora) != 1:
    raise ValueError("save_adapter: PEFT needs one use_rslora setting for every module")
  r = collections.Counter(ranks.values()).most_common(1)[0][0]
  alpha = collections.Counter(round(a, 6) for a in alphas.values()).most_common(1)[0][0]
  dropouts = {weights[id(m)].info.dropout for m, _ in entries.values()}
  config = {
      "peft_type": "LORA",
      "task_type": task_type,
      "base_model_name_or_path": base_model_name_or_path,
      "r": r,
      "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
      "lora_dropout": max(dropouts),
      "target_modules": _target_list(model, set(entries)),
      "use_rslora": use_rslora.pop(),
      "rank_pattern": {n: v for n, v in ranks.items() if v != r},
      "alpha_pattern": {n: v for n, v in alphas.items() if not math.isclose(v, alpha, rel_tol=1e-6)},
      "bias": "none",
      "init_lora_weights": True,
      "inference_mode": True,
      "use_dora": use_dora.pop(),
      "fan_in_fan_out": False,
      "modules_to_save": None,
      "layers_to_transform": None,
      "layers_pattern": None,
      "exclude_modules": None,
      "revision": None,
  }
  out.mkdir(parents=True, exist_ok=True)
  (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
  save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})


def _target_list(model: nnx.Module, adapted: set[str]) -> list[str]:
  """Suffixes (``q_proj``) where every linear with that suffix is adapted, else full names."""
  all_linears = set()
  for path, m in nnx.iter_graph(model):
    if isinstance(m, (Linear, nnx.Linear)):
      shape = m.batch_shape if isinstance(m, Linear) else ()
      all_linears.update(module_names(model, tuple(path), shape))
  by_suffix = collections.defaultdict(set)
  for name in all_linears:
    by_suffix[name.rsplit(".", 1)[-1]].add(name)
  targets = []
  for suffix, names in sorted(by_suffix.items()):
    if names <= adapted:
      targets.append(suffix)
    else:
      targets.extend(sorted(names & adapted))
  return targets


def _read_config(path: pathlib.Path) -> lora_lib.LoraConfig:
  file = path / CONFIG_NAME
  if not file.is_file():
    raise FileNotFoundError(f"load_adapter: {file} not found (expected a PEFT adapter folder)")
  try:
    cfg = json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"load_adapter: {file} is not valid JSON: {e}") from None
  if cfg.get("peft_type", "LORA") != "LORA":
    raise ValueError(f"load_adapter: {file}: peft_type {cfg.get('peft_type')!r} is not supported "
                     "(only LORA)")
  for key, default in _UNSUPPORTED.items():
    if cfg.get(key) not in (default, [], {}):
      raise NotImplementedError(f"load_adapter: {file}: {key}={cfg[key]!r} is not supported")
  if cfg.get("bias", "none") != "none":
    raise NotImplementedError(f"load_adapter: {file}: bias={cfg['bias']!r} is not supported")
  for key in ("r", "lora_alpha", "target_modules"):
    if cfg.get(key) is None:
      raise ValueError(f"load_adapter: {file} has no {key!r}")
  try:
    return lora_lib.LoraConfig(
        r=cfg["r"], alpha=cfg["lora_alpha"], dropout=float(cfg.get("lora_dropout") or 0.0),
        target_modules=cfg["target_modules"], use_rslora=bool(cfg.get("use_rslora", False)),
        rank_pattern=cfg.get("rank_pattern") or {}, alpha_pattern=cfg.get("alpha_pattern") or {},
        exclude_modules=cfg.get("exclude_modules"), use_dora=bool(cfg.get("use_dora", False)))
  except (ValueError, TypeError) as e:
    raise ValueError(f"load_adapter: {file}: {e}") from None


def load_adapter(model: nnx.Module, directory: str | os.PathLike, *,
                 rngs: nnx.Rngs | None = None, adapter_name: str | None = None) -> nnx.Module:
  """Loads a PEFT LoRA (or DoRA) adapter into ``model``.

  When the model has no adapters yet they are added from ``adapter_config.json``
  (targets, ranks, alphas, rsLoRA, DoRA, rank/alpha patterns); otherwise the
  existing adapters are filled (a smaller stored rank is zero-padded) and their
  scales set from the file's config. A new ``adapter_name`` is added beside the
  model's adapters (``jqlora.nn.add_adapter``; the active one stays active), an
  existing one is overwritten.

  Args:
    model: the base model the adapter was trained on.
    directory: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``,
      or one whose subfolder ``adapter_name`` holds them (``save_adapter``'s layout).
    rngs: for creating adapters (their values are overwritten); default seed 0.
    adapter_name: the adapter to load into (PEFT's ``load_adapter(adapter_name=)``);
      None: the active one, named ``"default"`` when the model has no adapters.

  Returns:
    ``model``, in place.

  Raises:
    FileNotFoundError: a missing file.
    ValueError: malformed files, an adapter tensor whose module does not exist
      or whose shape does not fit (the module is named), or a DoRA adapter for a
      model with plain LoRA adapters (or the reverse).
  """
  path = pathlib.Path(directory)
  if adapter_name is not None and (path / adapter_name / CONFIG_NAME).is_file():
    path = path / adapter_name
  config = _read_config(path)
  weights_file = path / WEIGHTS_NAME
  if not weights_file.is_file():
    raise FileNotFoundError(f"load_adapter: {weights_file} not found")
  try:
    tensors = load_file(str(weights_file))
  except Exception as e:  # safetensors raises its own error types
    raise ValueError(f"load_adapter: cannot read {weights_file}: {e}") from None
  if not lora_modules(model) or adapter_name not in (None, *list_adapters(model)):
    add_adapter(model, adapter_name or "default", config, rngs=rngs or nnx.Rngs(0))
  adapter_name = adapter_name or active_adapter(model)
  entries = _entries(model, adapter_name)

  pairs: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
  suffixes = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B", f".{_MAGNITUDE}": _MAGNITUDE,
              f".{_MAGNITUDE}.weight": _MAGNITUDE}
  for key, value in tensors.items():
    name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
    name = name.replace(".default.", ".")
    for suffix, part in suffixes.items():
      if name.endswith(suffix):
        pairs[name[:-len(suffix)]][part] = value
        break
    else:
      raise ValueError(f"load_adapter: {weights_file}: unexpected tensor {key!r} (only LoRA "
                       f"lora_A/lora_B weights and DoRA's {_MAGNITUDE} are supported)")
  unknown = sorted(set(pairs) - set(entries))
  if unknown:
    raise ValueError(f"load_adapter: the adapter has weights for module {unknown[0]!r}"
                     f"{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}, which is "
                     f"not an adapted linear of this model; adapted modules are e.g. "
                     f"{sorted(entries)[:4]}")
  missing = sorted(set(entries) - set(pairs))
  if missing:
    raise ValueError(f"load_adapter: the adapter has no weights for module {missing[0]!r}"
                     f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")

  updates = {}
  for name, (m, i) in entries.items():
    pair = pairs[name]
    if m.use_dora != config.use_dora:
      raise ValueError(f"load_adapter: module {name!r} has a {'DoRA' if m.use_dora else 'LoRA'} "
                       f"adapter but {path} holds {'DoRA' if config.use_dora else 'plain LoRA'}")
    expected = {"lora_A", "lora_B", _MAGNITUDE} if m.use_dora else {"lora_A", "lora_B"}
    if set(pair) != expected:
      raise ValueError(f"load_adapter: module {name!r} has {sorted(pair)} in {weights_file}, "
                       f"expected {sorted(expected)}")
    a, b = pair["lora_A"], pair["lora_B"]
    r = a.shape[0]
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != m.in_features or b.shape != (m.out_features, r):
      raise ValueError(
          f"load_adapter: module {name!r}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not "
          f"fit a [{m.out_features}, {m.in_features}] linear (expected [r, {m.in_features}] and "
          f"[{m.out_features}, r])")
    if r > m.rank:
      raise ValueError(f"load_adapter: module {name!r}: adapter rank {r} exceeds the model's "
                       f"LoRA rank {m.rank}")
    magnitude = pair.get(_MAGNITUDE)
    if magnitude is not None and magnitude.shape != (m.out_features,):
      raise ValueError(f"load_adapter: module {name!r}: {_MAGNITUDE} {tuple(magnitude.shape)} does "
                       f"not fit a [{m.out_features}, {m.in_features}] linear (expected "
                       f"[{m.out_features}])")
    if id(m) not in updates:
      old = adapter_weights(m, adapter_name)
      updates[id(m)] = (m, np.zeros_like(_flat(old.a)), np.zeros_like(_flat(old.b)),
                        np.asarray(old.scale, np.float32).reshape(-1).copy(), list(old.info.ranks),
                        _flat(m.lora_magnitude.get_value(), 1) if m.use_dora else None)
    _, fa, fb, scale, ranks, fm = updates[id(m)]
    fa[i, :, :r] = a.T
    fb[i, :r, :] = b.T
    scale[i] = lora_lib.resolve(config, name)[1]
    ranks[i] = r
    if magnitude is not None:
      fm[i] = magnitude
  for m, fa, fb, scale, ranks, fm in updates.values():
    set_adapter_weights(m, adapter_name, fa.reshape(m.lora_a.get_value().shape),
                        fb.reshape(m.lora_b.get_value().shape), scale.reshape(m.batch_shape), ranks)
    if fm is not None:
      shape, mdtype = m.lora_magnitude.get_value().shape, m.lora_magnitude.get_value().dtype
      m.lora_magnitude.set_value(jnp.asarray(fm.reshape(shape), mdtype))
  return model

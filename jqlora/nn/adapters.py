"""Several named adapters on one model, PEFT's multi-adapter API: add, switch, disable, one per row.

Every ``LoRALinear`` of a model carries the same ``adapter_names``. The active adapter
lives in the layer's trainable ``lora_a``/``lora_b``/``scale`` (the single-adapter path,
unchanged); once there is a second one, all of them are also stacked in the layer's
``AdapterBank`` (slot axis after the stacked-layer axes, ranks zero-padded to one ``r``)
with the active slot as data (``AdapterIndex``). So ``set_adapter`` between adapters of
the same shapes and settings (ranks, targets, dropout, rsLoRA) only rewrites array
values: a compiled step or decode runs on without recompiling.

``disable_adapters`` sets each layer's static ``disabled`` flag for the duration of a
``with`` block: the layers then compute the base alone (no adapter maths, no gradient to
the adapters). The flag is read when the forward pass is traced, so inside a jitted
function (``nnx.merge`` then ``with disable_adapters(model): ...``) the same weights give
the base's output in one compiled program, e.g. DPO's reference log-probs.

``route_adapters`` picks an adapter per batch row (``"__base__"``: none), PEFT's mixed
batch; ``jqlora.generate(..., adapter_names=[...])`` uses it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jqlora.nn import lora as lora_lib
from jqlora.nn.linear import AdapterBank, AdapterInfo, LoRALinear
from jqlora.nn.surgery import apply_lora, linear_layers, lora_layer, lora_modules, set_child
from jqlora.nn.variables import AdapterIndex

__all__ = ["BASE", "Adapter", "add_adapter", "list_adapters", "active_adapter", "set_adapter",
           "disable_adapters", "adapter_rows", "route_adapters", "adapter_weights",
           "set_adapter_weights"]

#: The adapter name of a row that uses no adapter (PEFT's).
BASE = "__base__"


class Adapter(NamedTuple):
  """One named adapter of a layer: ``a [*batch, in, r]``, ``b [*batch, r, out]``,
  ``scale [*batch]`` and its ``AdapterInfo``."""

  a: jax.Array
  b: jax.Array
  scale: jax.Array
  info: AdapterInfo


def _layers(model: nnx.Module, what: str) -> list[LoRALinear]:
  layers = [m for _, m in lora_modules(model)]
  if not layers:
    raise ValueError(f"{what}: the model has no LoRA adapters (call jqlora.apply_lora or "
                     "jqlora.load_adapter first)")
  return layers


def list_adapters(model: nnx.Module) -> tuple[str, ...]:
  """The names of the model's adapters, in slot order (an empty tuple without adapters)."""
  layers = lora_modules(model)
  return layers[0][1].adapter_names if layers else ()


def _active_slot(layer: LoRALinear) -> int:
  if layer.bank is None:
    return 0
  return int(np.asarray(layer.bank.active.get_value()).reshape(-1)[0])


def active_adapter(model: nnx.Module) -> str:
  """The name of the adapter the model computes with (and trains)."""
  layer = _layers(model, "active_adapter")[0]
  return layer.adapter_names[_active_slot(layer)]


def _slot(layer: LoRALinear, name: str, what: str) -> int:
  if name not in layer.adapter_names:
    raise ValueError(f"{what}: no adapter named {name!r}; the model has {list(layer.adapter_names)}")
  return layer.adapter_names.index(name)


def _at(layer: LoRALinear, slot: int) -> tuple:
  """Index of ``slot`` on a bank array's slot axis."""
  return (slice(None),) * len(layer.batch_shape) + (slot,)


def adapter_weights(layer: LoRALinear, name: str) -> Adapter:
  """The adapter ``name`` of ``layer`` (the live LoRA params when it is the active one)."""
  k = _slot(layer, name, "adapter_weights")
  if k == _active_slot(layer):
    return Adapter(layer.lora_a.get_value(), layer.lora_b.get_value(), layer.scale.get_value(),
                   AdapterInfo(layer.ranks, layer.dropout, layer.use_rslora))
  bank, at = layer.bank, _at(layer, k)
  return Adapter(bank.a.get_value()[at], bank.b.get_value()[at], bank.scale.get_value()[at],
                 bank.infos[k])


def set_adapter_weights(layer: LoRALinear, name: str, a: jax.Array, b: jax.Array,
                        scale: jax.Array, ranks: Sequence[int]) -> None:
  """Overwrites the adapter ``name`` of ``layer`` with arrays of ``adapter_weights``' shapes."""
  k = _slot(layer, name, "set_adapter_weights")
  ranks = tuple(int(r) for r in ranks)
  if k == _active_slot(layer):
    layer.lora_a.set_value(jnp.asarray(a, layer.lora_a.get_value().dtype))
    layer.lora_b.set_value(jnp.asarray(b, layer.lora_b.get_value().dtype))
    layer.scale.set_value(jnp.asarray(scale, jnp.float32))
    layer.ranks = ranks
  else:
    bank, at = layer.bank, _at(layer, k)
    for var, value in ((bank.a, a), (bank.b, b), (bank.scale, scale)):
      var.set_value(var.get_value().at[at].set(jnp.asarray(value, var.get_value().dtype)))
  if layer.bank is not None:
    infos = list(layer.bank.infos)
    infos[k] = dataclasses.replace(infos[k], ranks=ranks)
    layer.bank.infos = tuple(infos)


def set_adapter(model: nnx.Module, name: str) -> nnx.Module:
  """Makes ``name`` the adapter the model computes with and trains, in place.

  The outgoing adapter's live values are stored back in the bank first, so training
  either one and switching back loses nothing. Only array values change when the two
  adapters have the same shapes and settings: a compiled step is reused.

  Raises:
    ValueError: no adapter ``name``, or the adapters are merged into the base.
  """
  layers = _layers(model, "set_adapter")
  for layer in layers:
    k, j = _slot(layer, name, "set_adapter"), _active_slot(layer)
    if k == j:
      continue
    if layer.merged:
      raise ValueError("set_adapter: the adapters are merged into the base; unmerge_lora first")
    bank = layer.bank
    for var, live in ((bank.a, layer.lora_a), (bank.b, layer.lora_b), (bank.scale, layer.scale)):
      var.set_value(var.get_value().at[_at(layer, j)].set(live.get_value().astype(var.get_value().dtype)))
      live.set_value(var.get_value()[_at(layer, k)].astype(live.get_value().dtype))
    info = bank.infos[k]
    layer.ranks, layer.dropout, layer.use_rslora = info.ranks, info.dropout, info.use_rslora
    bank.active.set_value(jnp.full(layer.batch_shape, k, jnp.int32))
  return model


@contextlib.contextmanager
def disable_adapters(model: nnx.Module) -> Iterator[nnx.Module]:
  """``with disable_adapters(model):`` the model computes its base alone (PEFT's
  ``disable_adapter()``); works eagerly and inside a jitted function (module docstring).

  Raises:
    ValueError: the model has no adapters, or they are merged into the base.
  """
  layers = _layers(model, "disable_adapters")
  if any(layer.merged for layer in layers):
    raise ValueError("disable_adapters: the adapters are merged into the base; unmerge_lora first")
  before = [layer.disabled for layer in layers]
  for layer in layers:
    layer.disabled = True
  try:
    yield model
  finally:
    for layer, flag in zip(layers, before):
      layer.disabled = flag


def adapter_rows(model: nnx.Module, names: Sequence[str]) -> np.ndarray:
  """int32 ``[len(names)]`` adapter slot of each name, -1 for ``"__base__"``.

  Raises:
    ValueError: a name the model has no adapter for.
  """
  known = list_adapters(model)
  unknown = sorted({n for n in names if n != BASE and n not in known})
  if unknown:
    raise ValueError(f"adapter_names: no adapter named {unknown[0]!r}; the model has "
                     f"{list(known)} (and {BASE!r} for none)")
  return np.asarray([-1 if n == BASE else known.index(n) for n in names], np.int32)


def route_adapters(model: nnx.Module, rows: Sequence[str] | jax.Array | None) -> nnx.Module:
  """Row ``i`` of the next inputs' leading (batch) axis uses adapter ``rows[i]``, in place.

  Args:
    model: a model with adapters, in eval mode (no LoRA dropout).
    rows: adapter names (``"__base__"``: none), or int32 ``[B]`` slots from
      ``adapter_rows`` (may be traced: call this inside a jitted function on a merged
      copy); None routes every row to the active adapter again.

  Raises:
    ValueError: an unknown name, or merged adapters.
    NotImplementedError: DoRA adapters.
  """
  layers = _layers(model, "route_adapters")
  if rows is not None:
    if any(layer.merged for layer in layers):
      raise ValueError("route_adapters: the adapters are merged into the base; unmerge_lora first")
    if any(layer.use_dora for layer in layers):
      raise NotImplementedError("route_adapters: an adapter per row is not supported for DoRA")
    if not isinstance(rows, (jax.Array, np.ndarray)):
      rows = adapter_rows(model, list(rows))
    rows = jnp.asarray(rows, jnp.int32)
  for layer in layers:
    layer.adapter_rows = None if rows is None else AdapterIndex(
        jnp.broadcast_to(rows, (*layer.batch_shape, rows.shape[0])))
  return model


def _pad_rank(x: jax.Array, r: int, axis: int) -> jax.Array:
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, r - x.shape[axis])
  return jnp.pad(x, widths)


def _append(layer: LoRALinear, name: str, new: Adapter) -> None:
  """Adds ``new`` as slot ``name`` of ``layer``, padding every adapter to a common rank."""
  if layer.bank is None:
    layer.bank = AdapterBank(layer)
  bank, axis = layer.bank, len(layer.batch_shape)
  r = max(layer.rank, new.a.shape[-1])
  layer.lora_a.set_value(_pad_rank(layer.lora_a.get_value(), r, -1))
  layer.lora_b.set_value(_pad_rank(layer.lora_b.get_value(), r, -2))
  for var, value, rank_axis in ((bank.a, new.a, -1), (bank.b, new.b, -2), (bank.scale, new.scale, None)):
    old = var.get_value()
    if rank_axis is not None:
      old, value = _pad_rank(old, r, rank_axis), _pad_rank(value, r, rank_axis)
    var.set_value(jnp.concatenate([old, jnp.expand_dims(value, axis).astype(old.dtype)], axis))
  bank.infos = (*bank.infos, new.info)
  layer.adapter_names = (*layer.adapter_names, name)


def _empty(layer: LoRALinear, names: tuple[str, ...], active: int) -> None:
  """Turns a fresh ``layer`` into one whose adapters ``names`` are all zero."""
  flat = len(layer.ranks)
  for var in (layer.lora_a, layer.lora_b, layer.scale):
    var.set_value(jnp.zeros_like(var.get_value()))
  layer.ranks = (0,) * flat
  layer.adapter_names = names[:1]
  zero = Adapter(layer.lora_a.get_value(), layer.lora_b.get_value(), layer.scale.get_value(),
                 AdapterInfo((0,) * flat, layer.dropout, layer.use_rslora))
  for name in names[1:]:
    _append(layer, name, zero)
  if layer.bank is not None:
    layer.bank.active.set_value(jnp.full(layer.batch_shape, active, jnp.int32))


def add_adapter(model: nnx.Module, name: str, config: lora_lib.LoraConfig, *,
                rngs: nnx.Rngs) -> nnx.Module:
  """Adds a new adapter ``name`` (PEFT's ``add_adapter``), initialised as ``apply_lora`` does;
  the active adapter stays active. Linears that only ``name`` targets get a LoRA layer whose
  other adapters are zero.

  Args:
    model: a model with or without adapters (without: ``apply_lora``, named ``name``).
    name: the new adapter's name (not ``"__base__"``).
    config: its targets, rank, alpha, dropout and init.
    rngs: initializes it.

  Returns:
    ``model``, in place.

  Raises:
    ValueError: the name exists or is reserved, merged adapters, or nothing is targeted.
    NotImplementedError: DoRA or PiSSA with several adapters.
  """
  if not name or name == BASE:
    raise ValueError(f"add_adapter: {name!r} is not a valid adapter name")
  layers = [m for _, m in lora_modules(model)]
  if not layers:
    apply_lora(model, config, rngs=rngs)
    for _, layer in lora_modules(model):
      layer.adapter_names = (name,)
    return model
  names = layers[0].adapter_names
  if name in names:
    raise ValueError(f"add_adapter: the model already has an adapter named {name!r}")
  if config.use_dora or any(layer.use_dora for layer in layers):
    raise NotImplementedError("add_adapter: several named adapters are supported for plain LoRA "
                              "only, not DoRA")
  if config.init == "pissa":
    raise NotImplementedError("add_adapter: init='pissa' changes the base weights, which the "
                              "model's other adapters were trained on")
  if any(layer.merged for layer in layers):
    raise ValueError("add_adapter: the adapters are merged into the base; unmerge_lora first")
  active = _active_slot(layers[0])
  targets = [(p, m, lora_layer(model, p, m, config, rngs=rngs))
             for p, m in lora_modules(model) + linear_layers(model)]
  if all(new is None for *_, new in targets):
    raise ValueError(f"add_adapter: target_modules {config.target_modules!r} matched no linear layer")
  for path, layer, new in targets:
    if new is None and not isinstance(layer, LoRALinear):
      continue
    if new is None:  # an adapted layer that the new adapter leaves alone
      flat = len(layer.ranks)
      zero = Adapter(jnp.zeros_like(layer.lora_a.get_value()), jnp.zeros_like(layer.lora_b.get_value()),
                     jnp.zeros_like(layer.scale.get_value()), AdapterInfo((0,) * flat, 0.0, False))
      _append(layer, name, zero)
      continue
    adapter = Adapter(new.lora_a.get_value(), new.lora_b.get_value(), new.scale.get_value(),
                      AdapterInfo(new.ranks, new.dropout, new.use_rslora))
    if not isinstance(layer, LoRALinear):
      _empty(new, names, active)
      set_child(model, path, new)
      layer = new
    _append(layer, name, adapter)
  return model

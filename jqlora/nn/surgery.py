"""Model surgery: add adapters to any NNX model, merge/unmerge them, count parameters."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jqlora.nn import lora as lora_lib
from jqlora.nn.linear import Linear, LoRALinear, QLoRALinear, batch_shape, dense_weight
from jqlora.nn.variables import DoRANorm, Frozen, NF4Weight, logical_axes

__all__ = ["apply_lora", "merge_lora", "unmerge_lora", "trainable_params", "module_names",
           "lora_modules", "linear_layers", "lora_layer", "set_child"]


def module_names(model: nnx.Module, path: tuple, batch_shape: tuple[int, ...] = ()) -> list[str]:
  """PEFT-style names of the module at ``path``, one per stacked layer.

  A model names its own modules with a ``module_names(path)`` method (``Llama``
  gives Hugging Face names); otherwise the dotted path is used.
  """
  if hasattr(model, "module_names"):
    return list(model.module_names(tuple(path)))
  return [".".join(str(p) for p in path)] * math.prod(batch_shape)


def lora_modules(model: nnx.Module) -> list[tuple[tuple, LoRALinear]]:
  """``(path, module)`` of every ``LoRALinear`` in ``model``."""
  return [(tuple(p), m) for p, m in nnx.iter_graph(model) if isinstance(m, LoRALinear)]


def set_child(model: nnx.Module, path: tuple, value: Any) -> None:
  """Replaces the submodule of ``model`` at ``path`` by ``value``."""
  parent = model
  for p in path[:-1]:
    parent = parent[p] if isinstance(p, int) else getattr(parent, p)
  if isinstance(path[-1], int):
    parent[path[-1]] = value
  else:
    setattr(parent, path[-1], value)


def _as_base(module: Linear | nnx.Linear) -> Linear:
  """A frozen ``jqlora.nn.Linear`` view of a linear layer.

  An ``nnx.Linear`` kernel is ``[in, out]``: it is transposed, and its logical axes
  (``out_sharding`` metadata, if any) swapped with it.
  """
  if isinstance(module, Linear):
    return module
  bias = None if module.bias is None else module.bias.get_value()
  names = logical_axes(module.kernel)
  return Linear(jnp.swapaxes(module.kernel.get_value(), -1, -2), bias,
                axes=None if names is None else (names[-1], names[-2]))


def apply_lora(model: nnx.Module, config: lora_lib.LoraConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  """Replaces the targeted linears of ``model`` by LoRA modules, in place.

  ``jqlora.nn.Linear`` (float or NF4) and ``nnx.Linear`` layers are candidates;
  NF4 bases become ``QLoRALinear``, float ones ``LoRALinear`` (an ``nnx.Linear``'s
  kernel becomes a frozen base). Stacked layers get adapters with the same leading
  axes; layers of a stack that are not targeted, or have a smaller rank from
  ``rank_pattern``, carry zero adapter entries with scale 0, which stay zero
  under training (with DoRA their magnitude is ignored and gets no gradient).
  With ``config.use_dora`` the magnitudes are initialised last, from the final
  base weight and adapter (after PiSSA), as PEFT does.

  Args:
    model: any NNX model; a ``module_names(path)`` method supplies PEFT names.
    config: which modules, rank, alpha, dropout, init and DoRA.
    rngs: initializes the adapters (stream ``params``) and, for unstacked
      modules with dropout, supplies dropout keys.

  Returns:
    ``model`` (modified in place).

  Raises:
    ValueError: ``model`` already has adapters, nothing matches the targets, or
      PiSSA on an NF4 base.
  """
  if lora_modules(model):
    raise ValueError("apply_lora: the model already has LoRA adapters")
  candidates = linear_layers(model)
  replaced = 0
  for path, module in candidates:
    new = lora_layer(model, path, module, config, rngs=rngs)
    if new is not None:
      set_child(model, path, new)
      replaced += 1
  if not replaced:
    names = sorted({module_names(model, p, _as_base(m).batch_shape)[0] for p, m in candidates})
    raise ValueError(f"apply_lora: target_modules {config.target_modules!r} matched no linear "
                     f"layer; candidates are e.g. {names[:8]}")
  return model


def linear_layers(model: nnx.Module) -> list[tuple[tuple, Linear | nnx.Linear]]:
  """``(path, module)`` of every linear without an adapter (``Linear``, ``nnx.Linear``)."""
  return [(tuple(p), m) for p, m in nnx.iter_graph(model) if type(m) in (Linear, nnx.Linear)]


def lora_layer(model: nnx.Module, path: tuple, module: Linear | nnx.Linear,
               config: lora_lib.LoraConfig, *, rngs: nnx.Rngs) -> LoRALinear | None:
  """The LoRA version of the linear ``module`` at ``path`` as ``apply_lora`` makes it, or
  None when ``config`` targets none of its (stacked) layers; ``model`` is not changed."""
  base = _as_base(module)
  names = module_names(model, path, base.batch_shape)
  is_head = str(path[-1]) == "lm_head"
  hits = [lora_lib.matches_target(config, n, is_output_head=is_head) for n in names]
  if not any(hits):
    return None
  dtype = jnp.dtype(config.dtype)
  resolved = [lora_lib.resolve(config, n) for n in names]
  ranks = [r for (r, _), hit in zip(resolved, hits) if hit]
  r_max = max(ranks)
  cls = QLoRALinear if base.quantized else LoRALinear
  init = "kaiming" if config.init == "pissa" else config.init
  new = cls(base.weight.get_value(), None if base.bias is None else base.bias.get_value(),
            r=r_max, dropout=config.dropout, init=init, rngs=rngs, dtype=dtype,
            use_rslora=config.use_rslora, use_dora=config.use_dora, axes=base.axes)
  scales = np.array([s if hit else 0.0 for (_, s), hit in zip(resolved, hits)], np.float32)
  rank_of = np.array([r if hit else 0 for (r, _), hit in zip(resolved, hits)])
  new.scale.set_value(jnp.asarray(scales.reshape(new.batch_shape)))
  new.ranks = tuple(int(r) for r in rank_of)
  if (rank_of != r_max).any():
    keep = (np.arange(r_max)[None, :] < rank_of[:, None]).reshape(*new.batch_shape, 1, r_max)
    new.lora_a.set_value(jnp.where(keep, new.lora_a.get_value(), 0).astype(dtype))
  if config.init == "pissa":
    _pissa(new, names, hits, rank_of, scales)
  if new.use_dora:
    new.reset_magnitude()
  return new


def _pissa(module: LoRALinear, names, hits, ranks, scales) -> None:
  """PiSSA init: principal directions of the float base move into the adapter."""
  if module.quantized:
    raise ValueError(
        f"apply_lora: init='pissa' needs a float base but {names[0]} is NF4 (as PEFT, jqlora "
        "refuses to re-quantize the residual); build the model with quantize=False")
  if not all(hits) or len(set(ranks.tolist())) != 1 or len(set(scales.tolist())) != 1:
    raise NotImplementedError(
        f"apply_lora: init='pissa' needs the same rank and alpha on every layer of {names[0]}")
  w = module.weight.get_value()
  a, b, residual = lora_lib.pissa_split(w, int(ranks[0]), float(scales[0]))
  module.lora_a.set_value(a.astype(module.lora_a.get_value().dtype))
  module.lora_b.set_value(b.astype(module.lora_b.get_value().dtype))
  module.weight.set_value(residual.astype(w.dtype))


def _adapter(module: LoRALinear) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(a, b, scale)`` of ``module``."""
  return module.lora_a.get_value(), module.lora_b.get_value(), module.scale.get_value()


def _magnitude(module: LoRALinear) -> jax.Array | None:
  return module.lora_magnitude.get_value() if module.use_dora else None


def merge_lora(model: nnx.Module, *, copy: bool = False) -> nnx.Module:
  """Folds every adapter into its base weight.

  Float bases are merged in place (the adapter is kept so ``unmerge_lora`` can
  undo it; the forward pass then skips it). DoRA layers merge as PEFT does:
  ``w' = (m / n) * (w + scale * (a @ b).T)``, ``n`` the row norms before merging
  (kept in a ``DoRANorm`` for ``unmerge_lora``). An NF4 base is never re-quantized:
  with ``copy=True`` a float copy of the model is returned in which every NF4
  linear is dequantized (in its original dtype) and adapters are merged and
  removed; without it an NF4 base raises.

  Args:
    model: a model with adapters.
    copy: return a merged float copy and leave ``model`` unchanged.

  Returns:
    ``model`` merged in place, or the float copy.

  Raises:
    ValueError: an NF4 base with ``copy=False``.
  """
  if copy:
    out = nnx.clone(model)
    for path, m in [(tuple(p), m) for p, m in nnx.iter_graph(out) if isinstance(m, Linear)]:
      w = dense_weight(m.weight.get_value())
      if isinstance(m, LoRALinear) and not m.merged:
        w = lora_lib.merged_weight(w, *_adapter(m), _magnitude(m)).astype(w.dtype)
      set_child(out, path, Linear(w, None if m.bias is None else m.bias.get_value(), axes=m.axes))
    return out
  modules = lora_modules(model)
  quantized = [m for _, m in modules if m.quantized]
  if quantized:
    raise ValueError(
        "merge_lora: the base is NF4 and merging in place would silently re-quantize it; use "
        "merge_lora(model, copy=True) for a float copy, or "
        "jqlora.models.export_hf_state_dict(model) for a merged full-precision export")
  for _, m in modules:
    if not m.merged:
      w = m.weight.get_value()
      norm = lora_lib.weight_norm(w, *_adapter(m)) if m.use_dora else None
      if norm is not None:
        m.dora_norm = DoRANorm(norm)
      m.weight.set_value(
          lora_lib.merged_weight(w, *_adapter(m), _magnitude(m), norm).astype(w.dtype))
      m.merged = True
  return model


def unmerge_lora(model: nnx.Module) -> nnx.Module:
  """Undoes ``merge_lora`` on float bases (exact up to the base dtype's rounding)."""
  for _, m in lora_modules(model):
    if m.merged:
      w = m.weight.get_value()
      a, b, scale = _adapter(m)
      w32 = w.astype(jnp.float32)
      if m.use_dora:
        factor = lora_lib.dora_factor(_magnitude(m), m.dora_norm.get_value(), scale)
        w32 = w32 / factor[..., None]
        m.dora_norm = None
      m.weight.set_value((w32 - lora_lib.delta_weight(a, b, scale)).astype(w.dtype))
      m.merged = False
  return model


def _count(variable: nnx.Variable) -> int:
  value = variable.get_value()
  if isinstance(variable, NF4Weight):
    return value.size * math.prod(batch_shape(value))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(value))


def trainable_params(model: nnx.Module, *, verbose: bool = True) -> tuple[int, int, float]:
  """Counts adapter parameters against all weights, like PEFT's ``print_trainable_parameters``.

  NF4 weights count by the number of elements they represent; RNG state and
  LoRA scales are not weights.

  Args:
    model: an NNX model.
    verbose: print ``trainable params: … || all params: … || trainable%: …``.

  Returns:
    ``(trainable, total, percent)``.
  """
  trainable = total = 0
  for _, v in nnx.iter_graph(model):
    if isinstance(v, (nnx.Param, Frozen, NF4Weight)):
      n = _count(v)
      total += n
      if isinstance(v, nnx.LoRAParam):
        trainable += n
  percent = 100.0 * trainable / total if total else 0.0
  if verbose:
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
          f"trainable%: {percent:.4f}")
  return trainable, total, percent

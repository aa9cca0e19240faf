"""LoRA configuration and maths as pure functions over arrays.

Layouts follow JAX (``x @ a @ b``): ``a`` is ``[..., in, r]`` and ``b`` is
``[..., r, out]``; leading axes stack layers. PEFT stores the transposes
(``lora_A.weight [r, in]``, ``lora_B.weight [out, r]``). Base weights keep the
torch layout ``[out, in]`` (the NF4 storage layout), so ``y = x @ w.T``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

__all__ = ["LoraConfig", "INITS", "scaling", "resolve", "matches_target", "init_adapter",
           "apply_dropout", "lora_delta", "routed_lora_delta", "pissa_split", "weight_norm",
           "dora_factor", "dora_delta", "delta_weight", "merged_weight"]

INITS = ("kaiming", "gaussian", "pissa")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which linears get an adapter, and its shape, scale and init (PEFT's ``LoraConfig``).

  Attributes:
    r: rank of every adapter unless ``rank_pattern`` says otherwise.
    alpha: ``lora_alpha``; the update is scaled by ``alpha / r`` (``alpha / sqrt(r)``
      with ``use_rslora``).
    dropout: dropout on the adapter's input, active only in training mode.
    target_modules: ``"all-linear"`` (every linear but the LM head), a list of
      module names matched as suffixes (``"q_proj"`` matches
      ``model.layers.0.self_attn.q_proj``), or a regex that must match the whole
      module name.
    use_rslora: rank-stabilized scaling ``alpha / sqrt(r)``.
    init: ``"kaiming"`` (A Kaiming-uniform with a = sqrt(5), B zero),
      ``"gaussian"`` (A normal with std 1/r, B zero) or ``"pissa"`` (principal
      singular vectors; moves them out of a float base).
    use_dora: weight-decomposed LoRA (DoRA, PEFT's ``use_dora``): each adapted
      linear also trains a float32 magnitude ``m [out]``, initialised to the row
      norms of ``w + scaling * (a @ b).T``, and computes
      ``(m / n) * (x @ w.T + scaling * x @ a @ b) + bias`` where ``n`` is that row
      norm at the current adapter, treated as a constant (no gradient). Linear
      layers only (float and NF4 bases).
    rank_pattern: module-name regex -> rank, PEFT's ``rank_pattern``.
    alpha_pattern: module-name regex -> alpha, PEFT's ``alpha_pattern``.
    exclude_modules: names (suffix match) or a regex of modules never adapted.
    dtype: adapter dtype, float32 whatever the base dtype.
  """

  r: int = 8
  alpha: float = 16
  dropout: float = 0.0
  target_modules: str | Sequence[str] = "all-linear"
  use_rslora: bool = False
  init: str = "kaiming"
  use_dora: bool = False
  rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
  alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
  exclude_modules: str | Sequence[str] | None = None
  dtype: str = "float32"

  def __post_init__(self):
    _check_rank(self.r, "r")
    _check_alpha(self.alpha, "alpha")
    if not 0.0 <= float(self.dropout) < 1.0:
      raise ValueError(f"LoraConfig: dropout must be in [0, 1), got {self.dropout!r}")
    if self.init not in INITS:
      raise ValueError(f"LoraConfig: init must be one of {INITS}, got {self.init!r}")
    targets = self.target_modules
    if isinstance(targets, str):
      if targets != "all-linear":
        _compile(targets, "target_modules")
    else:
      targets = tuple(targets)
      if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(
            f"LoraConfig: target_modules must be 'all-linear', a regex or a non-empty list of "
            f"module names, got {self.target_modules!r}")
      object.__setattr__(self, "target_modules", targets)
    if self.exclude_modules is not None and not isinstance(self.exclude_modules, str):
      object.__setattr__(self, "exclude_modules", tuple(self.exclude_modules))
    for key, value in self.rank_pattern.items():
      _compile(key, "rank_pattern")
      _check_rank(value, f"rank_pattern[{key!r}]")
    for key, value in self.alpha_pattern.items():
      _compile(key, "alpha_pattern")
      _check_alpha(value, f"alpha_pattern[{key!r}]")
    object.__setattr__(self, "rank_pattern", dict(self.rank_pattern))
    object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern))
    if jnp.dtype(self.dtype).kind != "f":
      raise ValueError(f"LoraConfig: dtype must be a float dtype, got {self.dtype!r}")


def _check_rank(r, what: str) -> None:
  if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
    raise ValueError(f"LoraConfig: {what} must be a positive integer, got {r!r}")


def _check_alpha(alpha, what: str) -> None:
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) \
      or alpha <= 0:
    raise ValueError(f"LoraConfig: {what} must be a positive number, got {alpha!r}")


def _compile(pattern: str, what: str) -> re.Pattern:
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f"LoraConfig: {what} {pattern!r} is not a valid regex: {e}") from None


def scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
  """The factor on ``x @ a @ b``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
  return float(alpha) / (math.sqrt(r) if use_rslora else r)


def _pattern_value(patterns: Mapping[str, float], name: str, default):
  """PEFT's ``get_pattern_key``: the first pattern that matches a dotted suffix of ``name``."""
  for key, value in patterns.items():
    if re.match(rf"(.*\.)?({key})$", name):
      return value
  return default


def resolve(config: LoraConfig, name: str) -> tuple[int, float]:
  """``(rank, scaling)`` of the adapter on module ``name`` (rank/alpha patterns applied)."""
  r = _pattern_value(config.rank_pattern, name, config.r)
  alpha = _pattern_value(config.alpha_pattern, name, config.alpha)
  return r, scaling(alpha, r, config.use_rslora)


def _name_matches(spec: str | Sequence[str], name: str) -> bool:
  if isinstance(spec, str):
    return re.fullmatch(spec, name) is not None
  return any(name == t or name.endswith("." + t) for t in spec)


def matches_target(config: LoraConfig, name: str, *, is_output_head: bool = False) -> bool:
  """Whether the linear ``name`` (a dotted module name) gets an adapter.

  Args:
    config: the LoRA config.
    name: PEFT-style module name, e.g. ``"model.layers.0.self_attn.q_proj"``.
    is_output_head: the model's LM head, never matched by ``"all-linear"``.
  """
  if config.exclude_modules is not None and _name_matches(config.exclude_modules, name):
    return False
  if config.target_modules == "all-linear":
    return not is_output_head
  return _name_matches(config.target_modules, name)


def init_adapter(key: jax.Array, in_features: int, out_features: int, r: int, *,
                 init: str = "kaiming", batch_shape: tuple[int, ...] = (),
                 dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
  """A fresh adapter whose update ``a @ b`` is zero.

  Args:
    key: PRNG key.
    in_features, out_features: the linear's sizes.
    r: rank.
    init: ``"kaiming"`` (PEFT's default: uniform in ``±1/sqrt(in)``, Kaiming with
      a = sqrt(5)) or ``"gaussian"`` (normal with std ``1/r``).
    batch_shape: leading (stacked-layer) axes.
    dtype: adapter dtype.

  Returns:
    ``a`` ``[*batch_shape, in, r]`` and ``b`` ``[*batch_shape, r, out]`` (zeros).
  """
  shape = (*batch_shape, in_features, r)
  if init == "kaiming":
    bound = 1.0 / math.sqrt(in_features)
    a = jax.random.uniform(key, shape, jnp.float32, -bound, bound)
  elif init == "gaussian":
    a = jax.random.normal(key, shape, jnp.float32) / r
  else:
    raise ValueError(f"init_adapter: init must be 'kaiming' or 'gaussian', got {init!r}")
  return a.astype(dtype), jnp.zeros((*batch_shape, r, out_features), dtype)


def pissa_split(w: jax.Array, r: int, scale: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """PiSSA: moves the ``r`` principal singular directions of ``w`` into an adapter.

  Args:
    w: float base weight ``[..., out, in]``.
    r: rank.
    scale: the adapter's scaling.

  Returns:
    ``(a [..., in, r], b [..., r, out], residual [..., out, in])`` float32 with
    ``residual + scale * (a @ b).T == w`` up to rounding.
  """
  w32 = w.astype(jnp.float32)
  u, s, vh = jnp.linalg.svd(w32, full_matrices=False)
  root = jnp.sqrt(s[..., :r] / scale)
  a = jnp.swapaxes(root[..., :, None] * vh[..., :r, :], -1, -2)
  b = jnp.swapaxes(u[..., :, :r] * root[..., None, :], -1, -2)
  residual = w32 - scale * jnp.swapaxes(a @ b, -1, -2)
  return a, b, residual


def apply_dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Inverted dropout on ``x`` with drop probability ``rate``; ``x`` as is when ``rng`` is None."""
  if rng is None or rate <= 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def _low_rank(h: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """``h @ a @ b`` in ``a.dtype``; ``h [..., in]`` -> ``[..., out]``."""
  # Rank-2 matmuls: XLA's CPU dot is markedly faster than on [batch, seq, in] operands.
  y = (h.reshape(-1, h.shape[-1]).astype(a.dtype) @ a) @ b
  return y.reshape(*h.shape[:-1], b.shape[-1])


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array | float, *,
               dropout: float = 0.0, rng: jax.Array | None = None) -> jax.Array:
  """``scale * dropout(x) @ a @ b`` computed in the adapter's dtype, cast to ``x.dtype``.

  Args:
    x: ``[..., in]`` input.
    a: ``[in, r]``; b: ``[r, out]``.
    scale: scalar scaling.
    dropout: dropout rate on ``x``; applied only when ``rng`` is given.
    rng: PRNG key, or None for no dropout.

  Returns:
    ``[..., out]`` in ``x.dtype``.
  """
  h = apply_dropout(x.astype(a.dtype), dropout, rng)
  return (scale * _low_rank(h, a, b)).astype(x.dtype)


def routed_lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array,
                      rows: jax.Array) -> jax.Array:
  """A different adapter per batch row (PEFT's mixed batch): row ``i`` gets
  ``scale[k] * x[i] @ a[k] @ b[k]`` with ``k = rows[i]``, nothing where ``k < 0``.

  Args:
    x: ``[B, ..., in]`` input.
    a: ``[n, in, r]``; b: ``[n, r, out]``; scale: ``[n]``: ``n`` adapters.
    rows: int32 ``[B]`` adapter of each row, -1 for none.

  Returns:
    ``[B, ..., out]`` in ``x.dtype``.
  """
  on = rows >= 0
  k = jnp.clip(rows, 0, a.shape[0] - 1)
  h = x.astype(a.dtype).reshape(x.shape[0], -1, x.shape[-1])
  y = jnp.einsum("btr,bro->bto", jnp.einsum("bti,bir->btr", h, a[k]), b[k])
  s = jnp.where(on, jnp.asarray(scale, jnp.float32)[k], 0.0).astype(y.dtype)
  return (s[:, None, None] * y).reshape(*x.shape[:-1], b.shape[-1]).astype(x.dtype)


def delta_weight(a: jax.Array, b: jax.Array, scale: jax.Array | float) -> jax.Array:
  """float32 ``scale * (a @ b).T`` ``[..., out, in]`` (PEFT's ``get_delta_weight``).

  Args:
    a: ``[..., in, r]``; b: ``[..., r, out]``; scale: ``[...]`` or a scalar.
  """
  delta = jnp.swapaxes(a.astype(jnp.float32) @ b.astype(jnp.float32), -1, -2)
  return jnp.asarray(scale, jnp.float32)[..., None, None] * delta


def weight_norm(w: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array | float) -> jax.Array:
  """DoRA's per-output-row norm of the adapted weight, as a constant (no gradient).

  Args:
    w: dense base weight ``[..., out, in]``.
    a: ``[..., in, r]``; b: ``[..., r, out]``.
    scale: scaling, shape ``[...]`` (or a scalar).

  Returns:
    float32 ``[..., out]``: ``||w + scale * (a @ b).T||`` over ``in``, computed
    from ``stop_gradient`` inputs (so the backward pass keeps nothing of it).
  """
  w, a, b, scale = jax.lax.stop_gradient((w, a, b, scale))
  return jnp.linalg.norm(w.astype(jnp.float32) + delta_weight(a, b, scale), axis=-1)


def dora_factor(magnitude: jax.Array, norm: jax.Array, scale: jax.Array | float) -> jax.Array:
  """DoRA's output-row factor ``magnitude / norm``, float32 ``[..., out]``.

  Layers without an adapter (``scale == 0``, e.g. untargeted layers of a stack)
  get 1, and their magnitude no gradient.
  """
  active = jnp.asarray(scale)[..., None] != 0
  return jnp.where(active, magnitude.astype(jnp.float32) / jnp.where(active, norm, 1.0), 1.0)


def dora_delta(h: jax.Array, base: jax.Array, a: jax.Array, b: jax.Array,
               scale: jax.Array | float, factor: jax.Array) -> jax.Array:
  """DoRA's addition to the base output (PEFT's ``DoraLinearLayer.forward``).

  Args:
    h: adapter input ``[..., in]`` (after dropout).
    base: ``h @ w.T`` without bias, ``[..., out]``.
    a: ``[in, r]``; b: ``[r, out]``.
    scale: scalar scaling.
    factor: ``dora_factor`` ``[out]``.

  Returns:
    float32 ``[..., out]``: ``(factor - 1) * base + factor * scale * h @ a @ b``.
  """
  lora = _low_rank(h, a, b).astype(jnp.float32)
  return (factor - 1.0) * base.astype(jnp.float32) + factor * (scale * lora)


def merged_weight(w: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array | float,
                  magnitude: jax.Array | None = None, norm: jax.Array | None = None) -> jax.Array:
  """float32 base weight with the adapter folded in (as PEFT merges).

  Args:
    w: dense base weight ``[..., out, in]``.
    a: ``[..., in, r]``; b: ``[..., r, out]``; scale: ``[...]`` or a scalar.
    magnitude: DoRA magnitude ``[..., out]``, or None for plain LoRA.
    norm: DoRA's ``weight_norm`` of these operands when the caller already has it.

  Returns:
    ``w + scale * (a @ b).T``, times ``dora_factor`` per output row with DoRA.
  """
  merged = w.astype(jnp.float32) + delta_weight(a, b, scale)
  if magnitude is None:
    return merged
  norm = weight_norm(w, a, b, scale) if norm is None else norm
  factor = dora_factor(magnitude, norm, scale)
  return factor[..., None] * merged

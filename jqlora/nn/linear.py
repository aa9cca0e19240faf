"""Frozen linear layers with a float or NF4 weight, and their LoRA / QLoRA / DoRA versions.

Base linear weights keep the torch layout ``[out, in]`` (NF4 storage layout).
Leading axes (``batch_shape``) stack layers for a scan; a stacked module is
called on one slice at a time. ``axes=(out_name, in_name)`` names the weight's
logical axes (``jqlora.nn.variables.axes``); the bias, the adapters and the DoRA
magnitude derive theirs from it: ``lora_a [in, r]`` is split like the weight's
``(in, out)``, and so is ``lora_b [r, out]``, the rank dimension only where the
mesh axis divides it. A model with any layer names shards by this metadata alone.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jqlora.format import NF4Tensor, dequantize_reference
from jqlora.nn import lora as lora_lib
from jqlora.nn.variables import AdapterIndex, AdapterWeight, Frozen, LoRAScale, NF4Weight
from jqlora.nn.variables import axes as variables_axes
from jqlora.ops import dequantize_nf4, matmul_wt, nf4_matmul

__all__ = ["Linear", "LoRALinear", "QLoRALinear", "AdapterBank", "AdapterInfo", "base_matmul",
           "dense_weight", "batch_shape", "dora_norm"]

Axes = tuple[str | None, str | None]


def _nf4_matmul(x: jax.Array, w: NF4Tensor) -> jax.Array:
  if w.row_aligned:
    return nf4_matmul(x, w)
  return matmul_wt(x, dequantize_nf4(w, x.dtype))  # blocks straddle rows: no kernel layout


def base_matmul(x: jax.Array, w: NF4Tensor | jax.Array) -> jax.Array:
  """``x @ w.T`` in ``x.dtype`` for a float ``[out, in]`` or NF4 base weight."""
  if isinstance(w, NF4Tensor):
    return _nf4_matmul(x, w)
  return matmul_wt(x, w.astype(x.dtype))


def dense_weight(w: NF4Tensor | jax.Array, dtype=None) -> jax.Array:
  """The base weight as a dense array (dequantized when NF4), leading axes kept."""
  if not isinstance(w, NF4Tensor):
    return w if dtype is None else w.astype(dtype)
  fn = lambda t: dequantize_reference(t, dtype)
  for _ in w.stack_shape:
    fn = jax.vmap(fn)
  return fn(w)


def dora_norm(w: NF4Tensor | jax.Array, a: jax.Array, b: jax.Array,
              scale: jax.Array) -> jax.Array:
  """DoRA's weight norm (``jqlora.nn.lora.weight_norm``) of a float or NF4 base.

  Stacked layers are done one at a time (``lax.map``), so at most one layer's
  weight is ever dense; XLA fuses an NF4 decode into the norm's reduction.

  Args:
    w: base weight ``[*batch, out, in]`` or its NF4 storage.
    a: ``[*batch, in, r]``; b: ``[*batch, r, out]``; scale: ``[*batch]``.

  Returns:
    float32 ``[*batch, out]``, without gradient.
  """
  batch = batch_shape(w)
  if not batch:
    return lora_lib.weight_norm(dense_weight(w), a, b, scale)
  flat = lambda x: x.reshape(-1, *x.shape[len(batch):])
  one = lambda args: lora_lib.weight_norm(dense_weight(args[0]), *args[1:])
  norms = jax.lax.map(one, jax.tree.map(flat, (w, a, b, scale)))
  return norms.reshape(*batch, norms.shape[-1])


def batch_shape(w: NF4Tensor | jax.Array) -> tuple[int, ...]:
  """Leading (stacked-layer) axes of a linear weight ``[*batch, out, in]`` or its NF4 storage."""
  if isinstance(w, NF4Tensor):
    return w.stack_shape
  return tuple(w.shape[:-2])


class Linear(nnx.Module):
  """A frozen linear layer ``y = x @ w.T + bias`` with a float or NF4 weight.

  Args:
    weight: ``[*batch, out, in]`` float array, or an ``NF4Tensor`` of shape
      ``[out, in]`` (storage leaves may carry leading ``batch`` axes).
    bias: optional ``[*batch, out]`` float array.
    axes: logical axis names ``(out, in)`` of the weight (e.g. ``("mlp", "embed")`` for
      a column-parallel MLP input), or None to keep the layer replicated.
  """

  def __init__(self, weight: NF4Tensor | jax.Array, bias: jax.Array | None = None, *,
               axes: Axes | None = None):
    if isinstance(weight, NF4Tensor):
      if len(weight.shape) != 2:
        raise ValueError(f"Linear: NF4 weight must be [out, in], got shape {weight.shape}")
      kind = NF4Weight
      self.out_features, self.in_features = weight.shape
    else:
      weight = jnp.asarray(weight)
      if weight.ndim < 2:
        raise ValueError(f"Linear: weight must be [..., out, in], got shape {weight.shape}")
      kind = Frozen
      self.out_features, self.in_features = weight.shape[-2:]
    self.batch_shape = batch_shape(weight)
    self.axes = None if axes is None else tuple(axes)
    self.weight = kind(weight, **self._meta(self.axes, ("out", "in")))
    self.bias = None if bias is None else Frozen(jnp.asarray(bias),
                                                 **self._meta(self._out, ("out",)))

  @property
  def _out(self) -> tuple[str | None] | None:
    return None if self.axes is None else (self.axes[0],)

  def _meta(self, names, labels, optional=()) -> dict:
    """Metadata for a Variable of this layer with trailing logical ``names`` (or None)."""
    return variables_axes(names, stack=len(self.batch_shape), optional=optional, labels=labels)

  @property
  def quantized(self) -> bool:
    return isinstance(self.weight, NF4Weight)

  def base(self, x: jax.Array) -> jax.Array:
    """The frozen base's output ``[..., out]`` in ``x.dtype``."""
    y = base_matmul(x, self.weight.get_value())
    if self.bias is not None:
      y = y + self.bias.get_value().astype(y.dtype)
    return y

  def __call__(self, x: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
    """Args: x ``[..., in]``; rng: unused (dropout key, for a uniform call). Returns ``[..., out]``."""
    del rng
    return self.base(x)


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
  """A named adapter's static settings on one layer: rank per stacked layer (0: not
  adapted), dropout rate, rsLoRA."""

  ranks: tuple[int, ...]
  dropout: float
  use_rslora: bool


class AdapterBank(nnx.Module):
  """The named adapters of a ``LoRALinear``, slot ``k`` being its ``adapter_names[k]``.

  Attributes:
    a: ``AdapterWeight`` ``[*batch, n, in, r]``; b: ``[*batch, n, r, out]``;
      scale: float32 ``[*batch, n]`` (ranks zero-padded to the layer's ``r``).
    active: ``AdapterIndex`` int32 ``[*batch]``, the slot held in the layer's
      ``lora_a``/``lora_b``/``scale``; the bank's copy of that slot is stale while it
      trains there, and the layer reads it from its LoRA params instead.
    infos: one ``AdapterInfo`` per slot.
  """

  def __init__(self, layer: LoRALinear):
    split = None if layer.axes is None else (None, layer.axes[1], layer.axes[0])
    meta = lambda labels, optional: layer._meta(split, labels, optional=optional)
    axis = len(layer.batch_shape)
    self.a = AdapterWeight(jnp.expand_dims(layer.lora_a.get_value(), axis),
                           **meta(("slot", "in", "r"), (-1,)))
    self.b = AdapterWeight(jnp.expand_dims(layer.lora_b.get_value(), axis),
                           **meta(("slot", "r", "out"), (-2,)))
    self.scale = AdapterWeight(jnp.expand_dims(layer.scale.get_value(), axis))
    self.active = AdapterIndex(jnp.zeros(layer.batch_shape, jnp.int32))
    self.infos = (AdapterInfo(layer.ranks, layer.dropout, layer.use_rslora),)

  def slots(self, a: jax.Array, b: jax.Array, scale: jax.Array):
    """Every slot of one layer's slice, the active one from its live ``a [in, r]``,
    ``b [r, out]``, ``scale []``: ``([n, in, r], [n, r, out], [n])``."""
    live = jnp.arange(self.a.get_value().shape[0]) == self.active.get_value()
    return (jnp.where(live[:, None, None], a[None], self.a.get_value()),
            jnp.where(live[:, None, None], b[None], self.b.get_value()),
            jnp.where(live, scale, self.scale.get_value()))


class LoRALinear(Linear):
  """A frozen base linear plus a LoRA adapter: ``base(x) + scale * dropout(x) @ a @ b``.

  With ``use_dora`` (DoRA, PEFT's semantics) a trainable magnitude ``m [*batch, out]``
  rescales each output row: with ``f = m / n``, ``n`` the row norm of
  ``w + scale * (a @ b).T`` (no gradient), the output is
  ``base(x) + (f - 1) * (h @ w.T) + f * scale * h @ a @ b`` with ``h = dropout(x)``
  (the base matmul is redone on ``h`` only when dropout is active; otherwise it is
  ``base(x)`` minus the bias).

  Args:
    weight: base weight, as for ``Linear`` (float for ``LoRALinear``).
    bias: optional base bias.
    r: adapter rank.
    alpha: LoRA alpha; scaling is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
    use_rslora: rank-stabilized scaling.
    dropout: dropout rate on the adapter's input, active only in training mode.
    init: ``"kaiming"`` or ``"gaussian"`` (see ``jqlora.nn.lora.init_adapter``).
    use_dora: add a DoRA magnitude, initialised by ``reset_magnitude``.
    rngs: initializes the adapter; kept for dropout keys when the module is not
      stacked.
    dtype: adapter dtype (float32 by default whatever the base dtype).
    axes: logical axis names ``(out, in)`` of the base weight (see ``Linear``).

  Several named adapters (``jqlora.nn.adapters``): ``adapter_names`` (the same on every
  layer of a model), the active one in ``lora_a``/``lora_b``/``scale`` and all of them in
  ``bank`` (an ``AdapterBank``, None while there is one adapter). ``disabled`` gives the
  base alone; ``adapter_rows`` (``AdapterIndex [*batch, B]``, or None) picks an adapter
  per row of the input's leading axis.
  """

  def __init__(self, weight: NF4Tensor | jax.Array, bias: jax.Array | None = None, *, r: int = 8,
               alpha: float = 16, use_rslora: bool = False, dropout: float = 0.0,
               init: str = "kaiming", use_dora: bool = False, rngs: nnx.Rngs, dtype=jnp.float32,
               axes: Axes | None = None):
    super().__init__(weight, bias, axes=axes)
    a, b = lora_lib.init_adapter(rngs.params(), self.in_features, self.out_features, r,
                                 init=init, batch_shape=self.batch_shape, dtype=dtype)
    # a [in, r] and b [r, out] are split like the weight's (in, out); r only where it divides
    split = None if self.axes is None else (self.axes[1], self.axes[0])
    self.lora_a = nnx.LoRAParam(a, **self._meta(split, ("in", "r"), optional=(-1,)))
    self.lora_b = nnx.LoRAParam(b, **self._meta(split, ("r", "out"), optional=(-2,)))
    self.scale = LoRAScale(jnp.full(self.batch_shape, lora_lib.scaling(alpha, r, use_rslora),
                                    jnp.float32))
    self.dropout = float(dropout)
    self.use_rslora = bool(use_rslora)
    self.ranks = (r,) * math.prod(self.batch_shape)
    self.deterministic = True
    self.merged = False
    self.rngs = rngs if not self.batch_shape and dropout > 0 else None
    self.lora_magnitude = (
        nnx.LoRAParam(jnp.zeros((*self.batch_shape, self.out_features), dtype),
                      **self._meta(self._out, ("out",))) if use_dora else None)
    self.dora_norm = nnx.data(None)
    if use_dora:
      self.reset_magnitude()
    self.adapter_names: tuple[str, ...] = ("default",)
    self.disabled = False
    self.bank = nnx.data(None)
    self.adapter_rows = nnx.data(None)

  @property
  def use_dora(self) -> bool:
    return self.lora_magnitude is not None

  def reset_magnitude(self) -> None:
    """DoRA's init: the magnitude becomes the row norms of ``w + scale * (a @ b).T``."""
    m = self.lora_magnitude
    m.set_value(dora_norm(self.weight.get_value(), self.lora_a.get_value(),
                          self.lora_b.get_value(), self.scale.get_value()).astype(m.get_value().dtype))

  @property
  def rank(self) -> int:
    """Rank of the stored adapter (per-layer ranks, 0 for untargeted layers, are in ``ranks``)."""
    return self.lora_a.get_value().shape[-1]

  def __call__(self, x: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
    """Args: x ``[..., in]``; rng: dropout key (training mode). Returns ``[..., out]``."""
    y = self.base(x)
    if self.merged or self.disabled:
      return y
    drop_rng = None
    if not self.deterministic and self.dropout > 0.0:
      if rng is None:
        if self.rngs is None:
          raise ValueError("LoRALinear: LoRA dropout in training mode needs an rng (pass rng= or "
                           "build the module with rngs)")
        rng = self.rngs.dropout()
      drop_rng = rng
    a, b, scale = self.lora_a.get_value(), self.lora_b.get_value(), self.scale.get_value()
    if self.adapter_rows is not None:
      if drop_rng is not None:
        raise ValueError("LoRALinear: an adapter per row is for inference; call model.eval() "
                         "(no LoRA dropout)")
      slots = (a[None], b[None], scale[None]) if self.bank is None else self.bank.slots(a, b, scale)
      return y + lora_lib.routed_lora_delta(x, *slots, self.adapter_rows.get_value())
    if not self.use_dora:
      return y + lora_lib.lora_delta(x, a, b, scale, dropout=self.dropout, rng=drop_rng)
    h = lora_lib.apply_dropout(x.astype(a.dtype), self.dropout, drop_rng)
    w = self.weight.get_value()
    if drop_rng is not None:
      base = base_matmul(h, w)  # as PEFT: the base matmul again, on the dropped-out input
    else:
      base = y if self.bias is None else y - self.bias.get_value().astype(y.dtype)
    factor = lora_lib.dora_factor(self.lora_magnitude.get_value(), dora_norm(w, a, b, scale), scale)
    delta = lora_lib.dora_delta(h, base, a, b, scale, factor)
    return (y.astype(jnp.float32) + delta).astype(y.dtype)


class QLoRALinear(LoRALinear):
  """A frozen NF4 base linear plus a float32 LoRA adapter (see ``LoRALinear``)."""

  def __init__(self, weight: NF4Tensor, bias: jax.Array | None = None, **kwargs):
    if not isinstance(weight, NF4Tensor):
      raise TypeError(f"QLoRALinear: weight must be an NF4Tensor, got {type(weight).__name__}; "
                      "use LoRALinear for a float base")
    super().__init__(weight, bias, **kwargs)

"""4-bit storage (NF4, FP4, Int4), byte-for-byte as bitsandbytes stores NF4 and FP4.

A weight is flattened row-major, cut into blocks of ``block_size`` elements,
scaled by each block's absolute maximum and rounded to the nearest of 16 values
of a code table: NormalFloat (``"nf4"``), bitsandbytes' FP4 E2M1 (``"fp4"``) or
symmetric integers ``-7..7 / 7`` (``"int4"``, the QLoRA paper's baseline; not a
bitsandbytes format). Two codes share a byte (element ``2i`` in the high nibble).
With double quantization the float32 block scales are themselves quantized to
8 bits in groups of 256 (bitsandbytes' signed dynamic map), which brings the
cost down to 4.127 bits per weight.

The numerics follow ``shared/notes/nf4-format.md``; every rounding is float32.
"""

from __future__ import annotations

import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jqlora.format import torch_numerics

__all__ = [
    "NF4_CODE",
    "FP4_CODE",
    "INT4_CODE",
    "CODES",
    "DYNAMIC_MAP_SIGNED",
    "NESTED_BLOCK_SIZE",
    "NF4Tensor",
    "quantize_nf4",
    "quantize_4bit",
    "double_quantize",
    "dequantize_reference",
    "dequantize_absmax",
    "storage_shapes",
]

#: The 16 NF4 values, sorted; a code is an index into this table.
NF4_CODE = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
        0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)
#: bitsandbytes' FP4 (E2M1, exponent bias 2) in bit order: bit 3 the sign, then exponent and
#: mantissa; ``get_4bit_type("fp4")``, divided by 12 in float32. Code 8 is +0.0 there, as here.
FP4_CODE = np.array([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                     0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
                    dtype=np.float32) / np.float32(12)
#: Symmetric Int4: ``q / 7`` for q = 7..0, 0..-7 (the layout of bitsandbytes' ``"int4"`` table).
INT4_CODE = np.array([7, 6, 5, 4, 3, 2, 1, 0, 0, -1, -2, -3, -4, -5, -6, -7],
                     dtype=np.float32) / np.float32(7)
#: The code table of each quant type: float32 ``[16]``, a code is an index into it.
CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE, "int4": INT4_CODE}


def _search_table(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(order, midpoints) of bitsandbytes' 4-bit search: a value goes to ``order[#midpoints < v]``.

  ``order`` is the stable argsort of ``code`` (the identity for NF4), ``midpoints`` the
  float32 means of sorted neighbours: nearest code, ties to the lower one.
  """
  order = np.argsort(code, kind="stable")
  ranked = code[order]
  return order.astype(np.uint8), ((ranked[:-1] + ranked[1:]) / np.float32(2)).astype(np.float32)


_SEARCH = {name: _search_table(code) for name, code in CODES.items()}
# The code of 0.0, which bitsandbytes pads odd element counts with (7 for NF4).
_PAD_CODES = {name: int(order[np.searchsorted(mid, 0.0, side="left")])
              for name, (order, mid) in _SEARCH.items()}


def _check_quant_type(quant_type: str) -> None:
  if quant_type not in CODES:
    raise ValueError(f"quant_type must be one of {tuple(CODES)}, got {quant_type!r}")

#: Blocks of absmax values that share one nested scale under double quantization.
NESTED_BLOCK_SIZE = 256


def _signed_dynamic_map() -> np.ndarray:
  """bitsandbytes' ``create_dynamic_map(signed=True)``: 256 float32 values."""
  values: list[float] = []
  for i in range(7):
    bounds = torch_numerics.linspace_f32(0.1, 1.0, 2**i + 1)
    means = (bounds[:-1] + bounds[1:]) / np.float32(2)
    scale = np.float32(10.0 ** (i - 6))
    values += (scale * means).astype(np.float32).tolist()
    values += (-scale * means).astype(np.float32).tolist()
  values += [0.0, 1.0]
  return np.array(sorted(values), dtype=np.float32)


#: bitsandbytes' signed 8-bit dynamic map, the codebook of double-quantized scales.
DYNAMIC_MAP_SIGNED = _signed_dynamic_map()


def _check_block_size(block_size: int) -> None:
  if (not isinstance(block_size, (int, np.integer)) or block_size < 32
      or block_size > 4096 or block_size & (block_size - 1)):
    raise ValueError(
        f"block_size must be a power of two from 32 to 4096, got {block_size!r}")


def _row_aligned(shape: tuple[int, ...], block_size: int) -> bool:
  """Whether each row (last dimension) of ``shape`` holds whole blocks: the 2-D storage layout."""
  return len(shape) >= 2 and shape[-1] % block_size == 0


def storage_shapes(shape: tuple[int, ...],
                   block_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Shapes of ``packed`` and ``absmax`` for one tensor of ``shape``.

  ``[..., in/2]`` and ``[..., in/B]`` when rows hold whole blocks (``in % block_size
  == 0``, at least 2-D), else flat ``[(n + 1) // 2]`` and ``[ceil(n / B)]``. This is
  the one place the rule lives; ``NF4Tensor.row_aligned`` reports it.
  """
  n = math.prod(shape)
  if _row_aligned(shape, block_size):
    return shape[:-1] + (shape[-1] // 2,), shape[:-1] + (shape[-1] // block_size,)
  return ((n + 1) // 2,), (-(-n // block_size),)


@jax.tree_util.register_pytree_node_class
class NF4Tensor:
  """A frozen array stored as 4-bit codes with blockwise (optionally double-quantized) scales.

  Leaves (pytree children): ``packed``, ``absmax``, ``absmax2``, ``offset``. Static
  metadata: ``shape``, ``dtype``, ``block_size``, ``double_quant`` and ``quant_type``
  (``"nf4"``, ``"fp4"`` or ``"int4"``: which table of ``CODES`` the codes index). Stacked tensors
  (layers of a scan) carry extra leading axes on their ``packed``/``absmax`` leaves
  (``stack_shape``); ``shape`` stays the shape of one tensor, and ``full_shape`` is
  ``stack_shape + shape``.

  Attributes:
    packed: uint8, two codes per byte, element ``2i`` in the high nibble; shape
      ``[..., in/2]`` when the last dimension holds whole blocks, else flat
      ``[(n + 1) // 2]``.
    absmax: float32 scale per block, or its uint8 code when ``double_quant``;
      shape ``[..., in/block_size]`` or flat ``[n_blocks]``.
    absmax2: float32 ``[ceil(n_blocks / 256)]`` nested scales, or None.
    offset: float32 scalar mean of the block scales, or None.
  """

  def __init__(self, packed, absmax, absmax2, offset, *, shape, dtype, block_size, double_quant,
               quant_type: str = "nf4"):
    _check_quant_type(quant_type)
    self.packed = packed
    self.absmax = absmax
    self.absmax2 = absmax2
    self.offset = offset
    self.shape = tuple(int(d) for d in shape)
    self.dtype = jnp.dtype(dtype)
    self.block_size = int(block_size)
    self.double_quant = bool(double_quant)
    self.quant_type = quant_type

  # -- pytree ---------------------------------------------------------------
  def tree_flatten(self):
    return ((self.packed, self.absmax, self.absmax2, self.offset),
            (self.shape, self.dtype, self.block_size, self.double_quant, self.quant_type))

  @classmethod
  def tree_unflatten(cls, aux, children):
    shape, dtype, block_size, double_quant, quant_type = aux
    return cls(*children, shape=shape, dtype=dtype, block_size=block_size,
               double_quant=double_quant, quant_type=quant_type)

  # -- properties -------------------------------------------------------------
  @property
  def code(self) -> np.ndarray:
    """float32 ``[16]``: the value of each code (``CODES[quant_type]``)."""
    return CODES[self.quant_type]

  @property
  def size(self) -> int:
    """Number of elements of the represented array."""
    return math.prod(self.shape)

  @property
  def ndim(self) -> int:
    """Dimensions of one represented tensor (``len(shape)``)."""
    return len(self.shape)

  @property
  def row_aligned(self) -> bool:
    """Whether rows hold whole blocks (``shape[-1] % block_size == 0``, at least 2-D): then
    ``packed`` is ``[*stack, ..., in/2]`` and ``absmax`` ``[*stack, ..., in/B]``, else both flat."""
    return _row_aligned(self.shape, self.block_size)

  @property
  def stack_shape(self) -> tuple[int, ...]:
    """Leading axes of the leaves beyond one tensor's storage (stacked layers), ``()`` if none."""
    per_tensor = len(self.shape) if self.row_aligned else 1
    shape = tuple(self.packed.shape)
    return shape[:len(shape) - per_tensor]

  @property
  def full_shape(self) -> tuple[int, ...]:
    """``stack_shape + shape``: the shape of the dense array the leaves represent."""
    return self.stack_shape + self.shape

  @property
  def n_blocks(self) -> int:
    """Number of ``block_size`` blocks (the last one may be partial)."""
    return -(-self.size // self.block_size)

  @property
  def nbytes(self) -> int:
    """Bytes of storage: codes, scales, nested scales and offset."""
    return sum(int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
               for leaf in (self.packed, self.absmax, self.absmax2, self.offset)
               if leaf is not None)

  def __repr__(self) -> str:
    stack = f"stack_shape={self.stack_shape}, " if self.stack_shape else ""
    kind = "" if self.quant_type == "nf4" else f", quant_type={self.quant_type!r}"
    return (f"NF4Tensor({stack}shape={self.shape}, dtype={self.dtype.name}, "
            f"block_size={self.block_size}, double_quant={self.double_quant}{kind})")

  # -- bitsandbytes interop -----------------------------------------------
  @classmethod
  def from_bnb(cls, packed, absmax, *, shape, dtype, block_size: int = 64,
               absmax2=None, offset=None, quant_type: str = "nf4") -> NF4Tensor:
    """Wraps bitsandbytes 4-bit (NF4 or FP4) storage without re-quantizing.

    Args:
      packed: uint8 codes, any shape holding ``(n + 1) // 2`` bytes (transformers
        saves ``[(n + 1) // 2, 1]``).
      absmax: float32 ``[n_blocks]`` scales, or uint8 codes when ``absmax2`` is given.
      shape: shape of the represented array, e.g. ``[out, in]``.
      dtype: dtype the array dequantizes to by default.
      block_size: elements per block.
      absmax2: float32 ``[ceil(n_blocks / 256)]`` nested scales (double quantization).
      offset: float32 scalar added to the decoded scales (double quantization).
      quant_type: ``"nf4"`` or ``"fp4"`` (the quant state's ``quant_type``).

    Returns:
      An ``NF4Tensor`` holding the same bytes.
    """
    _check_block_size(block_size)
    _check_quant_type(quant_type)
    shape = tuple(int(d) for d in shape)
    n = math.prod(shape)
    if n == 0:
      raise ValueError(f"from_bnb: shape {shape} has no elements")
    packed = np.asarray(packed)
    absmax = np.asarray(absmax)
    n_blocks = -(-n // block_size)
    if packed.dtype != np.uint8:
      raise TypeError(f"from_bnb: packed must be uint8, got {packed.dtype}")
    if packed.size != (n + 1) // 2:
      raise ValueError(
          f"from_bnb: packed has {packed.size} bytes but shape {shape} needs "
          f"{(n + 1) // 2} (two 4-bit codes per byte)")
    if absmax.size != n_blocks:
      raise ValueError(
          f"from_bnb: absmax has {absmax.size} entries but shape {shape} with "
          f"block_size={block_size} has {n_blocks} blocks")
    double_quant = absmax2 is not None
    if double_quant != (offset is not None):
      raise ValueError("from_bnb: absmax2 and offset must be given together")
    if double_quant:
      absmax2 = np.asarray(absmax2, np.float32).reshape(-1)
      n_groups = -(-n_blocks // NESTED_BLOCK_SIZE)
      if absmax.dtype != np.uint8:
        raise TypeError(
            f"from_bnb: double-quantized absmax must be uint8 codes, got {absmax.dtype}")
      if absmax2.size != n_groups:
        raise ValueError(
            f"from_bnb: absmax2 has {absmax2.size} entries but {n_blocks} blocks "
            f"need {n_groups} (one per {NESTED_BLOCK_SIZE})")
      offset = np.asarray(offset, np.float32).reshape(())
    else:
      absmax = absmax.astype(np.float32)
    packed_shape, absmax_shape = storage_shapes(shape, block_size)
    return cls(jnp.asarray(packed.reshape(packed_shape)),
               jnp.asarray(absmax.reshape(absmax_shape)),
               None if absmax2 is None else jnp.asarray(absmax2),
               None if offset is None else jnp.asarray(offset),
               shape=shape, dtype=dtype, block_size=block_size,
               double_quant=double_quant, quant_type=quant_type)

  def to_bnb(self, name: str = "weight") -> dict[str, np.ndarray]:
    """The tensors transformers saves for a bitsandbytes 4-bit weight.

    Args:
      name: the key prefix, e.g. ``"model.layers.0.mlp.up_proj.weight"``.

    Returns:
      ``{name: uint8[(n+1)//2, 1], name.absmax, name.quant_map,
      name.quant_state.bitsandbytes__<quant_type>`` and, with double quantization,
      ``name.nested_absmax, name.nested_quant_map}`` as numpy.

    Raises:
      ValueError: an ``"int4"`` tensor (not a bitsandbytes format).
    """
    if self.quant_type == "int4":
      raise ValueError("to_bnb: int4 is not a bitsandbytes format (only nf4 and fp4 are)")
    state = {"quant_type": self.quant_type, "blocksize": self.block_size,
             "dtype": self.dtype.name, "shape": list(self.shape)}
    out = {
        name: np.asarray(self.packed).reshape(-1, 1),
        f"{name}.absmax": np.asarray(self.absmax).reshape(-1),
        f"{name}.quant_map": self.code.copy(),
    }
    if self.double_quant:
      out[f"{name}.nested_absmax"] = np.asarray(self.absmax2).reshape(-1)
      out[f"{name}.nested_quant_map"] = DYNAMIC_MAP_SIGNED.copy()
      state.update(nested_blocksize=NESTED_BLOCK_SIZE, nested_dtype="float32",
                   nested_offset=float(np.asarray(self.offset)))
    out[f"{name}.quant_state.bitsandbytes__{self.quant_type}"] = np.frombuffer(
        json.dumps(state).encode(), dtype=np.uint8).copy()
    return out


def _check_finite(x: Any, what: str) -> None:
  """Raises on NaN/Inf in a concrete array; tracers are not inspected."""
  if isinstance(x, jax.core.Tracer):
    return
  bad = ~np.isfinite(np.asarray(x, dtype=np.float32))
  count = int(bad.sum())
  if count:
    first = np.unravel_index(int(np.argmax(bad.reshape(-1))), bad.shape)
    raise ValueError(
        f"{what}: input has {count} non-finite value(s) (NaN or Inf); the "
        f"first is at index {tuple(int(i) for i in first)}")


def quantize_4bit(x: jax.Array, quant_type: str = "nf4", block_size: int = 64,
                  double_quant: bool = True) -> NF4Tensor:
  """Quantizes an array to 4-bit codes, as ``bitsandbytes.functional.quantize_4bit`` on the CPU.

  Each block's values are scaled by ``1 / absmax`` (the last, partial block is divided
  by its absmax, as bitsandbytes does), clamped to [-1, 1] and given the nearest code
  of ``CODES[quant_type]`` (ties to the lower value; bitsandbytes' sorted-midpoint search).

  Args:
    x: float32/bfloat16/float16 array of any shape and at least one element.
    quant_type: ``"nf4"``, ``"fp4"`` (both byte-exact with bitsandbytes' CPU path) or
      ``"int4"`` (symmetric ``round(7 x / absmax)``, the QLoRA paper's baseline).
    block_size: elements per scale block, a power of two from 32 to 4096.
    double_quant: also quantize the block scales to 8 bits (``compress_statistics``).

  Returns:
    An ``NF4Tensor`` of ``x``'s shape and dtype. Works under ``jax.jit``.

  Raises:
    TypeError: ``x`` is not floating point.
    ValueError: empty ``x``, bad ``block_size`` or ``quant_type``, or NaN/Inf in a concrete ``x``.
  """
  what = f"quantize_4bit({quant_type!r})"
  _check_quant_type(quant_type)
  _check_block_size(block_size)
  if not hasattr(x, "dtype"):
    x = np.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{what}: expected a floating-point array, got dtype {x.dtype}")
  shape = tuple(x.shape)
  n = math.prod(shape)
  if n == 0:
    raise ValueError(f"{what}: input of shape {shape} is empty")
  _check_finite(x, what)

  n_blocks = -(-n // block_size)
  flat = jnp.asarray(x).astype(jnp.float32).reshape(-1)
  blocks = jnp.pad(flat, (0, n_blocks * block_size - n)).reshape(n_blocks, block_size)
  absmax = jnp.max(jnp.abs(blocks), axis=1)
  safe = jnp.where(absmax > 0, absmax, 1.0)
  scaled = blocks * jnp.where(absmax > 0, 1.0 / safe, 0.0)[:, None]
  if n % block_size:  # bitsandbytes divides the partial last block by its absmax
    scaled = scaled.at[-1].set(blocks[-1] / safe[-1])
  scaled = jnp.clip(scaled, -1.0, 1.0)
  order, midpoints = _SEARCH[quant_type]
  codes = jnp.sum(scaled[..., None] > jnp.asarray(midpoints), axis=-1).astype(jnp.uint8)
  if quant_type != "nf4":  # NF4's table is sorted: its order is the identity
    codes = jnp.asarray(order)[codes]
  codes = codes.reshape(-1)[:n]
  if n % 2:
    codes = jnp.concatenate([codes, jnp.full((1,), _PAD_CODES[quant_type], jnp.uint8)])
  packed = (codes[0::2] << 4) | codes[1::2]

  absmax2 = offset = None
  if double_quant:
    absmax, absmax2, offset = double_quantize(absmax)

  packed_shape, absmax_shape = storage_shapes(shape, block_size)
  return NF4Tensor(packed.reshape(packed_shape), absmax.reshape(absmax_shape), absmax2, offset,
                   shape=shape, dtype=x.dtype, block_size=block_size,
                   double_quant=double_quant, quant_type=quant_type)


def double_quantize(absmax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """bitsandbytes' double quantization of one tensor's float32 block scales ``[n_blocks]``.

  The offset is the mean of all the scales (torch's summation order) and each nested
  group spans 256 consecutive blocks, so this needs the whole tensor's scales; a
  sharded loader computes them shard by shard and calls this once per tensor.

  Returns:
    uint8 codes ``[n_blocks]``, float32 nested scales ``[ceil(n_blocks / 256)]`` and the
    float32 scalar offset.
  """
  n_blocks = absmax.shape[0]
  offset = torch_numerics.mean_f32(absmax)
  centred = absmax - offset
  n_groups = -(-n_blocks // NESTED_BLOCK_SIZE)
  groups = jnp.pad(centred, (0, n_groups * NESTED_BLOCK_SIZE - n_blocks))
  groups = groups.reshape(n_groups, NESTED_BLOCK_SIZE)
  absmax2 = jnp.max(jnp.abs(groups), axis=1)
  codes2 = torch_numerics.dynamic_codes(groups, jnp.where(absmax2 > 0, absmax2, 1.0),
                                        DYNAMIC_MAP_SIGNED)
  codes2 = jnp.where(absmax2[:, None] > 0, codes2, 0)  # 0/0 in bitsandbytes: it stores 0
  return codes2.reshape(-1)[:n_blocks].astype(jnp.uint8), absmax2, offset


def quantize_nf4(x: jax.Array, block_size: int = 64, double_quant: bool = True) -> NF4Tensor:
  """Quantizes an array to NF4, exactly as ``bitsandbytes.functional.quantize_4bit``.

  ``quantize_4bit(x, "nf4", block_size, double_quant)``; see there.
  """
  return quantize_4bit(x, "nf4", block_size, double_quant)


def dequantize_absmax(t: NF4Tensor) -> jax.Array:
  """float32 ``[n_blocks]`` block scales of ``t`` (decoding double quantization).

  The nested decode is ``code2[q] * absmax2[i // 256] + offset`` with two float32
  roundings, as bitsandbytes computes it.
  """
  absmax = t.absmax.reshape(-1)
  if not t.double_quant:
    return absmax.astype(jnp.float32)
  code2 = jnp.asarray(DYNAMIC_MAP_SIGNED)[absmax.astype(jnp.int32)]
  groups = t.absmax2.size
  nested = jnp.broadcast_to(t.absmax2.reshape(groups, 1), (groups, NESTED_BLOCK_SIZE))
  return _unfused(code2 * nested.reshape(-1)[:absmax.size]) + t.offset


def _unfused(p: jax.Array) -> jax.Array:
  """Returns ``p`` (NaN stays NaN) so that a following add cannot fuse with its product.

  XLA's CPU and GPU compilers contract ``a * b + c`` into one fused multiply-add
  (one rounding) even across ``optimization_barrier``; bitsandbytes rounds the
  product and the sum separately. A select between the product and the add
  leaves no multiply for the add to absorb.
  """
  return jnp.where(p == p, p, jnp.nan)


def dequantize_reference(t: NF4Tensor, dtype=None) -> jax.Array:
  """Decodes one (unstacked) ``NF4Tensor`` in pure jnp: the reference every kernel matches.

  Each element is ``float32(t.code[c]) * float32(scale)``, rounded once to ``dtype``
  (bitsandbytes' ``dequantize_4bit``). ``jqlora.dequantize_nf4`` chooses a faster
  backend; all of them are bit-identical to this.

  Args:
    t: the quantized tensor (``jax.vmap`` over stacked leaves).
    dtype: output dtype; defaults to ``t.dtype``.

  Returns:
    ``dtype[t.shape]``.
  """
  dtype = t.dtype if dtype is None else jnp.dtype(dtype)
  n, n_blocks, bs = t.size, t.n_blocks, t.block_size
  packed = t.packed.reshape(-1)
  if packed.size * 2 != n_blocks * bs:  # partial last block: pad with the code of 0.0
    pad = n_blocks * bs // 2 - packed.size
    packed = jnp.pad(packed, (0, pad), constant_values=_PAD_CODES[t.quant_type] * 0x11)
  packed = packed.reshape(n_blocks, bs // 2)
  # Decode the scales once, not once per element (XLA would otherwise fuse them in).
  scales = jax.lax.optimization_barrier(dequantize_absmax(t))[:, None]
  codes = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(n_blocks, bs)
  # A 16-entry gather: a select tree vectorizes better on the CPU but makes XLA keep
  # extra weight-sized buffers in the training step (+11 % peak, tests/plan/test_plan.py).
  out = (jnp.asarray(t.code)[codes] * scales).astype(dtype).reshape(-1)
  if out.size != n:
    out = out[:n]
  return out.reshape(t.shape)

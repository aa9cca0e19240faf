"""``build_model``: a ``Llama`` from Hugging Face–named tensors, read and quantized one at a time.

Each decoder-layer linear gets its logical axes (``LINEAR_AXES``) where it is
made, so the model shards by its Variables' metadata (``jqlora.parallel``).
How each (stacked) tensor is made is a ``TensorMaker``: ``WholeTensors`` reads
each tensor whole, quantizes it and stacks the layers on the default device;
``AbstractTensors`` makes only shapes (under ``nnx.eval_shape``: the model's
structure and metadata, nothing read); ``jqlora.io.sharded`` makes each tensor
straight into its shards on a mesh.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jqlora.format import NESTED_BLOCK_SIZE, NF4Tensor, quantize_4bit, storage_shapes
from jqlora.models.config import LINEAR_AXES, NORMS, LlamaConfig
from jqlora.models.layers import MLP, Attention, Block, RMSNorm
from jqlora.models.llama import EMBED_AXES, Llama
from jqlora.models.source import TensorSource
from jqlora.nn import Linear

__all__ = ["build_model", "BuildSettings", "TensorMaker", "WholeTensors", "AbstractTensors",
           "check_shape", "check_float"]

#: A Variable's path in the model's state, e.g. ``("layers", "mlp", "up_proj", "weight")``.
Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class BuildSettings:
  """How tensors are stored: ``quantize`` float linear weights as ``quant_type`` (NF4 by
  default) with ``block_size`` / ``double_quant``; everything float in ``dtype``."""

  quantize: bool = True
  dtype: Any = jnp.bfloat16
  block_size: int = 64
  double_quant: bool = True
  quant_type: str = "nf4"


class TensorMaker(Protocol):
  """Makes the model's tensors from a checkpoint (``path``: where the tensor goes in the model)."""

  def dense(self, path: Path, names: str | Sequence[str], shape: tuple[int, ...]) -> jax.Array:
    """A float tensor in the compute dtype: ``names`` one tensor of ``shape``, or several
    (one per layer) stacked along a new leading axis."""

  def linear(self, path: Path, names: Sequence[str], shape: tuple[int, int]) -> NF4Tensor | jax.Array:
    """The stacked ``[out, in]`` weights ``names`` (one per layer): stored NF4 as stored, else
    quantized (or cast) per the settings."""


def check_shape(name: str, got: tuple[int, ...], want: tuple[int, ...], what: str = "tensor") -> None:
  """Raises ValueError when tensor ``name`` does not have the shape the config needs."""
  if tuple(got) != tuple(want):
    raise ValueError(f"{what} {name!r} has shape {tuple(got)}, the config needs {tuple(want)}")


def check_float(name: str, arr: np.ndarray, finite: bool = False) -> None:
  """Raises ValueError for a non-float tensor (or, with ``finite``, one with NaN/Inf)."""
  if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.name != "bfloat16":
    raise ValueError(f"tensor {name!r} has dtype {arr.dtype}, expected a float dtype")
  if finite and not np.isfinite(np.asarray(arr, np.float32)).all():
    raise ValueError(f"tensor {name!r} has NaN or Inf values; refusing to quantize it")


def _missing(name: str, e: KeyError) -> KeyError:
  return KeyError(f"checkpoint is missing tensor {name!r} ({e.args[0] if e.args else ''})")


def _read(source: TensorSource, name: str, shape: tuple[int, ...]) -> np.ndarray:
  try:
    arr = source.get(name)
  except KeyError as e:
    raise _missing(name, e) from None
  check_shape(name, arr.shape, shape)
  check_float(name, arr)
  return arr


_quantize = jax.jit(quantize_4bit, static_argnums=(1, 2, 3))


def _stack(items: list, name: str):
  """Stacks per-layer arrays or NF4Tensors along a new leading axis."""
  structs = {jax.tree.structure(x) for x in items}
  if len(structs) != 1:
    raise ValueError(f"{name}: layers are stored differently (e.g. NF4 in some layers, "
                     "float or another block size in others); cannot stack them")
  return jax.tree.map(lambda *xs: jnp.stack(xs), *items)


def _stacked_name(names: Sequence[str]) -> str:
  return names[0].replace(".0.", ".*.", 1) if len(names) > 1 else names[0]


class WholeTensors:
  """Each tensor read whole and quantized at once, layers stacked, on the default device."""

  def __init__(self, source: TensorSource, settings: BuildSettings):
    self.source, self.settings = source, settings

  def dense(self, path: Path, names: str | Sequence[str], shape: tuple[int, ...]) -> jax.Array:
    dtype = self.settings.dtype
    if isinstance(names, str):
      return jnp.asarray(_read(self.source, names, shape), dtype)
    return _stack([jnp.asarray(_read(self.source, n, shape), dtype) for n in names],
                  _stacked_name(names))

  def _one(self, name: str, shape: tuple[int, int]) -> NF4Tensor | jax.Array:
    """One linear weight: stored NF4 as is, else read and quantized (or cast) right away."""
    s = self.settings
    nf4 = self.source.get_nf4(name)
    if nf4 is not None:
      check_shape(name, nf4.shape, shape, "NF4 tensor")
      return nf4
    w = jnp.asarray(_read(self.source, name, shape), s.dtype)
    if not s.quantize:
      return w
    if not bool(jnp.isfinite(w).all()):
      raise ValueError(f"tensor {name!r} has NaN or Inf values; refusing to quantize it")
    return _quantize(w, s.quant_type, s.block_size, s.double_quant)

  def linear(self, path: Path, names: Sequence[str], shape: tuple[int, int]) -> NF4Tensor | jax.Array:
    return _stack([self._one(n, shape) for n in names], _stacked_name(names))


def abstract_linear(source: TensorSource, settings: BuildSettings, names: Sequence[str],
                    shape: tuple[int, int]) -> NF4Tensor | jax.ShapeDtypeStruct:
  """The stacked weight's storage as ``jax.ShapeDtypeStruct`` leaves (an ``NF4Tensor`` of
  them when NF4), from the settings or the checkpoint's stored NF4 (its nested scales
  stacked as read); nothing else is read."""
  s, layers = settings, (len(names),)
  infos = [source.nf4_info(n) for n in names]
  if infos[0] is not None:
    for n, info in zip(names, infos):
      if info is None:
        raise ValueError(f"{_stacked_name(names)}: layers are stored differently (NF4 in some "
                         "layers, float in others); cannot stack them")
      check_shape(n, info.shape, shape, "NF4 tensor")
    sds = lambda x: jax.ShapeDtypeStruct(layers + tuple(x.shape), x.dtype)
    t = infos[0]
    stacked = [np.stack([np.asarray(getattr(i, k)) for i in infos]) if t.double_quant else None
               for k in ("absmax2", "offset")]
    return NF4Tensor(sds(t.packed), sds(t.absmax), *stacked, shape=t.shape, dtype=t.dtype,
                     block_size=t.block_size, double_quant=t.double_quant,
                     quant_type=t.quant_type)
  if not s.quantize:
    return jax.ShapeDtypeStruct(layers + tuple(shape), s.dtype)
  packed, absmax = storage_shapes(shape, s.block_size)
  n_blocks = -(-(shape[0] * shape[1]) // s.block_size)
  f32 = lambda *d: jax.ShapeDtypeStruct(layers + d, jnp.float32)
  return NF4Tensor(jax.ShapeDtypeStruct(layers + packed, jnp.uint8),
                   jax.ShapeDtypeStruct(layers + absmax, jnp.uint8 if s.double_quant else jnp.float32),
                   f32(-(-n_blocks // NESTED_BLOCK_SIZE)) if s.double_quant else None,
                   f32() if s.double_quant else None, shape=shape, dtype=s.dtype,
                   block_size=s.block_size, double_quant=s.double_quant, quant_type=s.quant_type)


class AbstractTensors:
  """Zeros of each tensor's shape and dtype, for ``nnx.eval_shape`` (nothing is read but the
  nested scales of stored NF4 weights); see ``abstract_linear``."""

  def __init__(self, source: TensorSource, settings: BuildSettings):
    self.source, self.settings = source, settings

  def dense(self, path: Path, names: str | Sequence[str], shape: tuple[int, ...]) -> jax.Array:
    stack = () if isinstance(names, str) else (len(names),)
    return jnp.zeros(stack + tuple(shape), self.settings.dtype)

  def linear(self, path: Path, names: Sequence[str], shape: tuple[int, int]) -> NF4Tensor | jax.Array:
    zeros = lambda x: None if x is None else jnp.zeros(x.shape, x.dtype)
    return jax.tree.map(zeros, abstract_linear(self.source, self.settings, names, shape))


def build_model(config: LlamaConfig, source: TensorSource, *, quantize: bool = True,
                dtype=jnp.bfloat16, block_size: int = 64, double_quant: bool = True,
                quant_type: str = "nf4", progress: bool = True,
                tensors: Callable[[TensorSource, BuildSettings], TensorMaker] = WholeTensors) -> Llama:
  """Builds a ``Llama`` from Hugging Face–named tensors, one (stacked) tensor at a time.

  Args:
    config: the model's config.
    source: the checkpoint; stored NF4 weights (``get_nf4``) are used as they are.
    quantize: quantize float linear weights to 4 bits as they are read (else keep
      them in ``dtype``). Embeddings, norms, biases and the LM head stay float.
    dtype: compute dtype and dtype of the float base weights.
    block_size, double_quant, quant_type: 4-bit settings for weights quantized here.
    progress: show a tqdm progress bar.
    tensors: makes the ``TensorMaker`` from the source and settings (``WholeTensors``,
      ``AbstractTensors``, or ``jqlora.io.sharded``'s maker for a mesh).

  Returns:
    The model, deterministic (eval mode), without adapters.

  Raises:
    KeyError: a tensor is missing (named).
    ValueError: a tensor has the wrong shape or non-finite values.
  """
  c = config
  d, n = c.hidden_size, c.num_hidden_layers
  make = tensors(source, BuildSettings(quantize, dtype, block_size, double_quant, quant_type))
  shapes = c.linear_shapes()
  layer_names = lambda key: [f"model.layers.{i}.{key}" for i in range(n)]
  bar = tqdm(total=len(shapes) + 3, desc="loading", unit="tensor", disable=not progress)
  embed = make.dense(("embed_tokens",), "model.embed_tokens.weight", (c.vocab_size, d))
  bar.update()

  def linear(key: str) -> Linear:
    module = tuple(key.split("."))
    w = make.linear(("layers", *module, "weight"), layer_names(f"{key}.weight"), shapes[key])
    bias = None
    if c.has_bias(key):
      bias = make.dense(("layers", *module, "bias"), layer_names(f"{key}.bias"), shapes[key][:1])
    bar.update()
    return Linear(w, bias, axes=LINEAR_AXES[key])

  def norm(key: str) -> RMSNorm:
    return RMSNorm(make.dense(("layers", key, "weight"), layer_names(f"{key}.weight"), (d,)),
                   c.rms_norm_eps)

  attn = Attention(linear("self_attn.q_proj"), linear("self_attn.k_proj"),
                   linear("self_attn.v_proj"), linear("self_attn.o_proj"),
                   num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
                   head_dim=c.head_dim)
  mlp = MLP(linear("mlp.gate_proj"), linear("mlp.up_proj"), linear("mlp.down_proj"))
  layers = Block(norm(NORMS[0]), attn, norm(NORMS[1]), mlp)
  bar.update()
  final_norm = RMSNorm(make.dense(("norm", "weight"), "model.norm.weight", (d,)), c.rms_norm_eps)
  lm_head = None
  if not c.tie_word_embeddings:
    lm_head = Linear(make.dense(("lm_head", "weight"), "lm_head.weight", (c.vocab_size, d)),
                     axes=EMBED_AXES)
  bar.update()
  bar.close()
  return Llama(c, embed, layers, final_norm, lm_head, dtype=dtype)

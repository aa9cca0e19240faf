"""Memory budget of QLoRA training per device: will it fit?

``plan`` adds up, per device of a ``(data, fsdp, tensor)`` mesh (see
``jqlora.parallel``): the NF4 codes and scales of the frozen linears, the float
frozen weights (embeddings, LM head, norms), the adapters, their gradients and
Adam moments, and the activations of one training step with or without
per-layer activation checkpointing.

Storage is exact (bitsandbytes' layout: 4 bits per weight, a uint8 scale per
64-weight block and a float32 scale per 256 blocks with double quantization).
Activations follow a model of jqlora's compiled step, stated in "copies" of
per-token vectors saved per layer and of one layer's working set, with
coefficients measured from XLA's buffer assignment (``memory_analysis()`` of the
jitted step) over a grid of model shapes; ``tests/plan/test_plan.py`` checks it
against fresh measurements. LoRA dropout's masks and what XLA:CPU adds to a 16-bit
step (a float32 copy of the LM head) were read off the buffer assignment of the
full-size steps compiled on shapes alone (``jqlora.plan.measure``,
``benchmarks/bench_plan.py``).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from jqlora.io import open_source
from jqlora.models import LlamaConfig

__all__ = ["Plan", "PRESETS", "DTYPE_BYTES", "plan", "format_plan", "parse_size"]

#: LLaMA-1 shapes used by the QLoRA paper (``--model llama-65b``), then Llama 2 and 3.
PRESETS: dict[str, dict[str, Any]] = {
    f"llama-{name}": dict(model_type="llama", vocab_size=32000, hidden_size=d,
                          intermediate_size=i, num_hidden_layers=n, num_attention_heads=h,
                          num_key_value_heads=h, max_position_embeddings=2048)
    for name, d, i, n, h in (("7b", 4096, 11008, 32, 32), ("13b", 5120, 13824, 40, 40),
                             ("33b", 6656, 17920, 60, 52), ("65b", 8192, 22016, 80, 64))
}
#: Llama 2 and Llama 3 shapes (as their ``config.json``; Llama 3: grouped-query attention, 128K vocabulary).
PRESETS |= {
    "llama-2-13b": dict(PRESETS["llama-13b"], max_position_embeddings=4096),
    **{f"llama-3-{name}": dict(model_type="llama", vocab_size=128256, hidden_size=d,
                               intermediate_size=i, num_hidden_layers=n, num_attention_heads=h,
                               num_key_value_heads=8, rope_theta=500000.0,
                               max_position_embeddings=8192)
       for name, d, i, n, h in (("8b", 4096, 14336, 32, 32), ("70b", 8192, 28672, 80, 64))},
}

_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

# Activation model, in copies of a per-device vector (x compute-dtype bytes; attention
# scores x 4 bytes): N tokens, widths d (hidden), q (heads * head_dim), kv, i (MLP),
# per-layer scores B * heads * T^2, P = dequantized weights of one layer. Measured on
# XLA CPU (float32) for jqlora's step; within 4 % over the grid that fixed them.
_SAVED = {"dq": 2.8, "kv": 2.2, "i": 6.2, "scores": 2.0}  # kept per layer, no checkpointing
_WORK = {"dq": 4.8, "kv": 1.6, "i": 7.1, "scores": 2.2, "P": 0.8, "logits": 0.25}
_SAVED_REMAT = {"x": 1.0}  # the layer inputs, with checkpointing
_WORK_REMAT = {"dq": 3.0, "kv": 1.3, "i": 12.0, "scores": 3.5, "P": 1.1, "logits": 0.0}
# selective checkpointing keeps, per layer, the input and mid-layer residual (2 d), q and the
# attention output (2 q), k, v (2 kv), gate and up (2 i): models.layers.SELECTIVE_SAVES
_SAVED_SELECTIVE = {"dq": 2.0, "kv": 2.0, "i": 2.0}
# its working set: per-layer checkpointing's, less the SwiGLU intermediates it does not rebuild
# (fixed on test_plan's two shapes, checked on a third: within 1.5 %)
_WORK_SELECTIVE = {**_WORK_REMAT, "i": 5.0}
_LOGITS_COPIES = 2  # float32 logits and their gradient, live together at the loss
# LoRA dropout: the random bits (uint32) and the float32 dropped-out input of every linear of
# one layer, in the working set (read off XLA:CPU's buffer assignment, with checkpointing).
_DROPOUT_COPIES = 2


@dataclasses.dataclass(frozen=True)
class Plan:
  """Bytes per device of one QLoRA training step, and whether it fits.

  Attributes:
    model: a short description of the model.
    mesh: ``{"data", "fsdp", "tensor"}`` sizes.
    batch, seq: the global batch and sequence length; ``tokens_per_device``.
    nf4_weights: NF4 codes of the frozen linears.
    nf4_scales: their block scales (and nested scales with double quantization).
    frozen_weights: embeddings, LM head, norms and biases in the base dtype.
    adapters, gradients: LoRA weights and their gradients.
    optimizer: Adam's two float32 moments (0 when offloaded/paged to the host).
    activations_full / activations_checkpointed / activations_selective: activations
      of one step without, with per-layer and with selective checkpointing;
      ``activations`` is the chosen one.
    total: the sum of the above with the chosen activations.
    memory_per_device: the budget; ``fits``: ``total <= memory_per_device``.
    lora_r, target_modules: the adapters' rank and the decoder linears adapted.
    dtype, base_dtype, adapter_dtype: of activations, float frozen weights, adapters.
    optimizer_offload: Adam moments on the host (not counted).
    lora_dropout: the adapters' dropout rate (its masks are counted when > 0).
    upcast_matmuls: the backend computes 16-bit matmuls in float32 (XLA:CPU) and
      keeps a float32 copy of the LM head, counted in the activations.
  """

  model: str
  mesh: dict[str, int]
  batch: int
  seq: int
  tokens_per_device: int
  checkpointing: bool | str
  nf4_weights: int
  nf4_scales: int
  frozen_weights: int
  adapters: int
  gradients: int
  optimizer: int
  activations_full: int
  activations_checkpointed: int
  activations_selective: int
  memory_per_device: int | None
  lora_r: int = 8
  target_modules: tuple[str, ...] = _LINEARS
  dtype: str = "bfloat16"
  base_dtype: str = "bfloat16"
  adapter_dtype: str = "float32"
  optimizer_offload: bool = False
  lora_dropout: float = 0.0
  upcast_matmuls: bool = False

  @property
  def activations(self) -> int:
    if self.checkpointing == "selective":
      return self.activations_selective
    return self.activations_checkpointed if self.checkpointing else self.activations_full

  @property
  def weights(self) -> int:
    """Frozen base model: NF4 codes, scales and float weights."""
    return self.nf4_weights + self.nf4_scales + self.frozen_weights

  @property
  def total(self) -> int:
    return (self.weights + self.adapters + self.gradients + self.optimizer
            + self.activations)

  @property
  def fits(self) -> bool:
    return self.memory_per_device is None or self.total <= self.memory_per_device


def parse_size(text: str | int) -> int:
  """Bytes in ``"48GiB"``, ``"80GB"``, ``"512 MiB"``, ``"1.5TB"`` or a plain byte count.

  Raises:
    ValueError: an unknown unit or a malformed size.
  """
  if isinstance(text, int):
    return text
  m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
  unit = m.group(2).lower() if m else None
  if m is None or unit not in _UNITS:
    raise ValueError(f"memory size {text!r}: expected a number with a unit such as 48GiB, "
                     f"80GB or 512MiB (units: {', '.join(u for u in _UNITS if u)})")
  return int(float(m.group(1)) * _UNITS[unit])


def _config(model: LlamaConfig | Mapping[str, Any] | str | pathlib.Path) -> LlamaConfig:
  """A ``LlamaConfig`` from a config, HF config dict, preset name, config.json or model path."""
  if isinstance(model, LlamaConfig):
    return model
  if isinstance(model, Mapping):
    return LlamaConfig.from_hf(dict(model))
  if str(model) in PRESETS:
    return LlamaConfig.from_hf(PRESETS[str(model)])
  path = pathlib.Path(model)
  if path.suffix == ".json":
    if not path.is_file():
      raise FileNotFoundError(f"plan: no config file {path}")
    return LlamaConfig.from_hf(json.loads(path.read_text()))
  return LlamaConfig.from_hf(open_source(path).hf_config())


def _targets(target_modules: str | Sequence[str]) -> tuple[str, ...]:
  if target_modules == "all-linear":
    return _LINEARS
  names = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
  unknown = [n for n in names if n not in _LINEARS]
  if unknown:
    raise ValueError(f"plan: target_modules {unknown} are not decoder linears; use 'all-linear' "
                     f"or names from {list(_LINEARS)}")
  return names


def _dtype_bytes(dtype: str) -> int:
  if dtype not in DTYPE_BYTES:
    raise ValueError(f"plan: dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
  return DTYPE_BYTES[dtype]


def _nf4_bytes(out: int, inp: int, block_size: int, double_quant: bool) -> tuple[int, int, int]:
  """``(codes, block scales, nested scales + offset)`` bytes of one ``[out, in]`` NF4 weight."""
  n = out * inp
  blocks = -(-n // block_size)
  if not double_quant:
    return (n + 1) // 2, 4 * blocks, 0
  return (n + 1) // 2, blocks, 4 * -(-blocks // 256) + 4


def plan(model: LlamaConfig | Mapping[str, Any] | str | pathlib.Path, *, devices: int = 1,
         memory_per_device: int | str | None = None, batch: int = 1, seq: int = 512,
         lora_r: int = 8, target_modules: str | Sequence[str] = "all-linear",
         data: int | None = None, fsdp: int | None = None, tensor: int = 1,
         checkpointing: bool | str = False, dtype: str = "bfloat16", base_dtype: str | None = None,
         adapter_dtype: str = "float32", block_size: int = 64, double_quant: bool = True,
         optimizer_offload: bool = False, lora_dropout: float = 0.0,
         upcast_matmuls: bool = False) -> Plan:
  """The per-device memory budget of QLoRA training.

  The defaults are ``jqlora train``'s (``TrainConfig``): rank 8 on every decoder
  linear, batch 1 x 512 tokens, bfloat16, no activation checkpointing.

  Args:
    model: a ``LlamaConfig``, an HF ``config.json`` dict or path, a checkpoint
      folder/GGUF (its config is read), or a preset name (``PRESETS``).
    devices: number of devices; ``data * fsdp * tensor`` must equal it.
    memory_per_device: bytes or a size such as ``"48GiB"``; None: no verdict.
    batch: global batch (sequences per step); seq: tokens per sequence.
    lora_r, target_modules: adapter rank and the decoder linears adapted.
    data, fsdp, tensor: the mesh; by default all devices beyond ``tensor`` go to
      ``fsdp`` (the frozen weights are split across every device).
    checkpointing: recompute each layer in the backward pass (training's
      ``gradient_checkpointing``, off by default there too); ``"selective"``: keep
      only the values ``Llama.remat = "selective"`` keeps.
    dtype: compute dtype of the activations; base_dtype: of the float frozen
      weights (default ``dtype``); adapter_dtype: of adapters and gradients.
    block_size, double_quant: NF4 settings.
    optimizer_offload: Adam moments live on the host (QLoRA's paged optimizer).
    lora_dropout: LoRA dropout rate; above 0 each linear of the layer being
      computed holds a uint32 mask and a float32 dropped-out copy of its input.
    upcast_matmuls: count what XLA:CPU adds to a 16-bit step: it computes bf16
      matmuls in float32 and keeps a float32 copy of the LM head (``vocab x
      hidden x 4`` bytes, split over ``tensor``) for the forward and backward pass
      (read off its buffer assignment). Off: a backend with native 16-bit
      matmuls (GPUs, TPUs). With ``fsdp > 1`` either way the head's matmul
      gathers the head whole over ``fsdp`` (its contracted ``embed`` axis is split
      there), counted in the working set: float32 when upcast, else ``base_dtype``
      (XLA:CPU's partitioned step does so; not yet measured on a GPU).

  Returns:
    A ``Plan``.

  Raises:
    ValueError: a mesh that does not multiply to ``devices``, or bad sizes.
  """
  c = _config(model)
  if fsdp is None:
    fsdp = devices // (tensor * (data or 1))
  if data is None:
    data = devices // (fsdp * tensor) if fsdp * tensor else 0
  if data * fsdp * tensor != devices or min(data, fsdp, tensor) < 1:
    raise ValueError(f"plan: mesh data * fsdp * tensor = {data} * {fsdp} * {tensor} must equal "
                     f"devices = {devices}")
  for name, value in (("batch", batch), ("seq", seq), ("lora_r", lora_r)):
    if value < 1:
      raise ValueError(f"plan: {name} must be positive, got {value}")
  s, s_base, s_ad = _dtype_bytes(dtype), _dtype_bytes(base_dtype or dtype), \
      _dtype_bytes(adapter_dtype)
  split, targets = fsdp * tensor, _targets(target_modules)
  shapes = {k.split(".")[-1]: v for k, v in c.linear_shapes().items()}
  L, d, V = c.num_hidden_layers, c.hidden_size, c.vocab_size

  codes = scales = nested = adapter_params = 0
  for name, (out, inp) in shapes.items():
    w_codes, w_scales, w_nested = _nf4_bytes(out, inp, block_size, double_quant)
    codes += L * w_codes
    scales += L * w_scales
    nested += L * w_nested  # absmax2 and offset stay replicated
    if name in targets:
      adapter_params += L * lora_r * (out + inp)
  heads = 1 if c.tie_word_embeddings else 2
  biases = L * sum(out for k, (out, _) in c.linear_shapes().items() if c.has_bias(k))
  frozen_split = heads * V * d * s_base
  frozen_replicated = ((2 * L + 1) * d + biases) * s_base

  b_dev = -(-batch // (data * fsdp))
  n = b_dev * seq
  q = c.num_attention_heads * c.head_dim // tensor
  kv = c.num_key_value_heads * c.head_dim // tensor
  i = c.intermediate_size // tensor
  scores = b_dev * (c.num_attention_heads // max(1, tensor)) * seq * seq * 4
  per_layer_params = sum(o * k for o, k in shapes.values()) // tensor
  widths = {"dq": n * (d + q) * s, "kv": n * kv * s, "i": n * i * s, "scores": scores,
            "P": per_layer_params * s, "logits": n * V * 4, "x": n * d * s,
            "dropout": n * (5 * d + q + i) * 4}  # inputs of q, k, v, gate, up (d), o (q), down (i)

  def copies(coef: Mapping[str, float]) -> float:
    return sum(v * widths[k] for k, v in coef.items())

  logits_phase = _LOGITS_COPIES * widths["logits"]
  # The LM head's matmul contracts its ``embed`` axis, which fsdp splits: the head is gathered
  # whole over fsdp (split by tensor alone), in float32 where XLA:CPU upcasts the matmul.
  head_bytes = 4 if upcast_matmuls and s < 4 else s_base if fsdp > 1 else 0
  head_copy = -(-V * d * head_bytes // tensor)
  work = head_copy + (_DROPOUT_COPIES * widths["dropout"] if lora_dropout > 0 else 0)
  full = max(L * copies(_SAVED) + copies(_WORK), L * copies(_SAVED) + logits_phase) + work
  remat = max(L * copies(_SAVED_REMAT) + copies(_WORK_REMAT),
              L * copies(_SAVED_REMAT) + logits_phase) + work
  selective = max(L * copies(_SAVED_SELECTIVE) + copies(_WORK_SELECTIVE),
                  L * copies(_SAVED_SELECTIVE) + logits_phase) + work

  adapters = -(-adapter_params // split)
  shape = f"{c.model_type} L={L} d={d} ffn={c.intermediate_size} vocab={V}"
  name = str(model) if isinstance(model, (str, pathlib.Path)) else c.hf.get("_name_or_path")
  name = f"{name} ({shape})" if name else shape
  return Plan(
      model=str(name), mesh={"data": data, "fsdp": fsdp, "tensor": tensor}, batch=batch,
      seq=seq, tokens_per_device=n, checkpointing=checkpointing,
      nf4_weights=-(-codes // split),
      nf4_scales=-(-scales // split) + nested,
      frozen_weights=-(-frozen_split // split) + frozen_replicated,
      adapters=adapters * s_ad, gradients=adapters * s_ad,
      optimizer=0 if optimizer_offload else adapters * 8,
      activations_full=int(full), activations_checkpointed=int(remat),
      activations_selective=int(selective),
      memory_per_device=None if memory_per_device is None else parse_size(memory_per_device),
      lora_r=lora_r, target_modules=targets, dtype=dtype, base_dtype=base_dtype or dtype,
      adapter_dtype=adapter_dtype, optimizer_offload=optimizer_offload,
      lora_dropout=lora_dropout, upcast_matmuls=upcast_matmuls)


def _human(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
    n /= 1024
  return f"{n}"


def _assumptions(p: Plan) -> list[tuple[str, str]]:
  """``(what, assumed)`` rows: the run ``p`` was computed for."""
  devices = p.mesh["data"] * p.mesh["fsdp"] * p.mesh["tensor"]
  mesh = " x ".join(f"{k}={v}" for k, v in p.mesh.items())
  targets = "all-linear" if tuple(p.target_modules) == _LINEARS else ",".join(p.target_modules)
  floats = (f"{p.dtype} activations and float weights" if p.base_dtype == p.dtype
            else f"{p.dtype} activations, {p.base_dtype} float weights")
  return [
      ("model", p.model),
      ("devices, mesh", f"{devices} device{'s' if devices > 1 else ''}: {mesh}"),
      ("batch x seq", f"{p.batch} x {p.seq} (global; {p.tokens_per_device} tokens per device)"),
      ("LoRA", f"r={p.lora_r} on {targets}"
       + (f", dropout {p.lora_dropout:g}" if p.lora_dropout else "")),
      ("checkpointing", "selective: projections kept, norms, RoPE, softmax, SwiGLU recomputed"
       if p.checkpointing == "selective" else "on: each layer recomputed in the backward pass"
       if p.checkpointing else "off: every layer's activations kept for the backward pass"),
      ("dtype", f"{floats}; {p.adapter_dtype} adapters and gradients"),
      ("optimizer offload", "on: Adam moments on the host (paged), not counted"
       if p.optimizer_offload else "off: Adam's two float32 moments on the device"),
  ] + ([("matmuls", "16-bit matmuls in float32, a float32 copy of the LM head (XLA:CPU)")]
       if p.upcast_matmuls else [])


def format_plan(p: Plan, header: str = "assumptions:") -> str:
  """The assumptions ``p`` was computed for, a table of its bytes per device and the verdict.

  Args:
    p: a ``Plan``.
    header: the line above the assumptions (say where they came from).
  """
  rows = [("NF4 weights (codes)", p.nf4_weights), ("NF4 scales", p.nf4_scales),
          ("frozen float weights", p.frozen_weights), ("LoRA adapters", p.adapters),
          ("adapter gradients", p.gradients), ("optimizer state (Adam)", p.optimizer),
          ("activations, no checkpointing" + (" " if p.checkpointing else " *"),
           p.activations_full),
          ("activations, selective checkpointing"
           + (" *" if p.checkpointing == "selective" else " "), p.activations_selective),
          ("activations, per-layer checkpointing"
           + (" *" if p.checkpointing is True else " "), p.activations_checkpointed)]
  assumed = _assumptions(p)
  label_width = max(len(k) for k, _ in assumed) + 2
  lines = [header] + [f"  {k:<{label_width}}{v}" for k, v in assumed] + [""]
  width = max(len(r[0]) for r in rows) + 2
  lines += [f"{label:<{width}}{_human(v):>14}" for label, v in rows]
  lines += ["-" * (width + 14), f"{'total per device (*)':<{width}}{_human(p.total):>14}"]
  if p.memory_per_device is not None:
    verdict = "fits" if p.fits else "does NOT fit"
    lines.append(f"{'memory per device':<{width}}{_human(p.memory_per_device):>14}   {verdict}")
  return "\n".join(lines)

"""XLA's own count of a training step's memory, on real models or on shapes alone.

``measure`` compiles (runs nothing) the real ``jqlora.train_step`` and reads
XLA's buffer assignment (``memory_analysis()``); ``abstract_model`` makes a
jqlora model of any size whose arrays are ``jax.ShapeDtypeStruct`` s
(``nnx.eval_shape`` over ``build_model`` and ``apply_lora``: nothing is
allocated), so a 65B step compiles on a laptop. With a mesh the step is
compiled SPMD-partitioned (on simulated CPU devices, e.g.
``XLA_FLAGS=--xla_force_host_platform_device_count=8``) and the count is per
device. The decoder layers are a scan, so compile time does not grow with depth.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jqlora.format import NF4Tensor, storage_shapes
from jqlora.models import LlamaConfig, build_model
from jqlora.nn import LoraConfig, apply_lora
from jqlora.parallel import batch_sharding, make_mesh, model_shardings, shard_activations
from jqlora.plan.budget import Plan, plan
from jqlora.plan.budget import _config as budget_config
from jqlora.plan.budget import _human as human
from jqlora.training import functional_step, make_optimizer, make_schedule, make_tx

__all__ = ["PAPER_LORA", "Measurement", "abstract_model", "format_measured", "measure",
           "measure_plan"]

#: The QLoRA paper's adapters: r=64, alpha=16, dropout 0.05 on every linear layer.
PAPER_LORA = LoraConfig(r=64, alpha=16, dropout=0.05, target_modules="all-linear")


class _ShapeSource:
  """A ``TensorSource`` of zeros of the right shapes, NF4 weights "stored": traced under
  ``nnx.eval_shape`` it gives shapes only."""

  def __init__(self, config: LlamaConfig, dtype, block_size: int, double_quant: bool):
    self.config, self.dtype = config, jnp.dtype(dtype)
    self.block_size, self.double_quant = block_size, double_quant

  def hf_config(self) -> dict[str, Any]:
    return self.config.to_hf()

  def names(self) -> list[str]:
    return []

  def _linear(self, name: str) -> tuple[int, int] | None:
    parts = name.split(".")  # model.layers.{i}.{self_attn|mlp}.{linear}.{weight|bias}
    return self.config.linear_shapes().get(".".join(parts[3:5])) if len(parts) == 6 else None

  def get(self, name: str) -> jax.Array:
    c, linear = self.config, self._linear(name)
    if linear is not None:
      shape = linear[:1] if name.endswith(".bias") else linear
    elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
      shape = (c.vocab_size, c.hidden_size)
    else:
      shape = (c.hidden_size,)  # the norms
    return jnp.zeros(shape, self.dtype)

  def get_nf4(self, name: str) -> NF4Tensor | None:
    shape = self._linear(name)
    if shape is None:
      return None
    packed, absmax = storage_shapes(shape, self.block_size)
    blocks = -(-math.prod(shape) // self.block_size)
    dq = self.double_quant
    return NF4Tensor(jnp.zeros(packed, jnp.uint8),
                     jnp.zeros(absmax, jnp.uint8 if dq else jnp.float32),
                     jnp.zeros((-(-blocks // 256),), jnp.float32) if dq else None,
                     jnp.zeros((), jnp.float32) if dq else None, shape=shape, dtype=self.dtype,
                     block_size=self.block_size, double_quant=dq)


def abstract_model(config: LlamaConfig, lora: LoraConfig = PAPER_LORA, *, dtype=jnp.bfloat16,
                   block_size: int = 64, double_quant: bool = True, remat: bool = True,
                   train: bool = True) -> nnx.Module:
  """A jqlora ``Llama`` with an NF4 base and adapters, holding only shapes (nothing allocated).

  Args:
    config: the model's shapes.
    lora: the adapters (default: the QLoRA paper's, ``PAPER_LORA``).
    dtype: compute dtype and dtype of the float base weights.
    block_size, double_quant: NF4 settings.
    remat: per-layer activation checkpointing (``model.remat``).
    train: training mode (LoRA dropout active).

  Returns:
    The model; every array in its state is a ``jax.ShapeDtypeStruct``.
  """
  def build() -> nnx.Module:
    source = _ShapeSource(config, dtype, block_size, double_quant)
    model = build_model(config, source, dtype=dtype, block_size=block_size,
                        double_quant=double_quant, progress=False)
    return apply_lora(model, lora, rngs=nnx.Rngs(0))

  model = nnx.eval_shape(build)
  model.remat = remat
  if train:
    model.train()
  return model


@dataclasses.dataclass(frozen=True)
class Measurement:
  """XLA's buffer assignment of one compiled train step, in bytes per device.

  Attributes:
    arguments, outputs, aliased, temporaries: ``memory_analysis()``'s sizes
      (model and optimizer state are donated, so outputs alias them).
    optimizer_state: bytes of the optimizer-state arguments (Adam's moments and counters).
    compile_seconds: lowering plus compilation.
    hlo_chars: length of the optimized HLO text; while_loops: ``while`` ops in it
      (the layer scan is one: the program does not grow with depth).
  """

  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  optimizer_state: int
  compile_seconds: float
  hlo_chars: int
  while_loops: int

  @property
  def total(self) -> int:
    """Peak bytes with the optimizer state on the device: arguments + outputs - aliased + temporaries."""
    return self.arguments + self.outputs - self.aliased + self.temporaries

  def peak(self, optimizer_offload: bool = False) -> int:
    """``total``, less the optimizer state when it lives on the host (a paged optimizer)."""
    return self.total - (self.optimizer_state if optimizer_offload else 0)


def _per_device_bytes(x: Any) -> int:
  shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
  return math.prod(shape) * jnp.dtype(x.dtype).itemsize


def _abstract(state: Any, mesh: Mesh | None) -> Any:
  """``state``'s arrays as ``ShapeDtypeStruct`` s, with their ``NamedSharding`` on ``mesh``."""
  if mesh is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                      model_shardings(state, mesh))


def measure(model: nnx.Module, *, batch: int, seq: int, mesh: Mesh | None = None) -> Measurement:
  """XLA's count of one compiled ``jqlora.train_step``, per device.

  Compiles (runs nothing) the step as the training loop runs it, model and
  optimizer state donated, on ``[batch, seq]`` int32 inputs; AdamW state for
  the adapters is made from shapes. ``model`` may be real or from
  ``abstract_model``; its ``remat`` selects checkpointing and its mode dropout.

  Args:
    model: a jqlora model with adapters (``jqlora.apply_lora``).
    batch, seq: the global batch shape.
    mesh: compile the SPMD-partitioned step for this mesh (``jqlora.parallel``
      shardings; the batch, and the hidden states, split over ``data x fsdp``:
      ``shard_activations`` sets ``model``'s ``hidden_sharding``); None: one device
      (``hidden_sharding`` unset).

  Returns:
    A ``Measurement``; ``.total`` is the figure ``plan(...).total`` estimates.
  """
  tx = make_tx(make_schedule("constant", 1e-3, 10))
  optimizer = nnx.eval_shape(lambda m: make_optimizer(m, tx), model)
  step, state, opt_state = functional_step(shard_activations(model, mesh), optimizer)
  state, opt_state = _abstract(state, mesh), _abstract(opt_state, mesh)

  sharding = None if mesh is None else batch_sharding(mesh)
  ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=sharding)
  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      state, opt_state, {"input_ids": ids, "labels": ids}).compile()
  seconds = time.perf_counter() - start
  m, hlo = compiled.memory_analysis(), compiled.as_text()
  return Measurement(
      arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
      aliased=m.alias_size_in_bytes, temporaries=m.temp_size_in_bytes,
      optimizer_state=sum(_per_device_bytes(x) for x in jax.tree.leaves(opt_state)),
      compile_seconds=seconds, hlo_chars=len(hlo), while_loops=hlo.count(" while("))


def measure_plan(p: Plan, model: Any) -> dict[str, Any]:
  """XLA's count of the step that ``p`` plans, compiled on shapes alone, beside the plan.

  The model is ``abstract_model`` of ``model``'s config with ``p``'s rank,
  targets, dropout, dtype and checkpointing; with more than one device in ``p.mesh`` the
  step is compiled for that mesh (this process must see that many devices: on
  the CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=N``). The
  optimizer state is left out of ``peak`` when ``p.optimizer_offload``.

  Args:
    p: a plan (``jqlora.plan.plan``).
    model: what ``p`` was planned for (preset, config.json, checkpoint, ``LlamaConfig``).

  Returns:
    ``memory_analysis()``'s bytes per device, ``optimizer_state``, ``peak``,
    ``plan`` (``p``'s total, counting what this backend adds, see
    ``plan(upcast_matmuls=)``), ``error`` (plan / peak - 1), ``backend`` and
    ``compile_seconds``.

  Raises:
    ValueError: the mesh needs more devices than this process sees.
  """
  backend = jax.default_backend()
  lora = LoraConfig(r=p.lora_r, alpha=16, dropout=p.lora_dropout, target_modules=list(p.target_modules),
                    dtype=p.adapter_dtype)
  abstract = abstract_model(budget_config(model), lora, dtype=jnp.dtype(p.dtype),
                            remat=p.checkpointing)
  devices = math.prod(p.mesh.values())
  if devices > 1 and jax.device_count() < devices:
    raise ValueError(f"plan --measure: the mesh needs {devices} devices and there are "
                     f"{jax.device_count()}; on the CPU set XLA_FLAGS="
                     f"--xla_force_host_platform_device_count={devices}")
  mesh = make_mesh(**p.mesh, devices=jax.devices()[:devices]) if devices > 1 else None
  m = measure(abstract, batch=p.batch, seq=p.seq, mesh=mesh)
  if backend == "cpu":  # the plan of this backend: XLA:CPU's float32 matmuls counted
    p = plan(model, devices=devices, **p.mesh, batch=p.batch, seq=p.seq, lora_r=p.lora_r,
             target_modules=p.target_modules, checkpointing=p.checkpointing, dtype=p.dtype,
             base_dtype=p.base_dtype, adapter_dtype=p.adapter_dtype,
             optimizer_offload=p.optimizer_offload, lora_dropout=p.lora_dropout,
             upcast_matmuls=True)
  peak = m.peak(p.optimizer_offload)
  return {"backend": backend, "arguments": m.arguments, "outputs": m.outputs,
          "aliased": m.aliased, "temporaries": m.temporaries,
          "optimizer_state": m.optimizer_state, "optimizer_offload": p.optimizer_offload,
          "peak": peak, "plan": p.total, "error": p.total / peak - 1,
          "compile_seconds": m.compile_seconds}


def format_measured(measured: dict[str, Any]) -> str:
  """``measure_plan``'s figures as lines to print below ``format_plan``'s table."""
  offload = measured["optimizer_offload"]
  rows = [("arguments", measured["arguments"]), ("outputs", measured["outputs"]),
          ("aliased (donated state)", -measured["aliased"]),
          ("temporaries", measured["temporaries"])]
  if offload:
    rows.append(("optimizer state, on the host", -measured["optimizer_state"]))
  rows += [("XLA peak per device", measured["peak"]),
           (f"plan on {measured['backend']}", measured["plan"])]
  width = max(len(k) for k, _ in rows) + 2
  lines = ["", f"XLA's buffer assignment of the compiled step ({measured['backend']}, shapes only, "
           f"{measured['compile_seconds']:.1f} s to compile):"]
  lines += [f"  {k:<{width}}{human(v):>14}" for k, v in rows]
  lines.append(f"  plan vs XLA: {measured['error']:+.1%}")
  return "\n".join(lines)

"""XLA's own count of a training step's memory, to check the analytic plan against."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jqlora.training import make_optimizer, make_schedule, make_tx, train_step

__all__ = ["measure"]


def measure(model: Any, *, batch: int, seq: int) -> int:
  """Peak bytes of one compiled ``jqlora.train_step`` on one device, from XLA's buffer assignment.

  Compiles (runs nothing) the step as the training loop runs it, model and
  optimizer state donated, on ``[batch, seq]`` int32 inputs, and returns
  arguments + outputs - aliased + temporaries of ``memory_analysis()``: the
  figure ``plan(...).total`` estimates (``model.remat`` selects checkpointing).

  Args:
    model: a jqlora model with adapters (``jqlora.apply_lora``).
    batch, seq: the batch shape.
  """
  optimizer = make_optimizer(model, make_tx(make_schedule("constant", 1e-3, 10)))
  graphdef, state = nnx.split(model)
  opt_graphdef, opt_state = nnx.split(optimizer)

  def step(state, opt_state, inputs):
    m, o = nnx.merge(graphdef, state), nnx.merge(opt_graphdef, opt_state)
    metrics = train_step(m, o, inputs)
    return nnx.state(m), nnx.state(o), metrics

  ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      state, opt_state, {"input_ids": ids, "labels": ids}).compile()
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)

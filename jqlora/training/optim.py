"""Optimizers that update only the LoRA adapters, and learning-rate schedules."""

from __future__ import annotations

from typing import Literal

import optax
from flax import nnx

__all__ = ["make_optimizer", "make_schedule", "make_tx", "nonfinite_counts"]


def make_schedule(kind: Literal["constant", "linear", "cosine"], learning_rate: float,
                  total_steps: int, warmup_steps: int = 0) -> optax.Schedule:
  """A learning-rate schedule with a linear warmup from 0.

  Args:
    kind: "constant" (after warmup), "linear" (decay to 0) or "cosine" (decay to 0).
    learning_rate: the peak rate.
    total_steps: optimizer steps in the run, warmup included.
    warmup_steps: steps of linear warmup from 0 to ``learning_rate``.

  Returns:
    ``step -> learning rate`` (float32).
  """
  warmup_steps = min(warmup_steps, total_steps)
  decay_steps = max(total_steps - warmup_steps, 1)
  if kind == "constant":
    after = optax.constant_schedule(learning_rate)
  elif kind == "linear":
    after = optax.linear_schedule(learning_rate, 0.0, decay_steps)
  elif kind == "cosine":
    after = optax.cosine_decay_schedule(learning_rate, decay_steps)
  else:
    raise ValueError(f"lr_scheduler must be 'constant', 'linear' or 'cosine', got {kind!r}")
  if warmup_steps == 0:
    return after
  warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return optax.join_schedules([warmup, after], [warmup_steps])


def make_tx(schedule: optax.Schedule, *, weight_decay: float = 0.0, b1: float = 0.9,
            b2: float = 0.999, eps: float = 1e-8, max_grad_norm: float | None = 1.0,
            max_nonfinite_steps: int = 10) -> optax.GradientTransformation:
  """AdamW with optional global-norm clipping (applied before the moments), skipping
  non-finite updates.

  The whole chain is wrapped in ``optax.apply_if_finite``: an update with a NaN or
  infinite gradient leaves the adapters, the moments and the schedule's count as
  they were, and is counted (``nonfinite_counts``). After ``max_nonfinite_steps``
  consecutive ones optax gives up and applies the next; ``jqlora train`` stops
  before that.
  """
  tx = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  if max_grad_norm is not None:
    tx = optax.chain(optax.clip_by_global_norm(max_grad_norm), tx)
  return optax.apply_if_finite(tx, max_nonfinite_steps)


def nonfinite_counts(optimizer: nnx.Optimizer) -> tuple[int, int]:
  """``(consecutive, total)`` non-finite updates skipped by a ``make_tx`` optimizer."""
  state = optimizer.opt_state
  if not isinstance(state, optax.ApplyIfFiniteState):
    raise TypeError(f"the optimizer's transformation is not optax.apply_if_finite (state "
                    f"{type(state).__name__}); build it with make_tx")
  return int(state.notfinite_count[...]), int(state.total_notfinite[...])


def make_optimizer(model: nnx.Module, tx: optax.GradientTransformation,
                   wrt: nnx.filterlib.Filter = nnx.LoRAParam) -> nnx.Optimizer:
  """Wraps ``tx`` so that only the adapters (``nnx.LoRAParam``) are optimized.

  The optimizer state is built over the ``wrt`` leaves only: frozen NF4 storage
  and every other weight carry no moments, and ``train_step`` differentiates
  with respect to the same filter, so they never change.

  Args:
    model: an NNX model holding ``nnx.LoRAParam`` adapters (``jqlora.apply_lora``).
    tx: any optax transformation (e.g. ``optax.adamw(2e-4)``).
    wrt: the trainable variables; the default is the adapters.

  Returns:
    An ``nnx.Optimizer`` whose state holds float32 moments for the adapters only.

  Raises:
    ValueError: if the model has no variable of the ``wrt`` type.
  """
  if not nnx.state(model, wrt):
    raise ValueError(f"{type(model).__name__} has no trainable {wrt} leaves: "
                     "call jqlora.apply_lora(model, config, rngs=...) first")
  return nnx.Optimizer(model, tx, wrt=wrt)

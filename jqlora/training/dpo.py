"""Direct preference optimisation on the frozen base: TRL's losses, one compiled step, no second model.

A preference batch is the SFT batch contract (``jqlora.training.batch``) with
pairs on the batch axis: rows ``2i`` and ``2i + 1`` are pair ``i``'s chosen and
rejected sequences (prompt + completion), whose ``labels`` mark the completion
tokens only. A sequence's log-probability is the sum over those tokens. The
reference model is the same model with its LoRA adapters switched off
(``jqlora.nn.disable_adapters``) under ``jax.lax.stop_gradient``: one forward of
the ``[2B, T]`` rows with the adapters and one without, inside the one compiled
step, on the same weights (no copy of the base).

The losses are TRL 1.16's ``DPOTrainer`` ones (``loss_type``), with
``delta = (pi_c - ref_c) - (pi_r - ref_r)`` of the summed completion log-probs:

- ``sigmoid``: ``-log sigmoid(beta * delta)`` (DPO);
- ``hinge``: ``relu(1 - beta * delta)`` (SLiC);
- ``ipo``: ``(delta' - 1 / (2 beta))**2`` with ``delta'`` from log-ratios divided by
  each completion's token count (TRL's length-normalised IPO).

Rewards are ``beta * (pi - ref)``; metrics use TRL's names (``rewards/chosen``,
``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jqlora.nn import disable_adapters
from jqlora.training.batch import Batch
from jqlora.training.data import Example, eval_batches
from jqlora.training.step import next_token_targets, train_step

__all__ = ["LOSS_TYPES", "DPOLoss", "dpo_loss", "sequence_logps", "preference_logps", "dpo_step",
           "evaluate_preferences"]

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
LossType = Literal["sigmoid", "ipo", "hinge"]


def dpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array,
             ref_rejected: jax.Array, *, beta: float, loss_type: LossType = "sigmoid",
             chosen_tokens: jax.Array | None = None,
             rejected_tokens: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-pair loss and implicit rewards from summed completion log-probs (module docstring).

  Args:
    policy_chosen, policy_rejected, ref_chosen, ref_rejected: float ``[B]`` log-probs.
    beta: the KL strength (TRL's ``beta``; IPO's ``tau``).
    loss_type: "sigmoid", "ipo" or "hinge".
    chosen_tokens, rejected_tokens: ``[B]`` completion token counts (needed by "ipo").

  Returns:
    ``(losses, chosen_rewards, rejected_rewards)``, float32 ``[B]`` each; the rewards
    carry no gradient.
  """
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  chosen_ratio = f32(policy_chosen) - f32(ref_chosen)
  rejected_ratio = f32(policy_rejected) - f32(ref_rejected)
  delta = chosen_ratio - rejected_ratio
  if loss_type == "sigmoid":
    losses = -jax.nn.log_sigmoid(beta * delta)
  elif loss_type == "hinge":
    losses = jax.nn.relu(1.0 - beta * delta)
  elif loss_type == "ipo":
    if chosen_tokens is None or rejected_tokens is None:
      raise ValueError("dpo_loss: loss_type 'ipo' needs chosen_tokens and rejected_tokens")
    per_token = lambda ratio, n: ratio / jnp.maximum(f32(n), 1.0)
    ipo_delta = per_token(chosen_ratio, chosen_tokens) - per_token(rejected_ratio, rejected_tokens)
    losses = (ipo_delta - 1.0 / (2.0 * beta)) ** 2
  else:
    raise ValueError(f"dpo_loss: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
  rewards = lambda ratio: jax.lax.stop_gradient(beta * ratio)
  return losses, rewards(chosen_ratio), rewards(rejected_ratio)


def sequence_logps(logits: jax.Array, labels: jax.Array,
                   segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Summed log-probabilities of each row's target tokens, and their count.

  Args:
    logits: ``[B, T, V]`` (computed in float32).
    labels, segment_ids: int32 ``[B, T]``, as for ``jqlora.training.step.token_loss_sums``.

  Returns:
    ``(logps, n_tokens)``: float32 and int32 ``[B]``.
  """
  targets, valid = next_token_targets(labels, segment_ids)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return -jnp.sum(jnp.where(valid, losses, 0.0), axis=1), jnp.sum(valid, axis=1, dtype=jnp.int32)


def _policy_and_reference(model: nnx.Module, batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(policy logps, reference logps, n_tokens)``, ``[2B]`` each; the reference has no gradient."""
  kwargs = dict(positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))
  seq = lambda logits: sequence_logps(logits, batch["labels"], batch.get("segment_ids"))
  policy, n_tokens = seq(model(batch["input_ids"], **kwargs))
  with disable_adapters(model):
    reference = jax.lax.stop_gradient(seq(model(batch["input_ids"], **kwargs))[0])
  return policy, reference, n_tokens


@dataclasses.dataclass(frozen=True)
class DPOLoss:
  """The DPO loss of one micro-batch of pairs, a ``jqlora.training.step.LossFn``.

  Returns ``(loss_sum over pairs, number of pairs, extras)`` with the summed
  rewards (``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
  ``rewards/accuracies``, reported as means over pairs) and the ``n_tokens``
  completion tokens. Frozen (hashable): one compilation per ``beta`` and ``loss_type``.
  """

  beta: float = 0.1
  loss_type: LossType = "sigmoid"

  def __call__(self, model: nnx.Module, batch: Batch) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    policy, reference, n_tokens = _policy_and_reference(model, batch)
    losses, chosen, rejected = dpo_loss(policy[0::2], policy[1::2], reference[0::2], reference[1::2],
                                        beta=self.beta, loss_type=self.loss_type,
                                        chosen_tokens=n_tokens[0::2], rejected_tokens=n_tokens[1::2])
    extras = {"rewards/chosen": jnp.sum(chosen), "rewards/rejected": jnp.sum(rejected),
              "rewards/margins": jnp.sum(chosen - rejected),
              "rewards/accuracies": jnp.sum((chosen > rejected).astype(jnp.float32)),
              "n_tokens": jnp.sum(n_tokens)}
    return jnp.sum(losses), jnp.int32(losses.shape[0]), extras


def dpo_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: Batch, *, beta: float = 0.1,
             loss_type: LossType = "sigmoid") -> dict[str, jax.Array]:
  """One compiled DPO optimizer step on a preference batch, updating the adapters in place.

  ``jqlora.training.step.train_step`` with ``DPOLoss(beta, loss_type)``: the same
  micro-batch accumulation (the loss is the mean over all pairs of all
  micro-batches), ``optax.apply_if_finite`` skipping, buffer donation, and
  partitioning over a mesh when the model and batch are placed on one.

  Args:
    model: a model with LoRA adapters (the reference is the model without them).
    optimizer: from ``make_optimizer(model, tx)``.
    batch: int32 ``[2B, T]`` or ``[A, 2B, T]`` arrays (module docstring).
    beta, loss_type: as for ``dpo_loss``.

  Returns:
    ``loss``, ``grad_norm``, the four ``rewards/*`` means over pairs, and ``n_tokens``
    (completion tokens).
  """
  return train_step(model, optimizer, batch, loss=DPOLoss(float(beta), loss_type))


@functools.partial(jax.jit, static_argnums=0)
def _logps(graphdef: nnx.GraphDef, state: Any, batch: dict[str, jax.Array]):
  return _policy_and_reference(nnx.merge(graphdef, state), batch)


def preference_logps(model: nnx.Module, batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Compiled ``(policy logps, reference logps, n_tokens)`` of a ``[2B, T]`` preference batch."""
  graphdef, state = nnx.split(model)
  return _logps(graphdef, state, {k: jnp.asarray(v) for k, v in batch.items() if v is not None})


def evaluate_preferences(model: nnx.Module, pairs: Sequence[tuple[Example, Example]], *, beta: float,
                         loss_type: LossType = "sigmoid", batch_size: int, sequence_len: int,
                         pad_id: int = 0, place: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                         multiple_of: int = 1) -> dict[str, float]:
  """Held-out DPO loss, rewards and preference accuracies of ``pairs``.

  Args:
    model: in eval mode.
    pairs: ``(chosen, rejected)`` examples.
    beta, loss_type: as for ``dpo_loss``.
    batch_size: pairs per batch (rounded up to a multiple of ``multiple_of`` rows,
      e.g. a mesh's batch shards, padded with empty rows).
    sequence_len, pad_id: the rows' length and padding id.
    place: puts each host batch on devices (default: the default device).

  Returns:
    ``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
    ``rewards/accuracies`` (the fraction of pairs whose reward prefers the chosen
    answer, TRL's) and ``logps/accuracies`` (the fraction where the model itself
    gives the chosen answer the higher log-probability), means over the pairs.
  """
  rows = -(-2 * batch_size // multiple_of) * multiple_of
  flat = [ex for pair in pairs for ex in pair]
  policy, reference, n_tokens = [], [], []
  for i, batch in enumerate(eval_batches(flat, rows, sequence_len, pad_id)):
    out = preference_logps(model, place(batch) if place else batch)
    real = min(rows, len(flat) - i * rows)
    for acc, x in zip((policy, reference, n_tokens), out):
      acc.append(np.asarray(x)[:real])
  policy, reference, n_tokens = (np.concatenate(x) for x in (policy, reference, n_tokens))
  losses, chosen, rejected = dpo_loss(policy[0::2], policy[1::2], reference[0::2], reference[1::2],
                                      beta=beta, loss_type=loss_type, chosen_tokens=n_tokens[0::2],
                                      rejected_tokens=n_tokens[1::2])
  chosen, rejected = np.asarray(chosen), np.asarray(rejected)
  return {"loss": float(np.mean(losses)), "rewards/chosen": float(chosen.mean()),
          "rewards/rejected": float(rejected.mean()),
          "rewards/margins": float((chosen - rejected).mean()),
          "rewards/accuracies": float((chosen > rejected).mean()),
          "logps/accuracies": float((policy[0::2] > policy[1::2]).mean())}

"""One compiled optimizer step: shifted cross-entropy, token-normalised accumulation, clipping.

Batches follow ``jqlora.training.batch``: int32 ``input_ids`` and unshifted
``labels`` (``IGNORE_INDEX`` = -100 ignored), optionally ``segment_ids`` /
``positions`` (packing), each ``[B, T]`` or ``[A, B, T]`` with ``A``
micro-batches accumulated into one update.

The loss is a parameter of the step (``train_step(..., loss=)``): a hashable
callable ``loss(model, micro_batch) -> (loss_sum, count, extras)`` whose sums
add up over micro-batches (and devices); the step minimises ``loss_sum / count``.
``sft_loss`` (the default) is next-token cross-entropy over target tokens;
``jqlora.training.dpo.DPOLoss`` is preference tuning.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jqlora.training.batch import IGNORE_INDEX, Batch

__all__ = ["PMAP_AXIS", "LossFn", "token_loss_sums", "chunked_token_loss_sums", "next_token_targets",
           "sft_loss", "train_step", "pmap_train_step", "functional_step", "eval_loss_sums"]



def token_loss_sums(logits: jax.Array, labels: jax.Array,
                    segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Summed next-token cross-entropy and the number of target tokens.

  Args:
    logits: ``[B, T, V]`` (any float dtype; computed in float32).
    labels: ``[B, T]`` int32 aligned with the inputs; position ``t + 1`` is
      the target of ``logits[:, t]``; ``IGNORE_INDEX`` is not a target.
    segment_ids: ``[B, T]`` int32 packing ids; no target crosses a change of id.

  Returns:
    ``(loss_sum, n_targets)``: float32 and int32 scalars.
  """
  targets, valid = next_token_targets(labels, segment_ids)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return jnp.sum(jnp.where(valid, losses, 0.0)), jnp.sum(valid, dtype=jnp.int32)


def next_token_targets(labels: jax.Array,
                       segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Next-token targets ``[B, T]`` aligned with the logits (0 where not a target) and the bool
  target mask ``[B, T]``; the last position has no target. Aligned rather than ``[B, T - 1]`` so
  that the loss reads the whole logits array: slicing off the last position copies it."""
  targets = jnp.pad(labels[:, 1:], ((0, 0), (0, 1)), constant_values=IGNORE_INDEX)
  valid = targets != IGNORE_INDEX
  if segment_ids is not None:
    valid &= jnp.pad(segment_ids[:, 1:] == segment_ids[:, :-1], ((0, 0), (0, 1)))
  return jnp.where(valid, targets, 0), valid


def chunked_token_loss_sums(head: Callable[[jax.Array], jax.Array], hidden: jax.Array,
                            labels: jax.Array, segment_ids: jax.Array | None = None, *,
                            chunk_size: int) -> tuple[jax.Array, jax.Array]:
  """``token_loss_sums(head(hidden), ...)`` without the whole ``[B, T, V]`` logits.

  The ``B * T`` tokens are taken ``chunk_size`` at a time (``jax.lax.scan``);
  each chunk's head and cross-entropy are rematerialised in the backward pass,
  so at most one chunk's float32 logits (and their gradient) are alive.

  Args:
    head: maps hidden states ``[N, D]`` to logits ``[N, V]``.
    hidden: ``[B, T, D]`` final hidden states.
    labels, segment_ids: as for ``token_loss_sums``.
    chunk_size: tokens per chunk (positive).

  Returns:
    ``(loss_sum, n_targets)``: float32 and int32 scalars.
  """
  if chunk_size <= 0:
    raise ValueError(f"loss chunk_size must be positive, got {chunk_size}")
  targets, valid = next_token_targets(labels, segment_ids)
  b, t, d = hidden.shape
  n = b * t
  size = min(chunk_size, n)
  chunks = -(-n // size)
  pad = chunks * size - n
  flat = lambda x: jnp.pad(x.reshape(n), (0, pad))
  targets, mask = flat(targets).reshape(chunks, size), flat(valid).reshape(chunks, size)
  hidden = jnp.pad(hidden.reshape(n, d), ((0, pad), (0, 0))).reshape(chunks, size, d)

  @jax.checkpoint
  def chunk_sum(h, target, ok):
    losses = optax.softmax_cross_entropy_with_integer_labels(
        head(h).astype(jnp.float32), target)
    return jnp.sum(jnp.where(ok, losses, 0.0))

  def body(total, xs):
    return total + chunk_sum(*xs), None

  total, _ = jax.lax.scan(body, jnp.float32(0), (hidden, targets, mask))
  return total, jnp.sum(valid, dtype=jnp.int32)


def _forward_sums(model: nnx.Module, batch: Batch) -> tuple[jax.Array, jax.Array]:
  """Loss sum and target count; chunked when the model says so (jqlora's ``Llama``:
  ``loss_chunking()``, ``return_hidden`` and ``logits``)."""
  kwargs = dict(positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))
  chunk_size = model.loss_chunking() if hasattr(model, "loss_chunking") else None
  if chunk_size is None:
    logits = model(batch["input_ids"], **kwargs)
    return token_loss_sums(logits, batch["labels"], batch.get("segment_ids"))
  hidden = model(batch["input_ids"], return_hidden=True, **kwargs)
  return chunked_token_loss_sums(model.logits, hidden, batch["labels"], batch.get("segment_ids"),
                                 chunk_size=chunk_size)


#: ``loss(model, micro_batch) -> (loss_sum, count, extras)``: float32 and int32 scalars and a dict
#: of scalar sums; float extras are reported as means over ``count``, integer ones as totals.
LossFn = Callable[[nnx.Module, Batch], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


def sft_loss(model: nnx.Module, batch: Batch) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """Next-token cross-entropy: ``(loss_sum, n_targets, {})`` (a ``LossFn``)."""
  return (*_forward_sums(model, batch), {})


def _with_micro_axis(batch: Batch, lead: int = 0) -> dict[str, jax.Array]:
  """``batch`` as ``[*lead axes, A, B, T]`` arrays (``A = 1`` inserted for ``[*lead, B, T]``)."""
  batch = {k: jnp.asarray(v) for k, v in batch.items() if v is not None}
  if "input_ids" not in batch or "labels" not in batch:
    raise ValueError(f"a batch needs 'input_ids' and 'labels', got keys {sorted(batch)}")
  if batch["input_ids"].ndim == lead + 2:
    batch = {k: jnp.expand_dims(v, lead) for k, v in batch.items()}
  if batch["input_ids"].ndim != lead + 3:
    d = "D, " * lead
    raise ValueError(f"input_ids must be [{d}B, T] or [{d}A, B, T], got shape "
                     f"{batch['input_ids'].shape}")
  return batch


def _copy(tree: Any) -> Any:
  """New containers around the same leaves (``nnx.merge`` reuses its inputs' Variables)."""
  return jax.tree.map(lambda x: x, tree)


def _is_key(x: Any) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _grad_sums(graphdef: nnx.GraphDef, params: Any, rng: Any, rest: Any,
               batch: dict[str, jax.Array], axis_name: str | None, loss: LossFn):
  """Summed loss gradients, loss sum, count and extras over the micro-batches of ``batch``.

  With ``axis_name`` (inside ``jax.pmap``/``shard_map``), dropout keys are
  folded with the device index (each device draws its own masks) and the three
  sums are ``psum``-ed over the axis, so every device returns the totals of the
  global batch.

  Returns:
    ``(grads, loss_sum, count, extras, new_rng)``; ``grads`` has the structure of ``params``.
  """
  if axis_name is not None:
    index = jax.lax.axis_index(axis_name)
    fwd_rng = jax.tree.map(lambda x: jax.random.fold_in(x, index) if _is_key(x) else x, rng)
  else:
    fwd_rng = rng

  def loss_sum(params, rng, micro):
    model = nnx.merge(graphdef, params, _copy(rng), rest)  # dropout advances the rng copy
    total, count, extras = loss(model, micro)
    return total, (count, extras, nnx.state(model, nnx.RngState))

  grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

  def accumulate(carry, micro):
    grads, total, count, extras, rng = carry
    (t, (c, e, rng)), g = grad_fn(params, rng, micro)
    return (jax.tree.map(jnp.add, grads, g), total + t, count + c, jax.tree.map(jnp.add, extras, e),
            rng), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  first = jax.tree.map(lambda x: x[0], batch)
  extras = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                        jax.eval_shape(lambda *a: loss_sum(*a)[1][1], params, fwd_rng, first))
  init = (zeros, jnp.float32(0), jnp.int32(0), extras, fwd_rng)
  (grads, total, count, extras, new_rng), _ = jax.lax.scan(accumulate, init, batch)
  if axis_name is not None:
    grads, total, count, extras = jax.lax.psum((grads, total, count, extras), axis_name)
    # the keys never change (streams advance their counts): keep the unfolded ones
    new_rng = jax.tree.map(lambda new, old: old if _is_key(old) else new, new_rng, rng)
  return grads, total, count, extras, new_rng


def _update(graphdef: nnx.GraphDef, opt_graphdef: nnx.GraphDef, params: Any, rng: Any,
            rest: Any, opt_state: Any, batch: dict[str, jax.Array], axis_name: str | None = None,
            loss: LossFn = sft_loss):
  """The whole step: gradients (``_grad_sums``), normalisation, optimizer update.

  A non-finite update is the optimizer's business: ``make_tx`` wraps it in
  ``optax.apply_if_finite``, which leaves the adapters and moments as they were.
  """
  grads, total, count, extras, new_rng = _grad_sums(graphdef, params, rng, rest, batch, axis_name, loss)
  denom = jnp.maximum(count, 1).astype(jnp.float32)
  grads = jax.tree.map(lambda g: g / denom, grads)
  grad_norm = optax.tree.norm(grads)
  model = nnx.merge(graphdef, params, new_rng, rest)
  optimizer = nnx.merge(opt_graphdef, opt_state)
  optimizer.update(model, grads)
  metrics = {"loss": total / denom, "grad_norm": grad_norm, "n_tokens": count}
  metrics.update({k: v / denom if jnp.issubdtype(v.dtype, jnp.floating) else v
                  for k, v in extras.items()})
  return nnx.state(model, optimizer.wrt), nnx.state(model, nnx.RngState), nnx.state(optimizer), metrics


_step = jax.jit(_update, static_argnums=(0, 1), static_argnames=("loss",), donate_argnums=(2, 3, 5))
PMAP_AXIS = "devices"
_pmap_step = jax.pmap(functools.partial(_update, axis_name=PMAP_AXIS), axis_name=PMAP_AXIS,
                      in_axes=(None,) * 6 + (0,), out_axes=None,
                      static_broadcasted_argnums=(0, 1))


def _run(step: Any, model: nnx.Module, optimizer: nnx.Optimizer, batch: dict[str, jax.Array],
         **loss: LossFn) -> dict[str, jax.Array]:
  graphdef, params, rng, rest = nnx.split(model, optimizer.wrt, nnx.RngState, ...)
  opt_graphdef, opt_state = nnx.split(optimizer)
  new_params, new_rng, new_opt_state, metrics = step(
      graphdef, opt_graphdef, params, rng, rest, opt_state, batch, **loss)
  nnx.update(model, new_params, new_rng)
  nnx.update(optimizer, new_opt_state)
  return metrics


def train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: Batch, *,
               loss: LossFn = sft_loss) -> dict[str, jax.Array]:
  """One compiled optimizer step on ``batch``, updating ``model`` and ``optimizer`` in place.

  The loss is the mean over all target tokens of all micro-batches (not the
  mean of per-micro-batch means), so accumulating ``A`` micro-batches gives
  the gradient of the ``A``-times larger batch; with another ``loss`` (a
  ``LossFn``, hashable: one compilation per value) it is ``loss_sum / count``
  over all micro-batches. Gradients are taken only with
  respect to ``optimizer.wrt`` (the adapters). With a ``make_tx`` optimizer
  (``optax.apply_if_finite``) a step whose gradient is not finite changes no
  adapter or moment and is counted (``nonfinite_counts``). Activation
  checkpointing is the model's business (``model.remat = True`` on jqlora
  models recomputes each layer in the backward pass), and so is the loss's
  chunking (``model.loss_chunk_size`` tokens of LM head and cross-entropy at a
  time on jqlora models; see ``chunked_token_loss_sums``). Sharded training: place
  the model, optimizer and batch with ``jqlora.parallel`` first; the same step
  then runs partitioned over the mesh.

  Args:
    model: the model, in train or eval mode (dropout follows the mode).
    optimizer: from ``make_optimizer(model, tx)``.
    batch: ``input_ids``, ``labels`` and optional ``segment_ids``/``positions``,
      int32 ``[B, T]`` or ``[A, B, T]``.
    loss: the loss (module docstring); default next-token cross-entropy.

  Returns:
    ``{"loss", "grad_norm"}`` float32 scalars (before clipping), ``n_tokens`` int32
    (the ``count``) and ``loss``'s extras.
  """
  return _run(_step, model, optimizer, _with_micro_axis(batch), loss=loss)


def pmap_train_step(model: nnx.Module, optimizer: nnx.Optimizer,
                    batch: Batch) -> dict[str, jax.Array]:
  """``train_step`` data-parallel over local devices with ``jax.pmap``, for pmap-style loops.

  Each of the ``D`` devices takes one slice of the batch's leading axis; loss
  sums, target counts and gradients are ``psum``-ed across the ``"devices"``
  axis (``PMAP_AXIS``), so the update is exactly ``train_step``'s on the
  concatenated batch (dropout masks differ: each device folds its index into
  the key). Adapters and moments come back replicated on the ``D`` devices; the
  frozen base is broadcast to them by each call unless it already lives there
  (e.g. ``jax.device_put(nnx.state(model), jax.sharding.NamedSharding(
  jax.sharding.Mesh(devices, ("d",)), jax.sharding.PartitionSpec()))``).
  Multi-process: each process passes its local devices' slices, as with any pmap.

  Args:
    model, optimizer: as for ``train_step``.
    batch: int32 ``[D, B, T]`` or ``[D, A, B, T]`` arrays, ``D <= jax.local_device_count()``.

  Returns:
    ``{"loss", "grad_norm", "n_tokens"}`` of the global batch, as ``train_step``.
  """
  return _run(_pmap_step, model, optimizer, _with_micro_axis(batch, lead=1))


def functional_step(model: nnx.Module, optimizer: nnx.Optimizer, *,
                    loss: LossFn = sft_loss) -> tuple[Callable[..., Any], Any, Any]:
  """``train_step`` as a pure function of pytrees, for ``jax.jit(...).lower(...)`` and AOT use.

  Returns:
    ``(step, state, opt_state)``: ``step(state, opt_state, batch) -> (state, opt_state,
    metrics)`` runs ``train_step`` on models rebuilt from the two states (``nnx.split``
    of ``model`` and ``optimizer``), which are returned beside it. The states may be
    abstract (``jax.ShapeDtypeStruct`` leaves) for lowering without memory.
  """
  graphdef, state = nnx.split(model)
  opt_graphdef, opt_state = nnx.split(optimizer)

  def step(state: Any, opt_state: Any, batch: Batch) -> tuple[Any, Any, dict[str, jax.Array]]:
    m, o = nnx.merge(graphdef, state), nnx.merge(opt_graphdef, opt_state)
    metrics = train_step(m, o, batch, loss=loss)
    return nnx.state(m), nnx.state(o), metrics

  return step, state, opt_state


@functools.partial(jax.jit, static_argnums=0)
def _eval_sums(graphdef: nnx.GraphDef, state: Any, batch: dict[str, jax.Array]):
  model = nnx.merge(graphdef, state)
  return _forward_sums(model, batch)


def eval_loss_sums(model: nnx.Module, batch: Batch) -> tuple[jax.Array, jax.Array]:
  """Compiled ``(loss_sum, n_targets)`` of ``model`` on one ``[B, T]`` batch (no update)."""
  graphdef, state = nnx.split(model)
  batch = {k: jnp.asarray(v) for k, v in batch.items() if v is not None}
  return _eval_sums(graphdef, state, batch)

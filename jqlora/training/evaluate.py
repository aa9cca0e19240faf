"""Held-out evaluation: loss / perplexity over target tokens, and exact-match generation."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from flax import nnx

from jqlora.generate import generate
from jqlora.training.data import Dataset, Example, eval_batches, to_messages
from jqlora.training.step import eval_loss_sums

__all__ = ["eval_loss", "exact_match"]


def eval_loss(model: nnx.Module, examples: Sequence[Example], *, batch_size: int,
              sequence_len: int, pad_id: int = 0,
              place: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
              multiple_of: int = 1) -> tuple[float, float]:
  """Mean next-token loss over all target tokens of ``examples`` and its perplexity.

  ``place`` puts each host batch on devices (e.g. ``jqlora.parallel.shard_batch``
  on the model's mesh); by default the batches go to the default device. Batches
  are padded with empty rows (no targets, so the loss is unchanged) up to a
  multiple of ``multiple_of`` rows, e.g. the mesh's ``data * fsdp`` batch shards.
  """
  batch_size = -(-batch_size // multiple_of) * multiple_of
  total, count = 0.0, 0
  for batch in eval_batches(examples, batch_size, sequence_len, pad_id):
    t, c = eval_loss_sums(model, place(batch) if place else batch)
    total, count = total + float(t), count + int(c)
  loss = total / max(count, 1)
  return loss, math.exp(min(loss, 50.0))


def exact_match(model: nnx.Module, tokenizer: Any, dataset: Dataset, *, batch_size: int,
                max_new_tokens: int) -> tuple[float, list[tuple[str, str, str]]]:
  """Greedy answers to the held-out prompts, scored by exact match of the reference answer.

  Args:
    model: in eval mode; on one device or sharded over a mesh (with
      ``jax.distributed``, every process calls this with the same ``dataset`` and
      gets every row).
    tokenizer: its tokenizer (chat template).
    dataset: alpaca or chat records; the last assistant message is the reference.
    batch_size: prompts decoded together.
    max_new_tokens: generation length limit.

  Returns:
    ``(accuracy in [0, 1], [(prompt, reference, answer), …])`` in dataset order.
  """

  if dataset.fmt == "text":
    raise ValueError(f"{dataset.path}: exact-match evaluation needs alpaca or chat records")
  prompts, refs = [], []
  for record in dataset.records:
    messages = to_messages(record, dataset.fmt)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompts.append(messages[:last])
    refs.append(messages[last]["content"].strip())
  answers, size = [], min(batch_size, len(prompts))
  for i in range(0, len(prompts), size):
    chunk = prompts[i:i + size]
    padded = chunk + [chunk[0]] * (size - len(chunk))  # one batch shape: one compilation
    answers += generate(model, tokenizer, padded, max_new_tokens=max_new_tokens)[:len(chunk)]
  rows = [(p[-1]["content"], r, a) for p, r, a in zip(prompts, refs, answers)]
  return sum(r == a for _, r, a in rows) / max(len(rows), 1), rows

"""Preference records (TRL's ``prompt``/``chosen``/``rejected``) -> token pairs -> DPO batches.

A record is either *standard*, ``{"prompt": str, "chosen": str, "rejected": str}``,
tokenized as plain text with EOS appended to each completion (as TRL does), or
*conversational*: ``chosen``/``rejected`` lists of ``{"role", "content"}`` messages,
rendered with the tokenizer's chat template, the prompt given as a message list
(explicit) or left implicit as the turns both conversations share (TRL's
``extract_prompt``; for strings, the shared leading text). The completion is what
follows the tokenized prompt (TRL: where prompt and prompt + completion diverge);
its tokens, the template's end of turn included, are the targets; prompt tokens
are masked. A pair longer than ``sequence_len`` keeps its start (TRL's
``keep_start``); a pair whose prompt alone fills it is dropped.
"""

from __future__ import annotations

import dataclasses
import pathlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from jqlora.training.batch import IGNORE_INDEX
from jqlora.training.data import EpochOrder, Example, eval_batches
from jqlora.training.records import DataError, read_located

__all__ = ["Pair", "PreferenceSet", "PairBatches", "split_prompt", "encode_pair", "load_preferences"]

Pair = tuple[Example, Example]
_SHAPE = ("a preference record has 'chosen' and 'rejected' (strings, or lists of {\"role\": str, "
          "\"content\": str} messages) and an optional 'prompt'")


def _is_messages(value: Any) -> bool:
  return isinstance(value, list) and all(
      isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
      for m in value)


def _field(record: dict[str, Any], key: str, where: str) -> str | list[dict[str, str]]:
  if key not in record:
    raise DataError(f"{where}: '{key}' is missing; {_SHAPE}")
  value = record[key]
  if not (isinstance(value, str) or _is_messages(value)):
    raise DataError(f"{where}: '{key}' must be a string or a list of {{\"role\": str, \"content\": str}} "
                    f"messages, got {_describe(value)}")
  return value


def _describe(value: Any) -> str:
  if isinstance(value, list):
    return "a list whose items are not all {\"role\": str, \"content\": str}"
  return f"{type(value).__name__} {value!r}"[:80]


def _shared_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return n


def split_prompt(record: dict[str, Any], where: str = "") -> tuple[Any, Any, Any]:
  """``(prompt, chosen, rejected)`` of a preference record, the prompt made explicit.

  All three are strings, or all three message lists (the prompt may be empty).

  Raises:
    DataError: a missing or mistyped field, mixed forms, or an empty completion,
      naming ``where`` and the field.
  """
  chosen, rejected = _field(record, "chosen", where), _field(record, "rejected", where)
  if isinstance(chosen, str) != isinstance(rejected, str):
    raise DataError(f"{where}: 'chosen' and 'rejected' must both be strings or both message lists")
  prompt = record.get("prompt")
  conversational = isinstance(chosen, list)
  if prompt is not None:
    prompt = _field(record, "prompt", where)
    if isinstance(prompt, list) and not conversational:
      raise DataError(f"{where}: 'prompt' is a message list but 'chosen' and 'rejected' are strings; "
                      "use one form for all three")
    if isinstance(prompt, str) and conversational:  # TRL: the prompt is in the conversations
      prompt = None
  if prompt is None:  # implicit: what both share (for text, not ending on the space before a word)
    n = _shared_prefix(chosen, rejected)
    if not conversational and 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
      n -= 1
    prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
  for key, value in (("chosen", chosen), ("rejected", rejected)):
    if not (value.strip() if isinstance(value, str) else any(m["content"].strip() for m in value)):
      raise DataError(f"{where}: '{key}' is empty" + (" after the prompt both conversations share"
                                                       if "prompt" not in record else ""))
  return prompt, chosen, rejected


def _tokenize(tokenizer: Any, value: Any, *, generation_prompt: bool = False) -> list[int]:
  """Token ids: a message list rendered with the chat template, or plain text (TRL's ``_tokenize``)."""
  if isinstance(value, list):
    text = tokenizer.apply_chat_template(value, tokenize=False, add_generation_prompt=generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
  return list(tokenizer(value)["input_ids"])


def encode_pair(record: dict[str, Any], tokenizer: Any, *, where: str = "") -> tuple[Pair, int]:
  """Tokenizes one preference record (module docstring).

  Returns:
    ``((chosen, rejected), prompt_len)``: the two examples, prompt tokens masked in
    their labels, and the number of prompt tokens they share.

  Raises:
    DataError: see ``split_prompt``; a message list with a tokenizer that has no chat template.
  """
  prompt, chosen, rejected = split_prompt(record, where)
  if isinstance(chosen, list):
    if not getattr(tokenizer, "chat_template", None):
      raise DataError(f"{where}: conversational preference records need a tokenizer with a chat "
                      "template; use strings for 'prompt', 'chosen' and 'rejected'")
    prompt_ids = _tokenize(tokenizer, prompt, generation_prompt=True)
    seqs = [_tokenize(tokenizer, prompt + c) for c in (chosen, rejected)]
  else:
    eos = tokenizer.eos_token or ""
    prompt_ids = _tokenize(tokenizer, prompt)
    seqs = [_tokenize(tokenizer, prompt + (c if c.endswith(eos) else c + eos)) for c in (chosen, rejected)]
  n = min(_shared_prefix(prompt_ids, s) for s in seqs)
  pair = []
  for key, ids in zip(("chosen", "rejected"), seqs):
    ids = np.asarray(ids, np.int32)
    if len(ids) <= n:
      raise DataError(f"{where}: '{key}' has no tokens after the prompt")
    pair.append(Example(ids, np.where(np.arange(len(ids)) >= n, ids, IGNORE_INDEX).astype(np.int32)))
  return (pair[0], pair[1]), n


@dataclasses.dataclass(frozen=True)
class PreferenceSet:
  """A tokenized preference dataset: its records (in file order) and ``(chosen, rejected)`` pairs."""

  path: str
  fmt: str
  records: list[dict[str, Any]]
  pairs: list[Pair]
  n_truncated: int = 0

  @property
  def examples(self) -> list[Example]:
    """Every chosen and rejected example, pair by pair."""
    return [ex for pair in self.pairs for ex in pair]

  def split(self, n_held_out: int, seed: int) -> tuple[PreferenceSet, PreferenceSet]:
    """``(rest, held_out)``: ``n_held_out`` pairs drawn with ``seed``."""
    if not 0 < n_held_out < len(self.pairs):
      raise DataError(f"{self.path}: cannot hold out {n_held_out} of {len(self.pairs)} pairs")
    order = np.random.default_rng(seed).permutation(len(self.pairs))
    pick = lambda idx: dataclasses.replace(self, records=[self.records[i] for i in idx],
                                           pairs=[self.pairs[i] for i in idx])
    return pick(sorted(order[n_held_out:])), pick(sorted(order[:n_held_out]))


def load_preferences(path: str | pathlib.Path, tokenizer: Any, *, sequence_len: int) -> PreferenceSet:
  """Reads (``jqlora.training.records``: JSONL, JSON, Parquet, CSV, save_to_disk) and tokenizes pairs.

  Pairs longer than ``sequence_len`` keep their first tokens; those whose prompt
  alone fills it are dropped. Both are counted in one warning.

  Raises:
    DataError: see ``read_located`` and ``encode_pair`` (``file:line`` or ``file row N``, the field).
  """
  records, pairs, cut, dropped = [], [], 0, 0
  for where, record in read_located(path):
    (chosen, rejected), prompt_len = encode_pair(record, tokenizer, where=where)
    if prompt_len >= sequence_len:
      dropped += 1
      continue
    if max(len(chosen), len(rejected)) > sequence_len:
      cut += 1
      chosen, rejected = (Example(e.input_ids[:sequence_len], e.labels[:sequence_len])
                          for e in (chosen, rejected))
    records.append(record)
    pairs.append((chosen, rejected))
  if cut or dropped:
    warnings.warn(f"{path}: {cut} of {len(pairs) + dropped} pairs are longer than sequence_len="
                  f"{sequence_len} tokens and were truncated; {dropped} whose prompt alone fills it "
                  "were dropped", stacklevel=2)
  if not pairs:
    raise DataError(f"{path}: no pair fits in sequence_len={sequence_len} tokens")
  form = "conversational" if isinstance(records[0]["chosen"], list) else "standard"
  return PreferenceSet(str(path), f"preference, {form}", records, pairs, cut)


class PairBatches(Iterator[dict[str, np.ndarray]]):
  """Endless, seeded, resumable DPO batches: int32 ``[A, 2B, T]`` arrays of ``B`` pairs per micro-batch.

  Rows ``2i``/``2i + 1`` are a pair's chosen and rejected sequences
  (``jqlora.training.dpo``), each alone in its row (``segment_ids`` 1, 0 for
  padding). Epoch ``e`` visits the pairs in ``np.random.default_rng([seed, e])``
  order; ``state()`` / ``restore(state)`` as ``jqlora.training.data.BatchIterator``.
  """

  def __init__(self, pairs: Sequence[Pair], *, micro_batch_size: int, accumulation: int,
               sequence_len: int, seed: int, pad_id: int = 0):
    if not pairs:
      raise DataError("the training set is empty")
    self.pairs, self.pad_id = pairs, pad_id
    self.shape = (accumulation, micro_batch_size, sequence_len)
    self.order = EpochOrder(len(pairs), seed)

  def state(self) -> dict[str, int]:
    """The position: ``{"epoch", "index"}`` (next pair in that epoch's order)."""
    return self.order.state()

  def restore(self, state: dict[str, int]) -> None:
    self.order.restore(state)

  def _take(self) -> Pair:
    return self.pairs[self.order.take()]

  def __next__(self) -> dict[str, np.ndarray]:
    a, b, t = self.shape
    rows = [ex for _ in range(a * b) for ex in self._take()]
    batch = next(eval_batches(rows, 2 * a * b, t, self.pad_id))
    return {k: v.reshape(a, 2 * b, t) for k, v in batch.items()}

  def steps_per_epoch(self) -> int:
    """Optimizer steps that cover one epoch."""
    a, b, _ = self.shape
    return max(1, -(-len(self.pairs) // (a * b)))

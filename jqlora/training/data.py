"""Dataset records (alpaca, chat, sharegpt, prompt/completion, text) -> masked token rows -> batches.

An example is ``(input_ids, labels)``, int32 ``[L]`` each, with ``labels``
equal to the ids where the token is a target and ``IGNORE_INDEX`` elsewhere.
Prompt tokens are masked unless ``train_on_inputs``; the answer's end of turn
(the chat template's end-of-turn token, else EOS) is always a target. Files are
read by ``jqlora.training.records`` (JSONL, JSON, Parquet, CSV, save_to_disk
folders). Preference records (``chosen``/``rejected``) are detected here and
trained by ``method: dpo`` (``jqlora.training.preference``), not by SFT.
"""

from __future__ import annotations

import dataclasses
import pathlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from jqlora.generate import render_prompt
from jqlora.training.batch import IGNORE_INDEX
from jqlora.training.records import DataError, read_jsonl, read_located, read_text

__all__ = ["DataError", "Example", "FORMATS", "read_text", "read_jsonl", "detect_format", "to_messages",
           "encode", "Dataset", "load_dataset", "EpochOrder", "BatchIterator", "eval_batches"]

#: The ``dataset_type`` values besides "auto"; "preference" records train with ``method: dpo``.
FORMATS = ("alpaca", "chat", "sharegpt", "prompt_completion", "text", "preference")
#: ShareGPT's speaker names (``from``) and the chat roles they stand for.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system"}
_MESSAGE = '{"role": str, "content": str}'
_DPO = "preference records (chosen/rejected) train with method: dpo, not supervised fine-tuning"


@dataclasses.dataclass(frozen=True)
class Example:
  """One tokenized example: ``input_ids`` and ``labels``, int32 ``[L]``."""

  input_ids: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.input_ids)


def _detect(record: dict[str, Any]) -> str | None:
  if "chosen" in record and "rejected" in record:
    return "preference"
  if "prompt" in record and "completion" in record:
    return "prompt_completion"
  if "messages" in record:
    return "chat"
  if "conversations" in record:
    return "sharegpt"
  if "instruction" in record and "output" in record:
    return "alpaca"
  return "text" if "text" in record else None


def detect_format(record: dict[str, Any], where: str = "") -> str:
  """The format its keys say, one of ``FORMATS``, checked in this order.

  "preference" (``chosen`` + ``rejected``), "prompt_completion" (``prompt`` +
  ``completion``), "chat" (``messages``), "sharegpt" (``conversations``),
  "alpaca" (``instruction`` + ``output``), "text" (``text``).
  """
  fmt = _detect(record)
  if fmt is None:
    raise DataError(f"{where}: cannot tell the format from keys {sorted(record)}; expected 'messages' "
                    "(chat), 'conversations' (sharegpt), 'prompt' + 'completion', 'instruction' + "
                    "'output' (alpaca), 'text', or 'chosen' + 'rejected' (preference), "
                    f"or set dataset_type: {'|'.join(FORMATS)}")
  return fmt


_Fail = Callable[[str], DataError]


def _kind(value: Any) -> str:
  """How an error names what it got: ``nothing`` for a missing field, else the type."""
  return "nothing" if value is None else "an empty list" if value == [] else type(value).__name__


def _messages(value: Any, field: str, fail: _Fail, *, sharegpt: bool = False) -> list[dict[str, str]]:
  """``value`` as ``[{"role", "content"}]``; ShareGPT's ``{"from", "value"}`` too when ``sharegpt``."""
  shape = '{"from": str, "value": str}' if sharegpt else _MESSAGE
  if not isinstance(value, list) or not value:
    raise fail(f"expected {field!r}: a non-empty list of {shape}, got {_kind(value)}")
  out = []
  for i, m in enumerate(value):
    if not isinstance(m, dict):
      raise fail(f"{field}[{i}]: expected {shape}, got {type(m).__name__}")
    role_key, content_key = ("from", "value") if sharegpt and "role" not in m else ("role", "content")
    for key in (role_key, content_key):
      if not isinstance(m.get(key), str):
        raise fail(f"{field}[{i}].{key}: expected a string, got {_kind(m.get(key))}")
    role = m[role_key]
    if sharegpt:
      if role not in SHAREGPT_ROLES:
        raise fail(f"{field}[{i}].{role_key}: unknown role {role!r}; expected one of "
                   f"{', '.join(SHAREGPT_ROLES)}")
      role = SHAREGPT_ROLES[role]
    out.append({"role": role, "content": m[content_key]})
  return out


def _string(record: dict[str, Any], key: str, fail: _Fail, default: str | None = None) -> str:
  value = record.get(key, default)
  if not isinstance(value, str):
    raise fail(f"expected a string {key!r}, got {_kind(value)}")
  return value


def _content(record: dict[str, Any], fmt: str, fail: _Fail) -> list[dict[str, str]] | tuple[str, str]:
  """A valid record's content: chat messages, or ``(prompt, completion)`` strings.

  Text records give ``("", text)``; alpaca records one user and one assistant
  message; string prompt/completion records ``(prompt, completion)``.
  """
  if fmt == "text":
    return "", _string(record, "text", fail)
  if fmt == "alpaca":
    instruction, output = _string(record, "instruction", fail), _string(record, "output", fail)
    extra = _string(record, "input", fail, default="")
    return [{"role": "user", "content": instruction + (f"\n\n{extra}" if extra else "")},
            {"role": "assistant", "content": output}]
  if fmt == "prompt_completion":
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
      return prompt, completion
    if not (isinstance(prompt, list) and isinstance(completion, list)):
      raise fail("expected 'prompt' and 'completion' both strings or both lists of messages "
                 f"{_MESSAGE}, got {_kind(prompt)} and {_kind(completion)}")
    prompt, completion = _messages(prompt, "prompt", fail), _messages(completion, "completion", fail)
    for i, m in enumerate(completion):
      if m["role"] != "assistant":
        raise fail(f"completion[{i}].role: expected 'assistant', got {m['role']!r}")
    return prompt + completion
  if fmt == "preference":
    raise fail(_DPO)
  if fmt == "sharegpt":
    key = "conversations" if "conversations" in record or "messages" not in record else "messages"
    messages = _messages(record.get(key), key, fail, sharegpt=True)
  else:
    messages = _messages(record.get("messages"), "messages", fail)
  if not any(m["role"] == "assistant" for m in messages):
    raise fail(f"a {fmt} record needs at least one assistant message")
  return messages


def _failer(fmt: str, where: str, how: str = "") -> _Fail:
  """Errors ``where: problem (fmt format[, how])``; ``how``: how ``fmt`` was chosen."""
  if how:
    tag, fix = f"{fmt} format, {how}", f"; set dataset_type: {'|'.join(FORMATS)} or fix the record"
  else:
    tag, fix = f"{fmt} format", ""
  return lambda problem: DataError(f"{where}: {problem} ({tag}){fix}")


def _first_target(record: dict[str, Any], fmt: str) -> int:
  """The first message whose assistant turns train: after a conversational prompt, else 0."""
  return len(record["prompt"]) if fmt == "prompt_completion" else 0


def to_messages(record: dict[str, Any], fmt: str) -> list[dict[str, str]]:
  """A record as chat messages (alpaca: one user and one assistant turn; sharegpt: roles mapped).

  Raises:
    DataError: a text or string prompt/completion record (it has no turns).
  """
  content = _content(record, fmt, _failer(fmt, "record"))
  if isinstance(content, tuple):
    raise DataError(f"{fmt} records with string fields have no chat turns to answer (eval_exact_match "
                    "needs alpaca, chat, sharegpt or conversational prompt_completion records)")
  return content


def _chat_example(tokenizer: Any, messages: list[dict[str, str]], where: str, first_target: int = 0):
  """Token ids and a per-token target mask: the assistant turns from message ``first_target`` on.

  A target turn is its content and its end of turn (what the template renders
  after the generation prompt, up to the next message).
  """
  render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False,
                                                           add_generation_prompt=gen)
  full = render(messages, False)
  spans = []
  for i, m in enumerate(messages):
    if m["role"] != "assistant" or i < first_target:
      continue
    start, end = len(render(messages[:i], True)), len(render(messages[:i + 1], False))
    if not full.startswith(render(messages[:i + 1], False)):
      raise DataError(f"{where}: the tokenizer's chat template does not render conversation "
                      "prefixes as prefixes; use the 'text' format for this tokenizer")
    spans.append((start, end))
  enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
  ids = np.asarray(enc["input_ids"], np.int32)
  starts = np.asarray([s for s, _ in enc["offset_mapping"]], np.int64)
  target = np.zeros(len(ids), bool)
  for s, e in spans:
    target |= (starts >= s) & (starts < e)
  return ids, target


def _plain_example(tokenizer: Any, prompt: str, completion: str):
  """``prompt + completion`` tokenized as one text, then EOS; targets: the completion's tokens and EOS.

  One text, as TRL tokenizes it, so a token is what the model sees at inference;
  a token that starts in the completion is a target (offsets, as for chat turns).
  """
  eos = tokenizer.eos_token_id
  enc = tokenizer(prompt + completion, return_offsets_mapping=True)
  ids = np.asarray(list(enc["input_ids"]) + ([eos] if eos is not None else []), np.int32)
  starts = np.asarray([s for s, _ in enc["offset_mapping"]] + [len(prompt + completion)], np.int64)
  return ids, starts[:len(ids)] >= len(prompt)


def encode(record: dict[str, Any], tokenizer: Any, fmt: str, *, train_on_inputs: bool = False,
           where: str = "") -> Example:
  """Tokenizes one record and masks its prompt.

  Args:
    record: a record of format ``fmt``.
    tokenizer: a transformers tokenizer (its chat template is used for chat,
      sharegpt, conversational prompt/completion and alpaca records when it has one).
    fmt: one of ``FORMATS`` but "preference".
    train_on_inputs: make every token a target, prompts included.
    where: the record's place (``file:line``, ``file row N``) for error messages.

  Returns:
    The example. Text records: every token and the appended EOS are targets;
    string prompt/completion records: the completion and EOS (TRL's
    completion-only loss); chat-like records: the assistant turns (of the
    completion only, for prompt/completion) with their end of turn.

  Raises:
    DataError: the record is not of format ``fmt`` (the message names the
      field), a preference record, or chat records and no chat template.
  """
  content = _content(record, fmt, _failer(fmt, where))
  if fmt == "text":
    ids = list(tokenizer(content[1])["input_ids"])
    ids = np.asarray(ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []), np.int32)
    target = np.ones(len(ids), bool)
  elif isinstance(content, tuple):
    ids, target = _plain_example(tokenizer, *content)
  elif getattr(tokenizer, "chat_template", None):
    ids, target = _chat_example(tokenizer, content, where, _first_target(record, fmt))
  elif fmt == "alpaca":
    ids, target = _plain_example(tokenizer, render_prompt(tokenizer, content[:-1]), content[-1]["content"])
  else:
    raise DataError(f"{where}: {fmt} records need a tokenizer with a chat template")
  if train_on_inputs:
    target = np.ones(len(ids), bool)
  return Example(ids, np.where(target, ids, IGNORE_INDEX).astype(np.int32))


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A tokenized dataset: its records (for generation checks) and examples."""

  path: str
  fmt: str
  records: list[dict[str, Any]]
  examples: list[Example]
  n_truncated: int = 0

  def split(self, n_held_out: int, seed: int) -> tuple[Dataset, Dataset]:
    """``(rest, held_out)``: ``n_held_out`` records drawn with ``seed``."""
    if not 0 < n_held_out < len(self.records):
      raise DataError(f"{self.path}: cannot hold out {n_held_out} of {len(self.records)} examples")
    order = np.random.default_rng(seed).permutation(len(self.records))
    pick = lambda idx: dataclasses.replace(self, records=[self.records[i] for i in idx],
                                           examples=[self.examples[i] for i in idx])
    return pick(sorted(order[n_held_out:])), pick(sorted(order[:n_held_out]))


def _label(place: str, path: str | pathlib.Path) -> str:
  """``line N`` or ``row N`` of a record's place (``file:N`` or ``file row N``)."""
  rest = place[len(str(path)):]
  return f"line {rest[1:]}" if rest.startswith(":") else rest.strip()


def load_dataset(path: str | pathlib.Path, tokenizer: Any, *, fmt: str = "auto",
                 sequence_len: int, train_on_inputs: bool = False) -> Dataset:
  """Reads and tokenizes a dataset; examples longer than ``sequence_len`` are truncated.

  ``path``: any file type ``jqlora.training.records.read_located`` reads (.jsonl,
  .json, .parquet, .csv, a save_to_disk folder). With ``fmt="auto"`` the first
  record's keys choose the format and every other record must have it. The
  truncated examples are counted and reported in one warning.

  Raises:
    DataError: see ``read_located``; preference records (they train with
      ``method: dpo``); a record of another format than the first, or one that
      is not of the format (naming its line or row and the field).
  """
  if fmt != "auto" and fmt not in FORMATS:
    raise DataError(f"dataset_type must be 'auto' or one of {FORMATS}, got {fmt!r}")
  located = read_located(path)
  first, record = located[0]
  auto = fmt == "auto"
  if auto:
    fmt, how = detect_format(record, first), f"detected from {_label(first, path)}"
  else:
    how = "as dataset_type says"
  if fmt == "preference":
    raise DataError(f"{first}: {_DPO}; set method: dpo")
  examples, too_long = [], 0
  for place, record in located:
    other = _detect(record) if auto else None
    if other is not None and other != fmt:
      raise DataError(f"{place}: a {other} record (keys {sorted(record)}), but {_label(first, path)} "
                      f"is {fmt}: a dataset holds one format; convert the records or split the file")
    _content(record, fmt, _failer(fmt, place, how))  # the error says how the format was chosen
    ex = encode(record, tokenizer, fmt, train_on_inputs=train_on_inputs, where=place)
    if len(ex) > sequence_len:
      too_long += 1
      ex = Example(ex.input_ids[:sequence_len], ex.labels[:sequence_len])
    examples.append(ex)
  if too_long:
    warnings.warn(f"{path}: {too_long} of {len(examples)} examples are longer than "
                  f"sequence_len={sequence_len} tokens and were truncated", stacklevel=2)
  return Dataset(str(path), fmt, [r for _, r in located], examples, too_long)


def _rows_to_batch(rows: Sequence[Sequence[Example]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """Rows of examples (several per row when packed) -> int32 ``[len(rows), seq_len]`` arrays."""
  n = len(rows)
  out = {"input_ids": np.full((n, seq_len), pad_id, np.int32),
         "labels": np.full((n, seq_len), IGNORE_INDEX, np.int32),
         "segment_ids": np.zeros((n, seq_len), np.int32),
         "positions": np.zeros((n, seq_len), np.int32)}
  for r, row in enumerate(rows):
    at = 0
    for seg, ex in enumerate(row, 1):
      sl = slice(at, at + len(ex))
      out["input_ids"][r, sl] = ex.input_ids
      out["labels"][r, sl] = ex.labels
      out["segment_ids"][r, sl] = seg
      out["positions"][r, sl] = np.arange(len(ex))
      at += len(ex)
  return out


class EpochOrder:
  """Indices ``0 .. n-1`` in a new seeded order each epoch, resumable exactly.

  ``state()`` is ``{"epoch", "index"}`` (the next position in that epoch's order).
  """

  def __init__(self, n: int, seed: int):
    self.n, self.seed = n, seed
    self.restore({"epoch": 0, "index": 0})

  def permutation(self, epoch: int) -> np.ndarray:
    """Epoch ``epoch``'s order, int64 ``[n]``."""
    return np.random.default_rng([self.seed, epoch]).permutation(self.n)

  def state(self) -> dict[str, int]:
    return {"epoch": self.epoch, "index": self.index}

  def restore(self, state: dict[str, int]) -> None:
    self.epoch, self.index = int(state["epoch"]), int(state["index"])
    self._order = self.permutation(self.epoch)

  def peek(self) -> int:
    """The index ``take()`` returns next."""
    if self.index == self.n:
      return int(self.permutation(self.epoch + 1)[0])
    return int(self._order[self.index])

  def take(self) -> int:
    """The next index, moving to the next epoch's order after the last."""
    if self.index == self.n:
      self.restore({"epoch": self.epoch + 1, "index": 0})
    self.index += 1
    return int(self._order[self.index - 1])


class BatchIterator(Iterator[dict[str, np.ndarray]]):
  """Endless, seeded, resumable batches of ``[A, B, T]`` int32 arrays.

  Each epoch visits the examples in ``np.random.default_rng([seed, epoch])``
  order. With packing, consecutive examples share a row while they fit, with
  their own ``segment_ids`` (1, 2, …; 0 is padding) and ``positions`` from 0.
  ``state()`` / ``restore(state)`` save and restore the position exactly.
  """

  def __init__(self, examples: Sequence[Example], *, micro_batch_size: int, accumulation: int,
               sequence_len: int, packing: bool, seed: int, pad_id: int = 0):
    if not examples:
      raise DataError("the training set is empty")
    self.examples = examples
    self.shape = (accumulation, micro_batch_size, sequence_len)
    self.packing, self.pad_id = packing, pad_id
    self.order = EpochOrder(len(examples), seed)

  def state(self) -> dict[str, int]:
    """The position: ``{"epoch", "index"}`` (next example in that epoch's order)."""
    return self.order.state()

  def restore(self, state: dict[str, int]) -> None:
    self.order.restore(state)

  def _take(self) -> Example:
    return self.examples[self.order.take()]

  def _peek_len(self) -> int:
    return len(self.examples[self.order.peek()])

  def _row(self) -> list[Example]:
    row = [self._take()]
    used = len(row[0])
    while self.packing and used + self._peek_len() <= self.shape[2]:
      row.append(self._take())
      used += len(row[-1])
    return row

  def __next__(self) -> dict[str, np.ndarray]:
    a, b, t = self.shape
    rows = [self._row() for _ in range(a * b)]
    return {k: v.reshape(a, b, t) for k, v in _rows_to_batch(rows, t, self.pad_id).items()}

  def steps_per_epoch(self) -> int:
    """Optimizer steps that cover one epoch (exact without packing, from epoch 0 with it)."""
    a, b, t = self.shape
    n_rows, used = 0, t + 1
    for i in self.order.permutation(0):
      n = len(self.examples[i])
      if not self.packing or used + n > t:
        n_rows, used = n_rows + 1, 0
      used += n
    return max(1, -(-n_rows // (a * b)))


def eval_batches(examples: Sequence[Example], batch_size: int, sequence_len: int,
                 pad_id: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """The examples in order, one per row, ``[batch_size, sequence_len]`` (last batch padded)."""
  for i in range(0, len(examples), batch_size):
    rows = [[ex] for ex in examples[i:i + batch_size]]
    rows += [[]] * (batch_size - len(rows))
    yield _rows_to_batch(rows, sequence_len, pad_id)

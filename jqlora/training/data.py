"""JSONL datasets (alpaca, chat, raw text) -> masked token rows -> packed, shuffled batches.

An example is ``(input_ids, labels)``, int32 ``[L]`` each, with ``labels``
equal to the ids where the token is a target and ``IGNORE_INDEX`` elsewhere.
Prompt tokens are masked unless ``train_on_inputs``; the answer's end of turn
(the chat template's end-of-turn token, else EOS) is always a target.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from jqlora.generate import render_prompt
from jqlora.training.batch import IGNORE_INDEX

__all__ = ["DataError", "Example", "read_text", "read_jsonl", "detect_format", "to_messages", "encode",
           "Dataset", "load_dataset", "BatchIterator", "eval_batches"]

FORMATS = ("alpaca", "chat", "text")
class DataError(ValueError):
  """A dataset that cannot be used (message names the file and line)."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One tokenized example: ``input_ids`` and ``labels``, int32 ``[L]``."""

  input_ids: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.input_ids)


_BOMS = ((b"\xff\xfe\x00\x00", "utf-32-le"), (b"\x00\x00\xfe\xff", "utf-32-be"),
         (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"), (b"\xef\xbb\xbf", "utf-8"))


def read_text(path: str | pathlib.Path) -> str:
  """A text file's contents: UTF-8, or UTF-8/16/32 with a byte-order mark.

  Raises:
    DataError: other bytes (e.g. Latin-1), naming the file, line and byte.
  """
  data = pathlib.Path(path).read_bytes()
  encoding, skip = "utf-8", 0
  for bom, name in _BOMS:
    if data.startswith(bom):
      encoding, skip = name, len(bom)
      break
  try:
    return data[skip:].decode(encoding)
  except UnicodeDecodeError as e:
    line = data[skip:skip + e.start].count(b"\n") + 1 if encoding == "utf-8" else "?"
    raise DataError(f"{path}:{line}: not {encoding.upper()} text (byte 0x{data[skip + e.start]:02x}); "
                    "save the file as UTF-8") from None


def read_jsonl(path: str | pathlib.Path) -> list[dict[str, Any]]:
  """The records of a JSONL file, one JSON object per non-blank line.

  Raises:
    DataError: missing file, a line that is not a JSON object (``file:line``), no records.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f"dataset file {path} does not exist")
  records = []
  for lineno, line in enumerate(read_text(path).split("\n"), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); expected one JSON object "
                      "per line, e.g. {\"instruction\": ..., \"output\": ...}") from None
    if not isinstance(record, dict):
      raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    records.append(record)
  if not records:
    raise DataError(f"dataset {path} is empty: it has no JSON records")
  return records


def detect_format(record: dict[str, Any], where: str = "") -> str:
  """"chat" (``messages``), "alpaca" (``instruction``/``output``) or "text" (``text``)."""
  if "messages" in record:
    return "chat"
  if "instruction" in record and "output" in record:
    return "alpaca"
  if "text" in record:
    return "text"
  raise DataError(f"{where}: cannot tell the format from keys {sorted(record)}; expected "
                  "'messages' (chat), 'instruction' + 'output' (alpaca) or 'text', "
                  "or set dataset_type: chat|alpaca|text")


def _check(record: dict[str, Any], fmt: str, where: str, how: str = "") -> None:
  """Raises DataError for a record that is not of format ``fmt``; ``how``: how ``fmt`` was chosen."""
  if how:
    tag, fix = f"{fmt} format, {how}", "set dataset_type: chat|alpaca|text or fix the record"
  else:
    tag, fix = f"{fmt} format", ""

  def fail(problem: str) -> DataError:
    return DataError(f"{where}: {problem} ({tag}){'; ' + fix if fix else ''}")

  if fmt == "chat":
    msgs = record.get("messages")
    ok = isinstance(msgs, list) and msgs and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in msgs)
    if not ok:
      raise fail("expected 'messages': a non-empty list of {\"role\": str, \"content\": str}")
    if not any(m["role"] == "assistant" for m in msgs):
      raise fail("a chat record needs at least one 'assistant' message")
  elif fmt == "alpaca":
    for key in ("instruction", "output"):
      if not isinstance(record.get(key), str):
        raise fail(f"expected a string '{key}'")
    if not isinstance(record.get("input", ""), str):
      raise fail("expected 'input' to be a string")
  elif not isinstance(record.get("text"), str):
    raise fail("expected a string 'text'")


def to_messages(record: dict[str, Any], fmt: str) -> list[dict[str, str]]:
  """An alpaca or chat record as chat messages (alpaca: one user and one assistant turn)."""
  if fmt == "chat":
    return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
  user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
  return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def _chat_example(tokenizer: Any, messages: list[dict[str, str]], where: str):
  """Token ids and a per-token target mask: assistant contents and their end of turn."""
  render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False,
                                                           add_generation_prompt=gen)
  full = render(messages, False)
  spans = []
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
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


def encode(record: dict[str, Any], tokenizer: Any, fmt: str, *, train_on_inputs: bool = False,
           where: str = "") -> Example:
  """Tokenizes one record and masks its prompt.

  Args:
    record: a JSON record of format ``fmt``.
    tokenizer: a transformers tokenizer (its chat template is used for chat and
      alpaca records when it has one).
    fmt: "alpaca", "chat" or "text".
    train_on_inputs: make every token a target, prompts included.
    where: ``file:line`` for error messages.

  Returns:
    The example; for text records every token (and the appended EOS) is a target.
  """
  _check(record, fmt, where)
  eos = tokenizer.eos_token_id
  if fmt == "text":
    ids = list(tokenizer(record["text"])["input_ids"])
    ids = np.asarray(ids + ([eos] if eos is not None else []), np.int32)
    target = np.ones(len(ids), bool)
  elif getattr(tokenizer, "chat_template", None):
    ids, target = _chat_example(tokenizer, to_messages(record, fmt), where)
  else:
    if fmt == "chat":
      raise DataError(f"{where}: chat records need a tokenizer with a chat template")
    prompt = list(tokenizer(render_prompt(tokenizer, to_messages(record, fmt)[:-1]))["input_ids"])
    answer = list(tokenizer(record["output"], add_special_tokens=False)["input_ids"])
    answer += [eos] if eos is not None else []
    ids = np.asarray(prompt + answer, np.int32)
    target = np.arange(len(ids)) >= len(prompt)
  if train_on_inputs:
    target = np.ones(len(ids), bool)
  return Example(ids, np.where(target, ids, IGNORE_INDEX).astype(np.int32))


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A tokenized JSONL dataset: its records (for generation checks) and examples."""

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


def load_dataset(path: str | pathlib.Path, tokenizer: Any, *, fmt: str = "auto",
                 sequence_len: int, train_on_inputs: bool = False) -> Dataset:
  """Reads and tokenizes a JSONL dataset; examples longer than ``sequence_len`` are truncated.

  The truncated examples are counted and reported in one warning.

  Raises:
    DataError: see ``read_jsonl``; a record of the wrong format (``file:line``).
  """
  records = read_jsonl(path)
  lines = _record_lines(path)
  if fmt == "auto":
    fmt, how = detect_format(records[0], f"{path}:{lines[0]}"), f"detected from line {lines[0]}"
  elif fmt in FORMATS:
    how = "as dataset_type says"
  else:
    raise DataError(f"dataset_type must be 'auto' or one of {FORMATS}, got {fmt!r}")
  examples, too_long = [], 0
  for record, line in zip(records, lines):
    _check(record, fmt, f"{path}:{line}", how)  # the error says how the format was chosen
    ex = encode(record, tokenizer, fmt, train_on_inputs=train_on_inputs, where=f"{path}:{line}")
    if len(ex) > sequence_len:
      too_long += 1
      ex = Example(ex.input_ids[:sequence_len], ex.labels[:sequence_len])
    examples.append(ex)
  if too_long:
    warnings.warn(f"{path}: {too_long} of {len(examples)} examples are longer than "
                  f"sequence_len={sequence_len} tokens and were truncated", stacklevel=2)
  return Dataset(str(path), fmt, records, examples, too_long)


def _record_lines(path: str | pathlib.Path) -> list[int]:
  return [i for i, line in enumerate(read_text(path).split("\n"), 1) if line.strip()]


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
    self.packing, self.seed, self.pad_id = packing, seed, pad_id
    self.epoch, self.index = 0, 0
    self._order = self._permutation(0)

  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

  def state(self) -> dict[str, int]:
    """The position: ``{"epoch", "index"}`` (next example in that epoch's order)."""
    return {"epoch": self.epoch, "index": self.index}

  def restore(self, state: dict[str, int]) -> None:
    self.epoch, self.index = int(state["epoch"]), int(state["index"])
    self._order = self._permutation(self.epoch)

  def _take(self) -> Example:
    if self.index == len(self._order):
      self.epoch, self.index = self.epoch + 1, 0
      self._order = self._permutation(self.epoch)
    ex = self.examples[self._order[self.index]]
    self.index += 1
    return ex

  def _peek_len(self) -> int:
    if self.index == len(self._order):
      return len(self.examples[self._permutation(self.epoch + 1)[0]])
    return len(self.examples[self._order[self.index]])

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
    for i in self._permutation(0):
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

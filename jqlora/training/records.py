"""Dataset files -> records (dicts), each with where it came from.

``.jsonl`` (and ``.ndjson``) files are read here, line by line, in any encoding
with a byte-order mark; ``.json`` (a list of records, or JSON lines),
``.parquet``, ``.csv`` and folders written by ``datasets``' ``save_to_disk`` are
read through the ``datasets`` library (the ``data`` extra). A ``DatasetDict``
folder gives its ``train`` split; point at ``folder/<split>`` for another.
A record's place is ``file:line`` for JSONL and ``file row N`` (1-based) for the
rest, and every error names it. Nulls are dropped (a null field is a missing
one), so a row that lacks a column of the shared table has the keys it was
written with.
"""

from __future__ import annotations

import contextlib
import csv
import json
import pathlib
import tempfile
from collections.abc import Iterator
from typing import Any

__all__ = ["DataError", "FILE_TYPES", "read_text", "read_jsonl", "read_located", "read_records"]

#: File types and how they are read; a folder is a ``save_to_disk`` folder.
FILE_TYPES = {".jsonl": "native", ".ndjson": "native", ".json": "datasets", ".parquet": "datasets",
              ".csv": "datasets"}
_INSTALL = "pip install 'jqlora[data]'"


class DataError(ValueError):
  """A dataset that cannot be used (the message names the file, the line or row, and the field)."""


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


def _jsonl(path: pathlib.Path) -> list[tuple[str, dict[str, Any]]]:
  located = []
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
    located.append((f"{path}:{lineno}", _drop_nulls(record)))
  return located


def read_jsonl(path: str | pathlib.Path) -> list[dict[str, Any]]:
  """The records of a JSONL file, one JSON object per non-blank line.

  Raises:
    DataError: missing file, a line that is not a JSON object (``file:line``), no records.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f"dataset file {path} does not exist")
  return [r for _, r in _nonempty(path, _jsonl(path))]


def _nonempty(path: pathlib.Path, located: list[tuple[str, dict[str, Any]]]
              ) -> list[tuple[str, dict[str, Any]]]:
  if not located:
    raise DataError(f"dataset {path} is empty: it has no records")
  return located


def _drop_nulls(value: Any) -> Any:
  """``value`` without the ``None`` entries of its dicts (at every depth)."""
  if isinstance(value, dict):
    return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
  if isinstance(value, list):
    return [_drop_nulls(v) for v in value]
  return value


@contextlib.contextmanager
def _quiet(datasets: Any) -> Iterator[None]:
  """No ``datasets`` progress bars or log lines inside (the CLI's error lines stay one line)."""
  enabled, verbosity = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
  datasets.disable_progress_bars()
  datasets.logging.set_verbosity(datasets.logging.CRITICAL + 1)
  try:
    yield
  finally:
    datasets.logging.set_verbosity(verbosity)
    if enabled:
      datasets.enable_progress_bars()


def _import_datasets(path: pathlib.Path, kind: str) -> Any:
  try:
    import datasets
  except ImportError:
    raise DataError(f"{path}: reading {kind} needs the datasets library: {_INSTALL}") from None
  return datasets


def _root_cause(e: BaseException) -> BaseException:
  """The innermost error of a chain (``datasets`` wraps the reader's own in a generic one)."""
  while (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__
  return e


def _read_table(path: pathlib.Path) -> Any:
  """The ``datasets.Dataset`` of a .json, .parquet or .csv file or a save_to_disk folder."""
  suffix = path.suffix.lower()
  kind = "a save_to_disk folder" if path.is_dir() else f"{suffix} files"
  datasets = _import_datasets(path, kind)
  with _quiet(datasets), tempfile.TemporaryDirectory(prefix="jqlora-datasets-") as cache:
    try:  # the datasets library raises many kinds of error for a file it cannot read
      if path.is_dir():
        table = datasets.load_from_disk(str(path), keep_in_memory=True)
      elif suffix == ".csv":  # every column as text: "007" stays "007", an empty cell is ""
        with open(path, newline="", encoding="utf-8-sig") as f:
          names = next(csv.reader(f), [])
        features = datasets.Features({n: datasets.Value("string") for n in names})
        table = datasets.Dataset.from_csv(str(path), cache_dir=cache, keep_in_memory=True,
                                          features=features, na_filter=False)
      else:
        read = datasets.Dataset.from_json if suffix == ".json" else datasets.Dataset.from_parquet
        table = read(str(path), cache_dir=cache, keep_in_memory=True)
    except Exception as e:  # reported as one line naming the file
      reason = " ".join(str(_root_cause(e)).split()) or type(e).__name__
      what = "a save_to_disk folder" if path.is_dir() else f"a {suffix[1:].upper()} file"
      raise DataError(f"{path}: cannot be read as {what}: {reason[:300]}") from None
  if isinstance(table, datasets.DatasetDict):
    if "train" not in table:
      raise DataError(f"{path}: this DatasetDict folder has no 'train' split (it has "
                      f"{', '.join(sorted(table))}); point dataset at {path}/<split>")
    table = table["train"]
  return table


def read_located(path: str | pathlib.Path) -> list[tuple[str, dict[str, Any]]]:
  """``(place, record)`` pairs of a dataset file or folder, in order.

  ``place`` is ``file:line`` (JSONL) or ``file row N`` (1-based, the other types).

  Raises:
    DataError: a missing path, an unknown file type, a file that cannot be read
      (for JSONL: a line that is not a JSON object), no records, or the
      ``datasets`` library missing (the message names the ``data`` extra).
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise DataError(f"dataset file {path} does not exist")
  if path.is_file() and path.suffix.lower() not in FILE_TYPES:
    raise DataError(f"{path}: unknown dataset file type {path.suffix or '(no extension)'!r}; expected "
                    f"{', '.join(FILE_TYPES)} or a folder written by datasets' save_to_disk")
  if path.is_file() and FILE_TYPES[path.suffix.lower()] == "native":
    return _nonempty(path, _jsonl(path))
  rows = _read_table(path).to_list()
  return _nonempty(path, [(f"{path} row {i}", _drop_nulls(row)) for i, row in enumerate(rows, 1)])


def read_records(path: str | pathlib.Path) -> list[dict[str, Any]]:
  """The records of a dataset file or folder (see ``read_located``), in order."""
  return [record for _, record in read_located(path)]

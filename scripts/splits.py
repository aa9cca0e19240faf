"""What the data scripts share: their command line, distinct draws, and writing the splits."""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Callable, Hashable
from typing import Any

DATA = pathlib.Path(__file__).resolve().parents[1] / "data"


def split_args(doc: str, folder: str, train: int, held_out: str, held: int) -> argparse.Namespace:
  """``--out`` (default ``data/<folder>``), ``--train``, ``--<held_out>`` sizes and ``--seed``."""
  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  parser.add_argument("--out", default=str(DATA / folder))
  parser.add_argument("--train", type=int, default=train)
  parser.add_argument(f"--{held_out}", type=int, default=held)
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_args()


def distinct(draw: Callable[[], Any], key: Callable[[Any], Hashable], n: int,
             keep: Callable[[Any], bool] = lambda _: True) -> list[Any]:
  """``n`` draws with pairwise different ``key`` (and ``keep`` true): no held-out leak."""
  seen, out = set(), []
  while len(out) < n:
    item = draw()
    if key(item) not in seen and keep(item):
      seen.add(key(item))
      out.append(item)
  return out


def write_splits(out: str | pathlib.Path, parts: dict[str, list[dict]], noun: str = "examples"):
  """Each ``parts`` entry as ``<out>/<name>.jsonl``, one JSON record per line."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  for name, records in parts.items():
    with open(out / f"{name}.jsonl", "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)
    print(f"wrote {len(records)} {noun} to {out / f'{name}.jsonl'}")

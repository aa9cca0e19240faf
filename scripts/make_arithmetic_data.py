"""Writes the arithmetic dataset: two-digit sums and differences -> the bare number.

The second task of ``benchmarks/finetune_quality.py``, of another kind than the
demo's extraction: the answer is computed, not copied from the input. Each record
asks for ``a + b`` or ``a - b`` (``a >= b`` for a difference) with ``a, b`` in
10..99, worded one of a few ways; the reference answer is the result alone
(``"85"``), scored by exact match. Train and test inputs are distinct (no
held-out leak), and the same seed always writes the same files.

Usage: python scripts/make_arithmetic_data.py [--out data/arithmetic] [--train 600] [--test 100]
    [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random

TEMPLATES = ["{a} {op} {b}", "What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?"]
INSTRUCTION = "Calculate. Answer with the number only."


def example(rng: random.Random) -> tuple[tuple[int, str, int], dict[str, str]]:
  """One problem ``(a, op, b)`` and its alpaca record."""
  a, b = rng.randint(10, 99), rng.randint(10, 99)
  op = rng.choice("+-")
  if op == "-" and a < b:
    a, b = b, a
  value = a + b if op == "+" else a - b
  return (a, op, b), {"instruction": INSTRUCTION,
                      "input": rng.choice(TEMPLATES).format(a=a, op=op, b=b), "output": str(value)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=str(pathlib.Path(__file__).parents[1] / "data" / "arithmetic"))
  parser.add_argument("--train", type=int, default=600)
  parser.add_argument("--test", type=int, default=100)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  rng = random.Random(args.seed)
  seen, records = set(), []
  while len(records) < args.train + args.test:  # distinct problems: no held-out leak
    key, r = example(rng)
    if key not in seen:  # a problem in train is never in test, however worded
      seen.add(key)
      records.append(r)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  for name, part in (("train", records[:args.train]), ("test", records[args.train:])):
    with open(out / f"{name}.jsonl", "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in part)
    print(f"wrote {len(part)} examples to {out / f'{name}.jsonl'}")


if __name__ == "__main__":
  main()

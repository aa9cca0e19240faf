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

import random

from splits import distinct, split_args, write_splits

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
  args = split_args(__doc__, "arithmetic", train=600, held_out="test", held=100)
  rng = random.Random(args.seed)
  # distinct problems: a problem in train is never in test, however worded
  records = [r for _, r in distinct(lambda: example(rng), key=lambda x: x[0],
                                    n=args.train + args.test)]
  write_splits(args.out, {"train": records[:args.train], "test": records[args.train:]})


if __name__ == "__main__":
  main()

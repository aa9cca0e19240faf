"""Writes the DPO demo preference set: reverse a made-up word; chosen reversed, rejected copied.

Each record is TRL's conversational preference form with an explicit prompt:
``{"prompt": [user], "chosen": [assistant], "rejected": [assistant]}``. The words are
made of random syllables (no word is in both files), so only the rule can be
learnt. SmolLM2-135M-Instruct prefers copying the word (the rejected answer) to
reversing it; a few dozen DPO steps on the frozen NF4 base turn the preference.

Usage: python scripts/make_dpo_data.py [--out data/dpo] [--train 320] [--test 64] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random

SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def record(word: str) -> dict[str, list[dict[str, str]]]:
  """One preference pair for ``word``."""
  return {"prompt": [{"role": "user", "content": f"Reverse the letters of the word: {word}"}],
          "chosen": [{"role": "assistant", "content": word[::-1]}],
          "rejected": [{"role": "assistant", "content": word}]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=str(pathlib.Path(__file__).parents[1] / "data" / "dpo"))
  parser.add_argument("--train", type=int, default=320)
  parser.add_argument("--test", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  rng = random.Random(args.seed)
  words: list[str] = []
  while len(words) < args.train + args.test:  # distinct, and never a palindrome
    word = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))
    if word not in words and word != word[::-1]:
      words.append(word)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  for name, part in (("train", words[:args.train]), ("test", words[args.train:])):
    with open(out / f"{name}.jsonl", "w") as f:
      f.writelines(json.dumps(record(w)) + "\n" for w in part)
    print(f"wrote {len(part)} pairs to {out / f'{name}.jsonl'}")


if __name__ == "__main__":
  main()

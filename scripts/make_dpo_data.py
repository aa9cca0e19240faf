"""Writes the DPO demo preference set: reverse a made-up word; chosen reversed, rejected copied.

Each record is TRL's conversational preference form with an explicit prompt:
``{"prompt": [user], "chosen": [assistant], "rejected": [assistant]}``. The words are
made of random syllables (no word is in both files), so only the rule can be
learnt. SmolLM2-135M-Instruct prefers copying the word (the rejected answer) to
reversing it; a few dozen DPO steps on the frozen NF4 base turn the preference.

Usage: python scripts/make_dpo_data.py [--out data/dpo] [--train 320] [--test 64] [--seed 0]
"""

from __future__ import annotations

import random

from splits import distinct, split_args, write_splits

SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def record(word: str) -> dict[str, list[dict[str, str]]]:
  """One preference pair for ``word``."""
  return {"prompt": [{"role": "user", "content": f"Reverse the letters of the word: {word}"}],
          "chosen": [{"role": "assistant", "content": word[::-1]}],
          "rejected": [{"role": "assistant", "content": word}]}


def main() -> None:
  args = split_args(__doc__, "dpo", train=320, held_out="test", held=64)
  rng = random.Random(args.seed)
  draw = lambda: "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))
  words = distinct(draw, key=lambda w: w, n=args.train + args.test,
                   keep=lambda w: w != w[::-1])  # never a palindrome
  write_splits(args.out, {"train": [record(w) for w in words[:args.train]],
                          "test": [record(w) for w in words[args.train:]]}, noun="pairs")


if __name__ == "__main__":
  main()

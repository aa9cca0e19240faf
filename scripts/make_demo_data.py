"""Writes the demo dataset: sentences about a person -> a fixed-format JSON record.

The task (exact-match scored) is to extract name, age and city from one of
several sentence shapes into ``{"name": ..., "age": ..., "city": ...}`` with
exactly this key order and spacing. SmolLM2-135M-Instruct does not answer in
this exact form out of the box; a few dozen QLoRA steps teach it.

Usage: python scripts/make_demo_data.py [--out data/demo] [--train 600] [--eval 100] [--seed 0]
"""

from __future__ import annotations

import json
import random

from splits import distinct, split_args, write_splits

FIRST = ["Alice", "Bruno", "Chen", "Dana", "Emil", "Fatima", "Goran", "Hana", "Ivan", "Julia",
         "Kofi", "Lena", "Marco", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara",
         "Umar", "Vera", "Wes", "Xenia", "Yusuf", "Zoe", "Aron", "Bea", "Carlos", "Dmitri"]
LAST = ["Johnson", "Silva", "Wang", "Novak", "Berg", "Khan", "Petrov", "Sato", "Moreau", "Keller",
        "Mensah", "Fischer", "Rossi", "Haddad", "Garcia", "Iyer", "Murphy", "Lopez", "Larsen",
        "Brown", "Ali", "Costa", "Dubois", "Meyer", "Yilmaz", "Nowak", "Schmidt", "Tanaka"]
CITIES = ["Paris", "Lagos", "Osaka", "Lima", "Oslo", "Cairo", "Denver", "Porto", "Quito", "Seoul",
          "Vienna", "Dublin", "Nairobi", "Madrid", "Toronto", "Hanoi", "Krakow", "Austin", "Perth",
          "Bergen", "Lyon", "Kyoto", "Accra", "Tunis", "Riga"]
TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}, a {age}-year-old from {city}.",
    "{name} ({age}) lives in {city}.",
    "Living in {city}, {name} turned {age} this year.",
    "{city} resident {name}, age {age}.",
    "At {age}, {name} moved to {city}.",
]
INSTRUCTION = "Extract the person's name, age and city as JSON."


def example(rng: random.Random) -> dict[str, str]:
  """One alpaca record."""
  name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
  age, city = rng.randint(18, 90), rng.choice(CITIES)
  sentence = rng.choice(TEMPLATES).format(name=name, age=age, city=city)
  answer = json.dumps({"name": name, "age": age, "city": city})
  return {"instruction": INSTRUCTION, "input": sentence, "output": answer}


def main() -> None:
  args = split_args(__doc__, "demo", train=600, held_out="eval", held=100)
  rng = random.Random(args.seed)
  records = distinct(lambda: example(rng), key=lambda r: r["input"], n=args.train + args.eval)
  write_splits(args.out, {"train": records[:args.train], "eval": records[args.train:]})


if __name__ == "__main__":
  main()

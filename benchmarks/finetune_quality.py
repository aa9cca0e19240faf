"""QLoRA vs LoRA vs full fine-tuning on two small tasks: the QLoRA paper's Tables 3-4 in miniature.

Two bundled tasks of different kinds: ``demo`` (extract name, age and city into one
fixed JSON form; ``data/demo``, ``scripts/make_demo_data.py``) and ``arithmetic``
(two-digit sums and differences, the bare number; ``data/arithmetic``,
``scripts/make_arithmetic_data.py``). Each is trained with four methods, each with
3 seeds, and scored on the held-out prompts by greedy exact match and by the loss
over their answer tokens:

* ``full``: every weight of the float base trains (``finetune: full``);
* ``lora``: LoRA on the float base (``load_in_4bit: false``);
* ``qlora_nf4_dq``: QLoRA, the base in NF4 with double quantization (``load_in_4bit: true``);
* ``qlora_fp4``: QLoRA, the base in FP4 (``bnb_4bit_quant_type: fp4``; double-quantized
  scales too, as ``load_in_4bit`` always makes them).

Every run has the same data, steps, batch and schedule; the learning rate is
chosen per method family, as the paper did (LoRA/QLoRA 2e-3, the demo config's;
full fine-tuning 5e-5, a usual rate for every weight of a pretrained model).
Each method is a ``TrainConfig`` (the YAML keys, recorded in the JSON) and runs
``jqlora train``'s steps: ``load_model``, ``apply_lora``, ``make_tx``,
``make_optimizer``, ``train_step`` on ``BatchIterator`` batches, then ``eval_loss``
and ``exact_match`` (LoRA decodes from a merged copy, ``eval_merged_copy``). Unlike
``jqlora.training.loop.train`` it loads each base once and copies it per run, keeps
the compiled steps between runs, and writes no checkpoints, so that the 24 runs fit
a 2-core CPU.

The base is the embedded SmolLM2-135M-Instruct GGUF, which is itself Q4_1: its
"float" weights are 4-bit values widened to float32, so "full" and "lora" train on a
float32 copy of a 4-bit model and the QLoRA bases re-quantize it.

  python benchmarks/finetune_quality.py [--quick] [--seeds 3] [--steps 10]
      [--tasks demo arithmetic] [--methods ...] [--eval-examples 32] [--base PATH]
      [--out benchmarks/results/finetune_quality.json] [--render]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
from flax import nnx

from jqlora.io import DEFAULT_MODEL, load_model, load_tokenizer
from jqlora.nn import Frozen, LoraConfig, apply_lora, merge_lora
from jqlora.training.config import TrainConfig
from jqlora.training.data import BatchIterator, Dataset, load_dataset
from jqlora.training.evaluate import eval_loss, exact_match
from jqlora.training.optim import make_optimizer, make_schedule, make_tx
from jqlora.training.step import train_step

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from machine import machine_info  # benchmarks/machine.py

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: task -> (training file, held-out file, generation length for exact match: the longest answer + EOS)
TASKS = {"demo": ("data/demo/train.jsonl", "data/demo/eval.jsonl", 28),
         "arithmetic": ("data/arithmetic/train.jsonl", "data/arithmetic/test.jsonl", 5)}
#: method -> its TrainConfig keys over COMMON
METHODS = {"full": {"finetune": "full", "load_in_4bit": False, "learning_rate": 5e-5},
           "lora": {"load_in_4bit": False, "learning_rate": 2e-3},
           "qlora_nf4_dq": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "learning_rate": 2e-3},
           "qlora_fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "learning_rate": 2e-3}}
#: what every run shares: the demo config's adapter and schedule, half its micro batch (for the time budget)
COMMON = {"dtype": "float32", "lora_r": 16, "lora_alpha": 32.0, "lora_target_modules": ["q_proj", "v_proj"],
          "sequence_len": 128, "sample_packing": True, "micro_batch_size": 2, "lr_scheduler": "cosine",
          "warmup_steps": 2, "max_grad_norm": 1.0}
#: the QLoRA paper, Table 4: mean 5-shot MMLU after fine-tuning LLaMA 7B-65B on Alpaca and FLAN v2
PAPER_TABLE_4 = {"bf16": 53.0, "fp4": 52.2, "nf4_dq": 53.1}


@dataclasses.dataclass(frozen=True)
class Task:
  """A task's tokenized training set and held-out set (its first ``eval_examples`` records)."""

  name: str
  train: Dataset
  test: Dataset
  max_new_tokens: int


def load_task(name: str, tokenizer, sequence_len: int, eval_examples: int) -> Task:
  """``TASKS[name]`` tokenized; the held-out set cut to its first ``eval_examples`` records."""
  train_file, test_file, max_new_tokens = TASKS[name]
  kw = dict(sequence_len=sequence_len)
  test = load_dataset(ROOT / test_file, tokenizer, **kw)
  test = dataclasses.replace(test, records=test.records[:eval_examples],
                             examples=test.examples[:eval_examples])
  return Task(name, load_dataset(ROOT / train_file, tokenizer, **kw), test, max_new_tokens)


def _load_1min() -> float:
  return round(os.getloadavg()[0], 2)


def run_one(config: TrainConfig, base: nnx.Module, task: Task, tokenizer, pad_id: int) -> dict:
  """Trains a copy of ``base`` as ``config`` says: held-out loss and exact match, wall and CPU time
  (this process's, all threads: on a loaded machine, CPU seconds / cores bounds the idle wall time)."""
  load_before, start, cpu = _load_1min(), time.perf_counter(), time.process_time()
  graph, state = nnx.split(base)
  model = nnx.merge(graph, jax.tree.map(jnp.copy, state))  # its own buffers: train_step donates them
  full = config.finetune == "full"
  if not full:
    apply_lora(model, LoraConfig(r=config.lora_r, alpha=config.lora_alpha,
                                 target_modules=config.lora_target_modules), rngs=nnx.Rngs(config.seed))
  model.rngs = nnx.Rngs(dropout=config.seed)
  steps = config.max_steps
  tx = make_tx(make_schedule(config.lr_scheduler, config.learning_rate, steps, config.warmup_steps),
               max_grad_norm=config.max_grad_norm)
  optimizer = make_optimizer(model, tx, wrt=Frozen) if full else make_optimizer(model, tx)
  batches = BatchIterator(task.train.examples, micro_batch_size=config.micro_batch_size, accumulation=1,
                          sequence_len=config.sequence_len, packing=config.sample_packing,
                          seed=config.seed, pad_id=pad_id)
  model.train()
  losses = [float(train_step(model, optimizer, next(batches))["loss"]) for _ in range(steps)]
  trained = time.perf_counter() - start
  model.eval()
  loss, _ = eval_loss(model, task.test.examples, batch_size=len(task.test.examples),
                      sequence_len=config.sequence_len, pad_id=pad_id)
  decoder = model if full else merge_lora(model, copy=True)
  acc, _ = exact_match(decoder, tokenizer, task.test, batch_size=len(task.test.records),
                       max_new_tokens=task.max_new_tokens)
  return {"exact_match": acc, "eval_loss": loss, "first_loss": losses[0], "last_loss": losses[-1],
          "train_seconds": round(trained, 1), "seconds": round(time.perf_counter() - start, 1),
          "cpu_seconds": round(time.process_time() - cpu, 1),
          "load_average_1min": [load_before, _load_1min()]}


def _stats(values: list[float]) -> dict:
  """Mean, sample standard deviation (0 for one value) and the values."""
  std = statistics.stdev(values) if len(values) > 1 else 0.0
  return {"mean": statistics.fmean(values), "std": std, "values": values}


def summarize(runs: list[dict]) -> dict:
  """``task -> method -> {exact_match, eval_loss, seconds}`` as mean ± std over the seeds."""
  out: dict = {}
  for r in runs:
    cell = out.setdefault(r["task"], {}).setdefault(r["method"], {"exact_match": [], "eval_loss": [],
                                                                  "seconds": []})
    for key in cell:
      cell[key].append(r[key])
  return {t: {m: {k: _stats(v) for k, v in cell.items()} for m, cell in ms.items()}
          for t, ms in out.items()}


def markdown(result: dict) -> str:
  lines = ["| task | method | seeds | held-out exact match | held-out loss | s / run |",
           "|---|---|---:|---:|---:|---:|"]
  for task, methods in result["summary"].items():
    for method, s in methods.items():
      em, loss = s["exact_match"], s["eval_loss"]
      lines.append(f"| {task} | {method} | {len(em['values'])} | {100 * em['mean']:.1f}% ± "
                   f"{100 * em['std']:.1f} | {loss['mean']:.4f} ± {loss['std']:.4f} | "
                   f"{s['seconds']['mean']:.0f} |")
  return "\n".join(lines)


def plot(result: dict, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  summary = result["summary"]
  tasks = list(summary)
  methods = [m for m in METHODS if any(m in summary[t] for t in tasks)]
  width = 0.8 / len(methods)
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
  for ax, key, label, scale in ((axes[0], "exact_match", "held-out exact match (%)", 100),
                                (axes[1], "eval_loss", "held-out loss (answer tokens)", 1)):
    for j, m in enumerate(methods):
      xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(tasks))]
      cells = [summary[t].get(m, {}).get(key, {"mean": float("nan"), "std": 0.0}) for t in tasks]
      ax.bar(xs, [scale * c["mean"] for c in cells], width, yerr=[scale * c["std"] for c in cells],
             capsize=3, label=m, color=f"C{j}")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel(label)
  axes[1].set_yscale("log")  # the tasks' losses differ by orders of magnitude
  axes[0].legend(fontsize=8)
  s, seeds = result["settings"], sorted({r["seed"] for r in result["runs"]})
  fig.suptitle(f"{result['base_model']}: {s['max_steps']} steps x {s['micro_batch_size']} x "
               f"{s['sequence_len']} tokens, mean ± std over seeds {seeds}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="1 seed, the arithmetic task, 3 steps, 8 held-out prompts")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--eval-examples", type=int, default=32)
  parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
  parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
  parser.add_argument("--base", default=DEFAULT_MODEL, help="the float base (default: the embedded GGUF)")
  parser.add_argument("--out", type=pathlib.Path,
                      default=ROOT / "benchmarks" / "results" / "finetune_quality.json")
  parser.add_argument("--render", action="store_true",
                      help="train nothing: draw the plot and print the table of the JSON at --out "
                           "(e.g. of a run stopped early: the JSON is written after every run)")
  args = parser.parse_args(argv)
  if args.render:
    result = json.loads(args.out.read_text())
    plot(result, args.out.with_suffix(".png"))
    print(markdown(result))
    return result
  if args.quick:
    args.seeds, args.steps, args.eval_examples, args.tasks = 1, 3, 8, ["arithmetic"]

  machine, start = machine_info(), time.perf_counter()
  common = {**COMMON, "max_steps": args.steps}
  tokenizer = load_tokenizer(args.base)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  bases: dict[tuple, nnx.Module] = {}
  loaded = {name: load_task(name, tokenizer, common["sequence_len"], args.eval_examples)
            for name in args.tasks}
  tasks = {name: {"train": TASKS[name][0], "test": TASKS[name][1], "train_examples": len(t.train.records),
                  "test_examples": len(t.test.records), "max_new_tokens": t.max_new_tokens}
           for name, t in loaded.items()}
  runs = []
  for seed in range(args.seeds):  # seeds outermost: a run stopped early has every cell for some seeds
    for name, task in loaded.items():
      for method in args.methods:
        config = TrainConfig(base_model=args.base, dataset=str(ROOT / TASKS[name][0]), seed=seed,
                             **common, **METHODS[method])
        key = (config.load_in_4bit, config.bnb_4bit_quant_type if config.load_in_4bit else None)
        if key not in bases:
          bases[key] = load_model(args.base, quantize=config.load_in_4bit,
                                  quant_type=config.bnb_4bit_quant_type, dtype=jnp.dtype(config.dtype),
                                  progress=False)
        row = {"task": name, "method": method, "seed": seed,
               **run_one(config, bases[key], task, tokenizer, pad_id)}
        runs.append(row)
        print(f"{name:<10} {method:<13} seed {seed}: exact match {row['exact_match']:6.1%}, held-out loss "
              f"{row['eval_loss']:.4f}, {row['seconds']:5.1f}s (load {row['load_average_1min']})",
              flush=True)
        result = {
            "base_model": args.base,
            "note": ("the embedded GGUF is Q4_1: the float base is its 4-bit values widened to float32; "
                     "the QLoRA bases re-quantize those" if args.base == DEFAULT_MODEL else ""),
            "settings": common, "methods": METHODS, "seeds": args.seeds, "tasks": tasks, "runs": runs,
            "summary": summarize(runs), "paper_table_4_mmlu": PAPER_TABLE_4,
            "machine": {**machine, "load_average_end": [round(x, 2) for x in os.getloadavg()],
                        "note": "the cores may be shared with other jobs: see each run's load average"},
            "seconds": round(time.perf_counter() - start, 1), "quick": args.quick,
            "complete": len(runs) == len(args.tasks) * len(args.methods) * args.seeds,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")  # after every run: a partial result
  plot(result, args.out.with_suffix(".png"))
  print(markdown(result))
  print(f"wrote {args.out} and .png in {result['seconds']:.0f}s")
  return result


if __name__ == "__main__":
  main()

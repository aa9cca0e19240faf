"""The ``jqlora`` command: ``train``, ``generate``, ``export`` and ``plan``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _default_dtype() -> str:
  import jax

  return "float32" if jax.default_backend() == "cpu" else "bfloat16"  # bf16 is slower on CPU


def _cmd_train(args: argparse.Namespace) -> int:
  from jqlora.training.config import load_config, parse_overrides
  from jqlora.training.loop import train

  config = load_config(args.config, parse_overrides(args.overrides))
  train(config)
  return 0


def _load(model: str, adapter: str | None, *, quantize: bool, dtype: str):
  import jax.numpy as jnp

  from jqlora.io import load_adapter, load_model

  m = load_model(model, quantize=quantize, dtype=jnp.dtype(dtype))
  if adapter:
    load_adapter(m, adapter)
  return m


def _cmd_generate(args: argparse.Namespace) -> int:
  from jqlora.generate import generate
  from jqlora.io import load_tokenizer

  tokenizer = load_tokenizer(args.model)
  model = _load(args.model, args.adapter, quantize=not args.no_quantize,
                dtype=args.dtype or _default_dtype())
  model.eval()
  for answer in generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                         chat=not args.raw):
    print(answer)
  return 0


def export(model_path: str, adapter: str, out: str | pathlib.Path, *, merged: bool = False) -> None:
  """Writes ``adapter`` (trained on ``model_path``) to ``out`` as a PEFT adapter or merged model.

  Args:
    model_path: the base model (as for ``jqlora.load_model``).
    adapter: a PEFT adapter folder.
    out: the output folder.
    merged: write the base with the adapter merged in, full precision
      (float32 ``model.safetensors`` + ``config.json``, and the tokenizer when
      it can be saved) instead of the adapter alone.
  """
  from jqlora.io import load_tokenizer, save_adapter, save_merged

  model = _load(model_path, adapter, quantize=not merged, dtype="float32")
  if not merged:
    save_adapter(model, out)
    return
  try:
    tokenizer = load_tokenizer(model_path)
  except (OSError, ValueError):
    tokenizer = None  # a base without tokenizer files: weights and config are the export
  save_merged(model, out, tokenizer)


def _cmd_export(args: argparse.Namespace) -> int:
  export(args.model, args.adapter, args.out, merged=args.merged)
  print(f"wrote {'merged model' if args.merged else 'PEFT adapter'} to {args.out}")
  return 0


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="jqlora", description="QLoRA fine-tuning in JAX.")
  sub = p.add_subparsers(dest="command", required=True)

  t = sub.add_parser("train", help="fine-tune from a YAML config",
                     description="Fine-tune as FILE.yaml says; key=value overrides any key. "
                                 "Resumes automatically from a checkpoint in output_dir.")
  t.add_argument("--config", required=True, help="YAML config file")
  t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
  t.set_defaults(fn=_cmd_train)

  g = sub.add_parser("generate", help="answer a prompt (chat template, KV cache)")
  g.add_argument("--model", required=True, help="base model: folder, .gguf or a default name")
  g.add_argument("--adapter", help="PEFT adapter folder")
  g.add_argument("--prompt", required=True, action="append", help="user message (repeatable)")
  g.add_argument("--max-new-tokens", type=int, default=128)
  g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  g.add_argument("--top-p", type=float, default=1.0)
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--raw", action="store_true", help="use the prompt as is (no chat template)")
  g.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: float32 on CPU")
  g.add_argument("--no-quantize", action="store_true", help="keep the base in full precision")
  g.set_defaults(fn=_cmd_generate)

  e = sub.add_parser("export", help="write a PEFT adapter or a merged full-precision model")
  e.add_argument("--model", required=True, help="the base model the adapter was trained on")
  e.add_argument("--adapter", required=True, help="PEFT adapter folder")
  e.add_argument("--out", required=True, help="output folder")
  e.add_argument("--merged", action="store_true",
                 help="merge into the full-precision base (safetensors + config.json)")
  e.set_defaults(fn=_cmd_export)

  sub.add_parser("plan", add_help=False,
                 help="memory budget per device and whether it fits (jqlora plan --help)")
  return p


def _plan_main(argv: Sequence[str]) -> int:
  """``jqlora plan --model M --devices N --memory-per-device 48GiB --batch B --seq L``."""
  from jqlora.plan import PRESETS, budget, format_plan, plan

  ap = argparse.ArgumentParser(prog="jqlora plan", description=budget.__doc__.splitlines()[0])
  ap.add_argument("--model", required=True,
                  help=f"checkpoint folder, config.json, .gguf or preset ({', '.join(PRESETS)})")
  ap.add_argument("--devices", type=int, default=1)
  ap.add_argument("--memory-per-device", default=None, help="e.g. 48GiB, 80GB")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--lora-r", type=int, default=16)
  ap.add_argument("--target-modules", default="all-linear",
                  help="'all-linear' or comma-separated names (q_proj,v_proj)")
  ap.add_argument("--data", type=int, default=None)
  ap.add_argument("--fsdp", type=int, default=None)
  ap.add_argument("--tensor", type=int, default=1)
  ap.add_argument("--no-checkpointing", action="store_true")
  ap.add_argument("--dtype", default="bfloat16", choices=sorted(budget.DTYPE_BYTES))
  ap.add_argument("--optimizer-offload", action="store_true",
                  help="Adam moments on the host (QLoRA's paged optimizer)")
  ap.add_argument("--json", action="store_true", help="print the plan as JSON")
  args = ap.parse_args(argv)
  targets = args.target_modules if args.target_modules == "all-linear" else \
      [t.strip() for t in args.target_modules.split(",") if t.strip()]
  try:
    p = plan(args.model, devices=args.devices, memory_per_device=args.memory_per_device,
             batch=args.batch, seq=args.seq, lora_r=args.lora_r, target_modules=targets,
             data=args.data, fsdp=args.fsdp, tensor=args.tensor,
             checkpointing=not args.no_checkpointing, dtype=args.dtype,
             optimizer_offload=args.optimizer_offload)
  except (ValueError, FileNotFoundError) as e:
    ap.error(str(e))
  if args.json:
    print(json.dumps({**dataclasses.asdict(p), "total": p.total, "fits": p.fits}))
  else:
    print(format_plan(p))
  return 0 if p.fits else 1


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the ``jqlora`` command; user errors print one line and exit 2.

  ``jqlora plan …`` exits 0 when the run fits, 1 when not.
  """
  from jqlora.training.config import ConfigError
  from jqlora.training.data import DataError

  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ["plan"]:
    return _plan_main(argv[1:])
  args = _parser().parse_args(argv)
  try:
    return args.fn(args)
  except (ConfigError, DataError, FileNotFoundError) as e:
    print(f"jqlora {args.command}: error: {e}", file=sys.stderr)
    return 2
  except RuntimeError as e:
    from jqlora.training.loop import TrainingError

    if not isinstance(e, TrainingError):
      raise
    print(f"jqlora {args.command}: error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())

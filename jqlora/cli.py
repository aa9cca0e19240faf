"""The ``jqlora`` command: ``train``, ``generate``, ``export``, ``plot`` and ``plan``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib
import sys
from collections.abc import Sequence

__all__ = ["MERGE_INTO", "export", "main"]


def _default_dtype() -> str:
  import jax

  return "float32" if jax.default_backend() == "cpu" else "bfloat16"  # bf16 is slower on CPU


def _cmd_train(args: argparse.Namespace) -> int:
  from jqlora.plan.fit import check_train_config
  from jqlora.training.config import load_config, parse_overrides
  from jqlora.training.loop import train

  config = load_config(args.config, parse_overrides(args.overrides))
  check_train_config(config)  # a checkpoint too large for the devices: one line, before loading
  train(config)
  return 0


def _load(model: str, adapter: str | None, *, quantize: bool, dtype: str):
  """The model (and adapter); an error either folder causes is a ConfigError naming the flag."""
  import jax.numpy as jnp

  from jqlora.io import load_adapter, load_model
  from jqlora.training.config import blame

  with blame("--model"):
    m = load_model(model, quantize=quantize, dtype=jnp.dtype(dtype))
  if adapter:
    with blame("--adapter"):
      load_adapter(m, adapter)
  return m


def _cmd_generate(args: argparse.Namespace) -> int:
  from jqlora.generate import generate
  from jqlora.io import load_tokenizer
  from jqlora.training.config import ConfigError, blame

  if args.max_new_tokens < 0:
    raise ConfigError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
  if args.temperature < 0 or not 0 < args.top_p <= 1:
    raise ConfigError(f"--temperature must be >= 0 and --top-p in (0, 1], got {args.temperature} "
                      f"and {args.top_p}")
  if not all(p.strip() for p in args.prompt):
    raise ConfigError("--prompt must not be empty")
  with blame("--model"):
    tokenizer = load_tokenizer(args.model)
  model = _load(args.model, args.adapter, quantize=not args.no_quantize,
                dtype=args.dtype or _default_dtype())
  model.eval()
  for answer in generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                         chat=not args.raw, verbose=args.verbose):
    print(answer)
  return 0


#: ``export(..., merge_into=...)``: the base a merged export folds the adapter into.
MERGE_INTO = ("nf4", "original")
_MERGED_INTO = {
    "nf4": "merged into the dequantized NF4 base (the weights a QLoRA adapter trains against); "
           "--merge-into original merges into the full-precision checkpoint",
    "original": "merged into the full-precision checkpoint (--merge-into original); the default, "
                "--merge-into nf4, merges into the dequantized NF4 base a QLoRA adapter trains "
                "against",
}


def export(model_path: str, adapter: str, out: str | pathlib.Path, *, merged: bool = False,
           merge_into: str = "nf4") -> None:
  """Writes ``adapter`` (trained on ``model_path``) to ``out`` as a PEFT adapter or merged model.

  Args:
    model_path: the base model (as for ``jqlora.load_model``).
    adapter: a PEFT adapter folder.
    out: the output folder.
    merged: write the base with the adapter merged in (float32 ``model.safetensors``
      + ``config.json``, and the tokenizer when it can be saved) instead of the
      adapter alone.
    merge_into: with ``merged``, the base the adapter is folded into. ``"nf4"``
      (default): the base quantized to NF4 as ``jqlora train`` loads it, then
      dequantized, ``W_nf4 + s·BA``: the weights a QLoRA adapter was trained
      against, as PEFT's ``merge_and_unload`` on a 4-bit base. ``"original"``: the
      full-precision checkpoint, ``W + s·BA`` (for an adapter trained with
      ``load_in_4bit: false``). A base stored as NF4 (a bitsandbytes folder) has
      only its NF4 weights either way.

  Raises:
    ValueError: ``merge_into`` is not one of ``MERGE_INTO``.
    ConfigError: a model, adapter or output folder that cannot be used (the
      message names the flag: ``--model``, ``--adapter``, ``--out``).
  """
  if merge_into not in MERGE_INTO:
    raise ValueError(f"export: merge_into must be one of {', '.join(map(repr, MERGE_INTO))}, "
                     f"got {merge_into!r}")
  from jqlora.io import load_tokenizer, save_adapter, save_merged
  from jqlora.training.config import ConfigError, blame

  out = pathlib.Path(out)
  for p in (out, *out.parents):  # before loading: nothing is written when the folder cannot be
    if p.exists() and not p.is_dir():
      raise ConfigError(f"--out {out}: {p} is a file; expected a folder (or a path to create)")
  model = _load(model_path, adapter, quantize=not merged or merge_into == "nf4", dtype="float32")
  if not merged:
    with blame(f"--out {out}"):
      save_adapter(model, out)
    return
  try:
    tokenizer = load_tokenizer(model_path)
  except (OSError, ValueError):
    tokenizer = None  # a base without tokenizer files: weights and config are the export
  with blame(f"--out {out}"):
    save_merged(model, out, tokenizer)


def _cmd_export(args: argparse.Namespace) -> int:
  if args.merge_into is not None and not args.merged:
    print("jqlora export: error: --merge-into chooses the base of a merged export; add --merged",
          file=sys.stderr)
    return 2
  merge_into = args.merge_into or "nf4"
  export(args.model, args.adapter, args.out, merged=args.merged, merge_into=merge_into)
  if args.merged:
    print(_MERGED_INTO[merge_into])
  print(f"wrote {'merged model' if args.merged else 'PEFT adapter'} to {args.out}")
  return 0


def _cmd_plot(args: argparse.Namespace) -> int:
  from jqlora.training.config import ConfigError
  from jqlora.training.plot import plot_run

  try:
    path = plot_run(args.run_dir)
  except ImportError:
    raise ConfigError("drawing loss.png needs matplotlib: pip install matplotlib") from None
  print(f"wrote {path}")
  return 0


def _parser() -> argparse.ArgumentParser:
  from jqlora import __version__

  p = argparse.ArgumentParser(prog="jqlora", description="QLoRA fine-tuning in JAX.")
  p.add_argument("--version", action="version", version=f"jqlora {__version__}")
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
  g.add_argument("--verbose", action="store_true",
                 help="print the tokens generated, seconds and tokens/s to stderr")
  g.set_defaults(fn=_cmd_generate)

  e = sub.add_parser("export", help="write a PEFT adapter or a merged float32 model")
  e.add_argument("--model", required=True, help="the base model the adapter was trained on")
  e.add_argument("--adapter", required=True, help="PEFT adapter folder")
  e.add_argument("--out", required=True, help="output folder")
  e.add_argument("--merged", action="store_true",
                 help="write the base with the adapter merged in, float32 (model.safetensors + "
                      "config.json) instead of the adapter alone")
  e.add_argument("--merge-into", choices=MERGE_INTO, default=None,
                 help="with --merged, the base the adapter is folded into: nf4 = the dequantized "
                      "NF4 base a QLoRA adapter trains against, original = the full-precision "
                      "checkpoint (default: nf4)")
  e.set_defaults(fn=_cmd_export)

  pl = sub.add_parser("plot", help="draw RUN_DIR/loss.png from RUN_DIR/metrics.jsonl",
                      description="Draw loss, eval loss and learning rate over steps from a run's "
                                  "metrics.jsonl into RUN_DIR/loss.png (needs matplotlib).")
  pl.add_argument("run_dir", metavar="RUN_DIR", help="a jqlora train output_dir")
  pl.set_defaults(fn=_cmd_plot)

  sub.add_parser("plan", add_help=False,
                 help="memory budget per device and whether it fits (jqlora plan --help)")
  return p


def _plan_parser() -> argparse.ArgumentParser:
  """``jqlora plan``'s flags; those a config sets default to None (unset)."""
  from jqlora.plan import PRESETS, budget
  from jqlora.training.config import TrainConfig

  d = TrainConfig(dataset="-")  # unset by flags and --config: what `jqlora train` would use
  ap = _OneLineErrors(
      prog="jqlora plan", description=budget.__doc__.splitlines()[0],
      epilog="With --config, the run is read from a training YAML (base_model, mesh.*, "
             "micro_batch_size, sequence_len, lora_r, lora_target_modules, "
             "gradient_checkpointing, dtype) and flags given here override it; other defaults "
             "are jqlora train's.")
  ap.add_argument("--config", metavar="TRAIN.yaml",
                  help="a jqlora train config to read the run from (default: none)")
  ap.add_argument("--model",
                  help=f"checkpoint folder, config.json, .gguf or preset ({', '.join(PRESETS)}) "
                       "(default: the config's base_model; required without --config)")
  ap.add_argument("--devices", type=int,
                  help="number of devices (default: the config's mesh size, else 1)")
  ap.add_argument("--memory-per-device", metavar="SIZE",
                  help="budget per device, e.g. 48GiB, 80GB, or 'auto': this machine's devices "
                       "(JQLORA_DEVICE_MEMORY, else the devices' memory_stats, else host memory "
                       "/ CPU devices) (default: none, no verdict)")
  ap.add_argument("--batch", type=int,
                  help=f"global batch in sequences (default: the config's micro_batch_size, "
                       f"else {d.micro_batch_size})")
  ap.add_argument("--seq", type=int,
                  help=f"tokens per sequence (default: the config's sequence_len, "
                       f"else {d.sequence_len})")
  ap.add_argument("--lora-r", type=int,
                  help=f"LoRA rank (default: the config's lora_r, else {d.lora_r})")
  ap.add_argument("--target-modules",
                  help="'all-linear' or comma-separated names such as q_proj,v_proj (default: "
                       f"the config's lora_target_modules, else {d.lora_target_modules})")
  ap.add_argument("--data", type=int,
                  help="mesh data axis (default: the config's mesh.data, else 1)")
  ap.add_argument("--fsdp", type=int,
                  help="mesh fsdp axis (default: the config's mesh.fsdp, else the devices left "
                       "over by data and tensor)")
  ap.add_argument("--tensor", type=int,
                  help="mesh tensor axis (default: the config's mesh.tensor, else 1)")
  ap.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=None,
                  help="recompute each layer in the backward pass, as gradient_checkpointing: "
                       "true (default: the config's gradient_checkpointing, else "
                       f"{'on' if d.gradient_checkpointing else 'off'}, as jqlora train)")
  ap.add_argument("--selective", dest="checkpointing", action="store_const", const="selective",
                  help="selective checkpointing, as gradient_checkpointing: selective (keep "
                       "the projections, recompute norms, RoPE, softmax and SwiGLU; default: "
                       "the config's gradient_checkpointing)")
  ap.add_argument("--dtype", choices=sorted(budget.DTYPE_BYTES),
                  help=f"compute dtype of activations and float weights (default: the config's "
                       f"dtype, else {d.dtype})")
  ap.add_argument("--optimizer-offload", action="store_true",
                  help="Adam moments on the host, QLoRA's paged optimizer (default: off)")
  ap.add_argument("--measure", action="store_true",
                  help="also compile the real train step on shapes alone (nothing allocated) and "
                       "print XLA's buffer assignment beside the plan (default: off)")
  ap.add_argument("--json", action="store_true", help="print the plan as JSON (default: a table)")
  return ap


def _plan_run(args: argparse.Namespace, ap: argparse.ArgumentParser) -> dict:
  """``plan``'s keyword arguments: flags over ``--config`` over ``jqlora train``'s defaults."""
  from jqlora.training.config import ConfigError, TrainConfig, load_config

  if args.config is not None:
    try:  # the dataset is not needed to plan: a placeholder, and no file checks
      c = load_config(args.config, {"dataset": "-"}, check_files=False)
    except ConfigError as e:
      ap.error(str(e))
  elif args.model is None:
    ap.error("the following arguments are required: --model (or --config TRAIN.yaml)")
  else:
    c = TrainConfig(dataset="-")
  if not c.load_in_4bit:
    print(f"jqlora plan: note: {args.config} sets load_in_4bit: false; this plan counts an NF4 "
          "base (QLoRA)", file=sys.stderr)
  # the config's mesh, each axis flag over it; --devices N (another size) replaces it by
  # plan's default, N-way fsdp. Without --devices, the axes say how many devices.
  mesh = dict(data=c.mesh.data, fsdp=c.mesh.fsdp, tensor=c.mesh.tensor)
  if args.config is None or (args.devices is not None and args.devices != c.mesh.size):
    mesh = dict(data=None, fsdp=None, tensor=1)
  axes = {k: getattr(args, k) for k in mesh if getattr(args, k) is not None}
  mesh.update(axes)
  devices = args.devices
  if devices is None:
    devices = (mesh["data"] or 1) * (mesh["fsdp"] or 1) * mesh["tensor"] if axes else c.mesh.size
  targets = c.lora_target_modules if args.target_modules is None else args.target_modules
  if isinstance(targets, str) and targets != "all-linear":
    targets = [t.strip() for t in targets.split(",") if t.strip()]
  pick = lambda flag, value: value if flag is None else flag
  memory, args.memory_source = args.memory_per_device, "--memory-per-device"
  if memory == "auto":
    from jqlora.plan.fit import device_memory

    try:
      memory, args.memory_source = device_memory()
    except ConfigError as e:
      ap.error(str(e))
  return dict(model=pick(args.model, c.base_model), devices=devices, **mesh,
              memory_per_device=memory, batch=pick(args.batch, c.micro_batch_size),
              seq=pick(args.seq, c.sequence_len), lora_r=pick(args.lora_r, c.lora_r),
              target_modules=targets, checkpointing=pick(args.checkpointing,
                                                         c.gradient_checkpointing),
              dtype=pick(args.dtype, c.dtype), optimizer_offload=args.optimizer_offload,
              lora_dropout=c.lora_dropout)


def _plan_main(argv: Sequence[str]) -> int:
  """``jqlora plan [--config TRAIN.yaml] --model M --devices N --memory-per-device 48GiB …``.

  Exits 0 when the run fits, 1 when not, 2 (one line on stderr, after the table)
  when the checkpoint alone is too large for the devices.
  """
  from jqlora.plan import format_measured, format_plan, measure_plan, plan
  from jqlora.plan.fit import too_large

  ap = _plan_parser()
  args = ap.parse_args(argv)
  run = _plan_run(args, ap)
  key = f"{args.config}: base_model " if args.config and args.model is None else ""
  try:
    p = plan(**run)
  except (ValueError, FileNotFoundError) as e:  # name the YAML key the model came from
    ap.error(f"{key}{e}" if key and str(run["model"]) in str(e) else str(e))
  except KeyError as e:  # a config.json without a required key
    ap.error(f"{key}{run['model']}: missing key {e.args[0]}")
  measured = None
  if args.measure:
    try:
      measured = measure_plan(p, run["model"])
    except ValueError as e:
      ap.error(str(e))
  if args.json:
    extra = {} if measured is None else {"xla": measured}
    print(json.dumps({**dataclasses.asdict(p), "total": p.total, "fits": p.fits, **extra}))
  else:
    source = f"{args.config}, then command-line flags" if args.config else "command-line flags"
    print(format_plan(p, f"assumptions (from {source}; the rest as jqlora train's defaults):"))
    if measured is not None:
      print(format_measured(measured))
  if p.memory_per_device is not None:
    message = too_large(p, p.memory_per_device, args.memory_source)
    if message is not None:
      print(f"jqlora plan: error: {message}", file=sys.stderr)
      return 2
  return 0 if p.fits else 1


class _OneLineErrors(argparse.ArgumentParser):
  """An argument parser whose errors are one ``prog: error: …`` line on stderr, exit code 2."""

  def error(self, message: str):
    print(f"{self.prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class _StderrHandler(logging.StreamHandler):
  """Writes each record to whatever ``sys.stderr`` is at the time (a caller may redirect it)."""

  @property
  def stream(self):
    return sys.stderr

  @stream.setter
  def stream(self, value) -> None:
    del value


def _show_warnings() -> None:
  """jqlora's warnings (e.g. tensors a mesh leaves unsplit) as one plain line each on stderr.

  The command line owns the process, so it configures the ``jqlora`` logger; libraries
  that configure the root logger on import (absl, via orbax) then add no second copy.
  """
  logger = logging.getLogger("jqlora")
  if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("jqlora: %(message)s"))
    handler.setLevel(logging.WARNING)
    logger.addHandler(handler)
    logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the ``jqlora`` command; user errors print one line and exit 2.

  ``jqlora plan …`` exits 0 when the run fits, 1 when not.
  """
  from jqlora.io.allocator import return_freed_memory_while_loading
  from jqlora.training.config import ConfigError
  from jqlora.training.data import DataError

  _show_warnings()
  return_freed_memory_while_loading()  # the command owns its process (jqlora.io.allocator)
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ["plan"]:
    return _plan_main(argv[1:])  # its parser's errors: one line, SystemExit(2), as argparse
  args = _parser().parse_args(argv)
  try:
    return args.fn(args)
  except (ConfigError, DataError, FileNotFoundError) as e:
    print(f"jqlora {args.command}: error: {e}", file=sys.stderr)
    return 2
  except RuntimeError as e:
    from jqlora.training.loop import TrainingError, TrainingInterrupted

    if isinstance(e, TrainingInterrupted):  # SIGINT / SIGTERM: 130 / 143, as a shell reports it
      print(f"jqlora {args.command}: {e}", file=sys.stderr)
      return e.exit_code
    if not isinstance(e, TrainingError):
      raise
    print(f"jqlora {args.command}: error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())

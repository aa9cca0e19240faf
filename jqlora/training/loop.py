"""``jqlora train``: load, adapt, train with checkpoints and resume, evaluate, save the adapter.

Scale-out follows the config: ``distributed.*`` (or the environment) starts
``jax.distributed`` for multi-process runs, and a ``mesh.*`` other than
1 x 1 x 1 shards the model, optimizer state and batches over a
``(data, fsdp, tensor)`` mesh of all devices (``jqlora.parallel``); the step is
the same ``train_step``. Every process builds the same global batches and
keeps its own rows; only process 0 prints, writes metrics and the adapter.
Held-out exact match decodes on the same mesh: every process generates the
answers to all held-out prompts together (``jqlora.generate``).

SIGINT (Ctrl-C) and SIGTERM: for the duration of ``train`` (installed from the main
thread only, the previous handlers put back after) the first signal lets the
current step finish, saves a checkpoint at it and raises
``TrainingInterrupted`` (``jqlora train`` prints "stopped at step N of M;
checkpoint saved; run the same command to resume" and exits 130 / 143). Outside
the steps (loading, the evaluations, writing the adapter) it stops at once: the
checkpoints already hold everything. The first signal also gives both signals
back their default action, so a second one ends the process immediately, even
during a save; that cannot tear the last checkpoint, because orbax writes a step
into a temporary folder and renames it when complete, and the adapter is written
the same way. A signal is seen between Python operations, so one that arrives
during a compiled step (or its compilation) acts when the step returns.

``output_dir/metrics.jsonl`` holds one history: a resumed run first cuts it back
to the restored step (rows a stopped or killed run logged after its last
checkpoint would otherwise appear twice), and its last row, written when the
adapter is saved, has ``adapter_dir``. Running a complete run again (its final
checkpoint and that row present) prints that it is complete and changes nothing.
Each checkpoint records the settings that shape the run (``fingerprint``); a
resume whose settings differ stops with a ``ConfigError`` naming them, unless
``resume_changed_settings: true``. A non-finite update is skipped (``make_tx``)
and counted in each metrics row's ``skipped_steps``; ``max_nonfinite_steps`` of
them in a row stop the run.

``method: dpo`` trains the adapters on preference pairs (``jqlora.training.preference``)
with ``dpo_step``, whose reference model is the same base with the adapters off;
its metrics rows add TRL's ``rewards/*``, and the held-out check is preference
accuracy before and after (``evaluate_preferences``) instead of exact match.

``finetune: full`` (a float base only) adds no adapters: every float weight
(embeddings, norms, linears, head) trains and is checkpointed, and the run
writes the whole model, float32 in transformers format, to ``output_dir/model``
(its final metrics row has ``model_dir`` instead of ``adapter_dir``).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import math
import os
import signal
import sys
import tempfile
import time
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from jqlora import parallel
from jqlora.generate import stop_token_ids
from jqlora.io import load_model, load_tokenizer, save_adapter, save_merged
from jqlora.nn import Frozen, LoraConfig, NF4Weight, apply_lora, merge_lora, trainable_params
from jqlora.parallel import distributed
from jqlora.training.checkpoint import Checkpointer, is_local
from jqlora.training.config import ConfigError, TrainConfig, blame
from jqlora.training.data import BatchIterator, Dataset, load_dataset
from jqlora.training.dpo import dpo_step, evaluate_preferences
from jqlora.training.evaluate import eval_loss, exact_match
from jqlora.training.fingerprint import changed_settings, settings
from jqlora.training.interrupt import Signalled, StopSignals
from jqlora.training.metrics_writers import MetricsLog, TensorBoardWriter
from jqlora.training.optim import make_optimizer, make_schedule, make_tx, nonfinite_counts
from jqlora.training.plot import plot_run
from jqlora.training.preference import PairBatches, PreferenceSet, load_preferences
from jqlora.training.step import train_step

__all__ = ["TrainingError", "TrainingInterrupted", "train"]

_log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
  """Training cannot go on (``max_nonfinite_steps`` non-finite updates in a row); the last good
  checkpoint is kept."""


class TrainingInterrupted(TrainingError):
  """SIGINT or SIGTERM stopped ``train``; the message says where and how to resume.

  Attributes:
    signum: the signal.
    step: the step the run stopped at (its checkpoint is saved when ``step`` > 0).
    exit_code: ``128 + signum``, as a shell reports a process the signal ended
      (130 for SIGINT, 143 for SIGTERM).
  """

  def __init__(self, message: str, *, signum: int, step: int):
    super().__init__(message)
    self.signum, self.step, self.exit_code = signum, step, 128 + signum


@dataclasses.dataclass
class _Progress:
  """Where a run is, for the message of an interruption."""

  step: int = 0
  total: int | None = None
  saved: int | None = None  # the step of the newest checkpoint

  def stopped(self) -> str:
    of = f" of {self.total}" if self.total is not None else ""
    if self.saved:
      return f"stopped at step {self.step}{of}; checkpoint saved; run the same command to resume"
    return f"stopped at step {self.step}{of}, before the first checkpoint; run the same command to start"


@dataclasses.dataclass
class _Run:
  """What ``train`` builds before the first step: the data (``_prepare``), then the model (``_build``)."""

  config: TrainConfig
  tokenizer: Any
  train_set: Dataset | PreferenceSet
  eval_set: Dataset | PreferenceSet | None
  batches: BatchIterator | PairBatches
  total_steps: int
  pad_id: int
  mesh: jax.sharding.Mesh | None
  settings: dict[str, Any]  # what the checkpoints record (``fingerprint.settings``)
  model: nnx.Module | None = None
  optimizer: nnx.Optimizer | None = None
  schedule: Any = None


def _datasets(config: TrainConfig, tokenizer: Any) -> tuple[Any, Any]:
  """``(train, held-out or None)``: ``Dataset``s, or ``PreferenceSet``s for ``method: dpo``."""
  if config.method == "dpo":
    load = functools.partial(load_preferences, tokenizer=tokenizer, sequence_len=config.sequence_len)
  else:
    load = functools.partial(load_dataset, tokenizer=tokenizer, fmt=config.dataset_type,
                             sequence_len=config.sequence_len, train_on_inputs=config.train_on_inputs)
  train_set = load(config.dataset)
  if config.eval_dataset:
    return train_set, load(config.eval_dataset)
  if config.val_set_size > 0:
    size = config.val_set_size
    n = int(size) if size >= 1 else max(1, round(size * len(train_set.records)))
    return train_set.split(n, config.seed)
  return train_set, None


def _mesh(config: TrainConfig) -> jax.sharding.Mesh | None:
  """The run's mesh; None for the default 1 x 1 x 1 in one process (unsharded, one device).

  Raises:
    ConfigError: the mesh does not multiply to the device count, or the micro
      batch size is not divisible by ``mesh.data * mesh.fsdp`` (held-out batches
      are padded to a multiple of it instead).
  """
  m = config.mesh
  if m.size == 1 and jax.process_count() == 1:
    return None
  try:
    mesh = parallel.make_mesh(m.data, m.fsdp, m.tensor)
  except ValueError as e:
    raise ConfigError(f"{e} (of {jax.process_count()} process(es))") from None
  rows = m.data * m.fsdp
  if config.micro_batch_size % rows:
    raise ConfigError(f"micro_batch_size = {config.micro_batch_size} must be divisible by "
                      f"mesh.data * mesh.fsdp = {m.data} * {m.fsdp} = {rows}, the number of batch "
                      "shards")
  return mesh


def _shard(model_or_optimizer: Any, mesh: jax.sharding.Mesh | None) -> None:
  if mesh is None:
    return
  parallel.shard_model(model_or_optimizer, mesh)  # indivisible dimensions stay unsplit (a warning)


def _prepare(config: TrainConfig, mesh: jax.sharding.Mesh | None = None) -> _Run:
  """The tokenizer, datasets, batches and step count: all a complete run needs to know."""
  with blame("base_model"):
    tokenizer = load_tokenizer(config.base_model)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  train_set, eval_set = _datasets(config, tokenizer)
  shape = dict(micro_batch_size=config.micro_batch_size, accumulation=config.gradient_accumulation_steps,
               sequence_len=config.sequence_len, seed=config.seed, pad_id=pad_id)
  batches = (PairBatches(train_set.pairs, **shape) if config.method == "dpo" else
             BatchIterator(train_set.examples, packing=config.sample_packing, **shape))
  total = config.max_steps or max(1, math.ceil(config.num_epochs * batches.steps_per_epoch()))
  _check_end_of_turn(tokenizer, train_set, pad_id, config.sequence_len)
  return _Run(config, tokenizer, train_set, eval_set, batches, total, pad_id, mesh,
              settings(config))


def _check_end_of_turn(tokenizer: Any, train_set: Dataset, pad_id: int, sequence_len: int) -> None:
  """Warns when pad == EOS (said, and shown harmless here) or when examples train no stop token.

  Padding is masked by position, never by id, so an EOS that is also the pad
  token stays a target; examples whose labels hold no stop token (EOS or an
  end of turn, ``stop_token_ids``) teach the model never to stop.
  """
  stops = np.asarray(stop_token_ids(tokenizer), np.int32)
  whole = [e for e in train_set.examples if len(e) < sequence_len] \
      if train_set.n_truncated else train_set.examples  # a cut example has lost its end
  trained = sum(bool(np.isin(e.labels, stops).any()) for e in whole)
  if pad_id == tokenizer.eos_token_id:
    _log.warning(f"the tokenizer's pad token is its EOS token {tokenizer.eos_token!r} (id {pad_id}); "
                 f"jqlora masks padding by position, so the end of turn stays a target ({trained} of "
                 f"{len(whole)} examples train it)")
  if trained < len(whole):
    _log.warning(f"{train_set.path}: {len(whole) - trained} of {len(whole)} examples train no "
                 f"stop token (ids {stops.tolist()}): the model may not learn to stop")


def _build(run: _Run) -> None:
  """Loads the model, adds the adapters (or, with ``finetune: full``, none: every float weight
  trains) and makes the optimizer (sharded over ``run.mesh``)."""
  config = run.config
  model = load_model(config.base_model, quantize=config.load_in_4bit,
                     quant_type=config.bnb_4bit_quant_type, dtype=jnp.dtype(config.dtype),
                     mesh=run.mesh)  # straight into shards
  full = config.finetune == "full"
  if full and nnx.state(model, NF4Weight):  # e.g. a bnb-4bit folder, NF4 whatever load_in_4bit says
    raise ConfigError(f"finetune: full needs a float base: base_model {config.base_model} holds "
                      "NF4 weights; use a float checkpoint (and load_in_4bit: false)")
  if not full:
    lora = LoraConfig(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                      target_modules=config.lora_target_modules, use_rslora=config.use_rslora,
                      use_dora=config.use_dora)
    apply_lora(model, lora, rngs=nnx.Rngs(config.seed))
  model.rngs = nnx.Rngs(dropout=config.seed)  # the stacked layers' dropout keys
  model.remat = config.gradient_checkpointing
  model.loss_chunk_size = config.loss_chunk_size
  _shard(model, run.mesh)
  schedule = make_schedule(config.lr_scheduler, config.learning_rate, run.total_steps,
                           config.warmup_steps)
  tx = make_tx(schedule, weight_decay=config.weight_decay, b1=config.adam_beta1,
               b2=config.adam_beta2, eps=config.adam_epsilon, max_grad_norm=config.max_grad_norm,
               max_nonfinite_steps=config.max_nonfinite_steps)
  optimizer = make_optimizer(model, tx, wrt=Frozen) if full else make_optimizer(model, tx)
  _shard(optimizer, run.mesh)
  run.model, run.optimizer, run.schedule = model, optimizer, schedule


def _read_rows(path: epath.Path) -> list[dict[str, Any]]:
  """The rows of ``metrics.jsonl``; a line torn by a killed process is dropped."""
  rows = []
  for line in path.read_text().splitlines() if path.is_file() else []:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(row, dict):
      rows.append(row)
  return rows


#: What a run writes at its end, by ``finetune``: the metrics key, the folder and its files.
_RESULTS = {"lora": ("adapter_dir", "adapter", ("adapter_config.json", "adapter_model.safetensors")),
            "full": ("model_dir", "model", ("config.json", "model.safetensors"))}


def _is_final(row: dict[str, Any], step: int) -> bool:
  """The last row of a run that ended at ``step`` (written with its adapter or model)."""
  return ("adapter_dir" in row or "model_dir" in row) and row.get("step") == step


def _adapter_saved(adapter_dir: epath.Path, finetune: str = "lora") -> bool:
  return all((adapter_dir / name).is_file() for name in _RESULTS[finetune][2])


def _complete(rows: list[dict[str, Any]], step: int, adapter_dir: epath.Path,
              finetune: str = "lora") -> bool:
  """Whether the run at checkpoint ``step`` has been finished: final row and adapter written."""
  done = any(_is_final(r, step) for r in rows) and _adapter_saved(adapter_dir, finetune)
  if jax.process_count() > 1:  # the lead's view decides, so that every process does the same
    done = bool(multihost_utils.broadcast_one_to_all(np.int32(done)))
  return done


def _summary_of(rows: list[dict[str, Any]], step: int, adapter_dir: epath.Path,
                finetune: str = "lora") -> dict[str, Any]:
  """The summary ``train`` returned when it completed the run, from its metrics rows."""
  summary: dict[str, Any] = {"step": step}
  losses = [r["loss"] for r in rows if "loss" in r and r.get("step", 0) <= step]
  if losses:
    summary["loss"] = losses[-1]
  before = [r["exact_match"] for r in rows if r.get("step") == 0 and "exact_match" in r]
  if before:
    summary["accuracy_before"] = before[-1]
  before = [r for r in rows if r.get("step") == 0 and _PREFERENCE in r]
  if before:
    summary["preference_before"] = {k: v for k, v in before[-1].items() if k.startswith("eval_")}
  final = [r for r in rows if _is_final(r, step)][-1]
  summary.update({k: v for k, v in final.items() if k.startswith("eval_")})
  summary[_RESULTS[finetune][0]] = str(adapter_dir)
  if "exact_match" in final:
    summary["accuracy_after"] = final["exact_match"]
  return summary


def _recorded(summary: dict[str, Any]) -> str:
  """One line of what a complete run measured (from ``metrics.jsonl``)."""
  parts = [f"{label} {summary[key]:{fmt}}" for key, label, fmt in (
      ("loss", "last loss", ".4f"), ("eval_loss", "held-out loss", ".4f"),
      ("accuracy_before", "exact match before", ".1%"),
      ("accuracy_after", "after", ".1%")) if key in summary]
  if _PREFERENCE in summary:
    before = summary.get("preference_before", {}).get(_PREFERENCE)
    parts.append("preference accuracy " + (f"before {before:.1%}, after " if before is not None else "")
                 + f"{summary[_PREFERENCE]:.1%}")
  return "  recorded: " + (", ".join(parts) if parts else "no metrics")


def _cut_metrics(path: epath.Path, step: int, redo_final: bool) -> None:
  """Keeps the rows up to ``step``, the restored one, and drops its final row when ``redo_final``.

  At the last step the only row without ``loss`` is the final one (evaluations
  during training stop before it), written with or without ``adapter_dir``.
  """
  rows = [r for r in _read_rows(path) if r.get("step", 0) <= step
          and not (redo_final and r.get("step") == step and "loss" not in r)]
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
  tmp.replace(path)  # whole: a kill leaves the old file or the new one


def _save_adapter(model: nnx.Module, adapter_dir: epath.Path, base_model: str,
                  tokenizer: Any | None = None) -> None:
  """``save_adapter`` into a temporary folder renamed when complete: never a torn adapter.

  With a ``tokenizer`` (``finetune: full``) the whole model is written instead
  (``save_merged``: a float32 transformers folder with the tokenizer). A bucket
  ``adapter_dir`` (``gs://…``) gets the files written in a local folder first.
  """
  tmp = adapter_dir.with_name(adapter_dir.name + ".tmp")
  if tmp.exists():
    tmp.rmtree()
  with tempfile.TemporaryDirectory() as staging:
    folder = tmp if is_local(tmp) else epath.Path(staging)
    if tokenizer is not None:
      save_merged(model, folder, tokenizer)
    else:
      save_adapter(model, folder, base_model_name_or_path=base_model)
    if folder != tmp:
      tmp.mkdir(parents=True)
      for f in folder.iterdir():
        (tmp / f.name).write_bytes(f.read_bytes())
  if adapter_dir.exists():
    adapter_dir.rmtree()
  tmp.rename(adapter_dir)


def _banner(run: _Run, out: TextIO) -> None:

  c = run.config
  trainable, total, percent = trainable_params(run.model, verbose=False)
  if c.finetune == "full":  # what trains is the optimizer's, not the adapters
    trainable = sum(x.size for x in jax.tree.leaves(nnx.state(run.model, run.optimizer.wrt)))
    percent = 100 * trainable / total
  held = f", {len(run.eval_set.records)} held out" if run.eval_set else ""
  how = ("full fine-tuning" if c.finetune == "full"
         else f"LoRA r={c.lora_r} alpha={c.lora_alpha:g} on {c.lora_target_modules}")
  dpo = c.method == "dpo"  # a pair takes two rows
  if dpo:
    how += f", DPO ({c.dpo_loss} loss, beta {c.beta:g})"
  base = c.bnb_4bit_quant_type.upper() if c.load_in_4bit else "full-precision"
  print(f"jqlora train: {c.base_model} ({base} base, {c.dtype} compute), {how}", file=out)
  print(f"  trainable parameters: {trainable:,} of {total:,} ({percent:.3f}%)",
        file=out)
  print(f"  data: {len(run.train_set.records)} training {'pairs' if dpo else 'examples'} "
        f"({run.train_set.fmt}){held}; tokens per step: {'2 x ' if dpo else ''}{c.micro_batch_size} x "
        f"{c.gradient_accumulation_steps} x {c.sequence_len} = {(1 + dpo) * c.tokens_per_step:,}"
        f"{' (packed)' if c.sample_packing else ''}", file=out)
  if run.mesh is not None:
    mesh = " x ".join(f"{k}={v}" for k, v in run.mesh.shape.items())
    print(f"  mesh: {mesh} over {run.mesh.size} devices of {jax.process_count()} process(es)",
          file=out)
  print(f"  steps: {run.total_steps}, lr {c.learning_rate:g} {c.lr_scheduler}, "
        f"warmup {c.warmup_steps}; output: {c.output_dir}", file=out)
  print("  note: the first step includes compilation and takes longer", file=out, flush=True)


def _accuracy(run: _Run, label: str, out: TextIO) -> float:

  c = run.config
  run.model.eval()
  t = time.perf_counter()
  # NF4 decoding dequantizes every weight per token; a merged float copy does it once
  model = merge_lora(run.model, copy=True) if c.eval_merged_copy else run.model
  acc, rows = exact_match(model, run.tokenizer, run.eval_set, batch_size=c.eval_batch_size,
                          max_new_tokens=c.eval_max_new_tokens)
  print(f"held-out exact match {label}: {acc:.1%} ({round(acc * len(rows))}/{len(rows)}, "
        f"{time.perf_counter() - t:.0f}s)", file=out)
  for prompt, ref, answer in rows[:c.eval_print_samples]:
    print(f"  prompt:    {prompt!r}\n  expected:  {ref!r}\n  generated: {answer!r}", file=out)
  print(file=out, flush=True)
  return acc


#: The held-out preference accuracy a DPO run reports before and after (the model's own
#: preference; TRL's ``eval_rewards/accuracies`` starts at 0 with policy == reference).
_PREFERENCE = "eval_logps/accuracies"


def _held_out(run: _Run) -> dict[str, float]:
  """Held-out metrics (row keys): ``eval_loss`` and ``eval_perplexity``, or for ``method: dpo``
  ``eval_loss`` (DPO), ``eval_rewards/*`` and ``eval_logps/accuracies``."""
  c = run.config
  run.model.eval()
  place = None if run.mesh is None else functools.partial(parallel.shard_batch, mesh=run.mesh)
  shards = 1 if run.mesh is None else run.mesh.shape["data"] * run.mesh.shape["fsdp"]
  kw = dict(batch_size=c.eval_batch_size, sequence_len=c.sequence_len, pad_id=run.pad_id, place=place,
            multiple_of=shards)
  if c.method == "dpo":
    metrics = evaluate_preferences(run.model, run.eval_set.pairs, beta=c.beta, loss_type=c.dpo_loss, **kw)
    return {f"eval_{k}": v for k, v in metrics.items()}
  loss, perplexity = eval_loss(run.model, run.eval_set.examples, **kw)
  return {"eval_loss": loss, "eval_perplexity": perplexity}


def _described(metrics: dict[str, float]) -> str:
  if _PREFERENCE in metrics:
    return (f"preference accuracy {metrics[_PREFERENCE]:.1%} (log p(chosen) > log p(rejected)), "
            f"reward accuracy {metrics['eval_rewards/accuracies']:.1%}, margin "
            f"{metrics['eval_rewards/margins']:.4f}, DPO loss {metrics['eval_loss']:.4f}")
  return f"loss {metrics['eval_loss']:.4f}, perplexity {metrics['eval_perplexity']:.2f}"


def _preference(run: _Run, label: str, out: TextIO) -> dict[str, float]:
  """Held-out preference accuracy (``_held_out``), printed like the exact-match check."""
  t = time.perf_counter()
  metrics = _held_out(run)
  n = len(run.eval_set.pairs)
  print(f"held-out preference accuracy {label}: {metrics[_PREFERENCE]:.1%} "
        f"({round(metrics[_PREFERENCE] * n)}/{n} pairs: log p(chosen) > log p(rejected)); reward "
        f"accuracy {metrics['eval_rewards/accuracies']:.1%}, margin {metrics['eval_rewards/margins']:.4f}, "
        f"DPO loss {metrics['eval_loss']:.4f} ({time.perf_counter() - t:.0f}s)", file=out)
  print(file=out, flush=True)
  return metrics


def train(config: TrainConfig, *, stop_at_step: int | None = None,
          out: TextIO | None = None) -> dict[str, Any]:
  """Runs (or resumes) a QLoRA fine-tune as ``config`` says.

  A run whose final checkpoint and adapter are already in ``output_dir`` is
  complete: this prints so, changes nothing and returns its summary again.

  Args:
    config: the run's settings.
    stop_at_step: end after this step with a checkpoint (a later call resumes);
      None runs to the end.
    out: where the banner, evaluations and notes go (default stdout; the progress
      bar uses stderr).

  Returns:
    A summary: ``step``, ``loss``, and when measured ``eval_loss``,
    ``eval_perplexity``, ``accuracy_before``, ``accuracy_after``, ``adapter_dir``.
    ``output_dir/metrics.jsonl`` gets the logged steps, ``exact_match`` at step 0,
    and a last row with ``adapter_dir`` and the final held-out loss and ``exact_match``.
    With ``method: dpo`` the held-out metrics are ``_held_out``'s ``eval_*`` keys (the
    summary's ``eval_logps/accuracies`` and ``eval_rewards/*``, ``preference_before``
    with those of step 0).

  Raises:
    TrainingInterrupted: SIGINT or SIGTERM (see the module docstring); a checkpoint
      at the step it stopped at is in ``output_dir``.
    TrainingError: ``max_nonfinite_steps`` non-finite updates in a row (each one is
      skipped, and counted in the metrics' ``skipped_steps``); the last good checkpoint
      stays in ``output_dir``.
    ConfigError: a mesh or ``distributed.*`` setting that cannot work here; an
      ``output_dir``, base model or LoRA targets that cannot be used; a checkpoint
      to resume that was trained with other settings (named) while
      ``resume_changed_settings`` is false. Nothing in ``output_dir`` is changed.
  """
  progress = _Progress()
  with StopSignals() as signals:
    try:
      return _train(config, stop_at_step, out, signals, progress)
    except Signalled as e:
      raise TrainingInterrupted(progress.stopped(), signum=e.signum, step=progress.step) from None


def _train(config: TrainConfig, stop_at_step: int | None, out: TextIO | None, signals: StopSignals,
           progress: _Progress) -> dict[str, Any]:
  distributed.initialize(config.distributed)
  lead = jax.process_index() == 0
  out = (out or sys.stdout) if lead else io.StringIO()
  mesh = _mesh(config)
  output = _output_dir(config.output_dir)
  adapter_dir = output / _RESULTS[config.finetune][1]
  metrics_path = output / "metrics.jsonl"
  ckpt = Checkpointer(output / "checkpoints", config.save_total_limit)
  try:
    latest = ckpt.latest_step() if config.resume_from_checkpoint else None
    if latest is not None:
      _check_settings(config, ckpt, latest)
    progress.step = progress.saved = latest or 0
    run = _prepare(config, mesh)
    progress.total = run.total_steps
    if latest is not None and latest >= run.total_steps:
      rows = _read_rows(metrics_path)
      if _complete(rows, latest, adapter_dir, config.finetune):
        summary = _summary_of(rows, latest, adapter_dir, config.finetune)
        print(f"{output}: the run is already complete (step {latest} of {run.total_steps}, adapter "
              f"in {adapter_dir}); nothing to do. To train again, use another output_dir or delete "
              "this one", file=out)
        print(_recorded(summary), file=out, flush=True)
        return summary
    with blame(f"base_model {config.base_model} with lora_target_modules "
               f"{config.lora_target_modules!r}"):  # a bad checkpoint, targets that match nothing
      _build(run)
    step = 0
    if latest is not None:
      meta = ckpt.restore(latest, run.model, run.optimizer)
      run.batches.restore(meta["data"])
      step = latest
      if lead:
        _cut_metrics(metrics_path, step, redo_final=step >= run.total_steps)
    _banner(run, out)
    if latest is not None:
      print(f"resumed from {ckpt.directory / str(latest)} (step {latest})", file=out, flush=True)
    with _metrics_log(config, metrics_path, append=step > 0, lead=lead) as metrics_log:
      summary = _steps(run, ckpt, step, stop_at_step, out, metrics_log, signals, progress)
    if lead:
      _plot(output, out)
    return summary
  finally:
    ckpt.close()


def _metrics_log(config: TrainConfig, metrics_path: epath.Path, *, append: bool,
                 lead: bool) -> MetricsLog:
  """``metrics.jsonl`` (appended to on resume) and, with ``logging: [.., tensorboard]``, an event file."""
  if not lead:
    return MetricsLog(io.StringIO())
  tensorboard = None
  if "tensorboard" in config.logging and not is_local(metrics_path):
    _log.warning("TensorBoard events skipped: they are written to a local output_dir only")
  elif "tensorboard" in config.logging:
    tensorboard = TensorBoardWriter(metrics_path.parent / "tensorboard")
  return MetricsLog(metrics_path.open("a" if append else "w"), tensorboard)


def _plot(output: epath.Path, out: TextIO) -> None:
  """``output/loss.png`` from ``metrics.jsonl``; without matplotlib, one warning line instead."""
  if not is_local(output):
    _log.warning(f"loss.png skipped: {output} is not a local folder (jqlora plot draws it from "
                 "a copy of metrics.jsonl)")
    return
  try:
    path = plot_run(output)
  except ImportError:
    _log.warning("loss.png skipped: matplotlib is not installed (pip install matplotlib)")
  except ConfigError as e:
    _log.warning(f"loss.png skipped: {e}")
  else:
    print(f"loss curve saved to {path}", file=out, flush=True)


def _output_dir(path: str) -> epath.Path:
  """``path`` (a local path, or a URL orbax accepts such as ``gs://bucket/run``) as a folder,
  created if missing; ConfigError naming ``output_dir`` if a local one cannot be."""
  output = epath.Path(path)
  if not is_local(output):
    output.mkdir(parents=True, exist_ok=True)
    return output
  for p in (output, *output.parents):
    if p.exists() and not p.is_dir():
      raise ConfigError(f"output_dir {output}: {p} is a file; expected a folder (or a path to create)")
  try:
    output.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"output_dir {output}: cannot create it ({e.strerror or e})") from None
  if not os.access(output, os.W_OK | os.X_OK):
    raise ConfigError(f"output_dir {output}: not writable")
  return output


def _check_settings(config: TrainConfig, ckpt: Checkpointer, step: int) -> None:
  """Raises ConfigError when checkpoint ``step`` was trained with other settings (unless allowed)."""
  recorded = ckpt.meta(step).get("settings")
  if recorded is None or config.resume_changed_settings:  # a checkpoint from before fingerprints
    return
  changed = changed_settings(recorded, config)
  if changed:
    raise ConfigError(
        f"{config.output_dir}: the checkpoint at step {step} was trained with other settings: "
        f"{', '.join(changed)}; use another output_dir, put the settings back, or set "
        "resume_changed_settings: true to resume anyway")


def _steps(run: _Run, ckpt: Checkpointer, step: int, stop_at_step: int | None, out: TextIO,
           metrics_log: MetricsLog, signals: StopSignals, progress: _Progress) -> dict[str, Any]:
  """The steps from ``step`` on, then the final evaluation and the adapter."""
  from tqdm.auto import tqdm

  config = run.config
  lead = jax.process_index() == 0
  summary: dict[str, Any] = {"step": step}
  exact = run.eval_set is not None and config.eval_exact_match
  if exact and step == 0:
    summary["accuracy_before"] = _accuracy(run, "before training", out)
    metrics_log.write({"step": 0, "exact_match": summary["accuracy_before"]})
  dpo = run.eval_set is not None and config.method == "dpo"
  if dpo and step == 0:
    summary["preference_before"] = _preference(run, "before training", out)
    metrics_log.write({"step": 0, **summary["preference_before"]})
  step_fn = (functools.partial(dpo_step, beta=config.beta, loss_type=config.dpo_loss)
             if config.method == "dpo" else train_step)
  end = min(run.total_steps, stop_at_step or run.total_steps)
  bar = tqdm(total=run.total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
             disable=not lead)
  last_saved = progress.saved or None
  signals.deferring = True  # a first signal now stops after the step, with a checkpoint
  try:
    while step < end:
      run.model.train()
      batch = next(run.batches)
      t = time.perf_counter()
      placed = batch if run.mesh is None else parallel.shard_batch(batch, run.mesh)
      metrics = step_fn(run.model, run.optimizer, placed)
      loss = float(metrics["loss"])
      seconds = time.perf_counter() - t
      in_a_row, skipped = nonfinite_counts(run.optimizer)
      if in_a_row >= config.max_nonfinite_steps:  # optax would apply the next one
        kept = (f"the last good checkpoint (step {last_saved}) is kept in {ckpt.directory}"
                if last_saved is not None else "no checkpoint was saved yet")
        raise TrainingError(
            f"the loss is {loss} at step {step + 1}: {in_a_row} non-finite updates in a row, "
            f"skipped (max_nonfinite_steps = {config.max_nonfinite_steps}): stopping ({kept}). Lower "
            "learning_rate, set max_grad_norm, or use dtype: float32")
      step += 1
      lr = float(run.schedule(step - 1 - skipped))  # a skipped update leaves the schedule's count
      tokens_per_s = int((batch["segment_ids"] > 0).sum()) / seconds
      bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                      refresh=False)
      bar.update(1)
      row = {"step": step, "loss": loss, "learning_rate": lr,
             "grad_norm": float(metrics["grad_norm"]), "tokens_per_second": tokens_per_s,
             "skipped_steps": skipped}
      row.update({k: float(v) for k, v in metrics.items() if k.startswith("rewards/")})
      if step % config.logging_steps == 0 or step == end:
        metrics_log.write(row)
      summary.update(step=step, loss=loss)
      stop = signals.requested()
      if (config.eval_steps and step % config.eval_steps == 0 and run.eval_set
          and step < run.total_steps and not stop):
        held = _held_out(run)
        bar.write(f"step {step}: eval {_described(held)}")
        metrics_log.write({"step": step, **held})
      if (config.save_steps and step % config.save_steps == 0) or step == end or stop:
        if stop:
          print(f"{signal.Signals(stop).name} received: saving a checkpoint at step {step} "
                "(a second signal ends the process at once)", file=out, flush=True)
        ckpt.save(step, run.model, run.optimizer, {"data": run.batches.state(),
                                                   "settings": run.settings})
        last_saved = progress.saved = step
      progress.step = step
      if stop:
        raise TrainingInterrupted(progress.stopped(), signum=stop, step=step)
  finally:
    signals.deferring = False  # from here a first signal stops at once: the checkpoint is saved
    bar.close()
  if step < run.total_steps:
    print(f"stopped at step {step} of {run.total_steps}; run again to resume", file=out)
    return summary
  final: dict[str, Any] = {"step": step}  # the last metrics row: held-out loss and exact match
  if run.eval_set is not None:
    held = _preference(run, "after training", out) if dpo else _held_out(run)
    if not dpo:
      print(f"held-out {_described(held)}", file=out)
    summary.update(held)
    final.update(held)
  key, folder, _ = _RESULTS[config.finetune]
  adapter_dir = epath.Path(config.output_dir) / folder
  if run.mesh is not None:  # every process takes part; then any process can read the adapters
    nnx.update(run.model, parallel.replicate(nnx.state(run.model, run.optimizer.wrt), run.mesh))
  full = config.finetune == "full"
  if lead:
    _save_adapter(run.model, adapter_dir, config.base_model, run.tokenizer if full else None)
  what = "model (transformers format, float32)" if full else "adapter (PEFT format)"
  print(f"{what} saved to {adapter_dir}", file=out, flush=True)
  summary[key] = str(adapter_dir)
  if exact:
    summary["accuracy_after"] = final["exact_match"] = _accuracy(run, "after training", out)
  final[key] = str(adapter_dir)  # marks the run complete (with the final checkpoint)
  metrics_log.write(final)
  return summary

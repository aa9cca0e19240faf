"""``jqlora train``: load, adapt, train with checkpoints and resume, evaluate, save the adapter.

Scale-out follows the config: ``distributed.*`` (or the environment) starts
``jax.distributed`` for multi-process runs, and a ``mesh.*`` other than
1 x 1 x 1 shards the model, optimizer state and batches over a
``(data, fsdp, tensor)`` mesh of all devices (``jqlora.parallel``); the step is
the same ``train_step``. Every process builds the same global batches and
keeps its own rows; only process 0 prints, writes metrics and the adapter.
Held-out exact match decodes on the same mesh: every process generates the
answers to all held-out prompts together (``jqlora.generate``).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import pathlib
import sys
import time
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jqlora import parallel
from jqlora.io import load_model, load_tokenizer, save_adapter
from jqlora.nn import LoraConfig, apply_lora, merge_lora, trainable_params
from jqlora.parallel import distributed
from jqlora.training.checkpoint import Checkpointer
from jqlora.training.config import ConfigError, TrainConfig
from jqlora.training.data import BatchIterator, Dataset, load_dataset
from jqlora.training.evaluate import eval_loss, exact_match
from jqlora.training.optim import make_optimizer, make_schedule, make_tx
from jqlora.training.step import train_step

__all__ = ["TrainingError", "train"]


class TrainingError(RuntimeError):
  """Training cannot go on (a non-finite loss); the last good checkpoint is kept."""


@dataclasses.dataclass
class _Run:
  """What ``train`` builds before the first step."""

  config: TrainConfig
  model: nnx.Module
  tokenizer: Any
  train_set: Dataset
  eval_set: Dataset | None
  batches: BatchIterator
  optimizer: nnx.Optimizer
  schedule: Any
  total_steps: int
  pad_id: int
  mesh: jax.parallel.Mesh | None


def _datasets(config: TrainConfig, tokenizer: Any) -> tuple[Dataset, Dataset | None]:
  kw = dict(fmt=config.dataset_type, sequence_len=config.sequence_len,
            train_on_inputs=config.train_on_inputs)
  train_set = load_dataset(config.dataset, tokenizer, **kw)
  if config.eval_dataset:
    return train_set, load_dataset(config.eval_dataset, tokenizer, **kw)
  if config.val_set_size > 0:
    size = config.val_set_size
    n = int(size) if size >= 1 else max(1, round(size * len(train_set.records)))
    return train_set.split(n, config.seed)
  return train_set, None


def _mesh(config: TrainConfig) -> jax.parallel.Mesh | None:
  """The run's mesh; None for the default 1 x 1 x 1 in one process (unsharded, one device).

  Raises:
    ConfigError: the mesh does not multiply to the device count, or a batch
      size is not divisible by ``mesh.data * mesh.fsdp``.
  """
  m = config.mesh
  if m.size == 1 and jax.process_count() == 1:
    return None
  try:
    mesh = parallel.make_mesh(m.data, m.fsdp, m.tensor)
  except ValueError as e:
    raise ConfigError(f"{e} (of {jax.process_count()} process(es))") from None
  rows = m.data * m.fsdp
  for key in ("micro_batch_size", "eval_batch_size"):
    if getattr(config, key) % rows:
      raise ConfigError(f"{key} = {getattr(config, key)} must be divisible by mesh.data * "
                        f"mesh.fsdp = {m.data} * {m.fsdp} = {rows}, the number of batch shards")
  return mesh


def _shard(model_or_optimizer: Any, mesh: jax.parallel.Mesh | None) -> None:
  if mesh is None:
    return
  try:
    parallel.partition_specs(model_or_optimizer, mesh)
  except ValueError as e:  # a dimension not divisible by its mesh axis
    raise ConfigError(str(e)) from None
  parallel.shard_model(model_or_optimizer, mesh)


def _setup(config: TrainConfig, mesh: jax.parallel.Mesh | None = None) -> _Run:

  tokenizer = load_tokenizer(config.base_model)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  train_set, eval_set = _datasets(config, tokenizer)
  model = load_model(config.base_model, quantize=config.load_in_4bit,
                            dtype=jnp.dtype(config.dtype))
  lora = LoraConfig(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                           target_modules=config.lora_target_modules, use_rslora=config.use_rslora,
                           use_dora=config.use_dora)
  apply_lora(model, lora, rngs=nnx.Rngs(config.seed))
  model.remat = config.gradient_checkpointing
  model.loss_chunk_size = config.loss_chunk_size
  _shard(model, mesh)
  batches = BatchIterator(train_set.examples, micro_batch_size=config.micro_batch_size,
                          accumulation=config.gradient_accumulation_steps,
                          sequence_len=config.sequence_len, packing=config.sample_packing,
                          seed=config.seed, pad_id=pad_id)
  total = config.max_steps or max(1, math.ceil(config.num_epochs * batches.steps_per_epoch()))
  schedule = make_schedule(config.lr_scheduler, config.learning_rate, total, config.warmup_steps)
  tx = make_tx(schedule, weight_decay=config.weight_decay, b1=config.adam_beta1,
               b2=config.adam_beta2, eps=config.adam_epsilon, max_grad_norm=config.max_grad_norm)
  optimizer = make_optimizer(model, tx)
  _shard(optimizer, mesh)
  return _Run(config, model, tokenizer, train_set, eval_set, batches, optimizer, schedule, total,
              pad_id, mesh)


def _banner(run: _Run, out: TextIO) -> None:

  c = run.config
  trainable, total, percent = trainable_params(run.model, verbose=False)
  held = f", {len(run.eval_set.records)} held out" if run.eval_set else ""
  print(f"jqlora train: {c.base_model} ({'NF4' if c.load_in_4bit else 'full-precision'} base, "
        f"{c.dtype} compute), LoRA r={c.lora_r} alpha={c.lora_alpha:g} on {c.lora_target_modules}",
        file=out)
  print(f"  trainable parameters: {trainable:,} of {total:,} ({percent:.3f}%)",
        file=out)
  print(f"  data: {len(run.train_set.records)} training examples ({run.train_set.fmt}){held}; "
        f"tokens per step: {c.micro_batch_size} x {c.gradient_accumulation_steps} x "
        f"{c.sequence_len} = {c.tokens_per_step:,}{' (packed)' if c.sample_packing else ''}",
        file=out)
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


def _eval_loss(run: _Run) -> tuple[float, float]:
  run.model.eval()
  place = None if run.mesh is None else functools.partial(parallel.shard_batch, mesh=run.mesh)
  return eval_loss(run.model, run.eval_set.examples, batch_size=run.config.eval_batch_size,
                   sequence_len=run.config.sequence_len, pad_id=run.pad_id, place=place)


def train(config: TrainConfig, *, stop_at_step: int | None = None,
          out: TextIO | None = None) -> dict[str, Any]:
  """Runs (or resumes) a QLoRA fine-tune as ``config`` says.

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
    and a last row with the final held-out loss and ``exact_match``.

  Raises:
    TrainingError: a non-finite loss; the last good checkpoint stays in ``output_dir``.
    ConfigError: a mesh or ``distributed.*`` setting that cannot work here.
  """
  from tqdm.auto import tqdm

  distributed.initialize(config.distributed)
  lead = jax.process_index() == 0
  out = (out or sys.stdout) if lead else io.StringIO()
  run = _setup(config, _mesh(config))
  output = pathlib.Path(config.output_dir)
  output.mkdir(parents=True, exist_ok=True)
  ckpt = Checkpointer(output / "checkpoints", config.save_total_limit)
  step = 0
  latest = ckpt.latest_step() if config.resume_from_checkpoint else None
  if latest is not None:
    meta = ckpt.restore(latest, run.model, run.optimizer)
    run.batches.restore(meta["data"])
    step = latest
  _banner(run, out)
  if latest is not None:
    print(f"resumed from {ckpt.directory / str(latest)} (step {latest})", file=out, flush=True)
  summary: dict[str, Any] = {"step": step}
  metrics_file = (output / "metrics.jsonl").open("a" if step else "w") if lead else io.StringIO()
  exact = run.eval_set is not None and config.eval_exact_match
  if exact and step == 0:
    summary["accuracy_before"] = _accuracy(run, "before training", out)
    metrics_file.write(json.dumps({"step": 0, "exact_match": summary["accuracy_before"]}) + "\n")
    metrics_file.flush()
  end = min(run.total_steps, stop_at_step or run.total_steps)
  bar = tqdm(total=run.total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
             disable=not lead)
  last_saved = latest
  try:
    while step < end:
      run.model.train()
      batch = next(run.batches)
      t = time.perf_counter()
      placed = batch if run.mesh is None else parallel.shard_batch(batch, run.mesh)
      metrics = train_step(run.model, run.optimizer, placed)
      loss = float(metrics["loss"])
      seconds = time.perf_counter() - t
      if not np.isfinite(loss):
        kept = (f"the last good checkpoint (step {last_saved}) is kept in {ckpt.directory}"
                if last_saved is not None else "no checkpoint was saved yet")
        raise TrainingError(
            f"the loss is {loss} at step {step + 1}: stopping ({kept}). Lower learning_rate, "
            "set max_grad_norm, or use dtype: float32")
      step += 1
      lr = float(run.schedule(step - 1))
      tokens_per_s = int((batch["segment_ids"] > 0).sum()) / seconds
      bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                      refresh=False)
      bar.update(1)
      row = {"step": step, "loss": loss, "learning_rate": lr,
             "grad_norm": float(metrics["grad_norm"]), "tokens_per_second": tokens_per_s}
      if step % config.logging_steps == 0 or step == end:
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
      if config.eval_steps and step % config.eval_steps == 0 and run.eval_set and step < end:
        e_loss, ppl = _eval_loss(run)
        bar.write(f"step {step}: eval loss {e_loss:.4f}, perplexity {ppl:.2f}")
        metrics_file.write(json.dumps({"step": step, "eval_loss": e_loss,
                                       "eval_perplexity": ppl}) + "\n")
      if (config.save_steps and step % config.save_steps == 0) or step == end:
        ckpt.save(step, run.model, run.optimizer, {"data": run.batches.state()})
        last_saved = step
      summary.update(step=step, loss=loss)
  finally:
    bar.close()
    ckpt.close()
  if step < run.total_steps:
    print(f"stopped at step {step} of {run.total_steps}; run again to resume", file=out)
    metrics_file.close()
    return summary
  final: dict[str, Any] = {"step": step}  # the last metrics row: held-out loss and exact match
  if run.eval_set is not None:
    e_loss, ppl = _eval_loss(run)
    print(f"held-out loss {e_loss:.4f}, perplexity {ppl:.2f}", file=out)
    summary.update(eval_loss=e_loss, eval_perplexity=ppl)
    final.update(eval_loss=e_loss, eval_perplexity=ppl)
  adapter_dir = output / "adapter"
  if run.mesh is not None:  # every process takes part; then any process can read the adapters
    nnx.update(run.model, parallel.replicate(nnx.state(run.model, nnx.LoRAParam), run.mesh))
  if lead:
    save_adapter(run.model, adapter_dir)
  print(f"adapter (PEFT format) saved to {adapter_dir}", file=out, flush=True)
  summary["adapter_dir"] = str(adapter_dir)
  if exact:
    summary["accuracy_after"] = final["exact_match"] = _accuracy(run, "after training", out)
  if len(final) > 1:
    metrics_file.write(json.dumps(final) + "\n")
  metrics_file.close()
  return summary

"""The settings that shape a run, as a checkpoint records them, and what a resume changed.

A checkpoint stores ``settings(config)``: every ``TrainConfig`` key except those
that only say where to write, how often to save, log or evaluate, or how the
same step is computed (mesh, gradient checkpointing, loss chunks). The training
data is recorded by content (a SHA-256 of the file or folder), so an edited
dataset counts as changed and a moved one does not. New keys shape the run
unless listed in ``_NOT_SHAPING``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
from typing import Any

from jqlora.training.config import TrainConfig

__all__ = ["changed_settings", "settings"]

#: Keys that do not change the adapter a run trains.
_NOT_SHAPING = frozenset({
    "output_dir", "save_steps", "save_total_limit", "resume_from_checkpoint",
    "resume_changed_settings", "logging_steps", "logging", "max_nonfinite_steps", "gradient_checkpointing",
    "loss_chunk_size", "mesh", "distributed", "eval_dataset", "eval_steps", "eval_batch_size",
    "eval_exact_match", "eval_max_new_tokens", "eval_print_samples", "eval_merged_copy"})


def _digest(path: str) -> str:
  """``sha256:…`` of a file's bytes, or of a folder's relative file names and bytes."""
  root = pathlib.Path(path)
  h = hashlib.sha256()
  files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
  for file in files:
    if file is not root:
      h.update(str(file.relative_to(root)).encode() + b"\0")
    with file.open("rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
  return "sha256:" + h.hexdigest()


def settings(config: TrainConfig) -> dict[str, Any]:
  """The JSON settings of ``config`` that shape the run (``dataset`` as a content digest)."""
  out = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
         if f.name not in _NOT_SHAPING}
  if pathlib.Path(config.dataset).exists():
    out["dataset"] = _digest(config.dataset)
  return out


def changed_settings(recorded: dict[str, Any], config: TrainConfig) -> list[str]:
  """``key (recorded -> now)`` for each shaping setting of ``config`` that differs from ``recorded``.

  A key that ``recorded`` lacks (a checkpoint from before the key existed) counts as
  unchanged when ``config`` has its default value.
  """
  now = settings(config)
  defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
  changed = []
  for key, value in now.items():
    before = recorded.get(key, defaults.get(key))
    if before == value:
      continue
    changed.append(f"{key} (its content differs from the checkpoint's run)" if key == "dataset"
                   else f"{key} ({before!r} -> {value!r})")
  return changed

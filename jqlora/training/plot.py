"""``loss.png``: a run's training loss, held-out loss and learning rate over steps.

Drawn from ``RUN_DIR/metrics.jsonl`` with matplotlib (an optional package: ``pip
install matplotlib``); ``jqlora train`` draws it at the end when matplotlib is there.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from jqlora.training.config import ConfigError

__all__ = ["plot_run", "read_metrics"]


def read_metrics(run_dir: str | pathlib.Path) -> list[dict[str, Any]]:
  """The rows of ``run_dir/metrics.jsonl``; a torn last line (a killed run) is dropped.

  Raises:
    ConfigError: the file is missing, a line is not a JSON object, or no row has a loss.
  """
  path = pathlib.Path(run_dir) / "metrics.jsonl"
  try:
    text = path.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    problem = "does not exist" if isinstance(e, FileNotFoundError) else f"cannot be read ({e})"
    raise ConfigError(f"{path} {problem}; expected the metrics.jsonl of a jqlora train run") from None
  lines = text.split("\n")
  rows = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      if number == len(lines):  # no newline after it: torn by a killed process
        break
      row = None
    if not isinstance(row, dict) or not isinstance(row.get("step"), int):
      raise ConfigError(f"{path} line {number}: expected a JSON object with a step, got {line[:60]!r}")
    rows.append(row)
  if not any("loss" in row for row in rows):
    raise ConfigError(f"{path}: no row has a loss; nothing to plot")
  return rows


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
  points = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), int | float)]
  return [s for s, _ in points], [v for _, v in points]


def plot_run(run_dir: str | pathlib.Path) -> pathlib.Path:
  """Writes ``run_dir/loss.png`` (loss and eval loss above, learning rate below); returns its path.

  Raises:
    ConfigError: no readable ``metrics.jsonl`` (see :func:`read_metrics`).
    ImportError: matplotlib is not installed.
  """
  rows = read_metrics(run_dir)
  import matplotlib

  matplotlib.use("Agg")  # files only; no display
  from matplotlib import pyplot as plt

  fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 5), height_ratios=(2, 1))
  try:
    top.plot(*_series(rows, "loss"), label="train loss", linewidth=1)
    eval_steps, eval_loss = _series(rows, "eval_loss")
    if eval_steps:
      top.plot(eval_steps, eval_loss, "o-", label="eval loss", markersize=4)
    top.set_ylabel("loss")
    top.legend()
    top.grid(alpha=0.3)
    bottom.plot(*_series(rows, "learning_rate"), color="tab:green", linewidth=1)
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    top.set_title(pathlib.Path(run_dir).resolve().name)
    fig.tight_layout()
    out = pathlib.Path(run_dir) / "loss.png"
    fig.savefig(out, dpi=100)
  finally:
    plt.close(fig)
  return out

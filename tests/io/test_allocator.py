"""The loading allocator setting is opt-in: a library import or load_model changes no malloc setting."""

from __future__ import annotations

import pathlib

import pytest

import jqlora
from jqlora.io import allocator

TINY = pathlib.Path(__file__).parents[1] / "data" / "hf" / "tiny-llama" / "base"


@pytest.fixture
def calls(monkeypatch) -> list[tuple[int, int]]:
  seen: list[tuple[int, int]] = []
  monkeypatch.setattr(allocator, "_mallopt", lambda: lambda param, value: seen.append((param, value)))
  monkeypatch.setattr(allocator, "_enabled", False)
  return seen


def _load() -> None:
  jqlora.load_model(TINY, progress=False)


def test_load_model_leaves_malloc_alone_by_default(calls):
  _load()
  assert calls == []


def test_opted_in_process_sets_then_relaxes_the_threshold(calls):
  allocator.return_freed_memory_while_loading()
  _load()
  assert calls == [(-3, 1 << 20), (-3, 32 << 20)]
  allocator.return_freed_memory_while_loading(False)
  _load()
  assert len(calls) == 2


def test_the_cli_opts_in(monkeypatch, calls):
  from jqlora import cli

  with pytest.raises(SystemExit):
    cli.main(["--help"])
  assert allocator._enabled

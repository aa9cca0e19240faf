"""Shared test set-up: offline hub, CPU platform, and no silent skips in CI."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib

import pytest

DATA = pathlib.Path(__file__).parent / "data"
#: The one skip CI allows: tests/gpu on a machine without a GPU (tests/gpu/conftest.py's reason).
GPU_TESTS = pathlib.Path(__file__).parent / "gpu"
NO_GPU = "no GPU present: tests/gpu runs on GPU machines only"


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
  """``tests/data``: golden files copied from the reference libraries."""
  return DATA


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  report = outcome.get_result()
  gpu_skip = GPU_TESTS in item.path.parents and NO_GPU in str(report.longrepr)
  if os.environ.get("CI") and report.skipped and not gpu_skip:
    # A skipped reference test in CI proves nothing: fail it instead.
    report.outcome = "failed"
    report.longrepr = f"skipped in CI, which is not allowed: {report.longrepr}"

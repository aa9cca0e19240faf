"""GPU-only tests: each is skipped, with exactly this reason, when JAX sees no GPU.

``tests/conftest.py`` lets this one skip through in CI (where every other skip fails).
Run them on a GPU machine with ``JAX_PLATFORMS=cuda`` (``benchmarks/gpu_check.sh`` does).
"""

import jax
import pytest

NO_GPU = "no GPU present: tests/gpu runs on GPU machines only"


def pytest_collection_modifyitems(config, items):
  if jax.default_backend() == "gpu":
    return
  here = config.rootpath / "tests" / "gpu"
  for item in items:
    if here in item.path.parents:
      item.add_marker(pytest.mark.skip(reason=NO_GPU))

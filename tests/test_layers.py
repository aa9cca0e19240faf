"""The layer contract: imports run one way (format -> kernels -> ops -> nn -> models -> parallel
-> io -> generate -> training -> plan -> cli), checked by import-linter and by fresh interpreters."""

from __future__ import annotations

import ast
import json
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]
LINT_IMPORTS = shutil.which("lint-imports") or str(pathlib.Path(sys.executable).with_name(
    "lint-imports"))


def _lint_imports(cwd: pathlib.Path) -> subprocess.CompletedProcess:
  env = {"PATH": str(pathlib.Path(sys.executable).parent), "PYTHONPATH": str(cwd),
         "HOME": str(cwd)}
  return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=300)


def _copy_project(tmp_path: pathlib.Path) -> pathlib.Path:
  for name in ("jqlora", "pallas_kernels"):
    shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
  shutil.copy(ROOT / "pyproject.toml", tmp_path)
  return tmp_path


@pytest.fixture(scope="module")
def project_copy(tmp_path_factory) -> pathlib.Path:
  return _copy_project(tmp_path_factory.mktemp("layers"))


def test_contract_is_kept(project_copy):
  done = _lint_imports(project_copy)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert "3 kept, 0 broken" in done.stdout


@pytest.mark.parametrize("module, statement", [
    ("jqlora/format/nf4.py", "from jqlora.ops import dequantize_nf4"),  # format -> ops
    ("jqlora/nn/linear.py", "from jqlora.models import Llama"),  # modules -> models
    ("jqlora/training/loop.py", "from jqlora.cli import main"),  # training -> CLI
    ("pallas_kernels/common.py", "from jqlora.kernels import native"),  # kernel -> kernel
    ("pallas_kernels/nf4_matmul/reference.py", "from pallas_kernels import common"),
])
def test_an_upward_import_breaks_the_contract(tmp_path, module, statement):
  copy = _copy_project(tmp_path)
  path = copy / module
  path.write_text(path.read_text() + f"\n{statement}  # noqa\n")
  done = _lint_imports(copy)
  assert done.returncode != 0
  assert "BROKEN" in done.stdout or "broken" in done.stdout
  importer = module.removesuffix(".py").replace("/", ".")
  assert importer in done.stdout, done.stdout[-3000:]


def _fresh_modules(statement: str) -> list[str]:
  code = (f"import sys, json; {statement}; print(json.dumps(sorted(m for m in sys.modules "
          "if m.split('.')[0] in ('jqlora', 'pallas_kernels'))))")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                        cwd=ROOT)
  assert done.returncode == 0, done.stderr[-2000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_format_loads_nothing_else_of_jqlora():
  assert _fresh_modules("import jqlora.format") == [
      "jqlora", "jqlora.format", "jqlora.format.nf4", "jqlora.format.torch_numerics"]


@pytest.mark.parametrize("reference", sorted(str(p.relative_to(ROOT)) for p in
                                             (ROOT / "pallas_kernels").glob("*/reference.py")))
def test_kernel_references_import_only_the_format(reference):
  tree = ast.parse((ROOT / reference).read_text())
  imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
  imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
  ours = {m for m in imported if m.split(".")[0] in ("jqlora", "pallas_kernels")}
  assert ours == {"jqlora.format"}, ours


def test_the_root_package_is_lazy():
  assert _fresh_modules("import jqlora") == ["jqlora"]

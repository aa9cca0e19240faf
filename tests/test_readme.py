"""What a new user first runs: every ```python block of README.md, and a quiet tokenizer load.

Each block runs as written in a fresh interpreter, in an empty temporary folder,
offline (it may load ``jqlora.DEFAULT_MODEL``), so the README is executed in CI.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # subprocesses; the README's example loads and trains the default model

README = pathlib.Path(__file__).parent.parent / "README.md"


def _python_blocks(text: str) -> list[tuple[str, str]]:
  """``(id, source)`` of each ```python block: its section's heading and its number there."""
  blocks, counts = [], {}
  for m in re.finditer(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, re.M | re.S):
    headings = re.findall(r"^#+ +(.+?) *$", text[:m.start()], re.M)
    section = headings[-1] if headings else "top"
    counts[section] = counts.get(section, 0) + 1
    blocks.append((f"{section} #{counts[section]}", m[1]))
  return blocks


_BLOCKS = _python_blocks(README.read_text(encoding="utf-8"))


def _env() -> dict[str, str]:
  return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}


def test_the_readme_has_the_python_example():
  sections = [i.rsplit(" #", 1)[0] for i, _ in _BLOCKS]
  assert "Using it from Python" in sections, sections
  assert _python_blocks("# A\n```python\nx = 1\n```\n```bash\nls\n```\n## B\n```python\ny\n```\n") == [
      ("A #1", "x = 1\n"), ("B #1", "y\n")]


@pytest.mark.parametrize("source", [s for _, s in _BLOCKS], ids=[i for i, _ in _BLOCKS])
def test_readme_python_block_runs_as_written(source, tmp_path):
  script = tmp_path / "block.py"
  script.write_text(source, encoding="utf-8")
  proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env(), capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, f"--- block ---\n{source}\n--- stderr ---\n{proc.stderr[-4000:]}"


# -- transformers without torch: no "PyTorch was not found" notice from jqlora -------------

_NOTICE = "PyTorch was not found"


def _without_torch(code: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
  """Runs ``code`` in a fresh interpreter where ``import torch`` fails."""
  return subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None\n" + code],
                        cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


def test_loading_a_tokenizer_without_torch_prints_no_torch_notice(tmp_path):
  from training.toy import char_tokenizer

  char_tokenizer().save_pretrained(tmp_path / "tok")
  control = _without_torch("import transformers", tmp_path)
  assert control.returncode == 0 and _NOTICE in control.stderr  # torch is really hidden
  proc = _without_torch(
      "import jqlora\n"
      "folder = jqlora.load_tokenizer('tok')\n"
      "gguf = jqlora.load_tokenizer(jqlora.DEFAULT_MODEL)\n"
      "import transformers  # imported by load_tokenizer already\n"
      "transformers.logging.get_logger('transformers').warning('still heard')\n"
      "print(transformers.is_torch_available(), folder('hi')['input_ids'], gguf('hi')['input_ids'])",
      tmp_path)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert _NOTICE not in proc.stderr and "still heard" in proc.stderr  # only that notice is gone
  assert proc.stdout.split()[0] == "False" and "[6004]" in proc.stdout

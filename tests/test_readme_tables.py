"""The README's peer tables are what ``benchmarks/readme_tables.py`` makes of the committed JSON."""

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import readme_tables  # noqa: E402


def test_the_readme_tables_match_the_committed_json():
  assert (readme_tables.RESULTS / "compare_peers.json").is_file()
  assert readme_tables.main(["--check"]) == 0


@pytest.mark.parametrize("block", sorted(readme_tables.BLOCKS))
def test_a_hand_edited_block_is_caught(tmp_path, block):
  text = (ROOT / "README.md").read_text()
  start, end = f"<!-- readme_tables:{block} -->\n", f"<!-- /readme_tables:{block} -->"
  assert start in text and end in text
  head, rest = text.split(start)
  edited = head + start + "| jqlora-qlora | 9999 |\n" + end + rest.split(end, 1)[1]
  readme = tmp_path / "README.md"
  readme.write_text(edited)
  assert readme_tables.main(["--check", "--readme", str(readme)]) == 1
  assert readme_tables.main(["--readme", str(readme)]) == 0
  assert readme.read_text() == text


def test_a_missing_block_is_named(tmp_path):
  with pytest.raises(ValueError, match="readme_tables:peers"):
    readme_tables.render("no markers here\n")

"""``docs/multihost.md`` names the variables and keys ``jqlora.parallel.distributed`` reads."""

import dataclasses
import pathlib
import re
import subprocess

from jqlora.parallel import distributed
from jqlora.parallel.config import DistributedConfig
from jqlora.plan.fit import ENV_MEMORY

DOC = pathlib.Path(__file__).parents[2] / "docs" / "multihost.md"


def _bash_blocks(text: str) -> list[str]:
  return re.findall(r"^```bash\n(.*?)^```$", text, re.M | re.S)


def test_the_doc_names_exactly_the_variables_and_keys_jqlora_reads():
  text = DOC.read_text(encoding="utf-8")
  assert set(re.findall(r"\bJQLORA_[A-Z_]+\b", text)) == set(distributed.ENV.values()) | {ENV_MEMORY}
  keys = set(re.findall(r"`distributed\.([a-z_]+)`", text))
  assert keys == {f.name for f in dataclasses.fields(DistributedConfig)} == set(distributed.ENV)


def test_each_launch_sets_every_variable_and_is_valid_bash():
  blocks = _bash_blocks(DOC.read_text(encoding="utf-8"))
  launches = [b for b in blocks if "jqlora train" in b]
  assert len(launches) == 2  # sbatch and ssh
  for block in launches:
    for var in distributed.ENV.values():
      assert re.search(rf"\b{var}=", block), (var, block)
  for block in blocks:
    proc = subprocess.run(["bash", "-n"], input=block, text=True, capture_output=True)
    assert proc.returncode == 0, (proc.stderr, block)


def test_the_variables_as_the_doc_sets_them_start_a_two_process_run():
  environ = {"JQLORA_COORDINATOR": "node0:12355", "JQLORA_NUM_PROCESSES": "2",
             "JQLORA_PROCESS_ID": "1"}
  assert distributed.distributed_args(DistributedConfig(), environ) == {
      "coordinator_address": "node0:12355", "num_processes": 2, "process_id": 1}

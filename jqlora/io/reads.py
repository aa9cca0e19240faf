"""A count of the checkpoint bytes read from disk, for checking that a process reads only its shards.

Every safetensors and GGUF read of ``jqlora.io`` adds to ``READS`` (in this process).
"""

from __future__ import annotations

import dataclasses

__all__ = ["ReadCounter", "READS"]


@dataclasses.dataclass
class ReadCounter:
  """Bytes and read calls so far (``reset`` to start again)."""

  bytes: int = 0
  calls: int = 0

  def add(self, n: int) -> None:
    self.bytes += int(n)
    self.calls += 1

  def reset(self) -> None:
    self.bytes = self.calls = 0


#: The process-wide count of checkpoint bytes read by ``jqlora.io``'s readers.
READS = ReadCounter()

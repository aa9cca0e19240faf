"""The batch contract every training and evaluation step reads.

A batch is a dict of int32 arrays, each ``[B, T]`` (or ``[A, B, T]`` with ``A``
micro-batches accumulated into one update):

- ``input_ids``: token ids;
- ``labels``: the same positions as ``input_ids``, unshifted (as in transformers);
  the loss shifts them, and ``IGNORE_INDEX`` (-100) marks positions that are no target;
- ``segment_ids`` (optional): packed sequences, a target is never taken across a
  segment boundary, and 0 marks padding;
- ``positions`` (optional): RoPE positions, restarting in each packed segment.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax

__all__ = ["IGNORE_INDEX", "Batch"]

#: The label of a position that is not a target.
IGNORE_INDEX = -100
#: A batch as described above.
Batch = Mapping[str, jax.Array]

"""SIGINT / SIGTERM during training: finish the step, save, stop; a second signal ends at once.

``StopSignals`` installs handlers only for the duration of a ``with`` block, only in
the main thread, and puts the previous ones back, so a library call leaves no
process-wide handlers behind.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

__all__ = ["Signalled", "StopSignals"]


class Signalled(BaseException):
  """Raised by the signal handler outside the steps (a BaseException, as KeyboardInterrupt)."""

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
  """SIGINT / SIGTERM handlers for the duration of a ``with`` block (main thread only).

  The first signal sets ``signum``; while ``deferring`` (during the steps) that is
  all, and the loop stops after its step; otherwise the handler raises
  ``Signalled`` at once. Either way both signals get their default action back,
  so a second one ends the process immediately. The previous handlers are put
  back on exit.
  """

  def __init__(self) -> None:
    self.signum: int | None = None
    self.deferring = False
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> StopSignals:
    if threading.current_thread() is threading.main_thread():
      for sig in _SIGNALS:
        self._previous[sig] = signal.getsignal(sig)
        signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc: object) -> None:
    for sig, previous in self._previous.items():  # None: set outside Python; default is closest
      signal.signal(sig, signal.SIG_DFL if previous is None else previous)
    self._previous.clear()

  def _handle(self, signum: int, frame: object) -> None:
    for sig in self._previous:
      signal.signal(sig, signal.SIG_DFL)
    self.signum = signum
    if not self.deferring:
      raise Signalled(signum)

  def requested(self) -> int | None:
    """The signal that asked to stop, in any process (every process must stop together)."""
    if jax.process_count() == 1:
      return self.signum
    signums = multihost_utils.process_allgather(np.int32(self.signum or 0))
    return int(np.max(signums)) or None

"""A backend registry in the manner of tokamax: each op lists its implementations in order of
preference and falls through to the next one that can run a call.

An implementation is a function plus a cheap ``preferred(*args)`` test (the platform,
a dtype). With ``backend=None`` an op tries, in order, every implementation in its
automatic list whose test passes; one that raises ``NotImplementedError`` (a shape or
dtype it does not support, a kernel that cannot be built here) hands the call to the
next. Naming backends (``backend="native"`` or ``backend=("pallas", "xla")``) tries
exactly those, in that order, without the ``preferred`` test; a single named backend
that cannot run the call raises its ``NotImplementedError``, which says why.

One switch for every op: ``$JQLORA_BACKEND`` (a comma-separated list, e.g.
``JQLORA_BACKEND=xla`` or ``JQLORA_BACKEND=mosaic_gpu,pallas,xla``) replaces the
automatic order; names an op does not have are skipped. It is read when a call is
traced, so set it before the first ``jit`` of a function that uses it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["ENV_VAR", "Implementation", "Op"]

#: The environment variable naming the backend order for every op.
ENV_VAR = "JQLORA_BACKEND"


def _always(*args: Any, **kwargs: Any) -> bool:
  del args, kwargs
  return True


@dataclasses.dataclass(frozen=True)
class Implementation:
  """One backend of an op.

  Attributes:
    name: the backend's name (``"pallas"``, ``"native"``, ``"xla"``, …).
    fn: computes the op; raises ``NotImplementedError`` for a call it cannot run.
    preferred: cheap test of the call's arguments; the automatic order skips the
      implementation when it is False (e.g. a GPU kernel on a CPU backend).
    automatic: part of the automatic order (False: used only when named).
  """

  name: str
  fn: Callable[..., Any]
  preferred: Callable[..., bool] = _always
  automatic: bool = True


class Op:
  """A named operation and its implementations, most preferred first.

  Args:
    name: the op's name, used in error messages.
    implementations: the backends, in automatic order of preference.
  """

  def __init__(self, name: str, implementations: Sequence[Implementation]):
    self.name = name
    self.implementations = {impl.name: impl for impl in implementations}

  @property
  def backends(self) -> tuple[str, ...]:
    """Every backend name this op has."""
    return tuple(self.implementations)

  def _named(self, names: Sequence[str], source: str) -> list[Implementation]:
    unknown = [n for n in names if n not in self.implementations]
    if unknown and source == "backend":
      raise ValueError(f"{self.name}: backend must be one of {self.backends} or None, "
                       f"got {unknown[0]!r}")
    known = [self.implementations[n] for n in names if n in self.implementations]
    if not known:
      raise ValueError(f"{self.name}: ${ENV_VAR}={','.join(names)!r} names none of its "
                       f"backends {self.backends}")
    return known

  def order(self, *args: Any, backend: str | Sequence[str] | None = None,
            **kwargs: Any) -> list[str]:
    """The backends a call with these arguments tries, in order (none is run).

    Raises:
      ValueError: an unknown backend name.
    """
    return [impl.name for impl, _ in self._plan(backend, args, kwargs)]

  def _plan(self, backend, args, kwargs) -> list[tuple[Implementation, bool]]:
    """``(implementation, named)`` pairs to try."""
    if backend is not None:
      names = [backend] if isinstance(backend, str) else list(backend)
      return [(impl, True) for impl in self._named(names, "backend")]
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
      names = [n.strip() for n in env.split(",") if n.strip()]
      return [(impl, True) for impl in self._named(names, "env")]
    return [(impl, False) for impl in self.implementations.values()
            if impl.automatic and impl.preferred(*args, **kwargs)]

  def __call__(self, *args: Any, backend: str | Sequence[str] | None = None, **kwargs: Any) -> Any:
    """Runs the op on the first backend that can (see the module docstring).

    Raises:
      ValueError: an unknown backend name.
      NotImplementedError: no backend tried could run the call (each one's reason given).
    """
    plan = self._plan(backend, args, kwargs)
    reasons = []
    for impl, named in plan:
      try:
        return impl.fn(*args, **kwargs)
      except NotImplementedError as e:
        if named and len(plan) == 1:
          raise
        reasons.append(f"{impl.name}: {e}")
    raise NotImplementedError(f"{self.name}: no backend could run this call ("
                              + ("; ".join(reasons) or "none applies") + ")")

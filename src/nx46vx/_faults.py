"""Fault and time injection for the kill-parity and budget tests: ``NX46VX_KILL_AT=point:n`` SIGKILLs the process
at the n-th time ``point`` is reached (a journal event name, or a named point inside a write; ``*`` counts
every point). ``NX46VX_VIRTUAL_CLOCK`` gives the governor a :class:`~nx46vx.governor.VirtualClock`.

The kill point is read from the environment once, when this module is imported; unset (the normal case) a call
costs one comparison.
"""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .governor import VirtualClock

_counts: dict[str, int] = {}
# Read once per process: the kill tests set it in the child's environment, and a lookup in os.environ per journal
# event cost about a quarter of the journal's time.
_KILL_AT = os.environ.get("NX46VX_KILL_AT") or None


def maybe_kill(point: str) -> None:
    if _KILL_AT is None:
        return
    name, _, nth = _KILL_AT.rpartition(":")
    if name not in (point, "*"):  # "*": the n-th crash point of any kind (seeded kill tests)
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] >= int(nth):
        os.kill(os.getpid(), signal.SIGKILL)


def virtual_clock() -> "VirtualClock | None":
    """``NX46VX_VIRTUAL_CLOCK=tick=0.01,features_volume=30,...`` → a :class:`~nx46vx.governor.VirtualClock` (subprocess tests)."""
    spec = os.environ.get("NX46VX_VIRTUAL_CLOCK")
    if not spec:
        return None
    from .governor import VirtualClock

    values = {k.strip(): float(v) for k, _, v in (item.partition("=") for item in spec.split(",") if item.strip())}
    return VirtualClock(values.pop("tick", 0.0), values)

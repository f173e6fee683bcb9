"""Crash injection for the kill-parity tests: ``NX46VX_KILL_AT=point:n`` SIGKILLs the process
at the n-th time ``point`` is reached (a journal event name, or a named point inside a write).

Unset (the normal case) it costs one dict lookup per call.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def maybe_kill(point: str) -> None:
    spec = os.environ.get("NX46VX_KILL_AT")
    if not spec:
        return
    name, _, nth = spec.rpartition(":")
    if name != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] >= int(nth):
        os.kill(os.getpid(), signal.SIGKILL)

"""The phase protocol: ``name``, ``signature(config)``, ``run(ctx, state)``, ``state_dict()`` / ``load_state_dict()``."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import orjson

from ...config import RunConfig
from ...journal import dumps

if TYPE_CHECKING:
    from ..context import RunContext
    from ..state import RunState


@runtime_checkable
class Phase(Protocol):
    """One step of a run.

    ``signature(config)`` holds only the settings (and upstream results) the phase
    depends on: a checkpoint keeps the phase when it is unchanged. ``state_dict()``
    returns plain data and arrays (see :mod:`nx46vx.payload`); ``load_state_dict``
    receives it back in a later session before ``run``. ``done`` is True once the
    phase finished its work (a resumed run skips it).
    """

    name: str
    done: bool

    def signature(self, config: RunConfig) -> dict[str, Any]: ...

    def run(self, ctx: "RunContext", state: "RunState") -> None: ...

    def state_dict(self) -> dict[str, Any] | None: ...

    def load_state_dict(self, saved: dict[str, Any] | None) -> None: ...


def plain(obj: Any) -> Any:
    """``obj`` in its JSON form (tuples → lists, numpy → Python), as a manifest stores it."""
    return orjson.loads(dumps(obj))


def digest(obj: Any) -> str:
    """Short SHA-256 of ``obj``'s canonical JSON."""
    return hashlib.sha256(dumps(obj)).hexdigest()[:16]

"""Session changes the gateway itself makes, announced to whoever keeps state about sessions: the
events stream, the session index, metrics. One ``Changes`` per application; publishers call
``publish(kind, session_id, **fields)`` on the event loop right after the change is on disk (or, for
turns and connections, in memory); each observer is called there, in subscription order.

Observers must be quick and must not block (no disk): they copy what they need and return. One that
raises is reported on stderr once per kind of error and the others still run: a bug in a view of the
sessions never undoes or hides the change itself.

May import: the standard library only.
"""

from __future__ import annotations

import enum
import sys
from typing import Any, Callable, Dict, List, Set, Tuple

__all__ = ["ChangeKind", "ChangeObserver", "Changes"]


class ChangeKind(str, enum.Enum):
    """What happened to a session. ``fields`` carry the details named beside each."""

    CREATED = "created"  # owner
    UPDATED = "updated"  # description
    RESET = "reset"  # the OpsService answer (archive_dir, cleared, ...)
    ARCHIVED = "archived"  # as RESET: the logs were moved to an archive
    COMPACTED = "compacted"  # the OpsService answer (bytes dropped, archive_dir, ...)
    DELETED = "deleted"  # the session directory is gone (moved to the trash)
    CONNECTIONS = "connections"  # connections: how many WebSockets are attached now
    TURN_STARTED = "turn_started"  # turn_id, client_turn_id
    TURN_FINISHED = "turn_finished"  # turn_id, completed, cancelled, events, duration_s


ChangeObserver = Callable[[ChangeKind, str, Dict[str, Any]], None]


class Changes:
    def __init__(self) -> None:
        self._observers: List[ChangeObserver] = []
        self._reported: Set[Tuple[str, str]] = set()

    def subscribe(self, observer: ChangeObserver) -> Callable[[], None]:
        """Call ``observer`` on every change from now on; the answer unsubscribes it."""
        self._observers.append(observer)
        return lambda: self._observers.remove(observer) if observer in self._observers else None

    def publish(self, kind: ChangeKind, session_id: str, **fields: Any) -> None:
        for observer in list(self._observers):
            try:
                observer(kind, session_id, fields)
            except Exception as exc:  # a view's bug must not undo or hide the change
                key = (getattr(observer, "__qualname__", repr(observer)), type(exc).__name__)
                if key not in self._reported:
                    self._reported.add(key)
                    print(f"ua-gateway: warning: a session-change observer failed on {kind.value}: {exc!r}",
                          file=sys.stderr, flush=True)

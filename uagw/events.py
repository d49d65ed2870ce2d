"""The session events stream (PROTOCOL.md §13.3): every change ``uagw.changes`` announces, numbered,
kept in a ring of EVENTS_RING for ``Last-Event-ID`` resumes, and offered to each open stream.

An event id is ``<boot>-<n>``: ``n`` grows by one per change, ``boot`` names this run of the gateway, so
an id from an earlier run is never mistaken for one of this run. A resume from an id still in the ring
replays what followed it; from any other id, the stream starts with a ``reset`` event: the client has
missed changes it cannot get back and lists the sessions again.

May import: the standard library, ``uagw.limits``, ``uagw.changes`` and ``uagw.streams``.
"""

from __future__ import annotations

import collections
import re
import time
from typing import Any, AsyncIterator, Deque, Dict, List, Optional, Set, Tuple, Union

from .limits import EVENTS_RING
from .changes import ChangeKind, Changes
from .streams import Subscription, frame_chunk, sse_event

__all__ = ["SessionEvents"]

# The number of an event id: ASCII digits only ("\u00b2".isdigit() is True, yet int() refuses it), and no
# more than a counter of this run can reach, so a hostile Last-Event-ID costs no big-integer parse.
_NUMBER_RE = re.compile(r"[0-9]{1,18}")


class SessionEvents:
    """Numbers and keeps the session changes; event loop only."""

    def __init__(self, changes: Changes, ring: int = EVENTS_RING) -> None:
        self.boot = format(time.time_ns() // 1_000_000, "x")
        self.last = 0
        # (number, the event): its SSE bytes, or (kind, data) not yet formatted while nobody streams
        self.ring: Deque[Tuple[int, Union[bytes, Tuple[str, Dict[str, Any]]]]] = collections.deque(maxlen=ring)
        self.subscriptions: Set[Subscription] = set()
        self.unsubscribe = changes.subscribe(self._on_change)

    @property
    def last_id(self) -> str:
        return f"{self.boot}-{self.last}"

    def _on_change(self, kind: ChangeKind, session_id: str, fields: Dict[str, Any]) -> None:
        start = self.last_id
        self.last += 1
        data = {"kind": kind.value, "session_id": session_id, "at": round(time.time(), 3), **fields}
        if not self.subscriptions:
            # Nobody streams: formatted only if a resume asks for it (two changes a turn, at thousands of
            # turns a second, were formatted for no reader).
            self.ring.append((self.last, (kind.value, data)))
            return
        payload = sse_event(kind.value, data, self.last_id)
        self.ring.append((self.last, payload))
        framed = frame_chunk(payload)  # once for all streams (see streams.Subscription)
        for sub in self.subscriptions:
            sub.offer(payload, start, self.last_id, framed)

    def _since(self, event_id: Optional[str]) -> Optional[List[Tuple[int, bytes]]]:
        """The events after ``event_id``, or None when they are not all kept (or the id is not ours)."""
        boot, _, number = (event_id or "").partition("-")
        if boot != self.boot or not _NUMBER_RE.fullmatch(number) or int(number) > self.last:
            return None
        after = int(number)
        if after < self.last and (not self.ring or self.ring[0][0] > after + 1):
            return None
        return [(n, event if isinstance(event, bytes) else sse_event(event[0], event[1], f"{self.boot}-{n}"))
                for n, event in self.ring if n > after]

    def subscribe(self, last_event_id: Optional[str]) -> Subscription:
        """A subscription starting after ``last_event_id`` (None: from now on)."""
        sub = Subscription(last_event_id if last_event_id else self.last_id)
        self.subscriptions.add(sub)
        return sub

    def remove(self, sub: Subscription) -> None:
        self.subscriptions.discard(sub)

    async def catch_up(self, sub: Subscription) -> AsyncIterator[bytes]:
        """Replay from the ring what ``sub`` missed, or a ``reset``; then join (see ``streams.CatchUp``)."""
        while True:
            missed = self._since(sub.cursor)
            if missed is None:
                sub.cursor = self.last_id
                yield sse_event("reset", {"reason": "the events since your last id are no longer kept (or it is "
                                                    "from an earlier run); list the sessions again"}, sub.cursor)
                continue
            if not missed:
                sub.behind = False  # synchronously after the check: nothing can slip in between
                return
            for number, payload in missed:
                sub.cursor = f"{self.boot}-{number}"
                yield payload

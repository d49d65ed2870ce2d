"""Turn transcripts and replay (docs/PROTOCOL.md §6.3 and §12): every event of a turn gets the session's
next sequence number (``seq``) and is recorded twice, in ``<session>/turns/<turn_id>.jsonl`` (through the
session writer thread: no disk work here) and in the live session's ``EventRing`` of recent events, from
which a client that reconnects with ``?last_seq=N`` is sent what it missed without touching the disk.

Rules this module keeps: it knows frames and sequence numbers, not sockets or sessions; everything here
runs on the event loop and never blocks. A record on disk is byte for byte the frame the clients got, plus
a newline, so replaying from a file sends exactly what was sent live.

May import: the standard library, ``uagw.limits``, ``uagw.text``, ``uagw.http11`` and ``uagw.logs``.
"""

from __future__ import annotations

import json
import re
from collections import deque
from datetime import datetime, timezone
from typing import Any, Deque, List, NamedTuple, Optional, Tuple

from .limits import REPLAY_MAX_BYTES, REPLAY_MAX_EVENTS, REPLAY_RING_BYTES, REPLAY_RING_EVENTS
from .text import show
from .http11 import HttpError
from .logs import SessionWriter

__all__ = [
    "QUERY_RECORD",
    "EventRing",
    "Replay",
    "TranscriptRecorder",
    "bounded_replay",
    "last_seq_param",
    "replay_gap_status",
    "seq_frame",
]


QUERY_RECORD = "query"  # the user's input that started a turn: recorded with a seq, never sent as a frame


def seq_frame(seq: int, event_type: str, data: Any) -> str:
    """A frame with its sequence number, in the order OpsService reads a record's head: seq, type,
    timestamp first (PROTOCOL.md §12). UA's client reads ``type`` and ``data`` and ignores the rest."""
    stamp = datetime.now(timezone.utc).isoformat()
    return f'{{"seq":{seq},"type":{_json_string(event_type)},"timestamp":"{stamp}","data":{_compact_json(data)}}}'


# What json.dumps(text) and json.dumps(data, separators=(",", ":")) do, without building an encoder per
# call: seq_frame runs for every event of every turn.
_json_string = json.encoder.encode_basestring_ascii
_compact_json = json.JSONEncoder(separators=(",", ":")).encode


# An EventRing entry: (seq, frame), the frame None for what is recorded, never sent (the turn's query).
# A plain tuple: a NamedTuple's constructor is Python code, run for every event.
_Entry = Tuple[int, Optional[str]]


class Replay(NamedTuple):
    """What a reconnecting client is sent: ``frames`` oldest first, and the seqs it can no longer get
    this way (``lost_from``..``lost_to``, both included; None when nothing is lost)."""

    frames: List[Tuple[int, str]]
    lost_from: Optional[int] = None
    lost_to: Optional[int] = None


def bounded_replay(entries: List[Tuple[int, str]], after: int, upto: int, complete: bool,
                   max_events: int = REPLAY_MAX_EVENTS, max_bytes: int = REPLAY_MAX_BYTES) -> Replay:
    """The newest of ``entries`` (oldest first, ``after`` < seq <= ``upto``) within ``max_events`` and
    ``max_bytes``; what is left out, or was missing before them (``complete`` false), is reported as lost."""
    kept: Deque[Tuple[int, str]] = deque()
    used = 0
    for seq, frame in reversed(entries):
        if len(kept) >= max_events or used + len(frame) > max_bytes:
            complete = False
            break
        kept.appendleft((seq, frame))
        used += len(frame)
    if complete:
        return Replay(list(kept))
    first_kept = kept[0][0] if kept else upto + 1
    return Replay(list(kept), after + 1, first_kept - 1)


class EventRing:
    """The recent events of one live session, bounded by count and bytes, oldest dropped first."""

    def __init__(self, max_events: int = REPLAY_RING_EVENTS, max_bytes: int = REPLAY_RING_BYTES) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._entries: Deque[_Entry] = deque()
        self._bytes = 0

    def add(self, seq: int, frame: Optional[str]) -> None:
        self._entries.append((seq, frame))
        self._bytes += len(frame or "")
        while self._entries and (len(self._entries) > self.max_events or self._bytes > self.max_bytes):
            self._bytes -= len(self._entries.popleft()[1] or "")

    def covers(self, after: int) -> bool:
        """True if every event after seq ``after`` is still here (the caller knows there are some)."""
        return bool(self._entries) and self._entries[0][0] <= after + 1

    def after(self, after: int) -> List[Tuple[int, str]]:
        """The sendable events with seq > ``after``, oldest first."""
        found = []
        for seq, frame in reversed(self._entries):
            if seq <= after:
                break
            if frame is not None:
                found.append((seq, frame))
        found.reverse()
        return found


class TranscriptRecorder:
    """Records each seq'd event of a turn in the ring and hands it to the writer thread for its file."""

    def __init__(self, writer: SessionWriter) -> None:
        self.writer = writer

    def record(self, session_id: str, turn_id: str, ring: EventRing, seq: int, frame: str, sent: bool = True) -> None:
        ring.add(seq, frame if sent else None)
        self.writer.append_turn(session_id, turn_id, frame.encode("utf-8", "surrogatepass") + b"\n")


MAX_SEQ_DIGITS = 18  # a seq fits in 63 bits: no client number outgrows what a turn file's head holds
_SEQ_RE = re.compile(r"[0-9]{1,%d}" % MAX_SEQ_DIGITS)


def last_seq_param(text: Optional[str], session_id: Optional[str]) -> Optional[int]:
    """The ``last_seq`` query parameter of an agent WebSocket, checked before the upgrade (400 if bad)."""
    if text is None:
        return None
    if not _SEQ_RE.fullmatch(text):
        raise HttpError(400, f"query parameter last_seq must be the seq of the last event received (an integer "
                             f"0..{10 ** MAX_SEQ_DIGITS - 1}), not {show(text)}")
    if session_id is None:
        raise HttpError(400, "last_seq needs a session: reconnect to /ws/agent?session_id=ID&last_seq=N or to "
                             "/api/v1/sessions/ID/stream?last_seq=N")
    return int(text)


def replay_gap_status(session_id: str, lost_from: int, lost_to: int, reason: str) -> dict:
    """The ``status`` a client gets in place of events it cannot be sent, saying where to read them."""
    return {
        "status": "replay_incomplete",
        "lost_from_seq": lost_from,
        "lost_to_seq": lost_to,
        "detail": f"events {lost_from}..{lost_to} are not replayed ({reason}); read them from the turn "
                  f"transcripts: GET /api/v1/ops/sessions/{session_id}/turns, then .../turns/{{turn_id}}",
    }

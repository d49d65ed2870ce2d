"""A minimal SSE client over http.client for the stream tests: events as (event, id, data) tuples."""

from __future__ import annotations

import http.client
import json
import time
from typing import Any, Dict, List, Optional, Tuple

Event = Tuple[str, Optional[str], Any]  # (event name, id or None, decoded data)


class SseClient:
    def __init__(self, host: str, port: int, path: str, headers: Optional[Dict[str, str]] = None,
                 timeout: float = 5.0) -> None:
        self.connection = http.client.HTTPConnection(host, port, timeout=timeout)
        self.connection.request("GET", path, headers=headers or {})
        self.response = self.connection.getresponse()
        self.status = self.response.status
        self.buffer = b""
        self.comments = 0
        self.ended = False

    def next_event(self, timeout: float = 5.0) -> Optional[Event]:
        """The next event, or None when the stream ended (zero chunk); comments are counted, skipped."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\n\n" not in self.buffer:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no event within {timeout} s; buffered {self.buffer[:200]!r}")
                chunk = self.response.read1(65536)
                if not chunk:
                    self.ended = True
                    return None
                self.buffer += chunk
            block, self.buffer = self.buffer.split(b"\n\n", 1)
            fields: Dict[str, str] = {}
            for line in block.decode().split("\n"):
                if line.startswith(":"):
                    self.comments += 1
                    continue
                name, _, value = line.partition(": ")
                fields[name] = value
            if fields:
                return fields.get("event", "message"), fields.get("id"), json.loads(fields.get("data", "null"))

    def events_until(self, condition: Any, timeout: float = 5.0) -> List[Event]:
        got: List[Event] = []
        deadline = time.monotonic() + timeout
        while True:
            event = self.next_event(max(0.01, deadline - time.monotonic()))
            if event is None:
                return got
            got.append(event)
            if condition(got):
                return got

    def close(self) -> None:
        self.connection.close()


def lines_of(events: List[Event]) -> List[str]:
    return [line for name, _, data in events if name in ("slice", "lines") for line in data["lines"]]


def last_id(events: List[Event]) -> Optional[str]:
    ids = [event_id for _, event_id, _ in events if event_id]
    return ids[-1] if ids else None

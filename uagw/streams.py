"""Live streams (PROTOCOL.md §13): Server-Sent Events over a chunked answer, the follow of a log
(``LogWatcher``: one per followed file, shared by all its followers) and the admission of streams.

Theory of operation. Every stream is a ``Subscription``: a bounded queue of encoded events and the
cursor (the SSE ``id``) of the last event queued. A watcher hands each batch of new lines to its
subscriptions as one event encoded once, tagged with the cursor it starts from; a subscription takes
it only when that is its own cursor, so no line is given twice or skipped. One that is behind (a new
follower, a resume, a misaligned batch, or a slow reader whose queue passed STREAM_QUEUE_BYTES) reads
the file itself from its cursor, off the loop, until it reaches the watcher's cursor, and joins again.

Fan-out cost (issue 13: 200 followers at most 2x the CPU of one). Each event is encoded and framed as
an HTTP chunk once; a subscription whose stream waits idle and whose connection takes bytes gets that
same bytes object by one ``transport.write`` from the watcher (the server's ``attach``ed sink), with no
queue entry and no wake-up of its task. Only a follower that cannot take it now (its send buffer past
MAX_SEND_BACKLOG, or something already queued) gets it queued and its task woken, so the order is the
same on both paths. The gateway's own appends are gathered for ``coalesce_delay(followers)``: more
followers, fewer and larger events.

A watcher learns of new lines two ways: the lines the gateway writes itself (SessionWriter's
``appended`` hook) are handed over from memory, with the cursor computed without reading
(``ops_service.cursor_after_append``); lines other writers append are found by one ``stat`` per file
every STREAM_POLL_INTERVAL, then read. A rotation or truncation is a ``reset`` event.

May import: the standard library, ``ops_service``, ``uagw.limits`` and ``uagw.http11``.
"""

from __future__ import annotations

import asyncio
import collections
import json
from typing import Any, AsyncGenerator, AsyncIterator, Awaitable, Callable, Deque, Dict, Optional, Set, Tuple

import ops_service
from ops_service import OpsError, SessionNotFound

from .limits import MAX_STREAMS, MAX_STREAMS_PER_CLIENT, STREAM_POLL_INTERVAL, STREAM_QUEUE_BYTES
from .http11 import HttpError

__all__ = [
    "CatchUp",
    "EventStream",
    "KEEPALIVE",
    "LogWatcher",
    "LogWatchers",
    "Sink",
    "StreamSlots",
    "Subscription",
    "coalesce_delay",
    "connected_comment",
    "frame_chunk",
    "sse_event",
]

KEEPALIVE = b": keepalive\n\n"  # an SSE comment: clients ignore it, proxies see traffic


def connected_comment(keepalive: float) -> bytes:
    """The comment that opens every stream at once (PROTOCOL.md §13.1): without it a stream with nothing
    to say yet (the session events of a quiet gateway) sends no byte, and ``curl -N`` looks hung."""
    return f": connected; events follow as they happen, a keepalive comment after {keepalive:g} s without one\n\n".encode()
CATCH_UP_LIMIT = ops_service.MAX_LIMIT  # lines per read while catching up: few reads, each bounded by bytes
CATCH_UP_BYTES = 128 * 1024  # bytes per catch-up event: half a queue, a few ms of a client's link
# The gateway's own appends within this many seconds go out as one event: an agent writing 1,000 lines/s
# in bursts would otherwise cost one event (an encode, a wake-up and a write) per line per follower.
APPEND_COALESCE = 0.002
# ... plus this much per follower, up to APPEND_COALESCE_MAX: each event costs every follower one send
# (a system call, and a wake-up of its reader), so with many followers fewer, larger events keep the
# CPU near that of one follower (issue 13: 200 followers at most 2x one), while the wait stays a small
# part of the 50 ms p99 the issue allows from append to client (the writer's own SESSION_WRITE_DELAY
# and disk write, about 11 ms, come before it). The writer hands lines over every SESSION_WRITE_DELAY
# (10 ms) while a turn writes: 15 ms gathers two hand-overs, halving the sends (bench/live.py, 200
# followers: 37.6 % CPU one event per hand-over and per-follower wake-ups; 17-19 % direct and gathered).
APPEND_COALESCE_PER_FOLLOWER = 0.0001
APPEND_COALESCE_MAX = 0.015


def coalesce_delay(followers: int) -> float:
    """Seconds the gateway's appends to a log with ``followers`` followers are gathered into one event."""
    return min(APPEND_COALESCE_MAX, APPEND_COALESCE + followers * APPEND_COALESCE_PER_FOLLOWER)


def sse_event(event: str, data: Any, event_id: Optional[str] = None) -> bytes:
    """One SSE event (WHATWG HTML §9.2.6): ``data`` as one line of JSON (which escapes every newline)."""
    text = json.dumps(data, separators=(",", ":"), default=str)
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {text}\n\n".encode("utf-8")


class StreamSlots:
    """How many streams are open, in all and per client address (event loop only)."""

    def __init__(self, total: int = MAX_STREAMS, per_client: int = MAX_STREAMS_PER_CLIENT) -> None:
        self.limit, self.per_client_limit = total, per_client
        self.open = 0
        self.by_client: Dict[str, int] = {}

    def take(self, client: str) -> None:
        """Count a new stream of ``client``; HttpError 503 past MAX_STREAMS, 429 past MAX_STREAMS_PER_CLIENT."""
        if self.open >= self.limit:
            raise HttpError(503, f"the gateway serves {self.limit} streams at most and all are open; retry "
                                 "shortly, or poll without follow=true", headers=[("Retry-After", "5")])
        if self.by_client.get(client, 0) >= self.per_client_limit:
            raise HttpError(429, f"{client} has {self.per_client_limit} streams open, the most one address may; "
                                 "close one first (one stream per view is enough)", headers=[("Retry-After", "5")])
        self.open += 1
        self.by_client[client] = self.by_client.get(client, 0) + 1

    def give_back(self, client: str) -> None:
        self.open -= 1
        left = self.by_client.get(client, 1) - 1
        if left:
            self.by_client[client] = left
        else:
            self.by_client.pop(client, None)


def frame_chunk(payload: bytes) -> bytes:
    """``payload`` as one HTTP/1.1 chunk (RFC 9112 §7.1), as the server frames each chunk of a stream:
    framed once per event, the same bytes object goes to every follower's transport."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


# Writes one framed chunk (and counts ``size`` payload bytes) straight to a stream's connection;
# False when it cannot take it now (the peer is behind, the connection closing): queue it instead.
Sink = Callable[[bytes, int], bool]


class Subscription:
    """One stream's view of a source: the events queued for it (at most STREAM_QUEUE_BYTES) and the
    cursor of the last one. Event loop only.

    A follower that keeps up costs one ``transport.write`` per event and nothing else: while its stream
    waits idle (nothing queued, not behind) and its connection takes bytes, ``offer`` writes the event,
    framed once by the source for all, through ``sink``, without queueing it or waking the stream's task.
    Anything else (a peer past its send buffer, a catch-up under way) queues and wakes as before, so
    the order of events and the cursor are the same either way."""

    def __init__(self, cursor: Optional[str], queue_bytes: int = STREAM_QUEUE_BYTES) -> None:
        self.cursor = cursor
        self.queue: Deque[bytes] = collections.deque()
        self.queued_bytes = 0
        self.queue_limit = queue_bytes
        self.behind = True  # catching up by reading; the source's events are not queued meanwhile
        self.overflowed = False  # behind because the queue was full: the client is told ("resume")
        self.final: Optional[bytes] = None  # the last event (end of stream), once the source has ended
        self.wake = asyncio.Event()
        self.sink: Optional[Sink] = None  # the connection's direct write, once the server attached it
        self.idle = False  # the stream's task waits for ``wake`` with nothing queued: a direct write may go
        self.written = False  # an event went through ``sink`` since the stream's task last looked

    def offer(self, payload: bytes, start: Optional[str], end: Optional[str], framed: Optional[bytes] = None) -> None:
        """Queue ``payload``, the event that moves the source from cursor ``start`` to ``end``, or write
        it at once (``framed``: it as a chunk, from ``frame_chunk``) when the stream is idle."""
        if self.behind or self.final is not None:
            return
        if start is not None and start != self.cursor:
            self.behind = True  # a batch that does not follow on: read the gap instead
        elif self.idle and not self.queue and self.sink is not None and self.sink(framed or frame_chunk(payload),
                                                                                  len(payload)):
            self.cursor = end if end is not None else self.cursor
            self.written = True
            return  # written: the stream's task sleeps on
        elif self.queued_bytes + len(payload) > self.queue_limit:
            self.behind = self.overflowed = True
        else:
            self.queue.append(payload)
            self.queued_bytes += len(payload)
            self.cursor = end if end is not None else self.cursor
        self.idle = False  # woken: what comes next waits behind it, until the task has written it
        self.wake.set()

    def end(self, payload: bytes) -> None:
        """End the stream after what is queued, with ``payload`` as its last event."""
        if self.final is None:
            self.final = payload
            self.wake.set()


# Reads what a behind subscription missed, yielding events; sets ``behind`` False once it has joined.
CatchUp = Callable[[Subscription], AsyncIterator[bytes]]


class EventStream:
    """The source of a StreamingResponse for one subscription: a comment saying it is connected,
    ``first`` (if any), then its queue, catching up when behind, a keep-alive comment every
    ``keepalive`` s of silence, its final event.
    ``aclose`` (always called by the server, whether iteration began or not) runs ``on_close``."""

    def __init__(self, subscription: Subscription, catch_up: CatchUp, keepalive: float,
                 on_close: Callable[[], None], first: Optional[bytes] = None) -> None:
        self.subscription = subscription
        self._events = self._run(catch_up, keepalive, first)
        self._on_close: Optional[Callable[[], None]] = on_close

    def __aiter__(self) -> "EventStream":
        return self

    def attach(self, sink: Sink) -> None:
        """The server's direct write to this stream's connection (see ``Subscription``)."""
        self.subscription.sink = sink

    def __anext__(self) -> Awaitable[bytes]:
        return self._events.__anext__()

    async def aclose(self) -> None:
        # The sink is the server's closure over this stream's response (whose source is this stream):
        # kept, it closes a reference cycle that holds the queue, the connection and its transport's
        # send buffer (~300 KiB a stalled follower) until a full cyclic collection, which may be minutes
        # away: dropped here, all of it is freed when the server lets go of the response.
        self.subscription.sink = None
        await self._events.aclose()
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close()

    async def _run(self, catch_up: CatchUp, keepalive: float, first: Optional[bytes]) -> AsyncGenerator[bytes, None]:
        sub = self.subscription
        yield connected_comment(keepalive)
        if first is not None:
            yield first
        while True:
            while sub.queue:
                payload = sub.queue.popleft()
                sub.queued_bytes -= len(payload)
                yield payload
            if sub.final is not None:
                yield sub.final
                return
            if sub.behind:
                if sub.overflowed:
                    sub.overflowed = False
                    yield sse_event("resume", {"cursor": sub.cursor, "reason": "this client read more slowly than "
                                               "events came; what follows is read from the cursor"}, sub.cursor)
                async for payload in catch_up(sub):
                    yield payload
                continue
            sub.wake.clear()
            sub.idle, sub.written = True, False
            try:
                await asyncio.wait_for(sub.wake.wait(), keepalive)
            except asyncio.TimeoutError:
                if not sub.written:  # events written directly kept the connection busy: no comment needed
                    yield KEEPALIVE
            finally:
                sub.idle = False


LogKey = Tuple[Optional[str], str]  # (session id, or None for the gateway's own log; file name)
RunOps = Callable[..., Awaitable[Any]]


def _lines_of(data: bytes) -> list:
    """The complete lines of appended bytes, decoded as a log slice decodes them."""
    return [(line[:-1] if line.endswith(b"\r") else line).decode("utf-8", "replace") for line in data.split(b"\n")[:-1]]


class LogWatcher:
    """Follows one log for all its subscriptions (event loop only): one stat poll, and the gateway's own
    appends from memory; every batch of lines is encoded once and offered to each subscription."""

    def __init__(self, watchers: "LogWatchers", key: LogKey) -> None:
        self.watchers = watchers
        self.key = key
        self.subscriptions: Set[Subscription] = set()
        self.cursor: Optional[str] = None  # after the last line handed out; None until the first read
        self.identity: Optional[Tuple[int, int, int]] = None  # (dev, ino, size) the cursor was taken at
        self.changed = asyncio.Event()  # set whenever the cursor moves
        self.reading = False
        self.reread = False  # a change arrived while reading: read again
        self.ended: Optional[bytes] = None
        self.task: Optional[asyncio.Task] = None
        self.pending = b""  # the gateway's appends not handed out yet (APPEND_COALESCE)
        self.pending_cursor: Optional[str] = None  # the cursor after them
        self.pending_identity: Optional[Tuple[int, int, int]] = None
        self.flush_handle: Optional[asyncio.TimerHandle] = None

    def add(self, sub: Subscription) -> None:
        self.subscriptions.add(sub)
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._poll())
        if self.ended is not None:
            sub.end(self.ended)

    def remove(self, sub: Subscription) -> None:
        self.subscriptions.discard(sub)
        if not self.subscriptions:
            task, self.task = self.task, None
            if task is not None:
                # Let go of the task: once cancelled it keeps its CancelledError, whose traceback holds
                # _poll's frame and so this watcher, a cycle only a full cyclic collection would free.
                task.cancel()
            self.watchers.forget(self)

    def end(self, payload: bytes) -> None:
        self.flush()
        self.ended = payload
        for sub in self.subscriptions:
            sub.end(payload)
        self._moved()

    async def read(self, cursor: Optional[str], limit: int = CATCH_UP_LIMIT) -> Dict[str, Any]:
        session_id, file_name = self.key
        ops = self.watchers.ops
        if session_id is None and file_name == ops_service.AUDIT_LOG_NAME:  # read across its rotations
            return await self.watchers.run_ops(ops.read_audit_log, cursor=cursor, limit=limit, max_bytes=CATCH_UP_BYTES,
                                               backups=self.watchers.audit_backups)
        if session_id is None:
            return await self.watchers.run_ops(ops.read_gateway_log, cursor=cursor, limit=limit, max_bytes=CATCH_UP_BYTES)
        return await self.watchers.run_ops(ops.read_log, session_id, file_name, cursor=cursor, limit=limit,
                                           max_bytes=CATCH_UP_BYTES)

    async def _poll(self) -> None:
        while self.ended is None:
            await self.refresh()
            await asyncio.sleep(STREAM_POLL_INTERVAL)

    async def refresh(self) -> None:
        """Read what is new since ``cursor`` (when the file's stat changed) and hand it out."""
        if self.reading:
            self.reread = True
            return
        self.flush()  # what the gateway appended goes first: the read starts after it
        self.reading = True
        try:
            self.reread = True
            while self.reread and self.ended is None:
                self.reread = False
                await self._read_new()
        except SessionNotFound:
            self.end(sse_event("end", {"reason": "the session was deleted"}))
        except OpsError:
            pass  # an unreadable file for now (WorkspacesUnavailable): the next poll tries again
        finally:
            self.reading = False

    async def _read_new(self) -> None:
        session_id, file_name = self.key
        identity = await self.watchers.run_ops(self.watchers.ops.log_identity, session_id, file_name)
        if self.cursor is not None and identity == self.identity:
            return
        if self.cursor is None:
            result = await self.read(None, limit=1)  # the end of the file, where following starts
            self.cursor, self.identity = result["cursor"], identity
            self._moved()
            return
        more = True
        while more and self.ended is None:
            start = self.cursor
            result = await self.read(start)
            more = result["more"]
            if result["cursor"] == start and not result["reset"]:
                break
            self.cursor = result["cursor"]
            self._hand_out(result, start)
        self.identity = identity

    def _hand_out(self, result: Dict[str, Any], start: Optional[str]) -> None:
        payload = (sse_event("reset", {"reason": "the file was rotated or truncated; lines restart at its beginning"})
                   if result["reset"] else b"")
        payload += sse_event("lines", {"lines": result["lines"], "truncated": result["truncated"]}, result["cursor"])
        framed = frame_chunk(payload)
        for sub in self.subscriptions:
            sub.offer(payload, start, result["cursor"], framed)
        self._moved()

    def appended(self, data: bytes, identity: Optional[Tuple[int, int, int]]) -> None:
        """The gateway appended ``data``; ``identity`` is the file's (dev, ino, size) right after."""
        cursor = self.pending_cursor if self.pending else self.cursor
        new = None
        if not self.reading and cursor is not None and identity is not None and data.endswith(b"\n"):
            new = ops_service.cursor_after_append(cursor, data, *identity)
        if new is None:  # other bytes came too, or the cursor needs bytes not in hand: read instead
            asyncio.get_running_loop().create_task(self.refresh())
            return
        self.pending += data
        self.pending_cursor, self.pending_identity = new, identity
        if self.flush_handle is None:
            self.flush_handle = asyncio.get_running_loop().call_later(coalesce_delay(len(self.subscriptions)),
                                                                      self.flush)

    def flush(self) -> None:
        """Hand out the coalesced appends as one event, encoded once for all subscriptions."""
        if self.flush_handle is not None:
            self.flush_handle.cancel()
            self.flush_handle = None
        if not self.pending or self.ended is not None:
            self.pending = b""
            return
        start, data = self.cursor, self.pending
        self.cursor, self.identity = self.pending_cursor, self.pending_identity
        self.pending = b""
        payload = sse_event("lines", {"lines": _lines_of(data), "truncated": False}, self.cursor)
        framed = frame_chunk(payload)
        for sub in self.subscriptions:
            sub.offer(payload, start, self.cursor, framed)
        self._moved()

    def _moved(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def catch_up(self, sub: Subscription) -> AsyncIterator[bytes]:
        """Read from ``sub.cursor`` until it meets the watcher's cursor, then join (see CatchUp)."""
        while sub.final is None:
            if sub.cursor is not None and sub.cursor == self.cursor:
                sub.behind = False
                return
            changed = self.changed
            try:
                result = await self.read(sub.cursor)
            except SessionNotFound:
                sub.end(sse_event("end", {"reason": "the session was deleted"}))
                return
            if result["reset"]:
                yield sse_event("reset", {"reason": "the file was rotated or truncated; lines restart at its beginning"})
            moved = result["cursor"] != sub.cursor or result["reset"]
            if result["lines"] or moved:
                sub.cursor = result["cursor"]
                yield sse_event("lines", {"lines": result["lines"], "truncated": result["truncated"]}, sub.cursor)
            if not result["more"] and sub.cursor != self.cursor:
                # Ahead of the watcher (it has not polled yet) or nothing new: wait for it to move.
                try:
                    await asyncio.wait_for(changed.wait(), STREAM_POLL_INTERVAL)
                except asyncio.TimeoutError:
                    pass


class LogWatchers:
    """The watchers of all followed logs, one per file (event loop, except ``on_append``)."""

    def __init__(self, ops: ops_service.OpsService, run_ops: RunOps, audit_backups: int = 0) -> None:
        self.ops = ops
        self.run_ops = run_ops
        self.audit_backups = audit_backups  # rotated audit files a follower may still be reading
        self.watchers: Dict[LogKey, LogWatcher] = {}
        self.loop = asyncio.get_running_loop()

    def watch(self, key: LogKey) -> LogWatcher:
        watcher = self.watchers.get(key)
        if watcher is None:
            watcher = self.watchers[key] = LogWatcher(self, key)
        return watcher

    def forget(self, watcher: LogWatcher) -> None:
        if self.watchers.get(watcher.key) is watcher:
            del self.watchers[watcher.key]

    def of_session(self, session_id: str) -> list:
        return [watcher for key, watcher in list(self.watchers.items()) if key[0] == session_id]

    def on_append(self, session_id: str, file_name: str, data: bytes) -> None:
        """SessionWriter's hook, on its thread with the session's lock held: the stat taken here is of the
        file just as this append left it (the gateway's own writers are locked out meanwhile)."""
        if (session_id, file_name) not in self.watchers:
            return
        try:
            identity = self.ops.log_identity(session_id, file_name)
        except (OpsError, OSError):
            identity = None
        watcher = self.watchers.get((session_id, file_name))
        if watcher is not None:
            self.loop.call_soon_threadsafe(watcher.appended, data, identity)

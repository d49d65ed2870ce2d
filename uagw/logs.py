"""The gateway's writer threads: ``GatewayLog`` (JSON lines under <root>/_gateway/) and ``SessionWriter``
(journals, run logs and heartbeats), both a ``BatchWriter``: each writes on one thread, so the event loop
never waits for a disk, and counts what it loses (health shows it). Neither touches a file itself: every
write goes through OpsService, the one module that writes under the workspaces root.

May import: the standard library, ``ops_service``, ``uagw.limits`` and ``uagw.text``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, Dict, Generic, List, Optional, Tuple, TypeVar, Union

import ops_service
from ops_service import OpsError, OpsService, SessionNotFound

from .limits import (
    GATEWAY_LOG_BACKUPS, GATEWAY_LOG_FIELD_CHARS, GATEWAY_LOG_INTERVAL, GATEWAY_LOG_MAX_PENDING,
    GATEWAY_LOG_ROTATE_BYTES, MAX_WRITER_BACKLOG, REPORT_INTERVAL, SECURITY_LOG_BURST, SECURITY_LOG_RATE,
    SESSION_WRITE_DELAY, WRITER_BACKLOG_POLL,
)
from .text import PerSecond

__all__ = [
    "BatchWriter",
    "GatewayLog",
    "SECURITY_EVENTS",
    "SECURITY_STATUSES",
    "SessionWriter",
    "access_line",
    "log_field",
]


_log_second = PerSecond(lambda second: datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"))


def _log_stamp(now: Optional[float] = None) -> str:
    """UTC time (``now``, else the current one) with milliseconds, as in 2026-11-26T10:00:00.123+00:00."""
    if now is None:
        now = time.time()
    second = int(now)
    return f"{_log_second(second)}.{int((now - second) * 1000):03d}+00:00"


SECURITY_EVENTS = frozenset({"auth_failure", "connection_limit"})  # records also kept in security.log ...
SECURITY_STATUSES = frozenset({403, 421, 429})  # ... and so are the access records of these refusals
_LOG_FIELD_SHORT = GATEWAY_LOG_FIELD_CHARS // 12  # no string this short escapes past the cap (an emoji takes 12)
_json_string = json.encoder.encode_basestring_ascii  # the C escaper json.dumps uses
# One encoder for every record: json.dumps with separators builds a JSONEncoder per call (~1.5 us).
_compact_json = json.JSONEncoder(separators=(",", ":")).encode
_float_repr = float.__repr__  # what json writes for a finite float


def _json_scalar(value: Any) -> str:
    """``value`` (a log_field result) as json.dumps writes it, without building an encoder for one number."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return _json_string(value)
    if value is True:
        return "true"
    if value is False:
        return "false"
    if type(value) is int:
        return int.__repr__(value)
    if type(value) is float and value - value == 0.0:  # finite
        return _float_repr(value)
    return _compact_json(value)


def access_line(at: float, client: Any, method: Any, path: Any, status: Any, size: Any, ms: Any) -> str:
    """The gateway.log record of one answer, byte for byte what ``GatewayLog.write("access", ...)`` writes,
    made from the tuple ``GatewayLog.access`` queued (on the writer thread, off the event loop)."""
    return (f'{{"ts":"{_log_stamp(at)}","event":"access","client":{_json_scalar(log_field(client))},'
            f'"method":{_json_scalar(log_field(method))},"path":{_json_scalar(log_field(path))},'
            f'"status":{_json_scalar(log_field(status))},"bytes":{_json_scalar(log_field(size))},'
            f'"ms":{_json_scalar(log_field(ms))}}}')
_Item = TypeVar("_Item")


def log_field(value: Any) -> Any:
    """``value`` as a log record holds it: None, booleans and numbers as they are; anything else as a
    string whose JSON escaping is at most GATEWAY_LOG_FIELD_CHARS characters, cut and marked when longer.

    The bound is on the escaped text, because that is what reaches the disk: a path of 512 '"' is 1,024
    characters once escaped, and one astral character is 12.
    """
    if value is None or isinstance(value, (int, float)):
        return value
    text = value if isinstance(value, str) else str(value)
    if len(text) <= _LOG_FIELD_SHORT or len(_json_string(text)) - 2 <= GATEWAY_LOG_FIELD_CHARS:
        return text
    mark = f"...[{len(text)} chars, cut]"
    room = GATEWAY_LOG_FIELD_CHARS - len(mark)
    low, high = 0, min(len(text), room)  # the longest prefix that fits lies in [low, high]
    while low < high:
        middle = (low + high + 1) // 2
        if len(_json_string(text[:middle])) - 2 <= room:
            low = middle
        else:
            high = middle - 1
    return text[:low] + mark


def _security_kind(event: str, fields: Dict[str, Any]) -> Optional[str]:
    """What a record is for security.log's budget ("lockout", "access 429", ...), or None: not a security record."""
    if event == "access":
        status = fields.get("status")
        return f"access {status}" if status in SECURITY_STATUSES else None
    if event == "auth_failure" and fields.get("lockout"):
        return "lockout"
    return event if event in SECURITY_EVENTS else None


class _SecurityBudget:
    """Which security records reach security.log: one a second per (kind, client), and SECURITY_LOG_RATE a
    second in all after a burst of SECURITY_LOG_BURST. A flood from one address costs one record a second;
    one from many addresses costs SECURITY_LOG_RATE a second. What is held back is counted by kind.
    Not thread-safe: GatewayLog's lock guards it.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.tokens = float(SECURITY_LOG_BURST)
        self.refilled = clock()
        self.second = -1
        self.written: "set[Tuple[str, Any]]" = set()  # keys written this second: at most BURST + RATE of them
        self.suppressed: Dict[str, int] = {}

    def admit(self, kind: str, client: Any) -> bool:
        now = self.clock()
        if int(now) != self.second:
            self.second = int(now)
            self.written.clear()
        self.tokens = min(float(SECURITY_LOG_BURST), self.tokens + (now - self.refilled) * SECURITY_LOG_RATE)
        self.refilled = now
        key = (kind, client)
        if key in self.written or self.tokens < 1.0:
            self.suppressed[kind] = self.suppressed.get(kind, 0) + 1
            return False
        self.tokens -= 1.0
        self.written.add(key)
        return True

    def take_suppressed(self) -> Dict[str, int]:
        counts, self.suppressed = self.suppressed, {}
        return counts


class BatchWriter(Generic[_Item]):
    """A daemon thread that writes, in passes, the items handed over to it, and counts what it loses.

    Items reach the thread through ``_pending``: ``_hand_over`` adds a list and wakes the thread; a
    subclass may instead append to ``_pending`` itself while holding ``_lock``, to be taken at the next
    pass without waking anyone. Each pass waits at most ``_wait_time(keeping)`` seconds (None: until
    woken), takes everything pending at once, so a backlog folds into one pass, and calls
    ``_write(items, final)``, which returns the items to keep for the next pass, ahead of newer ones.
    ``close`` makes the thread do a last pass with ``final=True`` over all that was handed over before,
    and stop. ``dropped`` counts what the subclass reports lost (``_count_dropped``, or under ``_lock``).

    A subclass sets its own state first, then calls ``BatchWriter.__init__``, which starts the thread.
    """

    close_timeout = 2.0  # s close() waits for the last pass by default

    drop_reasons: Tuple[str, ...] = ("write_failed",)  # what ``dropped_by_reason`` counts (GET /metrics shows it)

    def __init__(self, name: str) -> None:
        self.dropped = 0
        self.dropped_by_reason: Dict[str, int] = {reason: 0 for reason in self.drop_reasons}  # sums to ``dropped``
        self.bytes_written = 0  # by the thread only; read without the lock (an int, for GET /metrics)
        self._lock = threading.Lock()
        self._pending: List[_Item] = []
        self._closing = False
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def close(self, timeout: Optional[float] = None) -> None:
        """Write everything handed over so far, then stop the thread (any thread)."""
        with self._lock:
            self._closing = True
        self._wake.set()
        self._thread.join(self.close_timeout if timeout is None else timeout)

    def _hand_over(self, items: List[_Item]) -> None:
        """Queue ``items`` for the thread and wake it (any thread)."""
        with self._lock:
            self._pending.extend(items)
        self._wake.set()

    def _count_dropped(self, count: int, reason: str = "write_failed") -> None:
        with self._lock:
            self._dropped_locked(count, reason)

    def _dropped_locked(self, count: int, reason: str) -> None:
        self.dropped += count
        self.dropped_by_reason[reason] = self.dropped_by_reason.get(reason, 0) + count

    def _run(self) -> None:
        kept: List[_Item] = []
        while True:
            self._wake.wait(self._wait_time(bool(kept)))
            self._wake.clear()  # before taking: a hand-over from now on wakes the next pass
            with self._lock:
                items, self._pending = self._pending, []
                final = self._closing
            kept = self._write(kept + items, final)
            if final:
                return

    def _wait_time(self, keeping: bool) -> Optional[float]:
        """Seconds the next pass waits at most; ``keeping``: the last pass kept items back."""
        raise NotImplementedError

    def _write(self, items: List[_Item], final: bool) -> List[_Item]:
        """Write ``items``; return those to try again at the next pass (none when ``final``)."""
        raise NotImplementedError


# A gateway.log record: a formatted line, or the fields of an access record (see GatewayLog.access).
_LogItem = Union[str, Tuple[float, Any, Any, Any, Any, Any, Any]]


class GatewayLog(BatchWriter[_LogItem]):
    """Append-only JSON-lines logs of access and events. ``write`` is cheap and thread-safe.

    Records are collected in memory and written by one thread every GATEWAY_LOG_INTERVAL: waking a
    thread per request would make the event loop queue for the GIL after every socket call.
    Records never contain a token: callers pass only the fields listed in each call, never headers.

    Every record goes to gateway.log, each field capped by ``log_field``, so a record is bounded whatever
    a client sends. Security records (SECURITY_EVENTS, refusals with SECURITY_STATUSES) also go to
    security.log within a ``_SecurityBudget``, with a ``security_suppressed`` record a second at most
    counting what the budget held back: a request flood rotates gateway.log, not the auth failures.
    The files are written by ``OpsService.append_gateway_log`` (which never follows a symlinked
    ``_gateway``); each rotates past ``rotate_bytes`` and keeps GATEWAY_LOG_BACKUPS older files.
    ``dropped`` counts records lost to a full queue or a failed write (health shows it).
    """

    drop_reasons = ("queue_full", "write_failed")

    def __init__(self, ops: OpsService, rotate_bytes: int = GATEWAY_LOG_ROTATE_BYTES) -> None:
        self.ops = ops
        self.directory = ops.root / ops_service.GATEWAY_DIR_NAME
        self.rotate_bytes = rotate_bytes
        self.problem: Optional[str] = None  # why records are being dropped, while they are (health shows it)
        self._security: List[str] = []
        self._budget = _SecurityBudget()
        self._summarized = time.monotonic()
        super().__init__("ua-gateway-log")

    def write(self, event: str, **fields: Any) -> None:
        for name, value in fields.items():
            if not (value is None or isinstance(value, (int, float)) or (isinstance(value, str) and len(value) <= _LOG_FIELD_SHORT)):
                fields[name] = log_field(value)
        # Formatted now: a string is not tracked by the garbage collector, while dicts held here for
        # 100 ms at 20k requests/s would survive into old generations and cost full collections.
        line = _compact_json({"ts": _log_stamp(), "event": event, **fields})
        kind = _security_kind(event, fields)
        with self._lock:
            # Taken at the next tick, without waking the thread (see the class docstring).
            if len(self._pending) < GATEWAY_LOG_MAX_PENDING:
                self._pending.append(line)
            else:
                self._dropped_locked(1, "queue_full")
            if kind is not None and self._budget.admit(kind, fields.get("client")):
                self._security.append(line)

    def access(self, client: str, method: Optional[str], path: Optional[str], status: int, size: int,
               ms: Optional[float]) -> None:
        """``write("access", ...)`` of one answer, at a fraction of its cost on the event loop: the record is
        queued as a tuple (no dict, nothing the garbage collector tracks for long) and formatted by the
        thread (``access_line``). Refusals that security.log keeps are formatted now, as ``write`` does."""
        if status in SECURITY_STATUSES:
            self.write("access", client=client, method=method, path=path, status=status, bytes=size, ms=ms)
            return
        record = (time.time(), client, method, path, status, size, ms)
        with self._lock:
            if len(self._pending) < GATEWAY_LOG_MAX_PENDING:
                self._pending.append(record)
            else:
                self._dropped_locked(1, "queue_full")

    def _wait_time(self, keeping: bool) -> Optional[float]:
        return GATEWAY_LOG_INTERVAL

    def _write(self, items: List[_LogItem], final: bool) -> List[_LogItem]:
        lines = [item if isinstance(item, str) else access_line(*item) for item in items]
        with self._lock:
            security, self._security = self._security, []
            summary = self._summary(final)
        if summary:
            security.append(summary)
        failed = False
        for name, records in ((ops_service.GATEWAY_LOG_NAME, lines), (ops_service.SECURITY_LOG_NAME, security)):
            if records:
                data = ("\n".join(records) + "\n").encode()
                outcome = self.ops.append_gateway_log(name, data, self.rotate_bytes, GATEWAY_LOG_BACKUPS)
                if not outcome["written"]:
                    self._count_dropped(len(records))
                else:
                    self.bytes_written += len(data)
                if "error" in outcome:  # this file's records only: the other file may still be fine
                    failed = True
                    if outcome["unsafe"]:
                        self._report(f"the gateway log directory {self.directory} (or a log in it) is a symlink or not "
                                     f"a regular directory or file ({outcome['error']}); its records are dropped, never "
                                     "written through it: remove it, and the gateway creates its own")
        if (items or security) and not failed:
            self._report(None)
        return []

    def _summary(self, final: bool) -> Optional[str]:
        """A record of what the security budget held back, once a second at most (the caller holds the lock)."""
        now = time.monotonic()
        if not self._budget.suppressed or (now - self._summarized < REPORT_INTERVAL and not final):
            return None
        self._summarized = now
        counts = self._budget.take_suppressed()
        return _compact_json({"ts": _log_stamp(), "event": "security_suppressed", "records": sum(counts.values()),
                              "by_kind": counts})

    def _report(self, problem: Optional[str]) -> None:
        """Set ``problem``; a new one is printed to stderr once (the log itself cannot hold it)."""
        if problem != self.problem and problem is not None:
            print(f"ua-gateway: warning: {problem}", file=sys.stderr, flush=True)
        self.problem = problem


# (kind "append", "turn", "heartbeat" or "mark", session id, file name or turn id, payload)
_WriteItem = Tuple[str, str, Optional[str], Any]


class SessionWriter(BatchWriter[_WriteItem]):
    """Writes journals, run logs and heartbeats on one thread, in the order they were asked for.

    All writes go through ``OpsService.append_log``/``write_heartbeat``, which take the session's lock
    and open the file per call: a reset or compact between two writes sends the next one to the new
    live file, and nothing is written into an archive. ``append`` and ``heartbeat`` are called on the
    event loop; what they collect within SESSION_WRITE_DELAY reaches the thread as one batch, so a
    burst of events and turns costs one hand-off, one write per file and one heartbeat per session.

    The thread never waits for a session's lock: a session that is busy (a long compaction or reset
    holds its lock) keeps its items, in order, for the next pass, retried every BUSY_RETRY seconds,
    so one slow session cannot stall the journals and heartbeats of all others. ``dropped`` counts
    writes that failed (journal, run.log or heartbeat lost to a failing disk); a live log moved aside
    for a second hard link is logged as ``log_relinked``.
    """

    # s: how soon the items of a busy session are tried again; short, so that its lines reach disk
    # right after the lock is free, yet a try is one non-blocking acquire, so retrying costs nothing.
    BUSY_RETRY = 0.02
    close_timeout = 5.0

    def __init__(self, ops: OpsService, log: Optional[GatewayLog]) -> None:
        self.ops = ops
        self.log = log
        # Bytes handed to append() (counted on the event loop) and done with by the thread (written or
        # dropped): each counter has one writer, so their difference is the backlog without a lock.
        self.queued_bytes = 0
        self.done_bytes = 0
        self._collected: List[_WriteItem] = []  # event loop only, until hand_over
        # Called on the writer thread with (session id, file name, bytes) right after each append, the
        # session's lock still held: live followers get the gateway's own lines without reading them back.
        self.appended: Optional[Callable[[str, str, bytes], None]] = None
        super().__init__("ua-session-writer")

    def append(self, session_id: str, file_name: str, data: bytes) -> None:
        self.queued_bytes += len(data)
        self._add(("append", session_id, file_name, data))

    @property
    def backlog_bytes(self) -> int:
        return self.queued_bytes - self.done_bytes

    async def wait_for_room(self) -> None:
        """Return once the backlog is under MAX_WRITER_BACKLOG (event loop only)."""
        while self.backlog_bytes > MAX_WRITER_BACKLOG:
            await asyncio.sleep(WRITER_BACKLOG_POLL)

    def heartbeat(self, session_id: str, state: Dict[str, Any]) -> None:
        self._add(("heartbeat", session_id, None, state))

    def append_turn(self, session_id: str, turn_id: str, data: bytes) -> None:
        """Append records to the session's ``turns/<turn_id>.jsonl`` (``OpsService.append_turn_record``)."""
        self.queued_bytes += len(data)
        self._add(("turn", session_id, turn_id, data))

    def flushed(self, session_id: str) -> "asyncio.Future[None]":
        """A future done once everything asked for this session before now is written (or dropped), so a
        reader of its files that awaits it sees all of it (event loop only)."""
        loop = asyncio.get_running_loop()
        done: "asyncio.Future[None]" = loop.create_future()

        def resolve() -> None:  # on the writer thread
            def settle() -> None:
                if not done.done():
                    done.set_result(None)
            try:
                loop.call_soon_threadsafe(settle)
            except RuntimeError:
                pass  # the loop is closed: nobody waits any more

        self._add(("mark", session_id, None, resolve))
        self.hand_over()
        return done

    def _add(self, item: _WriteItem) -> None:
        if not self._collected:
            asyncio.get_running_loop().call_later(SESSION_WRITE_DELAY, self.hand_over)
        self._collected.append(item)

    def hand_over(self) -> None:
        """Pass what this loop iteration collected to the writer thread (event loop only)."""
        if self._collected:
            batch, self._collected = self._collected, []
            self._hand_over(batch)

    def _wait_time(self, keeping: bool) -> Optional[float]:
        # Kept items are those of sessions that were busy at the last pass: they go before anything
        # newer of the same session (BatchWriter puts them first), so no file's lines are reordered.
        return self.BUSY_RETRY if keeping else None

    def _write(self, items: List[_WriteItem], final: bool) -> List[_WriteItem]:
        # At close, wait for busy sessions: what was handed over is written, not left behind.
        return self._write_batch(items, wait=final) if items else []

    def _write_batch(self, batch: List[_WriteItem], wait: bool) -> List[_WriteItem]:
        """Write the batch; returns the items of the sessions whose lock was busy (unless ``wait``)."""
        # One write per file and one heartbeat per session for the whole batch: order matters only
        # within a file, and a heartbeat is a state of which the latest is the one to keep. When writing
        # falls behind (200 busy sessions, a slow disk), the whole backlog folds into one such batch.
        appends: Dict[Tuple[str, str], List[bytes]] = {}
        turns: Dict[Tuple[str, str], List[bytes]] = {}
        heartbeats: Dict[str, Any] = {}
        marks: Dict[str, List[Callable[[], None]]] = {}
        for kind, session_id, file_name, payload in batch:
            if kind == "append":
                appends.setdefault((session_id, file_name or ""), []).append(payload)
            elif kind == "turn":
                turns.setdefault((session_id, file_name or ""), []).append(payload)
            elif kind == "mark":
                marks.setdefault(session_id, []).append(payload)
            else:
                heartbeats[session_id] = payload
        actions: Dict[str, List[Tuple[Optional[str], int, Callable[[], Any]]]] = {}  # (file, bytes, action)
        written: Dict[Tuple[str, str], bytes] = {}
        for (session_id, file_name), chunks in appends.items():
            data = written[(session_id, file_name)] = b"".join(chunks)
            actions.setdefault(session_id, []).append(
                (file_name, len(data), functools.partial(self.ops.append_log, session_id, file_name, data)))
        for (session_id, turn_id), chunks in turns.items():
            record = b"".join(chunks)
            actions.setdefault(session_id, []).append(
                (f"turns/{turn_id}.jsonl", len(record),
                 functools.partial(self.ops.append_turn_record, session_id, turn_id, record)))
        for session_id, state in heartbeats.items():
            actions.setdefault(session_id, []).append(
                (None, 0, functools.partial(self.ops.write_heartbeat, session_id, state)))
        for session_id, resolvers in marks.items():  # last: after every write of the session in this batch
            actions.setdefault(session_id, []).extend((None, 0, resolve) for resolve in resolvers)
        busy = set()
        for session_id, session_actions in actions.items():
            # The same re-entrant lock append_log and write_heartbeat take: holding it across the
            # session's writes makes their own acquire immediate.
            lock = self.ops.session_lock(session_id)
            if not lock.acquire(blocking=wait):
                busy.add(session_id)
                continue
            try:
                for file_name, size, action in session_actions:
                    if not self._run_action(session_id, file_name, action):
                        continue
                    self.bytes_written += size
                    chunk = written.get((session_id, file_name or ""))  # a log append (not a turn record)
                    if self.appended and chunk is not None:
                        self.appended(session_id, file_name or "", chunk)
            finally:
                lock.release()
        self.done_bytes += sum(len(item[3]) for item in batch if item[0] in ("append", "turn") and item[1] not in busy)
        return [item for item in batch if item[1] in busy]

    def _run_action(self, session_id: str, file_name: Optional[str], action: Callable[[], Any]) -> bool:
        """Run one write; True when it was written."""
        try:
            moved = action()
        except SessionNotFound:
            return False  # deleted while its turn was ending: nothing to keep
        except (OpsError, OSError) as exc:
            self._count_dropped(1)
            if self.log is not None:
                self.log.write("write_failed", session_id=session_id, file=file_name or "heartbeat_state.json",
                               detail=str(exc)[:300])
            return False
        if moved and self.log is not None:  # append_log moved a hard-linked live log aside (see there)
            self.log.write("log_relinked", session_id=session_id, file=file_name, moved_to=moved)
        return True

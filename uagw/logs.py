"""The gateway's writer threads: ``GatewayLog`` (JSON lines under <root>/_gateway/) and ``SessionWriter``
(journals, run logs and heartbeats through OpsService). Each writes on one thread, so the event loop never
waits for a disk.

May import: the standard library, ``ops_service``, ``uagw.limits`` and ``uagw.text``.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import os
import queue
import stat
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import ops_service
from ops_service import OpsError, OpsService, SessionNotFound

from .limits import (
    GATEWAY_LOG_BACKUPS, GATEWAY_LOG_FIELD_CHARS, GATEWAY_LOG_INTERVAL, GATEWAY_LOG_MAX_PENDING,
    GATEWAY_LOG_ROTATE_BYTES, MAX_WRITER_BACKLOG, REPORT_INTERVAL, SECURITY_LOG_BURST, SECURITY_LOG_RATE,
    SESSION_WRITE_DELAY, WRITER_BACKLOG_POLL,
)
from .text import PerSecond

__all__ = [
    "GatewayLog",
    "SECURITY_EVENTS",
    "SECURITY_STATUSES",
    "SessionWriter",
    "log_field",
]


_log_second = PerSecond(lambda second: datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"))


def _log_stamp() -> str:
    """UTC time with milliseconds, as in 2026-11-26T10:00:00.123+00:00."""
    now = time.time()
    second = int(now)
    return f"{_log_second(second)}.{int((now - second) * 1000):03d}+00:00"


SECURITY_EVENTS = frozenset({"auth_failure", "connection_limit"})  # records also kept in security.log ...
SECURITY_STATUSES = frozenset({403, 421, 429})  # ... and so are the access records of these refusals
_LOG_FIELD_SHORT = GATEWAY_LOG_FIELD_CHARS // 12  # no string this short escapes past the cap (an emoji takes 12)
_json_string = json.encoder.encode_basestring_ascii  # the C escaper json.dumps uses


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


class GatewayLog:
    """Append-only JSON-lines logs of access and events. ``write`` is cheap and thread-safe.

    Records are collected in memory and written by one thread every GATEWAY_LOG_INTERVAL: waking a
    thread per request would make the event loop queue for the GIL after every socket call.
    Records never contain a token: callers pass only the fields listed in each call, never headers.

    Every record goes to gateway.log, each field capped by ``log_field``, so a record is bounded whatever
    a client sends. Security records (SECURITY_EVENTS, refusals with SECURITY_STATUSES) also go to
    security.log within a ``_SecurityBudget``, with a ``security_suppressed`` record a second at most
    counting what the budget held back: a request flood rotates gateway.log, not the auth failures.
    Each file rotates past ``rotate_bytes`` and keeps GATEWAY_LOG_BACKUPS older files. ``dropped``
    counts records lost to a full queue or a failed write (health shows it).
    """

    def __init__(self, directory: Path, rotate_bytes: int = GATEWAY_LOG_ROTATE_BYTES) -> None:
        self.path = directory / ops_service.GATEWAY_LOG_NAME
        self.security_path = directory / ops_service.SECURITY_LOG_NAME
        self.rotate_bytes = rotate_bytes
        self.dropped = 0
        self.problem: Optional[str] = None  # why records are being dropped, while they are (health shows it)
        self._pending: List[str] = []
        self._security: List[str] = []
        self._budget = _SecurityBudget()
        self._summarized = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ua-gateway-log", daemon=True)
        self._thread.start()

    def write(self, event: str, **fields: Any) -> None:
        for name, value in fields.items():
            if not (value is None or isinstance(value, (int, float)) or (isinstance(value, str) and len(value) <= _LOG_FIELD_SHORT)):
                fields[name] = log_field(value)
        # Formatted now: a string is not tracked by the garbage collector, while dicts held here for
        # 100 ms at 20k requests/s would survive into old generations and cost full collections.
        line = json.dumps({"ts": _log_stamp(), "event": event, **fields}, separators=(",", ":"))
        kind = _security_kind(event, fields)
        with self._lock:
            if len(self._pending) < GATEWAY_LOG_MAX_PENDING:
                self._pending.append(line)
            else:
                self.dropped += 1
            if kind is not None and self._budget.admit(kind, fields.get("client")):
                self._security.append(line)

    def close(self, timeout: float = 2.0) -> None:
        """Write what is pending and stop the thread."""
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(GATEWAY_LOG_INTERVAL)
            with self._lock:
                batch, self._pending = self._pending, []
                security, self._security = self._security, []
                summary = self._summary(final=stopping)
            if summary:
                security.append(summary)
            if batch or security:
                self._write_batches([(self.path.name, batch), (self.security_path.name, security)])
            if stopping:
                return

    def _summary(self, final: bool) -> Optional[str]:
        """A record of what the security budget held back, once a second at most (the caller holds the lock)."""
        now = time.monotonic()
        if not self._budget.suppressed or (now - self._summarized < REPORT_INTERVAL and not final):
            return None
        self._summarized = now
        counts = self._budget.take_suppressed()
        return json.dumps({"ts": _log_stamp(), "event": "security_suppressed", "records": sum(counts.values()),
                           "by_kind": counts}, separators=(",", ":"))

    def _write_batches(self, batches: List[Tuple[str, List[str]]]) -> None:
        """Append each (file name, records) to its file in the log directory, opened for this tick.

        The directory is opened from a descriptor of the root with O_NOFOLLOW, and the files relative to
        it, on every tick: ``<root>/_gateway`` swapped for a symlink (anyone who can write the root can)
        is never followed, so the log never lands outside the root, and rotation never renames files
        there. Its records are dropped and ``problem`` says why, until the directory is ours again.
        """
        try:
            dir_fd = self._open_directory()
        except OSError as exc:
            self._drop(batches, exc)
            return
        try:
            failed = False
            for name, batch in batches:
                if batch:
                    try:
                        self._append(dir_fd, name, batch)
                    except OSError as exc:  # this file's records only: the other file may still be fine
                        self._drop([(name, batch)], exc)
                        failed = True
            if not failed:
                self._report(None)
        finally:
            os.close(dir_fd)

    def _open_directory(self) -> int:
        """A descriptor of our log directory, created if missing, but never the workspaces root: a missing
        root is the operator's to fix, and health reports it. Raises OSError (ELOOP, ENOTDIR: not ours)."""
        directory = self.path.parent
        try:
            root_fd = os.open(directory.parent, os.O_RDONLY | _O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:  # the root's problem, not the log directory's: health reports it as such
            raise FileNotFoundError(errno.ENOENT, f"workspaces root: {exc.strerror or exc}") from None
        try:
            try:
                return os.open(directory.name, _LOG_DIR_FLAGS, dir_fd=root_fd)
            except FileNotFoundError:
                try:
                    os.mkdir(directory.name, 0o750, dir_fd=root_fd)
                except FileExistsError:
                    pass
                return os.open(directory.name, _LOG_DIR_FLAGS, dir_fd=root_fd)
        finally:
            os.close(root_fd)

    def _append(self, dir_fd: int, name: str, batch: List[str]) -> None:
        data = ("\n".join(batch) + "\n").encode()
        # O_NONBLOCK: a FIFO planted as the log must not block this thread; only a regular file of one
        # link is written (a second link may be a name outside the root).
        fd = os.open(name, _LOG_FILE_FLAGS, 0o640, dir_fd=dir_fd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise OSError(errno.EPERM, f"{name} is not a regular file of one link; it is left alone")
            os.write(fd, data)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size > self.rotate_bytes:
            _rotate(dir_fd, name, GATEWAY_LOG_BACKUPS)

    def _drop(self, batches: List[Tuple[str, List[str]]], error: OSError) -> None:
        with self._lock:
            self.dropped += sum(len(batch) for _, batch in batches)
        if error.errno in (errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.EPERM):
            self._report(f"the gateway log directory {self.path.parent} (or a log in it) is a symlink or not a "
                         f"regular directory or file ({error.strerror or error}); its records are dropped, never "
                         "written through it: remove it, and the gateway creates its own")

    def _report(self, problem: Optional[str]) -> None:
        """Set ``problem``; a new one is printed to stderr once (the log itself cannot hold it)."""
        if problem != self.problem and problem is not None:
            print(f"ua-gateway: warning: {problem}", file=sys.stderr, flush=True)
        self.problem = problem


# _gateway and its logs are opened without following a symlink (see GatewayLog._write_batches).
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_LOG_DIR_FLAGS = os.O_RDONLY | _O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_LOG_FILE_FLAGS = (os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
                   | getattr(os, "O_NOCTTY", 0))


def _rotate(dir_fd: int, name: str, backups: int) -> None:
    """<name>.N-1 -> <name>.N, ..., <name> -> <name>.1 inside ``dir_fd``: the oldest of ``backups`` rotated
    files is replaced. A rename replaces a symlink at the destination itself, never its target."""
    for index in range(backups - 1, 0, -1):
        try:
            os.replace(f"{name}.{index}", f"{name}.{index + 1}", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except FileNotFoundError:
            pass
    os.replace(name, f"{name}.1", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


class SessionWriter:
    """Writes journals, run logs and heartbeats on one thread, in the order they were asked for.

    All writes go through ``OpsService.append_log``/``write_heartbeat``, which take the session's lock
    and open the file per call: a reset or compact between two writes sends the next one to the new
    live file, and nothing is written into an archive. ``append`` and ``heartbeat`` are called on the
    event loop; what they collect within SESSION_WRITE_DELAY reaches the thread as one batch, so a
    burst of events and turns costs one hand-off, one write per file and one heartbeat per session.

    The thread never waits for a session's lock: a session that is busy (a long compaction or reset
    holds its lock) keeps its items, in order, for the next pass, retried every BUSY_RETRY seconds,
    so one slow session cannot stall the journals and heartbeats of all others.
    """

    # s: how soon the items of a busy session are tried again; short, so that its lines reach disk
    # right after the lock is free, yet a try is one non-blocking acquire, so retrying costs nothing.
    BUSY_RETRY = 0.02

    def __init__(self, ops: OpsService, log: Optional[GatewayLog]) -> None:
        self.ops = ops
        self.log = log
        self.dropped = 0
        # Bytes handed to append() (counted on the event loop) and done with by the thread (written or
        # dropped): each counter has one writer, so their difference is the backlog without a lock.
        self.queued_bytes = 0
        self.done_bytes = 0
        self._pending: List[Tuple[str, str, Optional[str], Any]] = []
        self._queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="ua-session-writer", daemon=True)
        self._thread.start()

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

    def _add(self, item: Tuple[str, str, Optional[str], Any]) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_later(SESSION_WRITE_DELAY, self.hand_over)
        self._pending.append(item)

    def hand_over(self) -> None:
        """Pass what this loop iteration collected to the writer thread (event loop only)."""
        if self._pending:
            batch, self._pending = self._pending, []
            self._queue.put(batch)

    def close(self, timeout: float = 5.0) -> None:
        """Write everything handed over so far, then stop the thread (any thread)."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        # Items of sessions that were busy at the last pass, oldest first: they go before anything
        # newer of the same session, so no file's lines are reordered.
        deferred: List[Tuple[str, str, Optional[str], Any]] = []
        while True:
            try:
                batch = self._queue.get(timeout=self.BUSY_RETRY) if deferred else self._queue.get()
            except queue.Empty:
                batch = []
            stop = batch is None
            batch = deferred + (batch or [])
            # Take the whole backlog at once: when writing falls behind (200 busy sessions, a slow
            # disk), it folds into one write per file and one heartbeat per session.
            while not stop:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                else:
                    batch.extend(more)
            # At close, wait for busy sessions: what was handed over is written, not left behind.
            deferred = self._write(batch, wait=stop) if batch else []
            if stop:
                return

    def _write(self, batch: List[Tuple[str, str, Optional[str], Any]], wait: bool = False
               ) -> List[Tuple[str, str, Optional[str], Any]]:
        """Write the batch; returns the items of the sessions whose lock was busy (unless ``wait``)."""
        # One write per file and one heartbeat per session for the whole batch: order matters only
        # within a file, and a heartbeat is a state of which the latest is the one to keep.
        appends: Dict[Tuple[str, str], List[bytes]] = {}
        heartbeats: Dict[str, Any] = {}
        for kind, session_id, file_name, payload in batch:
            if kind == "append":
                appends.setdefault((session_id, file_name or ""), []).append(payload)
            else:
                heartbeats[session_id] = payload
        actions: Dict[str, List[Tuple[Optional[str], Callable[[], Any]]]] = {}
        for (session_id, file_name), chunks in appends.items():
            actions.setdefault(session_id, []).append(
                (file_name, functools.partial(self.ops.append_log, session_id, file_name, b"".join(chunks))))
        for session_id, state in heartbeats.items():
            actions.setdefault(session_id, []).append(
                (None, functools.partial(self.ops.write_heartbeat, session_id, state)))
        busy = set()
        for session_id, session_actions in actions.items():
            # The same re-entrant lock append_log and write_heartbeat take: holding it across the
            # session's writes makes their own acquire immediate.
            lock = self.ops.session_lock(session_id)
            if not lock.acquire(blocking=wait):
                busy.add(session_id)
                continue
            try:
                for file_name, action in session_actions:
                    self._run_action(session_id, file_name, action)
            finally:
                lock.release()
        self.done_bytes += sum(len(item[3]) for item in batch if item[0] == "append" and item[1] not in busy)
        return [item for item in batch if item[1] in busy]

    def _run_action(self, session_id: str, file_name: Optional[str], action: Callable[[], Any]) -> None:
        try:
            action()
        except SessionNotFound:
            pass  # deleted while its turn was ending: nothing to keep
        except (OpsError, OSError) as exc:
            self.dropped += 1
            if self.log is not None:
                self.log.write("write_failed", session_id=session_id, file=file_name or "heartbeat_state.json",
                               detail=str(exc)[:300])

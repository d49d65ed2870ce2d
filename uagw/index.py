"""The session index: every session's list summary in memory, so that a list answer costs the page it
returns, not the number of sessions on disk (issue 15; PROTOCOL.md §17).

Rules this module keeps:
- Summaries are computed by ``OpsService.listed_session`` only (the file-system logic stays there); the
  index stores them, orders them and overlays what is live (status, connections, running turns) from the
  runtime at answer time, so an answer equals ``OpsService.list_sessions``' for the same files.
- Nothing here runs disk work on the event loop: the first scan, rescans, change notifications and
  re-reads run in threads; the loop only subscribes to ``Changes`` and schedules re-reads.
- Every re-read of a session holds ``OpsService.session_lock``: a re-read that starts after a gateway
  change sees it, and two re-reads of one session apply in the order they read.

Theory of operation. ``start`` lists the root and reads each session in a thread; until that first scan
is done, answers are built from what it has read so far and say ``"partial": true`` (with ``scanned`` and
``found``) rather than make the caller wait. What the gateway changes is re-read at once: the observer
marks the session pending and list answers wait for pending re-reads (microseconds to milliseconds), so
a client sees its own change in the next list. What other writers change is seen through inotify (Linux,
through ctypes) within INDEX_SETTLE, with a rescan every INDEX_SAFETY_RESCAN as a net; where inotify is
missing or out of watches, a rescan every INDEX_RESCAN_INTERVAL, cheap for an unchanged session (a stat of
its directory and of the few files its summary read, compared with what they were).

May import: the standard library, ``ops_service``, ``uagw.limits`` and ``uagw.changes``.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import ctypes
import ctypes.util
import errno
import os
import select
import struct
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Set, Tuple

from ops_service import (
    LIST_DEFAULT_LIMIT, InvalidArgument, ListQuery, ListedSession, OpsError, OpsService, Runtime, is_valid_session_id,
    list_query,
)

from .changes import ChangeKind, Changes
from .limits import (
    INDEX_RACY_NS, INDEX_RESCAN_CPU_SHARE, INDEX_RESCAN_INTERVAL, INDEX_SAFETY_RESCAN, INDEX_SCAN_BATCH, INDEX_SETTLE, INDEX_TURN_DELAY, INDEX_ACTIVITY_INTERVAL,
)

__all__ = ["SessionIndex", "Inotify"]

# Fields of a summary that depend on the runtime or on the root: filled in at answer time.
_LIVE_FIELDS = ("status", "active_connections", "active_runs", "running", "last_event_seq")
# Field-name and entry-name tuples many entries share (few distinct ones: subsets of SUMMARY_NAMES).
_shared_tuples: Dict[Tuple[str, ...], Tuple[str, ...]] = {}


def _share(value: Any) -> Any:
    """One copy of a short string many summaries hold (source, channel, owner, a day's timestamp): interned
    strings are freed once no summary holds them, so this grows with nothing."""
    if isinstance(value, str) and len(value) <= 64:
        return sys.intern(value)
    return value


def _share_tuple(value: Tuple[str, ...]) -> Tuple[str, ...]:
    return _shared_tuples.setdefault(value, value)


Signature = Tuple[int, ...]


class _Entry:
    """One session as the index holds it: immutable once built (replaced, never changed in place), so an
    answer may read it outside the lock."""

    __slots__ = ("key", "fields", "values", "archived", "read_at", "names", "signature")

    def __init__(self, session_id: str, listed: ListedSession, read_at: float, signature: Optional[Signature]) -> None:
        summary = listed.summary
        self.key = (-listed.activity_ns, session_id)  # the listing's order: newest activity first, then by id
        self.fields: Tuple[str, ...] = _share_tuple(tuple(summary))
        # workspace_dir is rebuilt from the root (it is most of a summary's bytes); live fields at answer time.
        self.values = tuple(None if name == "workspace_dir" else _share(value) for name, value in summary.items())
        self.archived = summary.get("status") == "archived"
        self.read_at = read_at  # wall clock of the read: checkpoint_age_seconds grows from there
        self.names: Tuple[str, ...] = _share_tuple(listed.entries)
        self.signature = signature

    def field(self, name: str) -> Any:
        return self.values[self.fields.index(name)]


def _runtime_of(runtime: Optional[Runtime], session_id: str) -> Tuple[int, bool, int]:
    """(connections, running, last_event_seq) as OpsService reads a runtime entry (malformed: none)."""
    if not runtime:
        return 0, False, 0
    try:
        entry = tuple(runtime.get(session_id, (0, False)))
        connections, running = max(0, int(entry[0])), bool(entry[1])
    except (TypeError, ValueError, IndexError):
        return 0, False, 0
    try:
        seq = max(0, int(entry[2])) if len(entry) > 2 else 0
    except (TypeError, ValueError):
        seq = 0
    return connections, running, seq


def _status(entry: _Entry, connections: int, running: bool) -> str:
    # UA HEAD's order, as OpsService's: a running turn, then a connection, then what the files say.
    if running:
        return "running"
    if connections > 0:
        return "active"
    return "archived" if entry.archived else "idle"


# --------------------------------------------------------------------------------------------------------
# inotify through ctypes (Linux); absent elsewhere, where the rescan alone keeps the bound
# --------------------------------------------------------------------------------------------------------

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF = 0x400, 0x800
IN_Q_OVERFLOW, IN_IGNORED, IN_ISDIR = 0x4000, 0x8000, 0x40000000
IN_ONLYDIR, IN_DONT_FOLLOW, IN_EXCL_UNLINK = 0x01000000, 0x02000000, 0x04000000
_IN_NONBLOCK_CLOEXEC = 0o4000 | 0o2000000
# A session directory: anything that changes a file a summary reads, or which files exist.
SESSION_MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
                | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW | IN_EXCL_UNLINK)
# The root: sessions appearing and going.
ROOT_MASK = IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_ONLYDIR | IN_EXCL_UNLINK
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then len bytes of name)
INOTIFY_READ = 256 * 1024  # bytes read per call: thousands of events, one syscall


class Inotify:
    """A Linux inotify descriptor. ``Inotify.open()`` is None where the kernel or libc lacks it."""

    def __init__(self, fd: int, libc: Any) -> None:
        self.fd = fd
        self._libc = libc

    @classmethod
    def open(cls) -> Optional["Inotify"]:
        if not sys.platform.startswith("linux"):
            return None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            init = libc.inotify_init1
        except (OSError, AttributeError):
            return None
        fd = init(_IN_NONBLOCK_CLOEXEC)
        return cls(fd, libc) if fd >= 0 else None

    def add_watch(self, path: str, mask: int) -> int:
        """The watch descriptor; raises OSError (ENOSPC: out of watches, ENOENT: gone, ...)."""
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), ctypes.c_uint32(mask))
        if wd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), path)
        return int(wd)

    def remove_watch(self, wd: int) -> None:
        self._libc.inotify_rm_watch(self.fd, wd)

    def read_events(self) -> List[Tuple[int, int, str]]:
        """[(wd, mask, name)] of what is queued now; [] when nothing is."""
        try:
            data = os.read(self.fd, INOTIFY_READ)
        except OSError:  # nothing queued (EAGAIN), or closed by a fall-back to rescans meanwhile
            return []
        events, offset = [], 0
        while offset + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            offset += _EVENT.size
            name = os.fsdecode(data[offset:offset + length].rstrip(b"\0"))
            offset += length
            events.append((wd, mask, name))
        return events

    def close(self) -> None:
        os.close(self.fd)


# --------------------------------------------------------------------------------------------------------
# The index
# --------------------------------------------------------------------------------------------------------


class SessionIndex:
    """Summaries of every session under ``ops.root``, kept current; thread-safe.

    ``start(loop, executor, changes)`` on the event loop starts the threads; ``close()`` stops them.
    ``list_sessions(...)`` (any thread) answers as ``OpsService.list_sessions`` does, plus ``partial``.
    ``rescan_interval`` and ``scan_pause`` are Config's ``index_rescan_interval`` and ``index_scan_pause``;
    ``use_inotify=False`` keeps to rescans (for comparison and tests).
    """

    def __init__(self, ops: OpsService, *, rescan_interval: float = INDEX_RESCAN_INTERVAL,
                 scan_pause: float = 0.0, use_inotify: bool = True) -> None:
        self.ops = ops
        self.rescan_interval = rescan_interval
        self.scan_pause = scan_pause
        self.use_inotify = use_inotify
        self._lock = threading.Lock()
        self._entries: Dict[str, _Entry] = {}
        self._order: Optional[List[Tuple[int, str]]] = None  # sorted keys; None until the first scan is done
        self.scanned = 0  # sessions the first scan has read ...
        self.found = 0  # ... of those it found in the root
        self.complete = threading.Event()  # the first scan is done
        self.rescans = 0  # full rescans done, and the last one's CPU time: the bound's cost, for health and bench
        self.last_rescan_cpu = 0.0
        self._stop = threading.Event()
        self._wake = threading.Event()  # an inotify overflow asks for a rescan now
        self._inotify: Optional[Inotify] = None
        self._applying = threading.Lock()  # reading inotify events and applying them is one step
        self._deferred: Set[str] = set()  # sessions whose re-read waits (a gateway operation, or a busy session)
        self._read_at: Dict[str, float] = {}  # monotonic time of each session's last background re-read
        self._turn_waits: Set[str] = set()  # sessions with a re-read due INDEX_TURN_DELAY after a turn (no inotify)
        self._watches: Dict[int, str] = {}  # wd -> session id ("" for the root)
        self._root_id: Optional[Tuple[int, int]] = None  # (st_dev, st_ino) of the root directory the watches are on
        self._threads: List[threading.Thread] = []
        self._pending: Dict[str, "asyncio.Future[Any]"] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._executor: Optional[concurrent.futures.Executor] = None
        self._unsubscribe: Any = None

    @property
    def notifying(self) -> bool:
        """Whether inotify reports outside changes (else the rescan alone does)."""
        return self._inotify is not None

    # -- lifecycle ----------------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop, executor: concurrent.futures.Executor, changes: Changes) -> None:
        """Subscribe to the gateway's changes and start the first scan; returns at once (health is not delayed)."""
        self._loop, self._executor = loop, executor
        self._unsubscribe = changes.subscribe(self._on_change)
        inotify = Inotify.open() if self.use_inotify else None
        self._inotify = inotify
        self._root_id = self._root_identity()
        if inotify is not None and not self._add_watch("", str(self.ops.root), ROOT_MASK):
            self._inotify = None  # no root watch (missing root, no watches left): rescans only
            inotify.close()
        self._spawn(self._scan_loop, "ua-index-scan")
        if self._inotify is not None:
            self._spawn(self._notify_loop, "ua-index-notify")

    def _spawn(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def close(self) -> None:
        """Stop the threads (each within a second) and the subscription."""
        if self._unsubscribe is not None:
            self._unsubscribe()
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=2.0)
        inotify, self._inotify = self._inotify, None
        if inotify is not None:
            inotify.close()

    # -- answers ------------------------------------------------------------------------------------------

    async def settle(self) -> None:
        """Wait for the re-reads of gateway changes already announced: a list after a change shows it."""
        pending = [future for future in self._pending.values() if not future.done()]
        if pending:
            await asyncio.wait(pending)

    def list_sessions(self, status: Optional[str] = "all", limit: Optional[int] = LIST_DEFAULT_LIMIT, offset: Optional[int] = 0,
                      runtime: Optional[Runtime] = None, source: Optional[str] = None, owner: Optional[str] = None,
                      memory_mode: Optional[str] = None, sort: Optional[str] = None) -> Dict[str, Any]:
        """``OpsService.list_sessions``' answer from memory, with ``partial`` (and, while partial, ``scanned``
        and ``found``). Same arguments, same errors (InvalidArgument, WorkspacesUnavailable); ``sort`` other
        than "disk_bytes" is the default order, and "disk_bytes" is refused: it measures the disk per call,
        so ask ``OpsService.list_sessions`` (the application does)."""
        query = list_query(status, limit, offset, runtime, source, owner, memory_mode, sort)
        if query.sort == "disk_bytes":
            raise InvalidArgument("the session index does not order by disk_bytes; list through OpsService for that")
        self.ops.check_root()  # a root gone answers as the direct listing does, not with stale summaries
        self.catch_up()
        partial = not self.complete.is_set()
        with self._lock:
            order = self._order if self._order is not None else sorted(e.key for e in self._entries.values())
            entries = self._entries
            if len(query.filters) == 1 and query.status == "all":
                total = len(order)
                page = [entries[key[1]] for key in order[query.offset:query.offset + query.limit]]
            else:
                matched = [entries[key[1]] for key in order if self._matches(entries[key[1]], query, runtime)]
                total = len(matched)
                page = matched[query.offset:query.offset + query.limit]
            scanned, found = self.scanned, self.found
        answer: Dict[str, Any] = {
            "sessions": [self._summary(entry, runtime) for entry in page],
            "total": total, "limit": query.limit, "offset": query.offset, "partial": partial,
        }
        if partial:
            answer.update(scanned=scanned, found=max(found, scanned))
        return answer

    def count_by_status(self, runtime: Optional[Runtime] = None) -> Dict[str, int]:
        """{status: sessions} over every session in one pass (metrics ask every few seconds: four filtered
        lists were four passes over 100,000 entries). Statuses as in a summary: running, active, idle, archived."""
        self.catch_up()  # what other writers changed is counted, as a list would show it (a worker thread)
        counts: Dict[str, int] = {}
        with self._lock:
            entries = list(self._entries.values())
        for entry in entries:
            connections, running, _seq = _runtime_of(runtime, entry.key[1])
            status = _status(entry, connections, running)
            counts[status] = counts.get(status, 0) + 1
        return counts

    @staticmethod
    def _matches(entry: _Entry, query: ListQuery, runtime: Optional[Runtime]) -> bool:
        """OpsService's list filters: status (``active`` takes ``running`` too), then source, owner, memory_mode
        case-insensitively."""
        if query.status != "all":
            connections, running, _seq = _runtime_of(runtime, entry.key[1])
            actual = _status(entry, connections, running)
            if not (actual == query.status or (query.status == "active" and actual == "running")):
                return False
        for name in ("source", "owner", "memory_mode"):
            wanted = query.filters.get(name)
            if wanted and entry.field(name).lower() != wanted.strip().lower():
                return False
        return True

    def _summary(self, entry: _Entry, runtime: Optional[Runtime]) -> Dict[str, Any]:
        session_id = entry.key[1]
        summary = dict(zip(entry.fields, entry.values))
        summary["workspace_dir"] = str(self.ops.root / session_id)
        connections, running, seq = _runtime_of(runtime, session_id)
        summary.update(status=_status(entry, connections, running), active_connections=connections,
                       active_runs=1 if running else 0, running=running, last_event_seq=seq)
        age = summary.get("checkpoint_age_seconds")
        if isinstance(age, float):
            summary["checkpoint_age_seconds"] = age + (time.time() - entry.read_at)
        return summary

    # -- re-reads -----------------------------------------------------------------------------------------

    def refresh(self, session_id: str, root_fd: Optional[int] = None, wait: bool = True) -> bool:
        """Re-read one session now (any thread but the loop's): added, replaced or removed in the index.
        With ``wait=False``, False (and nothing done) while a gateway operation holds the session's lock."""
        if not is_valid_session_id(session_id):
            return True
        try:
            lock = self.ops.session_lock(session_id)
        except OpsError:
            return True
        if not lock.acquire(blocking=wait):
            return False
        try:
            try:
                listed = self.ops.listed_session(session_id)
            except OpsError:
                return True  # the root is unavailable: keep what we have; lists answer its error meanwhile
            entry = None
            if listed is not None:
                # Stat'ed after the read: a change during the read (well under INDEX_RACY_NS) makes it racy,
                # so the signature is None and the next rescan reads the session again.
                entry = _Entry(session_id, listed, time.time(), self._signature(session_id, listed.entries, root_fd))
            self._put(session_id, entry)
            return True
        finally:
            lock.release()

    def _put(self, session_id: str, entry: Optional[_Entry]) -> None:
        with self._lock:
            old = self._entries.pop(session_id, None)
            order = self._order
            if order is not None and old is not None:
                index = bisect.bisect_left(order, old.key)
                if index < len(order) and order[index] == old.key:
                    del order[index]
            if entry is not None:
                self._entries[session_id] = entry
                if order is not None:
                    bisect.insort(order, entry.key)
            else:
                self._read_at.pop(session_id, None)

    def _signature(self, session_id: str, names: Tuple[str, ...], root_fd: Optional[int]) -> Optional[Signature]:
        """What tells a change of a session without reading it: the (inode, mtime, size) of its directory and
        of the files its summary read (zeros for one missing). None when one changed within INDEX_RACY_NS: a
        second change within the mtime's grain would not move it (git's racy rule)."""
        base = session_id if root_fd is not None else os.path.join(str(self.ops.root), session_id)
        parts: List[int] = []
        racy_since = time.time_ns() - INDEX_RACY_NS
        for name in ("",) + names:
            try:
                st = os.stat(os.path.join(base, name) if name else base, dir_fd=root_fd, follow_symlinks=False)
            except (OSError, ValueError):
                parts.extend((0, 0, 0))
                continue
            if st.st_mtime_ns > racy_since or st.st_ctime_ns > racy_since:
                return None
            parts.extend((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(parts)

    # -- gateway changes (on the loop) --------------------------------------------------------------------

    def _on_change(self, kind: ChangeKind, session_id: str, fields: Dict[str, Any]) -> None:
        loop = self._loop
        if loop is None or kind is ChangeKind.CONNECTIONS:
            return  # connections change the runtime overlay only, read at answer time
        if kind in (ChangeKind.TURN_STARTED, ChangeKind.TURN_FINISHED):
            if self._inotify is not None:
                return  # inotify sees the turn's writes; a list re-reads what they touched before answering
            if session_id in self._pending or session_id in self._turn_waits:
                return  # a re-read is coming, and it will see this turn's writes too
            # The turn's journal lines and heartbeat reach the disk through the writer thread just after.
            self._turn_waits.add(session_id)
            loop.call_later(INDEX_TURN_DELAY, self._turn_settled, session_id)
        else:
            self._schedule(session_id)

    def _turn_settled(self, session_id: str) -> None:
        self._turn_waits.discard(session_id)
        self._schedule(session_id)

    def _schedule(self, session_id: str) -> None:
        if self._loop is None or self._stop.is_set():
            return
        future = self._loop.run_in_executor(self._executor, self.refresh, session_id)
        self._pending[session_id] = future

        def done(finished: "asyncio.Future[Any]") -> None:
            if not finished.cancelled() and finished.exception() is not None:
                print(f"ua-gateway: warning: the session index could not re-read {session_id}: "
                      f"{finished.exception()!r}", file=sys.stderr, flush=True)
            if self._pending.get(session_id) is finished:
                del self._pending[session_id]

        future.add_done_callback(done)

    # -- the first scan and the rescans (a thread) --------------------------------------------------------

    def _scan_loop(self) -> None:
        try:
            self._first_scan()
        except OpsError:
            pass  # the root is unavailable: the rescans retry
        except OSError as exc:
            print(f"ua-gateway: warning: the session index's first scan failed: {exc}", file=sys.stderr, flush=True)
        finally:
            with self._lock:
                self._order = sorted(entry.key for entry in self._entries.values())
            self.complete.set()
        cycle_cpu = 0.0
        while not self._stop.is_set():
            interval = INDEX_SAFETY_RESCAN if self._inotify is not None else self.rescan_interval
            # A rescan takes at most INDEX_RESCAN_CPU_SHARE of a core: at 100,000 sessions the bound grows.
            self._wake.wait(max(interval, cycle_cpu * (1 - INDEX_RESCAN_CPU_SHARE) / INDEX_RESCAN_CPU_SHARE))
            self._wake.clear()
            if self._stop.is_set():
                return
            started = time.thread_time()
            try:
                self.rescan()
            except (OpsError, OSError):
                continue
            self.rescans += 1
            self.last_rescan_cpu = cycle_cpu = time.thread_time() - started

    def _session_names(self, root_fd: int) -> List[str]:
        names = []
        with os.scandir(root_fd) as iterator:
            for item in iterator:
                try:
                    if is_valid_session_id(item.name) and item.is_dir(follow_symlinks=False):
                        names.append(item.name)
                except OSError:
                    continue
        return names

    def _open_root(self) -> int:
        self.ops.check_root()
        return os.open(str(self.ops.root), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))

    def _first_scan(self) -> None:
        root_fd = self._open_root()
        try:
            names = self._session_names(root_fd)
            self.found = len(names)
            for number, name in enumerate(names, 1):
                if self._stop.is_set():
                    return
                self._watch_session(name)  # before the read: a change after it is reported
                if name not in self._entries:  # a gateway change may have read it already
                    self.refresh(name, root_fd)
                self.scanned = number
                if self.scan_pause and number % INDEX_SCAN_BATCH == 0 and number < len(names):
                    self._stop.wait(self.scan_pause)
        finally:
            os.close(root_fd)

    def rescan(self, rewatch: bool = False) -> None:
        """Re-read every session whose signature moved, add new ones, drop gone ones (any thread); with
        ``rewatch``, watch every session again (the root was replaced)."""
        root_fd = self._open_root()
        try:
            names = self._session_names(root_fd)
            present = set(names)
            for name in names:
                if self._stop.is_set():
                    return
                entry = self._entries.get(name)
                if rewatch:
                    self._watch_session(name)
                if entry is not None and entry.signature is not None \
                        and entry.signature == self._signature(name, entry.names, root_fd):
                    continue
                if entry is None:
                    self._watch_session(name)
                self.refresh(name, root_fd)
            for name in [name for name in list(self._entries) if name not in present]:
                self.refresh(name, root_fd)
        finally:
            os.close(root_fd)

    # -- inotify (a thread) -------------------------------------------------------------------------------

    def _add_watch(self, session_id: str, path: str, mask: int) -> bool:
        inotify = self._inotify
        if inotify is None:
            return False
        try:
            wd = inotify.add_watch(path, mask)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.ENOMEM):
                self._drop_inotify(f"out of inotify watches ({exc.strerror}; raise fs.inotify.max_user_watches)")
            return False
        with self._lock:
            self._watches[wd] = session_id
        return True

    def _watch_session(self, session_id: str) -> None:
        if self._inotify is not None:
            self._add_watch(session_id, os.path.join(str(self.ops.root), session_id), SESSION_MASK)

    def _drop_inotify(self, why: str) -> None:
        """Fall back to rescans every ``rescan_interval`` (the notify thread closes the descriptor)."""
        if self._inotify is not None:
            print(f"ua-gateway: warning: the session index rescans every {self.rescan_interval:g} s instead of "
                  f"using inotify: {why}", file=sys.stderr, flush=True)
        self._inotify = None
        self._wake.set()

    def catch_up(self, background: bool = False) -> None:
        """Apply the changes inotify has queued so far (any thread): the kernel queues an event before the
        writer's call returns, so a list answered after this shows what other processes wrote before it
        was asked. Costs one non-blocking read when nothing is queued."""
        inotify = self._inotify
        if inotify is None:
            return
        with self._applying:  # events read by the notify thread are applied before anyone answers
            if self._root_identity() != self._root_id:
                self._rewatch_root()
                return
            dirty, self._deferred = self._deferred, set()
            for wd, mask, name in inotify.read_events():
                self._on_event(wd, mask, name, dirty)
            if self._root_id is None:  # the root's watch ended (IN_IGNORED): removed, maybe made again since
                self._rewatch_root()
                return
            now = time.monotonic()
            for session_id in dirty:
                # In the background a busy session (a turn writing its journal) is re-read at most every
                # INDEX_ACTIVITY_INTERVAL; a list (background=False) re-reads every changed session first.
                if background and now - self._read_at.get(session_id, -INDEX_ACTIVITY_INTERVAL) < INDEX_ACTIVITY_INTERVAL:
                    self._deferred.add(session_id)
                # A session under a gateway operation (a compaction can take seconds) is not waited for: its
                # change is announced when the operation ends, and the notify thread retries it meanwhile.
                elif not self.refresh(session_id, wait=False):
                    self._deferred.add(session_id)
                elif background:
                    self._read_at[session_id] = now

    def _root_identity(self) -> Optional[Tuple[int, int]]:
        try:
            st = os.stat(str(self.ops.root))
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _rewatch_root(self) -> None:
        """The root is another directory now (swapped, removed and made again, a mount): every watch is on the
        old one, where nothing is a session any more. Watch the new root and each session in it, and rescan it
        now (under ``_applying``: lists wait for it, and then show the new root, never the old one's sessions)."""
        inotify = self._inotify
        if inotify is None:
            return
        with self._lock:
            old, self._watches = list(self._watches), {}
        for wd in old:
            inotify.remove_watch(wd)
        self._root_id = self._root_identity()
        if self._root_id is None or not self._add_watch("", str(self.ops.root), ROOT_MASK):
            return  # no root now: lists answer its error; the next list after it is back tries again
        self._deferred = set()
        try:
            self.rescan(rewatch=True)
        except (OpsError, OSError):
            self._root_id = None  # gone again meanwhile: retried by the next list

    def _notify_loop(self) -> None:
        inotify = self._inotify
        if inotify is None:
            return
        try:
            while not self._stop.is_set() and self._inotify is inotify:
                ready, _, _ = select.select([inotify.fd], [], [], INDEX_SETTLE if self._deferred else 0.25)
                if ready or self._deferred:
                    self._stop.wait(INDEX_SETTLE)  # a burst of writes (a turn's journal) becomes one re-read
                    self.catch_up(background=True)
        finally:
            if self._inotify is not inotify:
                inotify.close()

    def _on_event(self, wd: int, mask: int, name: str, dirty: Set[str]) -> None:
        if mask & IN_Q_OVERFLOW:
            self._wake.set()  # events were lost: a rescan finds what they said
            return
        with self._lock:
            session_id = self._watches.get(wd)
            if mask & IN_IGNORED:
                self._watches.pop(wd, None)
        if session_id is None:
            return
        if session_id == "" and mask & IN_IGNORED:
            # The root was removed: a root made again may reuse its inode number, so its identity cannot tell.
            self._root_id = None
            return
        if session_id == "":  # the root: a session appeared, went or was renamed
            if is_valid_session_id(name):
                if mask & (IN_CREATE | IN_MOVED_TO) and mask & IN_ISDIR:
                    self._watch_session(name)
                dirty.add(name)
            return
        if mask & IN_MOVE_SELF and self._inotify is not None:
            self._inotify.remove_watch(wd)  # moved away (to the trash, or elsewhere): no longer this session
            # ... unless it moved within the root: the root's IN_MOVED_TO came first and gave this same watch
            # (one per directory) the new name, so that name is watched again (ENOENT if it is gone meanwhile).
            self._watch_session(session_id)
        dirty.add(session_id)

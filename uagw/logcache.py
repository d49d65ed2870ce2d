"""Session logs kept open, so that a tail or a preview whose pages are cached is answered on the event loop.

A log read costs the gateway more in getting to the file than in reading it: the hand-over to a worker thread
and back, and two opens. ``OpenLogs`` keeps the OPEN_LOGS most recently read session logs open (the session
directory and the file) and answers a read of one of them on the event loop when nothing can block there:

- each use checks, by name, that the workspaces root is as ``OpsService.check_root`` wants it, that
  ``<root>/<session>`` is still the directory held open and ``<log>`` inside it still the file held open, a
  regular file with one link (the session's own, PROTOCOL.md §5.11); the size read from that check is the one
  the slice uses. Anything else (a file replaced under the same name, a session reset, deleted or moved, a log
  with a second link) drops the entry and the read goes to a worker, which answers exactly as before;
- every read is ``RWF_NOWAIT`` (``ops_service.slice_open_log``): pages not in the page cache, or a file that
  shrinks while it is read, send the request to the worker too. Where the platform cannot read without
  waiting, nothing is kept and every read goes to a worker.

Lines that JSON writes as they are (printable ASCII without ``"`` and ``\\``, the usual log) are not decoded
and re-escaped: ``slice_response`` splices their JSON array, made from the bytes, into the answer, which is
byte for byte what ``json_response`` would have made.

Entries are opened by the worker that answered a miss, dropped on the session changes that move or remove
logs (reset, archive, compaction, deletion), and closed in a worker: the last close of a deleted file frees
its blocks, which is disk work.

May import: the standard library, ``ops_service``, ``uagw.limits``, ``uagw.http11`` and ``uagw.changes``.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import stat
from collections import OrderedDict
from typing import Any, Dict, Optional, Set, Tuple

import ops_service
from ops_service import EncodedLines, OpsError, OpsService, WouldBlock

from .changes import ChangeKind
from .http11 import Response, json_response
from .limits import OPEN_LOGS

__all__ = ["OpenLogs", "slice_response"]

_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
# O_NONBLOCK and O_NOFOLLOW as read_log opens: a FIFO or a symlink under a log's name is never waited on or followed.
_FILE_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
               | getattr(os, "O_NOCTTY", 0))
# Changes after which a session's logs are other files (or none): their descriptors are let go at once.
_LOGS_MOVED = frozenset({ChangeKind.RESET, ChangeKind.ARCHIVED, ChangeKind.COMPACTED, ChangeKind.DELETED})

Key = Tuple[str, str]  # (session id, log file name)


class _OpenLog:
    """One kept log: its session directory and the file, with the identities they had when opened."""

    __slots__ = ("dir_fd", "dir_id", "fd", "file_id")

    def __init__(self, dir_fd: int, dir_id: Tuple[int, int], fd: int, file_id: Tuple[int, int]) -> None:
        self.dir_fd = dir_fd
        self.dir_id = dir_id
        self.fd = fd
        self.file_id = file_id

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.dir_fd)


def _open_log(root: str, session_id: str, file_name: str) -> Optional[_OpenLog]:
    """The session's log opened for keeping (in a worker); None where it is not one to keep."""
    try:
        dir_fd = os.open(os.path.join(root, session_id), _DIR_FLAGS)
    except OSError:
        return None
    try:
        fd = os.open(file_name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError:
        os.close(dir_fd)
        return None
    try:
        st = os.fstat(fd)
        dir_st = os.fstat(dir_fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            return _OpenLog(dir_fd, (dir_st.st_dev, dir_st.st_ino), fd, (st.st_dev, st.st_ino))
    except OSError:
        pass
    os.close(fd)
    os.close(dir_fd)
    return None


class OpenLogs:
    """The OPEN_LOGS most recently read session logs, least recently used first. Event-loop thread only,
    except ``read_and_open``, which a worker runs."""

    def __init__(self, ops: OpsService, executor: concurrent.futures.Executor, capacity: int = OPEN_LOGS) -> None:
        self.ops = ops
        self.root = str(ops.root)
        self.executor = executor
        self.capacity = capacity if ops_service.NOWAIT_READS else 0
        self._entries: "OrderedDict[Key, _OpenLog]" = OrderedDict()
        self._unsupported: Set[int] = set()  # devices whose file system cannot read without waiting (tmpfs)

    def descriptors(self) -> int:
        """Descriptors held now (the connection budget leaves them out)."""
        return 2 * len(self._entries)

    def read_now(self, session_id: str, file_name: str, cursor: Optional[str], limit: Optional[int],
                 max_bytes: Optional[int]) -> Optional[Dict[str, Any]]:
        """``read_log``'s answer, if the log is kept, still the same file, and its pages are cached; else None
        (the caller asks a worker). Its ``lines`` may be EncodedLines: answer it with ``slice_response``.
        Raises InvalidArgument and InvalidCursor as ``read_log`` does."""
        key = (session_id, file_name)
        entry = self._entries.get(key)
        if entry is None:
            return None
        st = self._current(entry, session_id, file_name)
        if st is None:
            self._drop(key)
            return None
        try:
            result = ops_service.slice_open_log(entry.fd, st, file_name, cursor, limit, max_bytes, encoded=True)
        except WouldBlock as would_block:
            if would_block.unsupported:  # never readable without waiting here: keeping it only costs stats
                self._drop(key)
                self._unsupported.add(entry.file_id[0])
            return None
        except OSError:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return result

    def _current(self, entry: _OpenLog, session_id: str, file_name: str) -> Optional[os.stat_result]:
        """The stat of the kept file if the root, the session directory and the log name still lead to it."""
        try:
            self.ops.check_root()
            dir_st = os.stat(os.path.join(self.root, session_id), follow_symlinks=False)
            st = os.stat(file_name, dir_fd=entry.dir_fd, follow_symlinks=False)
        except (OSError, OpsError, ValueError):
            return None
        if (not stat.S_ISDIR(dir_st.st_mode) or (dir_st.st_dev, dir_st.st_ino) != entry.dir_id
                or not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or (st.st_dev, st.st_ino) != entry.file_id):
            return None
        return st

    def read_and_open(self, session_id: str, file_name: str, cursor: Optional[str], limit: Optional[int],
                      max_bytes: Optional[int]) -> Tuple[Dict[str, Any], Optional[_OpenLog]]:
        """In a worker: ``read_log``'s answer, and the log opened for keeping (None: not kept)."""
        result = self.ops.read_log(session_id, file_name, cursor=cursor, limit=limit, max_bytes=max_bytes)
        opened = _open_log(self.root, session_id, file_name) if self.capacity else None
        return result, opened

    def keep(self, session_id: str, file_name: str, opened: Optional[_OpenLog]) -> None:
        """Keep what ``read_and_open`` opened, letting go of the least recently used beyond the capacity."""
        if opened is None:
            return
        key = (session_id, file_name)
        if key in self._entries or not self.capacity or opened.file_id[0] in self._unsupported:
            self._close_later(opened)  # two misses of one log raced; the first kept is as good
            return
        self._entries[key] = opened
        while len(self._entries) > self.capacity:
            _, oldest = self._entries.popitem(last=False)
            self._close_later(oldest)

    def on_change(self, kind: ChangeKind, session_id: str, fields: Dict[str, Any]) -> None:
        """A ``Changes`` observer: a reset, archive, compaction or deletion lets go of the session's logs."""
        if kind in _LOGS_MOVED:
            for file_name in ops_service.LOG_FILES:
                self._drop((session_id, file_name))

    def close(self) -> None:
        """Close every kept log now (the gateway is stopping)."""
        while self._entries:
            _, entry = self._entries.popitem()
            entry.close()

    def _drop(self, key: Key) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._close_later(entry)

    def _close_later(self, entry: _OpenLog) -> None:
        try:
            self.executor.submit(entry.close)
        except RuntimeError:  # the executor is shut down: the gateway is stopping
            entry.close()


# Where the lines go in the answer: the key with an empty array. A string value cannot hold this sequence
# as JSON writes it (its quotes would be escaped), so the first occurrence is the key itself.
_LINES_SLOT = b'"lines":[]'


def slice_response(extra: Dict[str, Any], result: Dict[str, Any]) -> Response:
    """200 with ``extra`` and a log slice ``result``, as ``json_response`` would answer it; EncodedLines are
    spliced in as they are."""
    lines = result["lines"]
    if not isinstance(lines, EncodedLines):
        return json_response(200, {**extra, **result})
    body = json.dumps({**extra, **result, "lines": []}, separators=(",", ":")).encode()
    return Response(200, body.replace(_LINES_SLOT, b'"lines":' + lines, 1))

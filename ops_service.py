"""Workspaces and logs on disk: every file-system operation of the Ops API.

Rules this module keeps
-----------------------
* Everything that reads, writes, moves or deletes files under the workspaces root lives
  here, and nothing here knows HTTP, WebSocket or asyncio. Methods take plain values and
  return plain dicts; failures are the small family of ``OpsError`` subclasses, which the
  HTTP layer maps to status codes in one table. No other exception escapes a public
  method, whatever the input.
* Nothing outside the root is ever touched. A session id must match ``SESSION_ID_RE``
  before it becomes a path, and files inside a session are opened relative to a
  descriptor of the session directory with ``O_NOFOLLOW``, so a symlink an agent plants
  in its workspace (``run.log -> /etc/passwd``, ``archive -> /``) is never followed.
  Directories are listed and walked the same way, through descriptors opened level by
  level, never by a path name that could be swapped for a symlink after a kind check.
  A live log with a second hard link (a name that may be outside) is neither read nor
  appended to: ``append_log`` moves it into the archive and starts a fresh file.
* Reset and compact lose nothing (unless a compact is told ``archive=False``). Bytes move by
  ``rename`` or hard link, never by copy-then-delete; a compacted log is built aside and swapped in with one ``rename``,
  so a reader sees the old file or the new one, never an empty or half-written one.
* Operations that change a session hold that session's lock, so they are serialized
  with each other and with ``append_log``. Reads take no lock.
* The cost of a log slice grows with the bytes it returns, not with the file's size; the cost of
  a compaction with the bytes it keeps plus MAX_LINE_SCAN (a longer line counts as cut).

Theory of operation
-------------------
A session is a real directory ``<root>/<session_id>/`` (not a symlink). Listing does one
``scandir`` of the root and, through a descriptor of each session, one per session that
changed; it stats only the live logs and the heartbeat to sort by last activity, and
reads heartbeats only for the page it returns.

A log slice opens the file once, ``fstat``s that descriptor and reads it with
``os.pread`` only. Tail mode scans backwards from the end; follow mode reads forwards
from the cursor. Lines are whole lines: the cursor only ever advances past a ``\\n``,
except when a single line is longer than ``max_bytes``; then the window is returned as
a cut line (``truncated``) and the cursor moves on by ``max_bytes``, so a reader never
stalls and no byte is skipped.

The cursor is an opaque token naming the file (``st_dev``, ``st_ino``), the offset, and
fingerprints of the bytes already read: the file's head and the bytes just before the
offset. A follow read re-reads those bytes; if the inode changed, the file shrank below
the offset, or the fingerprints differ, the file was rotated or rewritten, so the slice
restarts at offset 0 and says ``reset``. This catches a replacement that has already
grown past the old offset, which a bare byte offset cannot. (A rewrite that reproduces
the same bytes at the head and before the offset is indistinguishable from an append.)

Compaction links the live log into ``archive/<stamp>/`` (the archive holds the whole
pre-compact file at the cost of a directory entry), writes the kept tail to a dot-named
temp file, copies any bytes appended meanwhile, renames it over the live log, and then
copies whatever reached the old inode between the last check and the rename.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import errno
import gzip
import hashlib
import hmac
import heapq
import json
import math
import os
import re
import secrets
import shutil
import stat
import struct
import threading
import time
import weakref
import zlib
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Tuple, Union

__all__ = [
    "SESSION_ID_RE",
    "GATEWAY_DIR_NAME",
    "GATEWAY_LOG_NAME",
    "SECURITY_LOG_NAME",
    "GATEWAY_LOG_FILES",
    "implied_owner",
    "LOG_FILES",
    "HEARTBEAT_FILE_NAME",
    "MEMORY_FILE_NAME",
    "MEMORY_DIR_NAME",
    "WORK_PRODUCTS_DIR_NAME",
    "ARCHIVE_DIR_NAME",
    "TRASH_DIR_NAME",
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "DEFAULT_MAX_BYTES",
    "MAX_MAX_BYTES",
    "LIST_DEFAULT_LIMIT",
    "LIST_MAX_LIMIT",
    "COMPACT_DEFAULT_MAX_LINES",
    "COMPACT_DEFAULT_MAX_BYTES",
    "MAX_LINE_SCAN",
    "MAX_HEARTBEAT_BYTES",
    "MAX_TREE_DEPTH",
    "STATUSES",
    "is_valid_session_id",
    "new_session_id",
    "OpsError",
    "InvalidArgument",
    "InvalidSessionId",
    "InvalidCursor",
    "SessionNotFound",
    "WorkspacesUnavailable",
    "StorageFull",
    "LogCursor",
    "encode_cursor",
    "cursor_after_append",
    "decode_cursor",
    "read_log_slice",
    "ArchiveNotFound",
    "ArchiveCorrupt",
    "ARCHIVE_STAMP_RE",
    "ARCHIVE_MEMBER_BYTES",
    "OpsService",
    "ListQuery",
    "list_query",
    "ListedSession",
]


# --------------------------------------------------------------------------------------
# Names and limits
# --------------------------------------------------------------------------------------

# PROTOCOL.md §2. Use fullmatch: with match/search, "$" also matches before a trailing "\n".
# The first character excludes ".", "_" and "-", so "..", ".hidden" and "_gateway" fail.
SESSION_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

# The gateway's own files live under the root in a directory whose name fails
# SESSION_ID_RE, so it can never be listed, read or deleted as a session.
GATEWAY_DIR_NAME = "_gateway"
GATEWAY_LOG_NAME = "gateway.log"  # JSON lines, written by the server
SECURITY_LOG_NAME = "security.log"  # the security records of gateway.log, kept apart so floods cannot rotate them away
GATEWAY_LOG_FILES = (GATEWAY_LOG_NAME, SECURITY_LOG_NAME)  # the files append_gateway_log writes in _gateway
AUDIT_LOG_NAME = "audit.log"  # one JSON line per state-changing call (append_audit), fsync'ed before the answer
TRASH_DIR_NAME = "trash"  # <root>/_gateway/trash: deleted sessions are renamed here first

LOG_FILES = ("run.log", "activity_journal.log")
HEARTBEAT_FILE_NAME = "heartbeat_state.json"
SESSION_POLICY_FILE_NAME = "session_policy.json"  # Universal Agent's: holds the session's owner (user_id)
MEMORY_FILE_NAME = "MEMORY.md"
MEMORY_DIR_NAME = "memory"
WORK_PRODUCTS_DIR_NAME = "work_products"
ARCHIVE_DIR_NAME = "archive"

DEFAULT_LIMIT = 200  # PROTOCOL.md §5: lines per slice when the caller does not say
MAX_LIMIT = 5000  # the clamp of the systems we replace; keeps one response a few MB
DEFAULT_MAX_BYTES = 250_000  # PROTOCOL.md §5
MAX_MAX_BYTES = 1_000_000  # one slice never holds more than 1 MB of log in memory

LIST_DEFAULT_LIMIT = 100  # PROTOCOL.md §5
LIST_MAX_LIMIT = 1000  # one page is at most 1000 summaries, whatever the client asks
# PROTOCOL.md §16.4: orders of the list. Any other value (UA clients send sort=newest) is the default order,
# last_activity, as UA ignores parameters it does not know.
LIST_SORTS = ("last_activity", "disk_bytes")

COMPACT_DEFAULT_MAX_LINES = 400  # PROTOCOL.md §5 defaults of the compact body
COMPACT_DEFAULT_MAX_BYTES = 250_000
# PROTOCOL §5.7: compaction looks back at most this far for the start of a line; a longer line is
# treated as cut this many bytes before its end, and nothing before the cut is kept. Without it, one
# newline-less multi-GiB log made a compaction read the whole file while it held the session lock,
# and an unfinished line was copied whole however long. 1 MiB: the longest line an agent's output
# yields (MAX_AGENT_LINE) and more than a slice returns (MAX_MAX_BYTES), so no real line is cut.
MAX_LINE_SCAN = 1 << 20

# A heartbeat is a few hundred bytes; a bigger file is not one we wrote, so it is not
# parsed (it reads as null) and write_heartbeat refuses to write one.
MAX_HEARTBEAT_BYTES = 1 << 20

# Directory levels one walk of memory/ holds open at once (one descriptor each): agent memory
# is a few levels deep, and 8 disk workers x 32 stays far below a 1024-descriptor limit, so a
# tree nested thousands deep cannot exhaust descriptors. Deeper levels are not counted.
MAX_TREE_DEPTH = 32

# UA HEAD's order of the status values (running > active > archived > idle); as a filter, "active" also
# matches "running", and UA's "complete"/"terminal" are accepted and match nothing (we have no terminal state).
STATUSES = ("all", "running", "active", "idle", "archived", "complete", "terminal")

# UA's session files the summary reads (docs/PROTOCOL.md §5.2): the owner and memory mode, and the
# sources of the description and of the rehydrate diagnostics. Each read is bounded (MAX_DESCRIPTION_READ).
POLICY_FILE_NAME = "session_policy.json"
DESCRIPTION_FILE_NAME = "description.txt"
CONTEXT_BRIEF_FILE_NAME = "context_brief.md"
CHECKPOINT_JSON_NAMES = ("run_checkpoint.json", "session_checkpoint.json")
CHECKPOINT_MD_NAMES = ("run_checkpoint.md", "session_checkpoint.md")
TRACE_FILE_NAME = "trace.json"
MAX_DESCRIPTION_READ = 96_000  # bytes of description.txt read, as UA; larger JSON sources are skipped
DESCRIPTION_SHOWN = 160  # characters of a summary's description (UA: 159 and an ellipsis beyond)
MAX_DESCRIPTION_CHARS = 2000  # PATCH {description}: longer is refused (UA has no bound)
MEMORY_MODES = ("off", "memory_only", "direct_only", "all")

# Bytes hashed at the head of a log and just before a cursor: enough to tell a rotated
# or rewritten file from a grown one, cheap enough to re-read on every follow call.
FINGERPRINT_SPAN = 64

IO_CHUNK = 64 * 1024  # step of backward and forward scans: stops early without many syscalls
COPY_CHUNK = 1 << 20  # step of copies (compaction, archive fallback): bounded memory

# Cursor tokens are 66 characters; anything much longer is garbage, refused before decoding.
MAX_CURSOR_CHARS = 256
# A legacy cursor is a byte offset; 19 digits hold any int64 offset.
MAX_LEGACY_CURSOR_DIGITS = 19

# How often a slice is retried when the file shrinks while it is being read.
_FILE_CHANGED_RETRIES = 3
# Suffixes tried after a stamp collision ("-1", "-2", ...): two resets in the same
# microsecond need one; this bound only stops a broken file system from looping forever.
_MAX_STAMP_SUFFIX = 10_000
# Times append_log moves a hard-linked live log aside and creates it afresh before giving up:
# more than one only when something re-plants the link between the move and the create.
_RELINK_RETRIES = 3

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
# O_NONBLOCK: opening a FIFO planted as run.log must not block a worker thread forever.
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_NOCTTY = getattr(os, "O_NOCTTY", 0)

_READ_FLAGS = os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | _O_NONBLOCK | _O_NOCTTY
_DIR_FLAGS = os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC
_APPEND_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC | _O_NONBLOCK | _O_NOCTTY
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC

# open() of a name that is absent, a symlink (O_NOFOLLOW gives ELOOP) or a FIFO without a
# peer: for a reader, the file is not there.
_MISSING_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENXIO})
# open(O_DIRECTORY | O_NOFOLLOW) of a name that is absent, a symlink (ELOOP, or ENOTDIR on
# some systems) or not a directory: there is no directory to descend into.
_NOT_A_DIR_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})
# What makes append_gateway_log refuse a path as unsafe: a symlink (ELOOP, or ENOTDIR), something that is
# not a directory or not a file (ENOTDIR, EISDIR), a log with a second link (EPERM, raised by the check).
_UNSAFE_LOG_ERRNOS = frozenset({errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.EPERM})
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
# os.link fails with these where hard links are not possible; compaction then copies.
_NO_LINK_ERRNOS = frozenset(
    {errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)}
)

# Names a session summary looks at; every other entry of a session directory is ignored.
_SUMMARY_NAMES = frozenset(
    LOG_FILES + (HEARTBEAT_FILE_NAME, MEMORY_FILE_NAME, MEMORY_DIR_NAME, ARCHIVE_DIR_NAME)
    + (POLICY_FILE_NAME, DESCRIPTION_FILE_NAME, CONTEXT_BRIEF_FILE_NAME, TRACE_FILE_NAME)
    + CHECKPOINT_JSON_NAMES + CHECKPOINT_MD_NAMES
)
_ACTIVITY_FILES = LOG_FILES + (HEARTBEAT_FILE_NAME,)
_RACY_NS = 1_000_000_000  # a directory changed this recently is re-read, not trusted to its mtime
_KINDS_CACHE_MAX = 100_000  # sessions remembered by the listing; past that it starts afresh

# session id -> (active_connections, running) or (active_connections, running, last_event_seq)
Runtime = Mapping[str, Tuple[Any, ...]]


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


class OpsError(Exception):
    """Base of every error this module raises; ``detail`` is a message a person can act on."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


class InvalidArgument(OpsError):
    """A parameter has a bad value or type (HTTP 400). The detail names it."""


class InvalidSessionId(InvalidArgument):
    """A session id fails SESSION_ID_RE or is not a string (HTTP 400)."""


class InvalidCursor(InvalidArgument):
    """A cursor this gateway did not issue (HTTP 400)."""


class SessionNotFound(OpsError):
    """No session directory of that id (HTTP 404)."""


class WorkspacesUnavailable(OpsError):
    """The root, or a file the operation needs, is missing or unusable (HTTP 503)."""


class StorageFull(OpsError):
    """The volume is full (ENOSPC or EDQUOT) while writing (HTTP 507)."""


def _show(value: Any) -> str:
    """Quote an offending value for an error message, bounded in length."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------------------
# Session ids and argument checks
# --------------------------------------------------------------------------------------


def is_valid_session_id(value: object) -> bool:
    """True if ``value`` is a string that matches SESSION_ID_RE exactly."""
    return isinstance(value, str) and SESSION_ID_RE.fullmatch(value) is not None


def new_session_id(now: Optional[datetime] = None) -> str:
    """A fresh id ``session_YYYYMMDD_HHMMSS_<8 hex>`` in UTC; a naive ``now`` is taken as UTC."""
    if now is None:
        now = datetime.now(timezone.utc)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)
    else:
        now = now.astimezone(timezone.utc)
    return "session_{}_{}".format(now.strftime("%Y%m%d_%H%M%S"), secrets.token_hex(4))


def _require_session_id(value: object) -> str:
    if not isinstance(value, str):
        raise InvalidSessionId(
            "Invalid session id {}: a session id is a string".format(_show(value))
        )
    if SESSION_ID_RE.fullmatch(value) is None:
        raise InvalidSessionId(
            "Invalid session id {}: use 1 to 128 characters from A-Z a-z 0-9 _ . - "
            "starting with a letter or a digit".format(_show(value))
        )
    return value


def _is_int(value: object) -> bool:
    # bool is a subclass of int, but True is never a meaningful count.
    return isinstance(value, int) and not isinstance(value, bool)


def _clamped_int(name: str, value: object, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    if not _is_int(value):
        raise InvalidArgument(
            "{} must be an integer, got {}; accepted: {} to {} (default {})".format(
                name, _show(value), low, high, default
            )
        )
    assert isinstance(value, int)  # _is_int said so; tells the type checker
    return max(low, min(high, value))


def _non_negative_int(name: str, value: object, default: int) -> int:
    if value is None:
        return default
    if not _is_int(value) or value < 0:  # type: ignore[operator]
        raise InvalidArgument(
            "{} must be an integer >= 0, got {} (default {})".format(name, _show(value), default)
        )
    return value  # type: ignore[return-value]


def _require_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument("{} must be true or false, got {}".format(name, _show(value)))
    return value


def _slice_limits(limit: object, max_bytes: object) -> Tuple[int, int]:
    return (
        _clamped_int("limit", limit, DEFAULT_LIMIT, 1, MAX_LIMIT),
        _clamped_int("max_bytes", max_bytes, DEFAULT_MAX_BYTES, 1, MAX_MAX_BYTES),
    )


# --------------------------------------------------------------------------------------
# Cursors
# --------------------------------------------------------------------------------------


class LogCursor(NamedTuple):
    """A decoded cursor. ``legacy`` cursors are bare byte offsets from older clients."""

    dev: int
    ino: int
    offset: int
    head: bytes  # fingerprint of bytes [0, min(offset, FINGERPRINT_SPAN))
    boundary: bytes  # fingerprint of the FINGERPRINT_SPAN bytes before offset
    legacy: bool = False


_CURSOR_VERSION = 1
_CURSOR_LAYOUT = struct.Struct(">BQQQ8s8s")  # version, dev, ino, offset, head, boundary
_CURSOR_TAG_SIZE = 8
_CURSOR_TOKEN_SIZE = _CURSOR_LAYOUT.size + _CURSOR_TAG_SIZE
# Not a secret: the tag only tells tokens we issued from garbled or edited ones. A forged
# token grants nothing, since a cursor can only point into the file the request names.
_CURSOR_KEY = b"ua-gateway log cursor v1"
_U64 = (1 << 64) - 1
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]+")
_LEGACY_RE = re.compile(r"[0-9]{1,%d}" % MAX_LEGACY_CURSOR_DIGITS)
_NEGATIVE_RE = re.compile(r"-[0-9]+")

_BAD_CURSOR = (
    "cursor {} is not one this gateway issued; pass back the cursor of an earlier "
    "response verbatim, or omit it to start from the tail"
)


def _fingerprint(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=8).digest()


def _cursor_tag(payload: bytes) -> bytes:
    return hashlib.blake2b(payload, digest_size=_CURSOR_TAG_SIZE, key=_CURSOR_KEY).digest()


def encode_cursor(cursor: LogCursor) -> str:
    """The opaque token of ``cursor``: base64url without padding, ASCII only."""
    payload = _CURSOR_LAYOUT.pack(
        _CURSOR_VERSION,
        cursor.dev & _U64,
        cursor.ino & _U64,
        cursor.offset & _U64,
        cursor.head,
        cursor.boundary,
    )
    token = base64.urlsafe_b64encode(payload + _cursor_tag(payload))
    return token.rstrip(b"=").decode("ascii")


def decode_cursor(text: Union[str, int]) -> LogCursor:
    """Decode a token from ``encode_cursor``, or a legacy non-negative byte offset.

    Raises InvalidCursor for anything else: garbled, edited or foreign tokens, negative
    offsets, and values that are neither str nor int.
    """
    if _is_int(text):
        if text < 0:  # type: ignore[operator]
            raise InvalidCursor("cursor {} is negative; a byte offset is >= 0".format(_show(text)))
        return LogCursor(0, 0, text, b"", b"", legacy=True)  # type: ignore[arg-type]
    if not isinstance(text, str):
        raise InvalidCursor(_BAD_CURSOR.format(_show(text)))
    if _LEGACY_RE.fullmatch(text):
        return LogCursor(0, 0, int(text), b"", b"", legacy=True)
    if _NEGATIVE_RE.fullmatch(text):
        raise InvalidCursor("cursor {} is negative; a byte offset is >= 0".format(_show(text)))
    if len(text) > MAX_CURSOR_CHARS or not _TOKEN_RE.fullmatch(text):
        raise InvalidCursor(_BAD_CURSOR.format(_show(text)))
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise InvalidCursor(_BAD_CURSOR.format(_show(text))) from None
    # The canonical-form check rejects edits to the unused low bits of the last character,
    # which base64 decoding would otherwise ignore.
    if len(raw) != _CURSOR_TOKEN_SIZE or base64.urlsafe_b64encode(raw).rstrip(b"=") != text.encode("ascii"):
        raise InvalidCursor(_BAD_CURSOR.format(_show(text)))
    payload, tag = raw[: _CURSOR_LAYOUT.size], raw[_CURSOR_LAYOUT.size :]
    if not hmac.compare_digest(tag, _cursor_tag(payload)):
        raise InvalidCursor(_BAD_CURSOR.format(_show(text)))
    version, dev, ino, offset, head, boundary = _CURSOR_LAYOUT.unpack(payload)
    if version != _CURSOR_VERSION:
        raise InvalidCursor(_BAD_CURSOR.format(_show(text)))
    return LogCursor(dev, ino, offset, head, boundary)


def cursor_after_append(cursor: str, appended: bytes, dev: int, ino: int, size: int) -> Optional[str]:
    """The cursor after ``appended`` was written at ``cursor`` into the file (``dev``, ``ino``) that is
    now ``size`` bytes long, made without reading the file (a live follower gets the lines the server
    wrote from memory). None when it cannot be: another file, other bytes written too, or fingerprints
    that need bytes not in hand; the caller then reads from ``cursor`` instead."""
    try:
        parsed = decode_cursor(cursor)
    except InvalidCursor:
        return None
    offset = parsed.offset + len(appended)
    if (parsed.legacy or (parsed.dev, parsed.ino) != (dev & _U64, ino & _U64) or size != offset
            or parsed.offset < FINGERPRINT_SPAN or len(appended) < FINGERPRINT_SPAN):
        return None
    # Past FINGERPRINT_SPAN the head fingerprint no longer changes; the boundary is the appended tail.
    return encode_cursor(LogCursor(parsed.dev, parsed.ino, offset, parsed.head,
                                   _fingerprint(bytes(appended[-FINGERPRINT_SPAN:]))))


def _parse_cursor(cursor: object) -> Optional[LogCursor]:
    # "?cursor=" with no value means "no cursor": tail mode.
    if cursor is None or cursor == "":
        return None
    return decode_cursor(cursor)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# The log slice
# --------------------------------------------------------------------------------------


class _FileChanged(Exception):
    """The file shrank while a slice was reading it; the slice is retried."""


class WouldBlock(Exception):
    """A read on the event loop (``slice_open_log``) would have waited for the disk: hand it to a worker.
    ``unsupported``: the file system cannot read without waiting at all (tmpfs, some network ones)."""

    def __init__(self, unsupported: bool = False) -> None:
        super().__init__()
        self.unsupported = unsupported


# Reads without waiting: Linux >= 4.14 fails a read whose pages are not all in the page cache with EAGAIN
# (RWF_NOWAIT) instead of sleeping; elsewhere nothing is read on the event loop (NOWAIT_READS is False).
NOWAIT_READS = hasattr(os, "preadv") and hasattr(os, "RWF_NOWAIT")
_nowait = threading.local()  # .on: this thread's slice reads must not block (only slice_open_log sets it)


def _pread(fd: "_Source", size: int, offset: int) -> bytes:
    """os.pread of a plain file's descriptor, or of a compressed archive through its stream; inside
    slice_open_log, a read that raises WouldBlock instead of waiting for the disk."""
    if not isinstance(fd, int):
        return fd.pread(size, offset)
    if not getattr(_nowait, "on", False):
        return os.pread(fd, size, offset)
    buffer = bytearray(size)
    try:
        got = os.preadv(fd, [buffer], offset, os.RWF_NOWAIT)
    except OSError as exc:
        # EAGAIN: not cached; EOPNOTSUPP: a file system that cannot say. Either way a worker reads it.
        raise WouldBlock(unsupported=exc.errno in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL)) from exc
    del buffer[got:]
    return bytes(buffer)


def _pread_full(fd: "_Source", size: int, offset: int) -> bytes:
    """Up to ``size`` bytes at ``offset``; fewer only at end of file."""
    data = _pread(fd, size, offset)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = _pread(fd, size - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _read_exact(fd: "_Source", size: int, offset: int) -> bytes:
    data = _pread_full(fd, size, offset)
    if len(data) != size:
        raise _FileChanged()
    return data


def _open_regular(
    opener: Callable[[], int], accept: Optional[Callable[[os.stat_result], bool]] = None
) -> Optional[Tuple[int, os.stat_result]]:
    """Open with ``opener``; None if the name is absent, a symlink, not a regular file, or
    ``accept`` (given the descriptor's fstat) says the file is not one to read."""
    try:
        fd = opener()
    except OSError as exc:
        if exc.errno in _MISSING_ERRNOS:
            return None
        raise
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and (accept is None or accept(st)):
            return fd, st
        if accept is not None and stat.S_ISREG(st.st_mode):
            # Refused on its link count: a compaction may have swapped the file out while we looked
            # (a reader that stalls through several compactions no longer finds the archived copy
            # among the newest stamps). Judge it once more on what it is now.
            again = os.fstat(fd)
            if again.st_nlink != st.st_nlink and accept(again):
                return fd, again
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def _cursor_at(fd: "_Source", st: "_Stat", offset: int) -> str:
    span = min(offset, FINGERPRINT_SPAN)
    head = _pread_full(fd, span, 0)
    boundary = head if offset <= FINGERPRINT_SPAN else _pread_full(fd, span, offset - span)
    return encode_cursor(LogCursor(st.st_dev, st.st_ino, offset, _fingerprint(head), _fingerprint(boundary)))


def _same_generation(fd: "_Source", st: "_Stat", cursor: LogCursor) -> bool:
    """True if the file is the one the cursor was issued for, grown but not rewritten."""
    if (cursor.dev, cursor.ino) != (st.st_dev & _U64, st.st_ino & _U64):
        return False
    if cursor.offset > st.st_size:
        return False
    span = min(cursor.offset, FINGERPRINT_SPAN)
    head = _pread_full(fd, span, 0)
    if cursor.offset <= FINGERPRINT_SPAN:
        boundary = head
    else:
        boundary = _pread_full(fd, span, cursor.offset - span)
    return hmac.compare_digest(_fingerprint(head), cursor.head) and hmac.compare_digest(
        _fingerprint(boundary), cursor.boundary
    )


def _decode_line(line: bytes, complete: bool = True) -> str:
    # A cut piece keeps its bytes as they are: its "\r" may precede the "\n" still to come.
    if complete and line.endswith(b"\r"):
        line = line[:-1]
    return line.decode("utf-8", "replace")


class EncodedLines(bytes):
    """A slice's lines as the JSON array ``json.dumps`` would write, byte for byte, made without decoding
    them: ``slice_open_log(encoded=True)`` answers this instead of the list when every line is printable
    ASCII other than ``"`` and ``\\`` (what JSON writes unchanged); a caller splices it into its answer."""


# The bytes json.dumps writes as they are (printable ASCII but the quote and the backslash), and the newline
# that separates the lines: a window holding nothing else becomes its JSON array by one replace.
_JSON_AS_IS = bytes(range(0x20, 0x7F)).replace(b'"', b"").replace(b"\\", b"") + b"\n"


def _decode_lines(lines: List[bytes]) -> Tuple[Any, int]:
    """Complete lines as text (a list, or EncodedLines inside ``slice_open_log(encoded=True)``), and how
    many bytes they span in the file (newlines included).

    One decode of the joined lines: the byte 0x0A never occurs inside a UTF-8 sequence (RFC 3629),
    so a decoding error never reaches across a newline, and the result equals a decode per line.
    """
    if not lines:
        return [], 0
    joined = b"\n".join(lines)
    if getattr(_nowait, "encoded", False) and not joined.translate(None, _JSON_AS_IS):
        return EncodedLines(b'["' + joined.replace(b"\n", b'","') + b'"]'), len(joined) + 1
    text = joined.decode("utf-8", "replace").split("\n")
    if b"\r" in joined:
        text = [line[:-1] if line.endswith("\r") else line for line in text]
    return text, len(joined) + 1


def _has_newline(fd: "_Source", start: int, stop: int) -> bool:
    if not isinstance(fd, int):
        return fd.has_newline(start, stop)
    pos = start
    while pos < stop:
        chunk = _pread(fd, min(IO_CHUNK, stop - pos), pos)
        if not chunk:
            return False
        if b"\n" in chunk:
            return True
        pos += len(chunk)
    return False


def _tail_slice(fd: "_Source", st: "_Stat", limit: int, max_bytes: int) -> Dict[str, Any]:
    size = st.st_size
    parts: List[bytes] = []  # newest first
    pos = size  # parts hold the file bytes [pos, end)
    end = -1  # just after the last complete line, once found
    floor = max(0, size - max_bytes)
    newlines = 0  # newlines in [pos, end - 1): the boundaries between kept lines
    while pos > floor and (end < 0 or newlines < limit):
        step = min(IO_CHUNK, pos - floor)
        chunk = _read_exact(fd, step, pos - step)
        pos -= step
        if end >= 0:
            parts.append(chunk)
            newlines += chunk.count(b"\n")
            continue
        last = chunk.rfind(b"\n")
        if last < 0:
            parts.append(chunk)
            continue
        # The bytes after the last newline are an unfinished line: never returned.
        end = pos + last + 1
        floor = max(0, end - max_bytes)
        parts = [chunk[: last + 1]]
        newlines = chunk.count(b"\n", 0, last)
    data = b"".join(reversed(parts))

    if end < 0:
        if floor == 0:
            # Nothing but an unfinished line shorter than max_bytes: wait for its newline.
            return _slice_result([], _cursor_at(fd, st, 0), size, truncated=False, more=False)
        # An unfinished line longer than max_bytes: return its last max_bytes, cut, so
        # that a reader never waits forever; following goes on from the end of the file.
        return _slice_result(
            [_decode_line(data, complete=False)], _cursor_at(fd, st, size), size, truncated=True, more=False
        )

    # rsplit from the end: only the newlines of the lines returned are looked at, not the window's.
    lines = data.rsplit(b"\n", limit + 1)
    lines.pop()  # the empty piece after the final newline
    cut = False
    if len(lines) > limit:
        lines = lines[-limit:]
    elif pos == 0 or _read_exact(fd, 1, pos - 1) == b"\n":
        pass
    elif len(lines) == 1:
        # One line longer than max_bytes: its last max_bytes bytes, marked as cut.
        cut = True
    else:
        lines = lines[1:]  # the window began inside this line
    text, span = _decode_lines(lines)
    start = end - span
    return _slice_result(
        text,
        _cursor_at(fd, st, end),
        size,
        truncated=cut or start > 0,
        more=False,
    )


def _follow_slice(
    fd: "_Source", st: "_Stat", start: int, limit: int, max_bytes: int, reset: bool
) -> Dict[str, Any]:
    size = st.st_size
    stop = min(size, start + max_bytes)
    parts: List[bytes] = []
    pos = start
    newlines = 0
    # One newline beyond `limit` is enough to know that lines are withheld.
    while pos < stop and newlines <= limit:
        step = min(IO_CHUNK, stop - pos)
        chunk = _read_exact(fd, step, pos)
        parts.append(chunk)
        newlines += chunk.count(b"\n")
        pos += step
    data = b"".join(parts)

    last = data.rfind(b"\n")
    withheld = False
    cut = False
    if last >= 0:
        raw_lines = data[:last].split(b"\n")
        if len(raw_lines) > limit:
            raw_lines = raw_lines[:limit]
            withheld = True
        lines, span = _decode_lines(raw_lines)
        offset = start + span
    elif len(data) == max_bytes:
        # A full window without a newline: one line longer than max_bytes. Return the
        # window cut and move on by max_bytes; the rest of the line comes next call.
        offset = start + max_bytes
        lines = [_decode_line(data, complete=False)]
        cut = True
    else:
        offset = start
        lines = []
    # A cursor in the middle of a line (after a cut, or a legacy offset) makes the first
    # line a continuation.
    continuation = bool(lines) and start > 0 and _read_exact(fd, 1, start - 1) != b"\n"
    more = withheld or size - offset >= max_bytes or _has_newline(fd, pos, size)
    return _slice_result(
        lines, _cursor_at(fd, st, offset), size, truncated=cut or continuation, more=more, reset=reset
    )


def _slice_result(
    lines: Any, cursor: str, size: int, *, truncated: bool, more: bool, reset: bool = False
) -> Dict[str, Any]:
    return {
        "cursor": cursor,
        "size": size,
        "lines": lines,
        "truncated": truncated,
        "reset": reset,
        "more": more,
    }


def _missing_slice(display_name: str, cursor: Optional[LogCursor]) -> Dict[str, Any]:
    empty = _fingerprint(b"")
    return {
        "file": display_name,
        "cursor": encode_cursor(LogCursor(0, 0, 0, empty, empty)),
        "size": 0,
        "lines": [],
        "truncated": False,
        # Lines were read from a file that is gone: the reader must know its view broke.
        "reset": cursor is not None and cursor.offset > 0,
        "more": False,
    }


def _slice_open_file(
    fd: "_Source", st: "_Stat", cursor: Optional[LogCursor], limit: int, max_bytes: int
) -> Dict[str, Any]:
    if cursor is None:
        return _tail_slice(fd, st, limit, max_bytes)
    if cursor.offset == 0:
        # Nothing was read yet, so nothing can have been replaced.
        return _follow_slice(fd, st, 0, limit, max_bytes, reset=False)
    if cursor.legacy:
        changed = cursor.offset > st.st_size
    else:
        changed = not _same_generation(fd, st, cursor)
    start = 0 if changed else cursor.offset
    return _follow_slice(fd, st, start, limit, max_bytes, reset=changed)


def _read_slice(
    opener: Callable[[], int],
    cursor: Optional[LogCursor],
    limit: int,
    max_bytes: int,
    display_name: str,
    accept: Optional[Callable[[os.stat_result], bool]] = None,
) -> Dict[str, Any]:
    """The slice of the file ``opener`` opens; a file ``accept`` refuses reads as missing.
    OSError (other than "missing") propagates."""
    opened = _open_regular(opener, accept)
    if opened is None:
        return _missing_slice(display_name, cursor)
    fd, st = opened
    try:
        for _ in range(_FILE_CHANGED_RETRIES):
            try:
                result = _slice_open_file(fd, st, cursor, limit, max_bytes)
            except _FileChanged:
                st = os.fstat(fd)
                continue
            return {"file": display_name, **result}
    finally:
        os.close(fd)
    raise WorkspacesUnavailable(
        "{} kept shrinking while it was being read; retry the request".format(display_name)
    )


def slice_open_log(
    fd: int, st: os.stat_result, display_name: str, cursor: Union[str, int, None] = None,
    limit: Optional[int] = None, max_bytes: Optional[int] = None, *, encoded: bool = False,
) -> Dict[str, Any]:
    """``read_log``'s answer from a log the caller keeps open and has just checked (``st``: its fstat, a
    regular file that is the session's own), for a caller that must not block: every read is RWF_NOWAIT.
    With ``encoded``, ``lines`` may be EncodedLines (their JSON) instead of a list.

    Raises WouldBlock when a read would wait for the disk, when the file changed while it was read, or
    where reads cannot be made non-blocking: the caller then asks ``read_log`` in a worker. Raises
    InvalidArgument and InvalidCursor as ``read_log`` does; OSError propagates.
    """
    limit, max_bytes = _slice_limits(limit, max_bytes)
    parsed = _parse_cursor(cursor)
    if not NOWAIT_READS:
        raise WouldBlock()
    _nowait.on = True
    _nowait.encoded = encoded
    try:
        return {"file": display_name, **_slice_open_file(fd, st, parsed, limit, max_bytes)}
    except _FileChanged:
        raise WouldBlock() from None  # the worker's read_log retries on a fresh open
    finally:
        _nowait.on = _nowait.encoded = False


def read_log_slice(
    path: Union[str, "os.PathLike[str]"],
    cursor: Union[str, int, None] = None,
    limit: Optional[int] = None,
    max_bytes: Optional[int] = None,
    *,
    display_name: Optional[str] = None,
) -> Dict[str, Any]:
    """A slice of the log at ``path`` (PROTOCOL.md §5.11).

    Returns ``{"file", "cursor", "size", "lines", "truncated", "reset", "more"}``.
    Without ``cursor`` (or with ``""``): the last complete lines (tail mode); ``truncated``
    says older content exists before the first line. With a cursor from an earlier slice:
    the complete lines after it, oldest first (follow mode); ``more`` says that calling
    again right away returns more, and ``reset`` that the file was replaced or truncated,
    so reading restarted at offset 0. In both modes ``truncated`` is also set when a line
    longer than ``max_bytes`` was cut, or the first line continues such a cut line.
    ``limit`` is clamped to 1..MAX_LIMIT and ``max_bytes`` to 1..MAX_MAX_BYTES. A missing
    file, a symlink or a non-regular file reads as an empty file. ``display_name``
    (default: the base name) is the ``file`` field.

    Raises InvalidCursor, InvalidArgument, or WorkspacesUnavailable when the file exists
    but cannot be read. Thread-safe: it holds no state.
    """
    limit, max_bytes = _slice_limits(limit, max_bytes)
    parsed = _parse_cursor(cursor)
    target = os.fspath(path)
    name = display_name if display_name is not None else os.path.basename(target)
    try:
        return _read_slice(lambda: os.open(target, _READ_FLAGS), parsed, limit, max_bytes, name)
    except OSError as exc:
        raise WorkspacesUnavailable(
            "Log file {} cannot be read: {}".format(target, exc.strerror or exc)
        ) from exc


# --------------------------------------------------------------------------------------
# Small file-system helpers
# --------------------------------------------------------------------------------------


def _iso(ns: Optional[int]) -> Optional[str]:
    """ISO 8601 UTC with seconds precision, e.g. 2026-11-26T10:00:00+00:00."""
    if ns is None:
        return None
    try:
        return datetime.fromtimestamp(ns // 1_000_000_000, timezone.utc).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return None


def _epoch_iso(value: object) -> Optional[str]:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return None
    try:
        return datetime.fromtimestamp(int(value), timezone.utc).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return None


def _stamp() -> str:
    """UTC ``YYYYMMDD_HHMMSS_ffffff``: sorts lexicographically in time order."""
    return datetime.now(timezone.utc).strftime("%Y%m%d_%H%M%S_%f")


def _stamp_sort_key(name: str) -> Tuple[str, int, str]:
    # "<stamp>-10" must sort after "<stamp>-9", which plain string order gets wrong.
    base, dash, suffix = name.rpartition("-")
    if dash and suffix.isdigit() and len(suffix) <= 6:
        return (base, int(suffix), name)
    return (name, 0, name)


def _lexists_at(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _mkdir_at(name: str, dir_fd: int) -> None:
    try:
        os.mkdir(name, dir_fd=dir_fd)
    except FileExistsError:
        pass


def _rotate_at(dir_fd: int, name: str, backups: int) -> None:
    """<name>.N-1 -> <name>.N, ..., <name> -> <name>.1 inside ``dir_fd``: the oldest of ``backups`` rotated
    files is replaced. A rename replaces a symlink at the destination itself, never its target."""
    for index in range(backups - 1, 0, -1):
        try:
            os.replace("{}.{}".format(name, index), "{}.{}".format(name, index + 1),
                       src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except FileNotFoundError:
            pass
    os.replace(name, "{}.1".format(name), src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def _copy_range(src: int, dst: int, start: int, stop: int) -> int:
    """Copy src bytes [start, stop) to dst's current position; returns where it stopped."""
    pos = start
    while pos < stop:
        chunk = os.pread(src, min(COPY_CHUNK, stop - pos), pos)
        if not chunk:
            break
        _write_all(dst, chunk)
        pos += len(chunk)
    return pos


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_json_object(
    opener: Callable[[], int], accept: Optional[Callable[[os.stat_result], bool]] = None
) -> Optional[Dict[str, Any]]:
    """The JSON object in a small regular file, or None (missing, link, huge, broken, or
    refused by ``accept`` as in ``_open_regular``)."""
    try:
        opened = _open_regular(opener, accept)
    except OSError:
        return None
    if opened is None:
        return None
    fd, st = opened
    try:
        if st.st_size > MAX_HEARTBEAT_BYTES:
            return None
        data = _pread_full(fd, MAX_HEARTBEAT_BYTES + 1, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) > MAX_HEARTBEAT_BYTES:
        return None
    return _json_object(data)


def _json_object(data: bytes) -> Optional[Dict[str, Any]]:
    """``data`` parsed as one strict JSON object (no NaN or Infinity), or None if it is anything else."""
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


# NaN and Infinity are not JSON: a heartbeat holding them could not be sent on as JSON.
def _reject_constant(name: str) -> float:
    raise ValueError("{} is not JSON".format(name))


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("{} is out of range".format(text))
    return value


def _has_one_link(st: os.stat_result) -> bool:
    """True if the file has no other name: a second hard link may be a name outside the
    session (an agent's ``ln /etc/shadow run.log``), whose content is not the session's."""
    return st.st_nlink == 1


# Archive stamps _is_own_log looks into for the second name of a live log, newest first.
# Compaction links into the stamp it has just made, the newest; a few more cover stamps
# made by resets in the same moment. Each costs two opens and a stat per log read.
OWN_LOG_STAMPS = 4

# Entries of "files" and of "archives" in session details (PROTOCOL.md §5): an agent can create
# any number of names, and each costs a stat and JSON bytes; past the cap the answer
# says "files_truncated" / "archives_truncated" and gives the totals.
DETAILS_MAX_ENTRIES = 1000


def _is_own_log(dir_fd: int, name: str, st: os.stat_result) -> bool:
    """True if the live log ``name`` (fstat ``st``) of the session open as ``dir_fd`` is the
    session's own: one link, or two where the other is ``archive/<stamp>/<name>``, which
    compaction makes for a moment before swapping in the new file (or leaves behind when it
    is killed there). Both names are then inside the session, so no outside name exists.

    Looks at the archive only for a file with two links, and only in the OWN_LOG_STAMPS
    newest stamps: compaction's stamp is the newest one it just made, and opening every
    stamp of an archive an agent filled with 30,000 directories took a second per read.
    A log whose copy sorts further back reads as not the session's own (append_log then
    moves it aside into a new stamp: nothing is lost).
    """
    if st.st_nlink == 1:
        return True
    if st.st_nlink != 2:
        return False
    try:
        with _dir_at(ARCHIVE_DIR_NAME, dir_fd) as archive_fd:
            if archive_fd is None:
                return False
            newest = heapq.nlargest(OWN_LOG_STAMPS, os.listdir(archive_fd), key=_stamp_sort_key)
            for stamp in newest:
                with _dir_at(stamp, archive_fd) as stamp_fd:
                    if stamp_fd is not None and _same_file_at(name, stamp_fd, st):
                        return True
    except OSError:
        return False
    return False


def _same_file(one: os.stat_result, other: os.stat_result) -> bool:
    return (one.st_dev, one.st_ino) == (other.st_dev, other.st_ino)


def _same_file_at(name: str, dir_fd: int, st: os.stat_result) -> bool:
    try:
        return _same_file(os.stat(name, dir_fd=dir_fd, follow_symlinks=False), st)
    except OSError:
        return False


def _open_dir_at(name: str, dir_fd: int) -> Optional[int]:
    """A descriptor of the directory ``name`` inside ``dir_fd``; None if it is absent, a symlink
    (never followed: O_NOFOLLOW) or not a directory. Other OSErrors propagate."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in _NOT_A_DIR_ERRNOS:
            return None
        raise


@contextmanager
def _dir_at(name: str, dir_fd: int) -> Iterator[Optional[int]]:
    """``_open_dir_at`` as a context: the descriptor (or None) is closed on leaving."""
    fd = _open_dir_at(name, dir_fd)
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def _list_dir_at(name: str, dir_fd: int) -> List[str]:
    """The entry names of the directory ``name`` inside ``dir_fd``; [] if it is not a real
    directory or cannot be read. Listed through its own descriptor, so swapping it for a
    symlink after a kind check cannot make this list the link's target."""
    try:
        with _dir_at(name, dir_fd) as fd:
            return [] if fd is None else os.listdir(fd)
    except OSError:
        return []


def _has_entry_at(name: str, dir_fd: int) -> bool:
    """True if the directory ``name`` inside ``dir_fd`` is a real directory with an entry."""
    try:
        with _dir_at(name, dir_fd) as fd:
            if fd is None:
                return False
            with os.scandir(fd) as iterator:
                return next(iterator, None) is not None
    except OSError:
        return False


def _remove_tree_at(name: str, dir_fd: int, trash_fd: int, depth: int = 0) -> None:
    """Remove ``name`` inside ``dir_fd`` and everything below it, best effort, through
    descriptors opened with O_NOFOLLOW: a symlink is removed itself, never followed, at any
    depth, whatever is swapped in meanwhile. At most MAX_TREE_DEPTH descriptors are held:
    a directory deeper than that is first renamed into ``trash_fd`` (same volume) under a
    fresh name and removed from there, so a tree nested thousands deep is removed too.
    """
    pending = [name]
    while pending:
        _remove_entry_at(pending.pop(), dir_fd, trash_fd, depth, pending)
        dir_fd, depth = trash_fd, 0


def _remove_entry_at(name: str, dir_fd: int, trash_fd: int, depth: int, pending: List[str]) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
        return
    except OSError as exc:
        if exc.errno not in (errno.EISDIR, errno.EPERM):
            return  # gone, or not ours to remove: best effort
    if depth >= MAX_TREE_DEPTH:
        spare = "deep.{}".format(secrets.token_hex(8))
        try:
            os.rename(name, spare, src_dir_fd=dir_fd, dst_dir_fd=trash_fd)
        except OSError:
            return
        pending.append(spare)
        return
    try:
        fd = _open_dir_at(name, dir_fd)
    except OSError:
        return
    if fd is None:
        return
    try:
        for child in os.listdir(fd):
            _remove_entry_at(child, fd, trash_fd, depth + 1, pending)
    except OSError:
        pass
    finally:
        os.close(fd)
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except OSError:
        pass



def _tree_usage_at(name: str, dir_fd: int) -> Tuple[int, int]:
    """(regular files, bytes) under the directory ``name`` inside ``dir_fd``, recursively.

    Each level is opened relative to its parent's descriptor with O_NOFOLLOW, so neither a
    symlink nor a directory swapped for one mid-walk is ever followed. At most
    MAX_TREE_DEPTH levels are held open; deeper directories are not counted.
    """
    try:
        top = _open_dir_at(name, dir_fd)
    except OSError:
        return 0, 0
    if top is None:
        return 0, 0
    counts = [0, 0]  # regular files, bytes

    def visit(fd: int) -> List[str]:
        (files, size), subdirs = _scan_level(fd)
        counts[0] += files
        counts[1] += size
        return subdirs

    _walk_open_tree(top, visit)
    return counts[0], counts[1]


def _entry_stats(dir_fd: int) -> List[Tuple[str, os.stat_result]]:
    """(name, lstat) of each entry of the directory open as ``dir_fd``; entries that vanish or cannot be
    stat'ed, or a directory that cannot be read, are left out. scandir(fd) stats each entry relative to the
    descriptor (fstatat), never by a path, and never follows a symlink."""
    found: List[Tuple[str, os.stat_result]] = []
    try:
        with os.scandir(dir_fd) as iterator:
            for entry in iterator:
                try:
                    found.append((entry.name, entry.stat(follow_symlinks=False)))
                except OSError:
                    continue
    except OSError:
        pass
    return found


def _walk_open_tree(top: int, visit: Callable[[int], List[str]]) -> None:
    """Visit the directory open as ``top`` and those below it, depth first: ``visit(fd)`` reads one level
    and returns the names of the subdirectories to enter. Each level is opened relative to its parent's
    descriptor with O_NOFOLLOW (``_open_dir_at``), so a symlink is never followed; the descriptors open at
    once are the current path from the top, at most MAX_TREE_DEPTH of them (deeper levels are not
    entered). Every descriptor, ``top`` included, is closed before this returns."""
    stack: List[Tuple[int, List[str]]] = []  # (descriptor, subdirectory names still to visit)
    fd: Optional[int] = top
    try:
        while fd is not None or stack:
            if fd is not None:
                stack.append((fd, []))  # closed by the finally below even if visit raises
                subdirs = visit(fd)
                stack[-1] = (fd, subdirs if len(stack) < MAX_TREE_DEPTH else [])
                fd = None
            parent, pending = stack[-1]
            if not pending:
                os.close(stack.pop()[0])
                continue
            try:
                fd = _open_dir_at(pending.pop(), parent)
            except OSError:
                fd = None
    finally:
        for open_fd, _ in stack:
            os.close(open_fd)


def _scan_level(dir_fd: int) -> Tuple[Tuple[int, int], List[str]]:
    """((regular files, bytes), subdirectory names) of one directory open as ``dir_fd``."""
    files = 0
    total = 0
    subdirs: List[str] = []
    try:
        # scandir(fd) stats each entry relative to dir_fd (fstatat), never by a path.
        with os.scandir(dir_fd) as iterator:
            for entry in iterator:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        subdirs.append(entry.name)
                    elif entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                        files += 1
                except OSError:
                    continue
    except OSError:
        pass
    return (files, total), subdirs


# --------------------------------------------------------------------------------------
# Compaction plan
# --------------------------------------------------------------------------------------


class _CompactPlan(NamedTuple):
    keep_start: int  # bytes before this offset leave the live file
    kept_lines: int  # complete lines kept


def _end_of_complete_lines(fd: int, size: int) -> int:
    """Offset just after the last newline; 0 if the file has none; -1 if the unfinished last
    line is longer than MAX_LINE_SCAN (no newline in the bytes that could start it)."""
    floor = max(0, size - MAX_LINE_SCAN - 1)  # a newline at size - MAX_LINE_SCAN - 1 starts a line that fits
    pos = size
    while pos > floor:
        step = min(IO_CHUNK, pos - floor)
        chunk = _read_exact(fd, step, pos - step)
        pos -= step
        last = chunk.rfind(b"\n")
        if last >= 0:
            return pos + last + 1
    return -1 if size > MAX_LINE_SCAN else 0


def _plan_compaction(fd: int, size: int, max_lines: int, max_bytes: int) -> _CompactPlan:
    """Keep the last ``max_lines`` complete lines within ``max_bytes``, plus the unfinished line.

    Reads at most the kept bytes plus MAX_LINE_SCAN (and one IO_CHUNK), whatever the file's size: a
    line longer than MAX_LINE_SCAN counts as starting MAX_LINE_SCAN bytes before its end (cut), and
    nothing before it is kept. An unfinished last line that long is kept cut, alone.
    """
    end = _end_of_complete_lines(fd, size)
    if end < 0:
        return _CompactPlan(size - MAX_LINE_SCAN, 0)
    if end == 0:
        return _CompactPlan(0, 0)
    if max_lines == 0 or max_bytes == 0:
        return _CompactPlan(end, 0)
    keep = end  # start of the oldest line kept so far; the line being looked for ends here
    kept = 0
    # A line that would start before `lowest` cannot fit in max_bytes: scan no further.
    lowest = max(0, end - max_bytes)
    pos = end - 1  # the newline at end - 1 closes the last line, it starts none
    while pos > 0:
        # A newline at `floor` is the lowest one that can start a line that fits both bounds;
        # it only moves down as lines are kept, so every byte already read stays in the window.
        floor = max(0, lowest - 1, keep - 1 - MAX_LINE_SCAN)
        if pos <= floor:
            break
        step = min(IO_CHUNK, pos - floor)
        chunk = _read_exact(fd, step, pos - step)
        pos -= step
        index = len(chunk)
        while True:
            index = chunk.rfind(b"\n", 0, index)
            if index < 0:
                break
            line_start = pos + index + 1
            if line_start < lowest:
                return _CompactPlan(keep, kept)
            keep = line_start
            kept += 1
            if kept == max_lines:
                return _CompactPlan(keep, kept)
    # No newline down to the floor: the line ending at `keep` starts at offset 0, or is longer
    # than MAX_LINE_SCAN and is cut; kept only if it fits max_bytes.
    line_start = keep - MAX_LINE_SCAN if keep > MAX_LINE_SCAN else 0
    if line_start >= lowest:
        return _CompactPlan(line_start, kept + 1)
    return _CompactPlan(keep, kept)


# --------------------------------------------------------------------------------------
# Archives: compressed logs that stay readable (PROTOCOL.md §16)
# --------------------------------------------------------------------------------------
#
# An archived log ``archive/<stamp>/<name>`` is either the plain file, or ``<name>.gz`` plus its index
# ``<name>.gz.idx``. The ``.gz`` is a series of independent gzip members (RFC 1952 §2.2), each the
# deflate of about ARCHIVE_MEMBER_BYTES of the log cut after a newline, so plain ``gunzip`` yields the
# whole log while a reader inflates only the members a slice touches. The index is JSON:
# ``{"format", "version", "size", "lines", "members": [[gz_offset, gz_size, offset, size, lines], ...]}``
# (offsets and sizes in the .gz file and in the log). Cursors count bytes of the log itself, and an
# archive's cursor names the archive (not an inode), so a cursor stays valid when the file is compressed.
#
# Compression writes ``<name>.gz.tmp`` and ``<name>.gz.idx.tmp`` beside the plain file, fsyncs them,
# renames the index then the .gz into place, fsyncs the directory and only then removes the plain file:
# whenever the plain file is gone, the complete .gz and index are there. ``recover_archives`` undoes what
# a killed compression left: temp files go, and a .gz beside its plain file (not yet removed) is dropped
# in favour of the plain file, which is compressed again.

ARCHIVE_GZ_SUFFIX = ".gz"
ARCHIVE_INDEX_SUFFIX = ".gz.idx"
_ARCHIVE_TEMP_SUFFIX = ".tmp"
ARCHIVE_INDEX_FORMAT = "ua-gateway-archive-index"
ARCHIVE_INDEX_VERSION = 1
# Log bytes per gzip member: a tail inflates one or two members (about 1-2 MiB of work) whatever the
# archive's size, and 1 MiB members compress within 1% of one whole-file stream on JSON journals.
ARCHIVE_MEMBER_BYTES = 1 << 20
# A member is cut after the last newline once it holds ARCHIVE_MEMBER_BYTES; a line running past this
# is cut here (the cursor counts bytes, so a line split over two members reads whole).
MAX_ARCHIVE_MEMBER_BYTES = ARCHIVE_MEMBER_BYTES + MAX_LINE_SCAN
# Deflate never grows data by more than 5 bytes per 16 KiB block plus the gzip header and trailer
# (RFC 1951 §3.2.4): an index claiming more is not ours.
MAX_ARCHIVE_MEMBER_GZ_BYTES = MAX_ARCHIVE_MEMBER_BYTES + MAX_ARCHIVE_MEMBER_BYTES // 1000 + 4096
# 4 MiB of index is about 90,000 members (45 bytes a row at most), 90 GiB of log: more than a session
# writes (a bigger log stays plain: the compressor never writes an index the reader refuses). Parsing one
# costs about 0.5 s of CPU, holding the GIL the event loop needs, and 50 MB, per request: a bigger index
# is refused unread (it is corrupt or planted); at 16 MiB a planted one cost 2 s and 190 MB each time.
MAX_ARCHIVE_INDEX_BYTES = 4 << 20
# Bytes one slice of a compressed archive may inflate: the members holding its window (max_bytes plus a
# scan step), the head and the bytes before the cursor, each at most MAX_ARCHIVE_MEMBER_BYTES. Past
# this the archive is treated as corrupt (a 500), never inflated further: no zip bomb costs more.
MAX_ARCHIVE_INFLATE = 6 * MAX_ARCHIVE_MEMBER_BYTES
# Members one slice keeps inflated: the window's two, the head's and the boundary's.
_ARCHIVE_MEMBER_CACHE = 4
# A read ending this close to a member's start inflates only that prefix (a cursor's head fingerprint
# reads the log's first 64 bytes): deflate streams, so the rest of the member is never inflated.
_ARCHIVE_PREFIX_READ = FINGERPRINT_SPAN
# zlib's default: level 9 costs twice the CPU for about 3% on JSON lines.
ARCHIVE_COMPRESS_LEVEL = 6
# A log allocating under 1/64 of its length is mostly holes (a writer without O_APPEND after a truncate):
# deflate turns holes into about 1/1000 of their length, so its .gz could hold more blocks than the plain
# file, and a TiB of holes would cost hours of CPU. It stays plain. A file system that compresses (ZFS,
# btrfs: 2-10x) stays well above the ratio, so its logs are still compressed.
ARCHIVE_SPARSE_RATIO = 64
# An archive stamp: _stamp(), and the "-N" suffix _new_archive adds on a collision.
ARCHIVE_STAMP_RE = re.compile(r"[0-9]{8}_[0-9]{6}_[0-9]{6}(-[0-9]{1,6})?")


class ArchiveNotFound(SessionNotFound):
    """The session has no such archived log (404)."""


class ArchiveCorrupt(OpsError):
    """A compressed archive disagrees with its index or with gzip (500): it is not read further."""


class _StreamStat(NamedTuple):
    """What a slice needs of a file's stat, for an archive: its size, and an identity that names the
    archive (not the inode), so a cursor survives compression."""

    st_size: int
    st_dev: int
    st_ino: int


_Stat = Union[os.stat_result, _StreamStat]
_Source = Union[int, "_ArchiveStream"]  # what a slice reads: a plain file's descriptor, or a compressed archive


class _Member(NamedTuple):
    gz_offset: int
    gz_size: int
    offset: int
    size: int
    lines: int


def _archive_identity(stamp: str, name: str) -> Tuple[int, int]:
    digest = hashlib.blake2b("{}/{}".format(stamp, name).encode("ascii"), digest_size=8).digest()
    return 0, int.from_bytes(digest, "big")


def _parse_archive_index(data: bytes, gz_size: int, where: str) -> Tuple[int, List[_Member]]:
    """(log size, members) of an index; ArchiveCorrupt unless the members tile both files exactly."""
    try:
        index = json.loads(data.decode("utf-8"))
        if index.get("format") != ARCHIVE_INDEX_FORMAT or index.get("version") != ARCHIVE_INDEX_VERSION:
            raise ValueError("not a version {} {}".format(ARCHIVE_INDEX_VERSION, ARCHIVE_INDEX_FORMAT))
        members = [_Member(*(int(v) for v in row)) for row in index["members"]]
        size = index["size"]
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise ArchiveCorrupt("the index of {} is unreadable ({}); the archive is not read".format(where, exc)) from None
    gz_pos = pos = 0
    for member in members:
        if (member.gz_offset != gz_pos or member.offset != pos or not 0 < member.size <= MAX_ARCHIVE_MEMBER_BYTES
                or not 0 < member.gz_size <= MAX_ARCHIVE_MEMBER_GZ_BYTES or not 0 <= member.lines <= member.size):
            raise ArchiveCorrupt("the index of {} has a member out of place or out of bounds at log offset {}; "
                                 "the archive is not read".format(where, pos))
        gz_pos += member.gz_size
        pos += member.size
    if pos != size or gz_pos != gz_size:
        raise ArchiveCorrupt("the index of {} covers {} log bytes in {} gzip bytes, the files hold {} and {}; "
                             "the archive is not read".format(where, pos, gz_pos, _show(size), gz_size))
    return size, members


class _ArchiveStream:
    """Random reads of the log inside a compressed archive; inflates only the members it touches,
    at most MAX_ARCHIVE_INFLATE bytes in all. Not thread-safe: one per slice."""

    def __init__(self, gz_fd: int, size: int, members: List[_Member], where: str) -> None:
        self.gz_fd = gz_fd
        self.size = size
        self.members = members
        self.where = where
        self._starts = [member.offset for member in members]
        self._cache: Dict[int, bytes] = {}
        self.inflated = 0

    def _member(self, number: int) -> bytes:
        cached = self._cache.pop(number, None)
        if cached is None:
            cached = self._inflate(self.members[number])
            if len(self._cache) >= _ARCHIVE_MEMBER_CACHE:
                self._cache.pop(next(iter(self._cache)))
        self._cache[number] = cached  # most recently used last
        return cached

    def _inflate(self, member: _Member, prefix: Optional[int] = None) -> bytes:
        """The member's log bytes, checked against the index and the gzip CRC; with ``prefix``, only its
        first ``prefix`` bytes (deflate stops there: a cursor's head fingerprint costs no whole member)."""
        want = member.size if prefix is None else prefix
        self.inflated += want
        if self.inflated > MAX_ARCHIVE_INFLATE:
            raise ArchiveCorrupt("reading {} needed more than {} inflated bytes; the archive is not read "
                                 "further".format(self.where, MAX_ARCHIVE_INFLATE))
        packed = _pread_full(self.gz_fd, member.gz_size, member.gz_offset)
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)  # one gzip member (RFC 1952), header and CRC checked
        try:
            # max_length: a member that inflates past its indexed size stops there (zip-bomb safe).
            data = inflater.decompress(packed, want + 1 if prefix is None else want)
        except zlib.error as exc:
            raise ArchiveCorrupt("{}: the gzip member at offset {} is corrupt ({})".format(
                self.where, member.gz_offset, exc)) from None
        if prefix is not None and len(packed) == member.gz_size and len(data) == want:
            return data
        if len(packed) != member.gz_size or len(data) != want or not inflater.eof or inflater.unused_data:
            raise ArchiveCorrupt("{}: the gzip member at offset {} does not hold the {} bytes its index "
                                 "says".format(self.where, member.gz_offset, member.size))
        return data

    def pread(self, size: int, offset: int) -> bytes:
        parts: List[bytes] = []
        stop = min(self.size, offset + size)
        pos = offset
        while pos < stop:
            number = bisect.bisect_right(self._starts, pos) - 1
            member = self.members[number]
            if number not in self._cache and stop - member.offset <= _ARCHIVE_PREFIX_READ:
                data = self._inflate(member, min(member.size, stop - member.offset))
            else:
                data = self._member(number)
            piece = data[pos - member.offset : stop - member.offset]
            parts.append(piece)
            pos += len(piece)
        return b"".join(parts)

    def has_newline(self, start: int, stop: int) -> bool:
        """True if log bytes [start, stop) hold a newline; whole members answer from the index."""
        stop = min(stop, self.size)
        if start >= stop:
            return False
        first = bisect.bisect_right(self._starts, start) - 1
        for member in self.members[first:]:
            if member.offset >= stop:
                break
            if start <= member.offset and member.offset + member.size <= stop:
                if member.lines:
                    return True
                continue
            low = max(start, member.offset)
            if b"\n" in self.pread(min(stop, member.offset + member.size) - low, low):
                return True
        return False


def _read_archive_index_at(stamp_fd: int, name: str, gz_size: int, where: str) -> Tuple[int, List[_Member]]:
    opened = _open_regular(lambda: os.open(name + ARCHIVE_INDEX_SUFFIX, _READ_FLAGS, dir_fd=stamp_fd), _has_one_link)
    if opened is None:
        raise ArchiveCorrupt("{} has no index {}; the archive is not read".format(where, name + ARCHIVE_INDEX_SUFFIX))
    fd, st = opened
    try:
        if st.st_size > MAX_ARCHIVE_INDEX_BYTES:
            raise ArchiveCorrupt("the index of {} is {} bytes, over {}; the archive is not read".format(
                where, st.st_size, MAX_ARCHIVE_INDEX_BYTES))
        data = _pread_full(fd, MAX_ARCHIVE_INDEX_BYTES + 1, 0)
    finally:
        os.close(fd)
    return _parse_archive_index(data[:MAX_ARCHIVE_INDEX_BYTES], gz_size, where)


def _member_cut(chunk: bytes) -> int:
    """Where the member ending in ``chunk`` is cut: after its last newline, else (one long line) whole."""
    last = chunk.rfind(b"\n")
    return last + 1 if last >= 0 else len(chunk)


def _write_gzip_members(src: int, size: int, dst: int, where: str) -> List[_Member]:
    """Deflate src bytes [0, size) into dst as independent gzip members; the members' index rows."""
    members: List[_Member] = []
    pos = 0
    gz_pos = 0
    while pos < size:
        want = min(MAX_ARCHIVE_MEMBER_BYTES, size - pos)
        chunk = _pread_full(src, want, pos)
        if len(chunk) != want:
            raise _FileChanged()
        if pos + want < size and want > ARCHIVE_MEMBER_BYTES:
            cut = _member_cut(chunk[ARCHIVE_MEMBER_BYTES:])
            chunk = chunk[: ARCHIVE_MEMBER_BYTES + cut]
        packed = gzip.compress(chunk, ARCHIVE_COMPRESS_LEVEL, mtime=0)
        _write_all(dst, packed)
        members.append(_Member(gz_pos, len(packed), pos, len(chunk), chunk.count(b"\n")))
        gz_pos += len(packed)
        pos += len(chunk)
    return members


def _index_bytes(size: int, members: List[_Member]) -> bytes:
    return json.dumps({"format": ARCHIVE_INDEX_FORMAT, "version": ARCHIVE_INDEX_VERSION, "size": size,
                       "lines": sum(member.lines for member in members),
                       "members": [list(member) for member in members]}, separators=(",", ":")).encode("ascii")


def _write_new_file_at(dir_fd: int, name: str, mode: int, fill: Callable[[int], Any]) -> Any:
    """Create ``name`` afresh (a stale one is replaced), fill it through ``fill(fd)``, fsync it."""
    OpsService._remove_stale(name, dir_fd)
    fd = os.open(name, _CREATE_FLAGS, mode, dir_fd=dir_fd)
    try:
        result = fill(fd)
        os.fsync(fd)
    finally:
        os.close(fd)
    return result


def _fsync_dir(dir_fd: int) -> None:
    os.fsync(dir_fd)


def _compress_archive_at(stamp_fd: int, name: str, where: str, lock: Any) -> Optional[Dict[str, int]]:
    """Compress the plain archived log ``name`` of the stamp open as ``stamp_fd`` (see the section
    comment for the order of writes). None if there is nothing to do: no plain file, a file with a
    second link (still the live log mid-compaction, or a name outside), or one that changed meanwhile.

    Deflating runs without ``lock`` (the session's: appends must not wait for it); the swap takes it, and
    an archived file unchanged then is complete (compaction fills a new archive under that lock)."""
    opened = _open_regular(lambda: os.open(name, _READ_FLAGS, dir_fd=stamp_fd), _has_one_link)
    if opened is None:
        return None
    fd, st = opened
    if _disk_bytes(st) * ARCHIVE_SPARSE_RATIO < st.st_size:
        os.close(fd)
        return None  # mostly holes: its .gz would hold more blocks than the plain file does
    gz_temp = name + ARCHIVE_GZ_SUFFIX + _ARCHIVE_TEMP_SUFFIX
    index_temp = name + ARCHIVE_INDEX_SUFFIX + _ARCHIVE_TEMP_SUFFIX
    mode = stat.S_IMODE(st.st_mode)
    try:
        try:
            members = _write_new_file_at(stamp_fd, gz_temp, mode,
                                         lambda out: _write_gzip_members(fd, st.st_size, out, where))
        except _FileChanged:
            members = None
        with lock:
            if members is None or not _unchanged(fd, st):
                # Still being filled, or a writer holds the archived inode (an agent's open descriptor).
                OpsService._unlink_quietly(gz_temp, stamp_fd)
                return None
            index = _index_bytes(st.st_size, members or [])
            if len(index) > MAX_ARCHIVE_INDEX_BYTES:
                # The reader refuses an index this big unread: compressed, the log could never be read.
                OpsService._unlink_quietly(gz_temp, stamp_fd)
                return None
            _write_new_file_at(stamp_fd, index_temp, mode, lambda out: _write_all(out, index))
            os.replace(index_temp, name + ARCHIVE_INDEX_SUFFIX, src_dir_fd=stamp_fd, dst_dir_fd=stamp_fd)
            os.replace(gz_temp, name + ARCHIVE_GZ_SUFFIX, src_dir_fd=stamp_fd, dst_dir_fd=stamp_fd)
            _fsync_dir(stamp_fd)
            if not _unchanged(fd, st):
                _discard_compressed_at(stamp_fd, name)  # the plain file grew after all: it stays the copy
                return None
            os.unlink(name, dir_fd=stamp_fd)
            _fsync_dir(stamp_fd)
        gz_st = os.stat(name + ARCHIVE_GZ_SUFFIX, dir_fd=stamp_fd, follow_symlinks=False)
        return {"bytes": st.st_size, "compressed_bytes": gz_st.st_size}
    except BaseException:
        # A full disk (or any failure) must not leave a partial .gz.tmp holding the very bytes the disk
        # lacks until the next pass: the plain file is still the copy, the temps are worth nothing.
        for temp in (gz_temp, index_temp):
            OpsService._unlink_quietly(temp, stamp_fd)
        raise
    finally:
        os.close(fd)


def _keep_mtime(dir_fd: int, st: os.stat_result) -> None:
    """Give the directory open as ``dir_fd`` back its mtime ``st`` if it changed: a stamp's mtime is its
    archive's age for retention (PROTOCOL.md §15), and compressing or recovering it must not make an
    archive of 100 days new again (an archive made while the gateway was down is compressed at start)."""
    now = os.fstat(dir_fd)
    if now.st_mtime_ns != st.st_mtime_ns and os.utime in os.supports_fd:
        try:
            os.utime(dir_fd, ns=(now.st_atime_ns, st.st_mtime_ns))
        except OSError:
            pass  # best effort: the archive then only counts as newer, kept longer, never lost


def _unchanged(fd: int, st: os.stat_result) -> bool:
    now = os.fstat(fd)
    return (now.st_size, now.st_mtime_ns, now.st_nlink) == (st.st_size, st.st_mtime_ns, st.st_nlink)


def _discard_compressed_at(stamp_fd: int, name: str) -> None:
    for suffix in (ARCHIVE_GZ_SUFFIX, ARCHIVE_INDEX_SUFFIX):
        OpsService._unlink_quietly(name + suffix, stamp_fd)
    _fsync_dir(stamp_fd)


def _recover_stamp_at(stamp_fd: int) -> List[str]:
    """Undo what a killed compression left in one stamp; the plain logs still to compress."""
    names = set(os.listdir(stamp_fd))
    pending = []
    for name in LOG_FILES:
        for temp in (name + ARCHIVE_GZ_SUFFIX + _ARCHIVE_TEMP_SUFFIX, name + ARCHIVE_INDEX_SUFFIX + _ARCHIVE_TEMP_SUFFIX):
            if temp in names:
                OpsService._unlink_quietly(temp, stamp_fd)
        if name in names:
            if name + ARCHIVE_GZ_SUFFIX in names or name + ARCHIVE_INDEX_SUFFIX in names:
                # Killed after the renames, before the plain file went: the plain file is the copy.
                _discard_compressed_at(stamp_fd, name)
            pending.append(name)
        elif name + ARCHIVE_INDEX_SUFFIX in names and name + ARCHIVE_GZ_SUFFIX not in names:
            OpsService._unlink_quietly(name + ARCHIVE_INDEX_SUFFIX, stamp_fd)  # an index of nothing
    return pending


def _stamp_created(stamp: str, st: os.stat_result) -> Optional[str]:
    try:
        when = datetime.strptime(stamp[:22], "%Y%m%d_%H%M%S_%f").replace(tzinfo=timezone.utc)
    except ValueError:
        return _iso(st.st_mtime_ns)
    return when.isoformat(timespec="seconds")


def _disk_bytes(st: os.stat_result) -> int:
    """Bytes the file system allocates to a file (what du counts), not its length."""
    return getattr(st, "st_blocks", (st.st_size + 511) // 512) * 512


def _disk_usage_at(name: str, dir_fd: int, seen: Optional[set] = None) -> int:
    """du-style bytes of the regular files at or under ``name`` in ``dir_fd`` (each inode once; symlinks
    and other kinds count nothing, never followed; MAX_TREE_DEPTH levels at most: ``_walk_open_tree``)."""
    seen = set() if seen is None else seen
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return 0
    if stat.S_ISREG(st.st_mode):
        if (st.st_dev, st.st_ino) in seen:
            return 0
        seen.add((st.st_dev, st.st_ino))
        return _disk_bytes(st)
    if not stat.S_ISDIR(st.st_mode):
        return 0
    try:
        top = _open_dir_at(name, dir_fd)
    except OSError:
        return 0
    if top is None:
        return 0
    total = [0]

    def visit(fd: int) -> List[str]:
        subdirs: List[str] = []
        for entry_name, entry_st in _entry_stats(fd):
            if stat.S_ISDIR(entry_st.st_mode):
                subdirs.append(entry_name)
            elif stat.S_ISREG(entry_st.st_mode) and (entry_st.st_dev, entry_st.st_ino) not in seen:
                seen.add((entry_st.st_dev, entry_st.st_ino))
                total[0] += _disk_bytes(entry_st)
        return subdirs

    _walk_open_tree(top, visit)
    return total[0]


def _apparent_bytes_at(name: str, dir_fd: int) -> int:
    """The length of the file ``name``, or of the regular files under the directory ``name``; 0 if gone."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return 0
    if stat.S_ISDIR(st.st_mode):
        return _tree_usage_at(name, dir_fd)[1]
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


def _session_disk_usage_at(dir_fd: int) -> Dict[str, int]:
    """``{"total", "live", "archived"}`` du-style bytes of a session open as ``dir_fd``: ``archived``
    under ``archive/``, ``live`` all the rest (a log linked in both counts as live)."""
    seen: set = set()
    live = 0
    names = os.listdir(dir_fd)
    for name in names:
        if name != ARCHIVE_DIR_NAME:
            live += _disk_usage_at(name, dir_fd, seen)
    archived = _disk_usage_at(ARCHIVE_DIR_NAME, dir_fd, seen) if ARCHIVE_DIR_NAME in names else 0
    return {"total": live + archived, "live": live, "archived": archived}


# --------------------------------------------------------------------------------------
# OpsService
# --------------------------------------------------------------------------------------


def _entry_kinds(entries: Iterator[os.DirEntry]) -> Dict[str, str]:
    """{name: "file" | "dir" | "other"} for the entries a summary looks at (symlinks are "other")."""
    kinds = {}
    for entry in entries:
        if entry.name in _SUMMARY_NAMES:
            try:
                if entry.is_file(follow_symlinks=False):
                    kinds[entry.name] = "file"
                elif entry.is_dir(follow_symlinks=False):
                    kinds[entry.name] = "dir"
                else:
                    kinds[entry.name] = "other"
            except OSError:
                kinds[entry.name] = "other"
    return kinds


class _SessionScan:
    """What a session directory holds, for summaries and sorting: the kinds of the entries a
    summary looks at, and the newest mtime of its activity files. Nothing here touches the
    disk: the facts were gathered through a descriptor of the session directory."""

    __slots__ = ("session_id", "dir_mtime_ns", "entries", "activity_ns", "archived")

    def __init__(self, session_id: str, dir_mtime_ns: int, entries: Dict[str, str], activity_ns: int) -> None:
        self.session_id = session_id
        self.dir_mtime_ns = dir_mtime_ns
        self.entries = entries
        self.activity_ns = activity_ns
        # Whether archive/ has an entry; looked up only when the status needs it (None: not yet).
        self.archived: Optional[bool] = None

    def is_file(self, name: str) -> bool:
        return self.entries.get(name) == "file"

    def is_dir(self, name: str) -> bool:
        return self.entries.get(name) == "dir"

    @property
    def has_live_log(self) -> bool:
        return any(self.is_file(name) for name in LOG_FILES)


def _activity_ns(dir_fd: int, entries: Dict[str, str], default: int) -> int:
    """The newest mtime of the activity files in the session open as ``dir_fd``, else ``default``."""
    newest: Optional[int] = None
    for name in _ACTIVITY_FILES:
        if entries.get(name) != "file":
            continue
        try:
            mtime = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mtime_ns
        except OSError:
            continue
        newest = mtime if newest is None else max(newest, mtime)
    return default if newest is None else newest


def _heartbeat_at(dir_fd: int) -> Optional[Dict[str, Any]]:
    """The parsed heartbeat of the session open as ``dir_fd`` (None: missing, a link, broken)."""
    return _read_json_object(
        lambda: os.open(HEARTBEAT_FILE_NAME, _READ_FLAGS, dir_fd=dir_fd), accept=_has_one_link
    )


def _policy_user(policy: Optional[Mapping[str, Any]]) -> Optional[str]:
    value = policy.get("user_id") if policy is not None else None
    return value.strip() if isinstance(value, str) and value.strip() else None


def _policy_owner(policy: Optional[Mapping[str, Any]], session_id: str) -> Optional[str]:
    """The owner ``policy`` records, else ``telegram_<n>`` for a session ``tg_<n>``, else None."""
    owner = _policy_user(policy)
    if owner is None and session_id.startswith("tg_") and len(session_id) > 3:
        owner = "telegram_" + session_id[3:]
    return owner


def implied_owner(session_id: str) -> Optional[str]:
    """The owner a session without a recorded one has: ``telegram_<n>`` for ``tg_<n>``, else None."""
    return _policy_owner(None, session_id)


def _policy_owner_at(dir_fd: int, session_id: str) -> Optional[str]:
    """The owner of the session open as ``dir_fd`` (``_policy_owner`` of its session_policy.json)."""
    policy = _read_json_object(
        lambda: os.open(SESSION_POLICY_FILE_NAME, _READ_FLAGS, dir_fd=dir_fd), accept=_has_one_link
    )
    return _policy_owner(policy, session_id)


def _replace_file_at(dir_fd: int, name: str, data: bytes) -> None:
    """Write ``data`` as ``name`` in ``dir_fd`` atomically: a temp file there, then a rename."""
    temp = ".{}.{}.tmp".format(name, secrets.token_hex(4))
    fd = os.open(temp, _CREATE_FLAGS, 0o644, dir_fd=dir_fd)
    try:
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(temp, dir_fd=dir_fd)
        except OSError:
            pass
        raise


def _require_runtime(runtime: object) -> None:
    if runtime is not None and not isinstance(runtime, Mapping):
        raise InvalidArgument(
            "runtime must map session ids to (active_connections, running), got {}".format(type(runtime).__name__)
        )


def _runtime_of(runtime: Optional[Runtime], session_id: str) -> Tuple[int, bool]:
    if not runtime:
        return 0, False
    try:
        connections, running = tuple(runtime.get(session_id, (0, False)))[:2]
        return max(0, int(connections)), bool(running)
    except (TypeError, ValueError):
        return 0, False


def _event_seq_of(runtime: Optional[Runtime], session_id: str) -> int:
    """The third item of a session's runtime entry (the sequence number of its last event), else 0."""
    if not runtime:
        return 0
    try:
        entry = tuple(runtime.get(session_id, ()))
        return max(0, int(entry[2])) if len(entry) > 2 else 0
    except (TypeError, ValueError):
        return 0


# -- UA's summary fields (docs/PROTOCOL.md §5.2): every read bounded, every failure a default ---------------

def _read_prefix_at(dir_fd: int, name: str, limit: int) -> Optional[bytes]:
    """The first ``limit`` bytes of a regular file of the session (no symlink, no FIFO, no second hard link:
    that name may be a file outside the session), or None."""
    try:
        opened = _open_regular(lambda: os.open(name, _READ_FLAGS, dir_fd=dir_fd), accept=_has_one_link)
    except OSError:
        return None
    if opened is None:
        return None
    fd, _st = opened
    try:
        return _pread_full(fd, limit, 0)
    except OSError:
        return None
    finally:
        os.close(fd)


def _read_small_json_at(dir_fd: int, name: str) -> Tuple[bool, Optional[Dict[str, Any]]]:
    """(exists, the JSON object) of a session file of at most MAX_DESCRIPTION_READ bytes; a larger,
    broken or non-object file reads as (True, None)."""
    data = _read_prefix_at(dir_fd, name, MAX_DESCRIPTION_READ + 1)
    if data is None:
        return False, None
    if len(data) > MAX_DESCRIPTION_READ:
        return True, None
    return True, _json_object(data)


def session_owner(session_id: str, policy: Optional[Dict[str, Any]]) -> str:
    """UA's ``owner``: the policy's user_id, else ``telegram_<n>`` for a ``tg_<n>`` id, else "unknown"."""
    return _policy_owner(policy, session_id) or "unknown"


def memory_mode(policy: Optional[Dict[str, Any]]) -> str:
    """UA's ``memory_mode`` from a session policy: off, memory_only, direct_only (the default) or all."""
    memory = policy.get("memory") if policy is not None else None
    if not isinstance(memory, dict):
        return "direct_only"
    if not memory.get("enabled", True):
        return "off"
    if not memory.get("sessionMemory", True):
        return "memory_only"
    scope = memory.get("scope", "direct_only")
    scope = scope.strip().lower() if isinstance(scope, str) else ""
    return scope if scope in ("direct_only", "all") else "direct_only"


def session_source(session_id: str, owner: str) -> str:
    """UA HEAD's ``source`` from the id prefix (and a telegram owner)."""
    sid = session_id.lower()
    if sid.startswith("daemon_"):
        return "daemon"
    if sid.startswith("tg_") or owner.lower().startswith("telegram_"):
        return "telegram"
    if sid.startswith("session_"):
        return "chat"
    if sid.startswith("api_"):
        return "api"
    return "local"


def _channel(session_id: str, source: str) -> str:
    """UA HEAD's ``channel`` for what an id and a source tell (we have no run catalog)."""
    sid = session_id.lower()
    if sid.startswith("daemon_"):
        return "infrastructure"
    if sid.startswith("vp_"):
        return "vp_mission"
    if sid.startswith("cron_"):
        return "scheduled"
    if sid.startswith("discord_"):
        return "discord"
    if source in ("chat", "local", "api", "telegram"):
        return "interactive"
    return "system"


def _shorten_description(text: str) -> Optional[str]:
    text = " ".join(text.split())
    if not text:
        return None
    if len(text) > DESCRIPTION_SHOWN:
        return text[: DESCRIPTION_SHOWN - 1] + "\u2026"
    return text


_HEADING_RE = re.compile(r"^#{1,3}\s+(.+)$")


def _brief_title(data: bytes) -> Optional[str]:
    lines = data.decode("utf-8", "ignore").splitlines()
    for line in lines:
        match = _HEADING_RE.match(line.strip())
        if match and match.group(1).strip():
            return match.group(1).strip()
    for line in lines:
        line = line.strip()
        if line and not line.startswith("---"):
            return line
    return None


def _checkpoint_md_request(data: bytes) -> Optional[str]:
    lines = data.decode("utf-8", "ignore").splitlines()
    for index, line in enumerate(lines):
        if line.strip() == "### Original Request":
            quoted: List[str] = []
            for after in lines[index + 1 :]:
                after = after.strip()
                if not quoted and not after:
                    continue
                if not after.startswith(">"):
                    break
                quoted.append(after.lstrip(">").strip())
            text = " ".join(part for part in quoted if part)
            return text or None
    return None


_CHECKPOINT_REQUEST_KEYS = ("original_request", "query", "prompt", "task", "description", "title")


def _description_at(dir_fd: int, kinds: Mapping[str, str], checkpoint: Optional[Dict[str, Any]]) -> Optional[str]:
    """UA HEAD's description sources, in its order; the first that gives text wins."""
    if kinds.get(DESCRIPTION_FILE_NAME) == "file":
        data = _read_prefix_at(dir_fd, DESCRIPTION_FILE_NAME, MAX_DESCRIPTION_READ)
        text = _shorten_description(data.decode("utf-8", "ignore")) if data else None
        if text:
            return text
    if kinds.get(CONTEXT_BRIEF_FILE_NAME) == "file":
        data = _read_prefix_at(dir_fd, CONTEXT_BRIEF_FILE_NAME, 2048)
        title = _brief_title(data) if data else None
        text = _shorten_description(title) if title else None
        if text:
            return text
    if checkpoint is not None:
        for key in _CHECKPOINT_REQUEST_KEYS:
            value = checkpoint.get(key)
            if isinstance(value, str) and value.strip():
                return _shorten_description(value)
    else:
        for name in CHECKPOINT_MD_NAMES:
            if kinds.get(name) != "file":
                continue
            data = _read_prefix_at(dir_fd, name, MAX_DESCRIPTION_READ)
            if not data:
                continue
            request = _checkpoint_md_request(data)
            if request:
                return _shorten_description(request)
            break
    if kinds.get(TRACE_FILE_NAME) == "file":
        _exists, trace = _read_small_json_at(dir_fd, TRACE_FILE_NAME)
        query = trace.get("query") if trace is not None else None
        if isinstance(query, str) and query.strip():
            return _shorten_description(query)
    return None


def _checkpoint_at(dir_fd: int, kinds: Mapping[str, str]) -> Optional[Dict[str, Any]]:
    """The first checkpoint JSON that exists (run_ then session_), parsed; None when absent or broken."""
    for name in CHECKPOINT_JSON_NAMES:
        if kinds.get(name) == "file":
            return _read_small_json_at(dir_fd, name)[1]
    return None


def _checkpoint_fields(checkpoint: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    if checkpoint is None:
        return {"has_checkpoint": False, "checkpoint_age_seconds": None, "checkpoint_tasks_completed": 0,
                "checkpoint_artifacts_count": 0, "checkpoint_original_request": None}
    age: Optional[float] = None
    stamp = checkpoint.get("timestamp")
    if isinstance(stamp, str) and stamp:
        try:
            when = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            age = (datetime.now(timezone.utc) - when).total_seconds()
        except (ValueError, OverflowError):
            age = None
    tasks, artifacts = checkpoint.get("completed_tasks"), checkpoint.get("artifacts")
    request = checkpoint.get("original_request")
    request = request.strip()[:200] if isinstance(request, str) and request.strip() else None
    return {"has_checkpoint": True, "checkpoint_age_seconds": age,
            "checkpoint_tasks_completed": len(tasks) if isinstance(tasks, list) else 0,
            "checkpoint_artifacts_count": len(artifacts) if isinstance(artifacts, list) else 0,
            "checkpoint_original_request": request}


def _rehydrate(has_checkpoint: bool, has_run_log: bool, has_memory: bool, mode: str) -> Tuple[bool, str]:
    if has_checkpoint:
        return True, "checkpoint_available"
    if has_run_log and has_memory:
        return True, "run_log_and_memory_available"
    reasons = []
    if not has_run_log:
        reasons.append("no_run_log")
    reasons.append("no_checkpoint")
    if not has_memory:
        reasons.append("no_memory_file")
    if mode == "direct_only":
        reasons.append("memory_mode_direct_only")
    return False, "; ".join(reasons)


def _heartbeat_epoch(heartbeat: Optional[Dict[str, Any]]) -> Optional[float]:
    value = heartbeat.get("last_run") if heartbeat else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


class ListQuery(NamedTuple):
    status: str
    filters: Dict[str, str]  # "status" always; "source", "owner", "memory_mode" when given non-empty
    limit: int
    offset: int
    sort: Optional[str]  # "disk_bytes" reorders; anything else is the default order


def list_query(
    status: Optional[str] = "all",
    limit: Optional[int] = LIST_DEFAULT_LIMIT,
    offset: Optional[int] = 0,
    runtime: Optional[Runtime] = None,
    source: Optional[str] = None,
    owner: Optional[str] = None,
    memory_mode: Optional[str] = None,
    sort: Optional[str] = None,
) -> ListQuery:
    """The arguments of ``OpsService.list_sessions`` checked and defaulted, for every view that answers a list
    (the session index too, so both refuse the same input with the same words). Raises InvalidArgument."""
    if status is None:
        status = "all"
    if not isinstance(status, str) or status not in STATUSES:
        raise InvalidArgument(
            "status must be one of {}, got {}".format(", ".join(STATUSES), _show(status))
        )
    filters: Dict[str, str] = {"status": status}
    for name, value in (("source", source), ("owner", owner), ("memory_mode", memory_mode)):
        if value is not None and not isinstance(value, str):
            raise InvalidArgument("{} must be a string, got {}".format(name, _show(value)))
        if value:
            filters[name] = value
    if sort is not None and not isinstance(sort, str):
        raise InvalidArgument("sort must be a string, got {}".format(_show(sort)))
    limit = _clamped_int("limit", limit, LIST_DEFAULT_LIMIT, 1, LIST_MAX_LIMIT)
    offset = _non_negative_int("offset", offset, 0)
    _require_runtime(runtime)
    return ListQuery(status, filters, limit, offset, sort)


class ListedSession(NamedTuple):
    """One session as ``list_sessions`` lists it, for views that keep summaries (the session index)."""

    summary: Dict[str, Any]  # list_sessions' summary with no runtime: status "idle" or "archived"
    activity_ns: int  # the listing's sort key (newest first, then by id); last_activity is it in seconds
    entries: Tuple[str, ...]  # the names the summary looked at that exist: what to stat to tell a change


class OpsService:
    """Workspace operations under one root. Thread-safe; every method may block on disk.

    Public methods raise only OpsError subclasses: InvalidArgument (and its
    InvalidSessionId and InvalidCursor), SessionNotFound, WorkspacesUnavailable and
    StorageFull.
    """

    root: Path

    def __init__(self, root: Union[str, "os.PathLike[str]"]) -> None:
        # Made absolute once, so a later chdir does not move the root; not resolved, so a
        # root that an operator made a symlink keeps following that symlink.
        self.root = Path(os.path.abspath(os.fsdecode(root)))
        self._locks: "weakref.WeakValueDictionary[str, Any]" = weakref.WeakValueDictionary()
        # session id -> ((st_ino, st_mtime_ns) of its directory, entry kinds): see _scan_session_dir
        self._kinds_cache: Dict[str, Tuple[Tuple[int, int], Dict[str, str]]] = {}
        self._locks_guard = threading.Lock()
        # One audit record at a time: appends stay in call order and a rotation never races an append.
        self._audit_guard = threading.Lock()
        # Live logs found hard-linked and moved aside by append_log (see there); a gauge for
        # the server's metrics and logs.
        self.linked_logs_moved = 0

    # -- root ---------------------------------------------------------------------------

    def ensure_root(self) -> None:
        """Create the root and ``_gateway/`` if missing, and clear leftovers in the trash.

        ``_gateway`` is opened with O_NOFOLLOW, never through a symlink: one planted there (by
        anything that can write the root) would send the gateway's logs and trash outside it.
        Such a ``_gateway`` (or one that is not a directory) is refused with an OSError naming
        it, never moved or followed: it may be an operator's, who decides what to do with it.

        For server start-up; OSError propagates.
        """
        os.makedirs(self.root, exist_ok=True)
        root_fd = os.open(str(self.root), os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
        try:
            _mkdir_at(GATEWAY_DIR_NAME, root_fd)
            try:
                gateway_fd = os.open(GATEWAY_DIR_NAME, _DIR_FLAGS, dir_fd=root_fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                raise OSError(exc.errno, "{} is a symlink or not a directory; the gateway never writes "
                              "through one: remove it (the gateway creates its own)".format(
                                  self.root / GATEWAY_DIR_NAME)) from None
            try:
                with _dir_at(TRASH_DIR_NAME, gateway_fd) as trash_fd:
                    if trash_fd is not None:
                        # A delete interrupted by a crash leaves its renamed directory here.
                        for name in os.listdir(trash_fd):
                            _remove_tree_at(name, trash_fd, trash_fd)
            finally:
                os.close(gateway_fd)
        finally:
            os.close(root_fd)

    def check_root(self, writable: bool = False) -> None:
        """Raise WorkspacesUnavailable if the root is missing, not a directory, or not
        readable (or not writable, with ``writable=True``)."""
        root = self.root
        try:
            st = os.stat(root)
        except FileNotFoundError:
            raise WorkspacesUnavailable(
                "Workspaces root {} is missing; create it or fix UA_WORKSPACES_DIR "
                "(the gateway recovers by itself once it exists)".format(root)
            ) from None
        except NotADirectoryError:
            raise WorkspacesUnavailable(
                "Workspaces root {} is unreachable: a parent of it is not a directory; "
                "fix UA_WORKSPACES_DIR".format(root)
            ) from None
        except OSError as exc:
            raise WorkspacesUnavailable(
                "Workspaces root {} cannot be read: {}; fix its permissions or "
                "UA_WORKSPACES_DIR".format(root, exc.strerror or exc)
            ) from None
        except ValueError:
            raise WorkspacesUnavailable(
                "Workspaces root {} contains a NUL byte; fix UA_WORKSPACES_DIR".format(_show(str(root)))
            ) from None
        if not stat.S_ISDIR(st.st_mode):
            raise WorkspacesUnavailable(
                "Workspaces root {} is not a directory; point UA_WORKSPACES_DIR at a "
                "directory".format(root)
            )
        if not os.access(root, os.R_OK | os.X_OK):
            raise WorkspacesUnavailable(
                "Workspaces root {} is not readable by the gateway's user; grant read "
                "and search permission".format(root)
            )
        if writable and not os.access(root, os.W_OK):
            raise WorkspacesUnavailable(
                "Workspaces root {} is not writable (read-only volume or permissions); "
                "grant the gateway's user write permission".format(root)
            )

    def check_space(self) -> None:
        """Raise StorageFull when the root's volume has no free block left for this process.

        A missing or unreadable root is check_root's to report: then this returns quietly.
        """
        try:
            st = os.statvfs(self.root)
        except (OSError, ValueError):
            return
        # Root may use the blocks reserved for it (ext4 keeps 5%); anyone else may not.
        free = st.f_bfree if getattr(os, "geteuid", lambda: -1)() == 0 else st.f_bavail
        if free == 0:
            raise StorageFull(
                "No space left on the workspaces volume ({}); free some space, and the gateway "
                "recovers by itself".format(self.root)
            )

    # -- sessions ----------------------------------------------------------------------

    def session_lock(self, session_id: str) -> "threading.RLock":
        """The lock that serializes changes to one session (re-entrant, created lazily).

        Hold the returned object while using it: the registry keeps locks only while
        someone references them, so it never grows with sessions long gone.
        """
        _require_session_id(session_id)
        with self._locks_guard:
            lock = self._locks.get(session_id)
            if lock is None:
                lock = threading.RLock()
                self._locks[session_id] = lock
            return lock

    def session_dir(self, session_id: str) -> Path:
        """``root/session_id`` if it is a real directory (not a symlink).

        Raises InvalidSessionId, WorkspacesUnavailable or SessionNotFound.
        """
        _require_session_id(session_id)
        self.check_root()
        path = self.root / session_id
        try:
            st = os.lstat(path)
        except OSError:
            self.check_root()
            raise SessionNotFound(self._not_found(session_id)) from None
        if not stat.S_ISDIR(st.st_mode):
            raise SessionNotFound(self._not_found(session_id))
        return path

    def create_session(self, session_id: Optional[str] = None) -> Dict[str, Any]:
        """Create ``<id>/`` and ``<id>/work_products/``; a fresh id when None. ``created`` in the answer
        says whether the directory is new.

        An id that already names a session is returned as it is (idempotent).
        Raises InvalidSessionId, InvalidArgument (the name is taken by something that is
        not a session directory), WorkspacesUnavailable, StorageFull.
        """
        if session_id is not None:
            _require_session_id(session_id)
        with self._os_errors("creating a session", None):
            self.check_root(writable=True)
            # mkdir still works on a full volume; a session that cannot hold a log line is no use.
            self.check_space()
            if session_id is None:
                session_id, created = self._make_new_session_dir(), True
            else:
                created = self._make_session_dir(session_id)
            with self.session_lock(session_id), self._session_fd(session_id) as dir_fd:
                _mkdir_at(WORK_PRODUCTS_DIR_NAME, dir_fd)
        return {"session_id": session_id, "workspace_dir": str(self.root / session_id), "created": created}

    def read_session_owner(self, session_id: str) -> Optional[str]:
        """The session's recorded owner: ``user_id`` of its ``session_policy.json`` (a non-empty string,
        stripped), else ``telegram_<n>`` for an id ``tg_<n>`` (Universal Agent's Telegram sessions), else None.

        Raises InvalidSessionId, SessionNotFound, WorkspacesUnavailable.
        """
        _require_session_id(session_id)
        with self._os_errors("reading the owner of session {}".format(session_id), session_id):
            with self._session_fd(session_id) as dir_fd:
                return _policy_owner_at(dir_fd, session_id)

    def record_session_owner(self, session_id: str, user_id: str) -> str:
        """Record ``user_id`` as the owner in ``session_policy.json`` unless the session has one
        already; returns the owner now recorded. Never changes a recorded owner. A policy file without
        an owner is merged (its keys kept); one that cannot be parsed is left alone. ``tg_<n>`` is owned
        by ``telegram_<n>`` whoever asks. Atomic: a reader sees the old file or the new one.

        Raises InvalidSessionId, InvalidArgument, SessionNotFound, WorkspacesUnavailable, StorageFull.
        """
        _require_session_id(session_id)
        if not isinstance(user_id, str) or not user_id.strip():
            raise InvalidArgument("the owner must be a non-empty string, got {}".format(_show(user_id)))
        doing = "recording the owner of session {}".format(session_id)
        with self.session_lock(session_id), self._os_errors(doing, session_id):
            with self._session_fd(session_id) as dir_fd:
                policy = _read_json_object(
                    lambda: os.open(SESSION_POLICY_FILE_NAME, _READ_FLAGS, dir_fd=dir_fd), accept=_has_one_link
                )
                owner = _policy_owner(policy, session_id)
                if policy is not None and _policy_user(policy):
                    return owner or user_id
                if policy is None and _lexists_at(SESSION_POLICY_FILE_NAME, dir_fd):
                    return owner or user_id  # someone else's file we cannot read: never replaced
                owner = owner or user_id.strip()
                now = time.time()
                record: Dict[str, Any] = {
                    "version": 1,
                    "memory": {"enabled": True, "sessionMemory": True, "sources": ["memory", "sessions"],
                               "scope": "direct_only"},
                    "created_at": now,
                }
                record.update(policy or {})
                record.update({"session_id": session_id, "user_id": owner, "updated_at": now})
                data = json.dumps(record, indent=2, sort_keys=True, allow_nan=False).encode("utf-8")
                _replace_file_at(dir_fd, SESSION_POLICY_FILE_NAME, data)
                return owner

    def list_sessions(
        self,
        status: Optional[str] = "all",
        limit: Optional[int] = LIST_DEFAULT_LIMIT,
        offset: Optional[int] = 0,
        runtime: Optional[Runtime] = None,
        source: Optional[str] = None,
        owner: Optional[str] = None,
        memory_mode: Optional[str] = None,
        sort: Optional[str] = None,
    ) -> Dict[str, Any]:
        """One page of session summaries, newest ``last_activity`` first; with ``sort="disk_bytes"``
        largest du-style disk use first (then newest activity), each summary with its ``disk_bytes``; any
        other ``sort`` is the default order
        (PROTOCOL.md §16.4: this walks every session's tree, so it costs more than the default order).

        ``status`` "active" also matches "running" (UA HEAD); ``source``, ``owner`` and ``memory_mode``
        (UA HEAD's filters) match the summary's field case-insensitively, an empty one matching all.

        ``runtime`` maps session ids to ``(active_connections, running)``; a missing id
        means ``(0, False)``. Returns ``{"sessions", "total", "limit", "offset"}`` where
        ``total`` counts the sessions that pass the status filter.
        Raises InvalidArgument (status, limit, offset) and WorkspacesUnavailable.
        """
        status, filters, limit, offset, sort = list_query(
            status, limit, offset, runtime, source, owner, memory_mode, sort
        )
        with self._os_errors("listing sessions", None):
            scans = self._scan_sessions()
            if len(filters) > 1 or status != "all":
                scans = [scan for scan in scans if self._matches(scan, runtime, filters)]
            scans.sort(key=lambda scan: (-scan.activity_ns, scan.session_id))
            usage: Dict[str, Dict[str, int]] = {}
            if sort == "disk_bytes":
                usage = {scan.session_id: self._disk_usage(scan.session_id) for scan in scans}
                scans.sort(key=lambda scan: -usage[scan.session_id]["total"])  # stable: ties keep activity order
            page = scans[offset : offset + limit]
            sessions = [self._summary(scan, runtime) for scan in page]
            for summary in sessions if usage else []:
                summary["disk_bytes"] = usage[summary["session_id"]]
        return {"sessions": sessions, "total": len(scans), "limit": limit, "offset": offset}

    def _disk_usage(self, session_id: str) -> Dict[str, int]:
        with self._listed_session_fd(session_id) as dir_fd:
            if dir_fd is None:
                return {"total": 0, "live": 0, "archived": 0}
            return _session_disk_usage_at(dir_fd)

    def session_details(self, session_id: str, runtime: Optional[Runtime] = None) -> Dict[str, Any]:
        """``{"session": summary + "heartbeat", "memory", "files", "archives"}`` (PROTOCOL.md §5), each
        list at most DETAILS_MAX_ENTRIES long (the first names, the newest stamps), with its
        ``*_total`` and ``*_truncated``.

        Everything is read through descriptors opened from the session directory's own with
        O_NOFOLLOW, at every depth: a symlink where a directory is expected (``archive``,
        ``memory`` or below), or swapped in while this runs, is never followed.
        Raises InvalidSessionId, SessionNotFound, WorkspacesUnavailable.
        """
        _require_runtime(runtime)
        _require_session_id(session_id)
        with self._os_errors("reading session {}".format(session_id), session_id):
            with self._session_fd(session_id) as dir_fd:
                return self._details_at(session_id, dir_fd, runtime)

    def listed_session(self, session_id: str) -> Optional[ListedSession]:
        """The summary ``list_sessions`` would give ``session_id`` with no runtime, read now (no cache), or
        None when a listing would not show it (no such directory, a symlink, not a valid id).
        Raises WorkspacesUnavailable."""
        if not is_valid_session_id(session_id):
            return None
        with self._os_errors("reading session {}".format(session_id), None):
            self.check_root()
            root_fd = os.open(str(self.root), os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
            try:
                try:
                    dir_fd = _open_dir_at(session_id, root_fd)
                except OSError:
                    scan = self._scan_unreadable(session_id, root_fd)
                    if scan is None:
                        return None
                    return ListedSession(self._summary_at(scan, None, None), scan.activity_ns, ())
            finally:
                os.close(root_fd)
            if dir_fd is None:
                return None
            try:
                dir_stat = os.fstat(dir_fd)
                if dir_stat.st_nlink == 0:
                    return None
                try:
                    with os.scandir(dir_fd) as iterator:
                        kinds = _entry_kinds(iterator)
                except OSError:
                    kinds = {}
                scan = _SessionScan(
                    session_id, dir_stat.st_mtime_ns, kinds, _activity_ns(dir_fd, kinds, dir_stat.st_mtime_ns)
                )
                summary = self._summary_at(scan, None, dir_fd)
            finally:
                os.close(dir_fd)
        return ListedSession(summary, scan.activity_ns, tuple(sorted(kinds)))

    def _details_at(self, session_id: str, dir_fd: int, runtime: Optional[Runtime]) -> Dict[str, Any]:
        dir_mtime_ns = os.fstat(dir_fd).st_mtime_ns
        # Each entry is stat'ed relative to dir_fd (scandir of a descriptor uses fstatat).
        with os.scandir(dir_fd) as iterator:
            all_entries = {entry.name: entry for entry in iterator}
        kinds = _entry_kinds(iter(all_entries.values()))
        scan = _SessionScan(session_id, dir_mtime_ns, kinds, _activity_ns(dir_fd, kinds, dir_mtime_ns))
        summary = self._summary(scan, runtime, dir_fd)
        summary["heartbeat"] = _heartbeat_at(dir_fd) if scan.is_file(HEARTBEAT_FILE_NAME) else None
        memory_files, memory_bytes = 0, 0
        if scan.is_dir(MEMORY_DIR_NAME):
            memory_files, memory_bytes = _tree_usage_at(MEMORY_DIR_NAME, dir_fd)
        if scan.is_file(MEMORY_FILE_NAME):
            try:
                memory_bytes += all_entries[MEMORY_FILE_NAME].stat(follow_symlinks=False).st_size
            except OSError:
                pass
        # The first DETAILS_MAX_ENTRIES names, and the newest as many stamps: only those are stat'ed.
        files = []
        for name in heapq.nsmallest(DETAILS_MAX_ENTRIES, all_entries):
            try:
                st = all_entries[name].stat(follow_symlinks=False)
            except OSError:
                continue  # removed since the scan
            files.append({"name": name, "size": st.st_size, "modified": _iso(st.st_mtime_ns)})
        stamps: List[str] = []
        if scan.is_dir(ARCHIVE_DIR_NAME):
            stamps = _list_dir_at(ARCHIVE_DIR_NAME, dir_fd)
        archives = sorted(heapq.nlargest(DETAILS_MAX_ENTRIES, stamps, key=_stamp_sort_key), key=_stamp_sort_key)
        return {
            "session": summary,
            "memory": {
                "has_memory_md": MEMORY_FILE_NAME in scan.entries,
                "files": memory_files,
                "bytes": memory_bytes,
            },
            "files": files,
            "files_total": len(all_entries),
            "files_truncated": len(all_entries) > DETAILS_MAX_ENTRIES,
            "archives": archives,
            "archives_total": len(stamps),
            "archives_truncated": len(stamps) > DETAILS_MAX_ENTRIES,
            "disk_bytes": _session_disk_usage_at(dir_fd),
        }

    # -- logs --------------------------------------------------------------------------

    def read_log(
        self,
        session_id: str,
        file_name: str,
        cursor: Union[str, int, None] = None,
        limit: Optional[int] = None,
        max_bytes: Optional[int] = None,
    ) -> Dict[str, Any]:
        """A log slice (see ``read_log_slice``) of one of LOG_FILES of a session.

        A session without that file gives an empty slice. Raises InvalidSessionId,
        InvalidArgument (file name, limit, max_bytes), InvalidCursor, SessionNotFound,
        WorkspacesUnavailable.
        """
        _require_session_id(session_id)
        self._require_log_name(file_name)
        limit, max_bytes = _slice_limits(limit, max_bytes)
        parsed = _parse_cursor(cursor)
        with self._os_errors("reading {} of session {}".format(file_name, session_id), session_id):
            with self._session_fd(session_id) as dir_fd:
                return _read_slice(
                    lambda: os.open(file_name, _READ_FLAGS, dir_fd=dir_fd),
                    parsed,
                    limit,
                    max_bytes,
                    file_name,
                    accept=lambda st: _is_own_log(dir_fd, file_name, st),
                )

    def _gateway_dir_or_none(self) -> Optional[int]:
        """``<root>/_gateway`` opened for reading (never through a symlink), or None while it does not exist
        (nothing has been logged yet). Checks the root first; raises OSError for any other failure."""
        self.check_root()
        try:
            return os.open(str(self.root / GATEWAY_DIR_NAME), _DIR_FLAGS)
        except OSError as exc:
            if exc.errno not in _MISSING_ERRNOS:
                raise
            return None

    def read_gateway_log(
        self,
        cursor: Union[str, int, None] = None,
        limit: Optional[int] = None,
        max_bytes: Optional[int] = None,
    ) -> Dict[str, Any]:
        """A log slice of ``<root>/_gateway/gateway.log`` (empty while it does not exist).

        Raises InvalidArgument, InvalidCursor, WorkspacesUnavailable.
        """
        limit, max_bytes = _slice_limits(limit, max_bytes)
        parsed = _parse_cursor(cursor)
        with self._os_errors("reading the gateway log", None):
            dir_fd = self._gateway_dir_or_none()
            if dir_fd is None:
                return _missing_slice(GATEWAY_LOG_NAME, parsed)
            try:
                return _read_slice(
                    lambda: os.open(GATEWAY_LOG_NAME, _READ_FLAGS, dir_fd=dir_fd),
                    parsed,
                    limit,
                    max_bytes,
                    GATEWAY_LOG_NAME,
                )
            finally:
                os.close(dir_fd)

    def log_identity(self, session_id: Optional[str], file_name: str) -> Optional[Tuple[int, int, int]]:
        """``(st_dev, st_ino, st_size)`` of a session's log (of ``_gateway/gateway.log`` when
        ``session_id`` is None), or None when it is missing or not a regular file: one ``stat``, what a
        follower polls to learn that a file grew or was replaced before reading it. Raises
        SessionNotFound, WorkspacesUnavailable."""
        if session_id is None:  # the gateway's own log, or its audit trail (both in _gateway)
            where, name = self.root / GATEWAY_DIR_NAME, (AUDIT_LOG_NAME if file_name == AUDIT_LOG_NAME else GATEWAY_LOG_NAME)
        else:
            _require_session_id(session_id)
            self._require_log_name(file_name)
            where, name = self.root / session_id, file_name
        try:
            st = os.stat(str(where / name), follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in _MISSING_ERRNOS:
                raise WorkspacesUnavailable("cannot stat {}: {}".format(name, exc.strerror or exc)) from exc
            if session_id is not None and not os.path.isdir(str(where)):
                raise SessionNotFound(self._not_found(session_id)) from None
            return None
        return (st.st_dev, st.st_ino, st.st_size) if stat.S_ISREG(st.st_mode) else None

    def append_gateway_log(self, name: str, data: bytes, rotate_bytes: int, backups: int) -> Dict[str, Any]:
        """Append ``data`` to ``<root>/_gateway/<name>`` (one of GATEWAY_LOG_FILES); past ``rotate_bytes``,
        rotate it: ``<name>`` becomes ``<name>.1``, and so on, keeping ``backups`` older files.

        ``_gateway`` is opened from a descriptor of the root with O_NOFOLLOW, and the file relative to
        it, on every call: ``_gateway`` swapped for a symlink (anyone who can write the root can) is
        never followed, so nothing is written or renamed outside the root. ``_gateway`` is created when
        missing, but never the root: a missing root is the operator's to fix (``check_root`` says so).
        Only a regular file of one link is written (a second link may be a name outside the root), and
        it is opened with O_NONBLOCK, so a FIFO planted as the log cannot block the caller.

        Returns ``{"written": True, "rotated": bool}``, or, when something failed, ``"error"`` (a text)
        and ``"unsafe"`` besides: True when ``_gateway`` or the log is a symlink, not a real directory
        or file, or has a second link, and is left alone until someone removes it. Raises only
        InvalidArgument (another name): a failing disk is an answer, for the caller to count and go on.
        """
        if name not in GATEWAY_LOG_FILES:
            raise InvalidArgument("the gateway's logs are {}, not {}".format(", ".join(GATEWAY_LOG_FILES), _show(name)))
        try:
            root_fd = os.open(str(self.root), os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
        except (OSError, ValueError) as exc:  # the root's problem, not the log's: health reports it as such
            return {"written": False, "unsafe": False, "error": "workspaces root: {}".format(
                getattr(exc, "strerror", None) or exc)}
        written = False
        try:
            dir_fd = self._open_gateway_dir(root_fd)
            try:
                fd = os.open(name, _APPEND_FLAGS, 0o640, dir_fd=dir_fd)
                try:
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode) or not _has_one_link(st):
                        raise OSError(errno.EPERM, "{} is not a regular file of one link; it is left alone".format(name))
                    _write_all(fd, bytes(data))
                    written = True
                    size = os.fstat(fd).st_size
                finally:
                    os.close(fd)
                if size > rotate_bytes:
                    _rotate_at(dir_fd, name, backups)
                    return {"written": True, "rotated": True}
            finally:
                os.close(dir_fd)
        except OSError as exc:
            return {"written": written, "unsafe": exc.errno in _UNSAFE_LOG_ERRNOS, "error": exc.strerror or str(exc)}
        finally:
            os.close(root_fd)
        return {"written": True, "rotated": False}

    def append_log(self, session_id: str, file_name: str, data: bytes) -> Optional[str]:
        """Append ``data`` to one of LOG_FILES of a session, creating the file if needed.

        The only way the server writes logs: it holds the session lock, so appends never
        interleave with a reset or a compaction, and it opens the file per call, so the
        append after a reset or compaction lands in the new live file.

        A live log with a second hard link (``ln /outside/file run.log``: the other name may be
        outside the session) is never appended to: it is moved into a new ``archive/<stamp>/``,
        ``data`` goes to a fresh file, ``linked_logs_moved`` counts it, and the return value says
        where it went (``"archive/<stamp>/run.log"``) for the caller to log. Otherwise None.
        Raises InvalidSessionId, InvalidArgument, SessionNotFound, WorkspacesUnavailable
        (e.g. the name is a symlink, which is never written through), StorageFull.
        """
        _require_session_id(session_id)
        self._require_log_name(file_name)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidArgument("data must be bytes, got {}".format(type(data).__name__))
        if not data:
            return None
        doing = "appending to {} of session {}".format(file_name, session_id)
        with self.session_lock(session_id), self._os_errors(doing, session_id, "the data was not fully written"):
            with self._session_fd(session_id) as dir_fd:
                fd, moved = self._open_for_append(session_id, file_name, dir_fd)
                try:
                    _write_all(fd, bytes(data))
                finally:
                    os.close(fd)
        return moved

    def write_heartbeat(self, session_id: str, state: Mapping[str, Any]) -> None:
        """Merge ``state`` over ``heartbeat_state.json`` (its keys replace the stored ones, the others stay)
        and write the result atomically (temp file in the same directory, then rename), so a reader sees
        the old state or the new one, never a partial file.

        Raises InvalidSessionId, InvalidArgument (not a JSON object, or over
        MAX_HEARTBEAT_BYTES), SessionNotFound, WorkspacesUnavailable, StorageFull.
        """
        _require_session_id(session_id)
        if not isinstance(state, Mapping):
            raise InvalidArgument("heartbeat state must be a JSON object, got {}".format(type(state).__name__))
        try:
            json.dumps(dict(state), allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise InvalidArgument("heartbeat state is not JSON-serializable: {}".format(exc)) from None
        doing = "writing the heartbeat of session {}".format(session_id)
        with self.session_lock(session_id), self._os_errors(doing, session_id, "the previous heartbeat is intact"):
            with self._session_fd(session_id) as dir_fd:
                # Merged over the stored object: keys another writer keeps there (UA's HeartbeatService:
                # last_summary, last_message_hash, ...) survive; a missing or broken file counts as {}.
                merged = _heartbeat_at(dir_fd) or {}
                merged.update(state)
                data = json.dumps(merged, allow_nan=False).encode("utf-8")
                if len(data) > MAX_HEARTBEAT_BYTES:
                    raise InvalidArgument(
                        "heartbeat state is {} bytes; at most {} are accepted".format(len(data), MAX_HEARTBEAT_BYTES)
                    )
                _replace_file_at(dir_fd, HEARTBEAT_FILE_NAME, data)

    # -- archives (PROTOCOL.md §16) ------------------------------------------------------

    def list_archives(self, session_id: str) -> Dict[str, Any]:
        """The session's archives, newest DETAILS_MAX_ENTRIES stamps, oldest first:
        ``{"session_id", "archives": [{"stamp", "created", "disk_bytes", "files": [{"name", "kind",
        "compressed", "bytes", "disk_bytes"}]}], "archives_total", "archives_truncated", "disk_bytes"}``.
        ``bytes`` is a log's own length (inflated), ``disk_bytes`` what the file system holds (du-style,
        index included). Raises InvalidSessionId, SessionNotFound, WorkspacesUnavailable, ArchiveCorrupt.
        """
        _require_session_id(session_id)
        with self._os_errors("listing the archives of session {}".format(session_id), session_id):
            with self._session_fd(session_id) as dir_fd:
                stamps = [name for name in _list_dir_at(ARCHIVE_DIR_NAME, dir_fd) if ARCHIVE_STAMP_RE.fullmatch(name)]
                shown = sorted(heapq.nlargest(DETAILS_MAX_ENTRIES, stamps, key=_stamp_sort_key), key=_stamp_sort_key)
                archives = []
                with _dir_at(ARCHIVE_DIR_NAME, dir_fd) as archive_fd:
                    for stamp in shown if archive_fd is not None else []:
                        entry = self._archive_entry(session_id, stamp, archive_fd)  # type: ignore[arg-type]
                        if entry is not None:
                            archives.append(entry)
        return {"session_id": session_id, "archives": archives, "archives_total": len(stamps),
                "archives_truncated": len(stamps) > DETAILS_MAX_ENTRIES,
                "disk_bytes": sum(archive["disk_bytes"] for archive in archives)}

    def _archive_entry(self, session_id: str, stamp: str, archive_fd: int) -> Optional[Dict[str, Any]]:
        with _dir_at(stamp, archive_fd) as stamp_fd:
            if stamp_fd is None:
                return None
            names = set(os.listdir(stamp_fd))
            files = []
            seen: set = set()
            for name in sorted(names):
                if name in LOG_FILES or name.endswith(_ARCHIVE_TEMP_SUFFIX):
                    continue  # plain logs are listed below with their compressed forms
                base = name[: -len(ARCHIVE_GZ_SUFFIX)] if name.endswith(ARCHIVE_GZ_SUFFIX) else None
                if base in LOG_FILES and base in names:
                    continue  # mid-swap (or killed there): the plain file is the copy; this .gz goes
                try:
                    if base in LOG_FILES:
                        files.append(self._archived_log_entry(session_id, stamp, stamp_fd, base, seen))
                    elif name.endswith(ARCHIVE_INDEX_SUFFIX) and name[: -len(ARCHIVE_INDEX_SUFFIX)] in LOG_FILES:
                        continue  # counted with its .gz
                    else:
                        usage = _disk_usage_at(name, stamp_fd, seen)
                        mode = os.stat(name, dir_fd=stamp_fd, follow_symlinks=False).st_mode
                        files.append({"name": name, "kind": "dir" if stat.S_ISDIR(mode) else "file",
                                      "compressed": False, "bytes": None, "disk_bytes": usage})
                except FileNotFoundError:
                    continue  # removed since the listing (the compressor's swap, a prune): not there
            for name in LOG_FILES:
                if name in names:
                    try:
                        st = os.stat(name, dir_fd=stamp_fd, follow_symlinks=False)
                    except FileNotFoundError:
                        # Compressed since the listing: the .gz was in place before the plain file went.
                        try:
                            files.append(self._archived_log_entry(session_id, stamp, stamp_fd, name, seen))
                        except FileNotFoundError:
                            pass
                        continue
                    files.append({"name": name, "kind": "log", "compressed": False, "bytes": st.st_size,
                                  "disk_bytes": _disk_usage_at(name, stamp_fd, seen)})
            created = _stamp_created(stamp, os.fstat(stamp_fd))
        return {"stamp": stamp, "created": created, "files": files,
                "disk_bytes": sum(entry["disk_bytes"] for entry in files)}

    def _archived_log_entry(self, session_id: str, stamp: str, stamp_fd: int, name: str, seen: set) -> Dict[str, Any]:
        gz_name = name + ARCHIVE_GZ_SUFFIX
        gz_st = os.stat(gz_name, dir_fd=stamp_fd, follow_symlinks=False)
        where = "{}/{}/{}/{}".format(session_id, ARCHIVE_DIR_NAME, stamp, gz_name)
        try:
            size: Optional[int] = _read_archive_index_at(stamp_fd, name, gz_st.st_size, where)[0]
        except ArchiveCorrupt:
            size = None  # listed, so an operator sees it; reading it answers why
        usage = _disk_usage_at(gz_name, stamp_fd, seen) + _disk_usage_at(name + ARCHIVE_INDEX_SUFFIX, stamp_fd, seen)
        return {"name": name, "kind": "log", "compressed": True, "bytes": size, "disk_bytes": usage}

    def read_archive_log(
        self,
        session_id: str,
        stamp: str,
        file_name: str,
        cursor: Union[str, int, None] = None,
        limit: Optional[int] = None,
        max_bytes: Optional[int] = None,
    ) -> Dict[str, Any]:
        """A log slice (as ``read_log``) of ``archive/<stamp>/<file_name>``, plain or compressed alike;
        the answer adds ``archive`` (the stamp) and ``compressed``. Cursors count bytes of the log and
        stay valid across its compression. ``stamp`` and ``file_name`` are names, never paths.

        Raises InvalidSessionId, InvalidArgument (stamp, file name, limit, max_bytes), InvalidCursor,
        SessionNotFound, ArchiveNotFound, ArchiveCorrupt, WorkspacesUnavailable.
        """
        _require_session_id(session_id)
        if not isinstance(stamp, str) or not ARCHIVE_STAMP_RE.fullmatch(stamp):
            raise InvalidArgument("archive stamp must look like 20261130_124933_123456 (as GET .../archives "
                                  "lists them), got {}".format(_show(stamp)))
        self._require_log_name(file_name)
        limit, max_bytes = _slice_limits(limit, max_bytes)
        parsed = _parse_cursor(cursor)
        where = "{}/{}/{}/{}".format(session_id, ARCHIVE_DIR_NAME, stamp, file_name)
        missing = "Session {} has no archived {}; GET /api/v1/ops/sessions/{}/archives lists what it has".format(
            session_id, "{}/{}/{}".format(ARCHIVE_DIR_NAME, stamp, file_name), session_id)
        with self._os_errors("reading {}".format(where), session_id):
            with self._session_fd(session_id) as dir_fd, _dir_at(ARCHIVE_DIR_NAME, dir_fd) as archive_fd:
                if archive_fd is None:
                    raise ArchiveNotFound(missing)
                with _dir_at(stamp, archive_fd) as stamp_fd:
                    if stamp_fd is None:
                        raise ArchiveNotFound(missing)
                    identity = _archive_identity(stamp, file_name)
                    result = self._archive_slice(stamp_fd, dir_fd, file_name, identity, parsed, limit, max_bytes, where)
                    if result is None:
                        raise ArchiveNotFound(missing)
        return {**result, "archive": stamp}

    @staticmethod
    def _archive_slice(
        stamp_fd: int, dir_fd: int, name: str, identity: Tuple[int, int], cursor: Optional[LogCursor],
        limit: int, max_bytes: int, where: str,
    ) -> Optional[Dict[str, Any]]:
        # The plain file first: compression removes it only after the .gz and index are in place, so
        # a reader that misses it finds them. Two links are accepted only when the other is the live log
        # (a compaction between its link and its swap): never a name outside the session.
        plain = _open_regular(lambda: os.open(name, _READ_FLAGS, dir_fd=stamp_fd),
                              lambda st: st.st_nlink == 1 or (st.st_nlink == 2 and _same_file_at(name, dir_fd, st)))
        if plain is not None:
            fd, st = plain
            try:
                for _ in range(_FILE_CHANGED_RETRIES):
                    try:
                        view = _StreamStat(os.fstat(fd).st_size, *identity)
                        return {"file": name, **_slice_open_file(fd, view, cursor, limit, max_bytes), "compressed": False}
                    except _FileChanged:
                        continue
            finally:
                os.close(fd)
            raise WorkspacesUnavailable("{} kept shrinking while it was being read; retry the request".format(where))
        packed = _open_regular(lambda: os.open(name + ARCHIVE_GZ_SUFFIX, _READ_FLAGS, dir_fd=stamp_fd), _has_one_link)
        if packed is None:
            return None
        gz_fd, gz_st = packed
        try:
            size, members = _read_archive_index_at(stamp_fd, name, gz_st.st_size, where + ARCHIVE_GZ_SUFFIX)
            stream = _ArchiveStream(gz_fd, size, members, where + ARCHIVE_GZ_SUFFIX)
            try:
                result = _slice_open_file(stream, _StreamStat(size, *identity), cursor, limit, max_bytes)
            except _FileChanged:
                raise ArchiveCorrupt("{}{} ends before its index says; the archive is not read".format(
                    where, ARCHIVE_GZ_SUFFIX)) from None
        finally:
            os.close(gz_fd)
        return {"file": name, **result, "compressed": True}

    def archive_session_ids(self) -> List[str]:
        """Ids of the sessions that have an ``archive/`` directory (for the compressor's first pass)."""
        with self._os_errors("listing sessions with archives", None):
            self.check_root()
            found = []
            with os.scandir(str(self.root)) as iterator:
                for entry in iterator:
                    if SESSION_ID_RE.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
                        found.append(entry.name)
        return [session_id for session_id in sorted(found) if self._has_archive(session_id)]

    def _has_archive(self, session_id: str) -> bool:
        try:
            with self._session_fd(session_id) as dir_fd, _dir_at(ARCHIVE_DIR_NAME, dir_fd) as archive_fd:
                return archive_fd is not None
        except (OSError, OpsError):
            return False

    def compress_archives(
        self, session_id: str, stop: Optional[Callable[[], bool]] = None, min_age: float = 0.0
    ) -> Dict[str, int]:
        """Finish or undo what a killed compression left in the session's archives, then compress each
        plain archived log (see the Archives section) last written ``min_age`` s ago or earlier (a younger
        one is left for later: an operator may be reading it, an agent still appending to its inode).
        ``stop()`` true ends the pass between files. Returns ``{"files", "bytes", "compressed_bytes"}``
        compressed by this call and ``deferred``, the files left for being too young. Takes the session
        lock only to recover and to swap, so appends never wait for a deflate. Raises InvalidSessionId, SessionNotFound,
        WorkspacesUnavailable, StorageFull."""
        _require_session_id(session_id)
        done = {"files": 0, "bytes": 0, "compressed_bytes": 0, "deferred": 0}
        newest_ns = time.time_ns() - int(min_age * 1e9)
        with self._os_errors("compressing the archives of session {}".format(session_id), session_id,
                             "the plain archived logs are kept"):
            with self._session_fd(session_id) as dir_fd:
                for stamp in sorted(_list_dir_at(ARCHIVE_DIR_NAME, dir_fd), key=_stamp_sort_key):
                    if not ARCHIVE_STAMP_RE.fullmatch(stamp):
                        continue
                    lock = self.session_lock(session_id)
                    with _dir_at(ARCHIVE_DIR_NAME, dir_fd) as archive_fd:
                        stamp_fd = None if archive_fd is None else _open_dir_at(stamp, archive_fd)
                        if stamp_fd is None:
                            continue
                        stamp_st = os.fstat(stamp_fd)
                        try:
                            with lock:
                                pending = _recover_stamp_at(stamp_fd)
                            for name in pending:
                                if stop is not None and stop():
                                    return done
                                where = "{}/{}/{}/{}".format(session_id, ARCHIVE_DIR_NAME, stamp, name)
                                if os.stat(name, dir_fd=stamp_fd, follow_symlinks=False).st_mtime_ns > newest_ns:
                                    done["deferred"] += 1
                                    continue
                                result = _compress_archive_at(stamp_fd, name, where, lock)
                                if result is not None:
                                    done["files"] += 1
                                    done["bytes"] += result["bytes"]
                                    done["compressed_bytes"] += result["compressed_bytes"]
                        finally:
                            try:
                                _keep_mtime(stamp_fd, stamp_st)
                            finally:
                                os.close(stamp_fd)
        return done

    # -- reset, compact, delete --------------------------------------------------------

    def reset_session(
        self,
        session_id: str,
        clear_logs: bool = True,
        clear_memory: bool = False,
        clear_work_products: bool = False,
    ) -> Dict[str, Any]:
        """Move the chosen items into a new ``archive/<stamp>/`` (rename, never copy).

        Returns ``{"status": "reset", "archived": [names], "archive_dir": "<root>/<id>/archive/<stamp>",
        "archive_path": "archive/<stamp>", "bytes_dropped", "bytes_archived", "bytes_freed"}``; both paths are
        None when there was nothing to move. ``bytes_dropped``: the live logs' bytes moved out; ``bytes_archived``:
        the bytes the new archive holds; ``bytes_freed``: du-style bytes released (0: a rename frees nothing). ``work_products/`` is
        recreated empty when it was cleared.
        Raises InvalidSessionId, InvalidArgument, SessionNotFound, WorkspacesUnavailable,
        StorageFull.
        """
        _require_session_id(session_id)
        items: List[str] = []
        if _require_bool("clear_logs", clear_logs):
            items.extend(LOG_FILES)
        if _require_bool("clear_memory", clear_memory):
            items.extend((MEMORY_FILE_NAME, MEMORY_DIR_NAME))
        if _require_bool("clear_work_products", clear_work_products):
            items.append(WORK_PRODUCTS_DIR_NAME)
        doing = "resetting session {}".format(session_id)
        with self.session_lock(session_id), self._os_errors(doing, session_id):
            with self._session_fd(session_id) as dir_fd:
                present = [name for name in items if _lexists_at(name, dir_fd)]
                archived: List[str] = []
                archive_dir = None
                before = sum(_disk_usage_at(name, dir_fd) for name in present)
                dropped = sum(_apparent_bytes_at(name, dir_fd) for name in present if name in LOG_FILES)
                held = after = 0
                if present:
                    stamp, stamp_fd = self._new_archive(session_id, dir_fd)
                    try:
                        for name in present:
                            try:
                                os.rename(name, name, src_dir_fd=dir_fd, dst_dir_fd=stamp_fd)
                            except FileNotFoundError:
                                continue  # gone since we looked: nothing to archive
                            archived.append(name)
                        held = sum(_apparent_bytes_at(name, stamp_fd) for name in archived)
                        after = sum(_disk_usage_at(name, stamp_fd) for name in archived)
                    finally:
                        os.close(stamp_fd)
                    archive_dir = "{}/{}".format(ARCHIVE_DIR_NAME, stamp)
                if clear_work_products:
                    _mkdir_at(WORK_PRODUCTS_DIR_NAME, dir_fd)
                after += sum(_disk_usage_at(name, dir_fd) for name in present)
        return {"status": "reset", "archived": archived, **self._archive_paths(session_id, archive_dir),
                "bytes_dropped": dropped, "bytes_archived": held, "bytes_freed": max(0, before - after)}

    def _archive_paths(self, session_id: str, relative: Optional[str]) -> Dict[str, Optional[str]]:
        """``archive_dir`` absolute (as UA answers) and ``archive_path`` relative to the session (ours)."""
        return {"archive_dir": None if relative is None else str(self.root / session_id / relative),
                "archive_path": relative}

    def set_description(self, session_id: str, description: object) -> Dict[str, Any]:
        """Write ``description.txt`` (stripped; atomically), which the summary's description shows first.

        Returns ``{"status": "updated", "session_id", "updates": {"description": text}}``. Raises
        InvalidSessionId, InvalidArgument (not a string, over MAX_DESCRIPTION_CHARS), SessionNotFound,
        WorkspacesUnavailable, StorageFull.
        """
        _require_session_id(session_id)
        if not isinstance(description, str):
            raise InvalidArgument("description must be a string, got {}".format(_show(description)))
        text = description.strip()
        if len(text) > MAX_DESCRIPTION_CHARS:
            raise InvalidArgument(
                "description is {} characters; at most {} are accepted".format(len(text), MAX_DESCRIPTION_CHARS)
            )
        doing = "writing the description of session {}".format(session_id)
        with self.session_lock(session_id), self._os_errors(doing, session_id, "the previous description is intact"):
            with self._session_fd(session_id) as dir_fd:
                _replace_file_at(dir_fd, DESCRIPTION_FILE_NAME, text.encode("utf-8", "replace"))
        return {"status": "updated", "session_id": session_id, "updates": {"description": text}}

    def require_session(self, session_id: str) -> None:
        """Raise InvalidSessionId or SessionNotFound unless ``session_id`` names a session directory."""
        _require_session_id(session_id)
        with self._os_errors("looking up session {}".format(session_id), session_id):
            self.session_dir(session_id)

    def compact_session(
        self,
        session_id: str,
        max_lines: Optional[int] = None,
        max_bytes: Optional[int] = None,
        archive: bool = True,
    ) -> Dict[str, Any]:
        """Keep only the last ``max_lines`` complete lines within ``max_bytes`` of each live
        log, plus an unfinished last line as it is. Nothing is lost: the full pre-compact
        file goes to a new ``archive/<stamp>/``, and bytes appended during the call end up
        in the live file. A log with nothing to drop is left alone. With ``archive`` False the
        dropped head is deleted instead (the caller audits that: PROTOCOL.md §16.1).

        Returns ``{"status": "compacted", "files": {name: kept_lines}, "bytes_dropped": n,
        "bytes_archived": n, "bytes_freed": n, "archived": bool, "archive_dir": "<root>/<id>/archive/<stamp>"
        or None, "archive_path": "archive/<stamp>" or None}``: bytes left the live logs, bytes the new
        archive holds, and bytes the file system released (du-style, measured before and after; 0 when the
        archive keeps them).
        Raises InvalidSessionId, InvalidArgument, SessionNotFound, WorkspacesUnavailable,
        StorageFull.
        """
        _require_session_id(session_id)
        max_lines = _non_negative_int("max_lines", max_lines, COMPACT_DEFAULT_MAX_LINES)
        max_bytes = _non_negative_int("max_bytes", max_bytes, COMPACT_DEFAULT_MAX_BYTES)
        keep_archive = _require_bool("archive", archive)
        files: Dict[str, int] = {}
        dropped = 0
        archived = 0
        freed = 0
        new_archive: Optional[Tuple[str, int]] = None
        doing = "compacting session {}".format(session_id)
        with self.session_lock(session_id), self._os_errors(doing, session_id):
            with self._session_fd(session_id) as dir_fd:
                before = sum(_disk_usage_at(name, dir_fd) for name in LOG_FILES)
                held: List[os.stat_result] = []
                try:
                    for name in LOG_FILES:
                        # A log with an outside name is left alone: its tail must not become
                        # the session's (the next append_log moves it aside).
                        opened = _open_regular(
                            lambda: os.open(name, _READ_FLAGS, dir_fd=dir_fd),
                            lambda st: _is_own_log(dir_fd, name, st),
                        )
                        if opened is None:
                            continue
                        fd, st = opened
                        try:
                            plan, st = self._plan(fd, st, max_lines, max_bytes)
                            files[name] = plan.kept_lines
                            if plan.keep_start == 0:
                                continue
                            if new_archive is None and keep_archive:
                                new_archive = self._new_archive(session_id, dir_fd)
                            archive_fd = None if new_archive is None else new_archive[1]
                            if self._compact_file(dir_fd, name, fd, st, plan.keep_start, archive_fd):
                                dropped += plan.keep_start
                                old = os.fstat(fd)
                                if old.st_nlink > 0:
                                    held.append(old)  # still named (in an archive): its blocks stay used
                        finally:
                            os.close(fd)
                    # Measured once every descriptor of a dropped head is closed: what du now sees.
                    seen: set = set()
                    after = sum(_disk_usage_at(name, dir_fd, seen) for name in LOG_FILES)
                    if new_archive is not None:
                        archived = sum(os.stat(name, dir_fd=new_archive[1], follow_symlinks=False).st_size
                                       for name in os.listdir(new_archive[1]))
                        after += sum(_disk_usage_at(name, new_archive[1], seen) for name in os.listdir(new_archive[1]))
                    # A dropped head another name still holds (an older archive's link, left by a compaction
                    # killed between its link and its swap) frees nothing, even with archive False.
                    for old in held:
                        if (old.st_dev, old.st_ino) not in seen:
                            seen.add((old.st_dev, old.st_ino))
                            after += _disk_bytes(old)
                    freed = max(0, before - after)
                finally:
                    if new_archive is not None:
                        os.close(new_archive[1])
        return {
            "status": "compacted",
            "files": files,
            "bytes_dropped": dropped,
            "bytes_archived": archived,
            "bytes_freed": freed,
            "archived": keep_archive,
            **self._archive_paths(session_id, None if new_archive is None else "{}/{}".format(ARCHIVE_DIR_NAME, new_archive[0])),
        }

    def delete_session(self, session_id: str) -> Dict[str, str]:
        """Delete a session directory: first renamed into ``_gateway/trash/`` (so it stops
        being listed at once), then removed there. Symlinks are removed, never followed.

        Returns ``{"status": "deleted", "session_id"}``. Raises InvalidSessionId,
        SessionNotFound, WorkspacesUnavailable.
        """
        _require_session_id(session_id)
        doing = "deleting session {}".format(session_id)
        with self.session_lock(session_id), self._os_errors(doing, session_id):
            path = self.session_dir(session_id)
            trashed = self._move_to_trash(session_id)
            if trashed is None:
                # No trash (full disk, another volume): remove in place; rmtree never
                # follows symlinks.
                shutil.rmtree(path)
            else:
                self._remove_from_trash(trashed)
        return {"status": "deleted", "session_id": session_id}

    # -- internals: paths and errors ---------------------------------------------------

    def _not_found(self, session_id: str) -> str:
        return "Session {} not found under {}".format(session_id, self.root)

    @staticmethod
    def _require_log_name(file_name: object) -> None:
        if not isinstance(file_name, str) or file_name not in LOG_FILES:
            raise InvalidArgument(
                "file must be one of {}, got {}".format(", ".join(LOG_FILES), _show(file_name))
            )

    @contextmanager
    def _session_fd(self, session_id: str) -> Iterator[int]:
        """A descriptor of the session directory: every name inside is opened relative to it,
        so the directory cannot be swapped for a symlink halfway through an operation."""
        self.check_root()
        try:
            dir_fd = os.open(str(self.root / session_id), _DIR_FLAGS)
        except OSError as exc:
            if exc.errno not in _MISSING_ERRNOS:
                raise
            self.check_root()
            raise SessionNotFound(self._not_found(session_id)) from None
        try:
            yield dir_fd
        finally:
            os.close(dir_fd)

    @contextmanager
    def _os_errors(
        self, doing: str, session_id: Optional[str], lost: str = "nothing was lost"
    ) -> Iterator[None]:
        """Turn an OSError into the OpsError that says what happened."""
        try:
            yield
        except OSError as exc:
            raise self._translate(exc, doing, session_id, lost) from exc

    def _translate(self, exc: OSError, doing: str, session_id: Optional[str], lost: str) -> OpsError:
        if exc.errno in _NO_SPACE_ERRNOS:
            return StorageFull(
                "No space left on the workspaces volume ({}) while {}; {}. Free some space "
                "and retry".format(self.root, doing, lost)
            )
        try:
            self.check_root()
        except WorkspacesUnavailable as unavailable:
            return unavailable
        if session_id is not None and is_valid_session_id(session_id):
            try:
                st = os.lstat(self.root / session_id)
            except OSError:
                return SessionNotFound(self._not_found(session_id))
            if not stat.S_ISDIR(st.st_mode):
                return SessionNotFound(self._not_found(session_id))
        name = " ({})".format(exc.filename) if exc.filename else ""
        return WorkspacesUnavailable(
            "Failed while {}: {}{}; check the workspaces volume at {}".format(
                doing, exc.strerror or exc, name, self.root
            )
        )

    def _make_session_dir(self, session_id: str) -> bool:
        """Make ``<root>/<id>/``; True when it was made now, False when it was there already."""
        path = self.root / session_id
        try:
            os.mkdir(path)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                raise InvalidArgument(
                    "{} exists under the workspaces root but is not a session directory; "
                    "choose another session id".format(_show(session_id))
                ) from None
            return False
        return True

    def _make_new_session_dir(self) -> str:
        while True:
            session_id = new_session_id()
            try:
                os.mkdir(self.root / session_id)
            except FileExistsError:
                continue  # 32 random bits collided within one second: draw again
            return session_id

    def _open_for_append(self, session_id: str, file_name: str, dir_fd: int) -> Tuple[int, Optional[str]]:
        """A descriptor to append to: a regular file whose only name is ``file_name``. Returns
        it and, when a hard-linked file had to be moved aside first, where that went."""
        moved: Optional[str] = None
        exclusive = False
        for _ in range(_RELINK_RETRIES):
            # After a move the name is created anew with O_EXCL, so a link planted meanwhile
            # fails the create instead of being opened.
            flags = _APPEND_FLAGS | (os.O_EXCL if exclusive else 0)
            try:
                fd = self._open_regular_for_append(session_id, file_name, dir_fd, flags)
            except FileExistsError:
                exclusive = False  # something took the name since the move: look at it again
                continue
            try:
                if _has_one_link(os.fstat(fd)):
                    return fd, moved
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            moved = self._move_linked_log(session_id, file_name, dir_fd)
            exclusive = True
        raise WorkspacesUnavailable(
            "{} of session {} is hard-linked again each time it is moved aside; the gateway "
            "never writes to a file with another name (it may be outside the session): find "
            "what plants the link".format(file_name, session_id)
        )

    def _open_regular_for_append(self, session_id: str, file_name: str, dir_fd: int, flags: int) -> int:
        refused = WorkspacesUnavailable(
            "{} of session {} is not a regular file (a symlink, directory or device); the "
            "gateway never writes through it: remove or rename it".format(file_name, session_id)
        )
        try:
            fd = os.open(file_name, flags, 0o644, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                raise refused from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise refused
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _move_linked_log(self, session_id: str, file_name: str, dir_fd: int) -> str:
        """Move a hard-linked live log into a new archive (a rename: its bytes, and the other
        name, are left as they are); returns where it went, relative to the session."""
        stamp, stamp_fd = self._new_archive(session_id, dir_fd)
        try:
            os.rename(file_name, file_name, src_dir_fd=dir_fd, dst_dir_fd=stamp_fd)
        except FileNotFoundError:
            pass  # removed since we opened it: nothing left to move
        finally:
            os.close(stamp_fd)
        with self._locks_guard:
            self.linked_logs_moved += 1
        return "{}/{}/{}".format(ARCHIVE_DIR_NAME, stamp, file_name)

    @staticmethod
    def _open_gateway_dir(root_fd: int) -> int:
        """A descriptor of ``_gateway`` (created if missing), never through a symlink (OSError ELOOP or ENOTDIR)."""
        try:
            return os.open(GATEWAY_DIR_NAME, _DIR_FLAGS, dir_fd=root_fd)
        except FileNotFoundError:
            try:
                os.mkdir(GATEWAY_DIR_NAME, 0o750, dir_fd=root_fd)
            except FileExistsError:
                pass
            return os.open(GATEWAY_DIR_NAME, _DIR_FLAGS, dir_fd=root_fd)

    @staticmethod
    def _unlink_quietly(name: str, dir_fd: int) -> None:
        try:
            os.unlink(name, dir_fd=dir_fd)
        except OSError:
            pass

    # -- internals: listing ------------------------------------------------------------

    def _scan_sessions(self) -> List[_SessionScan]:
        self.check_root()
        try:
            # The root itself may be an operator's symlink: followed, like everywhere else.
            root_fd = os.open(str(self.root), os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
        except OSError:
            self.check_root()
            raise
        scans = []
        try:
            with os.scandir(root_fd) as iterator:
                for entry in iterator:
                    name = entry.name
                    if not is_valid_session_id(name):
                        continue
                    try:
                        if not entry.is_dir(follow_symlinks=False):
                            continue
                    except OSError:
                        continue  # removed mid-scan: not a session any more
                    scan = self._scan_session_dir(name, root_fd)
                    if scan is not None:
                        scans.append(scan)
        finally:
            os.close(root_fd)
        return scans

    def _scan_session_dir(self, session_id: str, root_fd: int) -> Optional[_SessionScan]:
        """The scan of one session, read through a descriptor of its directory (O_NOFOLLOW),
        so a session swapped for a symlink after the root's scan is skipped, never followed."""
        try:
            dir_fd = _open_dir_at(session_id, root_fd)
        except OSError:
            return self._scan_unreadable(session_id, root_fd)
        if dir_fd is None:
            return None  # removed, or replaced by a symlink, since the root's scan
        try:
            dir_stat = os.fstat(dir_fd)
            if dir_stat.st_nlink == 0:
                return None  # removed since it was opened: not a session any more
            kinds = self._cached_kinds(session_id, dir_fd, dir_stat)
            return _SessionScan(
                session_id, dir_stat.st_mtime_ns, kinds, _activity_ns(dir_fd, kinds, dir_stat.st_mtime_ns)
            )
        finally:
            os.close(dir_fd)

    @staticmethod
    def _scan_unreadable(session_id: str, root_fd: int) -> Optional[_SessionScan]:
        # A directory the gateway may not open is listed with what the root's entry tells.
        try:
            dir_stat = os.stat(session_id, dir_fd=root_fd, follow_symlinks=False)
        except OSError:
            return None
        if not stat.S_ISDIR(dir_stat.st_mode):
            return None
        return _SessionScan(session_id, dir_stat.st_mtime_ns, {}, dir_stat.st_mtime_ns)

    def _cached_kinds(self, session_id: str, dir_fd: int, dir_stat: os.stat_result) -> Dict[str, str]:
        # Which entries a directory holds changes only with its mtime, so a listing re-reads only
        # the directories that changed. One changed within the last second is read every time: a
        # second change within the mtime's granularity would not move it (git's "racy" rule).
        key = (dir_stat.st_ino, dir_stat.st_mtime_ns)
        cached = self._kinds_cache.get(session_id)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            with os.scandir(dir_fd) as iterator:
                kinds = _entry_kinds(iterator)
        except OSError:
            return {}  # unreadable: listed with what the directory's own stat tells
        if time.time_ns() - dir_stat.st_mtime_ns > _RACY_NS:
            if len(self._kinds_cache) >= _KINDS_CACHE_MAX:
                self._kinds_cache.clear()
            self._kinds_cache[session_id] = (key, kinds)
        return kinds

    @contextmanager
    def _listed_session_fd(self, session_id: str) -> Iterator[Optional[int]]:
        """A descriptor of a session found by a listing, or None if it is no longer a real
        directory (removed, or swapped for a symlink, since the scan)."""
        try:
            dir_fd: Optional[int] = os.open(str(self.root / session_id), _DIR_FLAGS)
        except OSError:
            dir_fd = None
        try:
            yield dir_fd
        finally:
            if dir_fd is not None:
                os.close(dir_fd)

    def _is_archived(self, scan: _SessionScan, dir_fd: Optional[int]) -> bool:
        if scan.archived is None:
            if scan.has_live_log or not scan.is_dir(ARCHIVE_DIR_NAME):
                scan.archived = False
            elif dir_fd is not None:
                scan.archived = _has_entry_at(ARCHIVE_DIR_NAME, dir_fd)
            else:
                with self._listed_session_fd(scan.session_id) as listed_fd:
                    scan.archived = listed_fd is not None and _has_entry_at(ARCHIVE_DIR_NAME, listed_fd)
        return scan.archived

    def _status(self, scan: _SessionScan, runtime: Optional[Runtime], dir_fd: Optional[int] = None) -> str:
        # UA HEAD's order: a running turn, then a connection; "archived" is ours.
        connections, running = _runtime_of(runtime, scan.session_id)
        if running:
            return "running"
        if connections > 0:
            return "active"
        return "archived" if self._is_archived(scan, dir_fd) else "idle"

    def _policy(self, scan: _SessionScan, dir_fd: Optional[int]) -> Optional[Dict[str, Any]]:
        if dir_fd is None or not scan.is_file(POLICY_FILE_NAME):
            return None
        return _read_small_json_at(dir_fd, POLICY_FILE_NAME)[1]

    def _matches(self, scan: _SessionScan, runtime: Optional[Runtime], filters: Mapping[str, str]) -> bool:
        """Whether a session passes the list filters (status, and UA HEAD's source, owner, memory_mode)."""
        status = filters.get("status", "all")
        if status != "all":
            actual = self._status(scan, runtime)
            if not (actual == status or (status == "active" and actual == "running")):
                return False
        wanted = {name: filters[name].strip().lower() for name in ("source", "owner", "memory_mode")
                  if filters.get(name)}
        if not wanted:
            return True
        with self._listed_session_fd(scan.session_id) as dir_fd:
            policy = self._policy(scan, dir_fd)
        owner = session_owner(scan.session_id, policy)
        actual_values = {"owner": owner, "source": session_source(scan.session_id, owner),
                         "memory_mode": memory_mode(policy)}
        return all(actual_values[name].lower() == value for name, value in wanted.items())

    def _summary(self, scan: _SessionScan, runtime: Optional[Runtime], dir_fd: Optional[int] = None) -> Dict[str, Any]:
        """The summary of ``scan``; its heartbeat and archive are read through ``dir_fd`` when
        given, else through a descriptor opened here."""
        if dir_fd is None:
            with self._listed_session_fd(scan.session_id) as listed_fd:
                return self._summary_at(scan, runtime, listed_fd)
        return self._summary_at(scan, runtime, dir_fd)

    def _summary_at(self, scan: _SessionScan, runtime: Optional[Runtime], dir_fd: Optional[int]) -> Dict[str, Any]:
        connections, running = _runtime_of(runtime, scan.session_id)
        heartbeat = None
        if dir_fd is not None and scan.is_file(HEARTBEAT_FILE_NAME):
            heartbeat = _heartbeat_at(dir_fd)
        policy = self._policy(scan, dir_fd)
        owner = session_owner(scan.session_id, policy)
        source = session_source(scan.session_id, owner)
        mode = memory_mode(policy)
        checkpoint = _checkpoint_at(dir_fd, scan.entries) if dir_fd is not None else None
        checkpoint_fields = _checkpoint_fields(checkpoint)
        has_run_log = scan.is_file(LOG_FILES[0])
        has_memory = MEMORY_FILE_NAME in scan.entries or MEMORY_DIR_NAME in scan.entries
        ready, reason = _rehydrate(checkpoint_fields["has_checkpoint"], has_run_log, has_memory, mode)
        created = _epoch_iso(policy.get("created_at")) if policy is not None else None
        return {
            "session_id": scan.session_id,
            "workspace_dir": str(self.root / scan.session_id),
            "status": self._status(scan, runtime, dir_fd),
            "source": source,
            "channel": _channel(scan.session_id, source),
            "owner": owner,
            "memory_mode": mode,
            "description": _description_at(dir_fd, scan.entries, checkpoint) if dir_fd is not None else None,
            "created_at": created or _iso(scan.dir_mtime_ns),
            "last_modified": _iso(scan.dir_mtime_ns),
            "last_activity": _iso(scan.activity_ns),
            "has_run_log": has_run_log,
            "has_activity_journal": scan.is_file(LOG_FILES[1]),
            "has_memory": has_memory,
            "has_context_brief": scan.is_file(CONTEXT_BRIEF_FILE_NAME),
            **checkpoint_fields,
            "rehydrate_ready": ready,
            "rehydrate_reason": reason,
            "terminal_reason": None,
            "heartbeat_last": _heartbeat_epoch(heartbeat),
            "heartbeat_summary": heartbeat.get("last_summary") if heartbeat else None,
            "heartbeat_last_at": None if heartbeat is None else _epoch_iso(heartbeat.get("last_run")),
            "active_connections": connections,
            "active_runs": 1 if running else 0,
            "running": running,
            "last_event_seq": _event_seq_of(runtime, scan.session_id),
        }

    # -- internals: archive, compaction, trash -----------------------------------------

    def _new_archive(self, session_id: str, dir_fd: int) -> Tuple[str, int]:
        """Create a new, unique ``archive/<stamp>/``; returns (stamp, descriptor)."""
        _mkdir_at(ARCHIVE_DIR_NAME, dir_fd)
        try:
            archive_fd = os.open(ARCHIVE_DIR_NAME, _DIR_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            # Following it could move the session's files outside the root.
            raise WorkspacesUnavailable(
                "{}/{} of session {} is not a directory (a symlink or a file), so nothing "
                "can be archived; remove or rename it".format(self.root / session_id, ARCHIVE_DIR_NAME, session_id)
            ) from None
        try:
            base = _stamp()
            for suffix in range(_MAX_STAMP_SUFFIX):
                # mkdir, not exist_ok: two resets in the same microsecond get two archives.
                stamp = base if suffix == 0 else "{}-{}".format(base, suffix)
                try:
                    os.mkdir(stamp, dir_fd=archive_fd)
                except FileExistsError:
                    continue
                return stamp, os.open(stamp, _DIR_FLAGS, dir_fd=archive_fd)
        finally:
            os.close(archive_fd)
        raise WorkspacesUnavailable(
            "Could not create a new archive directory under {}".format(self.root / session_id / ARCHIVE_DIR_NAME)
        )

    @staticmethod
    def _plan(
        fd: int, st: os.stat_result, max_lines: int, max_bytes: int
    ) -> Tuple[_CompactPlan, os.stat_result]:
        for _ in range(_FILE_CHANGED_RETRIES):
            try:
                return _plan_compaction(fd, st.st_size, max_lines, max_bytes), st
            except _FileChanged:
                st = os.fstat(fd)
        # Someone keeps truncating the file under us: leave it alone this time.
        return _CompactPlan(0, 0), st

    def _compact_file(
        self, dir_fd: int, name: str, fd: int, st: os.stat_result, keep_start: int, archive_fd: Optional[int]
    ) -> bool:
        """Swap in the tail of the log open as ``fd``; False if the file was replaced meanwhile. Without
        ``archive_fd`` the head is not kept: the old file goes when the rename drops its last name."""
        temp = ".{}.compact.tmp".format(name)
        self._remove_stale(temp, dir_fd)
        temp_fd = os.open(temp, _CREATE_FLAGS, stat.S_IMODE(st.st_mode), dir_fd=dir_fd)
        swapped = False
        new_st = os.fstat(temp_fd)
        try:
            copied = _copy_range(fd, temp_fd, keep_start, st.st_size)
            current = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if (current.st_dev, current.st_ino) != (st.st_dev, st.st_ino):
                return False  # replaced by someone else since we opened it: not ours to swap
            if archive_fd is not None:
                self._archive_file(dir_fd, name, fd, st, archive_fd)
            # Writers outside the session lock (an agent holding the file open) may have
            # appended since the copy: those bytes must reach the new live file too.
            copied = _copy_range(fd, temp_fd, copied, os.fstat(fd).st_size)
            os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            swapped = True
        finally:
            os.close(temp_fd)
            if not swapped:
                self._unlink_quietly(temp, dir_fd)
        late = os.fstat(fd).st_size
        if late > copied:
            # Bytes that reached the old inode between the last copy and the rename.
            live_fd = os.open(name, _APPEND_FLAGS & ~os.O_CREAT, dir_fd=dir_fd)
            try:
                # Only into the file just swapped in: if the name was replaced since (say by a
                # hard link to an outside file), the late bytes stay in the archived copy.
                if _same_file(os.fstat(live_fd), new_st):
                    _copy_range(fd, live_fd, copied, late)
            finally:
                os.close(live_fd)
        return True

    @staticmethod
    def _archive_file(dir_fd: int, name: str, fd: int, st: os.stat_result, archive_fd: int) -> None:
        """Put the whole log into the archive: a hard link (no copy), else a chunked copy."""
        try:
            os.link(name, name, src_dir_fd=dir_fd, dst_dir_fd=archive_fd, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in _NO_LINK_ERRNOS:
                raise
        else:
            linked = os.stat(name, dir_fd=archive_fd, follow_symlinks=False)
            if (linked.st_dev, linked.st_ino) == (st.st_dev, st.st_ino):
                return
            os.unlink(name, dir_fd=archive_fd)  # another file took the live name: copy ours
        copy_fd = os.open(name, _CREATE_FLAGS, stat.S_IMODE(st.st_mode), dir_fd=archive_fd)
        try:
            _copy_range(fd, copy_fd, 0, os.fstat(fd).st_size)
        finally:
            os.close(copy_fd)

    @staticmethod
    def _remove_stale(name: str, dir_fd: int) -> None:
        try:
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            os.rmdir(name, dir_fd=dir_fd)
        except PermissionError:
            # Linux answers EPERM when unlinking a directory.
            if not stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                raise
            os.rmdir(name, dir_fd=dir_fd)

    def _move_to_trash(self, session_id: str) -> Optional[str]:
        """Rename the session directory into the trash; None if there is no usable trash."""
        root_fd = os.open(str(self.root), os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
        try:
            try:
                trash_fd = self._open_trash(root_fd)
            except OSError as exc:
                if exc.errno in _NO_SPACE_ERRNOS or exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    return None  # full disk, or _gateway is not ours to write into
                raise
            try:
                base = "{}.{}".format(session_id, _stamp())
                for suffix in range(_MAX_STAMP_SUFFIX):
                    name = base if suffix == 0 else "{}-{}".format(base, suffix)
                    if _lexists_at(name, trash_fd):
                        continue
                    try:
                        os.rename(session_id, name, src_dir_fd=root_fd, dst_dir_fd=trash_fd)
                    except OSError as exc:
                        if exc.errno == errno.EXDEV:
                            return None  # the trash is another volume (a mount)
                        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                            continue
                        raise
                    return str(self.root / GATEWAY_DIR_NAME / TRASH_DIR_NAME / name)
            finally:
                os.close(trash_fd)
        finally:
            os.close(root_fd)
        return None

    @staticmethod
    def _open_trash(root_fd: int) -> int:
        # Opened with O_NOFOLLOW at each step: a symlinked _gateway never leads outside.
        _mkdir_at(GATEWAY_DIR_NAME, root_fd)
        gateway_fd = os.open(GATEWAY_DIR_NAME, _DIR_FLAGS, dir_fd=root_fd)
        try:
            _mkdir_at(TRASH_DIR_NAME, gateway_fd)
            return os.open(TRASH_DIR_NAME, _DIR_FLAGS, dir_fd=gateway_fd)
        finally:
            os.close(gateway_fd)

    def _remove_from_trash(self, path: str) -> None:
        """Remove ``path``, a name ``_move_to_trash`` gave, through descriptors of the root,
        ``_gateway`` and the trash opened with O_NOFOLLOW: a ``_gateway`` swapped for a
        symlink since the rename leaves the entry in place, never removes the link's target.
        Best effort: the session is already gone from the listing."""
        try:
            root_fd = os.open(str(self.root), os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
        except OSError:
            return
        try:
            with _dir_at(GATEWAY_DIR_NAME, root_fd) as gateway_fd:
                if gateway_fd is None:
                    return
                with _dir_at(TRASH_DIR_NAME, gateway_fd) as trash_fd:
                    if trash_fd is not None:
                        _remove_tree_at(os.path.basename(path), trash_fd, trash_fd)
        except OSError:
            pass
        finally:
            os.close(root_fd)

    # -- the audit trail (<root>/_gateway/audit.log) ----------------------------------------

    def append_audit(self, line: bytes, rotate_bytes: int, backups: int) -> Dict[str, Any]:
        """Append one record (``line``, ending in a newline) to ``<root>/_gateway/audit.log`` durably: written
        and fsync'ed before this returns. Past ``rotate_bytes`` the file is renamed to ``audit.log.1`` (and so
        on, keeping ``backups``) and the directory fsync'ed, so neither the record nor the rename is lost to
        a crash. Records are appended one at a time, in call order.

        ``_gateway`` and the file are opened as ``append_gateway_log`` opens them (never through a symlink,
        only a regular file of one link). Returns ``{"written": True, "rotated": bool}``. Raises
        InvalidArgument (a line that is not one line), StorageFull, WorkspacesUnavailable: the caller must
        tell its client that the change was not recorded.
        """
        if not line.endswith(b"\n") or b"\n" in line[:-1]:
            raise InvalidArgument("an audit record is one line ending in a newline")
        with self._audit_guard, self._os_errors("writing the audit log", None, "the change was made but is not recorded"):
            root_fd = os.open(str(self.root), os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
            try:
                dir_fd = self._open_gateway_dir(root_fd)
                try:
                    fd = os.open(AUDIT_LOG_NAME, _APPEND_FLAGS, 0o640, dir_fd=dir_fd)
                    try:
                        st = os.fstat(fd)
                        if not stat.S_ISREG(st.st_mode) or not _has_one_link(st):
                            raise OSError(errno.EPERM, "{} is not a regular file of one link; remove it".format(
                                AUDIT_LOG_NAME))
                        _write_all(fd, line)
                        os.fsync(fd)
                        size = os.fstat(fd).st_size
                    finally:
                        os.close(fd)
                    if st.st_size == 0:
                        # Likely just created (first record, or the first after a rotation): fsync(fd) makes
                        # the data durable, not the file's name in the directory; this does.
                        os.fsync(dir_fd)
                    if size <= rotate_bytes:
                        return {"written": True, "rotated": False}
                    _rotate_at(dir_fd, AUDIT_LOG_NAME, backups)
                    os.fsync(dir_fd)  # the renames are durable too: no record disappears with a crash
                    return {"written": True, "rotated": True}
                finally:
                    os.close(dir_fd)
            finally:
                os.close(root_fd)

    def read_audit_log(
        self,
        cursor: Union[str, int, None] = None,
        limit: Optional[int] = None,
        max_bytes: Optional[int] = None,
        backups: int = 0,
    ) -> Dict[str, Any]:
        """A log slice (PROTOCOL.md §5.11) of the audit log, across its rotations: a cursor into a file
        rotated since (``audit.log.1`` .. ``.<backups>``) goes on in that file, then in the newer ones
        from their start, so a reader that follows sees every record once, none skipped, unless the file
        it was reading has been rotated out of the ``backups`` kept (``reset`` then). Raises
        InvalidArgument, InvalidCursor, WorkspacesUnavailable.
        """
        limit, max_bytes = _slice_limits(limit, max_bytes)
        parsed = _parse_cursor(cursor)
        with self._os_errors("reading the audit log", None):
            dir_fd = self._gateway_dir_or_none()
            if dir_fd is None:
                return _missing_slice(AUDIT_LOG_NAME, parsed)
            try:
                if parsed is not None and not parsed.legacy and parsed.offset > 0:
                    rotated, found = self._audit_rotated_slice(dir_fd, parsed, limit, max_bytes, backups)
                    if rotated is not None:
                        return rotated
                    if found:
                        parsed = LogCursor(0, 0, 0, b"", b"")  # the rotated files are read to their end: go on here
                return _read_slice(lambda: os.open(AUDIT_LOG_NAME, _READ_FLAGS, dir_fd=dir_fd), parsed, limit,
                                   max_bytes, AUDIT_LOG_NAME)
            finally:
                os.close(dir_fd)

    @staticmethod
    def _audit_rotated_slice(
        dir_fd: int, cursor: LogCursor, limit: int, max_bytes: int, backups: int
    ) -> Tuple[Optional[Dict[str, Any]], bool]:
        """The next lines after ``cursor`` in the rotated audit files, oldest first (from the file the cursor
        is in, then from the start of the newer rotated ones), or None when they hold no more; and whether
        the cursor is in one of them."""
        found = False
        for index in range(backups, 0, -1):
            opened = _open_regular(lambda: os.open("{}.{}".format(AUDIT_LOG_NAME, index), _READ_FLAGS, dir_fd=dir_fd))
            if opened is None:
                continue
            fd, st = opened
            try:
                start = 0
                if not found:
                    if not _same_generation(fd, st, cursor):
                        continue
                    found, start = True, cursor.offset
                result = _follow_slice(fd, st, start, limit, max_bytes, reset=False)
            except _FileChanged:
                raise WorkspacesUnavailable("{}.{} shrank while it was being read; retry".format(AUDIT_LOG_NAME, index))
            finally:
                os.close(fd)
            if result["lines"]:
                return {"file": AUDIT_LOG_NAME, **result, "more": True}, True  # newer files follow
        return None, found
    # -- turn transcripts (PROTOCOL.md §12) ---------------------------------------------------
    #
    # <session>/turns/<turn_id>.jsonl holds every event of one turn, one JSON object a line, as UA HEAD
    # writes them; ours begin {"seq":N,"type":"...","timestamp":"...", so a record's sequence number,
    # type and time are read from its first bytes without parsing what the agent sent. The gateway
    # writes them (append_turn_record, from its writer thread); readers take complete lines only, so a
    # file a crash left half-written still reads, without its last partial line.

    TURNS_DIR_NAME = "turns"
    TURN_FILE_SUFFIX = ".jsonl"
    # A record is one WebSocket frame: at most a 1 MiB agent line or a 1 MiB client message, escaped,
    # plus the envelope; a longer "line" is not one of ours and is skipped, so memory stays bounded.
    MAX_TURN_RECORD = 4 << 20
    TURN_HEAD_PEEK = 256  # bytes that hold a record's seq, type and timestamp
    # The newest turn files whose last record is read to find a session's last seq: more than one,
    # because mtimes of turns ended in the same writer batch can tie (file systems stamp coarsely).
    LAST_SEQ_FILES = 8
    MTIME_TIE_NS = 2_000_000_000  # turn files stamped this close together may be in either order
    MAX_TURN_FILES = 100_000  # turn files of one session considered: a listing is bounded whatever is on disk
    TURN_OUTCOMES = ("running", "completed", "failed", "cancelled", "interrupted")
    _TURN_HEAD_RE = re.compile(rb'\{"seq":([0-9]{1,18}),"type":"([a-z][a-z0-9_]{0,31})","timestamp":"([^"\\]{1,64})"')

    @classmethod
    def _require_turn_id(cls, turn_id: object) -> str:
        # The session-id rule: one path component, never "." or "..", no separator, no NUL.
        if not isinstance(turn_id, str) or not SESSION_ID_RE.match(turn_id) or turn_id.endswith("\n"):
            raise InvalidArgument(
                "invalid turn id {}: use the turn_id of a query_complete or of the turns list "
                "(1-128 characters of A-Z a-z 0-9 _ . - starting with a letter or digit)".format(_show(turn_id))
            )
        return turn_id

    @classmethod
    def _turn_head(cls, line: bytes) -> Optional[Tuple[int, str, str]]:
        """(seq, type, timestamp) of one of our records, or None for anything else."""
        match = cls._TURN_HEAD_RE.match(line)
        if match is None:
            return None
        return int(match.group(1)), match.group(2).decode("ascii"), match.group(3).decode("ascii", "replace")

    @classmethod
    def _turn_lines_backward(cls, fd: int, size: int) -> Iterator[bytes]:
        """The complete lines of a turn file, newest first, without newlines; an unfinished last line
        (a crash mid-write) is skipped, and so is any line longer than MAX_TURN_RECORD."""
        pos = size
        pending = b""  # the end of a line whose start is before ``pos``
        unfinished = True  # no newline seen yet: ``pending`` is the file's unfinished last line
        overlong = False  # ``pending`` outgrew MAX_TURN_RECORD: that line is skipped
        while pos > 0:
            start = max(0, pos - IO_CHUNK)
            data = _pread_full(fd, pos - start, start)
            if len(data) != pos - start:
                return  # shrank under us (a delete): what was read stands
            pos = start
            pieces = data.split(b"\n")
            line = b"" if overlong else pieces[-1] + pending
            if len(pieces) > 1:
                if not (unfinished or overlong) and len(line) <= cls.MAX_TURN_RECORD:
                    yield line
                unfinished = overlong = False
                for piece in reversed(pieces[1:-1]):
                    if len(piece) <= cls.MAX_TURN_RECORD:
                        yield piece
                line = pieces[0]
            pending = line
            if len(pending) > cls.MAX_TURN_RECORD:
                pending, overlong = b"", True
        if not (unfinished or overlong):
            yield pending

    def _turn_files_at(self, dir_fd: int) -> List[Tuple[int, str]]:
        """(mtime_ns, turn_id) of the session's turn files, newest first; symlinks and non-files left out."""
        found: List[Tuple[int, str]] = []
        with _dir_at(self.TURNS_DIR_NAME, dir_fd) as turns_fd:
            if turns_fd is None:
                return found
            with os.scandir(turns_fd) as entries:
                for entry in entries:
                    name = entry.name
                    if not name.endswith(self.TURN_FILE_SUFFIX):
                        continue
                    turn_id = name[: -len(self.TURN_FILE_SUFFIX)]
                    if not SESSION_ID_RE.match(turn_id):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue  # removed meanwhile
                    if stat.S_ISREG(st.st_mode):
                        found.append((st.st_mtime_ns, turn_id))
                        if len(found) >= self.MAX_TURN_FILES:
                            break
        found.sort(reverse=True)
        return found

    @contextmanager
    def _turn_file_at(self, dir_fd: int, turn_id: str) -> Iterator[Optional[Tuple[int, os.stat_result]]]:
        with _dir_at(self.TURNS_DIR_NAME, dir_fd) as turns_fd:
            opened = None if turns_fd is None else _open_regular(
                lambda: os.open(turn_id + self.TURN_FILE_SUFFIX, _READ_FLAGS, dir_fd=turns_fd))
            try:
                yield opened
            finally:
                if opened is not None:
                    os.close(opened[0])

    def append_turn_record(self, session_id: str, turn_id: str, data: bytes) -> None:
        """Append records (complete JSON lines) to ``turns/<turn_id>.jsonl``, creating both if needed.

        Neither ``turns`` nor the file is ever followed through a symlink (the write fails instead).
        Raises InvalidSessionId, InvalidArgument, SessionNotFound, WorkspacesUnavailable, StorageFull.
        """
        _require_session_id(session_id)
        self._require_turn_id(turn_id)
        if not data:
            return
        doing = "appending to the transcript of turn {} of session {}".format(turn_id, session_id)
        with self.session_lock(session_id), self._os_errors(doing, session_id, "the records were not fully written"):
            with self._session_fd(session_id) as dir_fd:
                _mkdir_at(self.TURNS_DIR_NAME, dir_fd)
                turns_fd = os.open(self.TURNS_DIR_NAME, _DIR_FLAGS, dir_fd=dir_fd)
                try:
                    fd = os.open(turn_id + self.TURN_FILE_SUFFIX, _APPEND_FLAGS, 0o644, dir_fd=turns_fd)
                    try:
                        if not stat.S_ISREG(os.fstat(fd).st_mode):
                            raise InvalidArgument("turns/{}{} is not a regular file; remove it".format(
                                turn_id, self.TURN_FILE_SUFFIX))
                        _write_all(fd, bytes(data))
                    finally:
                        os.close(fd)
                finally:
                    os.close(turns_fd)

    def last_turn_seq(self, session_id: str) -> int:
        """The highest event seq recorded in the session's turn files (0 if none): where the session's
        numbering resumes after a restart. Reads the last complete record of the LAST_SEQ_FILES newest.
        Raises InvalidSessionId, SessionNotFound, WorkspacesUnavailable."""
        _require_session_id(session_id)
        best = 0
        with self._os_errors("reading the turns of session {}".format(session_id), session_id):
            with self._session_fd(session_id) as dir_fd:
                for _mtime, turn_id in self._turn_files_at(dir_fd)[: self.LAST_SEQ_FILES]:
                    with self._turn_file_at(dir_fd, turn_id) as opened:
                        if opened is None:
                            continue
                        for line in self._turn_lines_backward(opened[0], opened[1].st_size):
                            head = self._turn_head(line)
                            if head is not None:
                                best = max(best, head[0])
                                break
        return best

    def _turn_summary(self, fd: int, size: int, turn_id: str, running: bool) -> Dict[str, Any]:
        first = None
        for line in self._turn_lines_forward(fd, size):
            first = self._turn_head(line)
            break
        last: List[Tuple[Tuple[int, str, str], bytes]] = []  # the last two records, newest first
        for line in self._turn_lines_backward(fd, size):
            head = self._turn_head(line)
            if head is not None:
                last.append((head, line))
                if len(last) == 2:
                    break
        outcome = "running" if running else "interrupted"
        ended = None
        if last and last[0][0][1] == "query_complete":
            ended = last[0][0][2]
            try:
                completed = json.loads(last[0][1].decode("utf-8", "replace")).get("data", {}).get("completed")
            except (ValueError, AttributeError):
                completed = None
            if completed is True:
                outcome = "completed"
            elif len(last) == 2 and last[1][0][1] == "cancelled":
                outcome = "cancelled"
            else:
                outcome = "failed"
        return {
            "turn_id": turn_id,
            "started": first[2] if first else None,
            "ended": ended,
            "outcome": outcome,
            "first_seq": first[0] if first else None,
            "last_seq": last[0][0][0] if last else None,
            # One turn at a time per session: its records' seqs are consecutive.
            "events": (last[0][0][0] - first[0] + 1) if first and last else 0,
            "bytes": size,
        }

    @classmethod
    def _turn_lines_forward(cls, fd: int, size: int) -> Iterator[bytes]:
        """The first complete line's first TURN_HEAD_PEEK bytes (enough for ``_turn_head``)."""
        head = _pread_full(fd, min(size, cls.TURN_HEAD_PEEK), 0)
        if b"\n" in head or (size > len(head) and _has_newline(fd, len(head), min(size, cls.MAX_TURN_RECORD))):
            yield head.split(b"\n", 1)[0]

    def list_turns(
        self, session_id: str, limit: Optional[int] = None, offset: Optional[int] = None,
        running_turn_id: Optional[str] = None,
    ) -> Dict[str, Any]:
        """The session's turns, newest first: ``{"session_id", "turns": [{turn_id, started, ended, outcome,
        first_seq, last_seq, events, bytes}], "total", "limit", "offset", "more"}``.

        ``outcome``: completed, failed, cancelled (from the turn's query_complete), running (the
        ``running_turn_id`` the caller knows to run), or interrupted (no query_complete, not running: the
        gateway stopped or crashed during the turn). Only the listed page's files are read, a few KB each.
        Raises InvalidSessionId, InvalidArgument (limit, offset), SessionNotFound, WorkspacesUnavailable.
        """
        _require_session_id(session_id)
        limit = _clamped_int("limit", limit, LIST_DEFAULT_LIMIT, 1, LIST_MAX_LIMIT)
        offset = _non_negative_int("offset", offset, 0)
        with self._os_errors("listing the turns of session {}".format(session_id), session_id):
            with self._session_fd(session_id) as dir_fd:
                files = self._turn_files_at(dir_fd)
                turns = []
                for _mtime, turn_id in files[offset: offset + limit]:
                    with self._turn_file_at(dir_fd, turn_id) as opened:
                        if opened is not None:
                            turns.append(self._turn_summary(opened[0], opened[1].st_size, turn_id,
                                                            turn_id == running_turn_id))
        # mtimes of turns ended together can tie: within the page, the seqs decide.
        turns.sort(key=lambda turn: -1 if turn["first_seq"] is None else turn["first_seq"], reverse=True)
        return {"session_id": session_id, "turns": turns, "total": len(files), "limit": limit, "offset": offset,
                "more": offset + limit < len(files)}

    def read_turn(
        self, session_id: str, turn_id: str, cursor: Union[str, int, None] = None,
        limit: Optional[int] = None, max_bytes: Optional[int] = None,
    ) -> Dict[str, Any]:
        """One turn's transcript as a log slice (PROTOCOL.md §5.11) of its file, read from the start
        by default (no cursor is ``cursor=0``), each line parsed: ``{"session_id", "turn_id", "records",
        ...the slice's fields but lines}``. A line that is not JSON comes back as ``{"raw": line}``.
        Raises InvalidSessionId, InvalidArgument (turn id, limit, max_bytes), InvalidCursor,
        SessionNotFound (also for an unknown turn), WorkspacesUnavailable.
        """
        _require_session_id(session_id)
        self._require_turn_id(turn_id)
        limit, max_bytes = _slice_limits(limit, max_bytes)
        parsed = _parse_cursor(0 if cursor is None or cursor == "" else cursor)
        name = "{}/{}{}".format(self.TURNS_DIR_NAME, turn_id, self.TURN_FILE_SUFFIX)
        with self._os_errors("reading {} of session {}".format(name, session_id), session_id):
            with self._session_fd(session_id) as dir_fd:
                with _dir_at(self.TURNS_DIR_NAME, dir_fd) as turns_fd:
                    missing = turns_fd is None or _open_regular(
                        lambda: os.open(turn_id + self.TURN_FILE_SUFFIX, _READ_FLAGS, dir_fd=turns_fd)) is None
                    if missing:
                        raise SessionNotFound("turn {} of session {} has no transcript; list the session's turns "
                                              "with GET /api/v1/ops/sessions/{}/turns".format(
                                                  _show(turn_id), session_id, session_id))
                    assert turns_fd is not None
                    result = _read_slice(lambda: os.open(turn_id + self.TURN_FILE_SUFFIX, _READ_FLAGS, dir_fd=turns_fd),
                                         parsed, limit, max_bytes, name)
        records = []
        for line in result.pop("lines"):
            try:
                records.append(json.loads(line))
            except ValueError:
                records.append({"raw": line})
        return {"session_id": session_id, "turn_id": turn_id, **result, "records": records}

    def read_turn_records(
        self, session_id: str, after_seq: int, upto_seq: int, max_records: int, max_bytes: int
    ) -> Dict[str, Any]:
        """The records with ``after_seq < seq <= upto_seq``, oldest first, as stored (JSON text):
        ``{"records": [(seq, type, line)], "complete": bool, "first_seq"}``. Read backwards from the
        newest turn file, so the cost is what is returned: past ``max_records`` or ``max_bytes``, the
        newest are kept, ``complete`` is false and ``first_seq`` is the oldest kept.
        Raises InvalidSessionId, SessionNotFound, WorkspacesUnavailable."""
        _require_session_id(session_id)
        found: List[Tuple[int, str, str]] = []
        used = 0
        complete = True
        stop_below: Optional[int] = None  # once after_seq is reached: older files cannot hold what is missing
        with self._os_errors("reading the turns of session {}".format(session_id), session_id):
            with self._session_fd(session_id) as dir_fd:
                for mtime, turn_id in self._turn_files_at(dir_fd):
                    if not complete or after_seq >= upto_seq or (stop_below is not None and mtime < stop_below):
                        break
                    reached = False
                    with self._turn_file_at(dir_fd, turn_id) as opened:
                        if opened is None:
                            continue
                        for line in self._turn_lines_backward(opened[0], opened[1].st_size):
                            head = self._turn_head(line)
                            if head is None or head[0] > upto_seq:
                                continue
                            if head[0] <= after_seq:
                                reached = True
                                break
                            if len(found) >= max_records or used + len(line) > max_bytes:
                                complete = False
                                break
                            found.append((head[0], head[1], line.decode("utf-8", "replace")))
                            used += len(line)
                            if head[0] == after_seq + 1:
                                reached = True
                                break
                    if reached and stop_below is None:
                        stop_below = mtime - self.MTIME_TIE_NS  # files stamped as closely may still hold newer ones
        found.sort()
        return {"records": found, "complete": complete, "first_seq": found[0][0] if found else None}
    # -- retention: disk use, prune plans and their application (PROTOCOL.md §15) -------------
    #
    # A prune is planned from one scan of the root and then applied item by item; a dry run is the
    # plan alone, so it lists exactly what the real run removes when nothing changes in between.
    # An item (an archive stamp, a whole session, a trash entry) is first renamed into the trash,
    # one atomic step, and only then removed there: a kill at any moment leaves it complete where it
    # was, or in the trash (emptied at the next start or prune), never half-removed in place.
    # Sizes are st_blocks * 512 (what du counts), each inode once; an item's ``bytes`` counts only
    # files with no other name, so it never claims space another link keeps in use.

    def disk_usage(self, session_id: Optional[str] = None) -> Dict[str, Any]:
        """``{"used_bytes": n}`` of the whole root, or of one session (with ``archive_bytes`` and
        ``live_bytes`` besides). Raises InvalidSessionId, SessionNotFound, WorkspacesUnavailable."""
        if session_id is None:
            with self._os_errors("measuring the workspaces root", None):
                self.check_root()
                return {"used_bytes": self._root_usage()}
        _require_session_id(session_id)
        with self._os_errors("measuring session {}".format(session_id), session_id):
            with self._session_fd(session_id) as dir_fd:
                seen: Dict[Tuple[int, int], None] = {}
                archive = _usage_at(ARCHIVE_DIR_NAME, dir_fd, seen)[0]
                total = os.fstat(dir_fd).st_blocks * 512 + _usage_of_fd(dir_fd, seen)[0] + archive
                return {"used_bytes": total, "archive_bytes": archive, "live_bytes": total - archive}

    def prune(
        self,
        archives_older_than_days: Optional[float] = None,
        sessions_idle_days: Optional[float] = None,
        budget_bytes: Optional[int] = None,
        trash_older_than_days: Optional[float] = None,
        protected: Any = (),
        dry_run: bool = False,
        now: Optional[float] = None,
    ) -> Dict[str, Any]:
        """Plan, and unless ``dry_run`` apply, the retention policies (None: that policy is off).

        * trash entries older than ``trash_older_than_days`` (they are deleted sessions already; None: any age);
        * sessions whose last activity (live logs, heartbeat, directory) is older than
          ``sessions_idle_days``, except the ids in ``protected`` (connected or running);
        * archive stamps older than ``archives_older_than_days`` (by their mtime);
        * while the root holds more than ``budget_bytes``: the remaining trash, then archives,
          oldest first across sessions.
        An archive holding memory (a reset's MEMORY.md or memory/) is never removed, nor is a live
        log, a memory file or anything of ``_gateway`` but its trash.

        Returns ``{"dry_run", "policies", "items": [{kind, session_id, path, bytes, mtime, reason}],
        "failed": [{path, error}], "kept_live": [idle session ids kept as live], "totals": {...},
        "disk": {used_bytes_before, used_bytes_after, budget_bytes, over_budget}}``; ``now`` (epoch seconds) is the clock, for tests.
        Raises InvalidArgument, WorkspacesUnavailable.
        """
        archive_age = _optional_days("archives_older_than_days", archives_older_than_days)
        idle_age = _optional_days("sessions_idle_days", sessions_idle_days)
        trash_given = _optional_days("trash_older_than_days", trash_older_than_days)
        trash_age = trash_given or 0.0  # unset: trash of any age goes (it is deleted sessions already)
        budget = _optional_budget(budget_bytes)
        dry_run = _require_bool("dry_run", dry_run)
        clock = time.time() if now is None else float(now)
        keep = protected  # any container; asked again just before each session is removed
        with self._os_errors("planning a prune", None):
            self.check_root()
            self._make_trash()  # before measuring: removals rename into it, and it has blocks of its own
            scan = self._retention_scan()
        items, kept_live = _plan_prune(scan, clock, archive_age, idle_age, trash_age, budget, keep)
        failed: List[Dict[str, Any]] = []
        done = items
        if not dry_run:
            done = []
            for item in items:
                if item["kind"] == "session" and item["session_id"] in keep:
                    error: Optional[str] = "session {} became active; it is kept".format(item["session_id"])
                else:
                    error = self._remove_item(item)
                if error is None:
                    done.append(item)
                else:
                    failed.append({"path": item["path"], "error": error})
        freed = sum(item["bytes"] for item in done)
        after = scan.total - freed
        return {
            "dry_run": dry_run,
            "policies": {"archives_older_than_days": archive_age, "sessions_idle_days": idle_age,
                         "budget_bytes": budget, "trash_older_than_days": trash_given},
            "items": [{key: value for key, value in item.items() if not key.startswith("_")} for item in done],
            "failed": failed,
            "kept_live": kept_live,
            "totals": {
                "items": len(done),
                "bytes": freed,
                "archives": sum(1 for item in done if item["kind"] == "archive"),
                "sessions": sum(1 for item in done if item["kind"] == "session"),
                "trash": sum(1 for item in done if item["kind"] == "trash"),
            },
            "disk": {"used_bytes_before": scan.total, "used_bytes_after": after, "budget_bytes": budget,
                     "over_budget": budget is not None and after > budget},
        }

    def session_activity(self, now: Optional[float] = None) -> List[Dict[str, Any]]:
        """Every session with its last activity (live logs, heartbeat, directory), oldest first:
        ``[{session_id, last_activity (epoch s), last_activity_ns (for delete_idle_session), idle_seconds,
        channel}]``, for UA HEAD's purge-stale
        and bulk-delete to choose from. Raises WorkspacesUnavailable."""
        clock = time.time() if now is None else float(now)
        with self._os_errors("listing sessions by activity", None):
            self.check_root()
            scan = self._retention_scan(measure=False, channels=True)
        rows = [
            {"session_id": sid, "last_activity": info.activity_ns / 1e9, "last_activity_ns": info.activity_ns,
             "idle_seconds": clock - info.activity_ns / 1e9, "channel": info.channel}
            for sid, info in scan.sessions.items()
        ]
        return sorted(rows, key=lambda row: (row["last_activity"], row["session_id"]))

    def _make_trash(self) -> None:
        root_fd = os.open(str(self.root), os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
        try:
            os.close(self._open_trash(root_fd))
        except OSError as exc:
            if exc.errno not in _NO_SPACE_ERRNOS and exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise  # no room for it, or a _gateway not ours: removals then happen in place
        finally:
            os.close(root_fd)

    def _root_usage(self) -> int:
        root_fd = os.open(str(self.root), os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
        try:
            return os.fstat(root_fd).st_blocks * 512 + _usage_of_fd(root_fd, {})[0]
        finally:
            os.close(root_fd)

    def _retention_scan(self, measure: bool = True, channels: bool = False) -> "_RetentionScan":
        """One pass over the root: sessions (activity, archives, with ``channels`` their channel: a read of
        each policy file), trash entries, and with ``measure`` the bytes of everything."""
        scan = _RetentionScan()
        seen: Dict[Tuple[int, int], None] = {}
        root_fd = os.open(str(self.root), os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
        try:
            if measure:
                scan.total = os.fstat(root_fd).st_blocks * 512
            for name in sorted(os.listdir(root_fd)):
                if name == GATEWAY_DIR_NAME:
                    self._scan_gateway_dir(root_fd, scan, seen, measure)
                    continue
                dir_fd = _open_dir_at(name, root_fd) if is_valid_session_id(name) else None
                if dir_fd is None:
                    if measure:
                        scan.total += _usage_at(name, root_fd, seen)[0]
                    continue
                try:
                    scan.sessions[name] = self._scan_retained_session(name, dir_fd, scan, seen, measure, channels)
                finally:
                    os.close(dir_fd)
        finally:
            os.close(root_fd)
        return scan

    @staticmethod
    def _scan_gateway_dir(root_fd: int, scan: "_RetentionScan", seen: Dict[Tuple[int, int], None],
                          measure: bool) -> None:
        with _dir_at(GATEWAY_DIR_NAME, root_fd) as gateway_fd:
            if gateway_fd is None:
                if measure:
                    scan.total += _usage_at(GATEWAY_DIR_NAME, root_fd, seen)[0]
                return
            if measure:
                scan.total += os.fstat(gateway_fd).st_blocks * 512
            for name in os.listdir(gateway_fd):
                if name != TRASH_DIR_NAME:
                    if measure:
                        scan.total += _usage_at(name, gateway_fd, seen)[0]
                    continue
                with _dir_at(TRASH_DIR_NAME, gateway_fd) as trash_fd:
                    if trash_fd is None:
                        continue
                    if measure:
                        scan.total += os.fstat(trash_fd).st_blocks * 512
                    for entry in sorted(os.listdir(trash_fd)):
                        try:
                            st = os.stat(entry, dir_fd=trash_fd, follow_symlinks=False)
                        except OSError:
                            continue
                        used, freed = _usage_at(entry, trash_fd, seen) if measure else (0, 0)
                        scan.total += used
                        scan.trash.append(_Retained(st.st_mtime_ns, freed, "{}/{}/{}".format(
                            GATEWAY_DIR_NAME, TRASH_DIR_NAME, entry), entry, False))

    @staticmethod
    def _scan_retained_session(session_id: str, dir_fd: int, scan: "_RetentionScan",
                               seen: Dict[Tuple[int, int], None], measure: bool, channels: bool) -> "_RetainedSession":
        st = os.fstat(dir_fd)
        with os.scandir(dir_fd) as iterator:
            kinds = _entry_kinds(iterator)
        activity = max(st.st_mtime_ns, _activity_ns(dir_fd, kinds, st.st_mtime_ns))
        channel = ""
        if channels:
            owner = session_owner(session_id, _read_json_object(
                lambda: os.open(SESSION_POLICY_FILE_NAME, _READ_FLAGS, dir_fd=dir_fd), accept=_has_one_link))
            channel = _channel(session_id, session_source(session_id, owner))
        info = _RetainedSession(activity, channel)
        archives_used = archive_dir = 0
        if kinds.get(ARCHIVE_DIR_NAME) == "dir":
            with _dir_at(ARCHIVE_DIR_NAME, dir_fd) as archive_fd:
                if archive_fd is not None:
                    archive_dir = os.fstat(archive_fd).st_blocks * 512 if measure else 0
                    archives_used += archive_dir
                    for stamp in sorted(os.listdir(archive_fd), key=_stamp_sort_key):
                        try:
                            stamp_st = os.stat(stamp, dir_fd=archive_fd, follow_symlinks=False)
                        except OSError:
                            continue
                        used, freed = _usage_at(stamp, archive_fd, seen) if measure else (0, 0)
                        archives_used += used
                        names = _list_dir_at(stamp, archive_fd) if stat.S_ISDIR(stamp_st.st_mode) else []
                        holds_memory = MEMORY_FILE_NAME in names or MEMORY_DIR_NAME in names
                        info.archives.append(_Retained(stamp_st.st_mtime_ns, freed, "{}/{}/{}".format(
                            session_id, ARCHIVE_DIR_NAME, stamp), stamp, holds_memory))
        if measure:
            # Everything but archive/ (measured above, stamp by stamp); then the session's whole size.
            rest, rest_freed = _usage_of_fd(dir_fd, seen, skip=ARCHIVE_DIR_NAME)
            own = st.st_blocks * 512
            info.bytes = own + rest_freed + archive_dir + sum(archive.freed for archive in info.archives)
            scan.total += own + rest + archives_used
        return info

    def _remove_item(self, item: Dict[str, Any]) -> Optional[str]:
        """Remove one planned item (rename into the trash, then remove there); None, or why not."""
        try:
            if item["kind"] == "session":
                return self.delete_idle_session(item["session_id"], item["_mtime_ns"])
            if item["kind"] == "archive":
                return self._remove_archive(item["session_id"], item["_name"])
            self._remove_from_trash(str(self.root / item["path"]))
            return None
        except OpsError as exc:
            return exc.detail
        except OSError as exc:
            return exc.strerror or str(exc)

    def delete_idle_session(self, session_id: str, planned_ns: int) -> Optional[str]:
        """``delete_session``, unless the session was active since a plan found it idle at ``planned_ns``
        (``session_activity``'s ``last_activity_ns``; a plan of many sessions takes seconds). Looked at under
        the session's lock, so an append_log cannot slip between the look and the rename. None when it was
        deleted, else why it was kept. Raises as ``delete_session``."""
        with self.session_lock(session_id):
            with self._session_fd(session_id) as dir_fd:
                st = os.fstat(dir_fd)
                with os.scandir(dir_fd) as iterator:
                    kinds = _entry_kinds(iterator)
                activity = max(st.st_mtime_ns, _activity_ns(dir_fd, kinds, st.st_mtime_ns))
            if activity > planned_ns:
                return "session {} became active at {}, after the plan found it idle; it is kept".format(
                    session_id, _iso(activity))
            self.delete_session(session_id)
        return None

    def _remove_archive(self, session_id: str, stamp: str) -> Optional[str]:
        with self.session_lock(session_id), self._session_fd(session_id) as dir_fd:
            root_fd = os.open(str(self.root), os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
            try:
                trash_fd = self._open_trash(root_fd)
            finally:
                os.close(root_fd)
            try:
                with _dir_at(ARCHIVE_DIR_NAME, dir_fd) as archive_fd:
                    if archive_fd is None or not _lexists_at(stamp, archive_fd):
                        return "archive {}/{} is gone".format(session_id, stamp)
                    spare = "{}.{}.{}.{}".format(session_id, ARCHIVE_DIR_NAME, stamp, secrets.token_hex(4))
                    try:
                        os.rename(stamp, spare, src_dir_fd=archive_fd, dst_dir_fd=trash_fd)
                    except OSError as exc:
                        if exc.errno != errno.EXDEV:
                            raise
                        _remove_tree_at(stamp, archive_fd, archive_fd)  # no trash on this volume: in place
                        return None
                _remove_tree_at(spare, trash_fd, trash_fd)
            finally:
                os.close(trash_fd)
        return None


# --------------------------------------------------------------------------------------
# Retention: what a prune scan finds, and the plan (pure: no disk)
# --------------------------------------------------------------------------------------

_DAY = 86400.0
# Upper bound of a day count (about 27,000 years): beyond it a retention is a typo, not a policy.
MAX_RETENTION_DAYS = 10_000_000
# Upper bound of a disk budget, 2**62 bytes: larger values are surely a mistake (and overflow nothing).
MAX_BUDGET_BYTES = 1 << 62


def _optional_days(name: str, value: object) -> Optional[float]:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or not 0 <= value <= MAX_RETENTION_DAYS:
        raise InvalidArgument("{} must be a number of days from 0 to {} (or null: policy off), not {}".format(
            name, MAX_RETENTION_DAYS, _show(value)))
    return float(value)


def _optional_budget(value: object) -> Optional[int]:
    if value is None:
        return None
    if not _is_int(value) or not 0 < value <= MAX_BUDGET_BYTES:  # type: ignore[operator]
        raise InvalidArgument("budget_bytes must be a whole number of bytes from 1 to {} (or null: no "
                              "budget), not {}".format(MAX_BUDGET_BYTES, _show(value)))
    return int(value)  # type: ignore[call-overload]


class _Retained(NamedTuple):
    mtime_ns: int
    freed: int  # bytes its removal releases: files with no other name, and directories
    path: str  # relative to the root
    name: str  # its entry name (the stamp, the trash entry)
    holds_memory: bool


class _RetainedSession:
    __slots__ = ("activity_ns", "channel", "archives", "bytes")

    def __init__(self, activity_ns: int, channel: str) -> None:
        self.activity_ns = activity_ns
        self.channel = channel
        self.archives: List[_Retained] = []
        self.bytes = 0


class _RetentionScan:
    __slots__ = ("sessions", "trash", "total")

    def __init__(self) -> None:
        self.sessions: Dict[str, _RetainedSession] = {}
        self.trash: List[_Retained] = []
        self.total = 0


def _item(kind: str, session_id: Optional[str], entry: _Retained, reason: str) -> Dict[str, Any]:
    return {"kind": kind, "session_id": session_id, "path": entry.path, "bytes": entry.freed,
            "mtime": _iso(entry.mtime_ns), "reason": reason, "_name": entry.name, "_mtime_ns": entry.mtime_ns}


def _plan_prune(scan: _RetentionScan, now: float, archive_age: Optional[float], idle_age: Optional[float],
                trash_age: float, budget: Optional[int], protected: Any) -> Tuple[List[Dict[str, Any]], List[str]]:
    """The items a prune removes, in the order it removes them (see ``OpsService.prune``), and the idle
    sessions kept because they are in ``protected``."""
    def older(mtime_ns: int, days: float) -> bool:
        return now - mtime_ns / 1e9 >= days * _DAY

    items: List[Dict[str, Any]] = []
    kept_live: List[str] = []
    trash = sorted(scan.trash)
    kept_trash = []
    for entry in trash:
        if older(entry.mtime_ns, trash_age):
            items.append(_item("trash", None, entry, "trash"))
        else:
            kept_trash.append(entry)
    archives: List[Tuple[_Retained, str]] = []
    for sid, info in sorted(scan.sessions.items(), key=lambda pair: (pair[1].activity_ns, pair[0])):
        if idle_age is not None and older(info.activity_ns, idle_age) and sid in protected:
            kept_live.append(sid)
        elif idle_age is not None and older(info.activity_ns, idle_age):
            entry = _Retained(info.activity_ns, info.bytes, sid, sid, False)
            items.append(_item("session", sid, entry, "idle"))
            continue
        archives.extend((archive, sid) for archive in info.archives if not archive.holds_memory)
    archives.sort(key=lambda pair: (pair[0].mtime_ns, pair[1], _stamp_sort_key(pair[0].name)))
    kept_archives = []
    for archive, sid in archives:
        if archive_age is not None and older(archive.mtime_ns, archive_age):
            items.append(_item("archive", sid, archive, "age"))
        else:
            kept_archives.append((archive, sid))
    if budget is not None:
        used = scan.total - sum(item["bytes"] for item in items)
        overflow: List[Tuple[_Retained, Optional[str], str]] = [(entry, None, "trash") for entry in kept_trash] + [
            (archive, sid, "archive") for archive, sid in kept_archives]
        for extra, owner, kind in overflow:
            if used <= budget:
                break
            items.append(_item(kind, owner, extra, "budget"))
            used -= extra.freed
    return items, kept_live


def _usage_of_fd(dir_fd: int, seen: Dict[Tuple[int, int], None], skip: Optional[str] = None) -> Tuple[int, int]:
    """(bytes used, bytes a removal frees) of the entries of the directory open as ``dir_fd``
    (not of the directory itself), each inode counted once across ``seen``."""
    used = freed = 0
    for name in os.listdir(dir_fd):
        if name != skip:
            one_used, one_freed = _usage_at(name, dir_fd, seen)
            used += one_used
            freed += one_freed
    return used, freed


def _usage_at(name: str, dir_fd: int, seen: Dict[Tuple[int, int], None]) -> Tuple[int, int]:
    """(bytes used, bytes a removal frees) of ``name`` inside ``dir_fd`` and everything below it,
    in st_blocks * 512, never following a symlink. A file with other names is used (once, across
    ``seen``) but frees nothing. At most MAX_TREE_DEPTH levels are open at once; deeper ones are
    not counted (as in ``_tree_usage_at``)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return 0, 0
    key = (st.st_dev, st.st_ino)
    if key in seen:
        return 0, 0
    seen[key] = None
    size = st.st_blocks * 512
    if not stat.S_ISDIR(st.st_mode):
        return size, size if st.st_nlink <= 1 else 0
    counts = [size, size]  # bytes used, bytes a removal would free

    def visit(fd: int) -> List[str]:
        subdirs: List[str] = []
        for entry_name, entry_st in _entry_stats(fd):
            entry_key = (entry_st.st_dev, entry_st.st_ino)
            if entry_key in seen:
                continue
            seen[entry_key] = None
            blocks = entry_st.st_blocks * 512
            counts[0] += blocks
            if stat.S_ISDIR(entry_st.st_mode):
                counts[1] += blocks
                subdirs.append(entry_name)
            elif entry_st.st_nlink <= 1:
                counts[1] += blocks
        return subdirs

    try:
        fd = _open_dir_at(name, dir_fd)
    except OSError:
        return size, size
    if fd is not None:
        _walk_open_tree(fd, visit)
    return counts[0], counts[1]

"""The archive compressor: one background thread that gzips archived logs (PROTOCOL.md §16).

Rules this module keeps
-----------------------
* It never runs on the event loop and never touches a file itself: each pass is one call of
  ``OpsService.compress_archives``, which writes ``<name>.gz`` beside the plain log, fsyncs, renames and
  only then removes the plain file, so a kill -9 at any point leaves one complete copy.
* Asking for work never blocks: ``request(session_id)`` only records the id and wakes the thread, so it is
  safe from a ``Changes`` observer on the loop.
* The first pass, at ``start``, visits every session with an archive: it finishes or undoes what a killed
  gateway left half done, and compresses what was archived while the gateway was down (or by
  ``append_log``, which archives a hard-linked log without announcing it). After that, a session is
  visited ``delay`` s after it is reset, archived or compacted, and all are again every RESCAN_INTERVAL.
  A log archived less than ``delay`` s ago is left plain until then (Config.archive_compress_delay): an
  operator usually reads an archive right after making it, and an agent may still append to its inode.

May import: the standard library and ``ops_service``.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Dict, List, Optional

from ops_service import OpsError, OpsService

__all__ = ["ArchiveCompressor", "RESCAN_INTERVAL", "STOP_TIMEOUT"]

# s between full passes: only archives nobody announced (append_log's moves) wait this long, and a pass
# over sessions with nothing to compress costs one listing each.
RESCAN_INTERVAL = 3600.0
# s close() waits for the thread: a pass stops between files, but a file of a GiB takes half a minute to
# deflate; the thread is a daemon, and a compression cut short is undone at the next start.
STOP_TIMEOUT = 2.0


class ArchiveCompressor:
    """Compresses the archived logs of the sessions it is asked about, on its own thread.

    ``request`` and ``stop`` may be called from any thread; counters (``files``, ``bytes``,
    ``compressed_bytes``, ``errors``) are read without a lock (a gauge, not an account).
    """

    def __init__(self, ops: OpsService, delay: float, rescan_interval: float = RESCAN_INTERVAL) -> None:
        self.ops = ops
        self.delay = delay
        self.rescan_interval = rescan_interval
        self.files = 0
        self.bytes = 0
        self.compressed_bytes = 0
        self.errors = 0
        self.passes = 0
        self._wanted: Dict[str, float] = {}  # session id -> time.monotonic() when it is due
        self._guard = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        """Start the thread; its first pass visits every session with an archive."""
        self._thread = threading.Thread(target=self._run, name="ua-compressor", daemon=True)
        self._thread.start()

    def request(self, session_id: str) -> None:
        """Compress ``session_id``'s archives soon. Never blocks."""
        self._schedule(session_id, self.delay)

    def _schedule(self, session_id: str, delay: float) -> None:
        due = time.monotonic() + delay
        with self._guard:
            self._wanted[session_id] = min(due, self._wanted.get(session_id, due))
        self._wake.set()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop after the file being compressed; wait at most ``timeout`` s for that."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        next_rescan = time.monotonic()  # the first pass visits every session with an archive
        while not self._stopping.is_set():
            with self._guard:
                now = time.monotonic()
                everything = now >= next_rescan
                if everything:
                    next_rescan = now + self.rescan_interval
                due = sorted(sid for sid, when in self._wanted.items() if when <= now)
                for session_id in due:
                    del self._wanted[session_id]
                wake_at = min([next_rescan] + list(self._wanted.values()))
                self._wake.clear()
            for session_id in self._all_sessions() if everything else due:
                if self._stopping.is_set():
                    return
                self._compress(session_id)
            self.passes += 1
            self._wake.wait(max(0.0, wake_at - time.monotonic()))

    def _all_sessions(self) -> List[str]:
        try:
            return self.ops.archive_session_ids()
        except OpsError as exc:
            self._report(exc)
            return []

    def _compress(self, session_id: str) -> None:
        try:
            done: Dict[str, int] = self.ops.compress_archives(session_id, stop=self._stopping.is_set, min_age=self.delay)
        except OpsError as exc:
            # A session deleted meanwhile, a full disk: the plain archive stays, the next pass retries.
            self._report(exc)
            return
        self.files += done["files"]
        self.bytes += done["bytes"]
        self.compressed_bytes += done["compressed_bytes"]
        if done["deferred"]:
            self._schedule(session_id, self.delay)

    def _report(self, exc: OpsError) -> None:
        self.errors += 1
        if self.errors <= 10:  # a broken disk must not flood stderr; health would show the count
            print(f"ua-gateway: archive compression: {exc.detail}", file=sys.stderr, flush=True)

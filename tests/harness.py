"""What the hostile, fault and load suites share: a gateway whose stderr is kept, and tree snapshots.

``conftest.launch`` pipes the gateway's stderr and never reads it; a gateway that logs a lot (an
exception per hostile request, say) would block once the pipe fills. ``start_watched`` drains it on a
thread, so the suites can also assert that nothing was logged as a traceback.
"""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from conftest import RunningGateway, launch

TRACEBACK_MARKERS = (b"Traceback", b'File "')


class WatchedGateway:
    """A ``RunningGateway`` plus everything it wrote to stderr."""

    def __init__(self, running: RunningGateway) -> None:
        self.running = running
        self._stderr: List[bytes] = []
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.running, name)

    def _drain(self) -> None:
        stream = self.running.process.stderr
        assert stream is not None
        while True:
            chunk = os.read(stream.fileno(), 65536)
            if not chunk:
                return
            self._stderr.append(chunk)

    @property
    def stderr(self) -> bytes:
        return b"".join(self._stderr)

    def tracebacks(self) -> str:
        """The gateway's stderr if it holds a traceback, else an empty string."""
        text = self.stderr
        return text.decode("utf-8", "replace") if any(m in text for m in TRACEBACK_MARKERS) else ""

    def kill(self) -> None:
        """SIGKILL, no grace: what a crash or the OOM killer does."""
        if self.running.process.poll() is None:
            self.running.process.send_signal(signal.SIGKILL)
        self.running.process.wait(10)
        self._thread.join(5)
        for stream in (self.running.process.stdout, self.running.process.stderr):
            if stream is not None:
                stream.close()

    def stop(self) -> int:
        # Close stderr only once the drain thread has seen its end, or it would read a closed fd.
        process = self.running.process
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except Exception:
                process.kill()
                process.wait()
        self._thread.join(5)
        return self.running.stop()


def start_watched(workspaces: Path, *args: str, env: Optional[Dict[str, str]] = None) -> WatchedGateway:
    return WatchedGateway(launch(workspaces, *args, env=env))


Snapshot = Dict[str, Tuple[str, int, str]]


def snapshot_tree(top: Path, skip: Optional[Path] = None) -> Snapshot:
    """Every entry under ``top`` (``skip`` excluded) with its kind, mode and content hash (or link target)."""
    result: Snapshot = {}
    for directory, dirs, files in os.walk(top, followlinks=False):
        if skip is not None and Path(directory) == skip:
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if skip is None or Path(directory, d) != skip]
        for name in dirs + files:
            path = Path(directory, name)
            st = path.lstat()
            rel = str(path.relative_to(top))
            if stat.S_ISLNK(st.st_mode):
                result[rel] = ("link", st.st_mode, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                result[rel] = ("dir", st.st_mode, "")
            else:
                result[rel] = ("file", st.st_mode, hashlib.sha256(path.read_bytes()).hexdigest())
    return result

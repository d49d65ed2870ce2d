"""Compaction costs what it keeps, not the file's size, and a busy session stalls no other's writes.

A hostile agent can make run.log a sparse multi-GiB file without newlines at no disk cost. Compaction
must neither read it whole (it holds the session lock meanwhile) nor copy its zeros into a real file
(PROTOCOL §5.7, MAX_LINE_SCAN), and the one writer thread must not wait on that session's lock while
other sessions' journal lines and heartbeats queue behind it.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path
from typing import Callable, Iterator, List, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ops_service
from conftest import wait_for
from ops_service import OpsService
from uagw.limits import MAX_WRITER_BACKLOG
from uagw.logs import SessionWriter

GIB = 1 << 30
SPARSE_SIZE = 4 * GIB  # multi-GiB apparent size, no disk blocks: truncate() makes a hole
# Everything a bounded compaction may read from one such log: the line window, the kept tail,
# fingerprints and chunk slack. The old code read all 4 GiB.
READ_BUDGET = 4 * ops_service.MAX_LINE_SCAN
DISK_WAIT = 3.0  # s: generous for a loaded machine; the writer normally lands lines within ~20 ms


class ReadBudgetExceeded(Exception):
    """Raised by the counting pread as soon as compaction reads more than READ_BUDGET."""


@pytest.fixture
def svc(tmp_path: Path) -> OpsService:
    root = tmp_path / "root"
    root.mkdir()
    service = OpsService(root)
    service.ensure_root()
    return service


@pytest.fixture
def bytes_read(monkeypatch: pytest.MonkeyPatch) -> List[int]:
    """Counts the bytes os.pread returns; fails fast instead of reading gigabytes."""
    total = [0]
    real_pread = os.pread

    def counting_pread(fd: int, size: int, offset: int) -> bytes:
        data = real_pread(fd, size, offset)
        total[0] += len(data)
        if total[0] > READ_BUDGET:
            raise ReadBudgetExceeded("compaction read {} bytes so far".format(total[0]))
        return data

    monkeypatch.setattr(os, "pread", counting_pread)
    return total


def sparse_log(svc: OpsService, session_id: str, head: bytes, tail: bytes = b"") -> Path:
    """run.log = head, then zeros up to SPARSE_SIZE (a hole, no newline), then tail."""
    svc.create_session(session_id)
    path = svc.root / session_id / "run.log"
    with path.open("wb") as handle:
        handle.write(head)
        handle.truncate(SPARSE_SIZE)
        handle.seek(SPARSE_SIZE)
        handle.write(tail)
    return path


def archived_size(svc: OpsService, session_id: str, result: dict) -> int:
    return (svc.root / session_id / result["archive_dir"] / "run.log").stat().st_size


# -- compaction reads and keeps a bounded amount -----------------------------------------------


def test_compacting_a_sparse_log_without_newlines_reads_a_bounded_amount(svc, bytes_read):
    path = sparse_log(svc, "a", b"first line\n")
    result = svc.compact_session("a")
    assert bytes_read[0] <= READ_BUDGET
    # The unfinished multi-GiB line is cut: only its last MAX_LINE_SCAN bytes stay live.
    assert result["files"] == {"run.log": 0}
    assert path.stat().st_size == ops_service.MAX_LINE_SCAN
    assert result["bytes_dropped"] == SPARSE_SIZE - ops_service.MAX_LINE_SCAN
    assert archived_size(svc, "a", result) == SPARSE_SIZE


def test_compacting_keeps_a_huge_complete_line_cut_even_with_a_huge_max_bytes(svc, bytes_read):
    # The operator allows 8 GiB: the 4 GiB line would fit, but its sparse zeros must not be copied.
    path = sparse_log(svc, "a", b"first line\n", tail=b"\nlast line\n")
    result = svc.compact_session("a", max_bytes=8 * GIB)
    assert bytes_read[0] <= READ_BUDGET
    assert result["files"] == {"run.log": 2}
    data = path.read_bytes()
    assert len(data) == ops_service.MAX_LINE_SCAN + len(b"last line\n")
    assert data.endswith(b"\x00\nlast line\n")


# -- the plan matches a simple model of the rule -----------------------------------------------


def model_plan(data: bytes, max_lines: int, max_bytes: int, line_scan: int) -> Tuple[int, int]:
    """PROTOCOL §5.7 spelled out: (keep_start, kept_lines)."""
    end = data.rfind(b"\n") + 1
    if len(data) - end > line_scan:
        return len(data) - line_scan, 0  # the unfinished line is cut, kept alone
    if end == 0:
        return 0, 0
    if max_lines == 0 or max_bytes == 0:
        return end, 0
    lowest = max(0, end - max_bytes)
    keep, kept = end, 0
    while kept < max_lines and keep > 0:
        start = data.rfind(b"\n", 0, keep - 1) + 1
        cut = keep - start > line_scan
        if cut:
            start = keep - line_scan
        if start < lowest:
            break
        keep, kept = start, kept + 1
        if cut:
            break  # nothing before a cut line is kept
    return keep, kept


@settings(max_examples=300, deadline=None)
@given(
    data=st.lists(st.sampled_from([b"a", b"bb", b"\n", b"cccc", b"\n\n"]), max_size=30).map(b"".join),
    max_lines=st.integers(0, 6),
    max_bytes=st.integers(0, 40),
)
def test_compaction_plan_follows_the_line_scan_rule(tmp_path_factory, data, max_lines, max_bytes):
    line_scan = 5
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops_service, "MAX_LINE_SCAN", line_scan)
        patch.setattr(ops_service, "IO_CHUNK", 3)  # many chunks, so chunk edges are crossed
        path = tmp_path_factory.mktemp("plan") / "run.log"
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        try:
            plan = ops_service._plan_compaction(fd, len(data), max_lines, max_bytes)
        finally:
            os.close(fd)
    assert tuple(plan) == model_plan(data, max_lines, max_bytes, line_scan)


# -- the writer does not wait for a busy session -----------------------------------------------


def disk_shows(condition: Callable[[], bool]) -> bool:
    return wait_for(condition, timeout=DISK_WAIT, interval=0.005)


def read_or_empty(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def hand_over(writer: SessionWriter, items: List[Tuple[str, str, bytes]]) -> None:
    """Queue journal lines from an event loop, as the gateway does, and hand them over at once."""

    async def queue_them() -> None:
        for session_id, file_name, data in items:
            writer.append(session_id, file_name, data)
        writer.hand_over()

    asyncio.run(queue_them())


@pytest.fixture
def writer(svc) -> Iterator[SessionWriter]:
    svc.create_session("a")
    svc.create_session("b")
    session_writer = SessionWriter(svc, None)
    yield session_writer
    session_writer.close(timeout=DISK_WAIT)


@pytest.fixture
def a_locked(svc) -> Iterator[threading.Event]:
    """Holds session a's lock from another thread (as a long compaction would) until set."""
    release = threading.Event()
    held = threading.Event()

    def hold() -> None:
        with svc.session_lock("a"):
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert held.wait(DISK_WAIT)
    yield release
    release.set()
    holder.join(DISK_WAIT)


def test_a_locked_session_does_not_stall_another_sessions_journal_and_heartbeat(svc, writer, a_locked):
    hand_over(writer, [("a", "activity_journal.log", b"a1\n"), ("b", "activity_journal.log", b"b1\n")])
    asyncio.run(_heartbeat(writer, "b", {"state": "idle"}))
    journal_b = svc.root / "b" / "activity_journal.log"
    heartbeat_b = svc.root / "b" / "heartbeat_state.json"
    assert disk_shows(lambda: read_or_empty(journal_b) == b"b1\n")
    assert disk_shows(lambda: heartbeat_b.exists())
    assert json.loads(heartbeat_b.read_bytes()) == {"state": "idle"}
    assert not (svc.root / "a" / "activity_journal.log").exists()


async def _heartbeat(writer: SessionWriter, session_id: str, state: dict) -> None:
    writer.heartbeat(session_id, state)
    writer.hand_over()


def test_a_busy_sessions_lines_land_in_order_once_its_lock_is_free(svc, writer, a_locked):
    journal_a = svc.root / "a" / "activity_journal.log"
    journal_b = svc.root / "b" / "activity_journal.log"
    expected_a = b""
    expected_b = b""
    for n in range(5):
        line_a, line_b = "a{}\n".format(n).encode(), "b{}\n".format(n).encode()
        hand_over(writer, [("a", "activity_journal.log", line_a), ("b", "activity_journal.log", line_b)])
        expected_a += line_a
        expected_b += line_b
        # Each batch of b landing means a's items were passed over (and kept) once more.
        assert disk_shows(lambda: read_or_empty(journal_b) == expected_b)
    assert not journal_a.exists()
    a_locked.set()
    assert disk_shows(lambda: read_or_empty(journal_a) == expected_a)


def test_agent_output_waits_while_the_writer_backlog_is_over_its_bound(svc, writer, a_locked):
    # A session whose lock is held cannot be written: what its agent prints piles up in memory, until
    # wait_for_room (which every agent output reader awaits before reading) holds the agent back.
    chunk = b"x" * (1024 * 1024 - 1) + b"\n"
    room_while_locked = []

    async def flood() -> None:
        for _ in range(MAX_WRITER_BACKLOG // len(chunk) + 2):
            writer.append("a", "run.log", chunk)
        writer.hand_over()
        waiting = asyncio.ensure_future(writer.wait_for_room())
        await asyncio.sleep(0.3)
        room_while_locked.append(waiting.done())
        a_locked.set()  # the compaction ends: the backlog drains
        await asyncio.wait_for(waiting, DISK_WAIT)

    asyncio.run(flood())
    assert room_while_locked == [False]
    assert writer.backlog_bytes <= MAX_WRITER_BACKLOG

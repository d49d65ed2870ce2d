"""Tests of ops_service: workspaces on disk, the log slice, reset, compact and delete (PROTOCOL.md §2, §5)."""

from __future__ import annotations

import errno
import json
import os
import re
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import pytest

import ops_service
from ops_service import (
    InvalidArgument,
    InvalidCursor,
    InvalidSessionId,
    OpsService,
    SessionNotFound,
    StorageFull,
    WorkspacesUnavailable,
    decode_cursor,
    encode_cursor,
    is_valid_session_id,
    new_session_id,
    read_log_slice,
)

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$")
HOSTILE_IDS = [
    "..",
    ".",
    "../sentinel",
    "..\\sentinel",
    "%2E%2E",
    "/etc",
    "a/b",
    "a\\b",
    "a\x00b",
    "sentinel\n",
    "a\nb",
    "",
    " a",
    "_gateway",
    "x" * 129,
    5,
    None,
    b"abc",
    ["abc"],
]


# -- helpers -------------------------------------------------------------------------------


def make_session(root: Path, session_id: str, files: Optional[dict] = None) -> Path:
    path = root / session_id
    path.mkdir()
    for name, data in (files or {}).items():
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def set_mtime(path: Path, ts: float) -> None:
    os.utime(path, (ts, ts), follow_symlinks=False)


def snapshot(path: Path) -> dict:
    tree = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            st = os.lstat(full)
            content = full.read_bytes() if full.is_file() and not full.is_symlink() else None
            tree[str(full.relative_to(path))] = (st.st_mode, st.st_mtime_ns, content)
    return tree


def numbered(start: int, stop: int) -> bytes:
    return b"".join(b"line %d\n" % i for i in range(start, stop))


def follow_all(path: Path, cursor: str, **kwargs) -> tuple:
    lines = []
    while True:
        result = read_log_slice(path, cursor, **kwargs)
        lines += result["lines"]
        cursor = result["cursor"]
        if not result["more"]:
            return lines, cursor


# -- session ids ---------------------------------------------------------------------------


def test_session_id_of_128_characters_is_valid():
    assert is_valid_session_id("a" * 128)


def test_session_id_of_129_characters_is_invalid():
    assert not is_valid_session_id("a" * 129)


@pytest.mark.parametrize("value", [".x", "_x", "-x"])
def test_session_id_starting_with_dot_underscore_or_dash_is_invalid(value):
    assert not is_valid_session_id(value)


@pytest.mark.parametrize("value", HOSTILE_IDS)
def test_hostile_session_id_is_invalid(value):
    assert not is_valid_session_id(value)


def test_session_id_with_trailing_newline_is_invalid():
    # re's "$" matches before a final "\n"; fullmatch does not.
    assert not is_valid_session_id("session_1\n")


def test_new_session_id_is_utc_stamp_and_8_hex():
    now = datetime(2026, 11, 26, 10, 0, 5, tzinfo=timezone.utc)
    session_id = new_session_id(now)
    assert re.fullmatch(r"session_20261126_100005_[0-9a-f]{8}", session_id)
    assert is_valid_session_id(session_id)


# -- listing -------------------------------------------------------------------------------


def test_listing_keeps_only_valid_real_directories(svc, root):
    make_session(root, "good")
    (root / ".hidden").mkdir()
    (root / "_private").mkdir()
    (root / "file_not_dir").write_text("x")
    (root / "bad name").mkdir()
    result = svc.list_sessions()
    assert [s["session_id"] for s in result["sessions"]] == ["good"]
    assert result["total"] == 1


def test_listing_never_shows_the_gateway_dir(svc, root):
    (root / "_gateway" / "gateway.log").write_text("{}\n")
    assert svc.list_sessions()["sessions"] == []


def test_listing_skips_symlinks_to_directories_inside_and_outside_root(svc, root, tmp_path):
    make_session(root, "real")
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link_in").symlink_to(root / "real")
    (root / "link_out").symlink_to(outside)
    assert [s["session_id"] for s in svc.list_sessions()["sessions"]] == ["real"]


def test_listing_sorts_by_last_activity_newest_first(svc, root):
    for session_id in ["old", "new", "mid"]:
        make_session(root, session_id, {"run.log": "x\n"})
    set_mtime(root / "old" / "run.log", 1_000_000)
    set_mtime(root / "mid" / "run.log", 2_000_000)
    set_mtime(root / "new" / "run.log", 3_000_000)
    assert [s["session_id"] for s in svc.list_sessions()["sessions"]] == ["new", "mid", "old"]


def test_last_activity_is_the_newest_of_logs_and_heartbeat(svc, root):
    make_session(root, "s", {"run.log": "x\n", "activity_journal.log": "y\n", "heartbeat_state.json": "{}"})
    set_mtime(root / "s" / "run.log", 1_000_000)
    set_mtime(root / "s" / "activity_journal.log", 3_000_000)
    set_mtime(root / "s" / "heartbeat_state.json", 2_000_000)
    summary = svc.list_sessions()["sessions"][0]
    assert summary["last_activity"] == datetime.fromtimestamp(3_000_000, timezone.utc).isoformat()


def test_last_activity_falls_back_to_directory_mtime(svc, root):
    make_session(root, "s", {"notes.txt": "x"})
    set_mtime(root / "s", 1_500_000)
    summary = svc.list_sessions()["sessions"][0]
    assert summary["last_activity"] == summary["last_modified"] == "1970-01-18T08:40:00+00:00"


def test_listing_breaks_ties_by_session_id(svc, root):
    for session_id in ["b", "c", "a"]:
        make_session(root, session_id, {"run.log": "x\n"})
        set_mtime(root / session_id / "run.log", 1_000_000)
    assert [s["session_id"] for s in svc.list_sessions()["sessions"]] == ["a", "b", "c"]


def test_summary_has_the_spec_fields(svc, root):
    make_session(
        root,
        "s",
        {"run.log": "x\n", "MEMORY.md": "# m", "heartbeat_state.json": json.dumps({"last_run": 1_764_151_200.5})},
    )
    summary = svc.list_sessions()["sessions"][0]
    assert {
        "session_id",
        "status",
        "last_modified",
        "last_activity",
        "has_run_log",
        "has_activity_journal",
        "has_memory",
        "heartbeat_last",
        "heartbeat_last_at",
        "active_connections",
        "running",
    } <= set(summary)
    assert ISO_UTC.match(summary["last_modified"]) and ISO_UTC.match(summary["last_activity"])
    assert summary["has_run_log"] is True and summary["has_activity_journal"] is False
    assert summary["has_memory"] is True
    assert summary["heartbeat_last"] == 1_764_151_200.5  # UA's epoch float; our ISO form beside it
    assert summary["heartbeat_last_at"] == "2025-11-26T10:00:00+00:00"
    assert summary["active_connections"] == 0 and summary["running"] is False


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[1, 2]", b'{"last_run": 1e400}', b'{"last_run": NaN}', b"\xff\xfe", b" " * (1 << 20) + b"{}"],
    ids=["not-json", "not-an-object", "infinite", "nan", "not-utf8", "over-1-mib"],
)
def test_broken_or_huge_heartbeat_gives_null(svc, root, content):
    make_session(root, "s", {"heartbeat_state.json": content})
    assert svc.list_sessions()["sessions"][0]["heartbeat_last"] is None
    assert svc.session_details("s")["session"]["heartbeat"] is None


def test_heartbeat_without_a_usable_last_run_gives_null_heartbeat_last(svc, root):
    make_session(root, "s", {"heartbeat_state.json": '{"last_run": "yesterday"}'})
    session = svc.session_details("s")["session"]
    assert session["heartbeat_last"] is None and session["heartbeat"] == {"last_run": "yesterday"}


def test_status_is_archived_without_live_logs_and_with_an_archive(svc, root):
    make_session(root, "s", {"archive/20260101_000000_000000/run.log": "x\n"})
    assert svc.list_sessions()["sessions"][0]["status"] == "archived"


def test_status_is_idle_with_live_logs_even_with_archives(svc, root):
    make_session(root, "s", {"run.log": "x\n", "archive/20260101_000000_000000/run.log": "x\n"})
    assert svc.list_sessions()["sessions"][0]["status"] == "idle"


def test_status_is_idle_with_an_empty_archive_dir(svc, root):
    make_session(root, "s")
    (root / "s" / "archive").mkdir()
    assert svc.list_sessions()["sessions"][0]["status"] == "idle"


def test_status_is_active_from_runtime_connections_or_running_turn(svc, root):
    for session_id in ["connected", "running", "quiet"]:
        make_session(root, session_id)
    runtime = {"connected": (2, False), "running": (0, True)}
    summaries = {s["session_id"]: s for s in svc.list_sessions(runtime=runtime)["sessions"]}
    assert summaries["connected"]["status"] == "active" and summaries["connected"]["active_connections"] == 2
    assert summaries["running"]["status"] == "running" and summaries["running"]["running"] is True
    assert summaries["quiet"]["status"] == "idle"


def test_status_filter_counts_total_after_filtering(svc, root):
    make_session(root, "a1", {"archive/x/run.log": "x"})
    make_session(root, "a2", {"archive/x/run.log": "x"})
    make_session(root, "i1", {"run.log": "x\n"})
    make_session(root, "act")
    runtime = {"act": (1, False)}
    assert svc.list_sessions(status="archived", runtime=runtime)["total"] == 2
    assert [s["session_id"] for s in svc.list_sessions(status="active", runtime=runtime)["sessions"]] == ["act"]
    assert [s["session_id"] for s in svc.list_sessions(status="idle", runtime=runtime)["sessions"]] == ["i1"]
    assert svc.list_sessions(status="all", runtime=runtime)["total"] == 4


def test_pagination_with_limit_and_offset(svc, root):
    for index in range(5):
        make_session(root, "s%d" % index, {"run.log": "x\n"})
        set_mtime(root / ("s%d" % index) / "run.log", 1_000_000 + index)
    page = svc.list_sessions(limit=2, offset=1)
    assert [s["session_id"] for s in page["sessions"]] == ["s3", "s2"]
    assert (page["total"], page["limit"], page["offset"]) == (5, 2, 1)
    assert svc.list_sessions(limit=2, offset=10)["sessions"] == []


@pytest.mark.parametrize("limit, expected", [(0, 1), (-7, 1), (5000, 1000), (None, 100)])
def test_list_limit_is_clamped_to_1_through_1000(svc, root, limit, expected):
    make_session(root, "s1")
    make_session(root, "s2")
    result = svc.list_sessions(limit=limit)
    assert result["limit"] == expected
    assert len(result["sessions"]) == min(expected, 2)


def test_unknown_status_is_invalid_argument(svc):
    with pytest.raises(InvalidArgument, match="status must be one of all, running, active, idle, archived"):
        svc.list_sessions(status="bogus")


def test_negative_offset_is_invalid_argument(svc):
    with pytest.raises(InvalidArgument, match="offset"):
        svc.list_sessions(offset=-1)


@pytest.mark.parametrize("value", [True, "10", 1.5])
def test_list_limit_that_is_not_an_integer_is_invalid_argument(svc, value):
    with pytest.raises(InvalidArgument, match="limit must be an integer"):
        svc.list_sessions(limit=value)


def test_listing_skips_a_session_removed_mid_scan(svc, root, monkeypatch):
    make_session(root, "stays")
    make_session(root, "vanishes", {"run.log": "x\n"})
    real_open = os.open

    def open_that_loses_a_race(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        if path == "vanishes":  # opened through the root's descriptor, then removed
            gone = root / "vanishes"
            for name in os.listdir(gone):
                os.unlink(gone / name)
            os.rmdir(gone)
        return fd

    monkeypatch.setattr(os, "open", open_that_loses_a_race)
    assert [s["session_id"] for s in svc.list_sessions()["sessions"]] == ["stays"]


def test_missing_root_is_unavailable_and_recovers_when_it_reappears(tmp_path):
    root = tmp_path / "later"
    svc = OpsService(root)
    with pytest.raises(WorkspacesUnavailable, match=re.escape("Workspaces root {} is missing".format(root))):
        svc.list_sessions()
    root.mkdir()
    make_session(root, "s")
    assert svc.list_sessions()["total"] == 1


def test_root_that_is_a_file_is_unavailable(tmp_path):
    (tmp_path / "root").write_text("x")
    svc = OpsService(tmp_path / "root")
    with pytest.raises(WorkspacesUnavailable, match="is not a directory"):
        svc.list_sessions()
    with pytest.raises(WorkspacesUnavailable):
        svc.read_log("s", "run.log")


@pytest.mark.parametrize(
    "call",
    [
        lambda svc: svc.session_details("s"),
        lambda svc: svc.read_log("s", "run.log"),
        lambda svc: svc.read_gateway_log(),
        lambda svc: svc.create_session(),
        lambda svc: svc.reset_session("s"),
        lambda svc: svc.compact_session("s"),
        lambda svc: svc.delete_session("s"),
        lambda svc: svc.append_log("s", "run.log", b"x\n"),
        lambda svc: svc.write_heartbeat("s", {}),
    ],
)
def test_every_operation_is_unavailable_while_root_is_missing(tmp_path, call):
    svc = OpsService(tmp_path / "missing")
    with pytest.raises(WorkspacesUnavailable, match="is missing"):
        call(svc)


def test_listing_1000_sessions_is_fast(svc, root):
    for index in range(1000):
        make_session(root, "session_%04d" % index, {"run.log": "x\n", "heartbeat_state.json": '{"last_run": 1}'})
    started = time.perf_counter()
    page = svc.list_sessions(limit=100)
    elapsed = time.perf_counter() - started
    assert page["total"] == 1000 and len(page["sessions"]) == 100
    assert elapsed < 1.0


# -- details -------------------------------------------------------------------------------


def test_details_count_memory_files_and_bytes_without_following_symlinks(svc, root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big.bin").write_bytes(b"z" * 1000)
    make_session(root, "s", {"MEMORY.md": "12345", "memory/a.md": "abc", "memory/deep/b.md": "de"})
    (root / "s" / "memory" / "escape").symlink_to(outside)
    memory = svc.session_details("s")["memory"]
    assert memory == {"has_memory_md": True, "files": 2, "bytes": 10}


def test_details_list_top_level_files_sorted_by_name(svc, root):
    make_session(root, "s", {"run.log": "abc\n", "MEMORY.md": "m", "work_products/x": "x"})
    files = svc.session_details("s")["files"]
    assert [f["name"] for f in files] == ["MEMORY.md", "run.log", "work_products"]
    assert files[1]["size"] == 4 and ISO_UTC.match(files[1]["modified"])


def test_details_list_archives_oldest_first(svc, root):
    make_session(root, "s")
    for name in ["20260102_000000_000000", "20260101_000000_000000-10", "20260101_000000_000000-9", "20260101_000000_000000"]:
        (root / "s" / "archive" / name).mkdir(parents=True)
    assert svc.session_details("s")["archives"] == [
        "20260101_000000_000000",
        "20260101_000000_000000-9",
        "20260101_000000_000000-10",
        "20260102_000000_000000",
    ]


def test_details_include_the_parsed_heartbeat(svc, root):
    make_session(root, "s", {"heartbeat_state.json": json.dumps({"last_run": 0, "last_summary": {"ok_only": True}})})
    session = svc.session_details("s")["session"]
    assert session["heartbeat"] == {"last_run": 0, "last_summary": {"ok_only": True}}
    assert session["heartbeat_last"] == 0 and session["heartbeat_last_at"] == "1970-01-01T00:00:00+00:00"


def test_details_heartbeat_symlink_is_not_followed(svc, root, tmp_path):
    (tmp_path / "secret.json").write_text('{"secret": 1}')
    make_session(root, "s")
    (root / "s" / "heartbeat_state.json").symlink_to(tmp_path / "secret.json")
    assert svc.session_details("s")["session"]["heartbeat"] is None


def test_details_of_unknown_session_is_not_found(svc):
    with pytest.raises(SessionNotFound, match="Session nope not found"):
        svc.session_details("nope")


# -- the log slice: tail mode (rule 1) ------------------------------------------------------


def test_tail_returns_the_last_complete_lines_within_limit(tmp_path):
    log = tmp_path / "run.log"
    log.write_bytes(numbered(0, 100))
    result = read_log_slice(log, limit=5)
    assert result["lines"] == ["line 95", "line 96", "line 97", "line 98", "line 99"]
    assert result["truncated"] is True and result["reset"] is False and result["more"] is False
    assert result["file"] == "run.log" and result["size"] == log.stat().st_size


def test_tail_of_whole_file_is_not_truncated(tmp_path):
    log = tmp_path / "run.log"
    log.write_bytes(numbered(0, 3))
    result = read_log_slice(log)
    assert result["lines"] == ["line 0", "line 1", "line 2"] and result["truncated"] is False


def test_tail_window_drops_its_partial_first_line(tmp_path):
    log = tmp_path / "run.log"
    log.write_bytes(b"first-long-line\nsecond\nthird\n")
    result = read_log_slice(log, max_bytes=16)
    assert result["lines"] == ["second", "third"] and result["truncated"] is True


def test_tail_counts_bytes_as_in_the_file(tmp_path):
    log = tmp_path / "run.log"
    log.write_bytes(b"aaaa\nbbbb\ncccc\n")
    assert read_log_slice(log, max_bytes=10)["lines"] == ["bbbb", "cccc"]
    assert read_log_slice(log, max_bytes=9)["lines"] == ["cccc"]


def test_tail_of_line_longer_than_max_bytes_returns_it_cut(tmp_path):
    log = tmp_path / "run.log"
    log.write_bytes(b"short\n" + b"x" * 50 + b"\n")
    result = read_log_slice(log, max_bytes=11)
    assert result["lines"] == ["x" * 10] and result["truncated"] is True


# -- follow mode (rule 2) -------------------------------------------------------------------


def test_follow_returns_lines_written_after_the_cursor(tmp_path):
    log = tmp_path / "run.log"
    log.write_bytes(numbered(0, 3))
    cursor = read_log_slice(log)["cursor"]
    with log.open("ab") as handle:
        handle.write(numbered(3, 5))
    result = read_log_slice(log, cursor)
    assert result["lines"] == ["line 3", "line 4"] and result["reset"] is False and result["more"] is False
    assert read_log_slice(log, result["cursor"])["lines"] == []


def test_follow_limit_is_oldest_first_with_more_and_no_loss(tmp_path):
    log = tmp_path / "run.log"
    log.write_bytes(b"")
    cursor = read_log_slice(log)["cursor"]
    log.write_bytes(numbered(0, 20))
    first = read_log_slice(log, cursor, limit=5)
    assert first["lines"] == ["line %d" % i for i in range(5)] and first["more"] is True
    rest, _ = follow_all(log, first["cursor"], limit=5)
    assert rest == ["line %d" % i for i in range(5, 20)]


def test_follow_max_bytes_pages_forward_without_gaps(tmp_path):
    log = tmp_path / "run.log"
    log.write_bytes(b"")
    cursor = read_log_slice(log)["cursor"]
    log.write_bytes(numbered(0, 1000))
    lines, _ = follow_all(log, cursor, max_bytes=100)
    assert lines == ["line %d" % i for i in range(1000)]


def test_more_is_false_when_only_an_unfinished_line_remains(tmp_path):
    log = tmp_path / "run.log"
    log.write_bytes(b"")
    cursor = read_log_slice(log)["cursor"]
    log.write_bytes(b"done\npartial")
    result = read_log_slice(log, cursor)
    assert result["lines"] == ["done"] and result["more"] is False


# -- partial and long lines (rule 3) --------------------------------------------------------


def test_partial_last_line_is_held_back_then_delivered_whole(tmp_path):
    log = tmp_path / "run.log"
    log.write_bytes(b"alpha\nbeta-part")
    first = read_log_slice(log)
    assert first["lines"] == ["alpha"]
    with log.open("ab") as handle:
        handle.write(b"-rest\ngamma\n")
    second = read_log_slice(log, first["cursor"])
    assert second["lines"] == ["beta-part-rest", "gamma"]


def test_follow_line_longer_than_max_bytes_is_cut_then_continued(tmp_path):
    log = tmp_path / "run.log"
    log.write_bytes(b"")
    cursor = read_log_slice(log)["cursor"]
    log.write_bytes(b"a" * 25 + b"\nnext\n")
    pieces = []
    flags = []
    while True:
        result = read_log_slice(log, cursor, max_bytes=10)
        pieces += result["lines"]
        flags.append(result["truncated"])
        cursor = result["cursor"]
        if not result["more"]:
            break
    assert pieces == ["a" * 10, "a" * 10, "a" * 5, "next"]
    assert "".join(pieces[:3]) == "a" * 25
    assert flags == [True, True, True, False]


# -- rotation and truncation (rule 4) -------------------------------------------------------


def test_follow_across_rotation_to_a_longer_file_resets(tmp_path):
    log = tmp_path / "run.log"
    log.write_bytes(numbered(0, 3))
    cursor = read_log_slice(log)["cursor"]
    log.rename(tmp_path / "run.log.1")
    log.write_bytes(numbered(100, 110))  # already longer than the old offset
    result = read_log_slice(log, cursor)
    assert result["reset"] is True
    assert result["lines"] == ["line %d" % i for i in range(100, 110)]
    assert read_log_slice(log, result["cursor"])["reset"] is False


def test_follow_returns_every_line_once_across_rotations(tmp_path):
    log = tmp_path / "run.log"
    log.write_bytes(b"")
    cursor = read_log_slice(log)["cursor"]
    seen = []
    for generation in range(3):
        with log.open("ab") as handle:
            handle.write(numbered(generation * 10, generation * 10 + 10))
        lines, cursor = follow_all(log, cursor, limit=3)
        seen += lines
        log.rename(tmp_path / "run.log.1")
        log.write_bytes(b"")
    assert seen == ["line %d" % i for i in range(30)]


def test_follow_after_truncation_resets(tmp_path):
    log = tmp_path / "run.log"
    log.write_bytes(numbered(0, 10))
    cursor = read_log_slice(log)["cursor"]
    log.write_bytes(b"fresh\n")
    result = read_log_slice(log, cursor)
    assert result["reset"] is True and result["lines"] == ["fresh"]


def test_follow_after_truncation_and_regrowth_past_the_offset_resets(tmp_path):
    log = tmp_path / "run.log"
    log.write_bytes(numbered(0, 3))
    cursor = read_log_slice(log)["cursor"]
    with log.open("r+b") as handle:  # same inode, rewritten in place
        handle.truncate(0)
        handle.write(numbered(50, 60))
    result = read_log_slice(log, cursor)
    assert result["reset"] is True and result["lines"][0] == "line 50"


def test_follow_after_reset_restarts_within_limits(tmp_path):
    log = tmp_path / "run.log"
    log.write_bytes(numbered(0, 3))
    cursor = read_log_slice(log)["cursor"]
    log.unlink()  # the new file may well get the same inode back
    log.write_bytes(numbered(100, 150))
    result = read_log_slice(log, cursor, limit=10)
    assert result["reset"] is True and result["lines"] == ["line %d" % i for i in range(100, 110)]
    assert result["more"] is True


def test_offset_zero_cursor_never_counts_as_reset(tmp_path):
    log = tmp_path / "run.log"
    log.write_bytes(b"unfinished")
    cursor = read_log_slice(log)["cursor"]
    log.unlink()
    log.write_bytes(b"other\n")
    result = read_log_slice(log, cursor)
    assert result["reset"] is False and result["lines"] == ["other"]


# -- decoding (rule 5) ---------------------------------------------------------------------


def test_crlf_line_endings_are_stripped(tmp_path):
    log = tmp_path / "run.log"
    log.write_bytes(b"a\r\nb\r\nc\r\r\n")
    assert read_log_slice(log)["lines"] == ["a", "b", "c\r"]


def test_invalid_utf8_is_replaced(tmp_path):
    log = tmp_path / "run.log"
    log.write_bytes(b"ok \xff\xfe bytes\n")
    assert read_log_slice(log)["lines"] == ["ok \ufffd\ufffd bytes"]


def test_multibyte_character_split_across_writes_arrives_whole(tmp_path):
    log = tmp_path / "run.log"
    euro = "€".encode()
    log.write_bytes(b"price " + euro[:1])
    first = read_log_slice(log)
    with log.open("ab") as handle:
        handle.write(euro[1:] + b"\n")
    assert read_log_slice(log, first["cursor"])["lines"] == ["price €"]


# -- clamps and cursors (rule 6) ------------------------------------------------------------


def test_limit_is_clamped_to_5000(tmp_path):
    log = tmp_path / "run.log"
    log.write_bytes(b"x\n" * 6000)
    assert len(read_log_slice(log, limit=10**9, max_bytes=10**9)["lines"]) == 5000


def test_zero_limit_and_max_bytes_are_clamped_to_1(tmp_path):
    log = tmp_path / "run.log"
    log.write_bytes(b"ab\ncd\n")
    result = read_log_slice(log, limit=0, max_bytes=0)
    assert result["lines"] == [""] and result["truncated"] is True


def test_max_bytes_default_is_250000(tmp_path):
    log = tmp_path / "run.log"
    log.write_bytes(b"y" * 99 + b"\n" + b"x" * 299_999 + b"\n")
    assert read_log_slice(log)["lines"] == ["x" * 249_999]


@pytest.mark.parametrize("value", [True, "5", 2.0])
def test_non_integer_limit_is_invalid_argument(tmp_path, value):
    with pytest.raises(InvalidArgument, match="limit must be an integer"):
        read_log_slice(tmp_path / "run.log", limit=value)


def test_legacy_integer_cursor_is_a_byte_offset(tmp_path):
    log = tmp_path / "run.log"
    log.write_bytes(b"aaaa\nbbbb\ncccc\n")
    assert read_log_slice(log, 5)["lines"] == ["bbbb", "cccc"]
    assert read_log_slice(log, "10")["lines"] == ["cccc"]
    assert read_log_slice(log, "5")["reset"] is False


def test_legacy_cursor_beyond_the_end_resets(tmp_path):
    log = tmp_path / "run.log"
    log.write_bytes(b"aaaa\n")
    result = read_log_slice(log, 10_000)
    assert result["reset"] is True and result["lines"] == ["aaaa"]


@pytest.mark.parametrize("cursor", [-5, "-5"])
def test_negative_legacy_cursor_is_invalid(tmp_path, cursor):
    with pytest.raises(InvalidCursor, match="negative"):
        read_log_slice(tmp_path / "run.log", cursor)


@pytest.mark.parametrize("cursor", ["abc", "!!!", "x" * 300, "1" * 40, " 12", "１２", True, 1.5, ["a"]])
def test_garbled_cursor_is_invalid(tmp_path, cursor):
    (tmp_path / "run.log").write_bytes(b"a\n")
    with pytest.raises(InvalidCursor, match="not one this gateway issued|negative"):
        read_log_slice(tmp_path / "run.log", cursor)


def test_every_single_character_edit_of_a_cursor_is_rejected(tmp_path):
    log = tmp_path / "run.log"
    log.write_bytes(b"a\nb\n")
    token = read_log_slice(log)["cursor"]
    assert token.isascii() and re.fullmatch(r"[A-Za-z0-9_-]+", token)
    for index, char in enumerate(token):
        replacement = "A" if char != "A" else "B"
        with pytest.raises(InvalidCursor):
            decode_cursor(token[:index] + replacement + token[index + 1 :])


def test_cursor_round_trips_through_encode_and_decode():
    cursor = ops_service.LogCursor(7, 8, 9, b"h" * 8, b"b" * 8)
    assert decode_cursor(encode_cursor(cursor)) == cursor


def test_empty_cursor_string_means_tail_mode(tmp_path):
    log = tmp_path / "run.log"
    log.write_bytes(numbered(0, 3))
    assert read_log_slice(log, "")["lines"] == ["line 0", "line 1", "line 2"]


# -- missing and foreign files --------------------------------------------------------------


def test_missing_file_gives_an_empty_slice(tmp_path):
    result = read_log_slice(tmp_path / "run.log")
    assert result == {
        "file": "run.log",
        "cursor": result["cursor"],
        "size": 0,
        "lines": [],
        "truncated": False,
        "reset": False,
        "more": False,
    }
    assert decode_cursor(result["cursor"])[:3] == (0, 0, 0)


def test_missing_file_after_reading_reports_reset(tmp_path):
    log = tmp_path / "run.log"
    log.write_bytes(b"a\n")
    cursor = read_log_slice(log)["cursor"]
    log.unlink()
    assert read_log_slice(log, cursor)["reset"] is True


def test_file_that_appears_later_is_read_from_the_start_without_reset(tmp_path):
    log = tmp_path / "run.log"
    cursor = read_log_slice(log)["cursor"]
    log.write_bytes(b"first\nsecond\n")
    result = read_log_slice(log, cursor)
    assert result["lines"] == ["first", "second"] and result["reset"] is False


def test_symlinked_log_is_never_read_through(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"password\n")
    (tmp_path / "run.log").symlink_to(secret)
    assert read_log_slice(tmp_path / "run.log")["lines"] == []


def test_fifo_named_like_a_log_reads_as_missing_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "run.log")
    assert read_log_slice(tmp_path / "run.log")["lines"] == []


# -- cost (rule 7) -------------------------------------------------------------------------


@pytest.fixture
def huge_log(tmp_path: Path) -> Path:
    log = tmp_path / "huge.log"
    with log.open("wb") as handle:
        handle.truncate(4 << 30)  # sparse: 4 GiB of holes
        handle.seek(4 << 30)
        handle.write(numbered(0, 1000))
    return log


@pytest.fixture
def pread_bytes(monkeypatch) -> list:
    counted = [0]
    real_pread = os.pread

    def counting_pread(fd, size, offset):
        data = real_pread(fd, size, offset)
        counted[0] += len(data)
        return data

    monkeypatch.setattr(os, "pread", counting_pread)
    return counted


def test_tail_of_a_4_gib_sparse_file_reads_a_bounded_number_of_bytes(huge_log, pread_bytes):
    result = read_log_slice(huge_log, limit=10)
    assert result["lines"] == ["line %d" % i for i in range(990, 1000)]
    assert pread_bytes[0] < 70_000


def test_tail_window_of_a_4_gib_sparse_file_reads_at_most_about_max_bytes(huge_log, pread_bytes):
    result = read_log_slice(huge_log, limit=5000, max_bytes=200_000)
    assert result["lines"][-1] == "line 999" and result["truncated"] is True
    assert pread_bytes[0] < 200_000 + 70_000


def test_follow_from_the_start_of_a_4_gib_file_reads_a_bounded_number_of_bytes(huge_log, pread_bytes):
    result = read_log_slice(huge_log, 0, max_bytes=100_000)
    assert result["lines"] == ["\x00" * 100_000] and result["more"] is True
    assert pread_bytes[0] < 100_000 + 70_000


# -- the service's log reads ---------------------------------------------------------------


def test_read_log_reads_the_named_session_log(svc, root):
    make_session(root, "s", {"activity_journal.log": "[x] [TEXT] hi\n", "run.log": "raw\n"})
    assert svc.read_log("s", "activity_journal.log")["lines"] == ["[x] [TEXT] hi"]
    assert svc.read_log("s", "run.log")["file"] == "run.log"


def test_read_log_of_a_session_without_the_file_is_empty(svc, root):
    make_session(root, "s")
    assert svc.read_log("s", "activity_journal.log")["lines"] == []


def test_read_log_rejects_other_file_names(svc, root):
    make_session(root, "s")
    with pytest.raises(InvalidArgument, match="file must be one of run.log, activity_journal.log"):
        svc.read_log("s", "../../etc/passwd")


def test_read_log_of_unknown_session_is_not_found(svc):
    with pytest.raises(SessionNotFound):
        svc.read_log("nope", "run.log")


def test_read_log_with_garbled_cursor_is_invalid_before_lookup(svc):
    with pytest.raises(InvalidCursor):
        svc.read_log("nope", "run.log", cursor="garbage")


def test_gateway_log_slice_reads_the_gateway_log(svc, root):
    (root / "_gateway" / "gateway.log").write_bytes(b'{"event": "start"}\n')
    result = svc.read_gateway_log()
    assert result["file"] == "gateway.log" and result["lines"] == ['{"event": "start"}']


def test_gateway_log_slice_is_empty_before_the_log_exists(tmp_path):
    (tmp_path / "root").mkdir()
    assert OpsService(tmp_path / "root").read_gateway_log()["lines"] == []


# -- create --------------------------------------------------------------------------------


def test_create_session_makes_its_directory_and_work_products(svc, root):
    created = svc.create_session()
    assert re.fullmatch(r"session_\d{8}_\d{6}_[0-9a-f]{8}", created["session_id"])
    assert created["workspace_dir"] == str(root / created["session_id"])
    assert created["created"] is True
    assert (root / created["session_id"] / "work_products").is_dir()


def test_create_session_with_an_existing_id_is_idempotent(svc, root):
    make_session(root, "mine", {"run.log": "keep\n"})
    assert svc.create_session("mine") == {"session_id": "mine", "workspace_dir": str(root / "mine"), "created": False}
    assert (root / "mine" / "run.log").read_text() == "keep\n"


def test_create_session_over_a_non_directory_is_invalid_argument(svc, root):
    (root / "taken").write_text("x")
    with pytest.raises(InvalidArgument, match="not a session directory"):
        svc.create_session("taken")


# -- append and heartbeat ------------------------------------------------------------------


def test_append_log_creates_then_appends(svc, root):
    make_session(root, "s")
    svc.append_log("s", "run.log", b"one\n")
    svc.append_log("s", "run.log", b"two\n")
    assert (root / "s" / "run.log").read_bytes() == b"one\ntwo\n"


def test_append_log_refuses_to_write_through_a_symlink(svc, root, tmp_path):
    target = tmp_path / "target.txt"
    target.write_bytes(b"untouched")
    make_session(root, "s")
    (root / "s" / "run.log").symlink_to(target)
    with pytest.raises(WorkspacesUnavailable, match="never writes through"):
        svc.append_log("s", "run.log", b"x\n")
    assert target.read_bytes() == b"untouched"


def test_append_log_to_a_fifo_is_refused_without_blocking(svc, root):
    make_session(root, "s")
    os.mkfifo(root / "s" / "run.log")
    with pytest.raises(WorkspacesUnavailable):
        svc.append_log("s", "run.log", b"x\n")


def test_append_log_rejects_unknown_files_and_non_bytes(svc, root):
    make_session(root, "s")
    with pytest.raises(InvalidArgument):
        svc.append_log("s", "notes.txt", b"x")
    with pytest.raises(InvalidArgument, match="data must be bytes"):
        svc.append_log("s", "run.log", "text")


def test_append_log_on_a_full_disk_raises_storage_full(svc, root, monkeypatch):
    make_session(root, "s")

    def full_disk(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(StorageFull, match="No space left"):
        svc.append_log("s", "run.log", b"x\n")


def test_write_heartbeat_replaces_the_file_through_a_temp_in_the_same_dir(svc, root, monkeypatch):
    make_session(root, "s", {"heartbeat_state.json": '{"last_run": 1}'})
    replaced = []
    real_replace = os.replace

    def spy_replace(src, dst, *, src_dir_fd=None, dst_dir_fd=None):
        replaced.append((src, dst, os.path.samestat(os.fstat(src_dir_fd), os.fstat(dst_dir_fd))))
        return real_replace(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    monkeypatch.setattr(os, "replace", spy_replace)
    svc.write_heartbeat("s", {"last_run": 2})
    (src, dst, same_dir), = replaced
    assert src.startswith(".heartbeat_state.json.") and dst == "heartbeat_state.json" and same_dir
    assert json.loads((root / "s" / "heartbeat_state.json").read_text()) == {"last_run": 2}
    assert sorted(p.name for p in (root / "s").iterdir()) == ["heartbeat_state.json"]


def test_failed_heartbeat_write_keeps_the_old_file_and_leaves_no_temp(svc, root, monkeypatch):
    make_session(root, "s", {"heartbeat_state.json": '{"last_run": 1}'})

    def full_disk(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(StorageFull):
        svc.write_heartbeat("s", {"last_run": 2})
    monkeypatch.undo()
    assert sorted(p.name for p in (root / "s").iterdir()) == ["heartbeat_state.json"]
    assert (root / "s" / "heartbeat_state.json").read_text() == '{"last_run": 1}'


@pytest.mark.parametrize("state", [[1, 2], {"x": float("nan")}, {"x": object()}])
def test_write_heartbeat_rejects_state_that_is_not_a_json_object(svc, root, state):
    make_session(root, "s")
    with pytest.raises(InvalidArgument):
        svc.write_heartbeat("s", state)


def test_session_lock_is_one_lock_per_session_and_not_kept_when_unused(svc):
    lock = svc.session_lock("s")
    assert svc.session_lock("s") is lock and svc.session_lock("t") is not lock
    del lock
    assert "s" not in svc._locks


# -- reset ---------------------------------------------------------------------------------


def test_reset_moves_the_logs_into_a_new_archive(svc, root):
    make_session(root, "s", {"run.log": "r\n", "activity_journal.log": "j\n", "MEMORY.md": "m"})
    result = svc.reset_session("s")
    assert result["status"] == "reset" and result["archived"] == ["run.log", "activity_journal.log"]
    archive = root / "s" / result["archive_path"]
    assert re.fullmatch(r"archive/\d{8}_\d{6}_\d{6}", result["archive_path"])
    assert result["archive_dir"] == str(archive)
    assert (archive / "run.log").read_text() == "r\n" and (archive / "activity_journal.log").read_text() == "j\n"
    assert not (root / "s" / "run.log").exists() and (root / "s" / "MEMORY.md").exists()


def test_two_resets_in_the_same_instant_keep_both_archives_whole(svc, root, monkeypatch):
    monkeypatch.setattr(ops_service, "_stamp", lambda: "20260101_000000_000000")
    make_session(root, "s", {"run.log": "first\n", "memory/a.md": "one"})
    first = svc.reset_session("s", clear_memory=True)
    (root / "s" / "run.log").write_text("second\n")
    (root / "s" / "memory").mkdir()
    (root / "s" / "memory" / "b.md").write_text("two")
    second = svc.reset_session("s", clear_memory=True)
    assert first["archive_path"] == "archive/20260101_000000_000000"
    assert second["archive_path"] == "archive/20260101_000000_000000-1"
    assert (root / "s" / first["archive_path"] / "run.log").read_text() == "first\n"
    assert (root / "s" / second["archive_path"] / "run.log").read_text() == "second\n"
    assert [p.name for p in (root / "s" / second["archive_path"] / "memory").iterdir()] == ["b.md"]


def test_two_quick_resets_get_distinct_archives(svc, root):
    make_session(root, "s", {"run.log": "first\n"})
    first = svc.reset_session("s")
    (root / "s" / "run.log").write_text("second\n")
    second = svc.reset_session("s")
    assert first["archive_dir"] != second["archive_dir"]
    assert len(svc.session_details("s")["archives"]) == 2


def test_reset_with_memory_and_work_products_recreates_empty_work_products(svc, root):
    make_session(root, "s", {"MEMORY.md": "m", "memory/a.md": "a", "work_products/report.pdf": "pdf"})
    result = svc.reset_session("s", clear_logs=False, clear_memory=True, clear_work_products=True)
    assert result["archived"] == ["MEMORY.md", "memory", "work_products"]
    assert list((root / "s" / "work_products").iterdir()) == []
    assert (root / "s" / result["archive_dir"] / "work_products" / "report.pdf").read_text() == "pdf"


def test_reset_with_nothing_to_move_creates_no_archive(svc, root):
    make_session(root, "s")
    assert svc.reset_session("s") == {"status": "reset", "archived": [], "archive_dir": None, "archive_path": None,
                                      "bytes_dropped": 0, "bytes_archived": 0, "bytes_freed": 0}
    assert not (root / "s" / "archive").exists()


@pytest.mark.parametrize("flag", ["clear_logs", "clear_memory", "clear_work_products"])
def test_reset_flags_must_be_booleans(svc, root, flag):
    make_session(root, "s", {"run.log": "x\n"})
    with pytest.raises(InvalidArgument, match=flag):
        svc.reset_session("s", **{flag: "yes"})
    assert (root / "s" / "run.log").exists()


def test_reset_session_becomes_archived(svc, root):
    make_session(root, "s", {"run.log": "x\n"})
    svc.reset_session("s")
    assert svc.list_sessions()["sessions"][0]["status"] == "archived"


def test_append_after_reset_creates_a_new_live_log(svc, root):
    make_session(root, "s")
    svc.append_log("s", "run.log", b"before\n")
    archive_dir = svc.reset_session("s")["archive_dir"]
    svc.append_log("s", "run.log", b"after\n")
    assert (root / "s" / "run.log").read_bytes() == b"after\n"
    assert (root / "s" / archive_dir / "run.log").read_bytes() == b"before\n"


def test_reset_moves_a_symlinked_log_without_following_it(svc, root, tmp_path):
    target = tmp_path / "elsewhere.log"
    target.write_text("outside\n")
    make_session(root, "s")
    (root / "s" / "run.log").symlink_to(target)
    result = svc.reset_session("s")
    assert (root / "s" / result["archive_dir"] / "run.log").is_symlink()
    assert target.read_text() == "outside\n"


def test_reset_refuses_an_archive_symlink_pointing_outside(svc, root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    make_session(root, "s", {"run.log": "x\n"})
    (root / "s" / "archive").symlink_to(outside)
    with pytest.raises(WorkspacesUnavailable, match="not a directory"):
        svc.reset_session("s")
    assert list(outside.iterdir()) == [] and (root / "s" / "run.log").exists()


def test_reset_of_unknown_session_is_not_found(svc):
    with pytest.raises(SessionNotFound):
        svc.reset_session("nope")


# -- compact -------------------------------------------------------------------------------


def test_compact_keeps_the_last_lines_and_archives_the_full_original(svc, root):
    original = numbered(0, 100)
    make_session(root, "s", {"run.log": original})
    result = svc.compact_session("s", max_lines=5)
    assert result["status"] == "compacted" and result["files"] == {"run.log": 5}
    assert (root / "s" / "run.log").read_bytes() == numbered(95, 100)
    assert (root / "s" / result["archive_dir"] / "run.log").read_bytes() == original


def test_compact_reports_bytes_dropped(svc, root):
    make_session(root, "s", {"run.log": numbered(0, 10), "activity_journal.log": b"j\n" * 10})
    result = svc.compact_session("s", max_lines=2)
    assert result["bytes_dropped"] == len(numbered(0, 8)) + 16
    assert result["files"] == {"run.log": 2, "activity_journal.log": 2}


def test_compact_keeps_the_unfinished_last_line_as_it_is(svc, root):
    make_session(root, "s", {"run.log": numbered(0, 10) + b"still writing"})
    svc.compact_session("s", max_lines=2)
    assert (root / "s" / "run.log").read_bytes() == numbered(8, 10) + b"still writing"


def test_compact_keeps_only_lines_within_max_bytes(svc, root):
    make_session(root, "s", {"run.log": b"aaaa\nbbbb\ncccc\n"})
    assert svc.compact_session("s", max_lines=400, max_bytes=10)["files"] == {"run.log": 2}
    assert (root / "s" / "run.log").read_bytes() == b"bbbb\ncccc\n"


def test_compact_with_max_lines_zero_keeps_only_the_unfinished_line(svc, root):
    make_session(root, "s", {"run.log": b"a\nb\npartial"})
    assert svc.compact_session("s", max_lines=0)["files"] == {"run.log": 0}
    assert (root / "s" / "run.log").read_bytes() == b"partial"


def test_compact_leaves_a_small_log_alone(svc, root):
    make_session(root, "s", {"run.log": numbered(0, 3)})
    inode = (root / "s" / "run.log").stat().st_ino
    result = svc.compact_session("s")
    assert result == {"status": "compacted", "files": {"run.log": 3}, "bytes_dropped": 0, "bytes_archived": 0,
                      "bytes_freed": 0, "archived": True, "archive_dir": None, "archive_path": None}
    assert (root / "s" / "run.log").stat().st_ino == inode


def test_compact_preserves_the_file_mode(svc, root):
    make_session(root, "s", {"run.log": numbered(0, 10)})
    os.chmod(root / "s" / "run.log", 0o600)
    svc.compact_session("s", max_lines=1)
    assert (root / "s" / "run.log").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("kwargs", [{"max_lines": -1}, {"max_bytes": -1}, {"max_lines": True}, {"max_bytes": "10"}])
def test_compact_rejects_negative_or_non_integer_limits(svc, root, kwargs):
    make_session(root, "s", {"run.log": "x\n"})
    with pytest.raises(InvalidArgument):
        svc.compact_session("s", **kwargs)


def test_compact_removes_a_stale_temp_file(svc, root):
    make_session(root, "s", {"run.log": numbered(0, 10), ".run.log.compact.tmp": "stale"})
    svc.compact_session("s", max_lines=1)
    assert (root / "s" / "run.log").read_bytes() == numbered(9, 10)
    assert not (root / "s" / ".run.log.compact.tmp").exists()


def test_follow_after_compact_reports_reset(svc, root):
    make_session(root, "s", {"run.log": numbered(0, 10)})
    cursor = svc.read_log("s", "run.log")["cursor"]
    svc.compact_session("s", max_lines=2)
    result = svc.read_log("s", "run.log", cursor)
    assert result["reset"] is True and result["lines"] == ["line 8", "line 9"]


def test_compact_of_a_1_gib_log_takes_milliseconds(svc, root):
    make_session(root, "s")
    with (root / "s" / "run.log").open("wb") as handle:
        handle.truncate(1 << 30)
        handle.seek(1 << 30)
        handle.write(numbered(0, 10_000))
    started = time.perf_counter()
    result = svc.compact_session("s")
    elapsed = time.perf_counter() - started
    assert result["files"] == {"run.log": 400} and result["bytes_dropped"] > 1 << 30
    assert (root / "s" / "run.log").read_bytes() == numbered(9600, 10_000)
    assert elapsed < 0.5


def _all_archived_lines(session: Path) -> set:
    lines = set()
    for log in (session / "archive").glob("*/run.log"):
        lines.update(log.read_bytes().splitlines())
    return lines


def test_compact_while_a_thread_appends_loses_no_line_and_keeps_order(svc, root):
    make_session(root, "s")
    total = 5000
    writer = threading.Thread(
        target=lambda: [svc.append_log("s", "run.log", b"%d\n" % i) for i in range(total)]
    )
    writer.start()
    compactions = 0
    while writer.is_alive() or compactions == 0:
        svc.compact_session("s", max_lines=50)
        compactions += 1
    writer.join()
    live = [int(line) for line in (root / "s" / "run.log").read_bytes().splitlines()]
    assert live == list(range(live[0], total))
    everything = _all_archived_lines(root / "s") | {b"%d" % i for i in live}
    assert everything == {b"%d" % i for i in range(total)}
    assert compactions > 1


def test_compact_while_an_outside_writer_appends_loses_no_line(svc, root):
    make_session(root, "s")
    log = root / "s" / "run.log"
    total = 3000

    def outside_writer():
        for i in range(total):
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            os.write(fd, b"%d\n" % i)
            os.close(fd)

    writer = threading.Thread(target=outside_writer)
    writer.start()
    while writer.is_alive():
        svc.compact_session("s", max_lines=20)
    writer.join()
    everything = _all_archived_lines(root / "s") | set(log.read_bytes().splitlines())
    assert everything == {b"%d" % i for i in range(total)}


def test_compact_of_unknown_session_is_not_found(svc):
    with pytest.raises(SessionNotFound):
        svc.compact_session("nope")


# -- delete --------------------------------------------------------------------------------


def test_delete_removes_the_session_and_empties_the_trash(svc, root):
    make_session(root, "s", {"run.log": "x\n", "memory/a.md": "a"})
    assert svc.delete_session("s") == {"status": "deleted", "session_id": "s"}
    assert not (root / "s").exists()
    assert svc.list_sessions()["total"] == 0
    assert list((root / "_gateway" / "trash").iterdir()) == []


def test_delete_does_not_follow_symlinks_inside_the_session(svc, root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep")
    make_session(root, "s")
    (root / "s" / "link").symlink_to(outside)
    svc.delete_session("s")
    assert (outside / "precious.txt").read_text() == "keep"


def test_delete_of_a_symlink_named_like_a_session_leaves_it_and_its_target(svc, root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep")
    (root / "evil").symlink_to(outside)
    with pytest.raises(SessionNotFound):
        svc.delete_session("evil")
    assert (root / "evil").is_symlink() and (outside / "precious.txt").read_text() == "keep"


def test_delete_of_unknown_session_is_not_found(svc):
    with pytest.raises(SessionNotFound):
        svc.delete_session("nope")


def test_ensure_root_clears_leftovers_of_an_interrupted_delete(svc, root):
    leftover = root / "_gateway" / "trash" / "s.20260101_000000_000000"
    leftover.mkdir(parents=True)
    (leftover / "run.log").write_text("x")
    svc.ensure_root()
    assert not leftover.exists()


GARBAGE_ARGUMENTS = [None, -1, 0, 10**30, True, "x", "", 1.5, float("nan"), b"x", [], {}, object(), "\x00"]


def garbage_id(value: object) -> str:
    """repr, but stable across processes (a bare object's repr holds its address): test ids must match."""
    return "object()" if type(value) is object else repr(value)


@pytest.mark.parametrize("value", GARBAGE_ARGUMENTS, ids=garbage_id)
def test_garbage_arguments_raise_nothing_but_ops_errors(svc, root, value):
    make_session(root, "s", {"run.log": numbered(0, 10), "activity_journal.log": numbered(0, 10)})
    calls = [
        lambda: svc.list_sessions(status=value),
        lambda: svc.list_sessions(limit=value),
        lambda: svc.list_sessions(offset=value),
        lambda: svc.list_sessions(runtime=value),
        lambda: svc.list_sessions(runtime={"s": value}),
        lambda: svc.session_details("s", runtime=value),
        lambda: svc.read_log("s", value),
        lambda: svc.read_log("s", "run.log", cursor=value),
        lambda: svc.read_log("s", "run.log", limit=value),
        lambda: svc.read_log("s", "run.log", max_bytes=value),
        lambda: svc.read_gateway_log(cursor=value, limit=value, max_bytes=value),
        lambda: svc.append_log("s", "activity_journal.log", value),
        lambda: svc.write_heartbeat("s", value),
        lambda: svc.write_heartbeat("s", {"state": value}),
        lambda: svc.compact_session("s", max_lines=value),
        lambda: svc.compact_session("s", max_bytes=value),
        lambda: svc.reset_session("s", clear_logs=value, clear_memory=value, clear_work_products=value),
    ]
    for call in calls:
        try:
            call()
        except ops_service.OpsError:
            pass


def test_runtime_that_is_not_a_mapping_is_invalid_argument(svc):
    with pytest.raises(InvalidArgument, match="runtime must map session ids"):
        svc.list_sessions(runtime=[("s", (1, True))])


# -- containment ---------------------------------------------------------------------------


def _every_public_call(session_id) -> dict:
    calls = {
        "session_dir": lambda svc: svc.session_dir(session_id),
        "session_details": lambda svc: svc.session_details(session_id),
        "read_log": lambda svc: svc.read_log(session_id, "run.log"),
        "reset_session": lambda svc: svc.reset_session(session_id, clear_memory=True, clear_work_products=True),
        "compact_session": lambda svc: svc.compact_session(session_id, max_lines=0),
        "delete_session": lambda svc: svc.delete_session(session_id),
        "append_log": lambda svc: svc.append_log(session_id, "run.log", b"x\n"),
        "write_heartbeat": lambda svc: svc.write_heartbeat(session_id, {"last_run": 1}),
        "session_lock": lambda svc: svc.session_lock(session_id),
    }
    if session_id is not None:
        calls["create_session"] = lambda svc: svc.create_session(session_id)
    return calls


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    path = tmp_path / "sentinel"
    make_session(tmp_path, "sentinel", {"run.log": numbered(0, 500), "memory/a.md": "a", "work_products/x": "x"})
    return path


@pytest.mark.parametrize("session_id", HOSTILE_IDS)
def test_hostile_ids_are_rejected_by_every_method_and_nothing_outside_changes(svc, root, sentinel, session_id):
    before = snapshot(sentinel.parent)
    for call in _every_public_call(session_id).values():
        with pytest.raises(InvalidSessionId):
            call(svc)
    assert snapshot(sentinel.parent) == before


def test_session_symlink_pointing_outside_is_not_found_by_every_method(svc, root, sentinel):
    (root / "evil").symlink_to(sentinel)
    before = snapshot(sentinel)
    calls = _every_public_call("evil")
    del calls["session_lock"], calls["create_session"]
    for call in calls.values():
        with pytest.raises(SessionNotFound):
            call(svc)
    with pytest.raises(InvalidArgument, match="not a session directory"):
        svc.create_session("evil")
    assert snapshot(sentinel) == before and (root / "evil").is_symlink()


def test_listing_sees_a_log_created_right_after_a_listing(tmp_path):
    """The listing remembers directory contents by mtime; a change must still show at once."""
    from ops_service import OpsService

    session = tmp_path / "s-racy"
    session.mkdir()
    ops = OpsService(tmp_path)
    assert ops.list_sessions()["sessions"][0]["has_run_log"] is False
    (session / "run.log").write_bytes(b"x\n")
    assert ops.list_sessions()["sessions"][0]["has_run_log"] is True
    (session / "activity_journal.log").write_bytes(b"y\n")
    assert ops.list_sessions()["sessions"][0]["has_activity_journal"] is True


def test_listing_sees_changes_to_a_directory_unchanged_for_long(tmp_path):
    import os

    from ops_service import OpsService

    session = tmp_path / "s-old"
    session.mkdir()
    os.utime(session, (1_600_000_000, 1_600_000_000))
    ops = OpsService(tmp_path)
    assert ops.list_sessions()["sessions"][0]["has_run_log"] is False  # remembered: old directory
    (session / "run.log").write_bytes(b"x\n")  # moves the directory's mtime to now
    assert ops.list_sessions()["sessions"][0]["has_run_log"] is True
    os.utime(session, (1_600_000_000, 1_600_000_000))
    (session / "run.log").unlink()
    os.utime(session, (1_600_000_100, 1_600_000_100))
    assert ops.list_sessions()["sessions"][0]["has_run_log"] is False

"""PROTOCOL.md §5 and §7 over HTTP: the Ops API contract, containment, and the workspaces root going away."""

from __future__ import annotations

import json
import os
import shutil
from urllib.parse import quote

import pytest

from conftest import wait_for

SUMMARY_KEYS = {
    "session_id", "status", "last_modified", "last_activity", "has_run_log", "has_activity_journal",
    "has_memory", "heartbeat_last", "active_connections", "running",
}
SLICE_KEYS = {"file", "cursor", "size", "lines", "truncated", "reset", "more"}


def lines_bytes(prefix: str, count: int) -> bytes:
    return "".join(f"{prefix} {i}\n" for i in range(count)).encode()


def test_health_reports_ok_version_and_uptime(gateway):
    reply = gateway.get("/api/v1/health")
    assert reply.status == 200
    body = reply.json
    assert body["status"] == "ok"
    assert isinstance(body["version"], str) and isinstance(body["uptime_s"], (int, float))


def test_list_returns_summaries_with_every_field(gateway):
    gateway.make_session("list-a", {"run.log": b"x\n", "heartbeat_state.json": json.dumps({"last_run": 1767225600}).encode()})
    reply = gateway.get("/api/v1/ops/sessions?limit=1000")
    assert reply.status == 200
    body = reply.json
    assert {"sessions", "total", "limit", "offset"} <= set(body)
    row = next(s for s in body["sessions"] if s["session_id"] == "list-a")
    assert SUMMARY_KEYS <= set(row)
    assert row["status"] == "idle"
    assert row["has_run_log"] is True and row["has_activity_journal"] is False
    assert row["heartbeat_last"] == 1767225600 and row["heartbeat_last_at"] == "2026-01-01T00:00:00+00:00"
    assert row["last_modified"].endswith("+00:00")
    assert row["active_connections"] == 0 and row["running"] is False


def test_list_is_sorted_by_last_activity_newest_first(gateway):
    for index, name in enumerate(["sort-old", "sort-new", "sort-mid"]):
        directory = gateway.make_session(name, {"run.log": b"x\n"})
        stamp = 1_700_000_000 + {"sort-old": 0, "sort-mid": 100, "sort-new": 200}[name]
        os.utime(directory / "run.log", (stamp, stamp))
        os.utime(directory, (1_600_000_000, 1_600_000_000))
    ids = [s["session_id"] for s in gateway.get("/api/v1/ops/sessions?limit=1000").json["sessions"]]
    order = [i for i in ids if i.startswith("sort-")]
    assert order == ["sort-new", "sort-mid", "sort-old"]


def test_list_filters_by_status_and_counts_total_after_filtering(gateway):
    gateway.make_session("filter-archived", {"archive/20260101_000000_000000/run.log": b"old\n"})
    archived = gateway.get("/api/v1/ops/sessions?status=archived&limit=1000").json
    assert "filter-archived" in [s["session_id"] for s in archived["sessions"]]
    assert archived["total"] == len(archived["sessions"])
    assert all(s["status"] == "archived" for s in archived["sessions"])
    idle = gateway.get("/api/v1/ops/sessions?status=idle&limit=1000").json
    assert "filter-archived" not in [s["session_id"] for s in idle["sessions"]]


@pytest.mark.parametrize("query", ["status=bogus", "status=ACTIVE", "offset=-1"])
def test_list_rejects_bad_status_and_negative_offset(gateway, query):
    reply = gateway.get(f"/api/v1/ops/sessions?{query}")
    assert reply.status == 400
    assert query.split("=")[0] in reply.json["detail"]


@pytest.mark.parametrize("limit,expected", [("0", 1), ("-5", 1), ("5000", 1000), ("3", 3)])
def test_list_clamps_limit(gateway, limit, expected):
    for i in range(4):
        gateway.make_session(f"clamp-{i}")
    assert gateway.get(f"/api/v1/ops/sessions?limit={limit}").json["limit"] == expected


def test_list_pages_with_offset(gateway):
    for i in range(5):
        gateway.make_session(f"page-{i}")
    everything = [s["session_id"] for s in gateway.get("/api/v1/ops/sessions?limit=1000").json["sessions"]]
    page = gateway.get("/api/v1/ops/sessions?limit=2&offset=1").json
    assert [s["session_id"] for s in page["sessions"]] == everything[1:3]
    assert page["total"] == len(everything)


def test_list_skips_invalid_names_files_and_the_gateway_directory(gateway):
    (gateway.workspaces / ".hidden").mkdir(exist_ok=True)
    (gateway.workspaces / "a-file.txt").write_text("x")
    ids = [s["session_id"] for s in gateway.get("/api/v1/ops/sessions?limit=1000").json["sessions"]]
    assert ".hidden" not in ids and "a-file.txt" not in ids and "_gateway" not in ids


def test_link_pointing_outside_the_root_is_not_a_session(gateway, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "run.log").write_text("secret\n")
    os.symlink(outside, gateway.workspaces / "escape-link")
    ids = [s["session_id"] for s in gateway.get("/api/v1/ops/sessions?limit=1000").json["sessions"]]
    assert "escape-link" not in ids
    assert gateway.get("/api/v1/ops/sessions/escape-link").status == 404
    assert gateway.get("/api/v1/ops/logs/tail?session_id=escape-link").status == 404
    assert gateway.post("/api/v1/ops/sessions/escape-link/reset").status == 404
    assert gateway.post("/api/v1/ops/sessions/escape-link/compact", body={"max_lines": 0}).status == 404
    assert gateway.delete("/api/v1/ops/sessions/escape-link?confirm=true").status == 404
    assert (outside / "run.log").read_text() == "secret\n"


def test_details_include_heartbeat_memory_files_and_archives(gateway):
    gateway.make_session("detail-1", {
        "run.log": b"a\n",
        "MEMORY.md": b"12345",
        "memory/2026-01-01.md": b"123",
        "memory/index.json": b"{}",
        "heartbeat_state.json": b'{"last_run": 1767225600, "last_summary": {"ok_only": true}}',
        "archive/20260102_000000_000000/run.log": b"x",
        "archive/20260101_000000_000000/run.log": b"y",
    })
    reply = gateway.get("/api/v1/ops/sessions/detail-1")
    assert reply.status == 200
    body = reply.json
    session = body["session"]
    assert SUMMARY_KEYS <= set(session)
    assert session["heartbeat"]["last_summary"] == {"ok_only": True}
    assert body["memory"] == {"has_memory_md": True, "files": 2, "bytes": 10}
    names = [f["name"] for f in body["files"]]
    assert "run.log" in names and "MEMORY.md" in names
    assert body["archives"] == ["20260101_000000_000000", "20260102_000000_000000"]


def test_details_of_unknown_session_is_404(gateway):
    assert gateway.get("/api/v1/ops/sessions/never-existed").status == 404


def test_preview_tails_the_journal(gateway):
    gateway.make_session("prev-1", {"activity_journal.log": lines_bytes("event", 300)})
    reply = gateway.get("/api/v1/ops/sessions/prev-1/preview")
    assert reply.status == 200
    body = reply.json
    assert SLICE_KEYS <= set(body)
    assert body["file"] == "activity_journal.log"
    assert len(body["lines"]) == 200 and body["lines"][-1] == "event 299"
    assert body["truncated"] is True


def test_preview_follows_with_the_cursor(gateway):
    directory = gateway.make_session("prev-follow", {"activity_journal.log": b"one\n"})
    first = gateway.get("/api/v1/ops/sessions/prev-follow/preview").json
    with open(directory / "activity_journal.log", "ab") as handle:
        handle.write(b"two\nthree\npart")
    second = gateway.get(f"/api/v1/ops/sessions/prev-follow/preview?cursor={quote(first['cursor'])}").json
    assert second["lines"] == ["two", "three"]
    assert second["reset"] is False


def test_preview_of_session_without_journal_is_an_empty_slice(gateway):
    gateway.make_session("prev-empty")
    body = gateway.get("/api/v1/ops/sessions/prev-empty/preview").json
    assert body["lines"] == [] and body["size"] == 0


def test_preview_of_unknown_session_is_404(gateway):
    assert gateway.get("/api/v1/ops/sessions/prev-missing/preview").status == 404


@pytest.mark.parametrize("cursor", ["garbage", "-5", "djE6MTo", "%00"])
def test_cursor_not_issued_by_the_gateway_is_400(gateway, cursor):
    gateway.make_session("cursor-bad", {"run.log": b"a\n"})
    reply = gateway.get(f"/api/v1/ops/logs/tail?session_id=cursor-bad&cursor={cursor}")
    assert reply.status == 400
    assert "cursor" in reply.json["detail"]


def test_legacy_integer_cursor_is_a_byte_offset(gateway):
    gateway.make_session("cursor-int", {"run.log": b"aa\nbb\ncc\n"})
    assert gateway.get("/api/v1/ops/logs/tail?session_id=cursor-int&cursor=3").json["lines"] == ["bb", "cc"]


def test_logs_tail_reads_run_log_by_default_and_the_journal_on_request(gateway):
    gateway.make_session("tail-1", {"run.log": b"raw\n", "activity_journal.log": b"[x] [TEXT] hi\n"})
    run = gateway.get("/api/v1/ops/logs/tail?session_id=tail-1").json
    assert run["file"] == "run.log" and run["lines"] == ["raw"]
    journal = gateway.get("/api/v1/ops/logs/tail?session_id=tail-1&file=activity_journal.log").json
    assert journal["lines"] == ["[x] [TEXT] hi"]


@pytest.mark.parametrize("name", ["heartbeat_state.json", "../run.log", "MEMORY.md", "/etc/passwd", "run.log.1"])
def test_logs_tail_rejects_other_files(gateway, name):
    gateway.make_session("tail-2", {"run.log": b"raw\n"})
    assert gateway.get(f"/api/v1/ops/logs/tail?session_id=tail-2&file={quote(name)}").status == 400


@pytest.mark.parametrize("session_id", ["..", "../..", "a/b", ".", "x" * 129, "..%2F..", "\x00"])
def test_logs_tail_rejects_invalid_session_ids(gateway, session_id):
    assert gateway.get(f"/api/v1/ops/logs/tail?session_id={quote(session_id)}").status == 400


def test_logs_tail_of_unknown_session_is_404(gateway):
    assert gateway.get("/api/v1/ops/logs/tail?session_id=tail-missing").status == 404


def test_logs_tail_without_session_reads_the_gateway_log(gateway):
    gateway.get("/api/v1/health")

    def tail_with_an_access_record():
        body = gateway.get("/api/v1/ops/logs/tail?limit=50").json
        return body if any('"event":"access"' in line for line in body["lines"]) else None

    body = wait_for(tail_with_an_access_record) or gateway.get("/api/v1/ops/logs/tail?limit=50").json
    assert body["file"] == "gateway.log"
    assert all(json.loads(line)["ts"] for line in body["lines"])
    assert any('"event":"access"' in line for line in body["lines"])


def test_reset_archives_logs_and_memory_by_default(gateway):
    directory = gateway.make_session("reset-1", {"run.log": b"r\n", "activity_journal.log": b"j\n", "MEMORY.md": b"m"})
    reply = gateway.post("/api/v1/ops/sessions/reset-1/reset")
    assert reply.status == 200
    body = reply.json
    assert body["status"] == "reset"
    assert body["archived"] == ["run.log", "activity_journal.log", "MEMORY.md"]  # UA's HTTP default clear_memory=true
    assert body["archive_path"].startswith("archive/")
    assert body["archive_dir"] == str(directory / body["archive_path"])
    assert (directory / body["archive_path"] / "run.log").read_bytes() == b"r\n"
    assert not (directory / "MEMORY.md").exists()
    assert not (directory / "run.log").exists()
    assert gateway.get("/api/v1/ops/sessions/reset-1").json["session"]["status"] == "archived"


def test_reset_can_clear_memory_and_work_products(gateway):
    directory = gateway.make_session("reset-2", {"MEMORY.md": b"m", "memory/a.md": b"a", "work_products/out.txt": b"w"})
    body = gateway.post("/api/v1/ops/sessions/reset-2/reset",
                        body={"clear_logs": False, "clear_memory": True, "clear_work_products": True}).json
    assert body["archived"] == ["MEMORY.md", "memory", "work_products"]
    assert (directory / body["archive_dir"] / "memory" / "a.md").read_bytes() == b"a"


def test_two_resets_in_the_same_second_keep_both_archives(gateway):
    directory = gateway.make_session("reset-3", {"run.log": b"first\n"})
    first = gateway.post("/api/v1/ops/sessions/reset-3/reset").json
    (directory / "run.log").write_bytes(b"second\n")
    second = gateway.post("/api/v1/ops/sessions/reset-3/reset").json
    assert first["archive_dir"] != second["archive_dir"]
    assert (directory / first["archive_dir"] / "run.log").read_bytes() == b"first\n"
    assert (directory / second["archive_dir"] / "run.log").read_bytes() == b"second\n"


@pytest.mark.parametrize("body", [{"clear_logs": "yes"}, {"clear_memory": 1}, {"clear_work_products": None}])
def test_reset_rejects_non_boolean_flags(gateway, body):
    directory = gateway.make_session("reset-4", {"run.log": b"r\n"})
    assert gateway.post("/api/v1/ops/sessions/reset-4/reset", body=body).status == 400
    assert (directory / "run.log").exists()


def test_reset_of_unknown_session_is_404(gateway):
    assert gateway.post("/api/v1/ops/sessions/reset-missing/reset").status == 404


def test_compact_keeps_the_tail_and_archives_the_rest(gateway):
    directory = gateway.make_session("compact-1", {"run.log": lines_bytes("run", 1000), "activity_journal.log": lines_bytes("j", 10)})
    reply = gateway.post("/api/v1/ops/sessions/compact-1/compact", body={"max_lines": 100})
    assert reply.status == 200
    body = reply.json
    assert body["status"] == "compacted"
    assert body["files"] == {"run.log": 100, "activity_journal.log": 10}
    kept = b"".join(f"run {i}\n".encode() for i in range(900, 1000))
    assert body["bytes_dropped"] == len(lines_bytes("run", 1000)) - len(kept)
    assert (directory / "run.log").read_bytes() == kept
    archived = (directory / body["archive_dir"] / "run.log").read_bytes()
    assert archived == lines_bytes("run", 1000)


def test_compact_defaults_keep_400_lines(gateway):
    directory = gateway.make_session("compact-2", {"run.log": lines_bytes("x", 1000)})
    assert gateway.post("/api/v1/ops/sessions/compact-2/compact").json["files"]["run.log"] == 400
    assert len((directory / "run.log").read_bytes().splitlines()) == 400


@pytest.mark.parametrize("body", [{"max_lines": -1}, {"max_lines": "10"}, {"max_bytes": 1.5}, {"max_lines": True}])
def test_compact_rejects_bad_limits(gateway, body):
    directory = gateway.make_session("compact-3", {"run.log": lines_bytes("x", 10)})
    assert gateway.post("/api/v1/ops/sessions/compact-3/compact", body=body).status == 400
    assert (directory / "run.log").read_bytes() == lines_bytes("x", 10)


def test_compact_of_unknown_session_is_404(gateway):
    assert gateway.post("/api/v1/ops/sessions/compact-missing/compact").status == 404


def test_delete_without_confirm_is_400_and_touches_nothing(gateway):
    directory = gateway.make_session("del-1", {"run.log": b"x\n"})
    for query in ("", "?confirm=false", "?confirm=0"):
        reply = gateway.delete(f"/api/v1/ops/sessions/del-1{query}")
        assert reply.status == 400
        assert "confirm=true" in reply.json["detail"]
    assert (directory / "run.log").exists()


def test_delete_with_confirm_removes_the_session(gateway):
    directory = gateway.make_session("del-2", {"run.log": b"x\n", "memory/a": b"1"})
    reply = gateway.delete("/api/v1/ops/sessions/del-2?confirm=true")
    assert reply.status == 200
    assert reply.json == {"status": "deleted", "session_id": "del-2"}
    assert not directory.exists()
    assert gateway.get("/api/v1/ops/sessions/del-2").status == 404
    assert gateway.workspaces.is_dir()


def test_delete_of_unknown_session_is_404(gateway):
    assert gateway.delete("/api/v1/ops/sessions/del-missing?confirm=true").status == 404


def test_missing_root_gives_503_then_recovers(start_gateway, tmp_path):
    gateway = start_gateway(workspaces=tmp_path / "root")
    gateway.make_session("survivor", {"run.log": b"x\n"})
    moved = tmp_path / "moved-away"
    os.rename(gateway.workspaces, moved)
    try:
        for path in ("/api/v1/ops/sessions", "/api/v1/ops/sessions/survivor", "/api/v1/ops/logs/tail?session_id=survivor"):
            reply = gateway.get(path)
            assert reply.status == 503, path
            assert str(gateway.workspaces) in reply.json["detail"]
        wait_for(lambda: gateway.get("/api/v1/health").status == 503)
        health = gateway.get("/api/v1/health")
        assert health.status == 503
        assert health.json["status"] == "degraded" and health.json["detail"]
    finally:
        os.rename(moved, gateway.workspaces)
    assert gateway.get("/api/v1/ops/sessions/survivor").status == 200
    assert wait_for(lambda: gateway.get("/api/v1/health").status == 200)


def test_root_replaced_by_a_file_gives_503(start_gateway, tmp_path):
    gateway = start_gateway(workspaces=tmp_path / "root2")
    shutil.rmtree(gateway.workspaces)
    gateway.workspaces.write_text("not a directory")
    try:
        assert gateway.get("/api/v1/ops/sessions").status == 503
    finally:
        gateway.workspaces.unlink()
        gateway.workspaces.mkdir()
    assert gateway.get("/api/v1/ops/sessions").status == 200


def test_hostile_parameters_never_touch_anything_outside_the_root(gateway):
    outside = gateway.workspaces.parent
    before = sorted(p.name for p in outside.iterdir())
    sentinel = outside / "keep.txt"
    sentinel.write_text("intact")
    hostile = ["..", "../..", "%2E%2E", "%252E%252E", "..%2F..", "..%5C..", "%00", "a%00", ".", "_gateway",
               "..%c0%af", "%2F", "~", "x" * 200]
    for value in hostile:
        for method, path in [
            ("GET", f"/api/v1/ops/sessions/{value}"),
            ("GET", f"/api/v1/ops/sessions/{value}/preview"),
            ("POST", f"/api/v1/ops/sessions/{value}/reset"),
            ("POST", f"/api/v1/ops/sessions/{value}/compact"),
            ("DELETE", f"/api/v1/ops/sessions/{value}?confirm=true&force=true"),
            ("GET", f"/api/v1/ops/logs/tail?session_id={value}"),
            ("GET", f"/api/v1/ops/logs/tail?session_id=ok&file={value}"),
            ("GET", f"/api/v1/ops/sessions?status={value}"),
        ]:
            reply = gateway.request(method, path, body={"max_lines": 0} if method == "POST" else None)
            assert reply.status in (400, 404), (method, path, reply)
    assert sentinel.read_text() == "intact"
    assert sorted(p.name for p in outside.iterdir()) == sorted(before + ["keep.txt"])
    assert (gateway.workspaces / "_gateway").is_dir()

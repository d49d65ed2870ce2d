"""Retention over HTTP (PROTOCOL.md §15): POST /api/v1/ops/prune, UA HEAD's purge-stale and bulk-delete,
the background pruner, and disk use in health and details, against real gateways."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from conftest import wait_for, write_agent

OLD = time.time() - 30 * 86400  # a month ago: stale for every policy the tests set


def age_tree(path: Path, when: float = OLD) -> None:
    """Set the mtime of ``path`` and everything below it (deepest first, so parents keep theirs)."""
    for directory, dirs, files in os.walk(path, topdown=False):
        for name in files + dirs:
            os.utime(os.path.join(directory, name), (when, when), follow_symlinks=False)
    os.utime(path, (when, when))


def with_archive(gateway, session_id: str, stamp: str = "20230101_000000_000000") -> Path:
    path = gateway.make_session(session_id, {"run.log": b"live\n", f"archive/{stamp}/run.log": b"old\n" * 100})
    age_tree(path)
    return path


def test_prune_dry_run_lists_exactly_what_the_real_run_removes(gateway):
    with_archive(gateway, "dry-a")
    with_archive(gateway, "dry-b")
    body = {"archives_older_than_days": 7}
    dry = gateway.post("/api/v1/ops/prune", {**body, "dry_run": True})
    assert dry.status == 200 and dry.json["dry_run"] is True
    planned = {i["path"] for i in dry.json["items"]}
    assert {"dry-a/archive/20230101_000000_000000", "dry-b/archive/20230101_000000_000000"} <= planned
    assert (gateway.workspaces / "dry-a" / "archive" / "20230101_000000_000000" / "run.log").exists()
    real = gateway.post("/api/v1/ops/prune", body)
    assert real.status == 200 and real.json["dry_run"] is False
    assert real.json["items"] == dry.json["items"] and real.json["totals"] == dry.json["totals"]
    assert not (gateway.workspaces / "dry-a" / "archive" / "20230101_000000_000000").exists()
    assert (gateway.workspaces / "dry-a" / "run.log").read_bytes() == b"live\n"


def test_prune_items_name_kind_session_path_bytes_and_mtime(gateway):
    with_archive(gateway, "shape-a", "20230202_000000_000000")
    item = next(i for i in gateway.post("/api/v1/ops/prune", {"dry_run": True, "archives_older_than_days": 7})
                .json["items"] if i["session_id"] == "shape-a")
    assert item["kind"] == "archive" and item["path"] == "shape-a/archive/20230202_000000_000000"
    assert item["bytes"] > 0 and item["mtime"].endswith("+00:00") and item["reason"] == "age"


@pytest.mark.parametrize("path, body, named", [
    ("/api/v1/ops/prune", {"dry_run": "yes"}, "dry_run"),
    ("/api/v1/ops/prune", {"dry_run": None}, "dry_run"),  # never read as "no": that would be a real run
    ("/api/v1/ops/prune", {"archives_older_than_days": -3}, "archives_older_than_days"),
    ("/api/v1/ops/prune", {"sessions_idle_days": "7"}, "sessions_idle_days"),
    ("/api/v1/ops/prune", {"budget_bytes": "a lot"}, "budget_bytes"),
    ("/api/v1/ops/prune", {"budget_bytes": ""}, "budget_bytes"),  # never "no budget" by accident
    ("/api/v1/ops/prune", [1], "JSON object"),
    ("/api/v1/ops/sessions/purge-stale", {"older_than_hours": 0.5}, "older_than_hours"),
    ("/api/v1/ops/sessions/purge-stale", {"include_active": 1}, "include_active"),
    ("/api/v1/ops/sessions/purge-stale", {"dry_run": None}, "dry_run"),
    ("/api/v1/ops/sessions/bulk-delete", {"older_than_days": 0}, "older_than_days"),
    ("/api/v1/ops/sessions/bulk-delete", {"channels": "scheduled"}, "channels"),
    ("/api/v1/ops/sessions/bulk-delete", {"exclude_active": "no"}, "exclude_active"),
    ("/api/v1/ops/sessions/bulk-delete", {"exclude_active": None}, "exclude_active"),
])
def test_bad_bodies_are_refused_with_a_detail_naming_the_field(gateway, path, body, named):
    reply = gateway.post(path, body)
    assert reply.status == 400 and named in reply.json["detail"]


def test_purge_stale_answers_with_ua_fields_and_deletes_stale_sessions(gateway):
    for sid in ("stale-1", "stale-2"):
        age_tree(gateway.make_session(sid, {"run.log": b"x\n"}))
    gateway.make_session("fresh-1", {"run.log": b"x\n"})
    dry = gateway.post("/api/v1/ops/sessions/purge-stale", {"dry_run": True, "older_than_hours": 24}).json
    assert set(dry) == {"dry_run", "older_than_hours", "total_sessions", "deleted_count", "deleted", "failed",
                        "skipped_active"}
    assert {"stale-1", "stale-2"} <= set(dry["deleted"]) and "fresh-1" not in dry["deleted"]
    assert (gateway.workspaces / "stale-1").exists()
    real = gateway.post("/api/v1/ops/sessions/purge-stale", {"older_than_hours": 24}).json
    assert real["dry_run"] is False and real["deleted"] == dry["deleted"] and real["deleted_count"] == len(dry["deleted"])
    assert not (gateway.workspaces / "stale-1").exists() and (gateway.workspaces / "fresh-1").exists()


def test_bulk_delete_filters_by_channel_and_answers_counts(gateway):
    for sid in ("cron_bulk1", "session_bulk1"):  # UA's channels: scheduled, interactive
        age_tree(gateway.make_session(sid, {"run.log": b"x\n"}))
    reply = gateway.post("/api/v1/ops/sessions/bulk-delete", {"older_than_days": 7, "channels": ["scheduled"]})
    assert reply.status == 200 and set(reply.json) == {"deleted", "skipped", "errors"}
    assert reply.json["deleted"] >= 1 and reply.json["skipped"] >= 1 and reply.json["errors"] == 0
    assert not (gateway.workspaces / "cron_bulk1").exists() and (gateway.workspaces / "session_bulk1").exists()


def test_a_connected_session_is_never_pruned_and_purge_stale_skips_it(gateway):
    assert gateway.post("/api/v1/sessions", {"session_id": "conn-keep"}).status == 200
    with connect(f"{gateway.ws_url}/ws/agent?session_id=conn-keep") as ws:
        wait_for(lambda: gateway.get("/api/v1/ops/sessions/conn-keep").json["session"]["active_connections"] == 1)
        age_tree(gateway.workspaces / "conn-keep")
        pruned = gateway.post("/api/v1/ops/prune", {"sessions_idle_days": 7}).json
        assert "conn-keep" in pruned["kept_live"]
        assert all(i["session_id"] != "conn-keep" for i in pruned["items"])
        purged = gateway.post("/api/v1/ops/sessions/purge-stale", {"older_than_hours": 1}).json
        assert "conn-keep" in purged["skipped_active"] and "conn-keep" not in purged["deleted"]
        assert (gateway.workspaces / "conn-keep").is_dir()
        ws.send(json.dumps({"type": "ping"}))
        frames = [json.loads(ws.recv(timeout=5)) for _ in range(2)]  # "connected", then the answer
        assert [f["type"] for f in frames] == ["connected", "pong"]


def test_purge_stale_with_include_active_closes_a_connected_session_like_a_delete(gateway):
    assert gateway.post("/api/v1/sessions", {"session_id": "conn-drop"}).status == 200
    with connect(f"{gateway.ws_url}/ws/agent?session_id=conn-drop") as ws:
        wait_for(lambda: gateway.get("/api/v1/ops/sessions/conn-drop").json["session"]["active_connections"] == 1)
        age_tree(gateway.workspaces / "conn-drop")
        purged = gateway.post("/api/v1/ops/sessions/purge-stale", {"older_than_hours": 1, "include_active": True}).json
        assert "conn-drop" in purged["deleted"]
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4004
    assert gateway.get("/api/v1/ops/sessions/conn-drop").status == 404


def test_a_session_with_a_running_turn_is_never_removed_even_with_include_active(start_gateway, tmp_path):
    slow = write_agent(tmp_path, "slow", """
        import sys, time
        sys.stdin.readline()
        print('{"type": "status", "data": {"status": "working"}}', flush=True)
        time.sleep(30)
    """)
    gateway = start_gateway("--agent-cmd", slow)
    assert gateway.post("/api/v1/sessions", {"session_id": "run-keep"}).status == 200
    with connect(f"{gateway.ws_url}/ws/agent?session_id=run-keep") as ws:
        ws.send(json.dumps({"type": "execute", "data": {"user_input": "go"}}))
        wait_for(lambda: gateway.get("/api/v1/ops/sessions/run-keep").json["session"]["running"], timeout=10)
        journal = gateway.workspaces / "run-keep" / "activity_journal.log"
        # The agent's event is written after the turn starts: age the files once it is there, not before.
        assert wait_for(lambda: journal.exists() and "working" in journal.read_text(), timeout=10)
        age_tree(gateway.workspaces / "run-keep")
        purged = gateway.post("/api/v1/ops/sessions/purge-stale", {"older_than_hours": 1, "include_active": True}).json
        assert purged["skipped_active"] == ["run-keep"] and purged["deleted"] == []
        bulk = gateway.post("/api/v1/ops/sessions/bulk-delete", {"older_than_days": 1, "exclude_active": False}).json
        assert bulk == {"deleted": 0, "skipped": 1, "errors": 0}
        pruned = gateway.post("/api/v1/ops/prune", {"sessions_idle_days": 1}).json
        assert pruned["kept_live"] == ["run-keep"] and pruned["items"] == []
        assert (gateway.workspaces / "run-keep").is_dir()


def test_the_background_pruner_applies_the_configured_policies(start_gateway, tmp_path):
    workspaces = tmp_path / "ws"
    gateway = start_gateway("--retain-archives-days", "7", "--disk-budget", "64M", "--prune-interval", "0.2",
                            workspaces=workspaces)
    stamp = with_archive(gateway, "bg-1") / "archive" / "20230101_000000_000000"
    wait_for(lambda: not stamp.exists(), timeout=10)
    assert (workspaces / "bg-1" / "run.log").read_bytes() == b"live\n"
    log = (workspaces / "_gateway" / "gateway.log")
    wait_for(lambda: log.exists() and '"prune"' in log.read_text(), timeout=10)


def test_health_and_details_report_disk_use_against_the_budget(start_gateway, tmp_path):
    gateway = start_gateway("--disk-budget", "1G", "--prune-interval", "0.2")
    gateway.make_session("disk-1", {"run.log": b"x" * 10000})
    health = wait_for(lambda: (lambda h: h if h["disk"]["used_bytes"] else None)(gateway.get("/api/v1/health").json),
                      timeout=10)  # measured by the pruner's first run
    assert health["disk"]["budget_bytes"] == 1 << 30 and health["disk"]["over_budget"] is False
    assert health["disk"]["measured_at"].endswith("+00:00")  # ISO 8601 UTC, as every time the gateway answers
    details = gateway.get("/api/v1/ops/sessions/disk-1").json["disk"]
    assert details["used_bytes"] >= 10000 and details["budget_bytes"] == 1 << 30 and details["archive_bytes"] == 0


def test_health_hides_disk_figures_from_a_caller_without_the_token(start_gateway):
    gateway = start_gateway("--disk-budget", "1G", env={"UA_OPS_TOKEN": "t0ken-for-tests-0123456789"})
    assert "disk" not in gateway.get("/api/v1/health").json
    assert "disk" in gateway.get("/api/v1/health", token="t0ken-for-tests-0123456789").json


def test_prune_needs_the_token(start_gateway):
    gateway = start_gateway(env={"UA_OPS_TOKEN": "t0ken-for-tests-0123456789"})
    for path in ("/api/v1/ops/prune", "/api/v1/ops/sessions/purge-stale", "/api/v1/ops/sessions/bulk-delete"):
        assert gateway.post(path, {"dry_run": True}).status == 401


def test_the_budget_takes_the_sizes_the_flag_takes(gateway):
    answer = gateway.post("/api/v1/ops/prune", {"dry_run": True, "budget_bytes": "20G"})
    assert answer.status == 200 and answer.json["policies"]["budget_bytes"] == 20 << 30
    refused = gateway.post("/api/v1/ops/prune", {"dry_run": True, "budget_bytes": "20 apples"})
    assert refused.status == 400 and "budget_bytes" in refused.json["detail"]


def test_a_trash_policy_not_set_reads_as_null_not_zero_days(gateway):
    policies = gateway.post("/api/v1/ops/prune", {"dry_run": True}).json["policies"]
    assert policies["trash_older_than_days"] is None


def test_the_audit_record_of_a_prune_says_what_it_removed(gateway):
    with_archive(gateway, "audited-1")
    answer = gateway.post("/api/v1/ops/prune", {"archives_older_than_days": 7}).json
    audit = gateway.workspaces / "_gateway" / "audit.log"
    records = [json.loads(line) for line in audit.read_text().splitlines()]  # on disk before the answer
    record = [r for r in records if r["action"] == "prune"][-1]  # the gateway fixture is shared: the last one
    assert record["outcome"]["totals"] == answer["totals"] and answer["totals"]["bytes"] > 0

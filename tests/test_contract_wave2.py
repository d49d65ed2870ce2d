"""Contract lines of PROTOCOL.md §12-§15 that no other test checked: each test names the line it holds."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any, Tuple

import pytest

from conftest import RunningGateway, serve_embedded
from sse import SseClient

STREAMS = [
    "/api/v1/ops/logs/tail?session_id=contract_s1&follow=true",
    "/api/v1/ops/sessions/contract_s1/preview?follow=true",
    "/api/v1/ops/events",
    "/api/v1/ops/audit?follow=true",
]


@pytest.mark.parametrize("path", STREAMS)
def test_every_stream_answers_with_the_headers_that_keep_proxies_from_buffering_it(
        gateway: RunningGateway, path: str) -> None:
    """§13.1: text/event-stream; charset=utf-8, chunked, Cache-Control: no-store, X-Accel-Buffering: no."""
    gateway.make_session("contract_s1", {"run.log": b"one\n"})
    client = SseClient(gateway.host, gateway.port, path)
    try:
        assert client.status == 200
        header = client.response.getheader
        assert header("content-type") == "text/event-stream; charset=utf-8"
        assert header("transfer-encoding") == "chunked"
        assert header("cache-control") == "no-store"
        assert header("x-accel-buffering") == "no"
    finally:
        client.close()


def _this_runs_boot(gateway: RunningGateway) -> str:
    """The ``run`` part of this gateway's event ids (§13.3 ``id: <run>-<n>``), read from a change."""
    client = SseClient(gateway.host, gateway.port, "/api/v1/ops/events")
    try:
        assert gateway.post("/api/v1/sessions", {}).status == 200  # a new session: one ``created``
        event = client.next_event()
        assert event is not None and event[1] is not None
        return event[1].rpartition("-")[0]
    finally:
        client.close()


@pytest.mark.parametrize("number", ["1x", "1" * 19, "\u00b2", "", "-1"])
def test_an_event_id_of_this_run_whose_number_is_not_1_to_18_digits_gets_a_reset(
        gateway: RunningGateway, number: str) -> None:
    """§13.3: an id whose n is not 1-18 ASCII digits is one of another run: ``reset`` first."""
    boot = _this_runs_boot(gateway)
    client = SseClient(gateway.host, gateway.port, "/api/v1/ops/events",
                       headers={"Last-Event-ID": f"{boot}-{number}"})
    try:
        assert client.status == 200
        event = client.next_event()
        assert event is not None and event[0] == "reset"
    finally:
        client.close()


def test_an_event_id_of_this_run_that_is_kept_resumes_without_a_reset(gateway: RunningGateway) -> None:
    """§13.3, the other side of the test above: a kept id of this run replays, no ``reset``."""
    boot = _this_runs_boot(gateway)
    client = SseClient(gateway.host, gateway.port, "/api/v1/ops/events", headers={"Last-Event-ID": f"{boot}-0"})
    try:
        event = client.next_event()
        assert event is not None and event[0] == "created"
    finally:
        client.close()


async def _open_stream(port: int) -> Tuple[asyncio.StreamWriter, int, bytes]:
    """Ask for the session events; the status and head of the answer (the connection stays open)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /api/v1/ops/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return writer, int(head.split(b" ", 2)[1]), head


def _stream_refusal(tmp_path: Path, total: int, per_client: int) -> Tuple[int, bytes]:
    """The answer to a second stream when the gateway's stream slots are ``total``/``per_client``."""
    (tmp_path / "ws").mkdir()

    async def scenario(gateway: Any) -> Tuple[int, bytes]:
        slots = gateway.stream_slots
        slots.limit, slots.per_client_limit = total, per_client
        port = gateway.port
        first, status, _ = await _open_stream(port)
        assert status == 200
        second, status, head = await _open_stream(port)
        for writer in (first, second):
            writer.close()
        return status, head.lower()

    return serve_embedded(tmp_path / "ws", None, scenario)


def test_a_stream_past_the_per_client_limit_is_a_429_with_retry_after(tmp_path: Path) -> None:
    """§13.4: at most MAX_STREAMS_PER_CLIENT per client address, 429 beyond, with Retry-After."""
    status, head = _stream_refusal(tmp_path, total=100, per_client=1)
    assert status == 429 and b"\r\nretry-after: " in head


def test_a_stream_past_the_total_limit_is_a_503_with_retry_after(tmp_path: Path) -> None:
    """§13.4: at most MAX_STREAMS open in all, 503 beyond, with Retry-After."""
    status, head = _stream_refusal(tmp_path, total=1, per_client=100)
    assert status == 503 and b"\r\nretry-after: " in head


@pytest.mark.parametrize("asked, answered", [("0", 1), ("1", 1), ("1000", 1000), ("99999", 1000)])
def test_the_turns_list_clamps_its_limit_to_1_to_1000(gateway: RunningGateway, asked: str, answered: int) -> None:
    """§12.4: ``limit`` default 100, clamped to 1..1000."""
    gateway.make_session("contract_turns")
    reply = gateway.get(f"/api/v1/ops/sessions/contract_turns/turns?limit={asked}")
    assert reply.status == 200 and reply.json["limit"] == answered


def test_the_turns_list_defaults_to_100_and_refuses_a_negative_offset(gateway: RunningGateway) -> None:
    """§12.4: ``limit`` default 100; ``offset`` >= 0 (a negative one is a 400 naming it)."""
    gateway.make_session("contract_turns")
    assert gateway.get("/api/v1/ops/sessions/contract_turns/turns").json["limit"] == 100
    refused = gateway.get("/api/v1/ops/sessions/contract_turns/turns?offset=-1")
    assert refused.status == 400 and "offset" in refused.json["detail"]


def test_bulk_delete_refuses_more_than_64_channels_and_deletes_nothing(gateway: RunningGateway) -> None:
    """§15.3: ``channels`` at most 64 names; a bad value is a 400."""
    gateway.make_session("contract_bulk")
    channels = [f"channel{n}" for n in range(65)]
    reply = gateway.post("/api/v1/ops/sessions/bulk-delete", {"older_than_days": 1, "channels": channels})
    assert reply.status == 400 and "channels" in reply.json["detail"]
    assert (gateway.workspaces / "contract_bulk").is_dir()
    accepted = gateway.post("/api/v1/ops/sessions/bulk-delete", {"older_than_days": 1, "channels": channels[:64]})
    assert accepted.status == 200


def test_health_reports_the_last_real_prune_not_a_dry_run(start_gateway: Any) -> None:
    """§15.4: health's ``disk.last_prune`` is ``{"at", "items", "bytes", "archives", "sessions", "trash",
    "failed"}`` of the last real run (a dry run changes nothing, so it is not one)."""
    gateway = start_gateway()
    assert gateway.get("/api/v1/health").json["disk"]["last_prune"] is None
    assert gateway.post("/api/v1/ops/prune", {"dry_run": True}).status == 200
    assert gateway.get("/api/v1/health").json["disk"]["last_prune"] is None
    assert gateway.post("/api/v1/ops/prune", {"dry_run": False}).status == 200
    last = gateway.get("/api/v1/health").json["disk"]["last_prune"]
    assert set(last) == {"at", "items", "bytes", "archives", "sessions", "trash", "failed"}
    assert last["at"].endswith("+00:00") and last["failed"] == 0


def test_session_details_carry_the_disk_fields_against_the_budget(gateway: RunningGateway) -> None:
    """§15.4: session details add ``disk``: used, archive, live, budget and the root's used bytes."""
    gateway.make_session("contract_disk", {"run.log": b"x" * 5000})
    disk = gateway.get("/api/v1/ops/sessions/contract_disk").json["disk"]
    assert set(disk) == {"used_bytes", "archive_bytes", "live_bytes", "budget_bytes", "root_used_bytes"}
    assert disk["live_bytes"] == disk["used_bytes"] - disk["archive_bytes"] >= 5000


def test_a_route_without_an_action_name_is_audited_as_method_and_template_in_the_open_scope(
        gateway: RunningGateway) -> None:
    """§11.2: a route not in the action table is named ``<METHOD> <template>``; ``scope`` is ``open`` when
    no token is configured; ``outcome`` carries what the answer names (bulk-delete's counts)."""
    reply = gateway.post("/api/v1/ops/sessions/bulk-delete", {"older_than_days": 36500, "channels": ["contract"]})
    assert reply.status == 200
    audit = gateway.workspaces / "_gateway" / "audit.log"
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    [record] = [r for r in records if r["params"].get("body", {}).get("channels") == ["contract"]]
    assert record["action"] == "POST /api/v1/ops/sessions/bulk-delete"
    assert record["route"] == "/api/v1/ops/sessions/bulk-delete" and record["scope"] == "open"
    assert {k: record["outcome"][k] for k in ("status", "deleted", "skipped", "errors")} == {
        "status": 200, "deleted": 0, "skipped": 0, "errors": 0}


def _age(path: Path, days: float) -> None:
    old = time.time() - days * 86400
    for entry in [path, *path.rglob("*")]:
        os.utime(entry, (old, old))


def test_bulk_delete_removes_old_sessions_only_never_other_directories_of_the_root(gateway: RunningGateway) -> None:
    """README, Differences from UA: bulk-delete removes only session directories, never ``_gateway`` (UA's
    removed any non-dot directory, ``_daemon_archives`` included)."""
    old_session = gateway.make_session("contract_old", {"run.log": b"old\n"})
    daemon = gateway.workspaces / "_daemon_archives"
    daemon.mkdir()
    (daemon / "kept.txt").write_text("not a session")
    for path in (old_session, daemon, gateway.workspaces / "_gateway"):
        _age(path, 30)
    reply = gateway.post("/api/v1/ops/sessions/bulk-delete", {"older_than_days": 7})
    assert reply.status == 200 and reply.json["deleted"] >= 1
    assert not old_session.exists()
    assert (daemon / "kept.txt").read_text() == "not a session"
    assert (gateway.workspaces / "_gateway").is_dir()

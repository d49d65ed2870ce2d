"""The audit trail (PROTOCOL.md §11.2): one durable JSON line per state-changing call, in order, before the
answer; never a token; rotated without loss and read back as a log slice across rotations."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
from websockets.asyncio.client import connect

from conftest import ROOT, execute, gateway_env, recv_until, run, wait_for
from ops_service import InvalidArgument, OpsService
from uagw.audit import REDACTED, request_parameters
from uagw.http11 import Request

FULL = "audit-full-token-51c2"
READ = "audit-read-token-7e08"
INTERNAL = "audit-internal-token-c3d9"


def audit_lines(workspaces: Path) -> List[Dict[str, Any]]:
    path = workspaces / "_gateway" / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def audited(start_gateway):
    return start_gateway(env={"UA_OPS_TOKEN": FULL, "UA_OPS_READ_TOKEN": READ, "UA_INTERNAL_API_TOKEN": INTERNAL})


def test_each_state_change_appends_exactly_one_line_in_order(audited):
    sid = "audit-order"
    calls = [
        ("POST", "/api/v1/sessions", {"session_id": sid}),
        ("GET", f"/api/v1/ops/sessions/{sid}", None),
        ("PATCH", f"/api/v1/ops/sessions/{sid}", {"description": "first"}),
        ("POST", f"/api/v1/ops/sessions/{sid}/reset", {}),
        ("POST", f"/api/v1/ops/sessions/{sid}/compact", {}),
        ("GET", "/api/v1/ops/sessions", None),
        ("POST", f"/api/v1/ops/sessions/{sid}/archive", {}),
        ("POST", f"/api/v1/ops/sessions/{sid}/cancel", {"reason": "test"}),
        ("POST", "/api/v1/ops/sessions/cancel", {}),
        ("DELETE", f"/api/v1/sessions/{sid}", None),
        ("DELETE", f"/api/v1/ops/sessions/{sid}?confirm=true", None),
    ]
    for method, path, body in calls:
        assert audited.request(method, path, body=body, token=FULL).status == 200, (method, path)

    records = audit_lines(audited.workspaces)
    assert [r["action"] for r in records] == [
        "create_session", "set_description", "reset_session", "compact_session", "archive_session",
        "cancel_session", "cancel_sessions", "forget_session", "delete_session"]
    assert [r["session"] for r in records] == [sid] * 6 + [None] + [sid] * 2
    assert {r["scope"] for r in records} == {"full"}
    assert [(r["outcome"]["status"], r["client"]) for r in records] == [(200, "127.0.0.1")] * 9


def test_record_names_archive_dir_parameters_and_time(audited):
    audited.make_session("audit-reset", {"run.log": b"line\n"})

    answer = audited.post("/api/v1/ops/sessions/audit-reset/reset", body={"clear_memory": False}, token=FULL).json

    (record,) = audit_lines(audited.workspaces)
    assert record["outcome"]["archive_dir"] == answer["archive_dir"] is not None
    assert record["params"] == {"body": {"clear_memory": False}}
    assert record["time"].endswith("Z") and record["duration_ms"] >= 0
    assert record["route"] == "/api/v1/ops/sessions/{session_id}/reset" and record["method"] == "POST"


def test_refused_change_is_recorded_with_its_status(audited):
    audited.make_session("audit-refused")

    assert audited.delete("/api/v1/ops/sessions/audit-refused", token=FULL).status == 400  # no confirm

    (record,) = audit_lines(audited.workspaces)
    assert (record["action"], record["outcome"]["status"]) == ("delete_session", 400)


def test_reads_and_refused_tokens_leave_no_record(audited):
    audited.make_session("audit-reads")
    audited.get("/api/v1/ops/sessions", token=READ)
    audited.post("/api/v1/ops/sessions/audit-reads/reset", body={}, token=READ)  # 403
    audited.post("/api/v1/ops/sessions/audit-reads/reset", body={}, token="wrong")  # 401

    assert audit_lines(audited.workspaces) == []


def test_record_survives_kill_9_right_after_the_answer(audited):
    audited.make_session("audit-kill")

    reply = audited.post("/api/v1/ops/sessions/audit-kill/reset", body={}, token=FULL)
    audited.process.send_signal(signal.SIGKILL)
    audited.process.wait(10)

    assert reply.status == 200
    assert [r["action"] for r in audit_lines(audited.workspaces)] == ["reset_session"]


def test_audit_log_never_holds_a_token(audited):
    audited.make_session("audit-secret")
    headers = {"X-UA-OPS-TOKEN": FULL, "X-UA-Internal-Token": INTERNAL, "Cookie": f"t={FULL}"}
    audited.request("PATCH", "/api/v1/ops/sessions/audit-secret", token=FULL, headers=headers,
                    body={"description": f"pasted {FULL} and {READ}", "token": INTERNAL,
                          "nested": {"api_key": "k", "Authorization": f"Bearer {FULL}"}})
    audited.post("/api/v1/sessions", token=INTERNAL, headers=headers,
                  body={"session_id": "audit-secret-2", "metadata": {"password": "p", "note": INTERNAL}})

    text = (audited.workspaces / "_gateway" / "audit.log").read_text()
    assert len(text.splitlines()) == 2
    for secret in (FULL, READ, INTERNAL, '"k"', '"p"'):
        assert secret not in text
    assert REDACTED in text and "X-UA" not in text


def test_internal_token_is_recorded_as_the_internal_scope(audited):
    audited.post("/api/v1/sessions", body={"session_id": "audit-internal"}, token=INTERNAL)

    assert [r["scope"] for r in audit_lines(audited.workspaces)] == ["internal"]


def test_failed_audit_write_is_told_in_the_answer(audited):
    (audited.workspaces / "_gateway" / "audit.log").mkdir()  # the record cannot be appended
    audited.make_session("audit-unwritable")

    reply = audited.request("PATCH", "/api/v1/ops/sessions/audit-unwritable", body={"description": "d"}, token=FULL)

    assert reply.status == 200  # the change was made, and stays made
    assert reply.headers["x-ua-audit"] == "failed"
    assert "audit log could not record this call" in reply.json["audit_warning"]
    assert (audited.workspaces / "audit-unwritable" / "description.txt").read_text() == "d"


def test_lobby_session_creation_is_recorded(audited):
    async def scenario() -> str:
        async with connect(f"{audited.ws_url}/ws/agent", additional_headers={"Authorization": f"Bearer {FULL}"}) as ws:
            await ws.send(execute("hello"))
            frames = await recv_until(ws, "query_complete")
            return frames[0]["data"]["session_id"]

    session_id = run(scenario())

    records = wait_for(lambda: audit_lines(audited.workspaces))
    assert [(r["action"], r["session"], r["client"]) for r in records] == [
        ("create_session_ws", session_id, "127.0.0.1")]


def test_audit_endpoint_returns_the_records_as_a_log_slice(audited):
    audited.make_session("audit-read")
    audited.request("PATCH", "/api/v1/ops/sessions/audit-read", body={"description": "x"}, token=FULL)

    reply = audited.get("/api/v1/ops/audit?limit=5", token=READ)

    assert reply.status == 200
    assert reply.json["file"] == "audit.log" and reply.json["cursor"]
    assert [json.loads(line)["action"] for line in reply.json["lines"]] == ["set_description"]


def test_follow_returns_every_record_once_across_rotations(svc: OpsService):
    cursor = svc.read_audit_log(backups=3)["cursor"]  # an empty log: follow from its start
    seen: List[str] = []
    for number in range(40):
        svc.append_audit(json.dumps({"n": number}).encode() + b"\n", rotate_bytes=100, backups=3)
        if number % 7 == 0:  # read now and then, so several rotations happen between reads
            while True:
                piece = svc.read_audit_log(cursor, limit=3, backups=3)
                seen += piece["lines"]
                cursor = piece["cursor"]
                assert not piece["reset"]
                if not piece["more"]:
                    break

    assert [json.loads(line)["n"] for line in seen] == list(range(36))  # 0..35: the reads after each 7th


def test_rotation_keeps_the_newest_backups_and_loses_no_recent_record(svc: OpsService):
    for number in range(30):
        svc.append_audit(json.dumps({"n": number}).encode() + b"\n", rotate_bytes=50, backups=2)

    directory = svc.root / "_gateway"
    assert {p.name for p in directory.glob("audit.log*")} <= {"audit.log", "audit.log.1", "audit.log.2"}
    kept = [json.loads(line)["n"] for name in ("audit.log.2", "audit.log.1", "audit.log")
            if (directory / name).exists() for line in (directory / name).read_text().splitlines()]
    assert kept == list(range(kept[0], 30))


def test_parameters_are_bounded_and_redacted():
    request = Request("POST", "/x?secret_q=1&limit=2", "HTTP/1.1", [])
    request.body = json.dumps({"description": "d" * 5000, "client_secret": "s", "list": list(range(100))}).encode()

    params = request_parameters(request)

    assert params["query"] == {"secret_q": REDACTED, "limit": "2"}
    assert params["body"]["client_secret"] == REDACTED
    assert len(params["body"]["description"]) < 300 and len(params["body"]["list"]) == 32
    assert len(json.dumps(params)) <= 4096


def test_append_audit_refuses_more_than_one_line(svc: OpsService):
    with pytest.raises(InvalidArgument, match="one line"):
        svc.append_audit(b"two\nlines\n", rotate_bytes=1000, backups=1)


def test_client_audit_prints_the_records_with_the_read_token(audited):
    audited.make_session("audit-client")
    audited.post("/api/v1/ops/sessions/audit-client/reset", body={}, token=FULL)

    table = subprocess.run([sys.executable, str(ROOT / "ua_gateway.py"), "audit", "--limit", "5", "--url", audited.url],
                           env=gateway_env({"UA_OPS_TOKEN": READ}), capture_output=True, text=True, timeout=30)
    as_json = subprocess.run([sys.executable, str(ROOT / "ua_gateway.py"), "audit", "--json", "--url", audited.url],
                             env=gateway_env({"UA_OPS_TOKEN": READ}), capture_output=True, text=True, timeout=30)

    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == ["TIME", "ACTION", "SESSION", "CLIENT", "SCOPE", "STATUS"]
    assert table.stdout.splitlines()[1].split()[1:] == ["reset_session", "audit-client", "127.0.0.1", "full", "200"]
    assert "--cursor " in table.stderr
    assert json.loads(json.loads(as_json.stdout)["lines"][0])["action"] == "reset_session"

"""A hostile review of issue 14 [operate]: each test is one way found to break the audit trail (PROTOCOL.md
§11.2) or sd_notify, kept so that it stays fixed.

- A token cut at the audit's value limit left its first characters in audit.log (the whole-token scrub ran
  after the cut); so did a percent-encoded token in a query the handler had refused (recorded raw).
- A turn cancelled by a WebSocket message, and sessions deleted by the background pruner, left no record.
- The first record in a new audit.log (first ever, or after a rotation) was fsync'ed without its directory.
- Garbage in WATCHDOG_USEC / WATCHDOG_PID ("²", 5,000 digits) or a non-UTF-8 abstract NOTIFY_SOCKET
  raised, stopping the gateway at start; sd_notify must never fail it.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest
from websockets.asyncio.client import connect

from conftest import execute, recv, recv_until, run, wait_for, write_agent
from ops_service import OpsService
from uagw.limits import AUDIT_VALUE_CHARS
from uagw.sdnotify import Notifier, watchdog_interval

FULL = "hostile-ops-full-token-4f1e9a"
READ = "hostile-ops-read-token-b72c0d"
PREFIX = 10  # characters of a token that would already narrow a guess


def audit_text(workspaces: Path) -> str:
    path = workspaces / "_gateway" / "audit.log"
    return path.read_text() if path.exists() else ""


def audit_records(workspaces: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in audit_text(workspaces).splitlines()]


@pytest.fixture
def scoped(start_gateway):
    gateway = start_gateway(env={"UA_OPS_TOKEN": FULL, "UA_OPS_READ_TOKEN": READ})
    gateway.make_session("victim", {"run.log": b"one\n"})
    return gateway


def test_token_cut_at_the_value_limit_leaves_no_prefix_in_the_audit_log(scoped):
    pad = "x" * (AUDIT_VALUE_CHARS - PREFIX)  # the cut falls PREFIX characters into the token
    scoped.post("/api/v1/ops/sessions/victim/cancel", body={"reason": pad + READ, pad + FULL: 1}, token=FULL)

    text = audit_text(scoped.workspaces)
    assert len(text.splitlines()) == 1
    assert READ[:PREFIX] not in text and FULL[:PREFIX] not in text


def test_refused_query_with_a_percent_encoded_token_is_scrubbed(scoped):
    encoded = "".join(f"%{ord(c):02X}" for c in FULL)
    reply = scoped.delete(f"/api/v1/ops/sessions/victim?confirm=true&x=1&x={encoded}", token=FULL)

    assert reply.status == 400  # a query parameter given twice: the record keeps the query as it came
    text = audit_text(scoped.workspaces)
    assert len(text.splitlines()) == 1
    assert encoded not in text and FULL not in text


SLOW_AGENT = """
    import json, sys, time
    sys.stdin.readline()
    print(json.dumps({"type": "status", "data": {"status": "working"}}), flush=True)
    time.sleep(60)
"""


def test_websocket_cancel_is_recorded(start_gateway, tmp_path):
    gateway = start_gateway("--agent-cmd", write_agent(tmp_path, "slow", SLOW_AGENT))
    gateway.make_session("ws-cancel")

    async def scenario() -> None:
        async with connect(f"{gateway.ws_url}/api/v1/sessions/ws-cancel/stream") as ws:
            await recv(ws)
            await ws.send(execute("long"))
            await recv_until(ws, "status")
            await ws.send(json.dumps({"type": "cancel", "data": {"reason": "operator pressed stop"}}))
            await recv_until(ws, "query_complete")

    run(scenario())

    records = wait_for(lambda: audit_records(gateway.workspaces))
    assert [(r["action"], r["session"], r["params"]) for r in records] == [
        ("cancel_session_ws", "ws-cancel", {"reason": "operator pressed stop"})]
    assert records[0]["client"] == "127.0.0.1"


def test_sessions_deleted_by_the_background_pruner_are_recorded(start_gateway, tmp_path):
    workspaces = tmp_path / "workspaces"
    old = time.time() - 10 * 86400
    session = workspaces / "long-idle"
    session.mkdir(parents=True)
    (session / "run.log").write_bytes(b"old\n")
    for path in (session / "run.log", session):
        os.utime(path, (old, old))

    gateway = start_gateway(env={"UA_RETAIN_IDLE_SESSIONS_DAYS": "1"}, workspaces=workspaces)

    records = wait_for(lambda: audit_records(gateway.workspaces))
    assert not session.exists()
    assert [(r["action"], r["scope"], r["params"]) for r in records] == [
        ("prune_policy", "policy", {"sessions": ["long-idle"]})]


def test_new_audit_file_has_its_directory_entry_fsynced(tmp_path, monkeypatch):
    svc = OpsService(tmp_path / "root")
    svc.ensure_root()
    synced: List[bool] = []  # per fsync: was it a directory?
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)), real_fsync(fd)))

    svc.append_audit(b'{"n":1}\n', rotate_bytes=4, backups=2)  # creates audit.log, then rotates it
    synced.clear()
    svc.append_audit(b'{"n":2}\n', rotate_bytes=1 << 20, backups=2)  # creates a new audit.log

    assert synced == [False, True]  # the record, then the directory that now names the new file


@pytest.mark.parametrize("usec", ["\u00b2", "9" * 5000, "\u0661\u0662"])
def test_garbage_watchdog_usec_means_no_watchdog(usec):
    assert watchdog_interval({"WATCHDOG_USEC": usec}) is None


def test_garbage_watchdog_pid_means_not_ours():
    assert watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "\u00b2"}) is None


def test_undecodable_abstract_notify_socket_does_not_raise():
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": "@ua-gw-\udcff-absent"})

    assert notifier.address == b"\0ua-gw-\xff-absent"
    assert notifier.notify("READY=1") is False  # no one listens: the message is lost, nothing raises

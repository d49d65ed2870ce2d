"""Issue 11 items 4 and 5: the Ops side as Universal Agent's (UA HEAD's) dashboard and tests read it.

A real gateway subprocess with an agent command and UA_OPS_TOKEN; every call is made the way UA's clients
make it (the dashboard's Ops proxy sends ``Authorization: Bearer`` and ``X-UA-OPS-Token``, JSON bodies as
UA's pydantic models take them), and every answer is read with UA's field names and types.
Facts about UA: ../shared/reference/ua_anchor.md §1.5 and §2.3, and the plan's §2.3-§2.5 and §3.3-§3.8.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, Iterator, List
from urllib.parse import quote

import pytest
from websockets.asyncio.client import connect


from conftest import RunningGateway, launch, recv, recv_until, run, wait_for

TOKEN = "ua-compat-ops-token"
UA_HEADERS = {"Authorization": f"Bearer {TOKEN}", "X-UA-OPS-Token": TOKEN}

# Runs `steps` steps of `pause` seconds (metadata), printing one text event per step.
SLEEPY_AGENT = """
    import json, sys, time
    request = json.loads(sys.stdin.readline())
    meta = request["data"]["metadata"]
    for i in range(int(meta.get("steps", 3))):
        print(json.dumps({"type": "text", "data": {"text": "step %d" % i}}), flush=True)
        time.sleep(float(meta.get("pause", 0.05)))
"""


@pytest.fixture(scope="module")
def ua(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    base = tmp_path_factory.mktemp("ua-ops")
    script = base / "sleepy.py"
    script.write_text(textwrap.dedent(SLEEPY_AGENT))
    running = launch(base / "workspaces", "--agent-cmd", f"{sys.executable} {script}", env={"UA_OPS_TOKEN": TOKEN})
    yield running
    running.stop()


def call(gateway: RunningGateway, method: str, path: str, body: Any = None) -> Any:
    return gateway.request(method, path, body=body, headers=dict(UA_HEADERS))


def summary(gateway: RunningGateway, session_id: str) -> Dict[str, Any]:
    reply = call(gateway, "GET", f"/api/v1/ops/sessions/{session_id}")
    assert reply.status == 200, reply
    return reply.json["session"]


def listed(gateway: RunningGateway, query: str = "") -> List[Dict[str, Any]]:
    reply = call(gateway, "GET", f"/api/v1/ops/sessions?limit=1000{query}")
    assert reply.status == 200, reply
    return reply.json["sessions"]


def policy(user_id: str, **memory: Any) -> bytes:
    """A session_policy.json as UA writes it (the keys the summary reads)."""
    return json.dumps({"version": 1, "user_id": user_id, "created_at": 1786000000.25, "updated_at": 1786000001.0,
                       "memory": {"enabled": True, "sessionMemory": True, "sources": ["memory", "sessions"],
                                  "scope": "direct_only", **memory}}, indent=2, sort_keys=True).encode()


def ws_connect(gateway: RunningGateway, session_id: str) -> Any:
    return connect(f"{gateway.ws_url}/api/v1/sessions/{session_id}/stream",
                   additional_headers={"Authorization": f"Bearer {TOKEN}"})


def execute(text: str, **metadata: Any) -> str:
    return json.dumps({"type": "execute", "data": {"user_input": text, "force_complex": False, "metadata": metadata}})


async def in_thread(function: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


# -- summaries: UA's fields with UA's types ------------------------------------------------------------------


def test_summary_carries_uas_fields_in_list_and_details(ua):
    directory = ua.make_session("tg_12345", {"session_policy.json": policy("telegram_12345"), "run.log": b"x\n"})
    row = next(s for s in listed(ua) if s["session_id"] == "tg_12345")
    detail = summary(ua, "tg_12345")
    for session in (row, detail):
        assert session["workspace_dir"] == str(directory) and Path(session["workspace_dir"]).is_absolute()
        assert session["status"] == "idle"
        assert session["source"] == "telegram" and session["owner"] == "telegram_12345"
        assert session["memory_mode"] == "direct_only"
        assert session["created_at"] == "2026-08-06T07:06:40+00:00"  # the policy's created_at, as ISO UTC
        assert session["active_runs"] == 0 and session["last_event_seq"] == 0
        assert session["has_checkpoint"] is False and session["rehydrate_ready"] is False
        assert session["rehydrate_reason"] == "no_checkpoint; no_memory_file; memory_mode_direct_only"
        assert session["description"] is None and session["channel"] == "interactive"
        assert session["heartbeat_last"] is None and session["heartbeat_summary"] is None


@pytest.mark.parametrize("session_id,files,source,owner,mode", [
    ("session_20260101_000000_abcd1234", {"session_policy.json": policy("tester_user")}, "chat", "tester_user",
     "direct_only"),
    ("api_7", {"session_policy.json": policy("tester_user", sessionMemory=False)}, "api", "tester_user", "memory_only"),
    ("daemon_heartbeat_1", {"session_policy.json": policy("cron_system", enabled=False)}, "daemon", "cron_system", "off"),
    ("plain-local", {}, "local", "unknown", "direct_only"),
    ("tg_77", {}, "telegram", "telegram_77", "direct_only"),  # no policy: owner from the tg_ prefix
    ("other-x", {"session_policy.json": policy("telegram_9", scope=" ALL ")}, "telegram", "telegram_9", "all"),
    ("broken-policy", {"session_policy.json": b"{not json"}, "local", "unknown", "direct_only"),
])
def test_source_owner_and_memory_mode_follow_uas_rules(ua, session_id, files, source, owner, mode):
    ua.make_session(session_id, files)
    session = summary(ua, session_id)
    assert (session["source"], session["owner"], session["memory_mode"]) == (source, owner, mode)


def test_list_filters_accept_uas_values_and_ignore_unknown_parameters(ua):
    ua.make_session("filt-tg_1", {"session_policy.json": policy("telegram_1")})
    ua.make_session("filt-mem", {"session_policy.json": policy("tester_user", sessionMemory=False)})
    ua.make_session("filt-plain", {"session_policy.json": policy("tester_user")})
    ids = lambda query: {s["session_id"] for s in listed(ua, query) if s["session_id"].startswith("filt-")}
    assert ids("&source=telegram") == {"filt-tg_1"}
    assert ids("&source=TELEGRAM") == {"filt-tg_1"}  # case-insensitive, as UA
    assert ids("&owner=tester_user") == {"filt-mem", "filt-plain"}
    assert ids("&memory_mode=memory_only") == {"filt-mem"}
    assert ids("&owner=tester_user&memory_mode=direct_only") == {"filt-plain"}
    assert ids("&status=running") == set() and ids("&status=complete") == set()
    assert ids("&sort=newest&include_history=1") == {"filt-tg_1", "filt-mem", "filt-plain"}  # ignored
    assert call(ua, "GET", "/api/v1/ops/sessions?limit=abc").status == 400  # wrong types stay 400
    assert call(ua, "GET", "/api/v1/ops/sessions?status=bogus").status == 400


def test_status_order_running_active_idle_archived_with_runs_and_event_seq(ua):
    ua.make_session("order-1", {"run.log": b"x\n"})

    async def scenario() -> Any:
        async with ws_connect(ua, "order-1") as one, ws_connect(ua, "order-1") as two:
            await recv(one)
            await recv(two)
            await one.send(execute("work", steps=40, pause=0.05))
            await recv(one)  # the turn's first event: it runs
            during = await in_thread(summary, ua, "order-1")
            filtered = await in_thread(listed, ua, "&status=active")
            running_only = await in_thread(listed, ua, "&status=running")
            await recv_until(one, "query_complete")
            after = await in_thread(summary, ua, "order-1")
            return during, filtered, running_only, after

    during, filtered, running_only, after = run(scenario())
    assert during["status"] == "running" and during["active_runs"] == 1 and during["running"] is True
    assert during["active_connections"] == 2 and during["last_event_seq"] >= 1
    assert "order-1" in [s["session_id"] for s in filtered]  # "active" also matches "running" (UA HEAD)
    assert "order-1" in [s["session_id"] for s in running_only]
    assert after["status"] == "active" and after["active_runs"] == 0 and after["last_event_seq"] > during["last_event_seq"]
    assert wait_for(lambda: summary(ua, "order-1")["status"] == "idle")
    archived = call(ua, "POST", "/api/v1/ops/sessions/order-1/archive", {"clear_memory": False, "clear_work_products": False})
    assert archived.status == 200
    assert summary(ua, "order-1")["status"] == "archived"


def test_rehydrate_diagnostics_follow_uas_rules(ua):
    checkpoint = {"original_request": "Summarise the RSS feeds", "timestamp": "2026-01-01T00:00:00Z",
                  "completed_tasks": ["a", "b"], "artifacts": ["out.md"]}
    ua.make_session("rh-ckpt", {"run_checkpoint.json": json.dumps(checkpoint).encode()})
    ua.make_session("rh-log", {"run.log": b"x\n", "MEMORY.md": b"# m"})
    ua.make_session("rh-empty")
    ua.make_session("rh-broken", {"session_checkpoint.json": b"{oops"})
    ckpt = summary(ua, "rh-ckpt")
    assert ckpt["has_checkpoint"] is True and ckpt["rehydrate_ready"] is True
    assert ckpt["rehydrate_reason"] == "checkpoint_available"
    assert ckpt["checkpoint_tasks_completed"] == 2 and ckpt["checkpoint_artifacts_count"] == 1
    assert ckpt["checkpoint_original_request"] == "Summarise the RSS feeds"
    assert ckpt["checkpoint_age_seconds"] > 0
    assert ckpt["description"] == "Summarise the RSS feeds"
    log = summary(ua, "rh-log")
    assert (log["rehydrate_ready"], log["rehydrate_reason"]) == (True, "run_log_and_memory_available")
    empty = summary(ua, "rh-empty")
    assert empty["rehydrate_ready"] is False
    assert empty["rehydrate_reason"] == "no_run_log; no_checkpoint; no_memory_file; memory_mode_direct_only"
    assert summary(ua, "rh-broken")["has_checkpoint"] is False


def test_description_takes_uas_sources_in_order_and_patch_sets_it(ua):
    ua.make_session("desc-1", {
        "description.txt": b"  From   the\nfile ",
        "context_brief.md": b"---\n# Brief title\n",
        "run_checkpoint.json": json.dumps({"query": "from checkpoint"}).encode(),
        "trace.json": json.dumps({"query": "from trace"}).encode(),
    })
    ua.make_session("desc-2", {"context_brief.md": b"---\n## Brief title\nbody\n",
                               "trace.json": json.dumps({"query": "from trace"}).encode()})
    ua.make_session("desc-3", {"run_checkpoint.json": json.dumps({"title": "", "task": "the task"}).encode(),
                               "trace.json": json.dumps({"query": "from trace"}).encode()})
    ua.make_session("desc-4", {"session_checkpoint.md": b"# C\n### Original Request\n> first line\n> second\n\nrest\n",
                               "trace.json": json.dumps({"query": "from trace"}).encode()})
    ua.make_session("desc-5", {"trace.json": json.dumps({"query": "x" * 200}).encode()})
    assert summary(ua, "desc-1")["description"] == "From the file"
    assert summary(ua, "desc-2")["description"] == "Brief title"
    assert summary(ua, "desc-3")["description"] == "the task"
    assert summary(ua, "desc-4")["description"] == "first line second"
    long = summary(ua, "desc-5")["description"]
    assert len(long) == 160 and long.endswith("\u2026")

    reply = call(ua, "PATCH", "/api/v1/ops/sessions/desc-5", {"description": "  Nightly RSS digest "})
    assert reply.status == 200
    assert reply.json == {"status": "updated", "session_id": "desc-5", "updates": {"description": "Nightly RSS digest"}}
    assert summary(ua, "desc-5")["description"] == "Nightly RSS digest"
    assert call(ua, "PATCH", "/api/v1/ops/sessions/desc-5", {}).json["updates"] == {}
    assert call(ua, "PATCH", "/api/v1/ops/sessions/desc-5", {"description": "y" * 2001}).status == 400
    assert call(ua, "PATCH", "/api/v1/ops/sessions/desc-5", {"description": 5}).status == 400
    assert call(ua, "PATCH", "/api/v1/ops/sessions/desc-missing", {"description": "z"}).status == 404
    assert summary(ua, "desc-5")["description"] == "Nightly RSS digest"


def test_heartbeat_fields_have_uas_types_and_a_turn_keeps_uas_keys(ua):
    state = {"last_run": 1786000000.5, "last_summary": {"text": "ok"}, "last_message_hash": "abc"}
    directory = ua.make_session("hb-1", {"heartbeat_state.json": json.dumps(state).encode()})
    session = summary(ua, "hb-1")
    assert session["heartbeat_last"] == 1786000000.5 and isinstance(session["heartbeat_last"], float)
    assert session["heartbeat_summary"] == {"text": "ok"}
    assert session["heartbeat_last_at"] == "2026-08-06T07:06:40+00:00"

    async def turn() -> Any:
        async with ws_connect(ua, "hb-1") as ws:
            await recv(ws)
            await ws.send(execute("beat", steps=1))
            return await recv_until(ws, "query_complete")

    run(turn())
    stored = wait_for(lambda: (lambda data: data if "last_turn" in data else None)(
        json.loads((directory / "heartbeat_state.json").read_text())))
    assert stored["last_summary"] == {"text": "ok"} and stored["last_message_hash"] == "abc"
    assert stored["last_run"] > 1786000000.5
    assert math.isfinite(summary(ua, "hb-1")["heartbeat_last"])


# -- preview, reset, compact, archive ------------------------------------------------------------------------


def test_preview_names_its_session(ua):
    ua.make_session("prev-1", {"activity_journal.log": b"a\nb\n"})
    body = call(ua, "GET", "/api/v1/ops/sessions/prev-1/preview").json
    assert body["session_id"] == "prev-1" and body["lines"] == ["a", "b"]


def test_reset_with_an_empty_body_archives_memory_and_answers_an_absolute_archive_dir(ua):
    directory = ua.make_session("reset-ua", {"run.log": b"r\n", "MEMORY.md": b"m", "memory/a.md": b"a"})
    reply = call(ua, "POST", "/api/v1/ops/sessions/reset-ua/reset", {})
    assert reply.status == 200
    body = reply.json
    assert body["status"] == "reset" and set(body["archived"]) == {"run.log", "MEMORY.md", "memory"}
    assert Path(body["archive_dir"]).is_absolute() and (Path(body["archive_dir"]) / "run.log").read_bytes() == b"r\n"
    assert body["archive_dir"] == str(directory / body["archive_path"])
    assert not (directory / "MEMORY.md").exists()
    kept = call(ua, "POST", "/api/v1/ops/sessions/reset-ua/reset", {"clear_memory": False, "unknown_flag": 1})
    assert kept.status == 200  # an unknown body field is ignored, as UA's pydantic model ignores it
    assert call(ua, "POST", "/api/v1/ops/sessions/reset-ua/reset", {"clear_memory": "yes"}).status == 400


def test_compact_answers_an_absolute_archive_dir(ua):
    directory = ua.make_session("compact-ua", {"run.log": b"".join(b"line %d\n" % i for i in range(50))})
    body = call(ua, "POST", "/api/v1/ops/sessions/compact-ua/compact", {"max_lines": 10}).json
    assert body["status"] == "compacted"
    assert body["archive_dir"] == str(directory / body["archive_path"])
    assert (Path(body["archive_dir"]) / "run.log").stat().st_size > (directory / "run.log").stat().st_size


def test_archive_moves_the_logs_and_answers_archived(ua):
    directory = ua.make_session("arch-1", {"run.log": b"r\n", "activity_journal.log": b"j\n", "MEMORY.md": b"m"})
    reply = call(ua, "POST", "/api/v1/ops/sessions/arch-1/archive", {"clear_memory": False, "clear_work_products": False})
    assert reply.status == 200
    body = reply.json
    assert body["status"] == "archived" and body["archived"] == ["run.log", "activity_journal.log"]
    assert Path(body["archive_dir"]).is_absolute()
    assert not (directory / "run.log").exists() and (directory / "MEMORY.md").exists()
    assert call(ua, "POST", "/api/v1/ops/sessions/arch-missing/archive", {}).status == 404


# -- cancel ----------------------------------------------------------------------------------------------------


def test_ops_cancel_of_a_running_session_broadcasts_cancelled_and_ends_the_turn(ua):
    ua.make_session("cancel-1")

    async def scenario() -> Any:
        async with ws_connect(ua, "cancel-1") as ws:
            await recv(ws)
            await ws.send(execute("long", steps=200, pause=0.05))
            await recv(ws)
            reply = await in_thread(call, ua, "POST", "/api/v1/ops/sessions/cancel-1/cancel", {"reason": "operator stop"})
            # A second cancel while the agent is still stopping started nothing: it says so.
            again = await in_thread(call, ua, "POST", "/api/v1/ops/sessions/cancel-1/cancel", {})
            return reply, again, await recv_until(ws, "query_complete")

    reply, again, frames = run(scenario())
    assert again.status == 200 and again.json["task_cancelled"] is False
    assert reply.status == 200
    body = reply.json
    assert body["status"] == "cancel_requested" and body["session_id"] == "cancel-1"
    assert body["reason"] == "operator stop" and body["task_cancelled"] is True and body["run_id"] is None
    cancelled = next(f for f in frames if f["type"] == "cancelled")["data"]
    assert cancelled["reason"] == "operator stop" and cancelled["session_id"] == "cancel-1"
    done = frames[-1]["data"]
    assert done["completed"] is False and done["turn_id"] == body["turn_id"] == cancelled["turn_id"]


def test_ops_cancel_without_a_turn_answers_and_defaults_the_reason(ua):
    ua.make_session("cancel-idle")
    reply = call(ua, "POST", "/api/v1/ops/sessions/cancel-idle/cancel", {})
    assert reply.status == 200
    assert reply.json["task_cancelled"] is False and reply.json["reason"] == "Cancelled from ops panel"
    assert call(ua, "POST", "/api/v1/ops/sessions/cancel-missing/cancel", {"reason": None}).status == 404
    assert call(ua, "POST", "/api/v1/ops/sessions/cancel-idle/cancel", {"reason": 3}).status == 400


def test_bulk_cancel_cancels_the_running_sessions_only(ua):
    ua.make_session("bulk-run")
    ua.make_session("bulk-idle")

    async def scenario() -> Any:
        async with ws_connect(ua, "bulk-run") as ws:
            await recv(ws)
            await ws.send(execute("long", steps=200, pause=0.05))
            await recv(ws)
            reply = await in_thread(call, ua, "POST", "/api/v1/ops/sessions/cancel", {})
            return reply, await recv_until(ws, "query_complete")

    reply, frames = run(scenario())
    assert reply.status == 200
    assert reply.json == {"status": "cancel_requested", "reason": "Cancelled from ops bulk session controls",
                          "sessions_considered": 1, "sessions_cancelled": ["bulk-run"]}
    assert frames[-1]["data"]["completed"] is False


# -- logs/tail?path= -------------------------------------------------------------------------------------------


def test_logs_tail_path_reads_a_sessions_logs_and_refuses_anything_else(ua):
    directory = ua.make_session("tailp-1", {"run.log": b"r1\nr2\n", "activity_journal.log": b"j1\n", "MEMORY.md": b"m\n"})
    tail = lambda path: call(ua, "GET", "/api/v1/ops/logs/tail?path=" + quote(path, safe=""))
    assert tail("tailp-1/run.log").json["lines"] == ["r1", "r2"]
    assert tail("tailp-1/activity_journal.log").json["lines"] == ["j1"]
    assert tail(str(directory / "run.log")).json["lines"] == ["r1", "r2"]
    for bad in ["tailp-1/MEMORY.md", "tailp-1", "../gateway.log", "_gateway/gateway.log", "/etc/passwd",
                "tailp-1/../tailp-1/run.log", "", "tailp-1/run.log/x"]:
        reply = tail(bad)
        assert reply.status == 400, (bad, reply)


def test_summary_files_with_a_second_hard_link_are_not_read(ua, tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("TOP SECRET CONTENT")
    directory = ua.make_session("link-desc")
    (directory / "description.txt").hardlink_to(outside)
    (tmp_path / "policy.json").write_bytes(policy("mallory"))
    (directory / "session_policy.json").hardlink_to(tmp_path / "policy.json")
    session = summary(ua, "link-desc")
    assert session["description"] is None and session["owner"] == "unknown"

"""PROTOCOL.md §6 (and §4 for upgrades): agent connections over real WebSockets against a real gateway."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import signal
import time
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conftest import close_code, execute, recv, recv_until, run, wait_for, write_agent
from uagw.config import Config

TOKEN = "ws-token-123"
JOURNAL_LINE = re.compile(r"^\[\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\] \[[A-Z_]+\] .*$")


def refused_status(url: str, **kwargs: Any) -> int:
    """The HTTP status with which the gateway refuses a WebSocket handshake (fails if it accepts)."""

    async def attempt() -> int:
        with pytest.raises(InvalidStatus) as info:
            async with connect(url, **kwargs):
                pass
        return info.value.response.status_code

    return run(attempt())


SLEEPY_AGENT = """
    import json, sys, time
    request = json.loads(sys.stdin.readline())
    n = int(request["data"]["metadata"].get("steps", 5))
    for i in range(n):
        print(json.dumps({"type": "text", "data": {"text": "step %d" % i}}), flush=True)
        time.sleep(float(request["data"]["metadata"].get("pause", 0.2)))
    print(json.dumps({"type": "text", "data": {"text": "done"}}), flush=True)
"""


# -- attach, lobby, basic protocol -------------------------------------------------------------------------


def test_stream_attach_sends_connected_first(gateway):
    gateway.make_session("ws-attach")

    async def scenario():
        async with connect(f"{gateway.ws_url}/api/v1/sessions/ws-attach/stream") as ws:
            frame = await recv(ws)
            assert frame["type"] == "connected"
            assert {k: frame["data"][k] for k in ("session_id", "workspace_dir", "run_id", "is_live_session")} == {
                "session_id": "ws-attach", "workspace_dir": str(gateway.workspaces / "ws-attach"), "run_id": None,
                "is_live_session": True}
            assert frame["timestamp"].endswith("+00:00")

    run(scenario())


def test_unknown_session_closes_4004(gateway):
    async def scenario():
        async with connect(f"{gateway.ws_url}/api/v1/sessions/no-such-session/stream") as ws:
            return await close_code(ws)

    assert run(scenario()) == 4004


@pytest.mark.parametrize("bad", ["..", "%2E%2E", "a%2Fb", "x" * 129])
def test_invalid_session_id_closes_4000(gateway, bad):
    async def scenario():
        async with connect(f"{gateway.ws_url}/api/v1/sessions/{bad}/stream") as ws:
            return await close_code(ws)

    assert run(scenario()) == 4000


def test_echo_turn_gives_status_text_and_query_complete(gateway):
    gateway.make_session("ws-echo-turn")

    async def scenario():
        async with connect(f"{gateway.ws_url}/api/v1/sessions/ws-echo-turn/stream") as ws:
            await recv(ws)
            await ws.send(execute("hello gateway"))
            return await recv_until(ws, "query_complete")

    frames = run(scenario())
    assert [f["type"] for f in frames] == ["status", "text", "query_complete"]
    assert "hello gateway" in frames[1]["data"]["text"]
    assert frames[-1]["data"]["completed"] is True


def test_query_is_an_alias_of_execute(gateway):
    gateway.make_session("ws-query")

    async def scenario():
        async with connect(f"{gateway.ws_url}/api/v1/sessions/ws-query/stream") as ws:
            await recv(ws)
            await ws.send(json.dumps({"type": "query", "data": {"text": "via query"}}))
            return await recv_until(ws, "query_complete")

    frames = run(scenario())
    assert frames[1]["data"]["text"] == "via query"


def test_lobby_creates_a_session_on_first_execute(gateway):
    async def scenario():
        async with connect(f"{gateway.ws_url}/ws/agent") as ws:
            await ws.send(execute("from the lobby"))
            return await recv_until(ws, "query_complete")

    frames = run(scenario())
    assert frames[0]["type"] == "connected"
    session_id = frames[0]["data"]["session_id"]
    assert re.fullmatch(r"session_\d{8}_\d{6}_[0-9a-f]{8}", session_id)
    assert (gateway.workspaces / session_id).is_dir()
    assert frames[-1]["data"]["completed"] is True


def test_ws_agent_with_session_id_attaches(gateway):
    gateway.make_session("ws-agent-attach")

    async def scenario():
        async with connect(f"{gateway.ws_url}/ws/agent?session_id=ws-agent-attach") as ws:
            return await recv(ws)

    assert run(scenario())["data"]["session_id"] == "ws-agent-attach"


def test_ping_is_answered_with_pong(gateway):
    gateway.make_session("ws-ping")

    async def scenario():
        async with connect(f"{gateway.ws_url}/api/v1/sessions/ws-ping/stream") as ws:
            await recv(ws)
            await ws.send(json.dumps({"type": "ping", "data": {}}))
            return await recv(ws)

    assert run(scenario())["type"] == "pong"


@pytest.mark.parametrize("message", ["{not json", "[1,2]", '{"type": 5}', '{"type": "dance", "data": {}}',
                                     '{"type": "execute", "data": {"user_input": ""}}', '{"type": "execute", "data": []}'])
def test_bad_messages_get_an_error_and_the_connection_stays_open(gateway, message):
    gateway.make_session("ws-bad")

    async def scenario():
        async with connect(f"{gateway.ws_url}/api/v1/sessions/ws-bad/stream") as ws:
            await recv(ws)
            await ws.send(message)
            error = await recv(ws)
            await ws.send(json.dumps({"type": "ping"}))
            return error, await recv(ws)

    error, pong = run(scenario())
    assert error["type"] == "error" and error["data"]["message"]
    assert pong["type"] == "pong"


def test_binary_message_gets_an_error(gateway):
    gateway.make_session("ws-binary")

    async def scenario():
        async with connect(f"{gateway.ws_url}/api/v1/sessions/ws-binary/stream") as ws:
            await recv(ws)
            await ws.send(b"\x00\x01")
            return await recv(ws)

    assert run(scenario())["type"] == "error"


def test_frame_over_1_mib_closes_with_1009(gateway):
    gateway.make_session("ws-big")

    async def scenario():
        async with connect(f"{gateway.ws_url}/api/v1/sessions/ws-big/stream", max_size=None) as ws:
            await recv(ws)
            await ws.send("x" * (1024 * 1024 + 1))
            return await close_code(ws)

    assert run(scenario()) == 1009


# -- what a turn writes ------------------------------------------------------------------------------------


def test_turn_events_are_journaled_and_heartbeat_is_written(gateway):
    directory = gateway.make_session("ws-journal")

    async def scenario():
        async with connect(f"{gateway.ws_url}/api/v1/sessions/ws-journal/stream") as ws:
            await recv(ws)
            await ws.send(execute("line one\nline two"))
            return await recv_until(ws, "query_complete")

    frames = run(scenario())
    journal = wait_for(lambda: (directory / "activity_journal.log").exists()
                       and (directory / "activity_journal.log").read_text().count("\n") >= len(frames)
                       and (directory / "activity_journal.log").read_text())
    lines = journal.splitlines()
    assert len(lines) == len(frames)
    assert all(JOURNAL_LINE.match(line) for line in lines)
    assert [line.split("] [")[1].split("]")[0] for line in lines] == [f["type"].upper() for f in frames]
    assert "line one\\nline two" in lines[1]
    assert "echo: line one" in wait_for(lambda: (directory / "run.log").exists() and (directory / "run.log").read_text())
    heartbeat = json.loads(wait_for(lambda: (directory / "heartbeat_state.json").exists()
                                    and (directory / "heartbeat_state.json").read_text()))
    assert heartbeat["last_run"] > time.time() - 60
    summary = gateway.get("/api/v1/ops/sessions/ws-journal").json["session"]
    assert summary["heartbeat_last"] is not None


def test_events_of_a_turn_reach_every_connection_of_the_session(gateway):
    gateway.make_session("ws-broadcast")

    async def scenario():
        async with connect(f"{gateway.ws_url}/api/v1/sessions/ws-broadcast/stream") as one, \
                connect(f"{gateway.ws_url}/api/v1/sessions/ws-broadcast/stream") as two:
            await recv(one)
            await recv(two)
            await one.send(execute("shared"))
            return await recv_until(one, "query_complete"), await recv_until(two, "query_complete")

    first, second = run(scenario())
    assert [f["type"] for f in first] == [f["type"] for f in second] == ["status", "text", "query_complete"]


def test_ops_view_shows_connections_and_active_status(gateway):
    gateway.make_session("ws-live")

    async def scenario():
        async with connect(f"{gateway.ws_url}/api/v1/sessions/ws-live/stream") as ws:
            await recv(ws)
            return gateway.get("/api/v1/ops/sessions/ws-live").json["session"]

    during = run(scenario())
    assert during["active_connections"] == 1 and during["status"] == "active"
    after = wait_for(lambda: gateway.get("/api/v1/ops/sessions/ws-live").json["session"]["active_connections"] == 0)
    assert after


# -- the agent command -------------------------------------------------------------------------------------


@pytest.fixture
def sleepy(start_gateway, tmp_path):
    return start_gateway("--agent-cmd", write_agent(tmp_path, "sleepy", SLEEPY_AGENT))


def test_agent_command_events_are_forwarded(sleepy):
    sleepy.make_session("cmd-1")

    async def scenario():
        async with connect(f"{sleepy.ws_url}/api/v1/sessions/cmd-1/stream") as ws:
            await recv(ws)
            await ws.send(execute("go", metadata={"steps": 3, "pause": 0}))
            return await recv_until(ws, "query_complete")

    frames = run(scenario())
    assert [f["data"].get("text") for f in frames if f["type"] == "text"] == ["step 0", "step 1", "step 2", "done"]
    assert frames[-1]["data"]["completed"] is True


def test_second_execute_while_busy_is_rejected(sleepy):
    sleepy.make_session("cmd-busy")

    async def scenario():
        async with connect(f"{sleepy.ws_url}/api/v1/sessions/cmd-busy/stream") as ws:
            await recv(ws)
            await ws.send(execute("long", metadata={"steps": 5, "pause": 0.2}))
            await recv(ws)
            await ws.send(execute("again"))
            frames = await recv_until(ws, "query_complete")
            rest = await recv_until(ws, "query_complete")
            return frames, rest

    frames, rest = run(scenario())
    statuses = [f["data"].get("status") for f in frames if f["type"] == "status"]
    assert "turn_rejected_busy" in statuses
    assert frames[-1]["data"]["completed"] is False
    assert rest[-1]["data"]["completed"] is True
    # Each query_complete names its own turn: the refused attempt's is not the running turn's.
    refused_id, running_id = frames[-1]["data"]["turn_id"], rest[-1]["data"]["turn_id"]
    assert refused_id and running_id and refused_id != running_id


def test_cancel_ends_the_turn_with_cancelled_then_query_complete(sleepy):
    sleepy.make_session("cmd-cancel")

    async def scenario():
        async with connect(f"{sleepy.ws_url}/api/v1/sessions/cmd-cancel/stream") as ws:
            await recv(ws)
            await ws.send(execute("long", metadata={"steps": 100, "pause": 0.1}))
            await recv(ws)
            await ws.send(json.dumps({"type": "cancel", "data": {"reason": "enough"}}))
            frames = await recv_until(ws, "query_complete")
            return frames

    started = time.monotonic()
    frames = run(scenario())
    assert time.monotonic() - started < 5
    types = [f["type"] for f in frames]
    assert "cancelled" in types
    assert types.index("cancelled") < types.index("query_complete")
    assert frames[types.index("cancelled")]["data"]["reason"] == "enough"
    assert frames[-1]["data"]["completed"] is False
    assert sleepy.get("/api/v1/ops/sessions/cmd-cancel").json["session"]["running"] is False


def test_cancel_kills_an_agent_that_ignores_sigterm(start_gateway, tmp_path):
    stubborn = write_agent(tmp_path, "stubborn", """
        import json, signal, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.stdin.readline()
        print(json.dumps({"type": "status", "data": {"status": "ignoring"}}), flush=True)
        time.sleep(60)
    """)
    grace = 1.0  # stands for the default 5 s
    gateway = start_gateway("--agent-cmd", stubborn, "--agent-kill-grace", str(grace))
    gateway.make_session("cmd-stubborn")

    async def scenario():
        async with connect(f"{gateway.ws_url}/api/v1/sessions/cmd-stubborn/stream") as ws:
            await recv(ws)
            await ws.send(execute("go"))
            await recv(ws)
            await ws.send(json.dumps({"type": "cancel"}))
            started = time.monotonic()
            frames = await recv_until(ws, "query_complete", timeout=15)
            return frames, time.monotonic() - started

    frames, elapsed = run(scenario())
    assert grace * 0.8 <= elapsed < grace + 4  # SIGTERM ignored, SIGKILL after the grace
    assert frames[-1]["data"]["completed"] is False


def test_disconnect_does_not_cancel_and_reattach_gets_processing(sleepy):
    directory = sleepy.make_session("cmd-reattach")

    async def scenario():
        ws = await connect(f"{sleepy.ws_url}/api/v1/sessions/cmd-reattach/stream")
        await recv(ws)
        await ws.send(execute("long", metadata={"steps": 8, "pause": 0.15}))
        await recv(ws)
        await ws.close()
        await asyncio.sleep(0.3)
        async with connect(f"{sleepy.ws_url}/api/v1/sessions/cmd-reattach/stream") as again:
            connected = await recv(again)
            processing = await recv(again)
            rest = await recv_until(again, "query_complete")
            return connected, processing, rest

    connected, processing, rest = run(scenario())
    assert connected["type"] == "connected"
    assert processing["type"] == "status" and processing["data"]["status"] == "processing"
    assert rest[-1]["data"]["completed"] is True
    journal = wait_for(lambda: "QUERY_COMPLETE" in (directory / "activity_journal.log").read_text()
                       and (directory / "activity_journal.log").read_text())
    for i in range(8):
        assert f"step {i}" in journal


def test_client_turn_id_duplicates_are_recognised(sleepy):
    sleepy.make_session("cmd-dupe")

    async def scenario():
        async with connect(f"{sleepy.ws_url}/api/v1/sessions/cmd-dupe/stream") as ws:
            await recv(ws)
            await ws.send(execute("a", client_turn_id="t-1", metadata={"steps": 3, "pause": 0.2}))
            await recv(ws)
            await ws.send(execute("a", client_turn_id="t-1"))
            first = await recv_until(ws, "query_complete")
            await ws.send(execute("a", client_turn_id="t-1"))
            second = await recv_until(ws, "query_complete")
            return first, second

    first, second = run(scenario())
    assert any(f["data"].get("status") == "turn_in_progress" for f in first)
    assert first[-1]["data"]["completed"] is True
    assert second[0]["data"]["status"] == "duplicate_turn_ignored"
    assert not list((sleepy.workspaces / "cmd-dupe").glob("*t-1*"))


def test_agent_stderr_and_plain_stdout_go_to_run_log_and_failure_gives_error(start_gateway, tmp_path):
    noisy = write_agent(tmp_path, "noisy", """
        import json, sys
        sys.stdin.readline()
        print("plain stdout line", flush=True)
        print("to stderr", file=sys.stderr, flush=True)
        print(json.dumps({"type": "text", "data": {"text": "an event"}}), flush=True)
        sys.exit(3)
    """)
    gateway = start_gateway("--agent-cmd", noisy)
    directory = gateway.make_session("cmd-noisy")

    async def scenario():
        async with connect(f"{gateway.ws_url}/api/v1/sessions/cmd-noisy/stream") as ws:
            await recv(ws)
            await ws.send(execute("go"))
            return await recv_until(ws, "query_complete")

    frames = run(scenario())
    types = [f["type"] for f in frames]
    assert "text" in types and "error" in types
    assert "3" in next(f for f in frames if f["type"] == "error")["data"]["message"]
    assert frames[-1]["data"]["completed"] is False
    run_log = wait_for(lambda: (directory / "run.log").exists() and "to stderr" in (directory / "run.log").read_text()
                       and (directory / "run.log").read_text())
    assert "plain stdout line" in run_log and "an event" not in run_log


def test_input_response_is_written_to_the_agent_stdin(start_gateway, tmp_path):
    asker = write_agent(tmp_path, "asker", """
        import json, sys
        request = json.loads(sys.stdin.readline())
        print(json.dumps({"type": "input_required", "data": {"input_id": "q1", "prompt": "name?"}}), flush=True)
        answer = json.loads(sys.stdin.readline())
        print(json.dumps({"type": "text", "data": {"text": "hello " + answer["data"]["response"],
                                                     "input_id": answer["data"]["input_id"]}}), flush=True)
    """)
    gateway = start_gateway("--agent-cmd", asker)
    gateway.make_session("cmd-ask")

    async def scenario():
        async with connect(f"{gateway.ws_url}/api/v1/sessions/cmd-ask/stream") as ws:
            await recv(ws)
            await ws.send(execute("go"))
            required = (await recv_until(ws, "input_required"))[-1]
            await ws.send(json.dumps({"type": "input_response", "data": {"input_id": "q1", "response": "Ada"}}))
            return required, await recv_until(ws, "query_complete")

    required, frames = run(scenario())
    assert required["data"]["prompt"] == "name?"
    text = next(f for f in frames if f["type"] == "text")
    assert text["data"] == {"text": "hello Ada", "input_id": "q1"}


def test_a_client_that_reattaches_is_asked_the_pending_input_again(start_gateway, tmp_path):
    asker = write_agent(tmp_path, "asker", """
        import json, sys
        request = json.loads(sys.stdin.readline())
        print(json.dumps({"type": "input_required", "data": {"input_id": "q1", "prompt": "name?"}}), flush=True)
        answer = json.loads(sys.stdin.readline())
        print(json.dumps({"type": "text", "data": {"text": "hello " + answer["data"]["response"]}}), flush=True)
    """)
    gateway = start_gateway("--agent-cmd", asker)
    gateway.make_session("cmd-reask")
    url = f"{gateway.ws_url}/api/v1/sessions/cmd-reask/stream"

    async def scenario():
        async with connect(url) as ws:
            await recv(ws)
            await ws.send(execute("go"))
            await recv_until(ws, "input_required")
        async with connect(url) as ws:  # the client dropped and came back
            again = await recv_until(ws, "input_required")
            await ws.send(json.dumps({"type": "input_response", "data": {"input_id": "q1", "response": "Ada"}}))
            return again, await recv_until(ws, "query_complete")

    again, frames = run(scenario())
    assert [f["type"] for f in again] == ["connected", "status", "input_required"]
    assert again[-1]["data"] == {"input_id": "q1", "prompt": "name?"}
    assert next(f for f in frames if f["type"] == "text")["data"]["text"] == "hello Ada"


def test_agent_does_not_receive_the_ops_token(start_gateway, tmp_path):
    snoop = write_agent(tmp_path, "snoop", """
        import json, os, sys
        sys.stdin.readline()
        print(json.dumps({"type": "text", "data": {"text": os.environ.get("UA_OPS_TOKEN", "absent")}}), flush=True)
    """)
    gateway = start_gateway("--agent-cmd", snoop, env={"UA_OPS_TOKEN": TOKEN})
    gateway.make_session("cmd-snoop")

    async def scenario():
        async with connect(f"{gateway.ws_url}/api/v1/sessions/cmd-snoop/stream",
                           additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
            await recv(ws)
            await ws.send(execute("go"))
            return await recv_until(ws, "query_complete")

    assert next(f for f in run(scenario()) if f["type"] == "text")["data"]["text"] == "absent"


def test_reset_and_compact_during_a_streaming_turn_lose_no_event_line(sleepy):
    directory = sleepy.make_session("cmd-streaming")

    async def scenario():
        async with connect(f"{sleepy.ws_url}/api/v1/sessions/cmd-streaming/stream") as ws:
            await recv(ws)
            await ws.send(execute("go", metadata={"steps": 60, "pause": 0.02}))
            frames = []
            while True:
                frame = await recv(ws)
                frames.append(frame)
                if len(frames) == 15:
                    await asyncio.get_running_loop().run_in_executor(
                        None, lambda: sleepy.post("/api/v1/ops/sessions/cmd-streaming/reset"))
                if len(frames) == 35:
                    await asyncio.get_running_loop().run_in_executor(
                        None, lambda: sleepy.post("/api/v1/ops/sessions/cmd-streaming/compact", body={"max_lines": 5}))
                if frame["type"] == "query_complete":
                    return frames

    frames = run(scenario())
    texts = [f["data"]["text"] for f in frames if f["type"] == "text"]
    assert len(texts) == 61

    def everything():
        found = set()
        for path in [directory / "activity_journal.log", *directory.glob("archive/*/activity_journal.log")]:
            if path.exists():
                found.update(path.read_text().splitlines())
        return found

    def all_present():
        lines = everything()
        return all(any(line.endswith(f"[TEXT] {t}") for line in lines) for t in texts) and lines

    assert wait_for(all_present)
    # The lines written after reset and compact land in the live file.
    assert wait_for(lambda: "QUERY_COMPLETE" in (directory / "activity_journal.log").read_text())


def test_delete_while_running_is_409_and_force_cancels_and_closes_4004(sleepy):
    directory = sleepy.make_session("cmd-delete")

    async def scenario():
        async with connect(f"{sleepy.ws_url}/api/v1/sessions/cmd-delete/stream") as ws:
            await recv(ws)
            await ws.send(execute("long", metadata={"steps": 100, "pause": 0.1}))
            await recv(ws)
            loop = asyncio.get_running_loop()
            refused = await loop.run_in_executor(None, lambda: sleepy.delete("/api/v1/ops/sessions/cmd-delete?confirm=true"))
            summary = await loop.run_in_executor(None, lambda: sleepy.get("/api/v1/ops/sessions/cmd-delete").json["session"])
            forced = await loop.run_in_executor(None, lambda: sleepy.delete("/api/v1/ops/sessions/cmd-delete?confirm=true&force=true"))
            return refused, summary, forced, await close_code(ws)

    refused, summary, forced, code = run(scenario())
    assert refused.status == 409
    assert summary["running"] is True and summary["status"] == "running"
    assert forced.status == 200
    assert code == 4004
    assert not directory.exists()


# -- access control on upgrades ----------------------------------------------------------------------------


@pytest.fixture
def secured(start_gateway):
    return start_gateway(env={"UA_OPS_TOKEN": TOKEN, "UA_CORS_ORIGINS": "http://console.example"})


def test_upgrade_without_token_is_refused_401(secured):
    secured.make_session("sec-1")

    assert refused_status(f"{secured.ws_url}/api/v1/sessions/sec-1/stream") == 401


def test_upgrade_with_bearer_header_is_accepted(secured):
    secured.make_session("sec-2")

    async def scenario():
        async with connect(f"{secured.ws_url}/api/v1/sessions/sec-2/stream",
                           additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
            return await recv(ws)

    assert run(scenario())["type"] == "connected"


def test_token_as_subprotocol_is_accepted_and_never_echoed(secured):
    secured.make_session("sec-3")
    encoded = base64.urlsafe_b64encode(TOKEN.encode()).decode().rstrip("=")

    async def scenario():
        async with connect(f"{secured.ws_url}/api/v1/sessions/sec-3/stream",
                           subprotocols=[f"bearer.{encoded}", "ua.v1"]) as ws:
            return ws.subprotocol, await recv(ws)

    subprotocol, frame = run(scenario())
    assert subprotocol == "ua.v1"
    assert frame["type"] == "connected"


def test_wrong_subprotocol_token_is_refused(secured):
    encoded = base64.urlsafe_b64encode(b"nope").decode().rstrip("=")

    assert refused_status(f"{secured.ws_url}/ws/agent", subprotocols=[f"bearer.{encoded}", "ua.v1"]) == 401


def test_foreign_origin_is_refused_403(secured):
    assert refused_status(f"{secured.ws_url}/ws/agent", origin="http://evil.example",
                          additional_headers={"Authorization": f"Bearer {TOKEN}"}) == 403


@pytest.mark.parametrize("origin", ["http://console.example", "own"])
def test_listed_or_own_origin_is_accepted(secured, origin):
    secured.make_session("sec-origin")
    origin = f"http://{secured.host}:{secured.port}" if origin == "own" else origin

    async def scenario():
        async with connect(f"{secured.ws_url}/api/v1/sessions/sec-origin/stream", origin=origin,
                           additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
            return await recv(ws)

    assert run(scenario())["type"] == "connected"


def test_allowed_users_apply_on_attach(start_gateway):
    gateway = start_gateway(env={"UA_ALLOWED_USERS": "alice"})
    gateway.make_session("users-1")

    async def attach(headers, query=""):
        async with connect(f"{gateway.ws_url}/api/v1/sessions/users-1/stream{query}", additional_headers=headers) as ws:
            try:
                return (await recv(ws))["type"]
            except ConnectionClosed as exc:
                return exc.rcvd.code

    assert run(attach({})) == 4003  # no recorded owner: the default user, who is not listed
    assert gateway.post("/api/v1/sessions", body={"user_id": "alice", "session_id": "users-2"}).status == 200

    async def attach2(headers, query=""):  # the allowlist judges the owner (alice); a claim must pass too
        async with connect(f"{gateway.ws_url}/api/v1/sessions/users-2/stream{query}", additional_headers=headers) as ws:
            try:
                return (await recv(ws))["type"]
            except ConnectionClosed as exc:
                return exc.rcvd.code

    assert run(attach2({})) == "connected"
    assert run(attach2({"X-UA-User": "mallory"})) == 4003
    assert run(attach2({"X-UA-User": "alice"})) == "connected"
    assert run(attach2({}, "?user_id=alice")) == "connected"


def test_allow_from_refuses_upgrades_from_other_addresses(start_gateway):
    gateway = start_gateway(env={"UA_OPS_ALLOW_FROM": "10.1.2.3"})

    assert refused_status(f"{gateway.ws_url}/ws/agent") == 403


# -- echo route, shutdown, load ----------------------------------------------------------------------------


def test_echo_route_does_not_exist_without_the_flag(gateway):
    assert gateway.get("/ws/echo").status == 404

    assert refused_status(f"{gateway.ws_url}/ws/echo") == 404


def test_echo_route_echoes_text_and_binary_up_to_16_mib(start_gateway):
    gateway = start_gateway("--ws-echo")

    async def scenario():
        async with connect(f"{gateway.ws_url}/ws/echo", max_size=None) as ws:
            await ws.send("héllo")
            text = await ws.recv()
            await ws.send(b"\x00\xff" * 10)
            binary = await ws.recv()
            big = bytes(range(256)) * (3 * 1024 * 1024 // 256)
            await ws.send(big)
            return text, binary, (await ws.recv()) == big

    assert run(scenario()) == ("héllo", b"\x00\xff" * 10, True)


def test_sigterm_closes_websockets_with_1001_and_exits_0(start_gateway):
    gateway = start_gateway()
    gateway.make_session("shutdown-1")

    async def scenario():
        async with connect(f"{gateway.ws_url}/api/v1/sessions/shutdown-1/stream") as ws:
            await recv(ws)
            gateway.process.send_signal(signal.SIGTERM)
            return await close_code(ws)

    assert run(scenario()) == 1001
    assert gateway.process.wait(10) == 0


def test_200_concurrent_connections_each_complete_5_echo_turns(gateway):
    async def client(index: int) -> int:
        async with connect(f"{gateway.ws_url}/ws/agent") as ws:
            completed = 0
            for turn in range(5):
                await ws.send(execute(f"client {index} turn {turn}"))
                frames = await recv_until(ws, "query_complete", timeout=30)
                assert not any(f["type"] == "error" for f in frames)
                completed += frames[-1]["data"]["completed"] is True
            return completed

    async def scenario():
        return await asyncio.gather(*(client(i) for i in range(200)))

    assert run(scenario()) == [5] * 200


def test_the_keepalive_defaults_are_a_ping_every_20_s_answered_within_20_s():
    config = Config(port=0)
    assert (config.ws_ping_interval, config.ws_ping_timeout) == (20.0, 20.0)  # PROTOCOL.md §6


def test_server_pings_every_interval_and_drops_a_silent_peer_after_the_ping_timeout(start_gateway):
    """A peer that never answers pings is closed the ping timeout after the first unanswered one (PROTOCOL.md §6).

    Short timeouts (1 s and 2 s, unequal so that each is seen) stand for the default 20 s and 20 s."""
    import socket as socketlib

    interval, timeout = 1.0, 2.0
    gateway = start_gateway("--ws-ping-interval", str(interval), "--ws-ping-timeout", str(timeout))
    key = base64.b64encode(b"0123456789abcdef").decode()
    with socketlib.create_connection((gateway.host, gateway.port), timeout=60) as sock:
        sock.sendall((f"GET /ws/agent HTTP/1.1\r\nHost: {gateway.host}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        started = time.monotonic()
        received = b""
        ping_at = closed_at = None
        while time.monotonic() - started < 50:
            chunk = sock.recv(65536)
            if not chunk:
                closed_at = time.monotonic() - started
                break
            received += chunk
            frames = received.split(b"\r\n\r\n", 1)[-1]
            if ping_at is None and b"\x89" in frames:  # FIN + opcode 9 (ping), never answered
                ping_at = time.monotonic() - started
    assert received.startswith(b"HTTP/1.1 101")
    assert ping_at is not None and interval * 0.9 <= ping_at <= interval + 3
    assert closed_at is not None and interval + timeout - 0.2 <= closed_at <= interval + timeout + 6
    assert closed_at - ping_at >= timeout * 0.9


def test_shutdown_leaves_no_agent_process_behind(start_gateway, tmp_path):
    """An agent ignoring SIGTERM is killed when the gateway stops, not left running without it."""
    stubborn = write_agent(tmp_path, "pidfile", """
        import json, os, signal, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.stdin.readline()
        open("agent.pid", "w").write(str(os.getpid()))
        print(json.dumps({"type": "status", "data": {"status": "stubborn"}}), flush=True)
        time.sleep(120)
    """)
    gateway = start_gateway("--agent-cmd", stubborn, "--shutdown-grace", "1")
    directory = gateway.make_session("shutdown-agent")

    async def scenario():
        async with connect(f"{gateway.ws_url}/api/v1/sessions/shutdown-agent/stream") as ws:
            await recv(ws)
            await ws.send(execute("go"))
            await recv(ws)
            gateway.process.send_signal(signal.SIGTERM)
            return await close_code(ws, timeout=15)

    assert run(scenario()) == 1001
    assert gateway.process.wait(15) == 0
    pid = int((directory / "agent.pid").read_text())

    def gone() -> bool:
        try:
            with open(f"/proc/{pid}/status") as status:
                return any(line.startswith("State:") and "Z" in line for line in status)  # a zombie is dead
        except FileNotFoundError:
            return True

    assert wait_for(gone, timeout=5)

"""Universal Agent's own clients against the gateway (issue 11, items 1-3 and 6): the session REST API, the
session's owner and the allowlist, UA's credentials, and a dashboard on another origin.

The clients below send exactly what UA's do (its ExternalGateway, GatewayBridge, Telegram and worker paths;
README, "Differences from Universal Agent", and docs/PROTOCOL.md §4 and §6.1): the JSON bodies, the three token headers when a token is set
(``Authorization: Bearer``, ``X-UA-Internal-Token``, ``X-UA-OPS-Token``), and never ``X-UA-User`` nor a
``user_id`` query parameter, which UA does not know.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any, Dict, List, Optional

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conftest import execute as conftest_execute
from conftest import recv, recv_until, run, write_agent

OPS = "ops-token-compat-1"
INTERNAL = "internal-token-compat-2"


def ua_headers(token: Optional[str]) -> Dict[str, str]:
    """What UA's ExternalGateway sends with a token (its _auth_headers)."""
    if not token:
        return {}
    return {"Authorization": f"Bearer {token}", "X-UA-Internal-Token": token, "X-UA-OPS-Token": token}


class UAClient:
    """UA's ExternalGateway / GatewayBridge, over plain HTTP and WebSockets."""

    def __init__(self, gateway: Any, token: Optional[str] = None) -> None:
        self.gateway = gateway
        self.token = token

    def create(self, **body: Any) -> Any:
        return self.gateway.post("/api/v1/sessions", body=body, headers=ua_headers(self.token))

    def resume(self, session_id: str) -> Any:
        return self.gateway.get(f"/api/v1/sessions/{session_id}", headers=ua_headers(self.token))

    def list(self, query: str = "") -> Any:
        return self.gateway.get("/api/v1/sessions" + query, headers=ua_headers(self.token))

    def delete(self, session_id: str) -> Any:
        return self.gateway.delete(f"/api/v1/sessions/{session_id}", headers=ua_headers(self.token))

    def stream_url(self, session_id: str) -> str:
        return f"{self.gateway.ws_url}/api/v1/sessions/{session_id}/stream"

    def connect(self, session_id: str, headers: Optional[Dict[str, str]] = None) -> Any:
        return connect(self.stream_url(session_id), additional_headers={**ua_headers(self.token), **(headers or {})})


def execute(text: str, **data: Any) -> str:
    # ExternalGateway.execute's message: user_input, force_complex, metadata (GatewayBridge adds client_turn_id).
    return conftest_execute(text, **{"force_complex": False, "metadata": {"source": "ua"}, **data})


async def close_code(ws: Any, timeout: float = 10.0) -> int:
    try:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else 1006


def attach_close_code(client: UAClient, session_id: str, headers: Optional[Dict[str, str]] = None) -> int:
    async def attempt() -> int:
        async with client.connect(session_id, headers) as ws:
            return await close_code(ws)
    return run(attempt())


def refused_status(client: UAClient, session_id: str) -> int:
    async def attempt() -> int:
        with pytest.raises(InvalidStatus) as info:
            async with client.connect(session_id):
                pass
        return info.value.response.status_code
    return run(attempt())


def policy(gateway: Any, session_id: str) -> Dict[str, Any]:
    return json.loads((gateway.workspaces / session_id / "session_policy.json").read_text())


# -- 1. the session REST API -----------------------------------------------------------------------------


def test_external_gateway_creates_a_session_with_only_a_user_id(gateway):
    reply = UAClient(gateway).create(user_id="tester_user")

    assert reply.status == 200  # UA answers 200, and its tests assert it
    data = reply.json
    session_id = data["session_id"]
    assert data["user_id"] == "tester_user"
    assert os.path.isabs(data["workspace_dir"]) and data["workspace_dir"] == str(gateway.workspaces / session_id)
    assert (gateway.workspaces / session_id / "work_products").is_dir()
    assert isinstance(data["metadata"], dict)
    assert data["run_id"] is None and data["is_live_session"] is True
    assert policy(gateway, session_id)["user_id"] == "tester_user"


def test_gateway_bridge_null_user_is_the_default_user(start_gateway, tmp_path):
    with_default = start_gateway(env={"DEFAULT_USER_ID": "owner_x"}, workspaces=tmp_path / "a")
    assert UAClient(with_default).create(user_id=None).json["user_id"] == "owner_x"
    plain = start_gateway(workspaces=tmp_path / "b")
    reply = UAClient(plain).create(user_id=None)
    assert reply.status == 200 and reply.json["user_id"] == "user_universal"
    assert policy(plain, reply.json["session_id"])["user_id"] == "user_universal"


def test_telegram_workspace_create_is_idempotent_and_keeps_its_owner(gateway):
    client = UAClient(gateway)
    body = {"user_id": "telegram_42", "workspace_dir": str(gateway.workspaces / "tg_42")}
    first = client.create(**body)
    assert first.status == 200 and first.json["session_id"] == "tg_42"
    (gateway.workspaces / "tg_42" / "note.txt").write_text("kept")
    again = client.create(**body)  # Telegram creates on every message
    assert again.status == 200 and again.json["session_id"] == "tg_42"
    assert (gateway.workspaces / "tg_42" / "note.txt").read_text() == "kept"
    assert policy(gateway, "tg_42")["user_id"] == "telegram_42"
    # Another user cannot take the workspace over (UA silently re-owns it: a difference, README).
    stolen = client.create(user_id="mallory", workspace_dir=str(gateway.workspaces / "tg_42"))
    assert stolen.status == 403
    assert policy(gateway, "tg_42")["user_id"] == "telegram_42"


def test_workspace_dir_must_be_right_under_the_root(gateway):
    client = UAClient(gateway)
    relative = client.create(user_id="u1", workspace_dir="foo_rel")
    assert relative.status == 200 and relative.json["session_id"] == "foo_rel"
    assert relative.json["workspace_dir"] == str(gateway.workspaces / "foo_rel")
    for outside in ("/etc", "../x", str(gateway.workspaces), str(gateway.workspaces / "a" / "b")):
        reply = client.create(user_id="u1", workspace_dir=outside)
        assert reply.status == 400, outside
        assert "Workspace path must remain under UA_WORKSPACES_DIR" in reply.json["detail"]
    assert not (gateway.workspaces.parent / "x").exists()


def test_explicit_session_id_and_unknown_body_keys(gateway):
    client = UAClient(gateway)
    reply = client.create(user_id="u1", session_id="api_1", codebase_root="/srv/code", future_field=[1])
    assert reply.status == 200 and reply.json["session_id"] == "api_1"
    assert (gateway.workspaces / "api_1").is_dir()
    assert client.create(user_id="u1", session_id="../bad").status == 400
    assert client.create(user_id=7).status == 400  # a wrong type of a known field stays 400
    assert client.create(user_id="u1", session_id="api_2", workspace_dir="api_3").status == 400


def test_resume_answers_the_create_shape_with_the_recorded_owner(gateway):
    client = UAClient(gateway)
    created = client.create(user_id="resumer", session_id="resume_1").json
    before = (gateway.workspaces / "resume_1" / "session_policy.json").read_bytes()

    reply = client.resume("resume_1")

    assert reply.status == 200
    assert {k: reply.json[k] for k in ("session_id", "user_id", "workspace_dir")} == {
        k: created[k] for k in ("session_id", "user_id", "workspace_dir")}
    assert reply.json["metadata"]["resumed"] is True
    assert (gateway.workspaces / "resume_1" / "session_policy.json").read_bytes() == before
    missing = client.resume("no_such_session")
    assert missing.status == 404 and missing.json == {"detail": "Session not found"}


def test_list_sessions_newest_first_with_a_default_limit_of_50(start_gateway, tmp_path):
    gateway = start_gateway(workspaces=tmp_path / "many")
    for i in range(55):
        directory = gateway.make_session(f"s{i:02d}")
        os.utime(directory, (1_700_000_000 + i, 1_700_000_000 + i))
    client = UAClient(gateway)

    rows = client.list().json["sessions"]

    assert len(rows) == 50
    assert [row["session_id"] for row in rows[:3]] == ["s54", "s53", "s52"]
    for row in rows:
        assert {"session_id", "workspace_dir", "status", "metadata"} <= set(row)
        assert os.path.isabs(row["workspace_dir"]) and isinstance(row["metadata"], dict)
    assert [r["session_id"] for r in client.list("?limit=2&unknown_param=1").json["sessions"]] == ["s54", "s53"]


def test_list_rows_carry_the_owner(gateway):
    client = UAClient(gateway)
    client.create(user_id="lister", session_id="listed_1")
    row = next(r for r in client.list("?limit=1000").json["sessions"] if r["session_id"] == "listed_1")
    assert row["user_id"] == "lister" and row["status"] == "idle"


def test_delete_forgets_live_state_but_keeps_the_files(gateway):
    client = UAClient(gateway)
    client.create(user_id="u1", session_id="forget_1")
    (gateway.workspaces / "forget_1" / "run.log").write_text("line\n")

    async def scenario() -> int:
        async with client.connect("forget_1") as ws:
            assert (await recv(ws))["type"] == "connected"
            assert client.delete("forget_1").json == {"status": "deleted", "session_id": "forget_1"}
            return await close_code(ws)

    assert run(scenario()) == 1000
    assert (gateway.workspaces / "forget_1" / "run.log").read_text() == "line\n"
    assert client.resume("forget_1").status == 200
    assert client.delete("never_existed").status == 404


# -- the WebSocket turn, as UA's clients run it -------------------------------------------------------------


def test_external_gateway_execute_streams_until_query_complete(gateway):
    client = UAClient(gateway)
    session_id = client.create(user_id="streamer").json["session_id"]

    async def scenario() -> List[Dict[str, Any]]:
        async with client.connect(session_id) as ws:
            connected = await recv(ws)
            assert connected["type"] == "connected"
            assert connected["data"]["session"]["session_id"] == session_id
            assert connected["data"]["user_id"] == "streamer"
            await ws.send(execute("hello"))
            return await recv_until(ws, "query_complete")

    frames = run(scenario())
    assert any(f["type"] == "text" and f["data"]["text"] == "hello" for f in frames)
    assert frames[-1]["data"]["completed"] is True and frames[-1]["data"]["turn_id"]


def test_gateway_bridge_answers_input_required_and_cancels(start_gateway, tmp_path):
    agent = write_agent(tmp_path, "asker", """
        import json, sys, time
        request = json.loads(sys.stdin.readline())
        if request["data"]["user_input"] == "slow":
            print(json.dumps({"type": "status", "data": {"status": "working"}}), flush=True)
            time.sleep(30)
        print(json.dumps({"type": "input_required", "data": {"input_id": "q1", "prompt": "name?"}}), flush=True)
        answer = json.loads(sys.stdin.readline())
        print(json.dumps({"type": "text", "data": {"text": "hi " + answer["data"]["response"]}}), flush=True)
    """)
    gateway = start_gateway("--agent-cmd", agent, env={"UA_INTERNAL_API_TOKEN": INTERNAL})
    client = UAClient(gateway, INTERNAL)
    created = client.create(user_id="bridge")
    assert created.status == 200 and created.json["user_id"] == "bridge"
    session_id = created.json["session_id"]
    assert refused_status(UAClient(gateway), session_id) == 401  # the internal token guards the socket

    async def scenario() -> Any:
        async with client.connect(session_id) as ws:
            await recv(ws)
            await ws.send(execute("ask", client_turn_id="c-1"))
            await recv_until(ws, "input_required")
            await ws.send(json.dumps({"type": "input_response", "data": {"input_id": "q1", "response": "Ada"}}))
            answered = await recv_until(ws, "query_complete")
            await ws.send(execute("slow", client_turn_id="c-2"))
            await recv_until(ws, "status")
            await ws.send(json.dumps({"type": "cancel", "data": {"reason": "user pressed stop"}}))
            return answered, await recv_until(ws, "query_complete")

    answered, cancelled = run(scenario())
    assert any(f["type"] == "text" and f["data"]["text"] == "hi Ada" for f in answered)
    assert answered[-1]["data"]["completed"] is True
    notice = next(f for f in cancelled if f["type"] == "cancelled")
    assert notice["data"]["reason"] == "user pressed stop"
    assert cancelled[-1]["data"]["completed"] is False and cancelled[-1]["data"]["turn_id"]


def test_busy_and_duplicate_answers_carry_a_turn_id(start_gateway, tmp_path):
    agent = write_agent(tmp_path, "slow", """
        import json, sys, time
        request = json.loads(sys.stdin.readline())
        print(json.dumps({"type": "status", "data": {"status": "working"}}), flush=True)
        time.sleep(1.0 if request["data"]["user_input"] == "slow" else 0)
        print(json.dumps({"type": "text", "data": {"text": "done"}}), flush=True)
    """)
    gateway = start_gateway("--agent-cmd", agent)
    client = UAClient(gateway)
    created = client.create(user_id="busy")
    assert created.status == 200
    session_id = created.json["session_id"]

    async def scenario() -> Any:
        async with client.connect(session_id) as writer, client.connect(session_id) as other:
            assert (await recv(writer))["data"]["user_id"] == "busy"
            await recv(other)
            await writer.send(execute("slow", client_turn_id="t-1"))
            started = (await recv_until(writer, "status"))[-1]
            await other.send(execute("second"))
            busy = await recv_until(other, "query_complete")
            await writer.send(execute("slow", client_turn_id="t-1"))
            in_progress = await recv_until(writer, "status")
            first = await recv_until(writer, "query_complete")
            await writer.send(execute("slow", client_turn_id="t-1"))
            duplicate = await recv_until(writer, "query_complete")
            return started, busy, in_progress, first, duplicate

    _, busy, in_progress, first, duplicate = run(scenario())
    rejected = next(f for f in busy if f["data"].get("status") == "turn_rejected_busy")
    assert rejected["data"]["active_turn_id"] and rejected["data"]["turn_id"]
    assert busy[-1]["data"] == {"completed": False, "turn_id": rejected["data"]["turn_id"]}
    assert any(f["data"].get("status") == "turn_in_progress" and f["data"]["turn_id"] for f in in_progress)
    turn_id = first[-1]["data"]["turn_id"]
    assert any(f["data"].get("status") == "duplicate_turn_ignored" and f["data"]["turn_id"] == turn_id
               for f in duplicate)
    assert duplicate[-1]["data"]["turn_id"] == turn_id


# -- 2. the allowlist judges the session's owner ----------------------------------------------------------------


def test_telegram_sessions_under_an_allowlist(start_gateway, tmp_path):
    workspaces = tmp_path / "tg"
    allowed = start_gateway(env={"UA_ALLOWED_USERS": "42"}, workspaces=workspaces)
    client = UAClient(allowed)
    body = {"user_id": "telegram_42", "workspace_dir": str(workspaces / "tg_42")}
    assert client.create(**body).status == 200
    assert client.resume("tg_42").json["user_id"] == "telegram_42"

    async def turn() -> Dict[str, Any]:
        async with client.connect("tg_42") as ws:
            await recv(ws)
            await ws.send(execute("from telegram"))
            return (await recv_until(ws, "query_complete"))[-1]

    assert run(turn())["data"]["completed"] is True
    allowed.stop()

    refused = start_gateway(env={"UA_ALLOWED_USERS": "99"}, workspaces=workspaces)
    client = UAClient(refused)
    denied = client.create(**body)
    assert denied.status == 403 and denied.json["detail"].startswith("Access denied: User not allowed. 'telegram_42'")
    assert client.resume("tg_42").status == 403
    assert attach_close_code(client, "tg_42") == 4003


def test_tg_session_without_a_policy_is_owned_by_its_telegram_user(start_gateway, tmp_path):
    gateway = start_gateway(env={"UA_ALLOWED_USERS": "77"})
    gateway.make_session("tg_77")
    gateway.make_session("tg_78")
    client = UAClient(gateway)
    assert client.resume("tg_77").json["user_id"] == "telegram_77"
    assert client.resume("tg_78").status == 403


def test_the_allowlist_judges_the_owner_on_attach(start_gateway, tmp_path):
    workspaces = tmp_path / "owners"
    gateway = start_gateway(env={"UA_ALLOWED_USERS": "alice,bob"}, workspaces=workspaces)
    client = UAClient(gateway)
    assert client.create(user_id="alice", session_id="alices").status == 200

    async def attached() -> str:
        async with client.connect("alices") as ws:
            return (await recv(ws))["type"]

    assert run(attached()) == "connected"  # no claim: UA's clients send none
    assert attach_close_code(client, "alices", {"X-UA-User": "mallory"}) == 4003  # a claim must pass too
    gateway.stop()

    restarted = start_gateway(env={"UA_ALLOWED_USERS": "bob"}, workspaces=workspaces)
    client = UAClient(restarted)
    assert attach_close_code(client, "alices") == 4003
    assert attach_close_code(client, "alices", {"X-UA-User": "bob"}) == 4003  # bob's claim does not own it
    assert client.resume("alices").status == 403


def test_allowlist_includes_ua_default_users_and_lobby_owner(start_gateway):
    gateway = start_gateway(env={"UA_ALLOWED_USERS": "alice", "DEFAULT_USER_ID": "owner_d",
                                 "TELEGRAM_ALLOWED_USER_IDS": "555"})
    client = UAClient(gateway)
    assert client.create(user_id=None).json["user_id"] == "owner_d"  # DEFAULT_USER_ID joins the list
    assert client.create(user_id="telegram_555").status == 200
    assert client.create(user_id="worker_1").status == 403  # no token: system ids are ordinary ids

    async def lobby() -> Dict[str, Any]:
        async with connect(f"{gateway.ws_url}/ws/agent", additional_headers={"X-UA-User": "alice"}) as ws:
            await ws.send(execute("new"))
            return await recv(ws)

    connected = run(lobby())
    assert connected["type"] == "connected" and connected["data"]["user_id"] == "alice"
    assert policy(gateway, connected["data"]["session_id"])["user_id"] == "alice"


def test_service_ids_pass_the_allowlist_with_a_token(start_gateway):
    gateway = start_gateway(env={"UA_ALLOWED_USERS": "alice", "UA_INTERNAL_API_TOKEN": INTERNAL})
    client = UAClient(gateway, INTERNAL)
    for user in ("worker_7", "user_ui", "user_cli", "cron:nightly", "vp.general"):
        assert client.create(user_id=user).status == 200, user
    assert client.create(user_id="mallory").status == 403


# -- 3. credentials ----------------------------------------------------------------------------------------------


def session_api_statuses(gateway: Any, token: Optional[str], headers: Optional[Dict[str, str]] = None) -> List[int]:
    sent = ua_headers(token) if headers is None else headers
    gateway.make_session("cred_s")
    return [
        gateway.post("/api/v1/sessions", body={"user_id": "u"}, headers=sent).status,
        gateway.get("/api/v1/sessions/cred_s", headers=sent).status,
        gateway.get("/api/v1/sessions", headers=sent).status,
    ]


def ws_status(gateway: Any, headers: Dict[str, str]) -> int:
    async def attempt() -> int:
        try:
            async with connect(f"{gateway.ws_url}/api/v1/sessions/cred_s/stream", additional_headers=headers) as ws:
                assert (await recv(ws))["type"] == "connected"
                return 101
        except InvalidStatus as exc:
            return exc.response.status_code
    return run(attempt())


def test_credentials_no_token_is_open_on_loopback(start_gateway):
    gateway = start_gateway()
    assert session_api_statuses(gateway, None) == [200, 200, 200]
    assert ws_status(gateway, {}) == 101
    assert gateway.get("/api/v1/ops/sessions").status == 200


def test_credentials_ops_token_only(start_gateway):
    gateway = start_gateway(env={"UA_OPS_TOKEN": OPS})
    assert session_api_statuses(gateway, OPS) == [200, 200, 200]
    assert session_api_statuses(gateway, None) == [401, 401, 401]
    assert ws_status(gateway, ua_headers(OPS)) == 101
    assert ws_status(gateway, {}) == 401
    assert gateway.get("/api/v1/ops/sessions", headers=ua_headers(OPS)).status == 200


def test_credentials_internal_token_only_protects_everything(start_gateway):
    # Before: with only UA_INTERNAL_API_TOKEN set, anyone could create sessions and attach (a security bug).
    gateway = start_gateway(env={"UA_INTERNAL_API_TOKEN": INTERNAL})
    assert session_api_statuses(gateway, None) == [401, 401, 401]
    assert ws_status(gateway, {}) == 401
    assert session_api_statuses(gateway, INTERNAL) == [200, 200, 200]
    assert session_api_statuses(gateway, None, {"X-UA-Internal-Token": INTERNAL}) == [200, 200, 200]
    assert ws_status(gateway, {"X-UA-Internal-Token": INTERNAL}) == 101
    # UA leaves its Ops API open then; ours takes the internal token (README, Differences).
    assert gateway.get("/api/v1/ops/sessions").status == 401
    assert gateway.get("/api/v1/ops/sessions", headers=ua_headers(INTERNAL)).status == 200


def test_credentials_internal_token_from_a_file(start_gateway, tmp_path):
    secret = tmp_path / "internal.secret"
    secret.write_text(INTERNAL + "\n")
    gateway = start_gateway(env={"UA_INTERNAL_API_TOKEN_FILE": str(secret)})
    assert session_api_statuses(gateway, None) == [401, 401, 401]
    assert session_api_statuses(gateway, INTERNAL) == [200, 200, 200]


def test_credentials_both_tokens(start_gateway):
    gateway = start_gateway(env={"UA_OPS_TOKEN": OPS, "UA_INTERNAL_API_TOKEN": INTERNAL})
    assert session_api_statuses(gateway, OPS) == [200, 200, 200]
    assert session_api_statuses(gateway, INTERNAL) == [200, 200, 200]
    assert session_api_statuses(gateway, None, {"X-UA-Internal-Token": INTERNAL}) == [200, 200, 200]
    assert ws_status(gateway, {"Authorization": f"Bearer {INTERNAL}"}) == 101
    assert gateway.get("/api/v1/ops/sessions", headers={"X-UA-OPS-Token": OPS}).status == 200
    assert gateway.get("/api/v1/ops/sessions", headers=ua_headers(INTERNAL)).status == 401  # Ops: only OPS


# -- 6. a dashboard served by another origin ----------------------------------------------------------------------


def test_a_listed_dashboard_origin_works_and_an_unlisted_one_is_told_to_list_it(start_gateway):
    gateway = start_gateway(env={"UA_CORS_ORIGINS": "https://dash.example", "UA_OPS_TOKEN": OPS})
    browser = {"Origin": "https://dash.example", "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors"}
    preflight = gateway.request("OPTIONS", "/api/v1/sessions", headers={
        "Origin": "https://dash.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-ua-internal-token"})
    assert preflight.headers["access-control-allow-origin"] == "https://dash.example"
    assert "X-UA-Internal-Token" in preflight.headers["access-control-allow-headers"]
    created = gateway.post("/api/v1/sessions", body={"user_id": "web"}, headers={**browser, **ua_headers(OPS)})
    assert created.status == 200
    assert created.headers["access-control-allow-origin"] == "https://dash.example"
    listed = gateway.get("/api/v1/ops/sessions", headers={**browser, "Authorization": f"Bearer {OPS}"})
    assert listed.status == 200

    other = {**browser, "Origin": "https://other.example"}
    refused = gateway.get("/api/v1/ops/sessions", headers={**other, "Authorization": f"Bearer {OPS}"})
    assert refused.status == 403
    assert "https://other.example" in refused.json["detail"] and "UA_CORS_ORIGINS" in refused.json["detail"]


@pytest.mark.parametrize("body,allowed", [
    ({"session_id": "tg_900", "user_id": "alice"}, "alice"),  # tg_900 is owned by telegram_900
    ({"session_id": "tg_6", "user_id": "telegram_6"}, "alice"),  # telegram_6 is not listed
])
def test_a_refused_create_writes_nothing(start_gateway, body, allowed):
    gateway = start_gateway(env={"UA_ALLOWED_USERS": allowed})
    reply = gateway.post("/api/v1/sessions", body=body)
    assert reply.status == 403
    assert not (gateway.workspaces / body["session_id"]).exists()


def test_a_session_named_like_an_ops_route_or_with_a_huge_user_id_is_refused(gateway):
    assert gateway.post("/api/v1/sessions", body={"session_id": "cancel"}).status == 400
    assert not (gateway.workspaces / "cancel").exists()
    assert gateway.post("/api/v1/sessions", body={"user_id": "u" * 257}).status == 400


def test_a_preflight_for_an_invalid_session_id_is_400(gateway):
    assert gateway.request("OPTIONS", "/api/v1/ops/sessions/..%2f").status == 400


@pytest.mark.parametrize("env,token", [
    ({}, None),
    ({"UA_OPS_TOKEN": OPS}, OPS),
    ({"UA_INTERNAL_API_TOKEN": INTERNAL}, INTERNAL),
    ({"UA_ALLOWED_USERS": "alice"}, None),
], ids=["no-token", "ops-token", "internal-token", "allowlist"])
def test_the_whole_ua_client_flow_under_each_configuration(start_gateway, env, token):
    # What UA's ExternalGateway does for one task: create with only user_id, resume by id, list, stream a
    # turn until query_complete.
    client = UAClient(start_gateway(env=env), token)
    created = client.create(user_id="alice")
    assert created.status == 200, created.json
    session_id = created.json["session_id"]
    assert created.json["user_id"] == "alice" and os.path.isabs(created.json["workspace_dir"])
    resumed = client.resume(session_id)
    assert resumed.status == 200 and resumed.json["session_id"] == session_id and resumed.json["user_id"] == "alice"
    assert session_id in [row["session_id"] for row in client.list().json["sessions"]]

    async def turn() -> List[Dict[str, Any]]:
        async with client.connect(session_id) as ws:
            await recv(ws)
            await ws.send(execute("hello from ua"))
            return await recv_until(ws, "query_complete")

    frames = run(turn())
    assert frames[-1]["data"]["completed"] is True and frames[-1]["data"]["turn_id"]
    assert any(f["type"] == "text" and f["data"]["text"] == "hello from ua" for f in frames)
    if token is not None:  # and nobody gets in without it
        assert UAClient(client.gateway).resume(session_id).status == 401


def test_with_an_allowlist_a_create_without_user_id_is_refused_naming_the_default_user(start_gateway):
    # README, Configuration (DEFAULT_USER_ID): user_universal itself is not added to UA_ALLOWED_USERS.
    refused = start_gateway(env={"UA_ALLOWED_USERS": "alice"}).post("/api/v1/sessions", body={})
    assert refused.status == 403
    assert "'user_universal'" in refused.json["detail"] and "DEFAULT_USER_ID" in refused.json["detail"]
    allowed = start_gateway(env={"UA_ALLOWED_USERS": "alice", "DEFAULT_USER_ID": "alice"})
    assert allowed.post("/api/v1/sessions", body={}).json["user_id"] == "alice"

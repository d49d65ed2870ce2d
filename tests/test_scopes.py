"""Token scopes (PROTOCOL.md §11.1): UA_OPS_READ_TOKEN reads the Ops API and changes nothing.

The routes come from the gateway's own router table (as in test_auth_property.py): a route or method added
later is judged here without anyone listing it. Every reading route accepts the read token, every other
method of a protected route refuses it with 403 naming the token it needs, and so does every WebSocket.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

import ua_gateway
from conftest import launch, run
from uagw.config import Config, ConfigError
from uagw.routing import Permission, Route

FULL = "scopes-full-token-6d1f"
READ = "scopes-read-token-93ab"
PROBE = "probe-1"
DOCUMENT_PATH = Path(__file__).resolve().parent.parent / "uagw" / "console" / "openapi.json"


def router_routes(tmp_path: Path) -> List[Route]:
    gateway = ua_gateway.Gateway(ua_gateway.Config(workspaces=tmp_path / "unused", ws_echo=True))
    try:
        return list(gateway.router.routes)
    finally:
        gateway.executor.shutdown(wait=False)


def operations(tmp_path: Path) -> List[Tuple[str, str, Permission]]:
    """(method, concrete path, permission) of every handler in the router table."""
    found = []
    for route in router_routes(tmp_path):
        path = "/" + "/".join(PROBE if p == "{session_id}" else ("app.js" if p == "{asset}" else p)
                              for p in route.pattern)
        for method in sorted(route.handlers):
            found.append((method, path, route.permission(method)))
    return found


@pytest.fixture(scope="module")
def scoped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ua_gateway.Gateway]:
    running = launch(tmp_path_factory.mktemp("scopes") / "workspaces", "--ws-echo",
                     env={"UA_OPS_TOKEN": FULL, "UA_OPS_READ_TOKEN": READ})
    running.make_session(PROBE, {"run.log": b"one\n"})
    yield running
    running.stop()


def test_every_reading_route_accepts_the_read_token(scoped, tmp_path):
    reading = [(m, p) for m, p, permission in operations(tmp_path) if permission is Permission.READ]
    assert reading, "the router has reading routes"
    for method, path in reading:
        reply = scoped.request(method, path, token=READ)
        assert reply.status not in (401, 403), f"{method} {path} refused the read token: {reply!r}"


def test_every_mutating_route_refuses_the_read_token_with_403(scoped, tmp_path):
    mutating = [(m, p) for m, p, permission in operations(tmp_path)
                if permission in (Permission.WRITE, Permission.SESSION)]
    assert any(m != "GET" for m, _ in mutating)
    for method, path in mutating:
        body = {} if method in ("POST", "PUT", "PATCH") else None
        reply = scoped.request(method, path + ("?confirm=true" if method == "DELETE" else ""), body=body, token=READ)
        assert reply.status == 403, f"{method} {path} answered {reply!r} to the read token"
        assert "UA_OPS_TOKEN" in reply.json["detail"]
    assert (scoped.workspaces / PROBE / "run.log").read_bytes() == b"one\n"  # nothing was touched


def test_read_token_on_a_change_names_the_scope_needed(scoped):
    reply = scoped.post(f"/api/v1/ops/sessions/{PROBE}/reset", body={}, token=READ)

    assert reply.status == 403
    assert reply.json["detail"].startswith("this call (POST) changes state and needs UA_OPS_TOKEN; the token "
                                             "given is the read-only UA_OPS_READ_TOKEN")


@pytest.mark.parametrize("how", ["header", "subprotocol"])
def test_websocket_upgrade_refuses_the_read_token(scoped, tmp_path, how):
    websocket_paths = ["/" + "/".join(PROBE if p == "{session_id}" else p for p in route.pattern)
                       for route in router_routes(tmp_path) if route.websocket is not None]
    encoded = base64.urlsafe_b64encode(READ.encode()).decode().rstrip("=")
    kwargs = ({"additional_headers": {"Authorization": f"Bearer {READ}"}} if how == "header"
              else {"subprotocols": [f"bearer.{encoded}", "ua.v1"]})

    async def attempt(path: str) -> int:
        try:
            async with connect(f"{scoped.ws_url}{path}", **kwargs):
                return 101
        except InvalidStatus as refused:
            return refused.response.status_code

    statuses = {path: run(attempt(path)) for path in websocket_paths}
    assert statuses and set(statuses.values()) == {403}, statuses


def test_full_token_still_changes_state(scoped):
    reply = scoped.request("PATCH", f"/api/v1/ops/sessions/{PROBE}", body={"description": "by the full token"},
                           token=FULL)

    assert reply.status == 200


def test_read_token_refusals_do_not_count_toward_the_lockout(scoped):
    for _ in range(12):  # more than the 10 failures that lock an address out
        assert scoped.post("/api/v1/ops/sessions/cancel", body={}, token=READ).status == 403

    assert scoped.get("/api/v1/ops/sessions", token=READ).status == 200


def test_a_wrong_token_is_still_401(scoped):
    assert scoped.get("/api/v1/ops/sessions", token=READ + "x").status == 401


def test_read_token_equal_to_the_full_token_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="UA_OPS_READ_TOKEN is the same as UA_OPS_TOKEN"):
        Config(workspaces=tmp_path, token=FULL, read_token=FULL)


def test_read_token_alone_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="without UA_OPS_TOKEN"):
        Config(workspaces=tmp_path, read_token=READ)


def test_read_token_file_variant_is_read(tmp_path):
    secret = tmp_path / "read_token"
    secret.write_text(READ + "\n")

    config = Config.from_env({"UA_OPS_TOKEN": FULL, "UA_OPS_READ_TOKEN_FILE": str(secret)})

    assert config.read_token == READ


def test_read_token_is_hidden_from_agents():
    from uagw.config import HIDDEN_FROM_AGENTS

    assert {"UA_OPS_READ_TOKEN", "UA_OPS_READ_TOKEN_FILE"} <= HIDDEN_FROM_AGENTS


def test_openapi_states_each_operations_scope(tmp_path):
    document = json.loads(DOCUMENT_PATH.read_text(encoding="utf-8"))
    for route in router_routes(tmp_path):
        methods = set(route.handlers) | ({"GET"} if route.websocket is not None else set())
        for method in methods:
            operation = document["paths"][route.template][method.lower()]
            assert operation.get("x-scope") == route.permission(method).value, (method, route.template)

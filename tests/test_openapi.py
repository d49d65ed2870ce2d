"""The OpenAPI document (uagw/console/openapi.json) matches the router, is valid OpenAPI 3.1, and is what
the gateway serves at /api/v1/openapi.json.

The router is read in-process (``Gateway(...).router.routes``), so a route added to the code without
being documented, or a documented path the code does not serve, fails here before any client sees it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Set, Tuple

import pytest

import ops_service
import ua_gateway

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT_PATH = ROOT / "uagw" / "console" / "openapi.json"
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


@pytest.fixture(scope="module")
def document() -> dict:
    return json.loads(DOCUMENT_PATH.read_text(encoding="utf-8"))


def routed_operations(tmp_path: Path, **config: object) -> Set[Tuple[str, str]]:
    """(METHOD, OpenAPI path) for every handler and WebSocket route of a gateway built in-process.

    OPTIONS is answered on every path by the dispatcher (CORS preflight), so it is not listed.
    """
    gateway = ua_gateway.Gateway(ua_gateway.Config(workspaces=tmp_path / "workspaces", **config))
    try:
        operations = set()
        for route in gateway.router.routes:
            path = "/" + "/".join(route.pattern)
            methods = set(route.handlers) | ({"GET"} if route.websocket is not None else set())
            operations.update((method, path) for method in methods)
        return operations
    finally:
        gateway.executor.shutdown(wait=False)


def documented_operations(document: dict) -> Set[Tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


def test_document_is_openapi_3_1(document: dict):
    assert document["openapi"].startswith("3.1.")
    assert document["info"]["version"] == ua_gateway.__version__


def test_document_validates_against_the_openapi_3_1_specification(document: dict):
    validator = pytest.importorskip("openapi_spec_validator")

    validator.validate(document, cls=validator.OpenAPIV31SpecValidator)


def test_every_routed_operation_is_documented(document: dict, tmp_path: Path):
    missing = routed_operations(tmp_path, ws_echo=True) - documented_operations(document)

    assert not missing, f"routes without an OpenAPI operation: {sorted(missing)}"


def test_every_documented_operation_is_routed(document: dict, tmp_path: Path):
    # /ws/echo exists only with --ws-echo; the document describes it (and its 404 without the flag).
    unrouted = documented_operations(document) - routed_operations(tmp_path, ws_echo=True)

    assert not unrouted, f"documented operations the router does not serve: {sorted(unrouted)}"


def test_default_gateway_serves_everything_documented_except_the_echo_route(document: dict, tmp_path: Path):
    unrouted = documented_operations(document) - routed_operations(tmp_path)

    assert unrouted == {("GET", "/ws/echo")}
    assert "404" in document["paths"]["/ws/echo"]["get"]["responses"]


def test_websocket_routes_are_documented_as_get_with_101(document: dict, tmp_path: Path):
    gateway = ua_gateway.Gateway(ua_gateway.Config(workspaces=tmp_path / "workspaces", ws_echo=True))
    gateway.executor.shutdown(wait=False)
    websocket_paths = ["/" + "/".join(r.pattern) for r in gateway.router.routes if r.websocket is not None]

    assert websocket_paths
    for path in websocket_paths:
        operation = document["paths"][path]["get"]
        assert "101" in operation["responses"] and "426" in operation["responses"], path
        assert operation["summary"].startswith("WebSocket:"), path
    for path in ("/ws/agent", "/api/v1/sessions/{session_id}/stream"):
        assert "`connected" in document["paths"][path]["get"]["description"], path


def test_protected_operations_declare_both_token_schemes(document: dict):
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {**schemes["bearerAuth"], "type": "http", "scheme": "bearer"}
    assert (schemes["opsToken"]["in"], schemes["opsToken"]["name"]) == ("header", "X-UA-OPS-TOKEN")
    assert (schemes["internalToken"]["in"], schemes["internalToken"]["name"]) == ("header", "X-UA-Internal-Token")
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            protected = path.startswith(("/api/v1/ops/", "/api/v1/sessions", "/ws/")) or path == "/metrics"
            expected = [{"bearerAuth": []}, {"opsToken": []}] if protected else []
            if path.startswith(("/api/v1/sessions", "/ws/")):  # Scope.SESSION: UA_INTERNAL_API_TOKEN too
                expected.insert(1, {"internalToken": []})
            assert operation["security"] == expected, (method, path)
            if protected:
                assert {"401", "429"} <= set(operation["responses"]), (method, path)


def test_session_id_parameter_uses_the_session_id_rule(document: dict):
    pattern = document["components"]["parameters"]["SessionId"]["schema"]["pattern"]

    assert pattern == ops_service.SESSION_ID_RE.pattern


def test_served_document_is_the_file(gateway):
    reply = gateway.get("/api/v1/openapi.json")

    assert reply.status == 200
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.body == DOCUMENT_PATH.read_bytes()

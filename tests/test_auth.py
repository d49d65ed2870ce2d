"""PROTOCOL.md §4: token, lockout, CORS and Origin, address allowlist, user allowlist; the token never logged."""

from __future__ import annotations

import http.client

import pytest

TOKEN = "correct-horse-battery-staple"


def request_from(gateway, source: str, method: str, path: str, headers=None):
    """An HTTP request sent from a chosen loopback source address (127.0.0.0/8 all reach the server)."""
    connection = http.client.HTTPConnection(gateway.host, gateway.port, timeout=10, source_address=(source, 0))
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


@pytest.fixture
def secured(start_gateway):
    return start_gateway(env={"UA_OPS_TOKEN": TOKEN})


PROTECTED = [
    ("GET", "/api/v1/ops/sessions"),
    ("GET", "/api/v1/ops/sessions/s-1"),
    ("GET", "/api/v1/ops/sessions/s-1/preview"),
    ("POST", "/api/v1/ops/sessions/s-1/reset"),
    ("POST", "/api/v1/ops/sessions/s-1/compact"),
    ("DELETE", "/api/v1/ops/sessions/s-1?confirm=true"),
    ("GET", "/api/v1/ops/logs/tail"),
    ("POST", "/api/v1/sessions"),
    ("PUT", "/api/v1/ops/sessions"),  # a method the route lacks: still the route's decision first, then 405
]


@pytest.mark.parametrize("method,path", PROTECTED)
def test_protected_endpoints_without_token_are_401(secured, method, path):
    secured.make_session("s-1", {"run.log": b"a\n"})
    reply = secured.request(method, path)
    assert reply.status == 401
    assert reply.json == {"detail": "Unauthorized"}
    assert reply.headers["www-authenticate"].startswith("Bearer")
    assert (secured.workspaces / "s-1" / "run.log").exists()


def test_unknown_path_under_ops_is_404_with_or_without_token(secured):
    # Protection belongs to routes: where no route is, there is nothing to protect (README, Security).
    assert secured.get("/api/v1/ops/unknown").status == 404
    assert secured.get("/api/v1/ops/unknown", token=TOKEN).status == 404


def test_wrong_token_is_401(secured):
    assert secured.get("/api/v1/ops/sessions", token="wrong").status == 401


def test_bearer_token_is_accepted(secured):
    assert secured.get("/api/v1/ops/sessions", token=TOKEN).status == 200


def test_x_ua_ops_token_header_is_accepted(secured):
    assert secured.get("/api/v1/ops/sessions", headers={"X-UA-OPS-TOKEN": TOKEN}).status == 200


def test_bearer_scheme_is_case_insensitive(secured):
    assert secured.get("/api/v1/ops/sessions", headers={"Authorization": f"bearer {TOKEN}"}).status == 200


def test_correct_header_wins_over_a_wrong_bearer(secured):
    headers = {"Authorization": "Bearer wrong", "X-UA-OPS-TOKEN": TOKEN}
    assert secured.get("/api/v1/ops/sessions", headers=headers).status == 200


def test_token_in_query_string_is_not_accepted(secured):
    assert secured.get(f"/api/v1/ops/sessions?token={TOKEN}").status == 401


def test_health_needs_no_token(secured):
    reply = secured.get("/api/v1/health")
    assert reply.status == 200
    assert reply.json["status"] == "ok"


def test_ten_failures_lock_the_address_out_with_429(secured):
    for _ in range(10):
        assert secured.get("/api/v1/ops/sessions", token="wrong").status == 401
    reply = secured.get("/api/v1/ops/sessions", token=TOKEN)
    assert reply.status == 429
    assert 1 <= int(reply.headers["retry-after"]) <= 300
    assert "detail" in reply.json
    assert secured.post("/api/v1/sessions", token=TOKEN).status == 429
    assert secured.get("/api/v1/health").status == 200


def test_lockout_does_not_affect_other_addresses(secured):
    for _ in range(10):
        request_from(secured, "127.0.0.2", "GET", "/api/v1/ops/sessions", {"Authorization": "Bearer wrong"})
    assert request_from(secured, "127.0.0.2", "GET", "/api/v1/ops/sessions",
                        {"Authorization": f"Bearer {TOKEN}"})[0] == 429
    assert request_from(secured, "127.0.0.3", "GET", "/api/v1/ops/sessions",
                        {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    assert secured.get("/api/v1/ops/sessions", token=TOKEN).status == 200


def test_nine_failures_do_not_lock(secured):
    for _ in range(9):
        secured.get("/api/v1/ops/sessions", token="wrong")
    assert secured.get("/api/v1/ops/sessions", token=TOKEN).status == 200


def test_requests_without_any_credential_never_lock_out(secured):
    for _ in range(15):  # more than the 10 failures that lock an address out: 5 console page loads
        assert secured.get("/api/v1/ops/sessions").status == 401
    assert secured.get("/api/v1/ops/sessions", token=TOKEN).status == 200


def test_wrong_tokens_after_credential_less_requests_still_lock_out(secured):
    for _ in range(9):
        secured.get("/api/v1/ops/sessions")
    for _ in range(10):
        assert secured.get("/api/v1/ops/sessions", headers={"X-UA-OPS-Token": "wrong"}).status == 401
    assert secured.get("/api/v1/ops/sessions", token=TOKEN).status == 429


def test_token_is_never_written_to_the_gateway_log(secured):
    secured.get("/api/v1/ops/sessions", token=TOKEN)
    secured.get("/api/v1/ops/sessions", headers={"X-UA-OPS-TOKEN": TOKEN})
    secured.get("/api/v1/ops/logs/tail", token=TOKEN)
    secured.stop()
    log_dir = secured.workspaces / "_gateway"
    text = "".join(p.read_text() for p in log_dir.glob("gateway.log*"))
    assert '"event":"access"' in text
    assert TOKEN not in text


def test_no_cors_header_for_an_unlisted_origin(start_gateway):
    gateway = start_gateway(env={"UA_CORS_ORIGINS": "http://console.example"})
    reply = gateway.get("/api/v1/ops/sessions", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in reply.headers
    reply = gateway.get("/api/v1/health", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in reply.headers


def test_no_cors_header_by_default(gateway):
    reply = gateway.get("/api/v1/health", headers={"Origin": "http://localhost:3000"})
    assert "access-control-allow-origin" not in reply.headers


def test_cors_header_for_a_listed_origin(start_gateway):
    gateway = start_gateway(env={"UA_CORS_ORIGINS": "http://console.example, https://ops.example"})
    reply = gateway.get("/api/v1/ops/sessions", headers={"Origin": "https://ops.example"})
    assert reply.headers["access-control-allow-origin"] == "https://ops.example"
    assert "Origin" in reply.headers["vary"]


def test_preflight_from_a_listed_origin_is_204_without_token(start_gateway):
    gateway = start_gateway(env={"UA_CORS_ORIGINS": "http://console.example", "UA_OPS_TOKEN": TOKEN})
    reply = gateway.request("OPTIONS", "/api/v1/ops/sessions/s-1", headers={
        "Origin": "http://console.example",
        "Access-Control-Request-Method": "DELETE",
        "Access-Control-Request-Headers": "authorization",
    })
    assert reply.status == 204
    assert reply.headers["access-control-allow-origin"] == "http://console.example"
    assert "DELETE" in reply.headers["access-control-allow-methods"]
    assert "authorization" in reply.headers["access-control-allow-headers"].lower()


def test_preflight_from_an_unlisted_origin_gets_no_cors_grant(start_gateway):
    gateway = start_gateway(env={"UA_CORS_ORIGINS": "http://console.example"})
    reply = gateway.request("OPTIONS", "/api/v1/ops/sessions", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in reply.headers


def test_allow_from_refuses_other_addresses_even_with_token(start_gateway):
    gateway = start_gateway(env={"UA_OPS_ALLOW_FROM": "10.0.0.0/8, fd00::/8", "UA_OPS_TOKEN": TOKEN})
    reply = gateway.get("/api/v1/ops/sessions", token=TOKEN)
    assert reply.status == 403
    assert "UA_OPS_ALLOW_FROM" in reply.json["detail"]
    assert gateway.post("/api/v1/sessions", token=TOKEN).status == 403
    assert gateway.get("/api/v1/health").status == 200


def test_allow_from_admits_listed_addresses(start_gateway):
    gateway = start_gateway(env={"UA_OPS_ALLOW_FROM": "127.0.0.2/32"})
    assert request_from(gateway, "127.0.0.2", "GET", "/api/v1/ops/sessions")[0] == 200
    assert request_from(gateway, "127.0.0.1", "GET", "/api/v1/ops/sessions")[0] == 403


def test_allow_from_still_needs_the_token(start_gateway):
    gateway = start_gateway(env={"UA_OPS_ALLOW_FROM": "127.0.0.0/8", "UA_OPS_TOKEN": TOKEN})
    assert gateway.get("/api/v1/ops/sessions").status == 401
    assert gateway.get("/api/v1/ops/sessions", token=TOKEN).status == 200


def test_allowed_users_limit_session_creation(start_gateway):
    gateway = start_gateway(env={"UA_ALLOWED_USERS": "alice,bob"})
    assert gateway.post("/api/v1/sessions", body={"user_id": "mallory"}).status == 403
    assert gateway.post("/api/v1/sessions", body={}).status == 403
    reply = gateway.post("/api/v1/sessions", body={"user_id": "alice"})
    assert reply.status == 200
    assert (gateway.workspaces / reply.json["session_id"]).is_dir()


def test_created_session_ids_follow_the_naming_rule(gateway):
    reply = gateway.post("/api/v1/sessions")
    assert reply.status == 200
    import re

    assert re.fullmatch(r"session_\d{8}_\d{6}_[0-9a-f]{8}", reply.json["session_id"])
    assert reply.json["workspace_dir"] == str(gateway.workspaces / reply.json["session_id"])


@pytest.mark.parametrize("method,path", [
    ("GET", "/api/v1/%6Fps/sessions"),
    ("GET", "/%61pi/v1/ops/sessions"),
    ("GET", "/api/%76%31/ops/sessions"),
    ("DELETE", "/api/v1/%6Fps/sessions/s-1?confirm=true"),
])
def test_a_percent_encoded_letter_does_not_skip_the_token(secured, method, path):
    # The hostile review's reproduction; tests/test_auth_property.py covers every route and spelling.
    secured.make_session("s-1", {"run.log": b"a\n"})
    assert secured.request(method, path).status == 401
    assert (secured.workspaces / "s-1" / "run.log").exists()


@pytest.mark.parametrize("fetch_site", ["same-site", "cross-site"])
def test_a_browser_request_from_another_origin_never_counts_toward_the_lockout(secured, fetch_site):
    # An <img> on a sibling site sends Sec-Fetch-Site and no Origin: refused before the token check.
    for _ in range(12):
        reply = secured.get("/api/v1/ops/sessions", headers={"Sec-Fetch-Site": fetch_site})
        assert reply.status == 403
        assert "Sec-Fetch-Site" in reply.json["detail"]
    assert secured.get("/api/v1/ops/sessions", token=TOKEN).status == 200


def test_the_consoles_own_requests_pass_the_browser_check(secured):
    for fetch_site in ("same-origin", "none"):
        reply = secured.get("/api/v1/ops/sessions", token=TOKEN, headers={"Sec-Fetch-Site": fetch_site})
        assert reply.status == 200


def test_a_listed_origin_on_the_same_site_is_admitted(start_gateway):
    gateway = start_gateway(env={"UA_OPS_TOKEN": TOKEN, "UA_CORS_ORIGINS": "http://dash.example"})
    headers = {"Sec-Fetch-Site": "same-site", "Origin": "http://dash.example"}
    assert gateway.get("/api/v1/ops/sessions", token=TOKEN, headers=headers).status == 200

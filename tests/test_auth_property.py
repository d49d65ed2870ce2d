"""Authorization is a property of the route, whatever the spelling of its path (README, Security).

The routes come from the gateway's own router table, so a route added later is covered without anyone
remembering to add it here. For every route, every method and a family of spellings of its path (each
character percent-encoded in both hex cases, doubled slashes, dot segments, mixed case, an encoded
slash), a request without the token must get the same decision as the canonical path, or 400/404.
A hole like "/api/v1/%6Fps/sessions" reaching the Ops API without a token fails here.
"""

from __future__ import annotations

import http.client
import itertools
from typing import Iterator, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ua_gateway
from uagw.routing import Route, Scope

TOKEN = "property-test-token-0c41"
PROBE_SESSION = "probe-1"
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
REFUSED = frozenset((401, 403, 429))
NOT_A_ROUTE = frozenset((400, 404))


def router_routes(tmp_path) -> List[Route]:
    """Every route the gateway serves, with the optional ones switched on."""
    gateway = ua_gateway.Gateway(ua_gateway.Config(workspaces=tmp_path / "unused", ws_echo=True))
    try:
        return list(gateway.router.routes)
    finally:
        gateway.executor.shutdown(wait=False)


def concrete(route: Route) -> str:
    segments = [PROBE_SESSION if p == "{session_id}" else ("app.js" if p == "{asset}" else p) for p in route.pattern]
    return "/" + "/".join(segments)


def spellings(path: str) -> Iterator[str]:
    """Other ways of writing ``path``: none of them may be served with less authorization than it."""
    for i, ch in enumerate(path):
        if ch != "/":
            for form in ("%%%02X", "%%%02x"):
                yield path[:i] + form % ord(ch) + path[i + 1:]
    for form in ("%%%02X", "%%%02x"):
        yield "".join(ch if ch == "/" else form % ord(ch) for ch in path)
    slashes = [i for i, ch in enumerate(path) if ch == "/"]
    for i in slashes:
        yield path[:i] + "/" + path[i:]  # doubled slash
        yield path[:i] + "/." + path[i:]  # a "." segment
        yield path[:i] + "/%2e" + path[i:]
        yield path[:i] + "/x/.." + path[i:]  # a ".." segment
        yield path[:i] + "/x/%2E%2E" + path[i:]
        if i:
            yield path[:i] + "%2F" + path[i + 1:]  # an encoded slash joins two segments
    segments = path.split("/")
    for i, segment in enumerate(segments):
        if segment and segment.swapcase() != segment:
            yield "/".join(segments[:i] + [segment.swapcase()] + segments[i + 1:])
    yield path.upper()
    yield path + "/"


class Prober:
    """Sends requests without the token, each batch from a new loopback source address, so that the
    expected 401s never add up to a lockout (which would hide what the token check itself decides)."""

    PER_ADDRESS = 8  # below the 10 failures that start a lockout

    def __init__(self, gateway) -> None:
        self.gateway = gateway
        self.addresses = (f"127.{a}.{b}.{c}" for a, b, c in itertools.product(range(1, 255), range(1, 255), range(1, 255)))
        self.connection: Optional[http.client.HTTPConnection] = None
        self.used = 0
        self.sent = 0

    def status(self, method: str, path: str, headers: Optional[dict] = None) -> int:
        if self.connection is None or self.used >= self.PER_ADDRESS:
            if self.connection is not None:
                self.connection.close()
            self.connection = http.client.HTTPConnection(
                self.gateway.host, self.gateway.port, timeout=10, source_address=(next(self.addresses), 0)
            )
            self.used = 0
        self.used += 1
        self.sent += 1
        query = "?confirm=true&force=true&session_id=" + PROBE_SESSION
        body = b"{}" if method in ("POST", "PUT", "PATCH") else None
        try:
            self.connection.request(method, path + query, body=body, headers=headers or {})
            response = self.connection.getresponse()
            if (response.getheader("Content-Type") or "").startswith("text/event-stream"):
                self.connection.close()  # a stream (PROTOCOL.md §13) never ends by itself: its status is the answer
                self.connection = None
                return response.status
            response.read()
        except (http.client.HTTPException, OSError):
            self.connection.close()
            self.connection = None
            raise
        if response.getheader("connection", "").lower() == "close" or response.status == 101:
            self.connection.close()
            self.connection = None
        return response.status

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()


@pytest.fixture(scope="module")
def probe_target(tmp_path_factory):
    from conftest import launch  # the same real command line as every other test

    root = tmp_path_factory.mktemp("auth-property")
    workspaces = root / "workspaces"
    (workspaces / PROBE_SESSION).mkdir(parents=True)
    (workspaces / PROBE_SESSION / "run.log").write_bytes(b"probe line\n")
    running = launch(workspaces, "--ws-echo", env={"UA_OPS_TOKEN": TOKEN})
    yield running, workspaces, router_routes(root)
    running.stop()


@pytest.fixture
def prober(probe_target) -> Iterator[Prober]:
    prober = Prober(probe_target[0])
    yield prober
    prober.close()


def decisions(prober: Prober, route: Route, method: str) -> Tuple[int, List[Tuple[str, int]]]:
    path = concrete(route)
    canonical = prober.status(method, path)
    return canonical, [(spelled, prober.status(method, spelled)) for spelled in spellings(path)]


def test_every_route_method_and_spelling_gets_the_canonical_decision(probe_target, prober):
    _, workspaces, routes = probe_target
    assert len(routes) >= 13, "the router table looks empty: the test would prove nothing"
    leaks = []
    protected_seen = 0
    for route in routes:
        for method in METHODS:
            canonical, results = decisions(prober, route, method)
            if route.scope is not Scope.PUBLIC and method != "OPTIONS":
                protected_seen += 1
                assert canonical == 401, f"{method} {route.template} without a token gave {canonical}, not 401"
            for spelled, status in results:
                if status in NOT_A_ROUTE:
                    continue
                if (status in REFUSED) != (canonical in REFUSED):
                    leaks.append(f"{method} {spelled} -> {status} (canonical {canonical})")
    prober.close()
    print(f"authorization property: {prober.sent} requests over {len(routes)} routes x {len(METHODS)} methods")
    assert not leaks, "\n".join(leaks[:20])
    assert protected_seen >= 10 * 6
    assert (workspaces / PROBE_SESSION / "run.log").read_bytes() == b"probe line\n"


def test_every_websocket_route_spelling_refuses_an_upgrade_without_the_token(probe_target, prober):
    _, _, routes = probe_target
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    websocket_routes = [route for route in routes if route.websocket is not None]
    assert len(websocket_routes) >= 3
    switched = []
    for route in websocket_routes:
        path = concrete(route)
        for spelled in itertools.chain([path], spellings(path)):
            status = prober.status("GET", spelled, upgrade)
            if status not in REFUSED | NOT_A_ROUTE:
                switched.append(f"GET {spelled} (upgrade) -> {status}")
    prober.close()
    assert not switched, "\n".join(switched[:20])


@st.composite
def mixed_spelling(draw, routes):
    """Any mix, per character, of raw, %XX, %xx and swapped case (case changes only break a route)."""
    route = draw(st.sampled_from(routes))
    method = draw(st.sampled_from(METHODS))
    out = []
    for ch in concrete(route):
        form = draw(st.sampled_from(("raw", "upper", "lower", "case"))) if ch != "/" else "raw"
        out.append({"raw": ch, "upper": "%%%02X" % ord(ch), "lower": "%%%02x" % ord(ch),
                    "case": ch.swapcase()}[form])
    return route, method, "".join(out)


def test_random_mixes_of_spellings_get_the_canonical_decision(probe_target, prober):
    _, _, routes = probe_target
    canonical_cache = {}

    @settings(max_examples=400, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(mixed_spelling(routes))
    def check(case):
        route, method, spelled = case
        key = (route.template, method)
        if key not in canonical_cache:
            canonical_cache[key] = prober.status(method, concrete(route))
        status = prober.status(method, spelled)
        if status not in NOT_A_ROUTE:
            assert (status in REFUSED) == (canonical_cache[key] in REFUSED), f"{method} {spelled} -> {status}"

    check()
    prober.close()


INTERNAL_TOKEN = "property-internal-token-7d2e"


def test_every_route_takes_the_tokens_its_scope_names(tmp_path_factory):
    """Scope.SESSION routes take UA_INTERNAL_API_TOKEN as well as UA_OPS_TOKEN; Scope.TOKEN (Ops) routes
    take only UA_OPS_TOKEN; with no token every protected route is 401. Enumerated from the router table,
    in every header Universal Agent's clients use."""
    from conftest import launch

    root = tmp_path_factory.mktemp("auth-scopes")
    workspaces = root / "workspaces"
    (workspaces / PROBE_SESSION).mkdir(parents=True)
    running = launch(workspaces, "--ws-echo", env={"UA_OPS_TOKEN": TOKEN, "UA_INTERNAL_API_TOKEN": INTERNAL_TOKEN})
    prober = Prober(running)
    wrong = []
    scopes_seen = set()
    try:
        for route in router_routes(root):
            if route.scope is Scope.PUBLIC:
                continue
            scopes_seen.add(route.scope)
            for method in sorted(set(route.handlers) - {"DELETE"}):  # a DELETE would remove the probe
                path = concrete(route)
                for headers in ({"Authorization": f"Bearer {INTERNAL_TOKEN}"}, {"X-UA-Internal-Token": INTERNAL_TOKEN},
                                {"X-UA-OPS-Token": INTERNAL_TOKEN}):
                    status = prober.status(method, path, headers)
                    if (status in REFUSED) != (route.scope is not Scope.SESSION):
                        wrong.append(f"{method} {path} {list(headers)} internal token -> {status} ({route.scope})")
                for headers in ({"Authorization": f"Bearer {TOKEN}"}, {"X-UA-Internal-Token": TOKEN}):
                    status = prober.status(method, path, headers)
                    if status in REFUSED:
                        wrong.append(f"{method} {path} {list(headers)} ops token -> {status}")
                if prober.status(method, path) != 401:
                    wrong.append(f"{method} {path} without a token is not 401")
    finally:
        prober.close()
        running.stop()
    assert scopes_seen == {Scope.SESSION, Scope.TOKEN}
    assert not wrong, "\n".join(wrong[:20])

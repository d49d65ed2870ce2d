"""Routing: the route table (``Route``, ``Router``, ``Scope``), what dispatching a request gives
(``Dispatched``: a ``Response``, an awaitable of one, or an ``Upgrade``), request helpers (path segments,
query parameters, JSON bodies, session ids), each failing with a clear 400, and the one table that turns
OpsService's exceptions into statuses (``OPS_ERROR_STATUS``).

May import: the standard library, ``ops_service``, ``uagw.limits``, ``uagw.text`` and ``uagw.http11``.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence, Tuple, Union
from urllib.parse import parse_qsl, unquote

import ops_service
from ops_service import InvalidArgument, OpsError, SessionNotFound, StorageFull, WorkspacesUnavailable

from .limits import MAX_INT_DIGITS, WS_CLOSE_TIMEOUT, WS_PING_INTERVAL, WS_PING_TIMEOUT
from .text import loads_json, show
from .http11 import HttpError, INT_RE, Request, Response, error_response

__all__ = [
    "BODY_METHODS",
    "Dispatched",
    "Handler",
    "OPS_ERROR_STATUS",
    "Permission",
    "READ_METHODS",
    "Route",
    "Router",
    "Scope",
    "Upgrade",
    "bool_param",
    "int_param",
    "json_object_body",
    "method_not_allowed",
    "ops_error_response",
    "path_segments",
    "query_params",
    "refuse_unread_body",
    "session_id_param",
]


def path_segments(path: str) -> List[str]:
    """Split a path and percent-decode each segment exactly once (PROTOCOL.md §3)."""
    return [unquote(segment, errors="surrogateescape") if "%" in segment else segment for segment in path.split("/")[1:]]


def query_params(request: Request) -> Dict[str, str]:
    if not request.query_string:
        return {}
    try:
        pairs = parse_qsl(request.query_string, keep_blank_values=True, errors="surrogateescape", max_num_fields=64)
    except ValueError:
        raise HttpError(400, "too many query parameters (at most 64)") from None
    params: Dict[str, str] = {}
    for name, value in pairs:
        if name in params:
            raise HttpError(400, f"query parameter {show(name)} is given more than once; give it once")
        params[name] = value
    return params


def int_param(params: Dict[str, str], name: str) -> Optional[int]:
    text = params.get(name)
    if text is None:
        return None
    if len(text) > MAX_INT_DIGITS + 1 or not INT_RE.fullmatch(text):
        raise HttpError(400, f"query parameter {name} must be an integer, not {show(text)}")
    return int(text)


_TRUE = frozenset(("true", "1", "yes", "on"))
_FALSE = frozenset(("false", "0", "no", "off"))


def bool_param(params: Dict[str, str], name: str) -> bool:
    text = params.get(name)
    if text is None:
        return False
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise HttpError(400, f"query parameter {name} must be true or false, not {show(text)}")


def json_object_body(request: Request, allowed: Sequence[str]) -> Dict[str, Any]:
    """The request's JSON object body (an empty body is ``{}``), keeping only the ``allowed`` keys."""
    if not request.body.strip():
        return {}
    try:
        value = loads_json(request.body)
    except ValueError as exc:
        raise HttpError(400, f"request body is not valid JSON ({show(str(exc), 120)}); send a JSON object") from None
    if not isinstance(value, dict):
        raise HttpError(400, f"request body must be a JSON object, not {type(value).__name__}")
    # Unknown fields are ignored, as UA's pydantic models ignore them; known ones are type-checked by the handler.
    return {key: item for key, item in value.items() if key in allowed}


def session_id_param(value: str) -> str:
    if not ops_service.is_valid_session_id(value):
        raise HttpError(
            400,
            f"invalid session id {show(value)}: use 1-128 characters of A-Z a-z 0-9 _ . - "
            "starting with a letter or digit",
        )
    return value


# OpsService raises named exceptions; this table is the one place that turns them into statuses.
OPS_ERROR_STATUS: Tuple[Tuple[type, int], ...] = (
    (InvalidArgument, 400),
    (SessionNotFound, 404),
    (StorageFull, 507),
    (WorkspacesUnavailable, 503),
)


def ops_error_response(error: OpsError) -> Response:
    for kind, status in OPS_ERROR_STATUS:
        if isinstance(error, kind):
            return error_response(HttpError(status, error.detail))
    return error_response(HttpError(500, error.detail))


Handler = Callable[[Request, Dict[str, str]], Union[Response, Awaitable[Response]]]


@dataclasses.dataclass(frozen=True)
class Upgrade:
    """An admitted WebSocket handshake, as dispatch answers it: the connection hands its socket over to
    a bridge that runs ``app`` (``on_open``, ``on_message``, ``on_close``; see ``uagw.websocket``)."""

    app: Any
    max_message: int  # bytes; a longer message is refused with close 1009
    headers: Tuple[Tuple[str, str], ...] = ()  # what any plain HTTP answer to the handshake carries (CORS)
    ping_interval: float = WS_PING_INTERVAL  # s; Config.ws_ping_interval
    ping_timeout: float = WS_PING_TIMEOUT  # s; Config.ws_ping_timeout
    close_timeout: float = WS_CLOSE_TIMEOUT  # s; Config.ws_close_timeout


# What dispatching one request gives: an answer now, one to come (disk work), or a protocol switch.
Dispatched = Union[Response, Awaitable[Response], Upgrade]


class Scope(str, enum.Enum):
    """What a route needs from its caller. A property of the route in the router table, read after
    matching: never guessed from the raw path, which has many spellings (PROTOCOL.md §4)."""

    PUBLIC = "public"  # anyone who can reach the port (health, the console's files, the OpenAPI document)
    TOKEN = "token"  # the token (UA_OPS_TOKEN), the address allowlist, the lockout and the cross-site refusal
    # As TOKEN, but UA_INTERNAL_API_TOKEN is accepted beside UA_OPS_TOKEN: the session API and the WebSockets
    SESSION = "session"


# Methods that only read: on a TOKEN route they need the read scope, every other method the write scope.
READ_METHODS = frozenset(("GET", "HEAD"))


class Permission(str, enum.Enum):
    """What one method of one route needs (``Route.permission``), PROTOCOL.md §11.1: the route's scope
    refined by the method, so the read/write split is stated once, in the router table."""

    PUBLIC = "public"  # anyone
    READ = "read"  # a GET or HEAD on a TOKEN route: UA_OPS_READ_TOKEN is enough
    WRITE = "write"  # any other method on a TOKEN route: UA_OPS_TOKEN (it changes state)
    SESSION = "session"  # a SESSION route (it runs turns): UA_OPS_TOKEN or UA_INTERNAL_API_TOKEN


class Route:
    """A path pattern with its handlers and the ``scope`` every method on it needs (OPTIONS excepted:
    a CORS preflight carries no credentials, and answers only which methods exist); ``permission``
    refines a TOKEN scope by method."""

    __slots__ = ("pattern", "handlers", "scope", "websocket")

    def __init__(
        self,
        pattern: str,
        handlers: Dict[str, Handler],
        *,
        scope: Scope,
        websocket: Optional[Callable[..., Any]] = None,
    ) -> None:
        self.pattern = tuple(pattern.split("/")[1:])
        self.handlers = handlers
        self.scope = scope
        self.websocket = websocket

    @property
    def template(self) -> str:
        return "/" + "/".join(self.pattern)

    def permission(self, method: str) -> Permission:
        """What ``method`` on this route needs: the one place the read/write split is decided."""
        if self.scope is Scope.PUBLIC:
            return Permission.PUBLIC
        if self.scope is Scope.SESSION:
            return Permission.SESSION
        return Permission.READ if method in READ_METHODS else Permission.WRITE

    def changes_state(self, method: str) -> bool:
        """True for a method of a protected route that may change something: every one is audited."""
        return self.scope is not Scope.PUBLIC and method not in READ_METHODS and method != "OPTIONS"

    @property
    def allow(self) -> str:
        methods = set(self.handlers) | ({"GET"} if self.websocket else set())
        return ", ".join(sorted(methods | {"OPTIONS"}))

    def match(self, segments: Sequence[str]) -> Optional[Dict[str, str]]:
        if len(segments) != len(self.pattern):
            return None
        params = {}
        for expected, actual in zip(self.pattern, segments):
            if expected.startswith("{"):
                params[expected[1:-1]] = actual
            elif expected != actual:
                return None
        return params


# Methods whose handlers read a request body; a body sent with any other is refused before it is read.
BODY_METHODS = frozenset(("POST", "PUT", "PATCH"))


def refuse_unread_body(request: Request, pending: bool) -> None:
    """A body on a method no handler reads (GET, HEAD, DELETE, OPTIONS) is a 400, whether it is still
    arriving (``pending``: refused before it is read) or came with the head: never silently ignored."""
    if request.method not in BODY_METHODS and (pending or request.body):
        raise HttpError(400, f"{request.method} takes no request body; send it without one")


def method_not_allowed(request: Request, route: Route) -> HttpError:
    return HttpError(405, f"method {request.method} is not allowed on {show(request.path)}; use {route.allow}",
                     headers=[("Allow", route.allow)])


class Router:
    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = list(routes)
        self._static = {route.pattern: route for route in routes if not any(p.startswith("{") for p in route.pattern)}
        self._dynamic = [route for route in routes if route.pattern not in self._static]

    def match(self, segments: Sequence[str]) -> Tuple[Optional[Route], Dict[str, str]]:
        route = self._static.get(tuple(segments))
        if route is not None:
            return route, {}
        for route in self._dynamic:
            params = route.match(segments)
            if params is not None:
                return route, params
        return None, {}

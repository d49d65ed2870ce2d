"""The application: the gateway's routes, the Ops API handlers, access checks, health and the session
hub (``Application``), which answers each request through one ``dispatch``; and ``Gateway``, the
application served by a ``uagw.server.Server``, with the lifecycle that ties them and the logs together.

May import: the standard library, websockets, ``ops_service`` and every ``uagw`` module except ``uagw.cli``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import math
import pkgutil
import sys
import time
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple, Union
from urllib.parse import parse_qsl

import ops_service
from ops_service import OpsError, OpsService, StorageFull, WorkspacesUnavailable

from . import __version__
from .limits import (
    AGENT_TURN_FDS, CORS_MAX_AGE, HTTP_FD_SHARE, MAX_AGENT_COMMANDS, OPS_THREADS, ROOT_CHECK_INTERVAL,
    SHUTDOWN_GRACE, WS_ECHO_MAX_MESSAGE, WS_MAX_MESSAGE,
)
from .text import show
from .config import Config, ConfigError, is_loopback_host
from .http11 import HttpError, Request, Response, StreamingResponse, error_response, json_response
from .access import AccessControl, Grant, offers_credential, request_tokens
from .audit import AuditTrail, warn_stderr
from .changes import ChangeKind, Changes
from .index import SessionIndex
from .compressor import ArchiveCompressor
from .logs import GatewayLog
from .metrics import EXPOSITION_CONTENT_TYPE, GatewayMetrics, render
from .logcache import OpenLogs, slice_response
from .routing import (
    Dispatched, Permission, Route, Router, Scope, Upgrade, bool_param, int_param, json_object_body, method_not_allowed,
    ops_error_response, path_segments, query_params, refuse_unread_body, session_id_param,
)
from .server import Phase, Server, descriptor_budget
from .sdnotify import Notifier
from .websocket import CloseCode, EchoApp, open_bridge, subprotocol_token
from .agents import command_agent, echo_agent, resolve_agent_command
from .sessions import AgentSocket, SessionHub
from .session_api import SessionApi
from .streams import EventStream, LogKey, LogWatchers, StreamSlots, Subscription, sse_event
from .events import SessionEvents
from .transcripts import last_seq_param
from .pruner import Pruner

__all__ = [
    "Application",
    "CONSOLE_ASSETS",
    "CONSOLE_HEADERS",
    "CORS_ALLOW_HEADERS",
    "Gateway",
    "SAME_ORIGIN_FETCH_SITES",
    "read_console_assets",
]


CONSOLE_ASSETS = {  # the console's files: package data in uagw/console/ (inside the .pyz and a wheel too)
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "openapi.json": "application/json",
}
CONSOLE_HEADERS = [
    # The console loads nothing from elsewhere; it talks to this gateway only (HTTP and WebSocket).
    ("Content-Security-Policy", "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
                                "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-cache"),
]


def read_console_assets() -> Dict[str, bytes]:
    """The console files that exist, read as this package's data: from the directory, the .pyz or a wheel."""
    assets = {}
    for name in CONSOLE_ASSETS:
        try:
            data = pkgutil.get_data(__package__ or "uagw", f"console/{name}")
        except OSError:
            continue
        if data is not None:
            assets[name] = data
    return assets


# The last event of every stream at gateway stop (PROTOCOL.md §13): the client reconnects to another run.
async def _awaited(answer: Callable[..., Union[Response, Awaitable[Response]]], *args: Any) -> Response:
    """``answer(*args)`` as an awaitable: a follow opens with the answer a plain call gives, now or later."""
    result = answer(*args)
    return result if isinstance(result, Response) else await result


_GATEWAY_STOPPING = sse_event("end", {"reason": "the gateway is stopping; reconnect with Last-Event-ID"})

CORS_ALLOW_HEADERS = "Authorization, Content-Type, X-UA-OPS-Token, X-UA-Internal-Token, X-UA-User, Last-Event-ID"
# Sec-Fetch-Site values of a request made by the gateway's own pages, or typed by the user (Fetch Metadata).
SAME_ORIGIN_FETCH_SITES = frozenset(("same-origin", "none"))


# The session changes that concern followers of its logs (Application._followed_session_changed).
_FOLLOWERS_CARE = frozenset((ChangeKind.DELETED, ChangeKind.RESET, ChangeKind.ARCHIVED, ChangeKind.COMPACTED))


class Application:
    """Answers requests; knows routes, access, handlers and sessions, and nothing of sockets.

    ``await open()`` before the first request, ``await close()`` after the last. ``agent`` (for
    embedding) is an async callable that runs one turn; see "Agents" below.
    """

    def __init__(self, config: Config, *, agent: Optional[Callable[..., Awaitable[Any]]] = None) -> None:
        self.config = config
        self.ops = OpsService(config.workspaces)
        self.access = AccessControl(config)
        self.agent = agent
        self.executor = concurrent.futures.ThreadPoolExecutor(OPS_THREADS, thread_name_prefix="ua-ops")
        self.open_logs = OpenLogs(self.ops, self.executor)
        self.started_at = time.monotonic()
        self.root_problem: Optional[str] = None
        self.log: Optional[GatewayLog] = None
        self.fd_budget: Optional[int] = None  # connections the open-file limit leaves room for, if it has one
        self._tasks: List[asyncio.Task] = []
        self.hub: Optional[SessionHub] = None
        self.changes = Changes()  # what the gateway changes in sessions, for the views that keep state about them
        # Lists answer from memory (issue 15); None: each list scans the root (Config.session_index off).
        self.index: Optional[SessionIndex] = SessionIndex(
            self.ops, rescan_interval=config.index_rescan_interval, scan_pause=config.index_scan_pause,
        ) if config.session_index else None
        self.pruner = Pruner(self)  # retention: the background pruner and the prune routes (PROTOCOL.md §15)
        self.compressor: Optional[ArchiveCompressor] = None  # gzips archived logs on its own thread (PROTOCOL.md §16)
        self.changes.subscribe(self.open_logs.on_change)
        self.assets: Dict[str, bytes] = {}
        self.log_watchers: Optional[LogWatchers] = None  # the followed logs (PROTOCOL.md §13), from open()
        self.session_events: Optional[SessionEvents] = None  # GET /api/v1/ops/events, from open()
        self.stream_slots = StreamSlots()
        self.session_api = SessionApi(self)  # Universal Agent's /api/v1/sessions
        self.router = Router(self._routes())
        self.audit = AuditTrail(self.ops, self.run_ops, (config.token, config.internal_token, config.read_token),
                                self._audit_warning)
        self.changes.subscribe(self.audit.observe)  # sessions the WebSocket lobby creates (PROTOCOL.md §11.2)
        self.metrics = GatewayMetrics(self.router.routes)  # GET /metrics (PROTOCOL.md §14)
        self.changes.subscribe(self.metrics.on_change)

    # -- lifecycle -----------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Check the exposure, open the workspaces root, the console files, the log and the session hub.
        Raises ConfigError."""
        loop = asyncio.get_running_loop()
        self.config.check_exposure()
        try:
            await loop.run_in_executor(self.executor, self.ops.ensure_root)
        except OSError as exc:
            raise ConfigError(f"cannot create or open the workspaces root {self.ops.root}: {exc.strerror or exc}; "
                              "create it, fix its permissions, or point UA_WORKSPACES_DIR / --workspaces elsewhere") from None
        self.assets = await loop.run_in_executor(self.executor, read_console_assets)
        self.log = GatewayLog(self.ops, self.config.log_rotate_bytes)
        self.fd_budget = descriptor_budget()
        if self.agent is not None:
            agent = self.agent
        elif self.config.agent_cmd:
            agent = command_agent(resolve_agent_command(self.config.agent_cmd))
        else:
            agent = echo_agent
        self.hub = SessionHub(self, agent)
        if self.index is not None:
            self.index.start(loop, self.executor, self.changes)  # scans in a thread: health answers at once
        self.log_watchers = LogWatchers(self.ops, self.run_ops, self.audit.backups)
        self.hub.writer.appended = self.log_watchers.on_append  # the gateway's own lines, from memory
        self.session_events = SessionEvents(self.changes)
        self.changes.subscribe(self._followed_session_changed)
        self.compressor = ArchiveCompressor(self.ops, self.config.archive_compress_delay)
        self.changes.subscribe(self._archives_changed)
        self.compressor.start()

    def watch_root(self) -> None:
        """Check the workspaces root every ROOT_CHECK_INTERVAL s from now on (health reports it)."""
        self._tasks.append(asyncio.get_running_loop().create_task(self._watch_root()))
        if self.config.retention_enabled:
            self._tasks.append(asyncio.get_running_loop().create_task(self.pruner.run_forever()))

    async def close(self) -> None:
        """Stop the background work, write the stop record and close the log; the hub is shut down before."""
        for task in self._tasks:
            task.cancel()
        if self.index is not None:
            self.index.close()
        await self.audit.drain()
        if self.compressor is not None:
            self.compressor.stop()
        if self.log is not None:
            self.log.write("stop", uptime_s=round(time.monotonic() - self.started_at, 3))
            self.log.close()
        self.open_logs.close()
        self.executor.shutdown(wait=False)

    def descriptors_reserved(self) -> int:
        """The open-file budget's descriptors connections may not take: AGENT_TURN_FDS per running agent command."""
        agents = AGENT_TURN_FDS * len(self.hub.agent_groups) if self.hub is not None else 0
        return agents + self.open_logs.descriptors()

    def agent_command_limit(self) -> int:
        """How many agent commands may run at once: MAX_AGENT_COMMANDS, and no more than leave a share
        of the descriptor budget (1/HTTP_FD_SHARE) to connections."""
        if self.fd_budget is None:
            return MAX_AGENT_COMMANDS
        return min(MAX_AGENT_COMMANDS, (self.fd_budget - self.fd_budget // HTTP_FD_SHARE) // AGENT_TURN_FDS)

    async def _watch_root(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                await loop.run_in_executor(self.executor, functools.partial(self.ops.check_root, writable=True))
                await loop.run_in_executor(self.executor, self.ops.check_space)  # a full volume is not writable
                problem = None
            except (WorkspacesUnavailable, StorageFull) as exc:
                problem = exc.detail
            if problem != self.root_problem:
                # Named in full here and to an authorized health call; a public one gets it without the path.
                if problem is not None:
                    print(f"ua-gateway: warning: {problem}", file=sys.stderr, flush=True)
                if self.log is not None:
                    self.log.write("root_problem" if problem else "root_recovered", detail=problem)
            self.root_problem = problem
            await asyncio.sleep(ROOT_CHECK_INTERVAL)

    async def run_ops(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run an OpsService call in a worker thread: disk work never blocks the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(function, *args, **kwargs))

    # -- dispatch ------------------------------------------------------------------------------------------

    def dispatch(self, request: Request) -> Dispatched:
        """Answer one complete request: a response now, an awaitable for work that touches the disk (it
        never raises: errors are answered too), or an ``Upgrade`` for an admitted WebSocket handshake."""
        route, params = self.router.match(path_segments(request.path))
        websocket = request.upgrade and route is not None and route.websocket is not None
        try:
            route, grant = self.admit(request, route, subprotocol_token(request) if websocket else None)
            if websocket:
                upgrade = self._upgrade(request, route, params)  # a bad id is the WebSocket's to refuse (4000)
                self.metrics.request_done(route, request.method, 101, request.started)
                return upgrade
            session_id = params.get("session_id")
            if session_id is not None:
                session_id_param(session_id)
            if request.method == "OPTIONS":
                return self._options(request, route)
            handler = route.handlers.get(request.method)
            if handler is None:
                raise method_not_allowed(request, route)
            refuse_unread_body(request, pending=False)
            if route.changes_state(request.method):  # every change is audited here, whatever its route
                return self._audited(request, route, params, grant, handler)
            result = handler(request, params)
        except Exception as error:
            return self._counted(request, route, self._failure(request, error, close=websocket))
        if isinstance(result, Response):
            return self._counted(request, route, self._answer(request, result))
        return self._settle(request, result, route)

    async def _audited(self, request: Request, route: Route, params: Dict[str, str], grant: Optional[Grant],
                       handler: Callable[..., Any]) -> Response:
        """Answer a call that may change state once its audit record is on disk (PROTOCOL.md §11.2)."""
        started = time.monotonic()

        async def call() -> Response:
            try:
                result = handler(request, params)
                response = result if isinstance(result, Response) else await result
            except Exception as error:
                return self._failure(request, error)
            return self._answer(request, response)

        scope = grant.value if grant is not None else "none"
        response = await self.audit.audited(call, lambda response: self.audit.http_record(
            request, route, params, scope, response, time.monotonic() - started))
        return self._counted(request, route, response)

    def audit_websocket_cancel(self, session_id: str, client: str, reason: str) -> None:
        """A turn cancelled by a WebSocket message gets its audit record (PROTOCOL.md §11.2)."""
        self.audit.websocket_cancel(session_id, client, reason)

    def _audit_warning(self, message: str) -> None:
        warn_stderr(message)
        if self.log is not None:
            self.log.write("audit_failed", detail=message[:500])

    async def _settle(self, request: Request, pending: Awaitable[Response], route: Optional[Route] = None) -> Response:
        try:
            response = await pending
        except Exception as error:
            return self._counted(request, route, self._failure(request, error))
        return self._counted(request, route, self._answer(request, response))

    def _counted(self, request: Request, route: Optional[Route], response: Response) -> Response:
        """``response``, counted in GET /metrics by its route's template (None: no route matched)."""
        self.metrics.request_done(route, request.method, response.status, request.started)
        return response

    def _answer(self, request: Request, response: Response) -> Response:
        """Every answer to a request goes out through here: with its CORS grants (a preflight has its own)."""
        if request.method != "OPTIONS":
            response.headers.extend(self.access.cors_headers(request))
        return response

    def _failure(self, request: Request, error: Exception, close: bool = False) -> Response:
        """The one place an exception becomes an answer: an HttpError its own, an OpsError the status of
        OPS_ERROR_STATUS, anything else (a bug of ours) a 500, logged; ``close`` ends the connection after."""
        if isinstance(error, HttpError):
            response = error_response(error)
        elif isinstance(error, OpsError):
            response = ops_error_response(error)
        else:
            response = self.internal_error(request, error)
        if close:
            response.close = True
        return self._answer(request, response)

    def admit(self, request: Request, route: Optional[Route],
              extra_token: Optional[str] = None) -> Tuple[Route, Optional[Grant]]:
        """The one place that decides whether a request may reach its matched ``route`` (None: no route),
        for HTTP and upgrades alike.

        The route is matched on the decoded path segments first; what it needs is then read from the
        route itself (``Route.permission`` of the method), so every spelling of a path that reaches a route
        gets that route's decision. Returns the route and what the token granted (None: a public route or a
        preflight). Raises HttpError: 421 for a Host not served, 404 for no route, the refusals of
        ``authorize``.
        """
        if self.config.allowed_hosts:
            self._check_host(request)
        if route is None:
            raise HttpError(404, f"no endpoint at {show(request.path)}; the API is described at /api/v1/openapi.json")
        permission = route.permission(request.method)
        if permission is not Permission.PUBLIC and request.method != "OPTIONS":
            grant = self.authorize(request, "WebSocket" if request.upgrade else "request", extra_token,
                                   permission=permission)
            return route, grant
        return route, None

    def refuse_before_body(self, request: Request) -> Optional[Response]:
        """The answer to a request whose body has not arrived yet, when ``admit`` refuses it; else None.

        The refusal closes the connection: the unread body is discarded, never parsed as requests."""
        route, _ = self.router.match(path_segments(request.path))
        try:
            route, _ = self.admit(request, route, subprotocol_token(request) if request.upgrade else None)
            if request.method not in route.handlers and request.method != "OPTIONS":
                raise method_not_allowed(request, route)
            refuse_unread_body(request, pending=True)
        except HttpError as error:
            return self._counted(request, route, self._failure(request, error, close=True))
        return None

    def internal_error(self, request: Request, error: BaseException) -> Response:
        if self.log is not None:
            self.log.write("internal_error", path=request.path[:512], error=repr(error)[:500])
        return error_response(HttpError(500, "internal error; the gateway log has the details"))

    def authorize(self, request: Request, what: str, extra_token: Optional[str] = None,
                  permission: Permission = Permission.READ) -> Grant:
        """PROTOCOL.md §4 for a protected request (``what`` names it in errors): a cross-site browser request is
        refused first, then the address allowlist, the lockout, and the token (or ``extra_token``, the
        one a browser offers as a WebSocket subprotocol), judged against ``permission`` (PROTOCOL.md §11.1): SESSION
        takes UA_INTERNAL_API_TOKEN as well as UA_OPS_TOKEN, READ takes UA_OPS_READ_TOKEN too. Returns
        what the token granted. Raises HttpError on refusal: 401 for no usable token (counted toward the
        lockout only when a credential was offered: none guesses nothing), 403 for the read token where a
        change needs the full one."""
        try:
            self._refuse_cross_site(request, what)
        except HttpError:
            self.metrics.refuse("403", "cross_site")
            raise
        address = request.client
        if not self.access.address_allowed(address):
            self.metrics.refuse("403", "address")
            raise HttpError(403, f"client address {address} is not allowed by UA_OPS_ALLOW_FROM")
        remaining = self.access.lockout_remaining(address)
        if remaining:
            seconds = int(remaining) + 1
            self.metrics.refuse("429", "lockout")
            raise HttpError(
                429,
                f"too many failed authentications from {address}; try again in {seconds} s with the right token",
                headers=[("Retry-After", str(seconds))],
            )
        grant = self.access.grant(request_tokens(request) + [extra_token])
        if grant is Grant.INTERNAL and permission is not Permission.SESSION and self.config.token is not None:
            grant = None  # the Ops routes take UA_INTERNAL_API_TOKEN only when it is the only full token (§4.2)
        if grant is None:
            locked = offers_credential(request, extra_token) and self.access.record_failure(address)
            self.metrics.refuse("401", "token")
            if locked:
                self.metrics.lockouts.inc()
            if self.log is not None:
                self.log.write("auth_failure", client=address, path=request.path, lockout=locked)
            raise HttpError(401, "Unauthorized", headers=[("WWW-Authenticate", 'Bearer realm="ua-gateway"')])
        if grant is Grant.READ and permission is not Permission.READ:
            raise HttpError(403, self._read_only_refusal(request, permission))
        return grant

    @staticmethod
    def _read_only_refusal(request: Request, permission: Permission) -> str:
        if permission is Permission.SESSION:
            return ("this endpoint runs agent sessions and needs UA_OPS_TOKEN (or UA_INTERNAL_API_TOKEN); the token "
                    "given is the read-only UA_OPS_READ_TOKEN")
        return (f"this call ({request.method}) changes state and needs UA_OPS_TOKEN; the token given is the "
                "read-only UA_OPS_READ_TOKEN, which allows only GET and HEAD on the Ops API")

    def _check_host(self, request: Request) -> None:
        host = (request.header("host") or "").lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.strip("[]")
        if not (is_loopback_host(name) or name in self.config.allowed_hosts or host in self.config.allowed_hosts):
            self.metrics.refuse("421", "host")
            raise HttpError(421, f"Host {show(host)} is not served here; list it in UA_ALLOWED_HOSTS")

    def _options(self, request: Request, route: Route) -> Response:
        headers = [("Allow", route.allow)]
        cors = self.access.cors_headers(request)
        if cors:
            headers += cors + [
                ("Access-Control-Allow-Methods", route.allow),
                ("Access-Control-Allow-Headers", CORS_ALLOW_HEADERS),
                ("Access-Control-Max-Age", str(CORS_MAX_AGE)),
            ]
        return Response(204, headers=headers)

    async def _ops_response(self, http_status: int, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Response:
        return json_response(http_status, await self.run_ops(function, *args, **kwargs))

    def runtime(self) -> Dict[str, Tuple[int, bool, int]]:
        """{session_id: (active_connections, running, last_event_seq)} for sessions with live connections or turns."""
        return self.hub.snapshot() if self.hub is not None else {}

    # -- WebSocket upgrades --------------------------------------------------------------------------------

    def _upgrade(self, request: Request, route: Route, params: Dict[str, str]) -> Upgrade:
        """An admitted handshake on a WebSocket route: the app that will run on it."""
        assert route.websocket is not None, "only WebSocket routes are upgraded"
        app = route.websocket(request, params)
        if self.log is not None:
            self.log.write("websocket", client=request.client, path=request.path[:512])
        return Upgrade(app, max_message=WS_ECHO_MAX_MESSAGE if isinstance(app, EchoApp) else WS_MAX_MESSAGE,
                       headers=tuple(self.access.cors_headers(request)),
                       ping_interval=self.config.ws_ping_interval, ping_timeout=self.config.ws_ping_timeout,
                       close_timeout=self.config.ws_close_timeout)

    def _refuse_cross_site(self, request: Request, what: str) -> None:
        """A browser request that is not same-origin (CSRF, cross-site WebSocket hijacking, a page on a
        sibling subdomain) → 403, unless its Origin is the gateway's own or listed in UA_CORS_ORIGINS.

        Browsers send Origin on every WebSocket and on cross-origin requests that change state, and
        Sec-Fetch-Site on every request (an <img> or a form post included); other clients send neither.
        ``same-site`` is refused too: a page on another port or subdomain of the same site is another
        origin. Checked before the token, so that a web page cannot lock the operator's own address out
        by failing authentications on its behalf.
        """
        origin = request.header("origin")
        if origin is not None and self.access.cors_headers(request):
            return
        fetch_site = (request.header("sec-fetch-site") or "").lower()
        if fetch_site and fetch_site not in SAME_ORIGIN_FETCH_SITES:
            if origin:
                raise HttpError(403, f"{what} from Origin {show(origin)} refused (Sec-Fetch-Site: {show(fetch_site)}); "
                                     "list that origin in UA_CORS_ORIGINS to serve a dashboard there")
            raise HttpError(403, f"{what} from another origin refused (Sec-Fetch-Site: {show(fetch_site)}); "
                                 "it sent no Origin to check")
        if origin is None:
            return
        own = (request.header("host") or "").lower()
        scheme, _, origin_host = origin.lower().partition("://")
        if origin_host.rstrip("/") != own:
            raise HttpError(403, f"{what} from Origin {show(origin)} refused; list that origin in UA_CORS_ORIGINS "
                                 "to serve a dashboard there")

    def _agent_socket(self, request: Request, params: Dict[str, str]) -> "AgentSocket":
        query = dict(parse_qsl(request.query_string, keep_blank_values=True))
        session_id = params.get("session_id", query.get("session_id"))
        return AgentSocket(self, session_id, user_id=request.header("x-ua-user") or query.get("user_id"),
                           last_seq=last_seq_param(query.get("last_seq"), session_id))

    def _websocket_only(self, request: Request, params: Dict[str, str]) -> Response:
        query = dict(parse_qsl(request.query_string, keep_blank_values=True))
        last_seq_param(query.get("last_seq"), params.get("session_id", query.get("session_id")))  # 400 before 426
        raise HttpError(426, "this endpoint is a WebSocket; connect with a WebSocket client",
                        headers=[("Upgrade", "websocket")])

    def _routes(self) -> List[Route]:
        public, token, session = Scope.PUBLIC, Scope.TOKEN, Scope.SESSION
        return [
            Route("/", {"GET": self.console_page}, scope=public),
            Route("/console/{asset}", {"GET": self.console_asset}, scope=public),
            Route("/api/v1/openapi.json", {"GET": self.openapi}, scope=public),
            Route("/api/v1/health", {"GET": self.health}, scope=public),
            Route("/api/v1/ops/sessions", {"GET": self.list_sessions}, scope=token),
            Route("/api/v1/ops/sessions/{session_id}", {"GET": self.session_details, "DELETE": self.delete_session,
                                                        "PATCH": self.update_session}, scope=token),
            Route("/api/v1/ops/sessions/cancel", {"POST": self.cancel_sessions}, scope=token),
            Route("/api/v1/ops/sessions/purge-stale", {"POST": self.pruner.purge_stale_route}, scope=token),
            Route("/api/v1/ops/sessions/bulk-delete", {"POST": self.pruner.bulk_delete_route}, scope=token),
            Route("/api/v1/ops/prune", {"POST": self.pruner.prune_route}, scope=token),
            Route("/api/v1/ops/sessions/{session_id}/cancel", {"POST": self.cancel_session}, scope=token),
            Route("/api/v1/ops/sessions/{session_id}/archive", {"POST": self.archive_session}, scope=token),
            Route("/api/v1/ops/sessions/{session_id}/preview", {"GET": self.preview}, scope=token),
            Route("/api/v1/ops/sessions/{session_id}/reset", {"POST": self.reset_session}, scope=token),
            Route("/api/v1/ops/sessions/{session_id}/compact", {"POST": self.compact_session}, scope=token),
            Route("/api/v1/ops/sessions/{session_id}/turns", {"GET": self.list_turns}, scope=token),
            Route("/api/v1/ops/sessions/{session_id}/turns/{turn_id}", {"GET": self.read_turn}, scope=token),
            Route("/api/v1/ops/logs/tail", {"GET": self.logs_tail}, scope=token),
            Route("/api/v1/ops/audit", {"GET": self.audit_log}, scope=token),
            Route("/api/v1/ops/events", {"GET": self.events_stream}, scope=token),
            Route("/metrics", {"GET": self.metrics_page}, scope=token),
            Route("/api/v1/ops/sessions/{session_id}/archives", {"GET": self.list_archives}, scope=token),
            Route("/api/v1/ops/sessions/{session_id}/archives/{stamp}/{file}", {"GET": self.archive_log}, scope=token),
            Route("/api/v1/sessions", {"POST": self.session_api.create, "GET": self.session_api.list_sessions}, scope=session),
            Route("/api/v1/sessions/{session_id}", {"GET": self.session_api.resume, "DELETE": self.session_api.forget},
                  scope=session),
            Route("/api/v1/sessions/{session_id}/stream", {"GET": self._websocket_only}, scope=session,
                  websocket=self._agent_socket),
            Route("/ws/agent", {"GET": self._websocket_only}, scope=session, websocket=self._agent_socket),
        ] + ([Route("/ws/echo", {"GET": self._websocket_only}, scope=session, websocket=lambda r, p: EchoApp())]
             if self.config.ws_echo else [])

    # -- handlers ------------------------------------------------------------------------------------------

    def console_page(self, request: Request, params: Dict[str, str]) -> Response:
        return self._asset("index.html")

    def console_asset(self, request: Request, params: Dict[str, str]) -> Response:
        return self._asset(params["asset"])

    def openapi(self, request: Request, params: Dict[str, str]) -> Response:
        return self._asset("openapi.json")

    def _asset(self, name: str) -> Response:
        body = self.assets.get(name)
        if body is None:
            raise HttpError(404, f"no console file {show(name)} in this build")
        return Response(200, body, content_type=CONSOLE_ASSETS[name], headers=list(CONSOLE_HEADERS))

    def health(self, request: Request, params: Dict[str, str]) -> Response:
        uptime = round(time.monotonic() - self.started_at, 3)
        log_dropped = self.log.dropped if self.log is not None else 0  # records lost to a failing disk or a full queue
        counters = {"log_dropped": log_dropped,  # kept for monitors that read it; the same as dropped.gateway_log
                    "dropped": {"gateway_log": log_dropped,
                                "session_writes": self.hub.writer.dropped if self.hub is not None else 0},
                    "logs_relinked": self.ops.linked_logs_moved}
        problem = self.root_problem or (self.log.problem if self.log is not None else None)
        if problem:
            if not self._may_see_paths(request):
                problem = problem.replace(str(self.ops.root), "<workspaces root>") + (
                    " (the path is on the gateway's stderr, and in the answer to a health call with the token)")
            return json_response(503, {"status": "degraded", "detail": problem, "version": __version__, "uptime_s": uptime,
                                       **counters})
        if self._may_see_paths(request):
            counters.update(self.pruner.health_fields())  # disk use against the budget: authorized callers only
        return json_response(200, {"status": "ok", "version": __version__, "uptime_s": uptime, **counters})

    def _may_see_paths(self, request: Request) -> bool:
        """True if ``request`` passes the checks of a token route (``authorize``: cross-site refusal, allowlist,
        lockout, token), so health may name file-system paths to it. A caller that offers no token when one
        is configured is simply public: that is not a failed authentication, and monitors poll health so."""
        if self.access.token_digest is not None and not any(request_tokens(request)):
            return False
        try:
            self.authorize(request, "request")
        except HttpError:
            return False
        return True

    async def metrics_page(self, request: Request, params: Dict[str, str]) -> Response:
        """PROTOCOL.md §14: the metrics in Prometheus' text format; what reads the disk runs in a worker thread."""
        hub = self.hub
        writers: Dict[str, Any] = {"gateway": self.log} if self.log is not None else {}
        if hub is not None:
            writers["session"] = hub.writer
        families = self.metrics.loop_families(connections=self.open_connections(), writers=writers,
                                              agent_processes=len(hub.agent_groups) if hub is not None else 0,
                                              version=__version__)
        index = self.index
        # Counted from the index once its first scan is complete (no directory scans); until then by scanning.
        counter = index.count_by_status if index is not None and index.complete.is_set() else None
        families += await self.run_ops(self.metrics.disk_families, self.ops, self.runtime(), counter)
        return Response(200, render(families).encode(), content_type=EXPOSITION_CONTENT_TYPE)

    def open_connections(self) -> Tuple[int, int]:
        """(HTTP, WebSocket) connections open now; an application without a server has none."""
        return 0, 0

    def list_sessions(self, request: Request, params: Dict[str, str]) -> Awaitable[Response]:
        query = query_params(request)
        return self._list_response(
            status=query.get("status", "all"),
            limit=int_param(query, "limit"),
            offset=int_param(query, "offset"),
            source=query.get("source"),
            owner=query.get("owner"),
            memory_mode=query.get("memory_mode"),
            sort=query.get("sort") or None,
        )

    async def _list_response(self, **query: Any) -> Response:
        return json_response(200, await self.list_page(**query))

    async def list_page(self, **query: Any) -> Dict[str, Any]:
        """A page of summaries (PROTOCOL.md §17): from the session index, or scanned when it is off."""
        index = self.index
        if index is None or query.get("sort") == "disk_bytes":  # disk use is measured per call (PROTOCOL.md §16.4)
            return {**await self.run_ops(self.ops.list_sessions, runtime=self.runtime(), **query), "partial": False}
        await index.settle()  # the gateway's own changes announced so far are in the answer
        return await self.run_ops(index.list_sessions, runtime=self.runtime(), **query)

    def session_details(self, request: Request, params: Dict[str, str]) -> Awaitable[Response]:
        return self.pruner.session_details(params["session_id"])  # the details, with disk use against the budget

    def preview(self, request: Request, params: Dict[str, str]) -> Union[Response, Awaitable[Response]]:
        query = query_params(request)
        if bool_param(query, "follow"):
            return self._follow(request, query, (params["session_id"], "activity_journal.log"),
                                functools.partial(_awaited, self._preview, params, query))
        return self._preview(params, query)

    def _preview(self, params: Dict[str, str], query: Dict[str, str]) -> Union[Response, Awaitable[Response]]:
        # UA's preview names its session
        return self._read_log(params["session_id"], "activity_journal.log", {"session_id": params["session_id"]},
                              cursor=query.get("cursor"), limit=int_param(query, "limit"),
                              max_bytes=int_param(query, "max_bytes"))

    # -- streams (PROTOCOL.md §13) ---------------------------------------------------------------------------

    def _follow(self, request: Request, query: Dict[str, str], key: LogKey,
                plain: Callable[[], Awaitable[Response]]) -> Awaitable[Response]:
        """``?follow=true``: the answer ``plain`` gives, as a first ``slice`` event, then the new lines as
        they come; with ``Last-Event-ID`` (or ``cursor=``) only the lines after that cursor."""
        cursor = request.header("last-event-id") or query.get("cursor") or None
        self.stream_slots.take(request.client)  # 429/503 before any disk work
        return self._open_follow(request, key, cursor, plain)

    async def _open_follow(self, request: Request, key: LogKey, cursor: Optional[str],
                           plain: Callable[[], Awaitable[Response]]) -> Response:
        assert self.log_watchers is not None, "opened"
        try:
            first = None
            if cursor is None:
                answer = await plain()
                if answer.status != 200:
                    self.stream_slots.give_back(request.client)
                    return answer
                first_slice = json.loads(answer.body)  # parsed once: the slice can be a few hundred KiB
                cursor = first_slice["cursor"]
                first = sse_event("slice", first_slice, cursor)
            else:
                ops_service.decode_cursor(cursor)  # InvalidCursor: 400, before the stream starts
                if key[0] is not None:
                    await self.run_ops(self.ops.require_session, key[0])
            watcher = self.log_watchers.watch(key)
            sub = Subscription(cursor)
            watcher.add(sub)
        except BaseException:
            self.stream_slots.give_back(request.client)
            raise

        def closed() -> None:
            watcher.remove(sub)
            self.stream_slots.give_back(request.client)

        source = EventStream(sub, watcher.catch_up, self.config.stream_keepalive, closed, first)
        return StreamingResponse(200, source, functools.partial(sub.end, _GATEWAY_STOPPING))

    async def events_stream(self, request: Request, params: Dict[str, str]) -> Response:
        """GET /api/v1/ops/events: the session changes as SSE, resumable with Last-Event-ID (PROTOCOL.md §13.3)."""
        events = self.session_events
        assert events is not None, "opened"
        last = request.header("last-event-id") or query_params(request).get("last_event_id") or None
        self.stream_slots.take(request.client)
        sub = events.subscribe(last)

        def closed() -> None:
            events.remove(sub)
            self.stream_slots.give_back(request.client)

        source = EventStream(sub, events.catch_up, self.config.stream_keepalive, closed)
        return StreamingResponse(200, source, functools.partial(sub.end, _GATEWAY_STOPPING))

    def _followed_session_changed(self, kind: ChangeKind, session_id: str, fields: Dict[str, Any]) -> None:
        """A deleted session ends its followers' streams; a reset, archive or compaction is read at once."""
        if kind not in _FOLLOWERS_CARE:
            return  # a turn or a connection (two changes a turn): no scan of the watchers for it
        watchers = self.log_watchers.of_session(session_id) if self.log_watchers is not None else []
        for watcher in watchers:
            if kind is ChangeKind.DELETED:
                watcher.end(sse_event("end", {"reason": "the session was deleted"}))
            elif kind in (ChangeKind.RESET, ChangeKind.ARCHIVED, ChangeKind.COMPACTED):
                asyncio.get_running_loop().create_task(watcher.refresh())
    async def list_turns(self, request: Request, params: Dict[str, str]) -> Response:
        """PROTOCOL.md §12: the session's turns, newest first; the running one says so."""
        query = query_params(request)
        session_id = params["session_id"]
        running = None
        if self.hub is not None:
            await self.hub.writer.flushed(session_id)  # a turn that just ended is read with its query_complete
            live = self.hub.sessions.get(session_id)
            running = live.turn.turn_id if live is not None and live.turn is not None else None
        return await self._ops_response(200, self.ops.list_turns, session_id, limit=int_param(query, "limit"),
                                        offset=int_param(query, "offset"), running_turn_id=running)

    async def read_turn(self, request: Request, params: Dict[str, str]) -> Response:
        """PROTOCOL.md §12: one turn's transcript, paged like a log slice."""
        query = query_params(request)
        if self.hub is not None:
            await self.hub.writer.flushed(params["session_id"])
        return await self._ops_response(200, self.ops.read_turn, params["session_id"], params["turn_id"],
                                        cursor=query.get("cursor"), limit=int_param(query, "limit"),
                                        max_bytes=int_param(query, "max_bytes"))


    def _read_log(self, session_id: str, file_name: str, extra: Dict[str, Any], cursor: Optional[str],
                  limit: Optional[int], max_bytes: Optional[int]) -> Union[Response, Awaitable[Response]]:
        """A session log's slice (``extra`` first in the answer): on the event loop when the log is kept open
        and cached (uagw.logcache), else from a worker, which keeps the log open for the next read."""
        result = self.open_logs.read_now(session_id, file_name, cursor, limit, max_bytes)
        if result is not None:
            return slice_response(extra, result)
        return self._read_log_in_worker(session_id, file_name, extra, cursor, limit, max_bytes)

    async def _read_log_in_worker(self, session_id: str, file_name: str, extra: Dict[str, Any], cursor: Optional[str],
                                  limit: Optional[int], max_bytes: Optional[int]) -> Response:
        result, opened = await self.run_ops(self.open_logs.read_and_open, session_id, file_name, cursor, limit,
                                            max_bytes)
        self.open_logs.keep(session_id, file_name, opened)
        return json_response(200, {**extra, **result})

    def logs_tail(self, request: Request, params: Dict[str, str]) -> Union[Response, Awaitable[Response]]:
        query = query_params(request)
        if bool_param(query, "follow"):
            plain_query = {name: value for name, value in query.items() if name not in ("follow", "cursor")}
            session_id, file_name = self._tail_target(plain_query)
            plain = functools.partial(_awaited, self._logs_tail, plain_query)
            return self._follow(request, query, (session_id, file_name), plain)
        return self._logs_tail(query)

    def _tail_target(self, query: Dict[str, str]) -> Tuple[Optional[str], str]:
        """(session id or None, file name) that a logs/tail call reads; HttpError 400 for a bad one."""
        session_id = query.get("session_id")
        file_name = query.get("file") or None
        if session_id is None and query.get("path") is not None:
            session_id, file_name = self._log_path(query["path"])
        if session_id is None:
            if file_name not in (None, ops_service.GATEWAY_LOG_NAME):
                raise HttpError(400, f"file {show(file_name)} needs session_id; without it the gateway's own log is read")
            return None, ops_service.GATEWAY_LOG_NAME
        session_id_param(session_id)
        file_name = file_name or "run.log"
        if file_name not in ops_service.LOG_FILES:
            raise HttpError(400, f"file must be one of {', '.join(ops_service.LOG_FILES)}, not {show(file_name)}")
        return session_id, file_name

    def _logs_tail(self, query: Dict[str, str]) -> Union[Response, Awaitable[Response]]:
        session_id, file_name = self._tail_target(query)
        cursor, limit, max_bytes = query.get("cursor"), int_param(query, "limit"), int_param(query, "max_bytes")
        if session_id is None:
            return self._ops_response(200, self.ops.read_gateway_log, cursor=cursor, limit=limit, max_bytes=max_bytes)
        return self._read_log(session_id, file_name, {}, cursor, limit, max_bytes)

    def audit_log(self, request: Request, params: Dict[str, str]) -> Awaitable[Response]:
        """A log slice of the audit trail, across its rotations (PROTOCOL.md §11.2)."""
        query = query_params(request)
        if bool_param(query, "follow"):  # PROTOCOL.md §13.2: followed like a log, across its rotations
            plain_query = {name: value for name, value in query.items() if name not in ("follow", "cursor")}
            plain = functools.partial(self._audit_slice, plain_query)
            return self._follow(request, query, (None, ops_service.AUDIT_LOG_NAME), plain)
        return self._audit_slice(query)

    def _audit_slice(self, query: Dict[str, str]) -> Awaitable[Response]:
        return self._ops_response(200, self.ops.read_audit_log, cursor=query.get("cursor"),
                                  limit=int_param(query, "limit"), max_bytes=int_param(query, "max_bytes"),
                                  backups=self.audit.backups)

    def _log_path(self, path: str) -> Tuple[str, str]:
        """UA's ``logs/tail?path=``: ``<session>/<log>`` relative to the workspaces root (or that path made
        absolute), naming one of a session's live logs. Anything else is a 400, never another file."""
        root = str(self.ops.root)
        relative = path[len(root) + 1:] if path.startswith(root + "/") else path
        parts = relative.split("/")
        if (len(parts) != 2 or not ops_service.is_valid_session_id(parts[0])
                or parts[1] not in ops_service.LOG_FILES):
            raise HttpError(400, f"path must be <session_id>/run.log or <session_id>/activity_journal.log under "
                                 f"the workspaces root, not {show(path)}")
        return parts[0], parts[1]

    def reset_session(self, request: Request, params: Dict[str, str]) -> Awaitable[Response]:
        body = json_object_body(request, ("clear_logs", "clear_memory", "clear_work_products"))
        body.setdefault("clear_memory", True)  # UA's HTTP default: a reset archives memory too
        return self._changed_response(ChangeKind.RESET, params["session_id"], self.ops.reset_session, **body)

    async def archive_session(self, request: Request, params: Dict[str, str]) -> Response:
        """UA HEAD's archive: a reset that always moves the logs (memory and work products on request)."""
        body = json_object_body(request, ("clear_memory", "clear_work_products"))
        body.setdefault("clear_memory", False)
        session_id = params["session_id"]
        result = await self.run_ops(self.ops.reset_session, session_id, clear_logs=True, **body)
        self.changes.publish(ChangeKind.ARCHIVED, session_id, **result)
        return json_response(200, {**result, "status": "archived", "session_id": session_id})

    async def _changed_response(self, kind: ChangeKind, session_id: str, function: Callable[..., Any],
                                **kwargs: Any) -> Response:
        """Run an OpsService change of ``session_id``, announce it (``kind``, with its answer), answer it."""
        result = await self.run_ops(function, session_id, **kwargs)
        self.changes.publish(kind, session_id, **result)
        return json_response(200, result)

    async def update_session(self, request: Request, params: Dict[str, str]) -> Response:
        """UA HEAD's PATCH of a session: ``{description?}`` (written to description.txt, bounded)."""
        body = json_object_body(request, ("description",))
        session_id = params["session_id"]
        description = body.get("description")
        if description is None:
            await self.run_ops(self.ops.require_session, session_id)  # 404 for an unknown id (UA: 200)
            return json_response(200, {"status": "updated", "session_id": session_id, "updates": {}})
        result = await self.run_ops(self.ops.set_description, session_id, description)
        self.changes.publish(ChangeKind.UPDATED, session_id, description=description)
        return json_response(200, result)

    def _cancel_reason(self, request: Request, default: str) -> str:
        body = json_object_body(request, ("reason",))
        reason = body.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise HttpError(400, "reason must be a string or null")
        reason = (reason or "").strip()[:1000]
        return reason or default

    async def cancel_session(self, request: Request, params: Dict[str, str]) -> Response:
        """UA HEAD's Ops cancel: ``cancelled`` goes to the session's sockets (even when nothing runs, as UA),
        and a running turn ends with query_complete {completed: false}."""
        reason = self._cancel_reason(request, "Cancelled from ops panel")
        session_id = params["session_id"]
        await self.run_ops(self.ops.require_session, session_id)
        hub = self.hub
        turn_id = None
        cancelled = False
        if hub is not None:
            live = hub.sessions.get(session_id)
            if live is not None and live.turn is not None:
                turn_id = live.turn.turn_id
                cancelled = hub.start_cancel(session_id, reason)
            elif live is not None:
                hub.broadcast(session_id, "cancelled", {"reason": reason, "turn_id": None, "session_id": session_id,
                                                        "run_id": None})
        return json_response(200, {"status": "cancel_requested", "session_id": session_id, "run_id": None,
                                   "reason": reason, "task_cancelled": cancelled, "turn_id": turn_id})

    def cancel_sessions(self, request: Request, params: Dict[str, str]) -> Response:
        """UA HEAD's bulk cancel, of the sessions with a running turn (UA also counts merely connected ones)."""
        reason = self._cancel_reason(request, "Cancelled from ops bulk session controls")
        hub = self.hub
        running = sorted(sid for sid, live in hub.sessions.items() if live.turn is not None) if hub is not None else []
        cancelled = [sid for sid in running if hub is not None and hub.start_cancel(sid, reason)]
        return json_response(200, {"status": "cancel_requested", "reason": reason,
                                   "sessions_considered": len(running), "sessions_cancelled": cancelled})

    async def compact_session(self, request: Request, params: Dict[str, str]) -> Response:
        body = json_object_body(request, ("max_lines", "max_bytes", "archive"))
        session_id = params["session_id"]
        result = await self.run_ops(self.ops.compact_session, session_id, **body)
        self.changes.publish(ChangeKind.COMPACTED, session_id, **result)
        if not result["archived"] and self.log is not None:
            # PROTOCOL.md §16.1: deleted log bytes are gone for good; the gateway log says who and how much.
            self.log.write("compact_discard", session_id=session_id, client=request.client,
                           bytes_dropped=result["bytes_dropped"], bytes_freed=result["bytes_freed"])
        return json_response(200, result)

    def _archives_changed(self, kind: ChangeKind, session_id: str, fields: Dict[str, Any]) -> None:
        """A Changes observer: a new archive is compressed soon (never here: request only wakes a thread)."""
        if kind in (ChangeKind.RESET, ChangeKind.ARCHIVED, ChangeKind.COMPACTED) and self.compressor is not None:
            self.compressor.request(session_id)

    def list_archives(self, request: Request, params: Dict[str, str]) -> Awaitable[Response]:
        return self._ops_response(200, self.ops.list_archives, params["session_id"])

    def archive_log(self, request: Request, params: Dict[str, str]) -> Awaitable[Response]:
        """PROTOCOL.md §16.3: a slice of an archived log, as logs/tail; {stamp} and {file} are names only."""
        query = query_params(request)
        return self._ops_response(200, self.ops.read_archive_log, params["session_id"], params["stamp"], params["file"],
                                  cursor=query.get("cursor"), limit=int_param(query, "limit"),
                                  max_bytes=int_param(query, "max_bytes"))

    def delete_session(self, request: Request, params: Dict[str, str]) -> Awaitable[Response]:
        query = query_params(request)
        if not bool_param(query, "confirm"):
            raise HttpError(400, "deleting a session needs ?confirm=true; nothing was touched")
        force = bool_param(query, "force")
        return self._delete(params["session_id"], force)

    async def _delete(self, session_id: str, force: bool) -> Response:
        hub = self.hub
        if hub is not None and hub.running(session_id):
            if not force:
                raise HttpError(409, f"session {session_id} has a turn running; cancel it first or add force=true")
            await hub.cancel_and_wait(session_id, "session deleted")
        result = await self.run_ops(self.ops.delete_session, session_id)
        if hub is not None:
            hub.close_session(session_id, CloseCode.SESSION_NOT_FOUND, "session deleted")
        self.changes.publish(ChangeKind.DELETED, session_id)
        return json_response(200, result)

    def admit_session_creation(self, address: str) -> None:
        """Count one session creation (HTTP or the WebSocket lobby) by ``address``; HttpError 429 with
        Retry-After when it is over UA_SESSION_CREATE_RATE/_BURST or UA_SESSION_CREATE_PER_MINUTE."""
        wait = self.access.session_creation_wait(address)
        if wait:
            seconds = max(1, math.ceil(wait))
            self.metrics.refuse("429", "session_create_rate")
            raise HttpError(
                429,
                f"too many sessions created (from {address} or in all); retry in {seconds} s, or attach to an "
                "existing session; the limits are UA_SESSION_CREATE_RATE, _BURST and _PER_MINUTE",
                headers=[("Retry-After", str(seconds))],
            )


class Gateway(Application):
    """The application served on ``config.host``/``config.port`` by a ``Server``: ``await start()``, then
    ``await stop()``; ``url`` is known once started."""

    def __init__(self, config: Config, *, agent: Optional[Callable[..., Awaitable[Any]]] = None) -> None:
        super().__init__(config, agent=agent)
        self.server = Server(self, config, open_bridge)
        self.port = config.port
        self.notifier = Notifier.from_environ()  # systemd's sd_notify, when NOTIFY_SOCKET is set

    @property
    def url(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Open the application, then listen. Raises ConfigError, or OSError when the address cannot be bound."""
        await self.open()
        await self.server.start()
        self.port = self.server.port
        self.started_at = time.monotonic()
        self.watch_root()
        assert self.log is not None, "opened"
        self.log.write("start", version=__version__, url=self.url, workspaces=str(self.ops.root),
                       connection_limit=self.server.connection_limit())
        self.notifier.ready(f"listening on {self.url}")
        self.notifier.start_watchdog()

    def open_connections(self) -> Tuple[int, int]:
        websockets = sum(1 for connection in self.server.connections if connection.phase is Phase.UPGRADED)
        return len(self.server.connections) - websockets, websockets

    async def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop accepting, let in-flight requests finish (at most ``grace`` seconds), close the rest."""
        self.notifier.stopping()
        self.server.stop_accepting()
        deadline = time.monotonic() + grace
        if self.hub is not None:
            await self.hub.shutdown(grace)
        await self.server.drain(deadline)
        await self.close()
        self.notifier.close()

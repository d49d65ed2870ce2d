"""ua-gateway's server, one module per layer. ``ua_gateway`` (beside this package) is the entry point and
the public API; import from there unless you work on the gateway itself.

Rules this package keeps
- One asyncio HTTP/1.1 front door owns the port. It parses requests itself (``RequestParser`` is
  Sans-I/O: bytes in, requests out) and hands WebSocket upgrades, raw bytes and all, to websockets'
  documented Sans-I/O ``ServerProtocol``.
- Disk work never runs on the event loop: every ``OpsService`` call and every log write goes through a
  thread. A slow disk never stalls a WebSocket.
- Client input never causes a 5xx (505 for a foreign HTTP version excepted) and never stops the server:
  every failure a client can cause is an ``HttpError`` with a status and a ``detail`` a person can act on.
- Limits and timeouts are named constants in ``uagw.limits``, each with the reason for its value.
- The token is compared in constant time and never written anywhere.
- Imports point down the module map below, never up: a module imports only the ones listed before it
  (each module's docstring says which). Names used only in annotations may point up, under
  ``TYPE_CHECKING``.

Theory of operation
    socket bytes -> HttpConnection -> RequestParser -> Request -> Application.dispatch -> Response bytes
                                                       \\-> Upgrade -> WebSocketBridge -> SessionHub -> Agent
``dispatch`` matches the route once, admits the request, and returns a ``Response`` at once (health,
errors), an awaitable that runs ``OpsService`` in the executor, or an ``Upgrade`` that the connection
performs by handing its socket to a bridge. Requests on one connection are answered in order
(pipelining); a slow handler only holds up its own connection.

Module map, lowest layer first
- ``limits``: every limit, timeout and default, with its reason. Imports nothing.
- ``text``: ``show`` (an offending value in an error detail), ``PerSecond`` (cached timestamps),
  ``loads_json`` (strict RFC 8259 JSON). limits.
- ``config``: ``Config``, ``ConfigError``, environment variables and secret files. limits, text.
- ``http11``: Sans-I/O HTTP/1.1: ``RequestParser``, ``Request``, ``Response``, the error shape. limits, text.
- ``changes``: ``Changes``, ``ChangeKind``: session changes announced to observers. Imports nothing.
- ``access``: the token, lockout, address allowlist, CORS, session-creation limits. limits, config, http11.
- ``logs``: the writer threads: ``GatewayLog`` and ``SessionWriter``. ops_service, limits, text.
- ``logcache``: ``OpenLogs`` (session logs kept open; tails answered on the event loop when cached) and
  ``slice_response``. ops_service, limits, http11, changes.
- ``routing``: ``Router``, ``Route``, ``Scope``, ``Upgrade`` and ``Dispatched``, request helpers, the
  OpsError status table. ops_service, limits, text, http11.
- ``server``: ``Server``, ``HttpConnection`` (its ``Phase``) and ``Listener``; the ``Application`` and
  ``Bridge`` it serves as Protocols. limits, config, http11, routing.
- ``websocket``: ``WebSocketBridge`` over websockets' ``ServerProtocol``, ``open_bridge``, ``CloseCode``,
  ``EchoApp``. websockets, limits, text, http11, routing.
- ``agents``: one turn (``AgentTurn``, ``TurnState``), agent commands, journal formats. limits, text, config.
- ``sessions``: ``SessionHub``, ``LiveSession``, ``FinishedTurns``, ``AgentSocket``. ops_service, limits,
  text, config, http11, access, changes, logs, websocket, agents.
- ``app``: ``Application`` (routes, admission, handlers, health, ``dispatch``) and ``Gateway`` (it,
  served by a ``Server``: start and stop). Everything above.
- ``cli``: ``main``, ``serve``, arguments, process set-up. limits, config, app.
- ``console/``: the operator console's files and the OpenAPI document, read as package data.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"  # the one place the version is written: pyproject.toml, the zipapp and --version read it

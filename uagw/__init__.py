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

The module map (each module's job and what it may import, lowest layer first) is in the README's
Development section, written once there; tests/test_module_map.py checks it against the imports of the
code: every module has a row, and each imports only modules above it. ``console/`` holds the operator
console's files and the OpenAPI document, read as package data.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"  # the one place the version is written: pyproject.toml, the zipapp and --version read it

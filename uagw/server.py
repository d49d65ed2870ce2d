"""The server: the listening sockets (``Listener``), one ``HttpConnection`` per socket (the parser, the
timeouts, the order of answers), and ``Server``, which owns them, the deadline sweeper and the lifecycle,
and calls the application's one ``dispatch(request)`` for every request.

May import: the standard library, ``ops_service``, ``uagw.limits``, ``uagw.config``, ``uagw.http11`` and
``uagw.routing``. What it needs of the application above it (``Application``) and of a WebSocket bridge
(``Bridge``) are Protocols here: it never imports either.
"""

from __future__ import annotations

import asyncio
import enum
import socket
import time
from typing import Any, Awaitable, Callable, Dict, List, Optional, Protocol, cast

from .limits import (
    ACCEPT_BATCH, ACCEPT_RETRY_DELAY, FD_RESERVE, MAX_PIPELINE_BUFFER, MAX_REFUSALS_LINGERING,
    MAX_SEND_BACKLOG, REFUSAL_LINGER, REPORT_INTERVAL, WRITE_BUFFER_HIGH,
)
from .config import Config
from .http11 import (
    HttpError, Request, RequestParser, Response, StreamingResponse, error_response, serialize_response,
    serialize_stream_head,
)
from .routing import Dispatched, Upgrade

__all__ = [
    "Application",
    "Bridge",
    "EventLog",
    "HttpConnection",
    "Listener",
    "Phase",
    "Server",
    "descriptor_budget",
    "refusal_bytes",
]


class EventLog(Protocol):
    def write(self, event: str, **fields: Any) -> None: ...

    def access(self, client: str, method: Optional[str], path: Optional[str], status: int, size: int,
               ms: Optional[float]) -> None: ...


class Application(Protocol):
    """What a Server needs of the application it serves (``uagw.app.Gateway``)."""

    @property
    def log(self) -> Optional[EventLog]: ...

    @property
    def fd_budget(self) -> Optional[int]: ...

    def dispatch(self, request: Request) -> Dispatched:
        """The answer to a complete request; an awaitable one never raises (errors are answers too)."""

    def refuse_before_body(self, request: Request) -> Optional[Response]:
        """The refusal of a request whose body is still to come, or None to read the body."""

    def descriptors_reserved(self) -> int:
        """Descriptors of the open-file budget that connections may not take (those of agent commands)."""


class Bridge(Protocol):
    """What an upgraded connection hands its socket to (``uagw.websocket.WebSocketBridge``)."""

    def start(self, request: Request, head: bytes, rest: bytes) -> Optional[Response]:
        """Run the opening handshake; a Response when it is refused as plain HTTP (the socket is not taken)."""

    def data_received(self, data: bytes) -> None: ...

    def eof_received(self) -> Optional[bool]: ...

    def connection_lost(self, exc: Optional[Exception]) -> None: ...

    def shutdown(self) -> None: ...


# Makes the bridge for an upgrade; given to the Server by whoever composes it with the application.
OpenBridge = Callable[[asyncio.Transport, asyncio.AbstractEventLoop, Upgrade], Bridge]


def descriptor_budget() -> Optional[int]:
    """How many connections the soft RLIMIT_NOFILE leaves room for once FD_RESERVE is kept, or None
    where the limit is unknown or unlimited."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, ValueError, OSError):
        return None
    if soft == resource.RLIM_INFINITY:
        return None
    return max(soft - FD_RESERVE, 1)


def refusal_bytes(detail: str) -> bytes:
    """A complete 503 answer, for a connection the gateway will not serve."""
    error = HttpError(503, detail, headers=[("Retry-After", "1")])
    return serialize_response(error_response(error), keep_alive=False)


class Server:
    """Serves an ``Application`` on ``config.host``/``config.port``: ``await start()``, then
    ``stop_accepting()`` and ``await drain(deadline)``. Event loop only.

    Every ``HttpConnection`` is in ``connections`` from ``connection_made`` to ``connection_lost``; a
    sweeper checks their deadlines and send progress four times a second.
    """

    def __init__(self, app: Application, config: Config, open_bridge: OpenBridge) -> None:
        self.app = app
        self.config = config
        self.open_bridge = open_bridge
        self.connections: "set[HttpConnection]" = set()
        self.draining = False
        self.listener: Optional[Listener] = None
        self._sweeper: Optional[asyncio.Task] = None

    @property
    def log(self) -> Optional[EventLog]:
        return self.app.log

    @property
    def port(self) -> int:
        return self.listener.sockets[0].getsockname()[1] if self.listener is not None else self.config.port

    async def start(self) -> None:
        """Bind and start accepting. Raises OSError when an address cannot be bound."""
        self.listener = await Listener.open(self, self.config.host, self.config.port, backlog=1024)
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_deadlines())

    def connection_limit(self) -> int:
        """How many connections may be open now: ``max_connections``, lowered to what the open-file limit
        leaves (``Application.fd_budget``) once the application's own descriptors are reserved."""
        limit = self.config.max_connections
        budget = self.app.fd_budget
        if budget is not None:
            limit = min(limit, budget - self.app.descriptors_reserved())
        return limit

    def stop_accepting(self) -> None:
        """Close the listener; from now on answers close their connection, and new ones are refused."""
        self.draining = True
        if self.listener is not None:
            self.listener.close()

    async def drain(self, deadline: float) -> None:
        """Let in-flight requests finish until ``deadline`` (``time.monotonic()``), then abort the rest."""
        for connection in list(self.connections):
            connection.shutdown()
        while any(c.in_flight for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for connection in list(self.connections):
            connection.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()

    async def _sweep_deadlines(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0.25)
            now = loop.time()
            for connection in list(self.connections):
                if connection.deadline and now >= connection.deadline:
                    connection.on_deadline()
                connection.check_send_progress(now)


class Phase(str, enum.Enum):
    """Where an ``HttpConnection`` is; ``HttpConnection._enter`` is the one place it changes."""

    HEAD = "head"  # a request head is awaited or arriving (deadline: header_timeout)
    BODY = "body"  # a request body is arriving (deadline: body_timeout)
    BUSY = "busy"  # a handler runs; no deadline, pipelined bytes wait (bounded)
    IDLE = "idle"  # between requests (deadline: keepalive_timeout)
    SEND = "send"  # answers wait for the peer to read them (the send-stall deadline applies instead)
    LINGER = "linger"  # the last answer is sent and the write side shut; input is discarded briefly
    UPGRADED = "upgraded"  # the socket belongs to a WebSocket bridge
    CLOSED = "closed"  # the transport is gone

    # The phase is looked up in TRANSITIONS and ANSWERING several times a request; Enum's own __hash__ is
    # Python code (~0.4 us a call). str's is the same function of the value, so a phase and its string
    # still hash alike (they compare equal).
    __hash__ = str.__hash__


# The phases that may follow each phase. A refused handshake never reaches UPGRADED, and nothing leaves CLOSED.
TRANSITIONS: Dict[Phase, "frozenset[Phase]"] = {
    Phase.HEAD: frozenset({Phase.HEAD, Phase.BODY, Phase.BUSY, Phase.IDLE, Phase.SEND, Phase.LINGER, Phase.UPGRADED}),
    Phase.BODY: frozenset({Phase.HEAD, Phase.BODY, Phase.BUSY, Phase.IDLE, Phase.SEND, Phase.LINGER, Phase.UPGRADED}),
    Phase.BUSY: frozenset({Phase.IDLE}),  # the answer is ready: _process decides what comes next
    Phase.IDLE: frozenset({Phase.HEAD, Phase.BODY, Phase.BUSY, Phase.IDLE, Phase.SEND, Phase.LINGER, Phase.UPGRADED}),
    Phase.SEND: frozenset({Phase.HEAD, Phase.BODY, Phase.BUSY, Phase.IDLE, Phase.SEND, Phase.LINGER, Phase.UPGRADED}),
    Phase.LINGER: frozenset({Phase.LINGER}),
    Phase.UPGRADED: frozenset(),
    Phase.CLOSED: frozenset(),
}
# Phases in which the next pipelined request may be parsed and answered (the peer permitting).
ANSWERING = frozenset({Phase.HEAD, Phase.BODY, Phase.IDLE, Phase.SEND})
# The Config setting that bounds each phase (none: no deadline). A table, not a dict built per change of
# phase (twice a request); the setting is read at each change, so a changed Config applies to the next one.
PHASE_TIMEOUTS: Dict[Phase, str] = {
    Phase.HEAD: "header_timeout",
    Phase.BODY: "body_timeout",
    Phase.IDLE: "keepalive_timeout",
    Phase.LINGER: "close_linger",
}


class HttpConnection(asyncio.Protocol):
    """Moves bytes between a socket, the parser and the application. Runs on the event loop only.

    Deadlines (checked by the server's sweeper): the request head within ``header_timeout`` of its first
    byte (or of the connection), a body within ``body_timeout``, and an idle keep-alive connection closes after
    ``keepalive_timeout``. While a handler runs there is no deadline; pipelined bytes wait, bounded.

    Sending: while more than MAX_SEND_BACKLOG bytes of answers wait for the peer to read them, no further
    pipelined request is answered (and reading stops once MAX_PIPELINE_BUFFER bytes of them wait). When
    the peer takes none of a non-empty send buffer for ``send_stall_timeout``, the connection is aborted,
    closing or not: ``transport.close()`` alone would wait for that peer forever.

    Upgrading: when dispatch answers an ``Upgrade``, the connection hands its socket to a ``Bridge``
    (``Server.open_bridge``) and from then on only passes it the transport's events.
    """

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = asyncio.get_event_loop()
        self.parser = RequestParser()
        self.transport: Optional[asyncio.Transport] = None
        self.client = ""
        self.phase = Phase.HEAD
        self.deadline = 0.0  # of the phase, on the loop's clock; 0: none
        self.write_paused = False
        self.reading_paused = False
        self.peer_eof = False
        self.continue_sent = False
        self.bridge: Optional[Bridge] = None  # the WebSocket bridge, from the handshake on
        self.unsent = 0  # the transport's write buffer when the sweeper last looked
        self.resumed = False  # resume_writing() since the sweeper last looked: the peer took bytes
        self.send_progress_at = self.loop.time()  # when the peer last took bytes, or none were waiting
        self.streaming: Optional[StreamingResponse] = None  # the answer being streamed (phase BUSY), if any
        self.stream_task: Optional["asyncio.Task[None]"] = None  # ... and the task sending it
        self.writable: Optional["asyncio.Future[None]"] = None  # a stream waiting for the peer to read

    @property
    def busy(self) -> bool:
        return self.phase is Phase.BUSY

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    # -- asyncio.Protocol ----------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = stream = cast(asyncio.Transport, transport)  # a stream socket's transport
        peer = stream.get_extra_info("peername")
        self.client = str(peer[0]) if peer else ""
        if self.server.draining:  # the connection limit is the Listener's, decided before accepting
            stream.write(refusal_bytes("the gateway is shutting down"))
            stream.close()
            self._enter(Phase.CLOSED)
            return
        self.server.connections.add(self)
        stream.set_write_buffer_limits(high=MAX_SEND_BACKLOG)
        self._enter(Phase.HEAD)

    def data_received(self, data: bytes) -> None:
        if self.bridge is not None:
            self.bridge.data_received(data)
            return
        if self.phase in (Phase.CLOSED, Phase.LINGER):
            return
        self.parser.feed(data)
        if self.phase is Phase.IDLE:
            self._enter(Phase.HEAD)
        if not self.busy:
            self._process()
        # Stop reading while requests wait, behind a handler or behind a peer that does not read its
        # answers: either way, what it keeps sending must not pile up here without bound.
        waiting = self.busy or self.write_paused
        if waiting and self.parser.buffered > MAX_PIPELINE_BUFFER and not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def eof_received(self) -> Optional[bool]:
        if self.bridge is not None:
            return self.bridge.eof_received()
        self.peer_eof = True
        if self.stream_task is not None:
            # A stream's client sends nothing once its request is in: its end of input means it has gone.
            # End the stream now, not at the next keep-alive write (STREAM_KEEPALIVE) that would find it so.
            self.stream_task.cancel()
            self._close()
            return None
        if self.busy or self.write_paused:
            # Keep the write side open: the answer in flight, and those to requests pipelined before
            # the half-close, are still delivered; _await_more closes once none is left.
            return True
        self._close()
        return None

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._enter(Phase.CLOSED)
        if self.stream_task is not None:
            self.stream_task.cancel()  # the stream's source is closed: nobody is left to read it
        self.server.connections.discard(self)
        if self.bridge is not None:
            self.bridge.connection_lost(exc)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.bridge is not None and self.transport is not None:
            self.transport.pause_reading()  # a peer that does not read gets no more of its input read

    def resume_writing(self) -> None:
        self.write_paused = False
        self.resumed = True
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        if self.bridge is not None:
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
        elif not self.busy and not self.closed:
            # Soon, not now: this runs inside the transport's write callback, and answering may close
            # the transport there, which makes asyncio (3.11) report the connection lost twice.
            self.loop.call_soon(self._process)

    # -- request loop --------------------------------------------------------------------------------------

    def _enter(self, phase: Phase) -> None:
        """The one place the phase changes, and with it the deadline."""
        if phase is not Phase.CLOSED and phase not in TRANSITIONS[self.phase]:
            raise AssertionError(f"HttpConnection: no transition from {self.phase.name} to {phase.name}")
        self.phase = phase
        setting = PHASE_TIMEOUTS.get(phase)
        timeout = getattr(self.server.config, setting) if setting is not None else None
        self.deadline = self.loop.time() + timeout if timeout else 0.0

    def _process(self) -> None:
        while self.phase in ANSWERING and not self.write_paused:
            try:
                request = self.parser.next_request()
            except HttpError as error:
                self._send(error_response(error), None)
                return
            if request is None:
                self._await_more()
                return
            self.continue_sent = False
            request.client = self.client
            request.started = self.loop.time()
            result = self.server.app.dispatch(request)
            if isinstance(result, Upgrade):
                self._switch(request, result)
                return
            if isinstance(result, Response):
                self._send(result, request)
            else:
                self._enter(Phase.BUSY)
                self.loop.create_task(self._finish(request, result))
        if self.write_paused and self.phase in ANSWERING:
            # The requests have arrived; their answers wait for the peer. A 408 would be a lie queued
            # behind them: the send-stall deadline (check_send_progress) applies instead.
            self._enter(Phase.SEND)

    def _await_more(self) -> None:
        head = self.parser.pending_head
        if head is not None and not head.client:
            # Its body is still to come: refuse now if the route would, before a byte of it is held
            # or a "100 Continue" invites it (an anonymous client could otherwise pin 1 MiB per socket).
            head.client = self.client
            head.started = self.loop.time()
            refusal = self.server.app.refuse_before_body(head)
            if refusal is not None:
                self._send(refusal, head)
                return
        if self.parser.expects_continue and not self.continue_sent:
            self.continue_sent = True
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # type: ignore[union-attr]
        if self.parser.in_body:
            if self.phase is not Phase.BODY:
                self._enter(Phase.BODY)
        elif self.parser.in_request:
            if self.phase is not Phase.HEAD:
                self._enter(Phase.HEAD)
        elif self.phase is not Phase.IDLE:
            self._enter(Phase.IDLE)
        if self.reading_paused and self.parser.buffered <= MAX_PIPELINE_BUFFER:
            self.reading_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        if self.peer_eof or (self.server.draining and self.phase is Phase.IDLE):
            self._close()

    async def _finish(self, request: Request, pending: Awaitable[Response]) -> None:
        response = await pending  # the application's awaitable answers its own errors
        if isinstance(response, StreamingResponse):
            await self._stream(response, request)
        if self.closed:
            return
        self._enter(Phase.IDLE)
        if isinstance(response, StreamingResponse):
            if not request.keep_alive or self.server.draining:
                self._linger()
        else:
            self._send(response, request)
        self._process()

    async def _stream(self, response: StreamingResponse, request: Request) -> None:
        """Send ``response`` chunk by chunk (PROTOCOL.md §13) while the phase stays BUSY. Its source is
        awaited only while the peer keeps up (below MAX_SEND_BACKLOG unread): a slow reader's stream
        waits, nothing piles up here, and the send-stall deadline still aborts a peer that stops reading.
        The zero chunk ends it when the source ends; a lost connection cancels it; the source is always
        closed."""
        sent = 0
        self.streaming, self.stream_task = response, asyncio.current_task()

        def direct(framed: bytes, size: int) -> bool:
            """Write a chunk the source framed itself, only while the source waits and the peer keeps up."""
            nonlocal sent
            if self.closed or self.write_paused or self.transport is None or self.streaming is not response:
                return False
            self.transport.write(framed)
            sent += size
            return True
        try:
            if not self.closed and self.transport is not None:
                keep_alive = request.keep_alive and not self.server.draining
                self.transport.write(serialize_stream_head(response, keep_alive))
                if request.method != "HEAD":
                    attach = getattr(response.source, "attach", None)
                    if attach is not None:  # a live stream writes its events at once while we keep up
                        attach(direct)
                    async for chunk in response.source:
                        if self.closed:
                            break
                        self.transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        sent += len(chunk)
                        while self.write_paused and not self.closed:
                            self.writable = self.loop.create_future()
                            await self.writable
                    if not self.closed:
                        self.transport.write(b"0\r\n\r\n")
        except asyncio.CancelledError:
            pass  # the connection is gone (connection_lost); nothing more can be sent
        except Exception as error:  # a bug in the source: cut the stream rather than leave it silent and BUSY
            log = self.server.log
            if log is not None:
                log.write("stream_failed", client=self.client, path=request.path[:512], error=repr(error)[:512])
            self.abort()  # no zero chunk: the client sees an unfinished answer, reconnects and resumes
            self._enter(Phase.CLOSED)  # at once: no pipelined request is answered on the aborted transport
        finally:
            self.streaming = self.stream_task = self.writable = None
            await response.source.aclose()  # type: ignore[attr-defined]
        log = self.server.log
        if log is not None:
            log.access(self.client, request.method, request.path[:512], response.status, sent,
                       round((self.loop.time() - request.started) * 1000, 3))

    def _switch(self, request: Request, upgrade: Upgrade) -> None:
        """Hand the socket to a WebSocket bridge, unless its handshake is refused as plain HTTP."""
        transport = self.transport
        assert transport is not None, "requests arrive on a made connection"
        bridge = self.bridge = self.server.open_bridge(transport, self.loop, upgrade)
        refusal = bridge.start(request, request.raw_head, self.parser.take_remaining())
        if refusal is not None:
            self.bridge = None
            refusal.headers.extend(upgrade.headers)
            self._send(refusal, request)
            return
        self._enter(Phase.UPGRADED)
        # The bridge bounds its own backlog (WS_MAX_SEND_BUFFER); the mark only decides when a WebSocket
        # peer that does not read stops being read.
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        if self.peer_eof:
            # The peer half-closed while this upgrade waited behind earlier pipelined requests.
            bridge.eof_received()
            self._close()

    def _send(self, response: Response, request: Optional[Request]) -> None:
        if self.closed or self.transport is None:
            return
        keep_alive = (
            request is not None
            and request.keep_alive
            and not response.close
            and not self.server.draining
        )
        # RFC 9110 §9.3.2: a response to HEAD has no content, whatever its status; a body would be read
        # by the client as the start of the next response.
        head_only = request is not None and request.method == "HEAD"
        self.transport.write(serialize_response(response, keep_alive, head_only))
        log = self.server.log
        if log is not None:
            if request is not None:
                log.access(self.client, request.method, request.path[:512], response.status, len(response.body),
                           round((self.loop.time() - request.started) * 1000, 3))
            else:
                log.access(self.client, None, None, response.status, len(response.body), None)
        if not keep_alive:
            self._linger()

    # -- closing -------------------------------------------------------------------------------------------

    def _linger(self) -> None:
        """Half-close after the last answer and discard input briefly, so the peer reads the answer
        instead of a reset caused by bytes it already sent (an unread 2 MiB body, say)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.can_write_eof() and not self.peer_eof:
            transport.write_eof()
            self._enter(Phase.LINGER)
            if self.reading_paused:
                self.reading_paused = False
                transport.resume_reading()
        else:
            self._close()

    def on_deadline(self) -> None:
        if self.phase in (Phase.HEAD, Phase.BODY):
            what = "request head" if self.phase is Phase.HEAD else "request body"
            limit = self.server.config.header_timeout if self.phase is Phase.HEAD else self.server.config.body_timeout
            self._send(error_response(HttpError(408, f"{what} not received within {limit:g} s")), None)
        elif self.phase is not Phase.UPGRADED:
            self._close()

    def check_send_progress(self, now: float) -> None:
        """The sweeper's look at the send side: abort after ``send_stall_timeout`` without progress.

        Progress is the write buffer emptying, shrinking or crossing the low-water mark since the last
        look. A peer that reads, but more slowly than a WebSocket app writes, for the whole timeout
        counts as stalled too: it falls behind without bound.
        """
        transport = self.transport
        if transport is None:
            return
        unsent = transport.get_write_buffer_size()
        progressed = not unsent or unsent < self.unsent or self.resumed
        self.unsent, self.resumed = unsent, False
        if progressed:
            self.send_progress_at = now
        elif now - self.send_progress_at >= self.server.config.send_stall_timeout:
            log = self.server.log
            if log is not None:
                log.write("send_stalled", client=self.client, unsent=unsent, phase=self.phase.value)
            transport.abort()

    @property
    def in_flight(self) -> bool:
        """A request is being received or answered, or a WebSocket is still closing."""
        return not self.closed and (self.busy or self.parser.in_request or self.bridge is not None)

    def shutdown(self) -> None:
        """Graceful stop: idle connections close now, busy ones after their answer."""
        if self.bridge is not None:
            self.bridge.shutdown()
        elif self.streaming is not None:
            self.streaming.stop()  # the stream ends with its final event and the zero chunk
        elif not self.busy and not self.parser.in_request:
            self._close()

    def _close(self) -> None:
        self.deadline = 0.0
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _discard_input(conn: socket.socket) -> None:
    try:
        while conn.recv(65536):
            pass
    except OSError:  # nothing more for now (BlockingIOError), or the peer is gone
        pass


class Listener:
    """The listening sockets and the accept loop of a server. Event loop only.

    asyncio's own accept loop, when accept() fails for want of descriptors, reports a traceback and
    schedules a retry for every remaining connection of a backlog-sized batch (CPython 3.9 to 3.13): at
    the limit that is a busy CPU and megabytes of stderr a second. Here each accepted socket is checked
    against ``Server.connection_limit`` first: past it, the peer gets a short 503 at once and the socket
    is closed, from the descriptors FD_RESERVE keeps free. If accept() fails all the same (descriptors
    taken by something else), accepting pauses for ACCEPT_RETRY_DELAY. Either way one ``connection_limit``
    record a REPORT_INTERVAL at most says how many were refused, and nothing is written to stderr.
    """

    def __init__(self, server: Server, sockets: List[socket.socket]) -> None:
        self.server = server
        self.sockets = sockets
        self.loop = asyncio.get_running_loop()
        self.pending = 0  # accepted sockets whose HttpConnection is not made yet: they count against the limit
        self.refused = 0  # since the last report
        self.lingering = 0  # refused sockets waiting to be closed
        self.accept_failures = 0  # since the last report
        self.detail = ""
        self.paused = False
        self.closed = False
        self._report: Optional[asyncio.TimerHandle] = None
        self._reported = -REPORT_INTERVAL

    @classmethod
    async def open(cls, server: Server, host: str, port: int, backlog: int) -> "Listener":
        """Bind every address ``host`` resolves to (as ``loop.create_server`` does) and start accepting.
        Raises OSError when an address cannot be bound."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        sockets: List[socket.socket] = []
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # IPv4 has its own socket
                sock.bind(address)
                sock.listen(backlog)
                sock.setblocking(False)
        except OSError:
            for sock in sockets:
                sock.close()
            raise
        listener = cls(server, sockets)
        listener._start_accepting()
        return listener

    def close(self) -> None:
        """Stop accepting and close the listening sockets; report refusals not yet reported."""
        if self.closed:
            return
        self.closed = True
        for sock in self.sockets:
            self.loop.remove_reader(sock.fileno())
            sock.close()
        if self._report is not None:
            self._report.cancel()
            self._write_report()

    def _start_accepting(self) -> None:
        self.paused = False
        if not self.closed:
            for sock in self.sockets:
                self.loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS, ENOMEM: retrying now would only spin
                self.accept_failures += 1
                self._pause(f"accept() failed: {exc.strerror or exc}")
                return
            if len(self.server.connections) + self.pending >= self.server.connection_limit():
                self._refuse(conn)
                continue
            self.pending += 1
            self.loop.create_task(self._connect(conn))

    async def _connect(self, conn: socket.socket) -> None:
        try:
            conn.setblocking(False)
            # typeshed declares it on AbstractEventLoop from 3.10; every 3.9 loop (a BaseEventLoop) has it
            await self.loop.connect_accepted_socket(  # type: ignore[attr-defined,unused-ignore]
                lambda: HttpConnection(self.server), conn)
        except OSError:  # the peer is gone already
            conn.close()
        finally:
            self.pending -= 1

    def _refuse(self, conn: socket.socket) -> None:
        limit = self.server.connection_limit()
        try:
            conn.setblocking(False)
            conn.send(refusal_bytes(f"the gateway is at its connection limit ({max(limit, 0)}); retry shortly"))
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        # Closing with the client's request unread would make the kernel answer with a reset, which can
        # destroy the 503 before it is read: discard what came, and let a few linger a moment first.
        _discard_input(conn)
        if self.lingering < MAX_REFUSALS_LINGERING:
            self.lingering += 1
            self.loop.call_later(REFUSAL_LINGER, self._close_refused, conn)
        else:
            conn.close()
        self.refused += 1
        self._note(f"at the connection limit ({max(limit, 0)} for an open-file limit leaving {self.server.app.fd_budget})")

    def _close_refused(self, conn: socket.socket) -> None:
        self.lingering -= 1
        _discard_input(conn)
        conn.close()

    def _pause(self, detail: str) -> None:
        if not self.paused:
            self.paused = True
            for sock in self.sockets:
                self.loop.remove_reader(sock.fileno())
            self.loop.call_later(ACCEPT_RETRY_DELAY, self._start_accepting)
        self._note(detail)

    def _note(self, detail: str) -> None:
        self.detail = detail
        if self._report is None:
            delay = max(0.0, self._reported + REPORT_INTERVAL - self.loop.time())
            self._report = self.loop.call_later(delay, self._write_report)

    def _write_report(self) -> None:
        self._report = None
        self._reported = self.loop.time()
        log = self.server.log
        if log is not None:
            log.write("connection_limit", refused=self.refused, accept_failures=self.accept_failures,
                      connections=len(self.server.connections) + self.pending, detail=self.detail)
        self.refused = self.accept_failures = 0

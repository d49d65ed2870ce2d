"""Connections and the listening socket: one ``HttpConnection`` per socket owns the parser, the timeouts
and the order of answers; ``Listener`` accepts within the open-file limit.

May import: the standard library, ``ops_service``, ``uagw.limits``, ``uagw.http11`` and ``uagw.routing``.
The gateway it serves (``uagw.app.Gateway``) is named for type checking only: the connection calls the
gateway it is given and never imports the application.
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING, Any, Awaitable, List, Optional, cast

from ops_service import OpsError

from .limits import (
    ACCEPT_BATCH, ACCEPT_RETRY_DELAY, FD_RESERVE, MAX_PIPELINE_BUFFER, MAX_REFUSALS_LINGERING,
    MAX_SEND_BACKLOG, REFUSAL_LINGER, REPORT_INTERVAL, WRITE_BUFFER_HIGH,
)
from .http11 import HttpError, Request, RequestParser, Response, error_response, serialize_response
from .routing import ops_error_response

if TYPE_CHECKING:  # names for annotations only: importing them would point up the layers
    from .app import Gateway

__all__ = [
    "HttpConnection",
    "Listener",
    "descriptor_budget",
    "refusal_bytes",
]


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


class HttpConnection(asyncio.Protocol):
    """Moves bytes between a socket, the parser and the gateway. Runs on the event loop only.

    Deadlines (checked by the gateway's sweeper): the request head within ``header_timeout`` of its first
    byte (or of the connection), a body within ``body_timeout``, and an idle keep-alive connection closes after
    ``keepalive_timeout``. While a handler runs there is no deadline; pipelined bytes wait, bounded.

    Sending: while more than MAX_SEND_BACKLOG bytes of answers wait for the peer to read them, no further
    pipelined request is answered (and reading stops once MAX_PIPELINE_BUFFER bytes of them wait). When
    the peer takes none of a non-empty send buffer for ``send_stall_timeout``, the connection is aborted,
    closing or not: ``transport.close()`` alone would wait for that peer forever.
    """

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.loop = asyncio.get_event_loop()
        self.parser = RequestParser()
        self.transport: Optional[asyncio.Transport] = None
        self.client = ""
        self.busy = False
        self.closed = False
        self.write_paused = False
        self.reading_paused = False
        self.peer_eof = False
        self.continue_sent = False
        self.deadline = 0.0
        self.phase = "head"  # head | body | idle | busy | send | linger
        self.bridge: Any = None  # the WebSocket bridge once upgraded
        self.unsent = 0  # the transport's write buffer when the sweeper last looked
        self.resumed = False  # resume_writing() since the sweeper last looked: the peer took bytes
        self.send_progress_at = self.loop.time()  # when the peer last took bytes, or none were waiting

    # -- asyncio.Protocol ----------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = stream = cast(asyncio.Transport, transport)  # a stream socket's transport
        peer = stream.get_extra_info("peername")
        self.client = str(peer[0]) if peer else ""
        if self.gateway.draining:  # the connection limit is the Listener's, decided before accepting
            stream.write(refusal_bytes("the gateway is shutting down"))
            stream.close()
            self.closed = True
            return
        self.gateway.connections.add(self)
        stream.set_write_buffer_limits(high=MAX_SEND_BACKLOG)
        self._enter("head")

    def data_received(self, data: bytes) -> None:
        if self.bridge is not None:
            self.bridge.data_received(data)
            return
        if self.closed or self.phase == "linger":
            return
        self.parser.feed(data)
        if self.phase == "idle":
            self._enter("head")
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
        if self.busy or self.write_paused:
            # Keep the write side open: the answer in flight, and those to requests pipelined before
            # the half-close, are still delivered; _await_more closes once none is left.
            return True
        self._close()
        return None

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.closed = True
        self.gateway.connections.discard(self)
        if self.bridge is not None:
            self.bridge.connection_lost(exc)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.bridge is not None and self.transport is not None:
            self.transport.pause_reading()  # a peer that does not read gets no more of its input read

    def resume_writing(self) -> None:
        self.write_paused = False
        self.resumed = True
        if self.bridge is not None:
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
        elif not self.busy and not self.closed:
            # Soon, not now: this runs inside the transport's write callback, and answering may close
            # the transport there, which makes asyncio (3.11) report the connection lost twice.
            self.loop.call_soon(self._process)

    # -- request loop --------------------------------------------------------------------------------------

    def _enter(self, phase: str) -> None:
        self.phase = phase
        timeouts = {
            "head": self.gateway.config.header_timeout,
            "body": self.gateway.config.body_timeout,
            "idle": self.gateway.config.keepalive_timeout,
            "linger": self.gateway.config.close_linger,
        }
        timeout = timeouts.get(phase)
        self.deadline = self.loop.time() + timeout if timeout else 0.0

    def _process(self) -> None:
        while not self.busy and not self.closed and not self.write_paused and self.phase != "linger":
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
            if request.upgrade and self.gateway.try_upgrade(request, self):
                if self.bridge is not None:
                    # The bridge bounds its own backlog (WS_MAX_SEND_BUFFER); the mark only decides
                    # when a WebSocket peer that does not read stops being read.
                    self.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)  # type: ignore[union-attr]
                return
            result = self.gateway.dispatch(request)
            if isinstance(result, Response):
                self._send(result, request)
            else:
                self.busy = True
                self._enter("busy")
                self.loop.create_task(self._finish(request, result))
        if self.write_paused and not self.busy and not self.closed and self.phase != "linger":
            # The requests have arrived; their answers wait for the peer. A 408 would be a lie queued
            # behind them: the send-stall deadline (check_send_progress) applies instead.
            self._enter("send")

    def _await_more(self) -> None:
        head = self.parser.pending_head
        if head is not None and not head.client:
            # Its body is still to come: refuse now if the route would, before a byte of it is held
            # or a "100 Continue" invites it (an anonymous client could otherwise pin 1 MiB per socket).
            head.client = self.client
            head.started = self.loop.time()
            refusal = self.gateway.refuse_before_body(head)
            if refusal is not None:
                self._send(refusal, head)
                return
        if self.parser.expects_continue and not self.continue_sent:
            self.continue_sent = True
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # type: ignore[union-attr]
        if self.parser.in_body:
            if self.phase != "body":
                self._enter("body")
        elif self.parser.in_request:
            if self.phase != "head":
                self._enter("head")
        elif self.phase != "idle":
            self._enter("idle")
        if self.reading_paused and self.parser.buffered <= MAX_PIPELINE_BUFFER:
            self.reading_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        if self.peer_eof or (self.gateway.draining and self.phase == "idle"):
            self._close()

    async def _finish(self, request: Request, pending: Awaitable[Response]) -> None:
        try:
            response = await pending
        except HttpError as error:
            response = error_response(error)
        except OpsError as error:
            response = ops_error_response(error)
        except Exception as error:  # a bug of ours: answer 500, log it, keep serving
            response = self.gateway.internal_error(request, error)
        self.busy = False
        if self.closed:
            return
        self._send(response, request)
        if not self.closed:
            self._process()

    def _send(self, response: Response, request: Optional[Request]) -> None:
        if self.closed or self.transport is None:
            return
        keep_alive = (
            request is not None
            and request.keep_alive
            and not response.close
            and not self.gateway.draining
        )
        if request is not None and request.method != "OPTIONS":
            response.headers.extend(self.gateway.access.cors_headers(request))
        # RFC 9110 §9.3.2: a response to HEAD has no content, whatever its status; a body would be read
        # by the client as the start of the next response.
        head_only = request is not None and request.method == "HEAD"
        self.transport.write(serialize_response(response, keep_alive, head_only))
        log = self.gateway.log
        if log is not None:
            log.write(
                "access",
                client=self.client,
                method=request.method if request else None,
                path=request.path[:512] if request else None,
                status=response.status,
                bytes=len(response.body),
                ms=round((self.loop.time() - request.started) * 1000, 3) if request else None,
            )
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
            self._enter("linger")
            if self.reading_paused:
                self.reading_paused = False
                transport.resume_reading()
        else:
            self._close()

    def on_deadline(self) -> None:
        if self.bridge is not None:
            return
        if self.phase in ("head", "body"):
            what = "request head" if self.phase == "head" else "request body"
            limit = self.gateway.config.header_timeout if self.phase == "head" else self.gateway.config.body_timeout
            self._send(error_response(HttpError(408, f"{what} not received within {limit:g} s")), None)
        else:
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
        elif now - self.send_progress_at >= self.gateway.config.send_stall_timeout:
            log = self.gateway.log
            if log is not None:
                log.write("send_stalled", client=self.client, unsent=unsent, phase=self.phase)
            transport.abort()

    @property
    def in_flight(self) -> bool:
        """A request is being received or answered, or a WebSocket is still closing."""
        return not self.closed and (self.busy or self.parser.in_request or self.bridge is not None)

    def shutdown(self) -> None:
        """Graceful stop: idle connections close now, busy ones after their answer."""
        if self.bridge is not None:
            self.bridge.shutdown()
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
    """The listening sockets and the accept loop of a gateway. Event loop only.

    asyncio's own accept loop, when accept() fails for want of descriptors, reports a traceback and
    schedules a retry for every remaining connection of a backlog-sized batch (CPython 3.9 to 3.13): at
    the limit that is a busy CPU and megabytes of stderr a second. Here each accepted socket is checked
    against ``Gateway.connection_limit`` first: past it, the peer gets a short 503 at once and the socket
    is closed, from the descriptors FD_RESERVE keeps free. If accept() fails all the same (descriptors
    taken by something else), accepting pauses for ACCEPT_RETRY_DELAY. Either way one ``connection_limit``
    record a REPORT_INTERVAL at most says how many were refused, and nothing is written to stderr.
    """

    def __init__(self, gateway: Gateway, sockets: List[socket.socket]) -> None:
        self.gateway = gateway
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
    async def open(cls, gateway: Gateway, host: str, port: int, backlog: int) -> "Listener":
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
        listener = cls(gateway, sockets)
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
            if len(self.gateway.connections) + self.pending >= self.gateway.connection_limit():
                self._refuse(conn)
                continue
            self.pending += 1
            self.loop.create_task(self._connect(conn))

    async def _connect(self, conn: socket.socket) -> None:
        try:
            conn.setblocking(False)
            # typeshed declares it on AbstractEventLoop from 3.10; every 3.9 loop (a BaseEventLoop) has it
            await self.loop.connect_accepted_socket(  # type: ignore[attr-defined,unused-ignore]
                lambda: HttpConnection(self.gateway), conn)
        except OSError:  # the peer is gone already
            conn.close()
        finally:
            self.pending -= 1

    def _refuse(self, conn: socket.socket) -> None:
        limit = self.gateway.connection_limit()
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
        self._note(f"at the connection limit ({max(limit, 0)} for an open-file limit leaving {self.gateway.fd_budget})")

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
        if self.gateway.log is not None:
            self.gateway.log.write("connection_limit", refused=self.refused, accept_failures=self.accept_failures,
                                   connections=len(self.gateway.connections) + self.pending, detail=self.detail)
        self.refused = self.accept_failures = 0

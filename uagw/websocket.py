"""The WebSocket bridge: websockets' Sans-I/O ``ServerProtocol`` driven by our connection. What the
Sans-I/O layer leaves to us lives here: keepalive pings, the closing timeout, message reassembly with
incremental UTF-8 checks, and a bounded send buffer. It knows frames, not agents, and of the connection
only its transport: ``open_bridge`` makes a bridge for a connection's ``Upgrade`` (``uagw.server.OpenBridge``).

May import: the standard library, websockets, ``uagw.limits``, ``uagw.text``, ``uagw.http11`` and
``uagw.routing``.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import enum
import json
import logging
import os
from typing import Any, Callable, List, Optional, Sequence, Union

from websockets.frames import Opcode
from websockets.http11 import Request as WsRequest
from websockets.protocol import State as WsState
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from .limits import (
    SERVER_NAME, WS_MAX_CLOSE_REASON, WS_MAX_SEND_BUFFER,
)
from .text import show
from .http11 import HttpError, Request, Response, error_response
from .routing import Upgrade

__all__ = [
    "CloseCode",
    "EchoApp",
    "WS_BEARER_PREFIX",
    "WS_SUBPROTOCOL",
    "WebSocketBridge",
    "close_reason",
    "open_bridge",
    "select_subprotocol",
    "subprotocol_token",
    "ws_logger",
]


WS_SUBPROTOCOL = Subprotocol("ua.v1")
WS_BEARER_PREFIX = "bearer."  # a token offered as a subprotocol, base64url without padding (Kubernetes' way)

_CLOSE = Opcode.CLOSE.value  # read per frame: an Enum attribute and .value cost ~0.1 us each

ws_logger = logging.getLogger("ua_gateway.websocket")
ws_logger.addHandler(logging.NullHandler())
ws_logger.propagate = False


class CloseCode(enum.IntEnum):
    """The close codes the gateway sends: RFC 6455 §7.4.1, and the 4000s of PROTOCOL.md §6."""

    NORMAL = 1000
    GOING_AWAY = 1001  # the server is shutting down
    INVALID_DATA = 1007  # a text message that is not UTF-8
    POLICY_VIOLATION = 1008  # a slow consumer, or too much sent before the session was attached
    MESSAGE_TOO_BIG = 1009  # sent by websockets' ServerProtocol (max_size)
    INTERNAL_ERROR = 1011  # a keepalive ping timeout, or the workspaces failing
    INVALID_SESSION_ID = 4000
    USER_NOT_ALLOWED = 4003
    SESSION_NOT_FOUND = 4004  # or deleted


def close_reason(reason: str) -> str:
    """``reason`` as a close frame can carry it: UTF-8 of at most WS_MAX_CLOSE_REASON bytes.

    A longer reason is cut on a character boundary and ends with "..."; a lone surrogate (an undecodable
    file name in a path) is shown as ``\\udcxx``. websockets raises ProtocolError for anything longer.
    """
    encoded = reason.encode("utf-8", "backslashreplace")
    if len(encoded) <= WS_MAX_CLOSE_REASON:
        return encoded.decode("utf-8")
    return encoded[: WS_MAX_CLOSE_REASON - len(b"...")].decode("utf-8", "ignore") + "..."


def subprotocol_token(request: Request) -> Optional[str]:
    """The token a browser offered as ``bearer.<base64url>`` in Sec-WebSocket-Protocol, if any."""
    for name, value in request.headers:
        if name != "sec-websocket-protocol":
            continue
        for offered in value.split(","):
            offered = offered.strip(" \t")
            if offered[: len(WS_BEARER_PREFIX)].lower() == WS_BEARER_PREFIX:
                encoded = offered[len(WS_BEARER_PREFIX):]  # base64url is case-sensitive: kept as sent
                try:
                    return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode("utf-8")
                except (ValueError, UnicodeDecodeError):
                    return None
    return None


def select_subprotocol(protocol: ServerProtocol, offered: Sequence[Subprotocol]) -> Optional[Subprotocol]:
    # Select ua.v1 when offered; never echo a bearer token back (PROTOCOL.md §4).
    return WS_SUBPROTOCOL if WS_SUBPROTOCOL in offered else None


class WebSocketBridge:
    """One WebSocket connection: bytes <-> ``ServerProtocol`` <-> whole messages for ``app``.

    ``app`` gets ``on_open(bridge)``, ``on_message(bridge, text_or_bytes)`` and ``on_close(bridge)``.
    Everything runs on the event loop. Sending never blocks: when the peer falls WS_MAX_SEND_BUFFER
    bytes behind, the connection is closed with 1008 ("slow consumer") rather than buffering without bound.
    "Behind" counts what the transport holds and what is queued for it in this loop iteration, so the
    peer never holds more than WS_MAX_SEND_BUFFER plus the one message that crossed it.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, protocol: Any,
                 app: Any, timeouts: Upgrade) -> None:
        self.transport = transport
        self.timeouts = timeouts  # ping_interval, ping_timeout, close_timeout
        self.protocol = protocol
        self.app = app
        self.loop = loop
        self.open = False
        self.closed = False
        # The peer's address, kept instead of the handshake request: an idle connection holds no header.
        self.peer = ""
        # One buffer, not a list of pieces: a flood of tiny or empty continuation frames then costs
        # no more memory than the message it builds, which max_size bounds.
        self.fragments = bytearray()
        self.fragment_opcode: Any = None
        self.utf8: Any = None
        self.ping_payload: Optional[bytes] = None
        self.ping_timer: Optional[asyncio.TimerHandle] = None
        self.close_timer: Optional[asyncio.TimerHandle] = None
        self.flush_scheduled = False
        self.reading = False  # in data_received, which flushes once at its end: sends need no flush of their own
        self.unflushed = 0  # bytes of messages sent since the last flush, still in the protocol's queue
        # Where the incoming stream's frames end (see _frame_end): the protocol is fed one frame at a time.
        self.frame_head = bytearray()
        self.frame_left = 0
        self.frame_opcode = -1

    # -- bytes in ------------------------------------------------------------------------------------------

    @property
    def client(self) -> str:
        """The peer's address."""
        return self.peer

    def start(self, request: Request, head: bytes, rest: bytes) -> Optional[Response]:
        """Run the opening handshake on the raw request head, then any frames that followed it.

        Returns the refusal to send as plain HTTP when websockets cannot answer the handshake itself
        (the socket then stays the connection's); None once the bridge has answered it."""
        self.peer = request.client
        # The head alone: frames fed with it would be parsed before the handshake is answered, and
        # a bad one would queue the protocol's EOF ahead of the response.
        self.protocol.receive_data(head)
        events = self.protocol.events_received()
        ws_request = events[0] if events and isinstance(events[0], WsRequest) else None
        response = None
        if ws_request is None:
            # websockets' parser is stricter than ours (HTTP/1.1 only, no body, lines up to 8 KiB)
            # and has already queued its EOF, so it cannot send a response: answer as plain HTTP.
            exc = self.protocol.handshake_exc
            reason = str(exc.__cause__ if exc is not None and exc.__cause__ is not None else exc)
        else:
            try:
                response = self.protocol.accept(ws_request)
            except UnicodeError:  # its refusal quotes the offending header, which it cannot encode
                reason = "a WebSocket header holds bytes that are not ASCII"
            else:
                if response.status_code == 500:
                    # websockets answers 500 when a header breaks it in a way it did not foresee (a
                    # non-ASCII Sec-WebSocket-Key): that is the client's input, so a 400 (PROTOCOL.md §3).
                    reason, response = str(self.protocol.handshake_exc), None
        if response is None:
            self.closed = True
            refusal = error_response(HttpError(400, f"malformed WebSocket handshake: {show(reason, 160)}"))
            refusal.close = True
            return refusal
        if response.status_code != 101:
            # PROTOCOL.md §3: every error is JSON {"detail"}; websockets words its refusals in plain text.
            body = json.dumps({"detail": response.body.decode("utf-8", "replace").strip()}).encode()
            for name in ("Content-Type", "Content-Length"):
                del response.headers[name]
            response.headers["Content-Type"] = "application/json"
            response.headers["Content-Length"] = str(len(body))
            response.headers["Server"] = SERVER_NAME
            response.body = body
        self.protocol.send_response(response)
        if ws_request is not None:
            # websockets' parser keeps the parsed handshake for the connection's life (a local of its
            # generator); its headers are not needed past the response, and are most of an idle socket's memory.
            ws_request.headers.clear()
        self.flush()
        if response.status_code != 101:
            self.closed = True
            self._arm_close_timer()
            return None
        self.open = True
        self._schedule_ping()
        self.app.on_open(self)
        if rest:
            self.data_received(rest)
        return None

    def data_received(self, data: bytes) -> None:
        # One frame at a time, each handled before the next is parsed: when a bad frame follows good
        # ones in the same read, the replies to the good ones go out before the close (Autobahn 3.2, 5.15).
        # A memoryview, so that a read of many tiny frames costs no copy of its rest per frame.
        view = memoryview(data)
        self.reading = True
        try:
            while view:
                if self.closed and not self.protocol.close_expected():
                    break
                cut = self._frame_end(view)
                piece, view = view[:cut], view[cut:]
                if self.frame_opcode == _CLOSE and getattr(self.protocol, "cur_size", None) is not None:
                    # RFC 6455 §5.4: a Close may come between the fragments of a message; the partial message
                    # is dropped and the Close answered as usual. websockets would fail with 1002 (Autobahn 7.1.5).
                    self.protocol.cur_size = None
                try:
                    self.protocol.receive_data(piece)
                except EOFError:
                    break
                self._handle_events(self.protocol.events_received())
        finally:
            self.reading = False
        # Once per read: one write for all the replies it caused, a whole echo turn's frames among them
        # (the hub runs such a turn within this read), with no loop pass before they leave.
        self.flush()

    def _frame_end(self, data: memoryview) -> int:
        """How much of ``data`` runs to the end of the first frame that ends in it (all of it if none does)."""
        pos = 0
        while True:
            if self.frame_left:
                if self.frame_left > len(data) - pos:
                    self.frame_left -= len(data) - pos
                    return len(data)
                pos += self.frame_left
                self.frame_left = 0
                return pos
            head = bytes(self.frame_head) + data[pos:pos + 14]
            if len(head) >= 2:
                length = head[1] & 0x7F
                extra = 2 if length == 126 else 8 if length == 127 else 0
                size = 2 + extra + (4 if head[1] & 0x80 else 0)
                if len(head) >= size:
                    if extra:
                        length = int.from_bytes(head[2:2 + extra], "big")
                    pos += size - len(self.frame_head)
                    self.frame_head = bytearray()
                    self.frame_opcode = head[0] & 0x0F
                    self.frame_left = length
                    if not length:
                        return pos
                    continue
            self.frame_head += data[pos:]
            return len(data)

    def eof_received(self) -> Optional[bool]:
        self.protocol.receive_eof()
        self.flush()
        self._handle_events(self.protocol.events_received())
        return None

    def connection_lost(self, exc: Optional[Exception]) -> None:
        for timer in (self.ping_timer, self.close_timer):
            if timer is not None:
                timer.cancel()
        if self.open:
            self.open = False
            self.app.on_close(self)
        self.closed = True

    def _handle_events(self, events: Sequence[Any]) -> None:
        for frame in events:
            opcode = frame.opcode
            if opcode is Opcode.PONG:
                if self.ping_payload is not None and frame.data == self.ping_payload:
                    self.ping_payload = None
                continue
            if opcode is Opcode.CLOSE:
                self._closing()
                continue
            if opcode is Opcode.PING or not self.open:
                continue
            if opcode in (Opcode.TEXT, Opcode.BINARY):
                self.fragment_opcode = opcode
                self.fragments = bytearray()
                self.utf8 = codecs.getincrementaldecoder("utf-8")() if opcode is Opcode.TEXT else None
            if self.utf8 is not None:
                try:
                    self.utf8.decode(frame.data, final=frame.fin)
                except UnicodeDecodeError as exc:
                    # Fail fast on invalid text, fragment by fragment (RFC 6455 §8.1).
                    self.fail(CloseCode.INVALID_DATA, f"invalid UTF-8 in text message: {exc.reason}")
                    return
            if not frame.fin:
                self.fragments += frame.data
            else:
                payload = bytes(self.fragments + frame.data) if self.fragments else bytes(frame.data)
                self.fragments = bytearray()
                message: Union[str, bytes] = payload.decode() if self.fragment_opcode is Opcode.TEXT else payload
                self.app.on_message(self, message)
                if self.closed:
                    return
        if self.protocol.close_expected():
            self._closing()

    # -- bytes out -----------------------------------------------------------------------------------------

    def flush(self) -> None:
        self.flush_scheduled = False
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        outgoing = self.protocol.data_to_send()
        self.unflushed = 0
        # Frames the protocol made itself (pongs) are judged here, messages in send_text/send_binary.
        # `sendable`, not `open`: fail() flushes its own close frame through here, which must not fail
        # again (that recursed without end).
        if outgoing and self._too_far_behind() and self.sendable:
            self._cut_off_slow_consumer()
            return
        pending: List[bytes] = []
        for data in outgoing:
            if data:
                pending.append(data)
                continue
            if pending:
                transport.write(b"".join(pending))
                pending = []
            if transport.can_write_eof():
                transport.write_eof()
        if pending:
            # One write (one syscall) for all the frames queued in this loop iteration.
            transport.write(b"".join(pending))

    @property
    def sendable(self) -> bool:
        # The protocol may already be closing while we still handle the messages that came in the same
        # read as the peer's close frame; websockets refuses to send then.
        return self.open and not self.closed and self.protocol.state is WsState.OPEN

    def send_text(self, text: str) -> None:
        if self.sendable:
            self._queue(text.encode(), self.protocol.send_text)

    def send_binary(self, data: bytes) -> None:
        if self.sendable:
            self._queue(data, self.protocol.send_binary)

    def _queue(self, data: bytes, send: Callable[[bytes], None]) -> None:
        if self._too_far_behind():
            self._cut_off_slow_consumer()
            return
        send(data)
        self.unflushed += len(data)
        self._flush_soon()

    def _too_far_behind(self) -> bool:
        # Judged before adding more: one message bigger than the bound (the echo route takes 16 MiB) is
        # no slow consumer; a peer still that far behind when more is to be sent is.
        transport = self.transport
        return transport is not None and transport.get_write_buffer_size() + self.unflushed > WS_MAX_SEND_BUFFER

    def _cut_off_slow_consumer(self) -> None:
        # Clawdbot's rule too: a peer that does not read is cut off, not buffered for; what was still to
        # be sent is dropped and the close frame queued behind the backlog instead.
        self.protocol.data_to_send()
        self.unflushed = 0
        self.fail(CloseCode.POLICY_VIOLATION, f"slow consumer: the client fell {WS_MAX_SEND_BUFFER >> 20} MiB behind in reading its messages")

    def _flush_soon(self) -> None:
        # The events of a turn are often emitted in one loop iteration; sending them together saves
        # a syscall (and a GIL hand-off to the writer thread) per frame. Within data_received, its own
        # flush at the end of the read sends them.
        if not self.flush_scheduled and not self.reading:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        if self.sendable:
            self.protocol.send_close(code, close_reason(reason))
            self.flush()
            self._closing()

    def fail(self, code: int, reason: str = "") -> None:
        if not self.closed:
            self.protocol.fail(code, close_reason(reason))
            self.flush()
            self._closing()

    def shutdown(self) -> None:
        self.close(CloseCode.GOING_AWAY, "server shutting down")

    def _closing(self) -> None:
        if self.open:
            self.open = False
            self.app.on_close(self)
        self.closed = True
        if self.ping_timer is not None:
            self.ping_timer.cancel()
        self._arm_close_timer()

    def _arm_close_timer(self) -> None:
        if self.close_timer is None:
            self.close_timer = self.loop.call_later(self.timeouts.close_timeout, self._abort)

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- keepalive -----------------------------------------------------------------------------------------

    def _schedule_ping(self) -> None:
        self.ping_timer = self.loop.call_later(self.timeouts.ping_interval, self._ping)

    def _ping(self) -> None:
        if not self.open:
            return
        if self.ping_payload is not None:
            self.fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
            return
        self.ping_payload = os.urandom(4)
        self.protocol.send_ping(self.ping_payload)
        self.flush()
        self.ping_timer = self.loop.call_later(self.timeouts.ping_timeout, self._ping)


def open_bridge(transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, upgrade: Upgrade) -> WebSocketBridge:
    """The bridge that takes a connection's socket over for ``upgrade`` (``uagw.server.OpenBridge``)."""
    protocol = ServerProtocol(
        subprotocols=[WS_SUBPROTOCOL],
        select_subprotocol=select_subprotocol,
        max_size=upgrade.max_message,
        logger=ws_logger,
    )
    return WebSocketBridge(transport, loop, protocol, upgrade.app, upgrade)


class EchoApp:
    """WS /ws/echo (only with --ws-echo): every message back unchanged, for conformance suites."""

    def on_open(self, bridge: WebSocketBridge) -> None:
        pass

    def on_message(self, bridge: WebSocketBridge, message: Union[str, bytes]) -> None:
        if isinstance(message, str):
            bridge.send_text(message)
        else:
            bridge.send_binary(message)

    def on_close(self, bridge: WebSocketBridge) -> None:
        pass

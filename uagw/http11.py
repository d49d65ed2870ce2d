"""HTTP/1.1 messages, Sans-I/O (RFC 9112): ``RequestParser`` takes bytes and gives ``Request`` objects or
raises ``HttpError``; ``serialize_response`` turns a ``Response`` into bytes. No asyncio, no sockets.

One function builds the error shape (``error_response``, docs/PROTOCOL.md §3.5); every response is JSON
unless it serves a static file.

May import: the standard library, ``uagw.limits`` and ``uagw.text``.
"""

from __future__ import annotations

import email.utils
import http
import json
import re
from typing import Any, AsyncIterator, Callable, List, Optional, Sequence, Tuple

from .limits import (
    MAX_BODY_BYTES, MAX_CHUNKED_OVERHEAD, MAX_CHUNK_LINE, MAX_HEADER_COUNT, MAX_HEAD_BYTES, MAX_INT_DIGITS,
    MAX_REQUEST_LINE, SERVER_NAME,
)
from .text import PerSecond, show

__all__ = [
    "HttpError",
    "INT_RE",
    "OWS",
    "Request",
    "RequestParser",
    "Response",
    "StreamingResponse",
    "error_response",
    "http_date",
    "json_response",
    "serialize_response",
    "serialize_stream_head",
]


class HttpError(Exception):
    """A request the gateway answers with an error status; ``detail`` tells the client what to do."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        headers: Sequence[Tuple[str, str]] = (),
        close: bool = False,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = list(headers)
        self.close = close


_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 §5.6.2 token
_TARGET_RE = re.compile(rb"/[\x21-\x7e]*")  # origin-form, visible ASCII only (RFC 9112 §3.2)
_VERSION_RE = re.compile(rb"HTTP/[0-9](\.[0-9])?")
INT_RE = re.compile(r"[+-]?[0-9]+")
_DIGITS_RE = re.compile(r"[0-9]+")  # str.isdigit() also accepts "²", which int() refuses
# RFC 9110 §5.5: a field value is visible characters, SP and HTAB; any other control character is
# refused, since a proxy in front may read it differently (request smuggling, log injection).
_FIELD_VALUE_BAD_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
OWS = " \t"  # RFC 9110 §5.6.3 optional whitespace; str.strip() would also drop \x0b, \x1c-\x1f, \x85, \xa0
# RFC 9112 §7.1 and §7.1.1: chunk = chunk-size [ chunk-ext ] CRLF, chunk-size = 1*HEXDIG (at most 16 here:
# 64 bits), chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS ( token / quoted-string ) ]). Nothing
# else is allowed on the line: a front end that ends the line at a bare LF, or skips a NUL, would read
# different chunk boundaries than ours and could hide a second request in chunk data.
_QUOTED_STRING = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'  # RFC 9110 §5.6.4
_CHUNK_EXT = rb"(?:[ \t]*;[ \t]*%s(?:[ \t]*=[ \t]*(?:%s|%s))?)*" % (
    _TOKEN_RE.pattern, _TOKEN_RE.pattern, _QUOTED_STRING,
)
_CHUNK_LINE_RE = re.compile(rb"([0-9A-Fa-f]{1,16})%s" % _CHUNK_EXT)


class Request:
    """One parsed HTTP request. Header names are lower-case; values are latin-1 decoded strings."""

    __slots__ = (
        "method",
        "target",
        "path",
        "query_string",
        "version",
        "headers",
        "body",
        "raw_head",
        "keep_alive",
        "upgrade",
        "client",
        "started",
    )

    def __init__(self, method: str, target: str, version: str, headers: List[Tuple[str, str]]) -> None:
        self.method = method
        self.target = target
        self.path, _, self.query_string = target.partition("?")
        self.version = version
        self.headers = headers
        self.body = b""
        self.raw_head = b""
        self.keep_alive = True
        self.upgrade = False
        self.client = ""
        self.started = 0.0

    def header(self, name: str, default: Optional[str] = None) -> Optional[str]:
        """The last value of a header (names are case-insensitive), or ``default``."""
        for key, value in reversed(self.headers):
            if key == name:
                return value
        return default

    def header_tokens(self, name: str) -> List[str]:
        """All comma-separated tokens of every instance of a header, lower-cased."""
        return [
            token.strip(OWS).lower()
            for key, value in self.headers
            if key == name
            for token in value.split(",")
            if token.strip(OWS)
        ]


def _parse_field_line(line: bytes, kind: str) -> Tuple[str, str]:
    """A header or trailer line (RFC 9112 §5): ``(lower-case name, value)``, or a 400 that closes."""
    name, colon, value = line.partition(b":")
    if not colon or not _TOKEN_RE.fullmatch(name):
        # Also catches obs-fold (a line starting with whitespace), which RFC 9112 §5.2 lets us reject.
        raise HttpError(400, f"malformed {kind} line {show(line)}", close=True)
    value = value.strip(b" \t")
    if _FIELD_VALUE_BAD_RE.search(value):
        raise HttpError(400, f"{kind} {show(name)} contains a control character (CR, LF, NUL, ...)", close=True)
    return name.decode("ascii").lower(), value.decode("latin-1")


class RequestParser:
    """Turns the bytes of one connection into ``Request`` objects, enforcing PROTOCOL.md §3's limits.

    Call ``feed(data)`` with bytes as they arrive, then ``next_request()`` until it returns None (more
    bytes needed). A malformed request raises ``HttpError``; after one with ``close=True`` the stream is
    out of sync and the connection must be closed. Not thread-safe (one per connection).
    """

    def __init__(self, max_head: int = MAX_HEAD_BYTES, max_body: int = MAX_BODY_BYTES) -> None:
        self.max_head = max_head
        self.max_body = max_body
        self._buffer = bytearray()
        self._pending: Optional[Request] = None  # head parsed, body still arriving
        self._body_length = 0  # Content-Length of the pending request
        self._chunked: Optional[_ChunkedBody] = None
        self.expects_continue = False  # the pending request asked for "100 Continue"

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def in_request(self) -> bool:
        """True while part of a request has arrived (so the head or body timeout applies)."""
        return self._pending is not None or bool(self._buffer.lstrip(b"\r\n"))

    @property
    def in_body(self) -> bool:
        return self._pending is not None

    @property
    def pending_head(self) -> Optional[Request]:
        """The request whose head has arrived and whose body is still arriving, if any."""
        return self._pending

    def take_remaining(self) -> bytes:
        """Hand over what follows the last request (the first WebSocket frames after an upgrade)."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def next_request(self) -> Optional[Request]:
        if self._pending is None:
            request = self._parse_head()
            if request is None:
                return None
        request = self._pending
        assert request is not None
        if self._chunked is not None:
            body = self._chunked.feed(self._buffer)
            if body is None:
                return None
            request.body = body
        elif self._body_length:
            if len(self._buffer) < self._body_length:
                return None
            request.body = bytes(self._buffer[: self._body_length])
            del self._buffer[: self._body_length]
        self._pending = None
        self._chunked = None
        self._body_length = 0
        self.expects_continue = False
        return request

    def _parse_head(self) -> Optional[Request]:
        # RFC 9112 §2.2: a server SHOULD ignore empty lines received before the request line.
        while self._buffer[:2] == b"\r\n":
            del self._buffer[:2]
        end = self._buffer.find(b"\r\n\r\n", 0, self.max_head + 4)
        if end < 0:
            if len(self._buffer) > self.max_head:
                raise HttpError(
                    431, f"request head exceeds {self.max_head} bytes; send fewer or shorter headers",
                    close=True,
                )
            first_line_end = self._buffer.find(b"\r\n")
            if first_line_end < 0 and len(self._buffer) > MAX_REQUEST_LINE:
                raise HttpError(414, f"request line exceeds {MAX_REQUEST_LINE} bytes", close=True)
            if b"\n\n" in self._buffer and b"\r\n\r\n" not in self._buffer:
                raise HttpError(400, "header lines must end with CRLF (RFC 9112 §2.2)", close=True)
            return None
        raw_head = bytes(self._buffer[: end + 4])
        del self._buffer[: end + 4]
        request = self._parse_head_bytes(raw_head[:-4])
        request.raw_head = raw_head
        self._pending = request
        return request

    def _parse_head_bytes(self, head: bytes) -> Request:
        lines = head.split(b"\r\n")
        request_line = lines[0]
        if len(request_line) > MAX_REQUEST_LINE:
            raise HttpError(414, f"request line exceeds {MAX_REQUEST_LINE} bytes", close=True)
        parts = request_line.split(b" ")
        if len(parts) != 3:
            raise HttpError(400, f"malformed request line {show(request_line)}", close=True)
        method, target, version = parts
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            if _VERSION_RE.fullmatch(version):
                raise HttpError(505, f"HTTP version {show(version)} is not supported; use HTTP/1.1", close=True)
            raise HttpError(400, f"malformed HTTP version {show(version)}", close=True)
        if not _TOKEN_RE.fullmatch(method):
            raise HttpError(400, f"malformed method {show(method)}", close=True)
        if not _TARGET_RE.fullmatch(target):
            raise HttpError(
                400,
                f"request target {show(target)} must be a path starting with '/' in visible ASCII "
                "(percent-encode anything else)",
                close=True,
            )
        if len(lines) - 1 > MAX_HEADER_COUNT:
            raise HttpError(431, f"more than {MAX_HEADER_COUNT} header fields", close=True)
        headers = [_parse_field_line(line, "header") for line in lines[1:]]
        request = Request(method.decode("ascii"), target.decode("ascii"), version.decode("ascii"), headers)
        self._frame_body(request)
        connection = request.header_tokens("connection")
        if request.version == "HTTP/1.1":
            request.keep_alive = "close" not in connection
            hosts = [v for k, v in headers if k == "host"]
            if len(hosts) != 1:
                # close: the body (framed above) was not read, so the stream is out of sync.
                raise HttpError(400, "an HTTP/1.1 request needs exactly one Host header (RFC 9112 §3.2)", close=True)
        else:
            request.keep_alive = "keep-alive" in connection
        request.upgrade = (
            request.method == "GET"
            and "upgrade" in connection
            and "websocket" in request.header_tokens("upgrade")
        )
        return request

    def _frame_body(self, request: Request) -> None:
        """Work out how the body is delimited (RFC 9112 §6), refusing anything that could smuggle.

        Framing headers are read from their raw values, never through ``header_tokens``, which drops
        empty list elements: ``Transfer-Encoding:`` (empty) or ``Content-Length: ,2`` must not pass as
        absent or as ``2``, since a front end may read them otherwise.
        """
        lengths = [value for name, value in request.headers if name == "content-length"]
        encodings = [value for name, value in request.headers if name == "transfer-encoding"]
        if encodings:
            codings = [coding.strip(OWS).lower() for value in encodings for coding in value.split(",")]
            if lengths:
                raise HttpError(
                    400, "Content-Length and Transfer-Encoding together are not allowed (RFC 9112 §6.1)",
                    close=True,
                )
            if request.version != "HTTP/1.1":
                raise HttpError(400, "Transfer-Encoding requires HTTP/1.1", close=True)
            if not all(codings):
                raise HttpError(
                    400, f"Transfer-Encoding {show(encodings)} has an empty element; send exactly 'chunked'",
                    close=True,
                )
            if codings[-1] != "chunked":
                raise HttpError(400, "chunked must be the final transfer coding (RFC 9112 §6.3)", close=True)
            if len(codings) > 1:
                # RFC 9112 §6.1 suggests 501, but PROTOCOL.md §3 allows no 5xx for client input: a 400 it is.
                raise HttpError(
                    400, f"transfer codings {show(codings[:-1])} are not supported; send the body chunked "
                    "or with Content-Length", close=True,
                )
            self._chunked = _ChunkedBody(self.max_body)
        elif lengths:
            # One decimal number per field line; a list ("2, 2", ",2", "2,") is refused even where RFC 9110
            # §8.6 would let us fold it, since front ends disagree on it. Repeated field lines are accepted
            # only when spelt alike (RFC 9110 §8.6), so "2" and "02" are refused as front ends that compare
            # the text (h11 does) would.
            if not all(_DIGITS_RE.fullmatch(value) and len(value) <= MAX_INT_DIGITS for value in lengths):
                raise HttpError(
                    400, f"malformed Content-Length {show(lengths)}; send one decimal number, not a list",
                    close=True,
                )
            if len(set(lengths)) != 1:
                raise HttpError(400, f"conflicting Content-Length values {show(lengths)}", close=True)
            self._body_length = int(lengths[0])
            if self._body_length > self.max_body:
                raise HttpError(
                    413, f"request body of {self._body_length} bytes exceeds the limit of {self.max_body}",
                    close=True,
                )
        expect = request.header("expect")
        if expect is not None:
            if expect.lower() != "100-continue":
                raise HttpError(417, f"unsupported Expect value {show(expect)}", close=True)
            self.expects_continue = request.version == "HTTP/1.1" and (
                self._chunked is not None or self._body_length > 0
            )


class _ChunkedBody:
    """Incremental decoder of a chunked body (RFC 9112 §7.1); trailers are checked, then ignored."""

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.body = bytearray()
        self.remaining = -1  # bytes left in the current chunk; -1 = expecting a size line
        self.in_trailers = False
        self.trailers = 0  # trailer fields seen, bounded like header fields
        self.consumed = 0  # raw bytes taken from the stream, for the overhead limit

    def feed(self, buffer: bytearray) -> Optional[bytes]:
        """Consume what it can from ``buffer``; the body once complete, else None."""
        while True:
            if self.consumed - len(self.body) > MAX_CHUNKED_OVERHEAD:
                raise HttpError(400, "chunked framing overhead is excessive; send larger chunks", close=True)
            if self.remaining > 0:
                take = min(self.remaining, len(buffer))
                if take == 0:
                    return None
                self.body += buffer[:take]
                del buffer[:take]
                self.consumed += take
                self.remaining -= take
                continue
            if self.remaining == 0:  # the CRLF after chunk data
                if len(buffer) < 2:
                    return None
                if buffer[:2] != b"\r\n":
                    raise HttpError(400, "chunk data not followed by CRLF", close=True)
                del buffer[:2]
                self.consumed += 2
                self.remaining = -1
                continue
            line = self._take_line(buffer)
            if line is None:
                return None
            if self.in_trailers:
                if not line:
                    return bytes(self.body)
                self._check_trailer(line)
                continue
            match = _CHUNK_LINE_RE.fullmatch(line)
            if match is None:
                raise HttpError(
                    400, f"malformed chunk line {show(line)}; send hex digits, then only RFC 9112 §7.1.1 "
                    "extensions", close=True,
                )
            size = int(match.group(1), 16)
            if size == 0:
                self.in_trailers = True
                continue
            if len(self.body) + size > self.max_body:
                raise HttpError(413, f"request body exceeds the limit of {self.max_body} bytes", close=True)
            self.remaining = size

    def _take_line(self, buffer: bytearray) -> Optional[bytes]:
        """The next chunk or trailer line without its CRLF, or None until it is complete.

        RFC 9112 §7.1: these lines end in CRLF exactly. A bare LF is refused as soon as it arrives, since
        a front end may have ended the line there (and so framed the body differently).
        """
        end = buffer.find(b"\n", 0, MAX_CHUNK_LINE)
        if end < 0:
            if len(buffer) >= MAX_CHUNK_LINE:
                raise HttpError(400, f"chunk line exceeds {MAX_CHUNK_LINE} bytes", close=True)
            return None
        if end == 0 or buffer[end - 1] != 0x0D:
            raise HttpError(
                400, f"chunk line {show(bytes(buffer[: end + 1]))} ends in a bare LF; end it with CRLF",
                close=True,
            )
        line = bytes(buffer[: end - 1])
        del buffer[: end + 1]
        self.consumed += end + 1
        return line

    def _check_trailer(self, line: bytes) -> None:
        """RFC 9112 §7.1.2: a trailer has field syntax; its value is never used."""
        self.trailers += 1
        if self.trailers > MAX_HEADER_COUNT:
            raise HttpError(400, f"more than {MAX_HEADER_COUNT} trailer fields", close=True)
        _parse_field_line(line, "trailer")


_REASONS = {status.value: status.phrase for status in http.HTTPStatus}
_REASONS[507] = "Insufficient Storage"


class Response:
    """A complete HTTP response: status, extra headers, body bytes."""

    __slots__ = ("status", "headers", "body", "content_type", "close")

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        *,
        content_type: str = "application/json",
        headers: Optional[List[Tuple[str, str]]] = None,
        close: bool = False,
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers if headers is not None else []
        self.close = close


class StreamingResponse(Response):
    """A response whose body is produced while it is sent (PROTOCOL.md §13: Server-Sent Events): the
    server writes ``source``'s chunks with ``Transfer-Encoding: chunked``, awaiting the next one only
    while the peer keeps up, and the zero chunk when it ends. ``stop()`` asks the source to end soon
    (gateway stop); a lost connection closes it (``aclose``). ``body`` stays empty."""

    __slots__ = ("source", "stop")

    def __init__(self, status: int, source: AsyncIterator[bytes], stop: Callable[[], None], *,
                 content_type: str = "text/event-stream; charset=utf-8",
                 headers: Optional[List[Tuple[str, str]]] = None) -> None:
        super().__init__(status, content_type=content_type, headers=headers)
        self.source = source
        self.stop = stop


def json_response(status: int, payload: Any, headers: Optional[List[Tuple[str, str]]] = None) -> Response:
    return Response(status, json.dumps(payload, separators=(",", ":")).encode(), headers=headers)


def error_response(error: HttpError) -> Response:
    """The one error shape of PROTOCOL.md §3: ``{"detail": ...}`` with the error's status."""
    return json_response(error.status, {"detail": error.detail}, list(error.headers))


http_date = PerSecond(lambda second: email.utils.formatdate(second, usegmt=True))


def serialize_response(response: Response, keep_alive: bool, head_only: bool = False) -> bytes:
    lines = [
        f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Unknown')}",
        f"Date: {http_date()}",
        f"Server: {SERVER_NAME}",
        f"Content-Length: {len(response.body)}",
    ]
    if response.body or response.status not in (204, 304):
        lines.append(f"Content-Type: {response.content_type}")
    lines.append("X-Content-Type-Options: nosniff")
    if response.content_type == "application/json" and not any(n == "Cache-Control" for n, _ in response.headers):
        lines.append("Cache-Control: no-store")
    lines.extend(f"{name}: {value}" for name, value in response.headers)
    if not keep_alive:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + response.body


def serialize_stream_head(response: StreamingResponse, keep_alive: bool) -> bytes:
    """The head of a chunked streaming answer: never cached, never buffered by a proxy (nginx honours
    ``X-Accel-Buffering: no``), so each event reaches the client as it is written."""
    lines = [
        f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Unknown')}",
        f"Date: {http_date()}",
        f"Server: {SERVER_NAME}",
        "Transfer-Encoding: chunked",
        f"Content-Type: {response.content_type}",
        "X-Content-Type-Options: nosniff",
        "Cache-Control: no-store",
        "X-Accel-Buffering: no",
    ]
    lines.extend(f"{name}: {value}" for name, value in response.headers)
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

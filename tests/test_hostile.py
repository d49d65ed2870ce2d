"""Hostile input over raw sockets: nothing crashes, nothing outside the root is touched, nobody gets in.

A generated corpus of malformed and malicious HTTP requests and WebSocket abuse is thrown at one real
gateway (``--ws-echo``, so the echo route is abused too). After every connection or pipelined batch:

* no response is a 5xx (505 for a foreign HTTP version excepted), and none holds a traceback;
* every well-formed request in a batch got exactly one answer, in order;
* the gateway still answers health, and its stderr holds no traceback;
* nothing next to the workspaces root changed: a sentinel tree there (a directory that looks like a
  session, a "secret", a fake /etc/passwd) is snapshotted before and compared after, and sessions
  inside the root hold symlinks an agent could plant (``run.log -> ../../secret.txt``, a session
  directory that is a link to the outside).

The corpus is data, built by the functions below; the counts are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import re
import select
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple
from urllib.parse import unquote

import pytest
from websockets.asyncio.client import connect

from uagw.limits import MAX_USER_ID_CHARS
from conftest import (
    TRACEBACK_MARKERS, WatchedGateway, close_frame, launch, parse_responses, rss_mib, snapshot_tree, start_watched,
    ws_frame,
)

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3's sample key
TOKEN = "hostile-suite-token"

# The same hostile value in every encoding that has ever walked out of a web root. "victim" is a
# directory next to the workspaces root that looks like a session; "escape" is a session-named
# symlink inside the root that points at it.
TRAVERSALS: Tuple[str, ...] = (
    "..", ".", "...", "....", "../victim", "..%2fvictim", "..%2Fvictim", "%2e%2e", "%2E%2E", ".%2e", "%2e.",
    "%2e%2e%2fvictim", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
    "%252e%252e", "%252e%252e%252fvictim", "..%252fvictim", "%25%32%65%25%32%65",
    "%c0%ae%c0%ae", "%c0%ae%c0%ae%c0%afvictim", "%e0%80%ae%e0%80%ae", "..%c0%afvictim", "..%c1%9cvictim",
    "%f0%80%80%ae", "..\\victim", "..%5cvictim", "%5c..%5cvictim", "%2e%2e%5c%2e%2e%5cvictim",
    "victim%00", "%00", "..%00", "s1%00..", "s1%00", "%e2%80%a4%e2%80%a4", "%e2%80%a5", "%ef%bc%8e%ef%bc%8e",
    "%ef%bc%8f", "%u002e%u002e", "..;", "..;%2fvictim", "....%2f%2fvictim", "%2fetc%2fpasswd", "%2f", "~",
    "~root", "%7e", "_gateway", "_gateway%2fgateway.log", "s1%2f..%2f..%2fvictim", "s1%2f..", "escape",
    "%ff", "%c3%28", "%80", "%0d%0aInjected:%201", "%09", "%20", "x" * 129, "a" * 3000, "%", "%%", "%zz",
)


def traversal_slots(x: str) -> List[Tuple[str, str, Optional[bytes], Sequence[int]]]:
    """(method, target, JSON body, acceptable statuses) for one hostile value in every parameter."""
    body = unquote(x, errors="surrogateescape")
    as_json = json.dumps(body).encode()
    lone_surrogate = any("\ud800" <= ch <= "\udfff" for ch in body)
    not_found_or_bad = (400, 404)
    return [
        ("GET", f"/api/v1/ops/sessions/{x}", None, not_found_or_bad),
        ("GET", f"/api/v1/ops/sessions/{x}/preview", None, not_found_or_bad),
        ("POST", f"/api/v1/ops/sessions/{x}/reset", b"{}", not_found_or_bad),
        ("POST", f"/api/v1/ops/sessions/{x}/compact", b'{"max_lines": 0}', not_found_or_bad),
        ("DELETE", f"/api/v1/ops/sessions/{x}?confirm=true&force=true", None, not_found_or_bad),
        ("GET", f"/api/v1/sessions/{x}/stream", None, (400, 404, 426)),  # 426: a valid id, but not an upgrade
        ("GET", f"/console/{x}", None, (404,)),
        ("GET", f"/api/v1/ops/logs/tail?session_id={x}", None, not_found_or_bad),
        ("GET", f"/api/v1/ops/logs/tail?session_id={x}&file=run.log", None, not_found_or_bad),
        ("GET", f"/api/v1/ops/logs/tail?session_id=s1&file={x}", None, (400,)),
        ("GET", f"/api/v1/ops/logs/tail?file={x}", None, (400,)),
        ("GET", f"/api/v1/ops/logs/tail?session_id=s1&cursor={x}", None, (400,)),
        ("GET", f"/api/v1/ops/logs/tail?cursor={x}", None, (400,)),
        ("GET", f"/api/v1/ops/sessions/s1/preview?cursor={x}", None, (400,)),
        ("GET", f"/api/v1/ops/sessions?status={x}", None, (400,)),
        ("GET", f"/api/v1/ops/sessions?limit={x}", None, (400,)),
        ("GET", f"/api/v1/ops/sessions?offset={x}", None, (400,)),
        ("GET", f"/api/v1/ops/logs/tail?session_id=s1&limit={x}", None, (400,)),
        ("GET", f"/api/v1/ops/sessions/s1/preview?max_bytes={x}", None, (400,)),
        ("DELETE", f"/api/v1/ops/sessions/s1?confirm={x}", None, (400,)),
        ("DELETE", f"/api/v1/ops/sessions/s1?confirm=true&force={x}", None, (400,)),
        ("GET", f"/ws/agent?session_id={x}", None, (426,)),
        ("POST", "/api/v1/ops/sessions/s1/reset", b'{"clear_logs": ' + as_json + b"}", (400,)),
        # Unknown fields are ignored (as UA's pydantic models ignore them): a hostile one does no harm,
        # unless it is not text at all (a lone surrogate from an undecodable byte), which no JSON body may hold.
        ("POST", "/api/v1/ops/sessions/s1/reset", b'{"clear_memory": true, "clear_logs": false, "x": ' + as_json + b"}",
         (400,) if lone_surrogate else (200,)),
        ("POST", "/api/v1/ops/sessions/s1/compact", b'{"max_lines": ' + as_json + b"}", (400,)),
        ("POST", "/api/v1/ops/sessions/s1/compact", b'{"max_bytes": ' + as_json + b"}", (400,)),
        ("POST", "/api/v1/ops/sessions/s1/reset", b'{"clear_logs": false, ' + as_json + b": true}",
         (400,) if lone_surrogate else (200,)),
        # An empty session_id is no session_id (as in Universal Agent): a new session.
        ("POST", "/api/v1/sessions", b'{"session_id": ' + as_json + b"}", (400,) if body else (200,)),
        ("POST", "/api/v1/sessions", b'{"workspace_dir": ' + as_json + b"}", (200, 400)),  # 200: a name under the root
        ("POST", "/api/v1/sessions", b'{"user_id": ' + as_json + b"}",
         (400,) if lone_surrogate or len(body.strip()) > MAX_USER_ID_CHARS else (200,)),
    ]


ROUTES = (
    "/", "/console/app.js", "/api/v1/openapi.json", "/api/v1/health", "/api/v1/ops/sessions",
    "/api/v1/ops/sessions/s-matrix", "/api/v1/ops/sessions/s-matrix/preview", "/api/v1/ops/sessions/s-matrix/reset",
    "/api/v1/ops/sessions/s-matrix/compact", "/api/v1/ops/logs/tail", "/api/v1/sessions",
    "/api/v1/sessions/s-matrix/stream", "/ws/agent", "/ws/echo",
)
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "FOO", "get")  # HEAD, CONNECT: below


def request_bytes(method: str, target: str, body: Optional[bytes] = None, extra: str = "") -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n{extra}"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode("latin-1") + b"\r\n" + (body or b"")


def single_requests() -> Iterator[Tuple[str, bytes]]:
    """Malformed requests, each on a connection of its own (most of them close it)."""
    health = b"/api/v1/health"
    for method in (b"", b"G ET", b"GET\x00", b"G\xc3\xa9T", b"GET\t", b"(GET)", b"GET:", b"\x16\x03\x01\x02\x00",
                   b"g" * 10000, b"GET" * 3000, b"\xff\xfe", b"PRI"):
        yield "method", method + b" " + health + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    for target in (b"", b"*", b"http://evil/api/v1/health", b"//api/v1/health", b"/api/v1/health#frag", b"/a b",
                   b"/\x00", b"/\x7f", b"/\xff", b"/api/v1/health?\xff", b"/" + b"a" * 9000, b"/%", b"/%zz",
                   b"/..", b"/../../etc/passwd", b"/api/v1/../v1/health", b"/api/v1/health/", b"/API/V1/HEALTH",
                   b"/api//v1/health", b"/api/v1/ops/sessions/%2e%2e/%2e%2e/reset", b"\\api\\v1\\health",
                   b"/api/v1/ops/sessions?" + b"&".join(b"k%d=1" % i for i in range(100)),
                   b"/api/v1/ops/sessions?limit=1&limit=2", b"/api/v1/ops/sessions?=&&=&", b"/?\x1b[31m"):
        yield "target", b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    for version in (b"HTTP/1.2", b"HTTP/2.0", b"HTTP/3", b"HTTP/0.9", b"HTTP/9.9", b"http/1.1", b"HTTP/1.1\x00",
                    b"HTTP/1.1x", b"HTTP/11", b"HTTP/1.10", b"HTTP/", b"HTTPS/1.1", b"HTTP/1.1/1.1", b"",
                    b"\xffHTTP/1.1", b"HTTP/1.1 ", b"HTTP/-1.1", b"HTTP/1.1\t"):
        yield "version", b"GET " + health + b" " + version + b"\r\nHost: x\r\n\r\n"
    for line in (b"GET  /api/v1/health HTTP/1.1", b"GET /api/v1/health  HTTP/1.1", b"GET\t/api/v1/health\tHTTP/1.1",
                 b" GET /api/v1/health HTTP/1.1", b"GET /api/v1/health", b"GET", b"\x00" * 100, b"\r" * 100):
        yield "request line", line + b"\r\nHost: x\r\n\r\n"
    yield "LF only", b"GET /api/v1/health HTTP/1.1\nHost: x\n\n"
    yield "bare CR", b"GET /api/v1/health HTTP/1.1\rHost: x\r\r\n\r\n"
    yield "mixed endings", b"GET /api/v1/health HTTP/1.1\r\nHost: x\nX: y\r\n\r\n"
    yield "leading CRLFs", b"\r\n\r\n\r\nGET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n"

    injections = [b"X-A: b\rc", b"X-A: b\x00c", b"X-A: b\nInjected: 1", b" folded: x", b"\tfolded", b"X A: b",
                  b"X : y", b": novalue", b"NoColon", b"X-\xff: y", b"X-A: \x01\x02", b"X-A: \x7f", b"X-A: a\x0bb",
                  b"X-A: \x1b[2J", b"Host: second", b"Content-Length: 0\r\nContent-Length: 0\r\nContent-Length: x",
                  b"Expect: bogus", b"Expect: 100-continue", b"Connection: close, upgrade\r\nUpgrade: websocket",
                  b"Upgrade: websocket\r\nConnection: Upgrade", b"Authorization: Bearer " + b"A" * 20000,
                  b"X-UA-OPS-Token: \x00", b"Cookie: " + b"c" * 60000, b"X-Long: " + b"v" * 70000,
                  b"Transfer-Encoding: chunked\x0b", b"Transfer-Encoding: \x0bchunked",
                  b"Content-Length: \xb2", b"Content-Length: \xb9\xb2"]
    for header in injections:
        yield "header", b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n"
    yield "no Host", b"GET /api/v1/health HTTP/1.1\r\n\r\n"
    yield "two Hosts", b"GET /api/v1/health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"
    yield "empty Host", b"GET /api/v1/health HTTP/1.1\r\nHost:\r\n\r\n"
    yield "129 headers", b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(129)) + b"\r\n"
    yield "head over 64 KiB", b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 1000) for i in range(70)) + b"\r\n"
    yield "endless head", b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n" + b"X: " + b"a" * 200000

    post = b"POST /api/v1/ops/sessions/s1/compact HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    for lengths in ([b"5", b"6"], [b"5, 6"], [b"2, 2"], [b"-1"], [b"+2"], [b" 2"], [b"0x2"], [b"2.0"], [b"1e3"], [b""],
                    [b"abc"], [b"99999999999999999999"], [b"999999999999"], [b"1048577"], [b"2", b"2"], [b"\xb2"],
                    [b"\xd9\xa3"], [b"2\x0b"], [b"18446744073709551617"]):
        head = post + b"".join(b"Content-Length: " + value + b"\r\n" for value in lengths)
        yield "content-length", head + b"\r\n{}"
    yield "CL and TE", post + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    yield "TE and CL", post + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    yield "CL smuggles a request", post + b"Content-Length: 2\r\nContent-Length: 60\r\n\r\n{}GET /api/v1/ops/sessions HTTP/1.1\r\nHost: x\r\n\r\n"
    for coding in (b"chunked, chunked", b"gzip, chunked", b"chunked, gzip", b"identity", b"gzip", b"x-chunked",
                   b"Chunked", b"CHUNKED", b"chunked;q=1", b"chunked\t", b"\tchunked", b"chunked\xa0", b"chunked, "):
        yield "transfer-encoding", post + b"Transfer-Encoding: " + coding + b"\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    yield "TE on HTTP/1.0", post.replace(b"HTTP/1.1", b"HTTP/1.0") + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    chunked = post + b"Transfer-Encoding: chunked\r\n\r\n"
    for body in (b"zz\r\n{}\r\n0\r\n\r\n", b"-1\r\n{}\r\n0\r\n\r\n", b"0x2\r\n{}\r\n0\r\n\r\n", b" 2\r\n{}\r\n0\r\n\r\n",
                 b"2 \r\n{}\r\n0\r\n\r\n", b"2;ext=1;x=\"y\"\r\n{}\r\n0\r\n\r\n", b"2;" + b"e" * 5000 + b"\r\n{}\r\n0\r\n\r\n",
                 b"fffffffffffffffff\r\n", b"ffffffffffffffff\r\n", b"100001\r\n", b"\r\n{}\r\n0\r\n\r\n",
                 b"\x00\r\n", b"2\r\n{}XX0\r\n\r\n", b"2\r\n{}", b"2\r\n{}\r\n", b"2\n{}\n0\n\n",
                 b"2\r\n{}\r\n0\r\nX-Trailer: 1\r\nX-Other: 2\r\n\r\n", b"2\r\n{}\r\n0\r\nno colon trailer\r\n\r\n",
                 b"2\r\n{}\r\n0\r\n" + b"X-T: 1\r\n" * 40000 + b"\r\n", b"1\r\n \r\n" * 100000 + b"0\r\n\r\n",
                 b"0\r\n\r\nGET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n", b"\xb2\r\n{}\r\n0\r\n\r\n",
                 b"1" * 5000 + b"\r\n"):
        yield "chunked", chunked + body
    yield "body over 1 MiB", post + b"Content-Length: %d\r\n\r\n" % (2 << 20) + b" " * (2 << 20)
    yield "chunked over 1 MiB", chunked + b"80000\r\n" + b" " * 0x80000 + b"\r\n80001\r\n" + b" " * 0x80001 + b"\r\n0\r\n\r\n"
    yield "nested JSON", post + b"Content-Length: 200000\r\n\r\n" + b"[" * 100000 + b"]" * 100000
    yield "nested objects", post + b"Content-Length: 300000\r\n\r\n" + b'{"a":' * 60000 + b"0" + b"}" * 60000
    yield "huge number", post + b"Content-Length: 20014\r\n\r\n" + b'{"max_lines": ' + b"9" * 20000 + b"}"
    many = b"{" + b",".join(b'"k%d": 0' % i for i in range(50000)) + b"}"
    yield "many keys", post + b"Content-Length: %d\r\n\r\n" % len(many) + many
    for body in (b'{"max_lines": NaN}', b'{"max_lines": Infinity}', b'{"max_lines": -Infinity}', b'{"max_lines": 1e400}',
                 b'{"max_lines": -1}', b'{"max_lines": true}', b'{"max_lines": 1.5}', b'{"max_lines": "1"}',
                 b'{"max_lines": null}', b'{"max_lines": [1]}', b'{"max_lines": {"$gt": 0}}', b'{"max_bytes": 1e308}',
                 b'{"max_lines": 18446744073709551617}', b'{"__proto__": {"admin": true}}', b"\xef\xbb\xbf{}",
                 b'{"max_lines": 1}\xff', b'{"max_lines": "\xff"}', b'{"max_lines": "\\ud800"}', b"{}" * 3, b"\x00",
                 "{}".encode("utf-16"), "{}".encode("utf-32"), b'{"max_lines": 1, "max_lines": "x"}', b"  \t\r\n "):
        yield "JSON body", post + b"Content-Length: %d\r\n\r\n" % len(body) + body
    reset = post.replace(b"/compact", b"/reset")
    for body in (b'{"clear_logs": "true"}', b'{"clear_logs": 1}', b'{"clear_memory": null}', b'{"clear_logs": false}'):
        yield "reset body", reset + b"Content-Length: %d\r\n\r\n" % len(body) + body
    create = b"POST /api/v1/sessions HTTP/1.1\r\nHost: x\r\n"
    for body in (b'{"user_id": 1}', b'{"user_id": ["a"]}', b'{"user_id": "\\u0000"}', b'{"user_id": "' + b"u" * 100000 + b'"}',
                 b'{"user_id": "\xff\xfe"}', b'{"workspace_dir": "/etc"}', b'{"session_id": "../victim"}'):
        yield "create body", create + b"Content-Length: %d\r\n\r\n" % len(body) + body
    yield "expect then garbage", create + b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n\xff\xff"
    yield "TLS hello", bytes.fromhex("16030100a5010000a10303") + os.urandom(160)
    yield "HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(64)
    rng = random.Random(6)
    for size in (1, 7, 100, 1000, 70000):
        yield "random bytes", bytes(rng.getrandbits(8) for _ in range(size))


# -- WebSocket frames (RFC 6455 §5.2): ws_frame and close_frame are conftest's ----------------------------


def server_close_codes(data: bytes) -> List[int]:
    """The close codes in the frames the server sent after its 101 (1005 for an empty close)."""
    codes = []
    pos = data.find(b"\r\n\r\n")
    pos = len(data) if pos < 0 else pos + 4
    while pos + 2 <= len(data):
        opcode, length = data[pos] & 0x0F, data[pos + 1] & 0x7F
        pos += 2
        if length == 126:
            length, pos = struct.unpack(">H", data[pos:pos + 2])[0], pos + 2
        elif length == 127:
            length, pos = struct.unpack(">Q", data[pos:pos + 8])[0], pos + 8
        payload = data[pos:pos + length]
        pos += length
        if opcode == 0x8:
            codes.append(struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005)
    return codes


PROTOCOL_ERROR = {1002}
WS_ROUTES = ("/ws/echo", "/ws/agent", "/api/v1/sessions/s1/stream")


def websocket_abuse() -> Iterator[Tuple[str, str, bytes, Optional[set]]]:
    """(name, route, frames sent after a valid handshake, acceptable server close codes or None)."""
    text = lambda data, **kw: ws_frame(0x1, data, **kw)  # noqa: E731
    for route in WS_ROUTES:
        yield "unmasked", route, ws_frame(0x1, b'{"type":"ping"}', mask=False), PROTOCOL_ERROR
        for rsv in (1, 2, 4, 7):
            yield f"rsv {rsv}", route, text(b"{}", rsv=rsv), PROTOCOL_ERROR
        for opcode in (3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF):
            yield f"opcode {opcode}", route, ws_frame(opcode, b"x"), PROTOCOL_ERROR
        yield "invalid UTF-8", route, text(b"\xff\xfe"), {1007}
        yield "overlong UTF-8", route, text(b"\xc0\xaf"), {1007}
        yield "surrogate UTF-8", route, text(b"\xed\xa0\x80"), {1007}
        yield "UTF-8 split badly", route, text(b"\xe2\x82", fin=False) + ws_frame(0x0, b"\x28"), {1007}
        yield "oversized claim", route, text(b"", length=64 << 20), {1009}
        yield "2^63 length", route, text(b"", length=(1 << 63) - 1), {1009, 1002}
        yield "control over 125", route, ws_frame(0x9, b"p" * 126), PROTOCOL_ERROR
        yield "fragmented ping", route, ws_frame(0x9, b"p", fin=False), PROTOCOL_ERROR
        yield "orphan continuation", route, ws_frame(0x0, b"x"), PROTOCOL_ERROR
        yield "text inside fragments", route, text(b"a", fin=False) + text(b"b"), PROTOCOL_ERROR
        # websockets answers a close that cuts a fragmented message with 1002 ("incomplete fragmented message")
        yield "close inside fragments", route, text(b"a", fin=False) + close_frame(1000), {1000, 1002}
        for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535):
            yield f"close code {code}", route, close_frame(code), PROTOCOL_ERROR
        yield "close 1 byte", route, ws_frame(0x8, b"\x03"), PROTOCOL_ERROR
        yield "close bad reason", route, close_frame(1000, b"\xff"), {1007}
        yield "close over 125", route, close_frame(1000, b"r" * 124), PROTOCOL_ERROR
        for code in (1000, 1001, 3000, 4999):
            yield f"close {code}", route, close_frame(code, b"bye"), {code}
        yield "double close", route, close_frame(1000) + close_frame(1000) + text(b"after"), {1000}
        yield "data after close", route, close_frame(1000) + text(b'{"type":"ping"}') * 100, {1000}
        yield "garbage", route, bytes(random.Random(route).getrandbits(8) for _ in range(4096)), None
    echo = "/ws/echo"
    yield "ping flood", echo, ws_frame(0x9, b"p" * 125) * 20000 + close_frame(1000), {1000}
    yield "pong flood", echo, ws_frame(0xA, b"p" * 125) * 20000 + close_frame(1000), {1000}
    yield "empty fragment flood", echo, text(b"", fin=False) + ws_frame(0x0, b"", fin=False) * 200000 + ws_frame(0x0, b"end") + close_frame(1000), {1000}
    yield "tiny fragment flood", echo, text(b"a", fin=False) + ws_frame(0x0, b"a", fin=False) * 50000 + ws_frame(0x0, b"") + close_frame(1000), {1000}
    yield "fragments over 16 MiB", echo, b"".join(ws_frame(0x0 if i else 0x2, b"\0" * (1 << 20), fin=False) for i in range(17)), {1009}
    yield "pings inside fragments", echo, text(b"a", fin=False) + (ws_frame(0x9) + ws_frame(0x0, b"a", fin=False)) * 1000 + ws_frame(0x0, b"") + close_frame(1000), {1000}
    agent = "/ws/agent"
    yield "frame over 1 MiB", agent, ws_frame(0x2, b"\0" * ((1 << 20) + 1)), {1009}
    yield "fragments over 1 MiB", agent, ws_frame(0x2, b"\0" * (1 << 19), fin=False) + ws_frame(0x0, b"\0" * ((1 << 19) + 1)), {1009}
    for message in (b"{", b"[]", b"null", b'{"type": 1}', b'{"type": "execute", "data": []}', b'{"type": "nope"}',
                    b'{"type": "execute", "data": {"user_input": ""}}', b'{"type": "execute", "data": {"user_input": 5}}',
                    b'{"type": "execute", "data": {"user_input": "x", "client_turn_id": ""}}',
                    b'{"type": "execute", "data": {"user_input": "x", "client_turn_id": "' + b"t" * 500 + b'"}}',
                    b'{"type": "input_response", "data": {"input_id": [], "response": {}}}',
                    b'{"type": "cancel", "data": {"reason": {"a": 1}}}', b'{"type": "execute", "data": {"user_input": "\\ud800"}}',
                    b"[" * 100000 + b"]" * 100000, b'{"type": "' + b"\\u0000" * 1000 + b'"}'):
        yield "agent message", agent, text(message) + close_frame(1000), {1000}
    yield "binary to agent", agent, ws_frame(0x2, b"\x00\xff") + close_frame(1000), {1000}
    yield "messages before attach", "/api/v1/sessions/s1/stream", text(b'{"type":"ping"}') * 200 + close_frame(1000), {1000, 1008}


def bad_handshakes() -> Iterator[Tuple[str, bytes]]:
    base = {"Host": "localhost", "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": KEY,
            "Sec-WebSocket-Version": "13"}
    variants: List[Tuple[str, Dict[str, Optional[str]], str]] = [
        ("no key", {"Sec-WebSocket-Key": None}, ""),
        ("key not base64", {"Sec-WebSocket-Key": "not base64!!"}, ""),
        ("key of 15 bytes", {"Sec-WebSocket-Key": base64.b64encode(b"x" * 15).decode()}, ""),
        ("key of 17 bytes", {"Sec-WebSocket-Key": base64.b64encode(b"x" * 17).decode()}, ""),
        ("empty key", {"Sec-WebSocket-Key": ""}, ""),
        ("non-ASCII key", {"Sec-WebSocket-Key": "\x80" + KEY}, ""),  # websockets itself answered 500
        ("latin-1 key", {"Sec-WebSocket-Key": KEY[:-2] + "\xe9="}, ""),
        ("two keys", {}, f"Sec-WebSocket-Key: {KEY}\r\n"),
        ("version 8", {"Sec-WebSocket-Version": "8"}, ""),
        ("version 14", {"Sec-WebSocket-Version": "14"}, ""),
        ("no version", {"Sec-WebSocket-Version": None}, ""),
        ("version list", {"Sec-WebSocket-Version": "13, 8"}, ""),
        ("version junk", {"Sec-WebSocket-Version": "1" * 5000}, ""),
        ("no upgrade", {"Upgrade": None}, ""),
        ("upgrade h2c", {"Upgrade": "h2c"}, ""),
        ("upgrade list", {"Upgrade": "h2c, websocket"}, ""),
        ("connection keep-alive", {"Connection": "keep-alive"}, ""),
        ("connection list", {"Connection": "keep-alive, Upgrade"}, ""),
        ("body on upgrade", {}, "Content-Length: 5\r\n"),
        ("empty body on upgrade", {}, "Content-Length: 0\r\n"),
        ("chunked upgrade", {}, "Transfer-Encoding: chunked\r\n"),
        ("foreign origin", {}, "Origin: http://evil.example\r\n"),
        ("null origin", {}, "Origin: null\r\n"),
        ("origin junk", {}, "Origin: " + "\x80" * 100 + "\r\n"),
        ("subprotocol junk", {}, "Sec-WebSocket-Protocol: ,,,;\r\n"),
        ("bearer junk", {}, "Sec-WebSocket-Protocol: bearer.!!!, ua.v1\r\n"),
        ("bearer latin-1", {}, "Sec-WebSocket-Protocol: bearer.\xe9\xe9\r\n"),
        ("extension junk", {}, "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits=99;;\r\n"),
        ("extension deflate", {}, "Sec-WebSocket-Extensions: permessage-deflate\r\n"),
        ("line over 8 KiB", {}, "Cookie: " + "c" * 9000 + "\r\n"),
        ("128 headers", {}, "".join(f"X-{i}: 1\r\n" for i in range(123))),
    ]
    for name, changes, extra in variants:
        headers = dict(base)
        headers.update(changes)
        text = "".join(f"{k}: {v}\r\n" for k, v in headers.items() if v is not None) + extra
        for route in ("/ws/agent", "/ws/echo", "/api/v1/sessions/s1/stream", "/api/v1/sessions/%2e%2e/stream"):
            body = "hello" if "Content-Length: 5" in extra else ("0\r\n\r\n" if "chunked" in extra else "")
            yield name, f"GET {route} HTTP/1.1\r\n{text}\r\n{body}".encode("latin-1")
    handshake = "".join(f"{k}: {v}\r\n" for k, v in base.items())
    for name, line in (("HTTP/1.0 upgrade", "GET /ws/echo HTTP/1.0"), ("POST upgrade", "POST /ws/echo HTTP/1.1"),
                       ("upgrade on health", "GET /api/v1/health HTTP/1.1"), ("upgrade on unknown", "GET /nope HTTP/1.1"),
                       ("upgrade on ops", "GET /api/v1/ops/sessions HTTP/1.1"), ("bad stream id", "GET /api/v1/sessions/..%2f/stream HTTP/1.1"),
                       ("lobby traversal", "GET /ws/agent?session_id=../victim HTTP/1.1"),
                       ("unknown stream", "GET /api/v1/sessions/no-such-session/stream HTTP/1.1")):
        yield name, f"{line}\r\n{handshake}\r\n".encode()


# -- socket plumbing ---------------------------------------------------------------------------------------


def converse(gateway: WatchedGateway, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` while reading, half-close, and return all the server sent until it closed."""
    sock = socket.create_connection((gateway.host, gateway.port), timeout=timeout)
    sock.setblocking(False)
    received: List[bytes] = []
    view = memoryview(data)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            writers = [sock] if view is not None else []
            readable, writable, _ = select.select([sock], writers, [], 0.5)
            if writable and view is not None:
                try:
                    sent = sock.send(view[: 1 << 16])
                    view = view[sent:]
                except (BrokenPipeError, ConnectionResetError):
                    view = None  # type: ignore[assignment]
                if view is not None and not view:
                    view = None  # type: ignore[assignment]
                    try:
                        sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
            if readable:
                try:
                    chunk = sock.recv(1 << 16)
                except (ConnectionResetError, BlockingIOError):
                    chunk = b""
                if not chunk:
                    return b"".join(received)
                received.append(chunk)
        raise AssertionError(f"the gateway neither answered nor closed within {timeout} s: {data[:120]!r}")
    finally:
        sock.close()


def statuses(data: bytes) -> List[int]:
    """Status codes of the responses in a byte stream, in order (interim 100s included), read by their
    framing; a 101 ends the HTTP part."""
    found = []
    pos = 0
    while data.startswith(b"HTTP/1.1 ", pos):
        end = data.find(b"\r\n\r\n", pos)
        if end < 0 or not data[pos + 9:pos + 12].isdigit():
            break
        head = data[pos:end]
        found.append(int(head[9:12]))
        if found[-1] == 101:
            break
        length = re.search(rb"\r\ncontent-length: *(\d+)", head, re.I)
        pos = end + 4 + (int(length.group(1)) if length else 0)
    return found


class Tally:
    """Counts what was sent and checks, after each connection, that the gateway took no harm."""

    def __init__(self, gateway: WatchedGateway, outside: Path) -> None:
        self.gateway = gateway
        self.outside = outside
        self.requests = 0
        self.connections = 0
        self.before = snapshot_tree(outside.parent, skip=gateway.workspaces)
        self.health = socket.create_connection((gateway.host, gateway.port), timeout=10)

    def check(self, what: str, sent: bytes, received: bytes, requests: int = 1) -> None:
        self.requests += requests
        self.connections += 1
        # By framing, and, in case the framing is off, anywhere in the bytes.
        for status in statuses(received) + [int(s) for s in re.findall(rb"HTTP/1\.1 (5\d\d) ", received)]:
            assert status < 500 or status == 505, f"{what}: {status} for {sent[:160]!r}\n{received[:600]!r}"
        for marker in TRACEBACK_MARKERS:
            assert marker not in received, f"{what}: traceback in the response to {sent[:160]!r}"
        lowered = received.lower()
        assert b"\r\ninjected:" not in lowered and b"\r\nset-cookie:" not in lowered, f"{what}: header injection"
        self.assert_healthy(what)

    def assert_healthy(self, what: str) -> None:
        assert self.gateway.process.poll() is None, f"the gateway died after {what}"
        try:
            self.health.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            reply = self.health.recv(65536)
        except OSError:
            reply = b""
        if not reply:  # the idle keep-alive may have been closed: one fresh connection
            self.health.close()
            self.health = socket.create_connection((self.gateway.host, self.gateway.port), timeout=10)
            self.health.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            reply = self.health.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200 "), f"health after {what}: {reply[:200]!r}"
        assert not self.gateway.tracebacks(), f"traceback on the gateway's stderr after {what}:\n{self.gateway.tracebacks()[-3000:]}"

    def assert_outside_untouched(self) -> None:
        after = snapshot_tree(self.outside.parent, skip=self.gateway.workspaces)
        changed = {k for k in set(self.before) | set(after) if self.before.get(k) != after.get(k)}
        assert not changed, f"outside the workspaces root changed: {sorted(changed)[:20]}"


# -- the gateway and its surroundings ----------------------------------------------------------------------


def launch_with_env(root: Path, agent_cmd: str, env: Dict[str, str]):
    return launch(root, "--agent-cmd", agent_cmd, env=env)


def plant(base: Path) -> Path:
    """The workspaces root with hostile plants inside, and a sentinel tree beside it."""
    victim = base / "victim"
    (victim / "archive" / "old").mkdir(parents=True)
    (victim / "run.log").write_bytes(b"victim run log\n" * 100)
    (victim / "activity_journal.log").write_bytes(b"victim journal\n")
    (victim / "MEMORY.md").write_text("victim memory")
    (victim / "work_products").mkdir()
    (base / "secret.txt").write_text("secret")
    (base / "etc").mkdir()
    (base / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    root = base / "ws"
    (root / "s1").mkdir(parents=True)
    (root / "s1" / "run.log").write_bytes(b"".join(b"line %d\n" % i for i in range(1000)))
    (root / "s1" / "activity_journal.log").write_bytes(b"[2026-01-01 00:00:00] [TEXT] hi\n" * 50)
    (root / "s2").mkdir()
    os.symlink("../../secret.txt", root / "s2" / "run.log")
    os.symlink("../../victim/MEMORY.md", root / "s2" / "MEMORY.md")
    os.symlink(str(victim), root / "s2" / "archive")
    os.symlink(str(victim), root / "escape")
    (root / "s-matrix").mkdir()
    return root


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tuple[WatchedGateway, Tally]]:
    base = tmp_path_factory.mktemp("hostile")
    root = plant(base)
    gateway = start_watched(root, "--ws-echo")
    tally = Tally(gateway, base / "victim")
    yield gateway, tally
    print(f"\nhostile corpus: {tally.requests} requests tried on {tally.connections} connections")
    tally.health.close()
    gateway.stop()
    assert not gateway.tracebacks()


def test_traversal_in_every_encoding_and_parameter_is_refused_and_touches_nothing_outside(hostile):
    gateway, tally = hostile
    count = 0
    for x in TRAVERSALS:
        slots = traversal_slots(x)
        data = b"".join(request_bytes(method, target, body) for method, target, body, _ in slots)
        received = converse(gateway, data)
        tally.check(f"traversal {x!r}", data, received, len(slots))
        replies = parse_responses(received)
        assert len(replies) == len(slots), f"{x!r}: {len(replies)} answers to {len(slots)} pipelined requests"
        for (method, target, _, allowed), (status, _, body) in zip(slots, replies):
            assert status in allowed, f"{method} {target}: {status} {body[:300]!r}"
        count += len(slots)
    tally.assert_outside_untouched()
    assert (gateway.workspaces / "s1" / "run.log").stat().st_size > 0, "a traversal reached a real session"
    print(f"\ntraversal: {count} requests in {len(TRAVERSALS)} encodings")


def test_every_method_on_every_route_is_answered_without_a_5xx(hostile):
    gateway, tally = hostile
    data = b"".join(request_bytes(method, route) for route in ROUTES for method in METHODS)
    data += b"".join(request_bytes(method, route, b"{}") for route in ROUTES for method in ("POST", "PUT", "PATCH"))
    expected = len(ROUTES) * (len(METHODS) + 3)
    received = converse(gateway, data)
    tally.check("method matrix", data, received, expected)
    assert len(parse_responses(received)) == expected
    for route in ROUTES:  # CONNECT's target is an authority; ours is a path, so one connection each
        sent = request_bytes("CONNECT", route)
        tally.check("CONNECT", sent, converse(gateway, sent))
    tally.assert_outside_untouched()
    print(f"\nmethod matrix: {expected + len(ROUTES)} requests")


def test_head_response_has_no_body_so_pipelining_stays_in_sync(hostile):
    gateway, tally = hostile
    data = b"".join(request_bytes("HEAD", route) + request_bytes("GET", "/api/v1/health") for route in ROUTES)
    received = converse(gateway, data)
    tally.check("HEAD", data, received, 2 * len(ROUTES))
    heads = received.split(b"HTTP/1.1 ")[1:]
    assert len(heads) == 2 * len(ROUTES)
    for head_reply, get_reply in zip(heads[0::2], heads[1::2]):
        assert head_reply.endswith(b"\r\n\r\n"), f"a HEAD answer carried a body: {head_reply[-200:]!r}"
        assert get_reply.startswith(b"200 ")


def test_malformed_requests_get_4xx_or_505_and_the_gateway_keeps_serving(hostile):
    gateway, tally = hostile
    count = 0
    for what, data in single_requests():
        received = converse(gateway, data)
        tally.check(what, data, received)
        count += 1
    tally.assert_outside_untouched()
    print(f"\nmalformed: {count} requests, one connection each")


def test_smuggled_request_behind_conflicting_lengths_is_never_served(hostile):
    gateway, tally = hostile
    smuggled = (b"POST /api/v1/ops/sessions/s1/compact HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 44\r\n\r\n"
                b"DELETE /api/v1/ops/sessions/s1?confirm=true HTTP/1.1\r\nHost: x\r\n\r\n")
    received = converse(gateway, smuggled)
    tally.check("smuggling", smuggled, received)
    assert statuses(received) == [400]
    chunked = (b"POST /api/v1/sessions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\x0b\r\n\r\n"
               b"0\r\n\r\nDELETE /api/v1/ops/sessions/s1?confirm=true HTTP/1.1\r\nHost: x\r\n\r\n")
    received = converse(gateway, chunked)
    tally.check("TE obfuscation", chunked, received)
    assert statuses(received) == [400]
    assert (gateway.workspaces / "s1").is_dir()


def test_websocket_handshake_abuse_is_refused_cleanly(hostile):
    gateway, tally = hostile
    count = 0
    for what, data in bad_handshakes():
        received = converse(gateway, data)
        tally.check(f"handshake {what}", data, received)
        count += 1
        first = statuses(received)
        if first and first[0] == 101:
            continue
        if first:
            assert b"application/json" in received.split(b"\r\n\r\n", 1)[0], f"{what}: {received[:300]!r}"
    tally.assert_outside_untouched()
    print(f"\nhandshakes: {count}")


def test_websocket_frame_abuse_closes_with_the_right_code_and_never_1011(hostile):
    gateway, tally = hostile
    count = 0
    for what, route, frames, codes in websocket_abuse():
        handshake = (f"GET {route} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
        received = converse(gateway, handshake + frames, timeout=30)
        tally.check(f"websocket {what} on {route}", handshake + frames[:200], received)
        assert statuses(received)[:1] == [101], f"{what} on {route}: {received[:200]!r}"
        got = server_close_codes(received)
        assert 1011 not in got, f"{what} on {route}: internal error close"
        if codes is not None:
            assert got and got[-1] in codes, f"{what} on {route}: close codes {got}, expected one of {codes}"
        count += 1
    tally.assert_outside_untouched()
    print(f"\nwebsocket abuse: {count} connections")


def test_upgrade_pipelined_behind_a_request_then_half_closed_is_closed_at_once(hostile):
    gateway, tally = hostile
    data = (request_bytes("GET", "/api/v1/ops/logs/tail?session_id=s1") +
            (f"GET /ws/echo HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    started = time.monotonic()
    received = converse(gateway, data, timeout=5)  # it used to stay open until the keepalive gave up, 40 s
    tally.check("upgrade after a half-close", data, received, 2)
    assert statuses(received) == [200, 101] and time.monotonic() - started < 3


def test_ping_flood_from_a_peer_that_never_reads_is_contained(hostile):
    gateway, tally = hostile
    sock = socket.create_connection((gateway.host, gateway.port), timeout=2)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall((f"GET /ws/echo HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    flood = ws_frame(0x9, b"p" * 125) * 1000
    sent = 0
    try:
        for _ in range(400):  # up to 52 MB of pings, none of whose pongs are read
            sock.sendall(flood)
            sent += len(flood)
    except OSError:
        pass  # the gateway stopped reading (backpressure) or cut us off: both are fine
    tally.assert_healthy("a ping flood")
    sock.close()
    tally.check("ping flood", b"", b"")
    print(f"\nunread ping flood: {sent} bytes accepted before backpressure")


def test_upgrade_with_a_foreign_host_is_421_when_allowed_hosts_is_set(start_gateway):
    gateway = start_gateway("--ws-echo", env={"UA_ALLOWED_HOSTS": "gateway.example"})
    handshake = ("GET /ws/echo HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\nOrigin: http://{{}}\r\n\r\n")
    rebound = gateway.raw(handshake.format("evil.example:8002", "evil.example:8002").encode())
    assert statuses(rebound) == [421]
    listed = gateway.raw(handshake.format("gateway.example", "gateway.example").encode(), timeout=1)
    assert statuses(listed)[:1] == [101]


def test_nobody_gets_in_with_a_malformed_or_misplaced_token(start_gateway):
    gateway = start_gateway(env={"UA_OPS_TOKEN": TOKEN})
    wrong = [
        {"Authorization": f"Bearer {TOKEN[:-1]}"}, {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN}, {"Authorization": f"Bearer{TOKEN}"}, {"Authorization": f"Token {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN.upper()}"}, {"X-UA-OPS-Token": TOKEN[:8]}, {"Cookie": f"token={TOKEN}"},
        {"Authorization": f"Bearer {base64.b64encode(TOKEN.encode()).decode()}"}, {"X-UA-OPS-TOKEN": ""},
        {"Sec-WebSocket-Protocol": "bearer." + base64.urlsafe_b64encode(TOKEN.encode()).decode().rstrip("=")},
    ]
    seen = []
    for headers in wrong:
        for method, path in (("GET", "/api/v1/ops/sessions"), ("POST", "/api/v1/sessions"),
                             ("GET", f"/api/v1/ops/sessions?token={TOKEN}"), ("GET", f"/api/v1/ops/logs/tail?access_token={TOKEN}")):
            reply = gateway.request(method, path, headers=headers, body={} if method == "POST" else None)
            seen.append(reply.status)
            assert reply.status in (401, 429), (headers, path, reply)
    assert seen.count(401) == 10 and set(seen[10:]) == {429}, "the lockout starts after 10 failures"
    assert gateway.get("/api/v1/health").status == 200
    print(f"\nauth: {len(seen)} attempts, none admitted")


def test_cross_site_requests_are_refused_before_they_change_anything(start_gateway):
    gateway = start_gateway(env={"UA_CORS_ORIGINS": "http://console.example"})
    gateway.make_session("csrf", {"run.log": b"keep\n"})
    own = f"http://{gateway.host}:{gateway.port}"
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Origin": f"{own}.evil.example"}, {"Origin": "http://evil.example", "Sec-Fetch-Site": "same-origin"}):
        for method, path in (("POST", "/api/v1/ops/sessions/csrf/reset"), ("POST", "/api/v1/ops/sessions/csrf/compact"),
                             ("DELETE", "/api/v1/ops/sessions/csrf?confirm=true"), ("POST", "/api/v1/sessions"),
                             ("GET", "/api/v1/ops/sessions/csrf")):
            reply = gateway.request(method, path, headers={**headers, "Content-Type": "text/plain"},
                                    body=b"" if method == "POST" else None)
            assert reply.status == 403, (headers, method, path, reply)
            assert "refused" in reply.json["detail"]
    assert (gateway.workspaces / "csrf" / "run.log").read_bytes() == b"keep\n"
    assert gateway.post("/api/v1/ops/sessions/csrf/compact", headers={"Origin": own}).status == 200
    assert gateway.post("/api/v1/ops/sessions/csrf/compact", headers={"Origin": "http://console.example"}).status == 200
    assert gateway.post("/api/v1/ops/sessions/csrf/compact", headers={"Sec-Fetch-Site": "same-origin"}).status == 200
    assert gateway.get("/api/v1/health", headers={"Sec-Fetch-Site": "cross-site"}).status == 200


def test_a_web_page_cannot_lock_the_operator_out(start_gateway):
    gateway = start_gateway(env={"UA_OPS_TOKEN": TOKEN})
    for _ in range(20):  # what <img src=...> tags and WebSockets opened by a hostile page would send
        assert gateway.get("/api/v1/ops/sessions", headers={"Sec-Fetch-Site": "cross-site"}).status == 403
        handshake = (f"GET /ws/agent HTTP/1.1\r\nHost: {gateway.host}:{gateway.port}\r\nUpgrade: websocket\r\n"
                     f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"
                     "Origin: http://evil.example\r\n\r\n").encode()
        assert statuses(gateway.raw(handshake)) == [403]
    assert gateway.get("/api/v1/ops/sessions", token=TOKEN).status == 200, "the operator was locked out"


def test_pipelining_peer_that_never_reads_is_throttled_not_buffered(hostile):
    gateway, tally = hostile
    one = b"GET /console/style.css HTTP/1.1\r\nHost: localhost\r\n\r\n"
    before = rss_mib(gateway.process.pid)
    sock = socket.create_connection((gateway.host, gateway.port), timeout=10)
    sock.setblocking(False)
    flood, accepted = one * 2000, 0
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        if not select.select([], [sock], [], 0.2)[1]:
            continue
        accepted += sock.send(flood[accepted % len(flood):] or flood)
    grown = rss_mib(gateway.process.pid) - before
    assert accepted < 64 << 20, f"{accepted} bytes accepted from a peer that reads nothing"
    assert grown < 64, f"the gateway grew by {grown} MiB buffering a peer that reads nothing"
    sock.setblocking(True)
    sock.shutdown(socket.SHUT_WR)
    answers, tail = 0, b""
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        data = tail + chunk
        answers += data.count(b"HTTP/1.1 200 ")
        tail = data[-16:]
        answers -= tail.count(b"HTTP/1.1 200 ")
    answers += tail.count(b"HTTP/1.1 200 ")
    sock.close()
    assert answers == accepted // len(one), "every request received before the half-close is answered"
    tally.check("pipelining without reading", b"", b"")  # one attack, however many requests it held
    print(f"\nunread pipelining: {accepted} bytes accepted, {answers} answers, {grown} MiB of growth")


def test_input_responses_nobody_reads_are_bounded(tmp_path):
    agent = tmp_path / "deaf_agent.py"
    agent.write_text("import time\ntime.sleep(60)\n")  # never reads its stdin
    gateway = start_watched(tmp_path / "ws", "--agent-cmd", f"{sys.executable} {agent}")
    gateway.make_session("deaf")
    answer = json.dumps({"type": "input_response", "data": {"input_id": "q", "response": "x" * 500_000}})

    async def scenario() -> Tuple[int, int]:
        async with connect(f"{gateway.ws_url}/api/v1/sessions/deaf/stream", max_size=None) as ws:
            assert json.loads(await ws.recv())["type"] == "connected"
            await ws.send(json.dumps({"type": "execute", "data": {"user_input": "wait"}}))
            before = rss_mib(gateway.process.pid)
            for _ in range(200):  # 100 MB of answers to a question nobody asked
                await ws.send(answer)
            await ws.send('{"type": "ping"}')
            refused = 0
            while True:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if frame["type"] == "pong":
                    break
                refused += frame["type"] == "error"
            grown = rss_mib(gateway.process.pid) - before
            await ws.send('{"type": "cancel"}')
            return refused, grown

    try:
        refused, grown = asyncio.run(scenario())
    finally:
        gateway.stop()
    assert grown < 40, f"the gateway grew by {grown} MiB holding input nobody reads"
    assert refused > 100, "input beyond the bound is refused with an error event"
    assert not gateway.tracebacks()


MALICIOUS_AGENT = """
import json, os, sys
request = json.loads(sys.stdin.readline())
outside = os.environ["HOSTILE_OUTSIDE"]
for name, target in (("run.log", outside + "/secret.txt"), ("activity_journal.log", outside + "/etc/passwd"),
                     ("memory", outside), ("archive", outside + "/victim"), ("heartbeat_state.json", "/etc/shadow")):
    if os.path.lexists(name):
        os.rename(name, name + ".old")
    os.symlink(target, name)
os.mkfifo("MEMORY.md")
os.makedirs("work_products", exist_ok=True)
os.symlink(outside, "work_products/escape")
emit = lambda kind, data: print(json.dumps({"type": kind, "data": data}), flush=True)
emit("text", {"text": "planted\\n[2026-01-01 00:00:00] [TEXT] forged line\\r"})
for reserved in ("query_complete", "connected", "cancelled", "pong", "Bad Type", "x" * 40):
    emit(reserved, {"completed": True})
print("y" * 3_000_000, flush=True)  # one endless line of raw output
"""


def test_a_malicious_agent_cannot_make_the_gateway_act_outside_its_workspace(tmp_path):
    root = plant(tmp_path)
    agent = tmp_path / "agent.py"
    agent.write_text(MALICIOUS_AGENT)
    before = snapshot_tree(tmp_path, skip=root)
    gateway = WatchedGateway(launch_with_env(root, f"{sys.executable} {agent}", {"HOSTILE_OUTSIDE": str(tmp_path)}))

    async def turn() -> List[dict]:
        frames = []
        async with connect(f"{gateway.ws_url}/api/v1/sessions/s1/stream", max_size=None) as ws:
            assert json.loads(await ws.recv())["type"] == "connected"
            await ws.send(json.dumps({"type": "execute", "data": {"user_input": "plant"}}))
            while True:
                frames.append(json.loads(await asyncio.wait_for(ws.recv(), 20)))
                if frames[-1]["type"] == "query_complete":
                    return frames

    try:
        frames = asyncio.run(turn())
        assert [f["type"] for f in frames].count("query_complete") == 1
        assert not {"connected", "cancelled", "pong"} & {f["type"] for f in frames}
        assert frames[-1]["data"]["completed"] is True
        replies = {}
        for method, path in (("GET", "/api/v1/ops/sessions/s1"), ("GET", "/api/v1/ops/sessions/s1/preview"),
                             ("GET", "/api/v1/ops/logs/tail?session_id=s1"),
                             ("GET", "/api/v1/ops/logs/tail?session_id=s1&file=activity_journal.log"),
                             ("GET", "/api/v1/ops/sessions?limit=1000"), ("POST", "/api/v1/ops/sessions/s1/compact"),
                             ("POST", "/api/v1/ops/sessions/s1/reset"),
                             ("POST", "/api/v1/ops/sessions/s1/reset"), ("GET", "/api/v1/ops/sessions/s1"),
                             ("DELETE", "/api/v1/ops/sessions/s1?confirm=true")):
            reply = gateway.request(method, path, body={"clear_memory": True} if path.endswith("reset") else None)
            replies[(method, path)] = reply
            assert reply.status < 500 or reply.status == 503, (method, path, reply)
            assert b"secret" not in reply.body and b"root:x:0:0" not in reply.body, (method, path, reply)
        details = replies[("GET", "/api/v1/ops/sessions/s1")].json
        assert details["memory"]["files"] == 0  # memory -> outside is not counted through
        # The planted heartbeat link is never read through; the turn's heartbeat (written a moment after
        # query_complete) replaces the link itself by rename.
        heartbeat = details["session"]["heartbeat"]
        assert heartbeat is None or set(heartbeat) == {"last_run", "last_turn"}, heartbeat
        reset = replies[("POST", "/api/v1/ops/sessions/s1/reset")]
        assert reset.status == 503 and "archive" in reset.json["detail"], reset  # a linked archive is refused
        assert replies[("DELETE", "/api/v1/ops/sessions/s1?confirm=true")].status == 200
        assert not (root / "s1").exists()
    finally:
        gateway.stop()
    assert snapshot_tree(tmp_path, skip=root) == before, "something outside the workspaces root changed"
    assert not gateway.tracebacks()

"""The turn path's cost (issue 15 item 2): an echo turn runs within the read that brought its execute,
and access records are formatted off the event loop byte for byte as before.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
from typing import Any, Dict

import pytest

from conftest import execute, ws_frame
import uagw.logs
from uagw.logs import access_line


def _open_ws(port: int, path: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)  # byte by byte: nothing of the first frame is read with the head
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def _read_exact(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        assert chunk, "the gateway closed the connection"
        data += chunk
    return data


def _read_message(sock: socket.socket) -> Dict[str, Any]:
    first, second = _read_exact(sock, 2)
    length = second & 0x7F
    if length == 126:
        length = struct.unpack(">H", _read_exact(sock, 2))[0]
    elif length == 127:
        length = struct.unpack(">Q", _read_exact(sock, 8))[0]
    assert first & 0x0F == 0x1, "a text frame"
    return json.loads(_read_exact(sock, length))


def test_an_echo_turn_is_answered_before_the_next_message_of_the_same_read(gateway):
    # An execute and a ping in one segment: the echo turn runs within that read, so all its frames go out
    # before the ping's pong (a turn run as a task answered the pong first, a loop pass earlier).
    gateway.make_session("turn-path-inline")
    sock = _open_ws(gateway.port, "/api/v1/sessions/turn-path-inline/stream")
    try:
        assert _read_message(sock)["type"] == "connected"
        sock.sendall(ws_frame(0x1, execute("hello").encode()) + ws_frame(0x1, b'{"type":"ping"}'))
        types = [_read_message(sock)["type"] for _ in range(4)]
    finally:
        sock.close()
    assert types == ["status", "text", "query_complete", "pong"]


@pytest.mark.parametrize("fields", [
    ("127.0.0.1", "GET", "/api/v1/health", 200, 123, 0.052),
    ("::1", None, None, 408, 0, None),
    ("127.0.0.1", "POST", "/api/v1/ops/sessions/\u00e9\U0001f600\"\\\n", 404, 10, 12.0),
    ("127.0.0.1", "GET", "/" + "\"" * 511, 400, 0, 1e-05),
    ("127.0.0.1", "GET", "/x", 200, 5, float("nan")),
])
def test_an_access_line_is_what_write_made_of_the_same_record(fields):
    at = 1795000000.123
    client, method, path, status, size, ms = fields
    # write()'s formula, with its field caps, as the event loop ran it before.
    record = {"client": client, "method": method, "path": path, "status": status, "bytes": size, "ms": ms}
    record = {name: uagw.logs.log_field(value) for name, value in record.items()}
    expected = json.dumps({"ts": uagw.logs._log_stamp(at), "event": "access", **record}, separators=(",", ":"))
    assert access_line(at, *fields) == expected

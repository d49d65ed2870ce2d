"""Memory per idle WebSocket (issue 15, item 3): once the handshake is answered, nothing of it is kept.

The handshake's headers were most of an idle agent connection's memory (about 3 KiB of its 8): our parsed
request, held by the bridge for the peer's address, and websockets' parsed copy, which its parser keeps for
the connection's life. bench/connections.py measures the RSS; these tests pin down the cause.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any, List

from websockets.datastructures import Headers

from conftest import serve_embedded
from uagw.http11 import Request

CLIENTS = 20


def _live(kind: type) -> List[Any]:
    gc.collect()
    return [item for item in gc.get_objects() if type(item) is kind]


HANDSHAKE = (b"GET /api/v1/sessions/idle/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
             b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")


async def _hold_idle_sockets(gateway: Any, check: Any) -> Any:
    """``check()`` while CLIENTS agent connections are open and idle. Raw sockets: a websockets client
    would keep parsed headers of its own in this process."""
    clients = []
    try:
        for _ in range(CLIENTS):
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            clients.append(writer)
            writer.write(HANDSHAKE)
            # "connected" arrives after the 101: the handshake is long done.
            await asyncio.wait_for(reader.readuntil(b"Connected to Universal Agent"), 10)
        return check()
    finally:
        for writer in clients:
            writer.close()


def test_an_idle_websocket_keeps_no_parsed_handshake_request(tmp_path):
    (tmp_path / "idle").mkdir()
    held = serve_embedded(tmp_path, None, lambda gateway: _hold_idle_sockets(gateway, lambda: len(_live(Request))))
    assert held < CLIENTS, f"{held} parsed requests alive with {CLIENTS} idle WebSockets"


def test_an_idle_websocket_keeps_no_handshake_headers(tmp_path):
    (tmp_path / "idle").mkdir()

    def handshake_headers() -> int:
        return sum(1 for headers in _live(Headers) if "Sec-WebSocket-Key" in headers)

    held = serve_embedded(tmp_path, None, lambda gateway: _hold_idle_sockets(gateway, handshake_headers))
    assert held < CLIENTS, f"{held} handshake header sets alive with {CLIENTS} idle WebSockets"

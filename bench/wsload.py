"""A lean WebSocket load client for the agent protocol: turns per second, sequential and concurrent.

Rules this file keeps
- It must cost the client far less than it costs a server, or the bench measures the client: frames are
  built and parsed by hand on an ``asyncio.Protocol`` (RFC 6455 §5.2), with no per-frame JSON decoding
  except where a turn is checked. The ``websockets`` library is used by run.py only for a conformance
  check of each server; its client costs about as much CPU per frame as the servers under test.
- A turn is: send ``execute``, then read frames until the one whose type is ``query_complete``.
- Every loop is bounded by a deadline, and every wait by a timeout. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import time
from typing import Any, Dict, List, Optional

__all__ = ["WsTurnClient", "concurrent_turns", "open_client", "sequential_turns"]

CONNECT_TIMEOUT = 10.0  # a handshake slower than this on loopback is a failure, not a result
TURN_TIMEOUT = 10.0  # a turn that takes longer is counted as an error and the client stops
CONNECT_CONCURRENCY = 50  # handshakes in flight at once while opening many clients
_COMPLETE = b'"type":"query_complete"'
_COMPLETE_SPACED = b'"type": "query_complete"'


def _mask(payload: bytes, key: bytes) -> bytes:
    # XOR as one big integer: fast for the small frames sent here.
    if not payload:
        return payload
    repeated = (key * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(len(payload), "big")


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A final, masked client frame (RFC 6455 §5.2, §5.3)."""
    key = os.urandom(4)
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    return head + key + _mask(payload, key)


class WsTurnClient(asyncio.Protocol):
    """One agent connection. ``await opened``, then ``await turn(text)`` repeatedly."""

    def __init__(self, host: str, path: str, check_first_turn: bool = False) -> None:
        self.host = host
        self.path = path
        self.transport: Optional[asyncio.Transport] = None
        self.buffer = bytearray()
        self.upgraded = False
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future = loop.create_future()  # result: the "connected" frame's data
        self.turn_done: Optional[asyncio.Future] = None
        self.check = check_first_turn
        self.checked_types: List[str] = []
        self.frames = 0
        self.closed_code: Optional[int] = None

    # -- asyncio.Protocol ----------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(  # type: ignore[attr-defined]
            (
                f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status_line = bytes(self.buffer[: self.buffer.find(b"\r\n")])
            del self.buffer[: end + 4]
            if b" 101 " not in status_line:
                self._fail(ConnectionError(f"handshake refused: {status_line!r}"))
                return
            self.upgraded = True
        self._parse_frames()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._fail(ConnectionError(f"connection lost (close code {self.closed_code})"))

    # -- frames --------------------------------------------------------------------------------------------

    def _parse_frames(self) -> None:
        buffer = self.buffer
        while len(buffer) >= 2:
            opcode = buffer[0] & 0x0F
            length = buffer[1] & 0x7F
            offset = 2
            if length == 126:
                if len(buffer) < 4:
                    return
                length = struct.unpack_from("!H", buffer, 2)[0]
                offset = 4
            elif length == 127:
                if len(buffer) < 10:
                    return
                length = struct.unpack_from("!Q", buffer, 2)[0]
                offset = 10
            if len(buffer) < offset + length:
                return
            payload = bytes(buffer[offset : offset + length])
            del buffer[: offset + length]
            self._on_frame(opcode, payload)

    def _on_frame(self, opcode: int, payload: bytes) -> None:
        if opcode == 0x9:  # ping -> pong
            self.transport.write(client_frame(0xA, payload))  # type: ignore[union-attr]
            return
        if opcode == 0x8:  # close
            self.closed_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            self.transport.close()  # type: ignore[union-attr]
            return
        if opcode != 0x1:
            return
        self.frames += 1
        if not self.opened.done():
            message = json.loads(payload)
            if message.get("type") != "connected":
                self._fail(ConnectionError(f"first frame is not 'connected': {payload[:200]!r}"))
                return
            self.opened.set_result(message.get("data"))
            return
        if self.check:
            self.checked_types.append(json.loads(payload).get("type"))
        if _COMPLETE in payload or _COMPLETE_SPACED in payload:
            if self.check:
                self.check = False
            if self.turn_done is not None and not self.turn_done.done():
                self.turn_done.set_result(None)

    def _fail(self, exc: Exception) -> None:
        for future in (self.opened, self.turn_done):
            if future is not None and not future.done():
                future.set_exception(exc)

    # -- API -----------------------------------------------------------------------------------------------

    async def turn(self, text: str) -> None:
        self.turn_done = asyncio.get_running_loop().create_future()
        payload = json.dumps({"type": "execute", "data": {"user_input": text}}).encode()
        self.transport.write(client_frame(0x1, payload))  # type: ignore[union-attr]
        await asyncio.wait_for(self.turn_done, TURN_TIMEOUT)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(0x8, struct.pack("!H", 1000)))
            self.transport.close()


async def open_client(host: str, port: int, path: str, check_first_turn: bool = False) -> WsTurnClient:
    loop = asyncio.get_running_loop()
    _, client = await asyncio.wait_for(
        loop.create_connection(lambda: WsTurnClient(f"{host}:{port}", path, check_first_turn), host, port),
        CONNECT_TIMEOUT,
    )
    await asyncio.wait_for(client.opened, CONNECT_TIMEOUT)
    return client


def _percentile(values: List[float], fraction: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def _summary(turns: int, errors: int, elapsed: float, latencies: List[float]) -> Dict[str, Any]:
    return {
        "turns": turns,
        "errors": errors,
        "seconds": round(elapsed, 3),
        "turns_per_s": round(turns / elapsed, 1) if elapsed > 0 else 0.0,
        "p50_ms": None if not latencies else round(_percentile(latencies, 0.50) * 1000, 3),
        "p99_ms": None if not latencies else round(_percentile(latencies, 0.99) * 1000, 3),
    }


async def sequential_turns(host: str, port: int, path: str, duration: float) -> Dict[str, Any]:
    """Turns one after another on one connection for ``duration`` seconds."""
    client = await open_client(host, port, path, check_first_turn=True)
    latencies: List[float] = []
    errors = 0
    try:
        await client.turn("warm-up turn")
        if client.checked_types != ["status", "text", "query_complete"]:
            raise RuntimeError(f"a turn gave frames {client.checked_types}, expected status, text, query_complete")
        started = time.perf_counter()
        errors += await _turns_until(client, started + duration, latencies)
        elapsed = time.perf_counter() - started
    finally:
        client.close()
    return _summary(len(latencies), errors, elapsed, latencies)


async def _turns_until(client: WsTurnClient, deadline: float, latencies: List[float]) -> int:
    """Turns back to back until ``deadline``, each latency appended; 1 if a turn failed (then it stops), else 0."""
    while time.perf_counter() < deadline:
        sent = time.perf_counter()
        try:
            await client.turn("hello from the bench")
        except (asyncio.TimeoutError, ConnectionError):
            return 1
        latencies.append(time.perf_counter() - sent)
    return 0


async def concurrent_turns(host: str, port: int, paths: List[str], duration: float) -> Dict[str, Any]:
    """One client per path (one session each), all doing turns back to back for ``duration`` seconds."""
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def connect(path: str) -> WsTurnClient:
        async with gate:
            return await open_client(host, port, path)

    connect_started = time.perf_counter()
    clients = await asyncio.gather(*(connect(path) for path in paths))
    connect_seconds = time.perf_counter() - connect_started
    latencies: List[float] = []
    errors = 0
    started = time.perf_counter()
    deadline = started + duration

    async def run(client: WsTurnClient) -> None:
        nonlocal errors
        errors += await _turns_until(client, deadline, latencies)

    try:
        await asyncio.gather(*(run(client) for client in clients))
        elapsed = time.perf_counter() - started
    finally:
        for client in clients:
            client.close()
    result = _summary(len(latencies), errors, elapsed, latencies)
    result["clients"] = len(clients)
    result["connect_seconds"] = round(connect_seconds, 3)
    return result

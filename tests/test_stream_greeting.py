"""PROTOCOL.md §13.1: every stream opens with a comment at once, so a client (``curl -N``) sees it is
connected before anything happens; the comment is not an event, and clients skip it."""

from __future__ import annotations

import socket
import time

import pytest

from conftest import RunningGateway

FIRST_BYTES_WITHIN = 5.0  # seconds; the keep-alive (15 s by default) must not be what answers first


def first_body_bytes(gateway: RunningGateway, target: str) -> bytes:
    """The head and the first chunks of a stream, read until a blank line ends the first SSE block."""
    with socket.create_connection((gateway.host, gateway.port), timeout=FIRST_BYTES_WITHIN) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {gateway.host}\r\n\r\n".encode())
        data = b""
        deadline = time.monotonic() + FIRST_BYTES_WITHIN
        head_end = -1
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            head_end = data.find(b"\r\n\r\n")
            if head_end >= 0 and b"\n\n" in data[head_end + 4:]:
                break
        return data[head_end + 4:] if head_end >= 0 else b""


@pytest.mark.parametrize("target", ["/api/v1/ops/events", "/api/v1/ops/logs/tail?session_id=greeted&follow=true",
                                    "/api/v1/ops/sessions/greeted/preview?follow=true"])
def test_a_stream_says_it_is_connected_before_any_event(gateway, target):
    gateway.make_session("greeted", {"run.log": b"one line\n"})
    body = first_body_bytes(gateway, target)
    first_chunk = body.split(b"\r\n", 2)[1]
    assert first_chunk.startswith(b": connected"), body

"""A request the route refuses is answered as soon as its head is complete: its body is never read,
held or invited with "100 Continue" (README, Security: an anonymous client cannot pin 1 MiB per socket)."""

from __future__ import annotations

import socket
import time

import pytest

from conftest import rss_kib

TOKEN = "before-body-token-51"
MIB = 1024 * 1024


def head_only(gateway, path: str, extra: str = "") -> socket.socket:
    sock = socket.create_connection((gateway.host, gateway.port), timeout=5)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {MIB}\r\n{extra}\r\n".encode())
    return sock


def first_status(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, "closed without an answer"
        data += chunk
    return int(data.split(b" ", 2)[1])


@pytest.mark.parametrize("path,status", [
    ("/api/v1/ops/sessions/s-1/reset", 401),
    ("/api/v1/%6Fps/sessions/s-1/compact", 401),
    ("/api/v1/sessions", 401),
    ("/no/such/path", 404),
    ("/api/v1/health", 405),  # a public route, but no POST handler: nothing would read the body
])
def test_a_refused_request_is_answered_before_its_body_is_sent(start_gateway, path, status):
    gateway = start_gateway(env={"UA_OPS_TOKEN": TOKEN})
    with head_only(gateway, path) as sock:
        assert first_status(sock) == status


def test_expect_100_continue_gets_the_refusal_not_an_invitation(start_gateway):
    gateway = start_gateway(env={"UA_OPS_TOKEN": TOKEN})
    with head_only(gateway, "/api/v1/ops/sessions/s-1/reset", "Expect: 100-continue\r\n") as sock:
        assert first_status(sock) == 401


def test_an_admitted_request_still_gets_its_body_read(start_gateway):
    gateway = start_gateway(env={"UA_OPS_TOKEN": TOKEN})
    gateway.make_session("s-1", {"run.log": b"a\n"})
    reply = gateway.post("/api/v1/ops/sessions/s-1/compact", body={"max_lines": 1}, token=TOKEN)
    assert reply.status == 200


def test_anonymous_bodies_do_not_pin_memory(start_gateway):
    gateway = start_gateway(env={"UA_OPS_TOKEN": TOKEN})
    pid = gateway.process.pid
    assert gateway.get("/api/v1/health").status == 200
    before = rss_kib(pid)
    sockets = []
    try:
        for _ in range(100):
            sock = head_only(gateway, "/api/v1/ops/sessions/s-1/reset")
            sock.setblocking(False)
            try:
                sock.send(b"x" * (MIB - 1))  # as much as the kernel takes; the server reads none of it as a body
            except BlockingIOError:
                pass
            sockets.append(sock)
        time.sleep(0.5)
        grown_mib = (rss_kib(pid) - before) / 1024
        assert grown_mib < 40, f"RSS grew by {grown_mib:.0f} MiB for 100 refused 1 MiB bodies"
        assert gateway.get("/api/v1/health").status == 200
    finally:
        for sock in sockets:
            sock.close()


@pytest.mark.parametrize("method,path", [("GET", "/"), ("GET", "/api/v1/health"), ("DELETE", "/api/v1/ops/sessions/s-1")])
def test_a_body_on_a_method_that_takes_none_is_refused_before_it_is_read(gateway, method, path):
    with socket.create_connection((gateway.host, gateway.port), timeout=5) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {MIB}\r\n\r\n".encode())
        assert first_status(sock) == 400


def test_a_small_body_sent_with_the_head_of_a_get_is_refused_too(gateway):
    with socket.create_connection((gateway.host, gateway.port), timeout=5) as sock:
        sock.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nx=1")
        assert first_status(sock) == 400

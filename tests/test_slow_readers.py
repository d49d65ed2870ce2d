"""Peers that stop reading their answers pin neither memory nor connection slots (issue 9, item 2).

A hostile review held a gateway's memory (29 -> 431 MiB) and all of its connection slots with a handful of
sockets that pipeline requests for a large document and never read: every answer was buffered, and
``transport.close()`` waited for a drain that never came. Here the same attack runs against a real gateway
started with a small connection cap and a short send-stall deadline, measured from /proc/<pid>/status.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from conftest import launch, parse_responses, rss_kib, wait_for
from ua_gateway import Config, Gateway

OPENAPI = b"GET /api/v1/openapi.json HTTP/1.1\r\nHost: localhost\r\n\r\n"
SMALL_RCVBUF = 4096  # the peer's receive window: its kernel takes almost nothing of what is sent to it
STALL = 2.0  # --send-stall-timeout of the gateways here, in seconds
CAP = 64  # --max-connections: fewer than the peers, so that some are refused
PEERS = 200
PIPELINED = 200  # requests per peer: 200 answers of ~54 KB, more than the kernel buffers of a socket
RSS_BOUND_MIB = 48  # growth allowed while the peers sit; buffering their answers takes several times that


def rss_mib(pid: int) -> float:
    return rss_kib(pid) / 1024


def open_sockets(pid: int) -> int:
    """Sockets the process holds: the listener, the loop's self-pipe, and one per connection."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except FileNotFoundError:  # closed while we looked
            pass
    return count


def non_reading_peer(port: int, data: bytes) -> socket.socket:
    """A socket with a tiny receive window that sends ``data`` and then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RCVBUF)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    try:
        sock.sendall(data)
    except OSError:  # refused at the cap: the gateway answered 503 and closed before we sent
        pass
    return sock


@pytest.fixture(scope="module")
def siege(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, Any]]:
    """200 non-reading pipeliners against a gateway capped at 64 connections, watched until they are cut.

    One established client polls health on its keep-alive connection all along."""
    gateway = launch(
        tmp_path_factory.mktemp("siege") / "workspaces",
        "--max-connections", str(CAP), "--send-stall-timeout", str(STALL),
    )
    pid = gateway.process.pid
    poller = http.client.HTTPConnection(gateway.host, gateway.port, timeout=5)
    health: List[int] = []

    def poll_health() -> None:
        poller.request("GET", "/api/v1/health")
        response = poller.getresponse()
        response.read()
        health.append(response.status)

    poll_health()
    sockets_before = open_sockets(pid)  # the poller's connection included
    rss_before = rss_mib(pid)
    peers = [non_reading_peer(gateway.port, OPENAPI * PIPELINED) for _ in range(PEERS)]
    sat_at = time.monotonic()
    rss_peak = rss_before
    sockets_peak = sockets_before
    while time.monotonic() < sat_at + STALL + 8:
        rss_peak = max(rss_peak, rss_mib(pid))
        sockets = open_sockets(pid)
        sockets_peak = max(sockets_peak, sockets)
        poll_health()
        if sockets <= sockets_before:
            break
        time.sleep(0.1)
    record = {
        "gateway": gateway,
        "rss_before": rss_before,
        "rss_peak": rss_peak,
        "sockets_before": sockets_before,
        "sockets_peak": sockets_peak,
        "released_after": time.monotonic() - sat_at,
        "sockets_after": open_sockets(pid),
        "rss_after": rss_mib(pid),
        "health": health,
    }
    print(f"\nslow readers: RSS {rss_before:.1f} MiB before, {rss_peak:.1f} MiB peak with {PEERS} non-reading peers, "
          f"{record['rss_after']:.1f} MiB after; sockets {sockets_before} -> {sockets_peak} -> {record['sockets_after']} "
          f"in {record['released_after']:.1f} s; {len(health)} health polls")
    yield record
    for peer in peers:
        peer.close()
    poller.close()
    gateway.stop()


def test_memory_stays_bounded_while_peers_pipeline_and_never_read(siege):
    grown = siege["rss_peak"] - siege["rss_before"]
    assert siege["sockets_peak"] - siege["sockets_before"] >= CAP // 2, "the attack did not take hold"
    assert grown < RSS_BOUND_MIB, f"the gateway grew by {grown:.0f} MiB holding answers nobody reads"


def test_connections_of_peers_that_never_read_are_aborted_after_the_stall_deadline(siege):
    assert siege["sockets_after"] <= siege["sockets_before"], (
        f"{siege['sockets_after'] - siege['sockets_before']} connections of non-reading peers still open "
        f"{siege['released_after']:.1f} s after they stalled (deadline {STALL} s)"
    )


def test_clients_are_served_while_non_reading_peers_sit_and_after_they_are_cut(siege):
    assert siege["health"] and set(siege["health"]) == {200}, siege["health"]
    assert siege["gateway"].get("/api/v1/health", timeout=5).status == 200  # a new connection gets a slot


def test_closing_connection_whose_peer_does_not_read_is_aborted_after_the_stall_deadline(start_gateway):
    gateway = start_gateway("--send-stall-timeout", "1")
    # One answer of ~6 MB (every byte of 0xFF becomes "\ufffd"): more than the kernel takes, so after the
    # answer the close has to wait for this peer.
    gateway.make_session("big", {"run.log": (b"\xff" * 999 + b"\n") * 1000})
    pid = gateway.process.pid
    before = open_sockets(pid)
    request = (b"GET /api/v1/ops/logs/tail?session_id=big&file=run.log&max_bytes=1000000&limit=5000 HTTP/1.1\r\n"
               b"Host: localhost\r\nConnection: close\r\n\r\n")
    peer = non_reading_peer(gateway.port, request)
    try:
        assert wait_for(lambda: open_sockets(pid) > before, 5), "the gateway never took the connection"
        # linger (2 s) + the stall deadline (1 s) + a sweep, with room for a busy machine
        assert wait_for(lambda: open_sockets(pid) <= before, 8), "the close waits for a peer that never reads"
    finally:
        peer.close()


def test_pipelined_answers_to_a_late_reader_arrive_complete_and_in_order(tmp_path: Path):
    # The reader comes back after the head timeout has passed: waiting for it to read is no reason for a 408.
    count = 200  # ~11 MB of answers: more than the kernel and the old 4 MiB write buffer held together
    pipeline = b"".join(
        OPENAPI + f"GET /nope/{i} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode() for i in range(count)
    ) + b"GET /nope/end HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"

    def late_reader(port: int) -> bytes:
        sock = non_reading_peer(port, pipeline)
        with sock:
            time.sleep(2.5)  # the lateness under test, not a wait for a condition
            sock.settimeout(5)
            data = bytearray()
            while True:  # until the gateway closes after the last answer
                chunk = sock.recv(1 << 20)
                if not chunk:
                    return bytes(data)
                data += chunk

    async def scenario() -> bytes:
        config = Config(port=0, workspaces=tmp_path / "ws", header_timeout=1.0, send_stall_timeout=10.0)
        gateway = Gateway(config)
        await gateway.start()
        try:
            return await asyncio.get_running_loop().run_in_executor(None, late_reader, gateway.port)
        finally:
            await gateway.stop()

    replies = parse_responses(asyncio.run(scenario()))
    assert [status for status, _, _ in replies] == [200, 404] * count + [404]
    paths = [f"/nope/{i}" for i in range(count)] + ["/nope/end"]
    details = [json.loads(body)["detail"] for status, _, body in replies if status == 404]
    assert all(path in detail for path, detail in zip(paths, details)), "answers out of order"

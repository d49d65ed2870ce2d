#!/usr/bin/env python3
"""Memory per idle connection (issue 15, item 3): the gateway's RSS with N idle WebSockets, then with N idle
keep-alive HTTP connections, each against its RSS before them. ``python3 bench/connections.py``.

Rules this file keeps
- Standard library only, one process as the client: plain blocking sockets, opened one after the other, each
  step with a timeout; nothing is read after a connection is established, so the client costs nothing while
  the gateway is measured.
- Bounded and local: traffic goes to 127.0.0.1 only; at most ``--count`` connections of a kind (default
  10,000: MAX_CONNECTIONS), each kind against a fresh gateway; the gateway and its data are removed at the end.
- The open-file limit is raised to its hard limit for this process and the gateway it starts (both need a
  descriptor per connection); ``--count`` is lowered to fit when the hard limit is smaller.

A WebSocket is an agent connection attached to a session (``/api/v1/sessions/<id>/stream``), all on one
session, so that what is measured is the connection, not the session; an HTTP connection has answered one
health request and waits, kept alive. RSS is read from /proc once it has stopped growing.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
DEFAULT_COUNT = 10000  # MAX_CONNECTIONS, the gateway's default cap
SESSION = "conn_bench"
STEP_TIMEOUT = 10.0  # s: one connect, send or answer on loopback; slower is a failure, not a result
START_TIMEOUT = 30.0  # s: the gateway prints its listening line by then
SETTLE_POLLS = 20  # RSS read this many times at most, SETTLE_INTERVAL apart, until two readings agree
SETTLE_INTERVAL = 0.25
FD_HEADROOM = 200  # descriptors beyond the connections: the gateway's own files, the listener, pipes


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def settled_rss(pid: int) -> int:
    """RSS once two readings SETTLE_INTERVAL apart agree within 1% (or after SETTLE_POLLS readings)."""
    last = rss_kib(pid)
    for _ in range(SETTLE_POLLS):
        time.sleep(SETTLE_INTERVAL)
        now = rss_kib(pid)
        if abs(now - last) <= last // 100:
            return now
        last = now
    return last


def raise_fd_limit(count: int) -> int:
    """Raise RLIMIT_NOFILE as far as needed and allowed; the number of connections that fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = count + FD_HEADROOM
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return min(count, wanted - FD_HEADROOM)


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError(f"the gateway closed the connection; got {data[:200]!r}")
        data += chunk
    return data


def open_http(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=STEP_TIMEOUT)
    sock.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head = read_until(sock, b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"health answered {head[:100]!r}")
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
    body = head.split(b"\r\n\r\n", 1)[1]
    while len(body) < length:
        body += sock.recv(65536)
    return sock


def open_websocket(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=STEP_TIMEOUT)
    key = base64.b64encode(os.urandom(16))
    sock.sendall(b"GET /api/v1/sessions/" + SESSION.encode() + b"/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                 b"Sec-WebSocket-Key: " + key + b"\r\n\r\n")
    head = read_until(sock, b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"the WebSocket handshake was answered {head[:200]!r}")
    return sock


def start_gateway(pyz: Path, workspaces: Path, count: int) -> "tuple[subprocess.Popen, int]":
    process = subprocess.Popen(
        [sys.executable, str(pyz), "--port", "0", "--workspaces", str(workspaces),
         "--max-connections", str(count + 10)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=str(workspaces.parent),
    )
    assert process.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT
    line = b""
    while time.monotonic() < deadline and b"\n" not in line:
        line += process.stdout.read1(4096)  # type: ignore[attr-defined]
    match = re.search(rb"http://127\.0\.0\.1:(\d+)", line)
    if not match:
        process.kill()
        raise RuntimeError(f"the gateway printed no listening line: {line!r}")
    return process, int(match.group(1))


def measure(pyz: Path, kind: str, count: int, opener: Callable[[int], socket.socket]) -> Dict[str, float]:
    data = Path(tempfile.mkdtemp(prefix="ua-conn-bench-"))
    workspaces = data / "workspaces"
    (workspaces / SESSION).mkdir(parents=True)
    process, port = start_gateway(pyz, workspaces, count)
    sockets: List[socket.socket] = []
    try:
        for _ in range(20):  # warm: the code paths a connection takes are loaded before the baseline
            opener(port).close()
        before = settled_rss(process.pid)
        started = time.monotonic()
        for _ in range(count):
            sockets.append(opener(port))
        opened_s = time.monotonic() - started
        after = settled_rss(process.pid)
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited ({process.returncode}) while holding {len(sockets)} connections")
        return {"kind": kind, "count": count, "rss_before_kib": before, "rss_after_kib": after,
                "kib_per_connection": round((after - before) / count, 2), "open_s": round(opened_s, 1)}
    finally:
        for sock in sockets:
            sock.close()
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(data, ignore_errors=True)


def build_pyz(output: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "zipapp_build.py"), "--output", str(output)], check=True,
                   stdout=subprocess.DEVNULL, cwd=str(ROOT))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/connections.py", description=__doc__.split("\n")[0])
    parser.add_argument("--pyz", help="measure this zipapp (default: build one from the work tree)")
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help="connections of each kind (default 10000)")
    parser.add_argument("--kind", choices=("ws", "http", "both"), default="both")
    options = parser.parse_args(argv)
    count = raise_fd_limit(options.count)
    scratch = Path(tempfile.mkdtemp(prefix="ua-conn-pyz-"))
    try:
        pyz = Path(options.pyz) if options.pyz else scratch / "ua_gateway.pyz"
        if not options.pyz:
            build_pyz(pyz)
        kinds = {"ws": open_websocket, "http": open_http}
        for kind in (("ws", "http") if options.kind == "both" else (options.kind,)):
            result = measure(pyz, kind, count, kinds[kind])
            print(f"{kind:4s} {result['count']:6d} idle connections: RSS {result['rss_before_kib'] / 1024:.1f} -> "
                  f"{result['rss_after_kib'] / 1024:.1f} MiB, {result['kib_per_connection']:.2f} KiB per connection "
                  f"(opened in {result['open_s']} s)", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Load on one gateway, from one asyncio process, over loopback: HTTP clients, WebSocket clients and
slowloris sockets. Used by ``tests/test_load.py`` (short, in CI) and ``tests/soak/soak.py`` (long).

Every client checks every answer: an HTTP status other than 200, a WebSocket frame out of place, a
timeout or a dropped connection is an error, and the first few are kept with their reason.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parents[2]
OP_TIMEOUT = 10.0  # one request or one turn; slower than this is an error, not a latency


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft limit on open files towards ``wanted`` (within the hard limit); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, max(soft, wanted)) if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Stats:
    """Latencies (seconds) and errors of one kind of client."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.latencies: List[float] = []
        self.errors = 0
        self.samples: List[str] = []

    def ok(self, seconds: float) -> None:
        self.latencies.append(seconds)

    def error(self, reason: str) -> None:
        self.errors += 1
        if len(self.samples) < 10:
            self.samples.append(reason[:300])

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]

    def summary(self) -> str:
        return (f"{self.name}: {len(self.latencies)} ok, {self.errors} errors, "
                f"p50 {self.percentile(50) * 1000:.1f} ms, p99 {self.percentile(99) * 1000:.1f} ms, "
                f"max {max(self.latencies, default=float('nan')) * 1000:.1f} ms")


# -- HTTP --------------------------------------------------------------------------------------------------

HTTP_PATHS = ("/api/v1/health", "/api/v1/ops/logs/tail?session_id=load-0&limit=20", "/api/v1/ops/sessions/load-0",
              "/api/v1/ops/sessions/load-0/preview?limit=10", "/api/v1/ops/logs/tail?limit=5")
# A listing scans every session directory: with 500 sessions it costs ~10 ms of CPU, so the clients that
# list are a few consoles polling once a second, not the whole crowd.
CONSOLE_PATHS = ("/api/v1/ops/sessions?limit=50", "/api/v1/ops/sessions?status=active&limit=50")
CONSOLE_CLIENTS = 10
CONSOLE_PERIOD = 1.0


async def read_response(reader: asyncio.StreamReader) -> Tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    match = re.search(rb"\r\ncontent-length: *(\d+)", head, re.I)
    body = await reader.readexactly(int(match.group(1))) if match else b""
    return status, body


async def http_client(host: str, port: int, stop: asyncio.Event, stats: Stats, think: float,
                      paths: Sequence[str] = HTTP_PATHS) -> None:
    """One keep-alive connection sending GETs until ``stop``; reconnects only after an error."""
    rng = random.Random()
    reader = writer = None
    while not stop.is_set():
        path = rng.choice(paths)
        try:
            if writer is None:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), OP_TIMEOUT)
            started = time.perf_counter()
            writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
            status, body = await asyncio.wait_for(read_response(reader), OP_TIMEOUT)
            if status != 200:
                stats.error(f"GET {path}: {status} {body[:200]!r}")
            else:
                stats.ok(time.perf_counter() - started)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            stats.error(f"GET {path}: {exc!r}")
            if writer is not None:
                writer.close()
            reader = writer = None
        if think:
            await asyncio.sleep(rng.uniform(0, think))
    if writer is not None:
        writer.close()


# -- WebSocket ---------------------------------------------------------------------------------------------


async def ws_client(url: str, stop: asyncio.Event, stats: Stats, think: float, execute_every: int,
                    connect_gate: asyncio.Semaphore) -> None:
    """One agent connection: ``ping`` messages, and every ``execute_every``-th an echo turn."""
    rng = random.Random()
    n = 0
    try:
        async with connect_gate:
            ws = await asyncio.wait_for(connect(url + "/ws/agent", compression=None, ping_interval=None,
                                                open_timeout=OP_TIMEOUT), OP_TIMEOUT * 2)
    except Exception as exc:  # any failure to connect is an error of the run
        stats.error(f"connect: {exc!r}")
        return
    try:
        # The first message is a turn: it creates the session (the lobby's rule).
        while not stop.is_set():
            started = time.perf_counter()
            if n % execute_every == 0:
                text = f"turn {n} {rng.random()}"
                await ws.send(json.dumps({"type": "execute", "data": {"user_input": text}}))
                echoed = False
                while True:
                    frame = json.loads(await asyncio.wait_for(ws.recv(), OP_TIMEOUT))
                    if frame["type"] == "text":
                        echoed = frame["data"].get("text") == text
                    elif frame["type"] == "query_complete":
                        break
                    elif frame["type"] not in ("connected", "status"):
                        raise AssertionError(f"unexpected frame {frame}")
                if not echoed:
                    raise AssertionError("the turn did not echo its input")
            else:
                await ws.send('{"type":"ping"}')
                frame = json.loads(await asyncio.wait_for(ws.recv(), OP_TIMEOUT))
                if frame["type"] != "pong":
                    raise AssertionError(f"expected pong, got {frame}")
            stats.ok(time.perf_counter() - started)
            n += 1
            if think:
                await asyncio.sleep(rng.uniform(0, think))
    except Exception as exc:
        stats.error(f"message {n}: {exc!r}")
    finally:
        await ws.close()


async def run_mixed(host: str, port: int, seconds: float, http_clients: int = 200, ws_clients: int = 500,
                    http_think: float = 0.1, ws_think: float = 0.5, execute_every: int = 5) -> Tuple[Stats, Stats]:
    """``http_clients`` and ``ws_clients`` at once for ``seconds`` (after the WebSockets are connected)."""
    raise_fd_limit(4 * (http_clients + ws_clients) + 256)
    stop = asyncio.Event()
    http_stats, ws_stats = Stats("HTTP"), Stats("WebSocket")
    gate = asyncio.Semaphore(100)  # connect in waves: a SYN flood of 500 is not what we measure
    url = f"ws://{host}:{port}"
    tasks = [asyncio.ensure_future(ws_client(url, stop, ws_stats, ws_think, execute_every, gate))
             for _ in range(ws_clients)]
    consoles = min(CONSOLE_CLIENTS, http_clients // 10)
    tasks += [asyncio.ensure_future(http_client(host, port, stop, http_stats, 2 * CONSOLE_PERIOD, CONSOLE_PATHS))
              for _ in range(consoles)]
    tasks += [asyncio.ensure_future(http_client(host, port, stop, http_stats, http_think))
              for _ in range(http_clients - consoles)]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), OP_TIMEOUT * 3)
    return http_stats, ws_stats


# -- slowloris ---------------------------------------------------------------------------------------------


async def slowloris_socket(host: str, port: int, stop: asyncio.Event, result: Dict[str, int]) -> None:
    """A request head that never ends: a header byte every second or so, until the server gives up."""
    rng = random.Random()
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        result["refused"] += 1
        return
    result["opened"] += 1
    writer.write(b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\n")
    closed_by_server = False
    try:
        while not stop.is_set():
            writer.write(rng.choice([b"X", b"-", b"a", b":", b" ", b"1"]))  # never a CRLF: the head never ends
            try:
                data = await asyncio.wait_for(reader.read(65536), rng.uniform(0.5, 1.5))
            except asyncio.TimeoutError:
                continue
            if data.startswith(b"HTTP/1.1 408"):
                result["timed_out"] += 1
            if not data or data.startswith(b"HTTP/1.1"):
                closed_by_server = True
                break
    except OSError:
        closed_by_server = True
    finally:
        result["closed_by_server"] += closed_by_server
        writer.close()


async def probe(host: str, port: int) -> float:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        status, _ = await asyncio.wait_for(read_response(reader), 5)
        if status != 200:
            raise AssertionError(f"health answered {status}")
        return time.perf_counter() - started
    finally:
        writer.close()


async def run_slowloris(host: str, port: int, sockets: int = 1000, seconds: float = 12.0,
                        probe_every: float = 0.1) -> Tuple[Dict[str, int], Stats]:
    """``sockets`` slowloris connections for ``seconds`` while a normal client probes health."""
    raise_fd_limit(2 * sockets + 256)
    stop = asyncio.Event()
    result = {"opened": 0, "refused": 0, "timed_out": 0, "closed_by_server": 0}
    tasks = [asyncio.ensure_future(slowloris_socket(host, port, stop, result)) for _ in range(sockets)]
    probes = Stats("normal client during slowloris")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        try:
            probes.ok(await probe(host, port))
        except Exception as exc:
            probes.error(repr(exc))
        await asyncio.sleep(probe_every)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    return result, probes


# -- a gateway of its own (for the soak script) -------------------------------------------------------------


def start_gateway(workspaces: Path, *args: str, script: Optional[Path] = None) -> Tuple[subprocess.Popen, str, int]:
    """``python ua_gateway.py --port 0`` (or ``script``, e.g. the .pyz) in a subprocess; (process, host,
    port) once it listens."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UA_")}
    workspaces.parent.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [sys.executable, str(script or ROOT / "ua_gateway.py"), "--port", "0", "--workspaces", str(workspaces), *args],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=str(workspaces.parent),
    )
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    match = re.search(r"http://([^\s:]+):(\d+)", line)
    if not match:
        process.kill()
        raise RuntimeError(f"the gateway did not start: {line!r}")
    return process, match.group(1), int(match.group(2))


def stop_gateway(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def prepare_sessions(workspaces: Path, names: Sequence[str]) -> None:
    for name in names:
        directory = workspaces / name
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "run.log").write_bytes(b"".join(b"load line %d\n" % i for i in range(2000)))
        (directory / "activity_journal.log").write_bytes(b"[2026-01-01 00:00:00] [TEXT] hello\n" * 100)


def report(stats: Optional[Stats]) -> str:
    return "" if stats is None else stats.summary() + "".join(f"\n    {s}" for s in stats.samples)

#!/usr/bin/env python3
"""Live streams (issue 13, PROTOCOL.md §13) in one command: ``python bench/live.py`` (about 2 minutes).

1. A turn writes 1,000 journal lines per second (an agent command printing 10 text events every 10 ms);
   1, 50 and 200 followers stream that journal (``preview?follow=true``): server CPU from /proc/<pid>/stat
   and append-to-client latency (each line carries the time it was printed).
2. Side by side, in the same run: an outside writer appends 1,000 lines/s to run.log in both servers'
   roots; our 200 streams against 200 clients polling the FastAPI baseline's tail once a second: CPU per
   delivered line, and lines delivered late (> 1 s) or never.

Rules kept (as bench/run.py): the bench venv, servers pinned to CPU 0 and the clients to CPU 1, all traffic
to 127.0.0.1, every phase of fixed duration. Writes the table under "Live streams" in docs/bench.md.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  the bench's bootstrap, pinning, servers and /proc helpers
import wsload  # noqa: E402

HOST = "127.0.0.1"
LINES_PER_S = 1000
PHASE_S = 12.0  # each measured phase; 4 phases: about a minute of load
SETTLE_S = 1.5  # after the followers connect, before measuring
FOLLOWER_COUNTS = (1, 50, 200)
SIDE_CLIENTS = 200
LATE_S = 1.0
LATENCY_SAMPLE = 10  # every 10th follower records latencies (all count lines)
SLICE_EVENT = b"event: slice\n"
STAMP_RE = re.compile(rb"L(\d{19})")  # the print time (ns) each bench line carries
BENCH_MD = run.ROOT / "docs" / "bench.md"
SECTION = "## Live streams"

AGENT = """\
import sys, time
sys.stdin.readline()
end = time.time() + {seconds}
while time.time() < end:
    sys.stdout.write("".join('{{"type": "text", "data": {{"text": "L%d"}}}}\\n' % time.time_ns() for _ in range(10)))
    sys.stdout.flush()
    time.sleep(0.01)
"""


class Tally:
    """Lines one follower received: count, latencies (if sampled), stamps seen (for late / never)."""

    def __init__(self, sample: bool) -> None:
        self.sample = sample
        self.lines = 0
        self.latencies: List[float] = []
        self.seen: Dict[int, float] = {}
        self.keep_seen = False

    def feed(self, data: bytes) -> None:
        now = time.time_ns()
        stamps = STAMP_RE.findall(data)
        self.lines += len(stamps)
        if self.sample:
            self.latencies.extend((now - int(s)) / 1e6 for s in stamps)
        if self.keep_seen:
            for s in stamps:
                self.seen.setdefault(int(s), now)


class Follower(asyncio.Protocol):
    def __init__(self, path: str, tally: Tally) -> None:
        self.path, self.tally, self.tail = path, tally, b""
        self.slice_pending = True  # the first event of a follow without a cursor (PROTOCOL.md §13.1)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(f"GET {self.path} HTTP/1.1\r\nHost: {HOST}\r\nAccept: text/event-stream\r\n\r\n".encode())

    def data_received(self, data: bytes) -> None:
        data = self.tail + data
        cut = data.rfind(b"\n\n") + 2  # whole SSE events only: an event's kind is known before its lines
        self.tail = data[cut:]
        events = data[:cut]
        if self.slice_pending and SLICE_EVENT in events:
            # The opening ``slice`` is the preview a plain call gives: lines printed before the follower
            # came, whose age is not append-to-client latency. Only the events after it are measured.
            start = events.index(SLICE_EVENT)
            end = events.index(b"\n\n", start) + 2
            events, self.slice_pending = events[:start] + events[end:], False
        self.tally.feed(events)


async def followers(port: int, path: str, count: int, seconds: float, keep_seen: bool = False) -> List[Tally]:
    loop = asyncio.get_running_loop()
    tallies = [Tally(i % LATENCY_SAMPLE == 0) for i in range(count)]
    transports = []
    for tally in tallies:
        tally.keep_seen = keep_seen
        transport, _ = await loop.create_connection(lambda t=tally: Follower(path, t), HOST, port)
        transports.append(transport)
    await asyncio.sleep(seconds)
    for transport in transports:
        transport.close()
    return tallies


async def pollers(port: int, path: str, count: int, seconds: float) -> List[Tally]:
    """Clients polling the baseline's tail once a second with the cursor it returns."""
    tallies = [Tally(False) for _ in range(count)]
    deadline = time.monotonic() + seconds

    async def poll(tally: Tally) -> None:
        tally.keep_seen = True
        reader, writer = await asyncio.open_connection(HOST, port)
        cursor: Optional[int] = None
        while time.monotonic() < deadline:
            query = f"{path}&limit=2000&max_bytes=1000000" + (f"&cursor={cursor}" if cursor is not None else "")
            writer.write(f"GET {query} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
            body = await reader.readexactly(length)
            answer = json.loads(body)
            if cursor is not None:
                tally.feed("\n".join(answer["lines"]).encode())
            cursor = answer["cursor"]
            await asyncio.sleep(1.0)
        writer.close()

    await asyncio.gather(*(poll(t) for t in tallies))
    return tallies


def writer_thread(paths: List[Path], seconds: float, written: List[int]) -> threading.Thread:
    """An outside writer: 10 lines every 10 ms to each path, each line stamped with its write time."""
    def write() -> None:
        handles = [open(p, "ab") for p in paths]
        end = time.time() + seconds
        while time.time() < end:
            stamp = time.time_ns()
            block = b"".join(b"outside L%d\n" % (stamp + i) for i in range(10))
            for handle in handles:
                handle.write(block)
                handle.flush()
            written.extend(stamp + i for i in range(10))
            time.sleep(0.01)
        for handle in handles:
            handle.close()
    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def percentile(values: List[float], fraction: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def turn_phase(server: Any, count: int) -> Dict[str, Any]:
    session = f"live-{count}"
    (server.root / session).mkdir(parents=True, exist_ok=True)
    ws = await wsload.open_client(HOST, server.port, f"/api/v1/sessions/{session}/stream")
    payload = json.dumps({"type": "execute", "data": {"user_input": "go"}}).encode()
    ws.transport.write(wsload.client_frame(0x1, payload))  # the turn runs PHASE_S + SETTLE_S + 1 s
    await asyncio.sleep(0.5)
    task = asyncio.create_task(followers(server.port, f"/api/v1/ops/sessions/{session}/preview?follow=true",
                                         count, SETTLE_S + PHASE_S))
    await asyncio.sleep(SETTLE_S)
    cpu0, t0 = run.cpu_seconds(server.process.pid), time.monotonic()
    lines0 = 0
    await asyncio.sleep(PHASE_S)
    cpu = (run.cpu_seconds(server.process.pid) - cpu0) / (time.monotonic() - t0)
    tallies = await task
    ws.close()
    latencies = [value for t in tallies for value in t.latencies if value >= 0]
    return {"followers": count, "cpu_pct": round(cpu * 100, 1),
            "lines_per_follower_s": round(sum(t.lines for t in tallies) / count / (SETTLE_S + PHASE_S), 1),
            "p50_ms": round(percentile(latencies, 0.5) or 0, 1), "p99_ms": round(percentile(latencies, 0.99) or 0, 1),
            "_lines0": lines0}


def late_and_never(tallies: List[Tally], written: List[int], until_ns: int) -> Dict[str, int]:
    late = never = 0
    for tally in tallies:
        for stamp in written:
            if stamp > until_ns:
                continue
            got = tally.seen.get(stamp)
            if got is None:
                never += 1
            elif got - stamp > LATE_S * 1e9:
                late += 1
    return {"late": late, "never": never}


async def side_by_side(ours: Any, baseline: Any, ours_root: Path, base_root: Path) -> Dict[str, Any]:
    for root in (ours_root, base_root):
        (root / "side").mkdir(parents=True, exist_ok=True)
        (root / "side" / "run.log").write_bytes(b"start\n")
    written: List[int] = []
    streams = asyncio.create_task(followers(ours.port, "/api/v1/ops/logs/tail?session_id=side&follow=true",
                                            SIDE_CLIENTS, PHASE_S + 3, keep_seen=True))
    polls = asyncio.create_task(pollers(baseline.port, "/api/v1/ops/logs/tail?session_id=side", SIDE_CLIENTS, PHASE_S + 3))
    await asyncio.sleep(1.0)
    cpu = {s.name: run.cpu_seconds(s.process.pid) for s in (ours, baseline)}
    writer = writer_thread([ours_root / "side" / "run.log", base_root / "side" / "run.log"], PHASE_S, written)
    await asyncio.sleep(PHASE_S)
    used = {s.name: run.cpu_seconds(s.process.pid) - cpu[s.name] for s in (ours, baseline)}
    writer.join()
    until = time.time_ns() - int(0.1e9)
    stream_tallies, poll_tallies = await streams, await polls
    rows = {}
    for name, tallies in (("ours: 200 streams", stream_tallies), ("baseline: 200 pollers, 1/s", poll_tallies)):
        delivered = sum(len(t.seen) for t in tallies)
        key = "ours" if name.startswith("ours") else "baseline"
        rows[name] = {"cpu_s": round(used[key], 2), "delivered": delivered,
                      "cpu_us_per_line": round(used[key] / max(1, delivered) * 1e6, 2),
                      **late_and_never(tallies, written, until), "expected": len(written) * len(tallies)}
    return rows


def write_markdown(turns: List[Dict[str, Any]], side: Dict[str, Any], stamp: str) -> str:
    one = next(r for r in turns if r["followers"] == 1)["cpu_pct"]
    lines = [SECTION, "", f"`python bench/live.py`, {stamp}: a turn writes {LINES_PER_S} journal lines/s; N followers "
             f"stream it (`preview?follow=true`), {PHASE_S:.0f} s each. Server pinned to one core.", "",
             "| followers | server CPU | × 1 follower | lines/s per follower | latency p50 | latency p99 |",
             "|---:|---:|---:|---:|---:|---:|"]
    for row in turns:
        lines.append(f"| {row['followers']} | {row['cpu_pct']} % | {row['cpu_pct'] / max(one, 0.1):.2f} | "
                     f"{row['lines_per_follower_s']} | {row['p50_ms']} ms | {row['p99_ms']} ms |")
    lines += ["", "Targets (issue 13): CPU at 200 followers ≤ 2× that at 1; p99 ≤ 50 ms at 200.", "",
              f"Side by side, same run: an outside writer appends {LINES_PER_S} lines/s to run.log for {PHASE_S:.0f} s "
              "in both roots; our streams find them by the 250 ms stat poll.", "",
              "| clients | server CPU | lines delivered | CPU per line | late (> 1 s) | never |", "|---|---:|---:|---:|---:|---:|"]
    for name, row in side.items():
        lines.append(f"| {name} | {row['cpu_s']} s | {row['delivered']} of {row['expected']} | "
                     f"{row['cpu_us_per_line']} µs | {row['late']} | {row['never']} |")
    return "\n".join(lines) + "\n"


def save(markdown: str) -> None:
    text = BENCH_MD.read_text() if BENCH_MD.exists() else "# Benchmarks\n"
    start = text.find(SECTION)
    if start >= 0:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + markdown + (text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + markdown
    BENCH_MD.write_text(text)


async def measure(ours: Any, baseline: Any, ours_root: Path, base_root: Path) -> Any:
    turns = [await turn_phase(ours, count) for count in FOLLOWER_COUNTS]
    side = await side_by_side(ours, baseline, ours_root, base_root)
    return turns, side


def start_ours(pin: Any, host_python: str, pyz: Path, root: Path, log_dir: Path, agent: Path) -> Any:
    """Our server as bench/run.py starts it, with the agent command that writes the lines."""
    command = f"{shlex.quote(host_python)} {shlex.quote(str(agent))}"
    stderr_log = open(log_dir / "ours.stderr.log", "wb")
    process = run.subprocess.Popen(
        pin.server() + [host_python, str(pyz), "--port", "0", "--workspaces", str(root), "--agent-cmd", command],
        stdout=run.subprocess.PIPE, stderr=stderr_log, env=run.server_env(), cwd=str(log_dir))
    line = run._read_line(process.stdout, run.START_TIMEOUT)
    match = re.search(rb"http://127\.0\.0\.1:(\d+)", line)
    if not match:
        process.kill()
        raise RuntimeError(f"our server printed no listening line: {line!r}")
    threading.Thread(target=run._drain, args=(process.stdout, open(log_dir / "ours.stdout.log", "wb")), daemon=True).start()
    server = run.Server("ours", process, int(match.group(1)), [stderr_log])
    run.wait_healthy(server.port, run.START_TIMEOUT, process)
    server.root = root  # type: ignore[attr-defined]
    return server


def bootstrap() -> None:
    """Re-run this script in the bench venv (run.bootstrap would re-run run.py), creating it as run.py does."""
    if run._in_bench_venv():
        return
    venv_python = run.VENV_DIR / "bin" / "python"
    digest = run.hashlib.sha256(run.REQUIREMENTS.read_bytes()).hexdigest()
    stamp = run.VENV_DIR / ".requirements.sha256"
    if not venv_python.exists() or not stamp.exists() or stamp.read_text().strip() != digest:
        if not venv_python.exists():
            run.subprocess.run([sys.executable, "-m", "venv", str(run.VENV_DIR)], check=True)
        run.subprocess.run([str(venv_python), "-m", "pip", "install", "--quiet", "-r", str(run.REQUIREMENTS)], check=True)
        stamp.write_text(digest + "\n")
    env = dict(run.os.environ)
    env.setdefault(run.HOST_PYTHON_ENV, sys.executable)
    run.os.execve(str(venv_python), [str(venv_python), str(Path(__file__).resolve()), *sys.argv[1:]], env)


def main() -> int:
    bootstrap()
    pin = run.Pinning()
    pin.pin_self()
    host_python = run.os.environ.get(run.HOST_PYTHON_ENV, sys.executable)
    with tempfile.TemporaryDirectory(prefix="ua-live-bench-") as scratch:
        work = Path(scratch)
        pyz = work / "ua_gateway.pyz"
        run.build_pyz(host_python, pyz, worktree=True)
        agent = work / "agent.py"
        agent.write_text(AGENT.format(seconds=PHASE_S + SETTLE_S + 1.5))
        ours_root, base_root = work / "ours", work / "base"
        ours_root.mkdir()
        base_root.mkdir()
        ours = start_ours(pin, host_python, pyz, ours_root, work, agent)
        baseline = run.start_baseline(pin, base_root, work)
        try:
            turns, side = asyncio.run(measure(ours, baseline, ours_root, base_root))
        finally:
            ours.stop()
            baseline.stop()
    markdown = write_markdown(turns, side, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    print(markdown)
    save(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())

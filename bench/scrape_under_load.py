#!/usr/bin/env python3
"""What a Prometheus scrape does to health under load: ``python bench/scrape_under_load.py``.

Starts the gateway (``ua_gateway.py``, a token, 200 sessions) and runs wrk against ``GET /api/v1/health``
(1 thread, 50 connections, DURATION s) in alternated rounds: without scraping, and with a scraper thread
that GETs ``/metrics`` with the token SCRAPES_PER_S times a second (a Prometheus scraping every 100 ms,
ten times more often than the usual 1 s). Run it with a Python that has websockets (the gateway is
started with the same interpreter), e.g. ``.venv-ci/bin/python bench/scrape_under_load.py``. Prints, per condition, the median over ROUNDS of wrk's
requests/s and p99 latency, the gateway's CPU seconds, and the scrapes' own latency. Needs wrk
(/usr/bin/wrk); loopback only; about 2 minutes.
"""

from __future__ import annotations

import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "scrape-bench-token-0123456789"
ROUNDS = 5
DURATION = 8  # s per wrk run
SCRAPES_PER_S = 10
SESSIONS = 200


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(url: str) -> Dict[str, float]:
    out = subprocess.run(["wrk", "-t1", "-c50", f"-d{DURATION}s", "--latency", url],
                         capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99_text = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    p99 = float(p99_text.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[p99_text.group(2)]
    return {"rps": rate, "p99_ms": p99}


def scraper(base: str, stop: threading.Event, latencies: List[float]) -> None:
    request = urllib.request.Request(f"{base}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    while not stop.is_set():
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=10) as answer:
            answer.read()
        latencies.append((time.perf_counter() - started) * 1000)
        stop.wait(max(0.0, 1 / SCRAPES_PER_S - (time.perf_counter() - started)))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ws"
        root.mkdir()
        for index in range(SESSIONS):
            session = root / f"s{index:04d}"
            session.mkdir()
            (session / "run.log").write_text("line\n" * 100)
        port = free_port()
        env = dict(os.environ, UA_OPS_TOKEN=TOKEN)
        server = subprocess.Popen([sys.executable, str(ROOT / "ua_gateway.py"), "--port", str(port),
                                   "--workspaces", str(root)], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(100):
                try:
                    urllib.request.urlopen(f"{base}/api/v1/health", timeout=1).read()
                    break
                except OSError:
                    time.sleep(0.1)
            results: Dict[str, List[Dict[str, float]]] = {"no scrape": [], f"{SCRAPES_PER_S} scrapes/s": []}
            scrape_ms: List[float] = []
            for round_index in range(ROUNDS * 2):
                scraping = round_index % 2 == 1
                stop = threading.Event()
                thread = threading.Thread(target=scraper, args=(base, stop, scrape_ms)) if scraping else None
                before = cpu_seconds(server.pid)
                if thread:
                    thread.start()
                result = wrk(f"{base}/api/v1/health")
                stop.set()
                if thread:
                    thread.join()
                result["cpu_s"] = cpu_seconds(server.pid) - before
                results[f"{SCRAPES_PER_S} scrapes/s" if scraping else "no scrape"].append(result)
            print(f"health under wrk (-t1 -c50, {DURATION} s), median of {ROUNDS} alternated rounds")
            print("| condition | req/s | p99 | gateway CPU s |")
            print("|---|---:|---:|---:|")
            for name, rows in results.items():
                print(f"| {name} | {statistics.median(r['rps'] for r in rows):,.0f} | "
                      f"{statistics.median(r['p99_ms'] for r in rows):.2f} ms | "
                      f"{statistics.median(r['cpu_s'] for r in rows):.2f} |")
            if scrape_ms:
                ordered = sorted(scrape_ms)
                print(f"scrape latency under load: median {statistics.median(ordered):.1f} ms, "
                      f"p99 {ordered[int(len(ordered) * 0.99) - 1]:.1f} ms ({len(ordered)} scrapes)")
        finally:
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    main()

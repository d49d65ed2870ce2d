#!/usr/bin/env python3
"""What GET /metrics costs, in process: ``python bench/metrics_cost.py [--dispatch-only]``.

1. Dispatch of ``GET /api/v1/health`` (the hot path that now also counts each request): microseconds per
   call, median of ROUNDS rounds of CALLS calls. Run it on a checkout without metrics to compare.
2. A scrape (``Application.metrics_page``, the disk half in a worker thread as served): CPU milliseconds
   (the process's, all threads), median of SCRAPES, after SESSIONS sessions exist; the first scrape,
   which walks the root and counts sessions, is reported apart.
Bounded: a few seconds of one core; nothing leaves the process.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ua_gateway import Config  # noqa: E402
from uagw.app import Application  # noqa: E402
from uagw.http11 import Request  # noqa: E402

ROUNDS = 7
CALLS = 50_000
SCRAPES = 20
SESSIONS = 200


def dispatch_cost(app: Application) -> tuple:
    """(median, lowest) CPU microseconds per dispatch of a health request: CPU time, not wall time, so
    that other tenants of a shared machine count less."""
    timings = []
    for _ in range(ROUNDS):
        started = time.process_time()
        for _ in range(CALLS):
            request = Request("GET", "/api/v1/health", "HTTP/1.1", [("host", "127.0.0.1")])
            request.started = time.monotonic()
            app.dispatch(request)
        timings.append((time.process_time() - started) / CALLS * 1e6)
    return statistics.median(timings), min(timings)


async def scrape_cost(app: Application) -> tuple:
    await app.open()
    for index in range(SESSIONS):
        app.ops.create_session(f"bench-{index}")
    request = Request("GET", "/metrics", "HTTP/1.1", [("host", "127.0.0.1")])
    cpu = []
    size = 0
    for _ in range(SCRAPES + 1):
        started = time.process_time()
        response = await app.metrics_page(request, {})
        cpu.append((time.process_time() - started) * 1000)
        size = len(response.body)
    return cpu[0], statistics.median(cpu[1:]), size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dispatch-only", action="store_true", help="only the dispatch cost (works on old code)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        app = Application(Config(workspaces=Path(directory) / "workspaces"))
        median, lowest = dispatch_cost(app)
        print(f"dispatch GET /api/v1/health: {median:.2f} us CPU (median of {ROUNDS} x {CALLS}; lowest {lowest:.2f})")
        if not args.dispatch_only:
            first, median, size = asyncio.run(scrape_cost(app))
            print(f"scrape: first {first:.1f} ms CPU, then {median:.2f} ms CPU (median of {SCRAPES}), {size} bytes, "
                  f"{SESSIONS} sessions")
        app.executor.shutdown(wait=False)


if __name__ == "__main__":
    main()

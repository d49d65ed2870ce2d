"""The long version of the load and fault proofs; one command, loopback only.

    python3 tests/soak/soak.py --seconds 60

runs, each against a fresh gateway in a temporary directory:

1. 200 HTTP clients and 500 WebSocket agent clients for ``--seconds`` (zero errors expected);
2. 1,000 slowloris sockets for ``--slowloris-seconds`` (at least the 10 s head timeout) while a normal
   client probes health (every probe within 1 s; every slowloris socket cut off);
3. the kill -9 loop of tests/test_faults.py for ``--kill-seconds`` (0 bytes lost).

It prints the counts and p99s and exits 1 if any expectation failed. ``--gateway dist/ua_gateway.pyz``
soaks the built zipapp instead of ua_gateway.py. Not collected by pytest (its name is not test_*.py).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import List

HERE = Path(__file__).resolve().parent
# This directory (for loadgen), tests/ (for test_faults and its helpers) and the project.
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent.parent)]

from loadgen import (  # noqa: E402
    prepare_sessions,
    report,
    run_mixed,
    run_slowloris,
    start_gateway,
    stop_gateway,
)


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="mixed HTTP+WebSocket load duration (default 60)")
    parser.add_argument("--http", type=int, default=200, help="HTTP clients (default 200)")
    parser.add_argument("--ws", type=int, default=500, help="WebSocket clients (default 500)")
    parser.add_argument("--slowloris", type=int, default=1000, help="slowloris sockets (default 1000)")
    parser.add_argument("--slowloris-seconds", type=float, default=15.0, help="slowloris duration (default 15)")
    parser.add_argument("--kill-seconds", type=float, default=30.0, help="kill -9 loop duration, 0 to skip (default 30)")
    parser.add_argument("--gateway", type=Path, help="the gateway to run (default ua_gateway.py; e.g. dist/ua_gateway.pyz)")
    args = parser.parse_args(argv)
    failures: List[str] = []

    with tempfile.TemporaryDirectory(prefix="ua-soak-") as scratch:
        base = Path(scratch)

        root = base / "mixed" / "ws"
        prepare_sessions(root, ["load-0"])
        process, host, port = start_gateway(root, script=args.gateway)
        try:
            started = time.monotonic()
            http_stats, ws_stats = asyncio.run(run_mixed(host, port, args.seconds, args.http, args.ws))
            elapsed = time.monotonic() - started
        finally:
            status = stop_gateway(process)
        print(f"mixed load, {args.http} HTTP + {args.ws} WebSocket clients, {elapsed:.0f} s:")
        print(f"  {report(http_stats)}\n  {report(ws_stats)}")
        print(f"  throughput: {len(http_stats.latencies) / elapsed:.0f} HTTP req/s, "
              f"{len(ws_stats.latencies) / elapsed:.0f} WebSocket round trips/s; gateway exit status {status}")
        if http_stats.errors or ws_stats.errors or status != 0:
            failures.append("mixed load had errors")

        root = base / "slowloris" / "ws"
        process, host, port = start_gateway(root, script=args.gateway)
        try:
            result, probes = asyncio.run(run_slowloris(host, port, args.slowloris, args.slowloris_seconds))
        finally:
            stop_gateway(process)
        print(f"slowloris, {args.slowloris} sockets, {args.slowloris_seconds:.0f} s: {result}")
        print(f"  {report(probes)}")
        if probes.errors or not probes.latencies or max(probes.latencies) >= 1.0:
            failures.append("a normal client waited 1 s or more during slowloris")
        if args.slowloris_seconds > 11 and result["closed_by_server"] != result["opened"]:
            failures.append("slowloris sockets outlived the head timeout")

        if args.kill_seconds > 0:
            from test_faults import kill_loop  # needs tests/ on the path, and pytest installed

            counts = kill_loop(base / "kill" / "ws", random.Random(), min_faults=10, max_faults=10**6,
                               seconds=args.kill_seconds)
            print(f"kill -9 during reset/compact: {counts['faults']} faults injected, {counts['cut_off']} operations "
                  f"cut off, {counts['mid_operation']} kills mid-operation, {counts['bytes']} bytes of known lines, "
                  f"{counts['lost']} bytes lost")
            if counts["lost"]:
                failures.append("bytes were lost")

    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

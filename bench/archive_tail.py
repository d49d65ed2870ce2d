"""Compressed archives (PROTOCOL.md §16): the compression ratio on a realistic journal, and the latency of
an archive tail on a 1 GiB log, plain vs compressed. Run once by hand, not in CI (it writes 1 GiB, deflates
it on one core for about half a minute, and deletes it all at the end):

    nice python bench/archive_tail.py [--gib 1] [--dir /tmp]

The journal is what the gateway writes (``uagw.agents.journal_line``): text, tool calls with JSON inputs,
tool results holding source code and command output, status lines.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ops_service  # noqa: E402
from ops_service import OpsService  # noqa: E402
from uagw.agents import journal_line  # noqa: E402

SAMPLE_BYTES = 64 << 20  # unique journal bytes; the 1 GiB log repeats them (members never span a repeat)
TAIL_RUNS = 30


def source_lines() -> List[str]:
    lines: List[str] = []
    for path in sorted(ROOT.glob("**/*.py"))[:200]:
        lines += path.read_text("utf-8", "replace").splitlines()
    return [line for line in lines if line.strip()]


def make_journal(size: int, seed: int = 1) -> bytes:
    rnd = random.Random(seed)
    code = source_lines()
    tools = ["Bash", "Read", "Edit", "Write", "Grep", "Glob", "WebFetch", "Task"]
    words = " ".join(code).split()
    parts: List[bytes] = []
    total = 0
    turn = 0
    while total < size:
        kind = rnd.random()
        if kind < 0.3:
            line = journal_line("text", {"text": " ".join(rnd.choice(words) for _ in range(rnd.randrange(5, 60)))})
        elif kind < 0.55:
            tool = rnd.choice(tools)
            line = journal_line("tool_call", {"id": "toolu_%016x" % rnd.getrandbits(64), "name": tool,
                                              "input": {"command": " ".join(rnd.choice(words) for _ in range(8)),
                                                        "path": "/work/src/%s.py" % rnd.choice(words)[:20]}})
        elif kind < 0.9:
            start = rnd.randrange(len(code) - 40)
            output = "\n".join(code[start:start + rnd.randrange(1, 40)])
            line = journal_line("tool_result", {"tool_use_id": "toolu_%016x" % rnd.getrandbits(64),
                                                "is_error": rnd.random() < 0.05, "content": output})
        else:
            turn += 1
            line = journal_line("status", {"status": "turn %d finished in %.2f s, %d tokens" % (
                turn, rnd.uniform(1, 90), rnd.randrange(200, 20000))})
        parts.append(line)
        total += len(line)
    return b"".join(parts)[:size].rsplit(b"\n", 1)[0] + b"\n"


def timed(function: Callable[[], object], runs: int) -> Dict[str, float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return {"median_ms": round(statistics.median(samples), 2), "p95_ms": round(samples[int(len(samples) * 0.95) - 1], 2),
            "max_ms": round(samples[-1], 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="size of the big archive in GiB (default 1)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write (deleted at the end)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ua-archive-bench-", dir=args.dir))
    results: Dict[str, object] = {}
    try:
        sample = make_journal(SAMPLE_BYTES)
        started = time.perf_counter()
        whole = gzip.compress(sample, ops_service.ARCHIVE_COMPRESS_LEVEL)
        results["journal_bytes"] = len(sample)
        results["gzip_whole_file_ratio"] = round(len(sample) / len(whole), 2)
        results["gzip_whole_file_s"] = round(time.perf_counter() - started, 2)

        svc = OpsService(work / "root")
        svc.ensure_root()
        svc.create_session("bench")
        stamp_dir = work / "root" / "bench" / "archive" / "20261130_000000_000000"
        stamp_dir.mkdir(parents=True)
        target = int(args.gib * (1 << 30))
        with open(stamp_dir / "run.log", "wb") as log:
            written = 0
            while written < target:
                piece = sample[: target - written]
                log.write(piece)
                written += len(piece)
        stamp = stamp_dir.name
        tail = lambda: svc.read_archive_log("bench", stamp, "run.log")  # noqa: E731
        middle = lambda: svc.read_archive_log("bench", stamp, "run.log", cursor=str(target // 2))  # noqa: E731
        tail()  # the page cache holds the end of the file from here on, as it would on a server
        results["log_bytes"] = target
        results["plain_tail"] = timed(tail, TAIL_RUNS)
        results["plain_follow_from_middle"] = timed(middle, TAIL_RUNS)
        plain_answer = tail()

        started = time.perf_counter()
        done = svc.compress_archives("bench")
        results["compress_s"] = round(time.perf_counter() - started, 1)
        packed = (stamp_dir / "run.log.gz").stat().st_size
        index = (stamp_dir / "run.log.gz.idx").stat().st_size
        results["archive_ratio"] = round(target / (packed + index), 2)
        results["compressed_bytes"] = packed
        results["index_bytes"] = index
        results["files_compressed"] = done["files"]
        results["compressed_tail"] = timed(tail, TAIL_RUNS)
        results["compressed_follow_from_middle"] = timed(middle, TAIL_RUNS)
        assert {**tail(), "compressed": False} == plain_answer, "the compressed tail differs from the plain one"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

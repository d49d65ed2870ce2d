"""kill -9 during compression (issue 12): at every point, every byte of every archived log is in the plain
file or in one complete compressed copy, and after recovery it reads whole through the archive endpoint."""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

from ops_service import OpsService

from conftest import ROOT, launch

ITERATIONS = 20
KILL_WINDOW = 0.12  # s after the compressor starts: a 2 MB log deflates in about this long
LOG_LINES = 14_000

COMPRESS_ONCE = """
import sys
sys.path.insert(0, sys.argv[1])
import ops_service
service = ops_service.OpsService(sys.argv[2])
print("ready", flush=True)
service.compress_archives(sys.argv[3])
"""


def log_bytes(seed: int) -> bytes:
    rnd = random.Random(seed)
    return b"".join(b'{"seq":%d,"seed":%d,"text":"%s"}\n' % (i, seed, b"x" * rnd.randrange(20, 200))
                    for i in range(LOG_LINES))


def one_complete_copy(stamp_dir: Path, expected: bytes) -> bool:
    plain = stamp_dir / "run.log"
    if plain.exists():
        return plain.read_bytes() == expected
    packed = stamp_dir / "run.log.gz"
    index = json.loads((stamp_dir / "run.log.gz.idx").read_bytes())
    return gzip.decompress(packed.read_bytes()) == expected and index["size"] == len(expected)


def test_kill_9_during_compression_never_loses_a_byte(svc, root):
    svc.create_session("s")
    archive = root / "s" / "archive"
    expected: Dict[str, bytes] = {}
    pending: List[str] = []  # stamps whose plain file is still there
    rnd = random.Random(12)
    for iteration in range(ITERATIONS):
        stamp = "20261130_000000_%06d" % iteration
        (archive / stamp).mkdir(parents=True)
        expected[stamp] = log_bytes(iteration)
        (archive / stamp / "run.log").write_bytes(expected[stamp])
        pending.append(stamp)
        child = subprocess.Popen([sys.executable, "-c", COMPRESS_ONCE, str(ROOT), str(root), "s"],
                                 stdout=subprocess.PIPE)
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        time.sleep(rnd.uniform(0, KILL_WINDOW))
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        child.stdout.close()
        for done in [name for name in pending if name in expected]:
            assert one_complete_copy(archive / done, expected[done]), f"{done} after kill {iteration}"
            if not (archive / done / "run.log").exists():
                pending.remove(done)  # compressed alone: nothing touches it again
    OpsService(root).compress_archives("s")  # what the gateway's compressor does at start
    for stamp in expected:
        assert sorted(os.listdir(archive / stamp)) == ["run.log.gz", "run.log.gz.idx"]
    gateway = launch(root)
    try:
        for stamp, data in expected.items():
            reply = gateway.get(f"/api/v1/ops/sessions/s/archives/{stamp}/run.log?limit=5000&max_bytes=1000000&cursor=0")
            assert reply.status == 200 and reply.json["compressed"] is True
            assert reply.json["lines"][:5000] == data.decode().splitlines()[:5000]
    finally:
        gateway.stop()

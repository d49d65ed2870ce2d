"""kill -9 during pruning (PROTOCOL.md §15, issue 12): whatever moment the process dies, every session is
there and complete or gone, every archive stamp is there and complete or gone, and no live log byte or
memory file is lost; the next start empties what a removal left in the trash."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict

from conftest import ROOT
from ops_service import OpsService

ITERATIONS = 20
SESSIONS = 8
STAMPS = 3  # archive stamps a session holds
FILES = 12  # files a stamp (and an idle session's work_products) holds: a removal takes a while
DAY = 86400.0
NOW = 1_800_000_000.0

PRUNER = """
import sys
sys.path.insert(0, {root!r})
from ops_service import OpsService
svc = OpsService({workspaces!r})
print("ready", flush=True)
while True:
    svc.prune(archives_older_than_days=1, sessions_idle_days=10, budget_bytes=1, now={now!r})
"""


def content(*parts: object) -> bytes:
    return ("/".join(map(str, parts)) + "\n").encode() * 50


def build(root: Path) -> Dict[str, bytes]:
    """Sessions: even ones idle (to be removed whole), odd ones active with old archives. Returns every file
    that must survive (live logs and memory of the active sessions) with its bytes."""
    keep = {}
    for n in range(SESSIONS):
        session = root / f"s{n}"
        (session / "memory").mkdir(parents=True)
        for name in ("run.log", "activity_journal.log", "MEMORY.md", "memory/m.md"):
            (session / name).write_bytes(content(n, name))
        for k in range(FILES):
            (session / "work_products").mkdir(exist_ok=True)
            (session / "work_products" / f"w{k}").write_bytes(content(n, "w", k))
        for s in range(STAMPS):
            stamp = session / "archive" / f"2024010{s}_000000_000000"
            stamp.mkdir(parents=True)
            for k in range(FILES):
                (stamp / f"f{k}").write_bytes(content(n, s, k))
            os.utime(stamp, (NOW - 5 * DAY, NOW - 5 * DAY))
        when = NOW - 30 * DAY if n % 2 == 0 else NOW
        for name in ("run.log", "activity_journal.log", ""):
            os.utime(session / name if name else session, (when, when))
        if n % 2:
            keep.update({f"s{n}/{name}": content(n, name) for name in ("run.log", "activity_journal.log",
                                                                        "MEMORY.md", "memory/m.md")})
    return keep


def check_complete(root: Path, keep: Dict[str, bytes]) -> None:
    for path, data in keep.items():
        assert (root / path).read_bytes() == data, f"{path} lost bytes"
    for n in range(0, SESSIONS, 2):
        session = root / f"s{n}"
        if session.exists():  # an idle session: complete or gone
            assert len(list((session / "work_products").iterdir())) == FILES, f"s{n} half-removed"
            assert (session / "run.log").read_bytes() == content(n, "run.log")
    for stamp in root.glob("s*/archive/*"):
        n, s = int(stamp.parts[-3][1:]), int(stamp.name[7])
        assert sorted(p.name for p in stamp.iterdir()) == sorted(f"f{k}" for k in range(FILES)), f"{stamp} half-removed"
        assert all((stamp / f"f{k}").read_bytes() == content(n, s, k) for k in range(FILES))


def test_kill_9_while_pruning_leaves_every_item_whole_or_gone(tmp_path):
    rng = random.Random(7)
    killed_midway = 0
    for iteration in range(ITERATIONS):
        root = tmp_path / f"ws{iteration}"
        keep = build(root)
        OpsService(root).ensure_root()
        child = subprocess.Popen([sys.executable, "-c", PRUNER.format(root=str(ROOT), workspaces=str(root), now=NOW)],
                                 stdout=subprocess.PIPE)
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0, 0.045))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
        trash = root / "_gateway" / "trash"
        killed_midway += any(trash.iterdir()) if trash.exists() else 0
        check_complete(root, keep)
        OpsService(root).ensure_root()  # a restart empties the trash
        assert not trash.exists() or list(trash.iterdir()) == []
        check_complete(root, keep)
        result = OpsService(root).prune(archives_older_than_days=1, sessions_idle_days=10, now=NOW)
        assert result["failed"] == []
        assert sorted(p.name for p in root.iterdir()) == sorted(["_gateway"] + [f"s{n}" for n in range(1, SESSIONS, 2)])
        assert list(root.glob("s*/archive/*")) == []
        check_complete(root, keep)
    assert killed_midway >= 3, "some kills landed while a removal was under way"

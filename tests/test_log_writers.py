"""The writer threads and what health says about them (PROTOCOL.md §2, §7).

``OpsService.append_gateway_log`` is the only code that writes the gateway's logs; ``BatchWriter`` is the
thread both writers share; health counts what they lost: gateway log records, session writes that failed,
and hard-linked live logs moved aside. In-process: an embedded agent writes run.log through a real turn.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
from websockets.asyncio.client import connect

from ops_service import GATEWAY_DIR_NAME, GATEWAY_LOG_NAME, SECURITY_LOG_NAME, InvalidArgument, OpsService
from conftest import serve_embedded
from ua_gateway import AgentTurn, Gateway
from uagw.logs import BatchWriter

WAIT = 5.0  # s: the session writer writes within 10 ms, the gateway log every 100 ms


# -- OpsService.append_gateway_log ---------------------------------------------------------------------------


@pytest.fixture
def ops(tmp_path: Path) -> OpsService:
    service = OpsService(tmp_path / "root")
    service.ensure_root()
    return service


def test_append_gateway_log_appends_and_says_it_did(ops):
    assert ops.append_gateway_log(GATEWAY_LOG_NAME, b"one\n", 1 << 20, 3) == {"written": True, "rotated": False}
    assert ops.append_gateway_log(GATEWAY_LOG_NAME, b"two\n", 1 << 20, 3) == {"written": True, "rotated": False}
    assert (ops.root / GATEWAY_DIR_NAME / GATEWAY_LOG_NAME).read_bytes() == b"one\ntwo\n"


def test_append_gateway_log_rotates_past_the_size_and_keeps_the_backups(ops):
    for index in range(5):
        outcome = ops.append_gateway_log(SECURITY_LOG_NAME, b"%d\n" % index, 1, 2)
        assert outcome == {"written": True, "rotated": True}
    log_dir = ops.root / GATEWAY_DIR_NAME
    assert sorted(p.name for p in log_dir.glob(SECURITY_LOG_NAME + "*")) == ["security.log.1", "security.log.2"]
    assert (log_dir / "security.log.1").read_bytes() == b"4\n" and (log_dir / "security.log.2").read_bytes() == b"3\n"


def test_append_gateway_log_never_writes_through_a_symlinked_gateway_dir(ops, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (ops.root / GATEWAY_DIR_NAME).rename(ops.root / "moved")
    (ops.root / GATEWAY_DIR_NAME).symlink_to(outside)
    outcome = ops.append_gateway_log(GATEWAY_LOG_NAME, b"x\n", 1, 3)
    assert outcome["written"] is False and outcome["unsafe"] is True
    assert os.listdir(outside) == []


def test_append_gateway_log_leaves_a_hard_linked_log_alone(ops, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"theirs\n")
    os.link(outside, ops.root / GATEWAY_DIR_NAME / GATEWAY_LOG_NAME)
    outcome = ops.append_gateway_log(GATEWAY_LOG_NAME, b"ours\n", 1, 3)
    assert outcome["written"] is False and outcome["unsafe"] is True and "one link" in outcome["error"]
    assert outside.read_bytes() == b"theirs\n" and os.stat(outside).st_nlink == 2  # neither written nor rotated


def test_append_gateway_log_never_creates_a_missing_root(tmp_path):
    ops = OpsService(tmp_path / "root")
    outcome = ops.append_gateway_log(GATEWAY_LOG_NAME, b"x\n", 1 << 20, 3)
    assert outcome["written"] is False and outcome["unsafe"] is False and "workspaces root" in outcome["error"]
    assert not (tmp_path / "root").exists()


def test_append_gateway_log_writes_only_the_gateway_logs(ops):
    with pytest.raises(InvalidArgument):
        ops.append_gateway_log("../run.log", b"x\n", 1 << 20, 3)


# -- BatchWriter -----------------------------------------------------------------------------------------------


class Recorder(BatchWriter[str]):
    """Writes nothing: records each pass, and keeps back the items named in ``hold`` until the final pass."""

    def __init__(self, hold: "set[str]") -> None:
        self.hold = hold
        self.passes: List[List[str]] = []
        self.finals: List[bool] = []
        super().__init__("test-batch-writer")

    def _wait_time(self, keeping: bool) -> Optional[float]:
        return 0.01 if keeping else None

    def _write(self, items: List[str], final: bool) -> List[str]:
        self.passes.append(list(items))
        self.finals.append(final)
        return [] if final else [item for item in items if item in self.hold]


def test_batch_writer_keeps_items_ahead_of_newer_ones_and_writes_all_at_close():
    writer = Recorder(hold={"a1"})
    writer._hand_over(["a1", "b1"])
    deadline = time.monotonic() + WAIT
    while len(writer.passes) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    writer._hand_over(["a2"])
    writer.close(timeout=WAIT)
    assert writer.passes[0] == ["a1", "b1"]
    assert all(items[0] == "a1" for items in writer.passes[1:])  # kept items come first, every pass
    assert writer.passes[-1] == ["a1", "a2"] and writer.finals[-1] is True and writer.finals.count(True) == 1
    assert not writer._thread.is_alive()


def test_batch_writer_counts_what_it_is_told_was_dropped():
    writer = Recorder(hold=set())
    threads = [threading.Thread(target=writer._count_dropped, args=(1,)) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.close(timeout=WAIT)
    assert writer.dropped == 20


# -- health counts what the writers lost -----------------------------------------------------------------------


async def logging_agent(turn: AgentTurn) -> None:
    turn.log(f"ran {turn.user_input}")
    turn.emit("text", {"text": "done"})


async def run_turn(gateway: Gateway, session_id: str) -> None:
    async with connect(f"ws://127.0.0.1:{gateway.port}/ws/agent?session_id={session_id}") as ws:
        await ws.send(json.dumps({"type": "execute", "data": {"user_input": "go"}}))
        while json.loads(await asyncio.wait_for(ws.recv(), WAIT))["type"] != "query_complete":
            pass


def get_health(gateway: Gateway) -> Dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{gateway.port}/api/v1/health", timeout=WAIT) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as error:  # 503 while degraded: the same counters
        return json.loads(error.read())


async def health_once(gateway: Gateway, condition) -> Dict[str, Any]:
    """Health, polled until ``condition(health)`` holds or WAIT passes."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + WAIT
    while True:
        health = await loop.run_in_executor(None, get_health, gateway)
        if condition(health) or time.monotonic() > deadline:
            return health
        await asyncio.sleep(0.02)


def serve_and(workspaces: Path, scenario) -> Any:
    return serve_embedded(workspaces, logging_agent, scenario)


def gateway_records(workspaces: Path, event: str) -> List[Dict[str, Any]]:
    lines = (workspaces / GATEWAY_DIR_NAME / GATEWAY_LOG_NAME).read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["event"] == event]


def test_health_counts_nothing_lost_on_a_fresh_gateway(tmp_path):
    (tmp_path / "ws" / "s1").mkdir(parents=True)

    async def scenario(gateway: Gateway) -> Dict[str, Any]:
        await run_turn(gateway, "s1")
        return await health_once(gateway, lambda health: True)

    health = serve_and(tmp_path / "ws", scenario)
    assert health["status"] == "ok"
    assert health["dropped"] == {"gateway_log": 0, "session_writes": 0}
    assert health["log_dropped"] == 0 and health["logs_relinked"] == 0


def test_health_counts_session_writes_lost_to_a_failing_disk(tmp_path):
    workspaces = tmp_path / "ws"
    (workspaces / "s1" / "run.log").mkdir(parents=True)  # every append to run.log now fails with EISDIR

    async def scenario(gateway: Gateway) -> Dict[str, Any]:
        before = await health_once(gateway, lambda health: True)
        await run_turn(gateway, "s1")
        after = await health_once(gateway, lambda health: health["dropped"]["session_writes"] > 0)
        return {"before": before, "after": after}

    health = serve_and(workspaces, scenario)
    assert health["before"]["dropped"]["session_writes"] == 0
    assert health["after"]["dropped"]["session_writes"] > 0
    assert health["after"]["dropped"]["gateway_log"] == 0 == health["after"]["log_dropped"]
    assert [r["file"] for r in gateway_records(workspaces, "write_failed")] == ["run.log"]
    assert (workspaces / "s1" / "activity_journal.log").is_file()  # the other files of the turn were written


def test_health_counts_a_hard_linked_log_moved_aside_and_the_gateway_log_says_where(tmp_path):
    workspaces = tmp_path / "ws"
    (workspaces / "s1").mkdir(parents=True)
    outside = tmp_path / "outside.txt"
    outside.write_text("outside\n")
    os.link(outside, workspaces / "s1" / "run.log")

    async def scenario(gateway: Gateway) -> Dict[str, Any]:
        await run_turn(gateway, "s1")
        return await health_once(gateway, lambda health: health["logs_relinked"] > 0)

    health = serve_and(workspaces, scenario)
    assert health["logs_relinked"] == 1 and health["dropped"]["session_writes"] == 0
    assert outside.read_text() == "outside\n"
    assert (workspaces / "s1" / "run.log").read_text() == "ran go\n"
    (record,) = gateway_records(workspaces, "log_relinked")
    assert record["session_id"] == "s1" and record["file"] == "run.log"
    assert (workspaces / "s1" / record["moved_to"]).samefile(outside)

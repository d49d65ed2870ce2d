"""The session index (uagw/index.py; PROTOCOL.md §17): lists answered from memory show what the gateway
changes at once, what other writers change within the stated bound, say ``partial`` until the first scan is
done, and equal ``OpsService.list_sessions`` for the same files."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect

from conftest import RunningGateway, execute, launch, recv_until, run, wait_for
from ops_service import STATUSES, InvalidArgument, OpsService
from uagw.changes import Changes
from uagw.config import Config, ConfigError
from uagw.index import SessionIndex

OUTSIDE_BOUND = 2.0  # s: README, "Listing many sessions"; PROTOCOL.md §17
OLD = 1_600_000_000  # 2020-09-13: a session last active long ago, so a change moves it to the top


def listing(gateway: RunningGateway, **query: Any) -> Dict[str, Any]:
    path = "/api/v1/ops/sessions?" + "&".join(f"{key}={value}" for key, value in {"limit": 1000, **query}.items())
    reply = gateway.get(path)
    assert reply.status == 200, reply
    return reply.json


def listed(gateway: RunningGateway, session_id: str) -> Optional[Dict[str, Any]]:
    answer = listing(gateway)
    assert answer["partial"] is False
    return next((s for s in answer["sessions"] if s["session_id"] == session_id), None)


def make_old_session(gateway: RunningGateway, session_id: str, files: Dict[str, bytes]) -> Path:
    directory = gateway.make_session(session_id, files)
    for name in files:
        os.utime(directory / name, (OLD, OLD))
    os.utime(directory, (OLD, OLD))
    return directory


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    running = launch(tmp_path_factory.mktemp("index") / "workspaces")
    wait_for(lambda: listing(running)["partial"] is False)
    yield running
    running.stop()


# -- what the gateway changes shows in the next list ---------------------------------------------------


def test_a_created_session_is_listed_at_once_with_its_owner(gateway):
    assert gateway.post("/api/v1/sessions", body={"session_id": "idx-created", "user_id": "ann"}).status == 200
    summary = listed(gateway, "idx-created")
    assert summary is not None and summary["owner"] == "ann"


def test_a_new_description_is_listed_at_once(gateway):
    make_old_session(gateway, "idx-described", {"run.log": b"x\n"})
    assert wait_for(lambda: listed(gateway, "idx-described"))
    assert gateway.request("PATCH", "/api/v1/ops/sessions/idx-described", body={"description": "a new title"}).status == 200
    assert listed(gateway, "idx-described")["description"] == "a new title"


def test_a_reset_session_is_listed_archived_at_once(gateway):
    make_old_session(gateway, "idx-reset", {"run.log": b"x\n", "activity_journal.log": b"{}\n"})
    assert wait_for(lambda: listed(gateway, "idx-reset"))
    assert gateway.post("/api/v1/ops/sessions/idx-reset/reset", body={"clear_logs": True}).status == 200
    summary = listed(gateway, "idx-reset")
    assert (summary["status"], summary["has_run_log"]) == ("archived", False)


def test_a_compacted_session_is_listed_with_its_new_activity_at_once(gateway):
    make_old_session(gateway, "idx-compacted", {"run.log": b"line\n" * 500})
    assert wait_for(lambda: listed(gateway, "idx-compacted"))
    old_activity = listed(gateway, "idx-compacted")["last_activity"]
    assert gateway.post("/api/v1/ops/sessions/idx-compacted/compact", body={"max_lines": 10}).status == 200
    assert listed(gateway, "idx-compacted")["last_activity"] != old_activity


def test_a_deleted_session_leaves_the_list_at_once(gateway):
    gateway.make_session("idx-deleted", {"run.log": b"x\n"})
    assert wait_for(lambda: listed(gateway, "idx-deleted"))
    assert gateway.delete("/api/v1/ops/sessions/idx-deleted?confirm=true").status == 200
    assert listed(gateway, "idx-deleted") is None


def test_a_turn_shows_in_the_list_with_its_run_log_and_heartbeat(gateway):
    assert gateway.post("/api/v1/sessions", body={"session_id": "idx-turn"}).status == 200

    async def turn() -> None:
        async with connect(f"{gateway.ws_url}/api/v1/sessions/idx-turn/stream") as ws:
            await ws.send(execute("hello"))
            await recv_until(ws, "query_complete")

    run(turn())
    # The turn's last writes (journal, heartbeat) reach the disk through the writer thread just after it ends.
    assert wait_for(lambda: (listed(gateway, "idx-turn") or {}).get("heartbeat_last"), timeout=OUTSIDE_BOUND)
    assert listed(gateway, "idx-turn")["has_run_log"] is True


# -- what other writers change shows within the bound ---------------------------------------------------


def test_a_session_written_by_another_process_is_listed_within_the_bound(gateway):
    gateway.make_session("idx-outside", {"description.txt": b"made elsewhere"})
    summary = wait_for(lambda: listed(gateway, "idx-outside"), timeout=OUTSIDE_BOUND)
    assert summary and summary["description"] == "made elsewhere"


def test_a_session_removed_with_rmtree_leaves_the_list_within_the_bound(gateway):
    directory = gateway.make_session("idx-rmtree", {"run.log": b"x\n"})
    assert wait_for(lambda: listed(gateway, "idx-rmtree"), timeout=OUTSIDE_BOUND)
    shutil.rmtree(directory)
    assert wait_for(lambda: listed(gateway, "idx-rmtree") is None, timeout=OUTSIDE_BOUND)


def test_a_run_log_appended_by_another_process_moves_the_session_first_within_the_bound(gateway):
    directory = make_old_session(gateway, "idx-appended", {"run.log": b"x\n"})
    assert wait_for(lambda: listed(gateway, "idx-appended"), timeout=OUTSIDE_BOUND)
    with open(directory / "run.log", "ab") as log:
        log.write(b"more\n")
    assert wait_for(lambda: listing(gateway, limit=1)["sessions"][0]["session_id"] == "idx-appended",
                    timeout=OUTSIDE_BOUND)


def test_without_inotify_the_rescan_finds_outside_changes_within_the_bound(svc, root):
    svc.create_session("kept")
    (root / "gone").mkdir()
    with running_index(svc, use_inotify=False, rescan_interval=0.2) as index:
        (root / "new").mkdir()
        (root / "kept" / "run.log").write_bytes(b"x\n")
        shutil.rmtree(root / "gone")
        assert wait_for(lambda: strip(index.list_sessions()) == svc.list_sessions(), timeout=OUTSIDE_BOUND)
        assert not index.notifying


# -- startup ----------------------------------------------------------------------------------------------


def test_startup_answers_health_at_once_and_lists_say_partial_until_the_scan_is_done(tmp_path):
    workspaces = tmp_path / "workspaces"
    workspaces.mkdir()
    for number in range(300):
        os.mkdir(workspaces / f"s{number:04d}")
    gateway = launch(workspaces, env={"UA_INDEX_SCAN_PAUSE": "1"})  # 100 sessions, then 1 s: 2 s in all
    try:
        assert gateway.get("/api/v1/health").status == 200  # answered while the scan is still under way:
        first = listing(gateway)
        assert (first["partial"], first["found"]) == (True, 300) and first["scanned"] < 300
        assert len(first["sessions"]) == first["total"] < 300  # what the scan has read so far, in order
        done = wait_for(lambda: (lambda answer: answer if not answer["partial"] else None)(listing(gateway)), timeout=10)
        assert done["total"] == 300 and "scanned" not in done
    finally:
        gateway.stop()


def test_a_list_by_disk_use_is_scanned_and_complete(gateway):
    gateway.make_session("idx-big", {"run.log": b"x" * 300_000})
    answer = listing(gateway, sort="disk_bytes")  # measured on the call: no index keeps disk use
    assert answer["partial"] is False and answer["sessions"][0]["session_id"] == "idx-big"
    assert answer["sessions"][0]["disk_bytes"]["total"] >= 300_000


def test_with_the_index_off_lists_scan_the_root_and_say_they_are_complete(start_gateway, tmp_path):
    gateway = start_gateway("--no-session-index")
    gateway.make_session("idx-off", {"run.log": b"x\n"})
    answer = listing(gateway)  # no wait: the direct scan sees it at once
    assert answer["partial"] is False and [s["session_id"] for s in answer["sessions"]] == ["idx-off"]


@pytest.mark.parametrize("variable, value, words", [
    ("UA_SESSION_INDEX", "maybe", "UA_SESSION_INDEX must be 1 or 0"),
    ("UA_INDEX_RESCAN_INTERVAL", "0", "UA_INDEX_RESCAN_INTERVAL"),
    ("UA_INDEX_SCAN_PAUSE", "-1", "UA_INDEX_SCAN_PAUSE"),
])
def test_an_unusable_index_setting_is_refused_naming_the_variable(variable, value, words):
    with pytest.raises(ConfigError, match=words):
        Config.from_env({variable: value})


def test_the_index_is_on_unless_switched_off():
    assert Config.from_env({}).session_index is True
    assert Config.from_env({"UA_SESSION_INDEX": "off"}).session_index is False


# -- the same answers as OpsService.list_sessions ----------------------------------------------------------


class running_index:
    """A SessionIndex on ``svc`` with its threads running, its first scan done; closed on exit."""

    def __init__(self, svc: OpsService, **options: Any) -> None:
        self.index = SessionIndex(svc, **options)
        self.loop = asyncio.new_event_loop()
        self.executor = concurrent.futures.ThreadPoolExecutor(2)

    def __enter__(self) -> SessionIndex:
        self.index.start(self.loop, self.executor, Changes())
        assert self.index.complete.wait(10)
        return self.index

    def __exit__(self, *exc: Any) -> None:
        self.index.close()
        self.executor.shutdown()
        self.loop.close()


def strip(answer: Dict[str, Any]) -> Dict[str, Any]:
    assert answer.pop("partial") is False
    return answer


def varied_root(root: Path) -> None:
    """Sessions of every kind a summary tells apart, with ties in activity (ordered by id)."""
    def session(name: str, files: Dict[str, Any], when: int) -> None:
        directory = root / name
        directory.mkdir()
        for file_name, content in files.items():
            path = directory / file_name
            path.parent.mkdir(parents=True, exist_ok=True)
            if content is not None:
                path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
                os.utime(path, (when, when))
        os.utime(directory, (when, when))

    policy = {"user_id": "Ann", "memory": {"enabled": True, "scope": "all"}}
    for number in range(8):
        when = OLD + (number // 2) * 60  # two sessions per minute: ties broken by id
        session(f"session_{number}", {"run.log": b"x\n", "session_policy.json": policy}, when)
        session(f"tg_{number}", {"activity_journal.log": b"{}\n", "description.txt": b"tg chat %d" % number}, when)
        session(f"daemon_{number}", {"heartbeat_state.json": {"last_run": when, "last_summary": "ok"}}, when + 7)
        session(f"api_{number}", {"archive/20200101_000000_000000/run.log": b"old\n",
                                  "run_checkpoint.json": {"original_request": "do it", "timestamp": "2020-01-01T00:00:00Z",
                                                          "completed_tasks": [1, 2]}}, when + 3)
        session(f"local-{number}", {"session_policy.json": {"user_id": "bob", "memory": {"enabled": False}},
                                    "context_brief.md": b"# Brief %d\n" % number, "MEMORY.md": b"m"}, when + 3)


@pytest.fixture(scope="module")
def varied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("varied") / "root"
    root.mkdir()
    varied_root(root)
    svc = OpsService(root)
    svc.ensure_root()
    with running_index(svc) as index:
        yield svc, index


def without_ages(answer: Dict[str, Any]) -> Dict[str, Any]:
    # checkpoint_age_seconds is "now" less a stamp: it moves between two calls, so it is compared apart.
    for summary in answer.get("sessions", ()):
        age = summary.pop("checkpoint_age_seconds")
        summary["checkpoint_age_whole_hours"] = None if age is None else round(age / 3600)
    return answer


SESSION_IDS = [f"{kind}{number}" for kind in ("session_", "tg_", "daemon_", "api_", "local-") for number in range(8)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    status=st.sampled_from(STATUSES + (None, "bogus")),
    limit=st.one_of(st.none(), st.integers(-2, 50), st.just(5000), st.just("ten")),
    offset=st.one_of(st.none(), st.integers(0, 45), st.just(-1)),
    source=st.sampled_from((None, "", "chat", "TELEGRAM", " daemon ", "api", "local", "nope")),
    owner=st.sampled_from((None, "", "ann", "BOB", "telegram_3", "unknown")),
    memory_mode=st.sampled_from((None, "", "all", "off", "direct_only", "memory_only")),
    sort=st.sampled_from((None, "newest", "last_activity", 5)),
    runtime=st.dictionaries(st.sampled_from(SESSION_IDS),
                            st.tuples(st.integers(0, 2), st.booleans(), st.integers(0, 9)), max_size=6),
)
def test_index_answers_equal_the_direct_listing(varied, status, limit, offset, source, owner, memory_mode, sort,
                                               runtime):
    svc, index = varied
    query = dict(status=status, limit=limit, offset=offset, runtime=runtime, source=source, owner=owner,
                 memory_mode=memory_mode, sort=sort)
    try:
        expected = svc.list_sessions(**query)
    except InvalidArgument as exc:
        with pytest.raises(InvalidArgument) as refused:
            index.list_sessions(**query)
        assert refused.value.detail == exc.detail
        return
    assert without_ages(strip(index.list_sessions(**query))) == without_ages(expected)

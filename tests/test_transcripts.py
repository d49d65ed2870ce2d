"""Turn transcripts on disk and through the Ops API (issue 13 item 4; PROTOCOL.md §12).

``<session>/turns/<turn_id>.jsonl`` holds every event of a turn with its seq, the user's query first and
query_complete last. OpsService lists a session's turns (outcome, events) and reads one transcript as a
log slice; the gateway answers ``GET /api/v1/ops/sessions/{id}/turns[/{turn_id}]``. Files left by a crash
still read; ids and links cannot lead outside the session.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any, Dict, List

import pytest
from websockets.asyncio.client import connect

from conftest import execute, recv, recv_until, run, wait_for, write_agent
from ops_service import InvalidArgument, OpsService, SessionNotFound, WorkspacesUnavailable

TURN = "turn_0123456789abcd"


def record(seq: int, kind: str, data: Dict[str, Any], stamp: str = "2026-11-30T10:00:00+00:00") -> bytes:
    return (f'{{"seq":{seq},"type":"{kind}","timestamp":"{stamp}","data":' + json.dumps(data) + "}\n").encode()


def write_turn(svc: OpsService, session_id: str, turn_id: str, *records: bytes) -> Path:
    svc.create_session(session_id)
    svc.append_turn_record(session_id, turn_id, b"".join(records))
    return svc.root / session_id / "turns" / f"{turn_id}.jsonl"


def a_turn(first: int, outcome_records: List[bytes]) -> List[bytes]:
    return [record(first, "query", {"user_input": "hi"}), record(first + 1, "text", {"text": "hello"})] + outcome_records


@pytest.mark.parametrize("ending, outcome", [
    ([record(3, "query_complete", {"completed": True})], "completed"),
    ([record(3, "error", {"message": "boom"}), record(4, "query_complete", {"completed": False})], "failed"),
    ([record(3, "cancelled", {"reason": "x"}), record(4, "query_complete", {"completed": False})], "cancelled"),
    ([], "interrupted"),
])
def test_a_turns_outcome_comes_from_how_its_transcript_ends(svc: OpsService, ending: List[bytes], outcome: str) -> None:
    write_turn(svc, "s1", TURN, *a_turn(1, ending))
    [turn] = svc.list_turns("s1")["turns"]
    assert turn["outcome"] == outcome
    assert turn["events"] == 2 + len(ending)
    assert turn["started"] == "2026-11-30T10:00:00+00:00"


def test_the_running_turn_is_listed_as_running_not_interrupted(svc: OpsService) -> None:
    write_turn(svc, "s1", TURN, *a_turn(1, []))
    assert svc.list_turns("s1", running_turn_id=TURN)["turns"][0]["outcome"] == "running"


def test_a_transcript_half_written_by_a_crash_reads_without_its_partial_line(svc: OpsService) -> None:
    path = write_turn(svc, "s1", TURN, *a_turn(7, []))
    with open(path, "ab") as file:
        file.write(record(9, "text", {"text": "cut short"})[:30])
    [turn] = svc.list_turns("s1")["turns"]
    assert (turn["outcome"], turn["events"], turn["last_seq"]) == ("interrupted", 2, 8)
    assert [r["seq"] for r in svc.read_turn("s1", TURN)["records"]] == [7, 8]
    assert svc.last_turn_seq("s1") == 8


def test_the_last_seq_is_the_highest_of_the_newest_turn_files(svc: OpsService) -> None:
    write_turn(svc, "s1", "turn_a", *a_turn(1, [record(3, "query_complete", {"completed": True})]))
    write_turn(svc, "s1", "turn_b", *a_turn(4, [record(6, "query_complete", {"completed": True})]))
    os.utime(svc.root / "s1" / "turns" / "turn_b.jsonl", ns=(1, 1))  # an mtime that lies: the seqs still decide
    assert svc.last_turn_seq("s1") == 6
    assert svc.last_turn_seq(svc.create_session()["session_id"]) == 0


def test_a_transcript_is_paged_like_a_log_slice_from_its_start(svc: OpsService) -> None:
    write_turn(svc, "s1", TURN, *a_turn(1, [record(3, "query_complete", {"completed": True})]))
    first = svc.read_turn("s1", TURN, limit=2)
    assert [r["seq"] for r in first["records"]] == [1, 2] and first["more"] is True
    rest = svc.read_turn("s1", TURN, cursor=first["cursor"])
    assert [r["seq"] for r in rest["records"]] == [3] and rest["more"] is False


def test_records_after_a_seq_are_read_newest_first_within_the_budget(svc: OpsService) -> None:
    write_turn(svc, "s1", "turn_a", *a_turn(1, [record(3, "query_complete", {"completed": True})]))
    write_turn(svc, "s1", "turn_b", *a_turn(4, [record(6, "query_complete", {"completed": True})]))
    whole = svc.read_turn_records("s1", 2, 6, 100, 1 << 20)
    assert [seq for seq, _kind, _line in whole["records"]] == [3, 4, 5, 6]
    assert whole["complete"] and whole["first_seq"] == 3
    cut = svc.read_turn_records("s1", 0, 6, 2, 1 << 20)
    assert [seq for seq, _kind, _line in cut["records"]] == [5, 6] and not cut["complete"]


@pytest.mark.parametrize("turn_id", ["..", ".", "a/b", "../s2/turns/x", "", "x" * 129, "a\x00b", "-x"])
def test_a_turn_id_that_is_not_one_name_is_refused(svc: OpsService, turn_id: str) -> None:
    svc.create_session("s1")
    with pytest.raises(InvalidArgument, match="invalid turn id"):
        svc.read_turn("s1", turn_id)
    with pytest.raises(InvalidArgument, match="invalid turn id"):
        svc.append_turn_record("s1", turn_id, b"{}\n")


def test_a_symlinked_turns_directory_is_never_written_through_nor_listed(svc: OpsService, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / f"{TURN}.jsonl").write_bytes(record(1, "query", {}))
    svc.create_session("s1")
    (svc.root / "s1" / "turns").symlink_to(outside)
    with pytest.raises(WorkspacesUnavailable):
        svc.append_turn_record("s1", TURN, record(2, "text", {}))
    assert (outside / f"{TURN}.jsonl").read_bytes() == record(1, "query", {})
    assert svc.list_turns("s1")["turns"] == []
    with pytest.raises(SessionNotFound):
        svc.read_turn("s1", TURN)


def test_a_symlinked_turn_file_is_not_read(svc: OpsService, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(record(1, "query", {"user_input": "secret"}))
    svc.create_session("s1")
    (svc.root / "s1" / "turns").mkdir()
    (svc.root / "s1" / "turns" / f"{TURN}.jsonl").symlink_to(secret)
    assert svc.list_turns("s1")["turns"] == []
    with pytest.raises(SessionNotFound):
        svc.read_turn("s1", TURN)


# -- through a real gateway --------------------------------------------------------------------------------


async def one_echo_turn(gateway: Any, text: str) -> List[Dict[str, Any]]:
    async with connect(f"ws://127.0.0.1:{gateway.port}/ws/agent") as ws:
        await ws.send(execute(text, client_turn_id="mine-1"))
        return [await recv(ws)] + await recv_until(ws, "query_complete")


def test_the_turns_list_and_a_transcript_through_the_api(gateway: Any) -> None:
    frames = run(one_echo_turn(gateway, "hello transcript"))
    session_id = frames[0]["data"]["session_id"]
    turn_id = frames[-1]["data"]["turn_id"]
    listed = gateway.get(f"/api/v1/ops/sessions/{session_id}/turns")
    assert listed.status == 200
    [turn] = listed.json["turns"]
    assert (turn["turn_id"], turn["outcome"], turn["events"]) == (turn_id, "completed", 4)
    assert turn["started"] and turn["ended"]
    transcript = gateway.get(f"/api/v1/ops/sessions/{session_id}/turns/{turn_id}")
    assert transcript.status == 200
    records = transcript.json["records"]
    assert [r["type"] for r in records] == ["query", "status", "text", "query_complete"]
    assert records[0]["data"]["user_input"] == "hello transcript"
    assert records[0]["data"]["client_turn_id"] == "mine-1"
    assert records[1:] == frames[1:]  # what the client got, byte for byte


@pytest.mark.parametrize("turn_id", ["%2E%2E", "a%20b", "a%2Fb", "..."])
def test_a_bad_turn_id_in_the_path_is_a_400_that_says_what_a_turn_id_is(gateway: Any, turn_id: str) -> None:
    gateway.make_session("s_badturn")
    reply = gateway.get(f"/api/v1/ops/sessions/s_badturn/turns/{turn_id}")
    assert reply.status == 400
    assert "invalid turn id" in reply.json["detail"]


def test_an_unknown_turn_is_a_404_that_says_where_to_list_them(gateway: Any) -> None:
    gateway.make_session("s_noturn")
    reply = gateway.get(f"/api/v1/ops/sessions/s_noturn/turns/{TURN}")
    assert reply.status == 404
    assert "has no transcript" in reply.json["detail"]
    assert "/api/v1/ops/sessions/s_noturn/turns" in reply.json["detail"]


HANGING_AGENT = """
    import json, sys, time
    open(sys.argv[1], "w").write(str(__import__("os").getpid()))
    sys.stdin.readline()
    print(json.dumps({"type": "text", "data": {"text": "working"}}), flush=True)
    time.sleep(60)
"""


def test_a_turn_running_when_the_gateway_crashed_is_interrupted_after_the_restart(start_gateway: Any,
                                                                                  tmp_path: Path) -> None:
    pid_file = tmp_path / "agent.pid"
    agent = write_agent(tmp_path, "hang", HANGING_AGENT) + f" {pid_file}"
    workspaces = tmp_path / "ws"
    first = start_gateway("--agent-cmd", agent, workspaces=workspaces)

    async def start_turn() -> str:
        async with connect(f"ws://127.0.0.1:{first.port}/ws/agent") as ws:
            await ws.send(execute("long job"))
            session_id = (await recv(ws))["data"]["session_id"]
            await recv_until(ws, "text")
            return session_id

    session_id = run(start_turn())
    try:
        assert wait_for(lambda: first.get(f"/api/v1/ops/sessions/{session_id}/turns").json["turns"][0]["events"] == 2)
        first.process.kill()  # a crash: no shutdown, no query_complete
        first.process.wait(10)
    finally:
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGKILL)  # the agent we started, orphaned by the crash
    second = start_gateway("--agent-cmd", agent, workspaces=workspaces)
    [turn] = second.get(f"/api/v1/ops/sessions/{session_id}/turns").json["turns"]
    assert (turn["outcome"], turn["events"], turn["ended"]) == ("interrupted", 2, None)


def test_records_are_found_in_a_newer_turn_whose_file_has_an_older_mtime(svc: OpsService) -> None:
    write_turn(svc, "s1", "turn_a", *a_turn(1, [record(3, "query_complete", {"completed": True})]))
    write_turn(svc, "s1", "turn_b", *a_turn(4, [record(6, "query_complete", {"completed": True})]))
    later = (svc.root / "s1" / "turns" / "turn_a.jsonl").stat().st_mtime_ns
    os.utime(svc.root / "s1" / "turns" / "turn_b.jsonl", ns=(later - 1000, later - 1000))  # stamped in the same tick
    found = svc.read_turn_records("s1", 2, 6, 100, 1 << 20)
    assert [seq for seq, _kind, _line in found["records"]] == [3, 4, 5, 6]

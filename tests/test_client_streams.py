"""Streams from the client's side (PROTOCOL.md §13): ``logs tail --follow`` and ``audit --follow`` read
SSE and resume after a drop with no gap and no duplicate, ``sessions watch`` prints session events,
Ctrl-C ends them cleanly; and the audit trail streams across its rotation."""

from __future__ import annotations

import io
import json
import os
import select
import signal
import subprocess
import sys
import threading
from typing import Any, Iterator, List, Optional

import pytest

import ua_client
from conftest import ROOT, RunningGateway, wait_for
from sse import SseClient, lines_of

CLIENT = [sys.executable, str(ROOT / "ua_client.py")]


def append(path: Any, *lines: str) -> None:
    with open(path, "a") as handle:
        handle.write("".join(line + "\n" for line in lines))


class Printed(io.StringIO):
    """stdout for a client command run on a thread: its lines so far."""

    def lines(self) -> List[str]:
        return self.getvalue().splitlines()


def run_on_thread(argv: List[str], out: Printed) -> threading.Thread:
    args = ua_client.build_parser().parse_args(argv)
    client = ua_client.GatewayClient(args.url)
    thread = threading.Thread(target=args.run, args=(client, args, out), daemon=True)
    thread.start()
    return thread


def test_logs_tail_follow_streams_one_request_for_many_lines(gateway: RunningGateway) -> None:
    log = gateway.make_session("cli_stream", {"run.log": b"one\n"}) / "run.log"
    out = Printed()
    run_on_thread(["logs", "tail", "--url", gateway.url, "--session", "cli_stream", "--follow"], out)
    assert wait_for(lambda: out.lines() == ["one"])
    for number in range(3):
        append(log, f"line {number}")
        assert wait_for(lambda: out.lines()[-1:] == [f"line {number}"])
    access = (gateway.workspaces / "_gateway" / "gateway.log").read_text()
    assert '"path":"/api/v1/ops/logs/tail"' not in access  # one open stream, not a request per poll
    gateway.delete("/api/v1/ops/sessions/cli_stream?confirm=true")  # ends the stream: the thread returns


def drop_after(events: Iterator[ua_client.SseEvent], count: int) -> Iterator[ua_client.SseEvent]:
    for number, event in enumerate(events):
        if number == count:
            raise ua_client.StreamDropped("dropped by the test")
        yield event


def test_follow_stream_resumes_after_a_drop_with_no_gap_and_no_duplicate(gateway: RunningGateway) -> None:
    log = gateway.make_session("cli_resume", {"run.log": b"a\n"}) / "run.log"
    client = ua_client.GatewayClient(gateway.url)
    asked: List[Optional[str]] = []
    seen: List[str] = []
    opened = threading.Event()

    def open_stream(last: Optional[str]) -> Iterator[ua_client.SseEvent]:
        asked.append(last)
        opened.set()
        events = client.open_stream("/api/v1/ops/logs/tail", {"session_id": "cli_resume", "follow": "true"}, last)
        return drop_after(events, 1) if len(asked) == 1 else events  # drops as "b" arrives

    def emit(event: ua_client.SseEvent) -> None:
        if event.name in ("slice", "lines"):
            seen.extend(event.data["lines"])

    thread = threading.Thread(target=ua_client.follow_stream, args=(open_stream, emit), kwargs={"sleep": lambda s: None},
                              daemon=True)
    thread.start()
    assert opened.wait(5) and wait_for(lambda: seen == ["a"])  # the slice came: "b" will be an event of its own
    append(log, "b")
    assert wait_for(lambda: len(asked) == 2)  # "b" was lost in the drop: reconnected
    append(log, "c", "d")
    assert wait_for(lambda: seen[-1:] == ["d"])
    assert seen == ["a", "b", "c", "d"] and asked[1] is not None
    gateway.delete("/api/v1/ops/sessions/cli_resume?confirm=true")
    thread.join(5)
    assert not thread.is_alive()


def test_follow_stream_gives_up_after_bounded_retries() -> None:
    attempts: List[Optional[str]] = []

    def never(last: Optional[str]) -> Iterator[ua_client.SseEvent]:
        attempts.append(last)
        raise ua_client.StreamDropped("connection refused")

    with pytest.raises(ua_client.StreamDropped, match="gave up after 3 reconnects"):
        ua_client.follow_stream(never, lambda event: None, retries=3, sleep=lambda s: None)
    assert len(attempts) == 4


def test_sessions_watch_prints_one_line_per_event(gateway: RunningGateway) -> None:
    gateway.make_session("cli_watch")
    out = Printed()
    run_on_thread(["sessions", "watch", "--url", gateway.url, "--json"], out)
    # The stream opens in the background: patch until the watcher has seen one change.
    assert wait_for(lambda: gateway.request("PATCH", "/api/v1/ops/sessions/cli_watch", body={"description": "x"})
                    and any('"updated"' in line for line in out.lines()))
    before = len(out.lines())
    gateway.delete("/api/v1/ops/sessions/cli_watch?confirm=true")
    assert wait_for(lambda: len(out.lines()) > before)
    event = json.loads(out.lines()[before])
    assert (event["event"], event["kind"], event["session_id"]) == ("deleted", "deleted", "cli_watch")
    assert event["id"]


def test_ctrl_c_ends_sessions_watch_with_status_0_and_no_traceback(gateway: RunningGateway) -> None:
    gateway.make_session("cli_ctrl_c")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([*CLIENT, "sessions", "watch", "--url", gateway.url],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert wait_for(lambda: gateway.request("PATCH", "/api/v1/ops/sessions/cli_ctrl_c", body={"description": "x"})
                        and process.poll() is not None or select.select([process.stdout], [], [], 0.1)[0])
        assert process.stdout is not None and b"updated" in process.stdout.readline()
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0
        assert b"Traceback" not in process.stderr.read()  # type: ignore[union-attr]
    finally:
        if process.poll() is None:
            process.kill()


def test_audit_follow_streams_each_record_once_across_a_rotation(gateway: RunningGateway) -> None:
    gateway.make_session("audit_follow")
    client = SseClient(gateway.host, gateway.port, "/api/v1/ops/audit?follow=true")
    assert client.status == 200
    name, _, first = client.next_event()
    assert name == "slice"
    gateway.request("PATCH", "/api/v1/ops/sessions/audit_follow", body={"description": "before"})
    events = client.events_until(lambda got: len(lines_of(got)) >= 1)
    audit = gateway.workspaces / "_gateway" / "audit.log"
    os.rename(audit, audit.with_name("audit.log.1"))  # as the gateway rotates it
    gateway.request("PATCH", "/api/v1/ops/sessions/audit_follow", body={"description": "after"})
    events += client.events_until(lambda got: len(lines_of(got)) >= 1)
    records = [json.loads(line) for line in lines_of(events)]
    assert [r["params"]["body"]["description"] for r in records] == ["before", "after"]
    assert "reset" not in [name for name, _, _ in events]  # the rotated file was read to its end: nothing lost
    client.close()


def test_audit_follow_with_a_foreign_cursor_is_a_400(gateway: RunningGateway) -> None:
    reply = gateway.get("/api/v1/ops/audit?follow=true", headers={"Last-Event-ID": "not-a-cursor"})
    assert reply.status == 400 and "cursor" in reply.json["detail"]

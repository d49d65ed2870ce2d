"""PROTOCOL.md §13: ?follow=true on logs/tail and preview streams SSE; resumes lose and repeat nothing."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import RunningGateway
from sse import SseClient, last_id, lines_of


def follow(gw: RunningGateway, path: str, **headers: str) -> SseClient:
    client = SseClient(gw.host, gw.port, path, headers=headers)
    assert client.status == 200, client.response.read()
    assert client.response.getheader("content-type").startswith("text/event-stream")
    return client


def append(path: Path, *lines: str) -> None:
    with open(path, "a") as handle:
        handle.write("".join(line + "\n" for line in lines))


def has_lines(count: int):  # noqa: ANN201
    return lambda events: len(lines_of(events)) >= count


def test_follow_sends_the_plain_slice_then_each_new_line(gateway: RunningGateway) -> None:
    log = gateway.make_session("follow_basic", {"run.log": b"one\ntwo\n"}) / "run.log"
    client = follow(gateway, "/api/v1/ops/logs/tail?session_id=follow_basic&follow=true")
    name, event_id, data = client.next_event()
    assert (name, data["lines"], event_id) == ("slice", ["one", "two"], data["cursor"])
    append(log, "three", "four")
    events = client.events_until(has_lines(2))
    assert lines_of(events) == ["three", "four"]
    client.close()


def test_resume_with_last_event_id_across_rotation_has_no_gap_and_no_duplicate(gateway: RunningGateway) -> None:
    log = gateway.make_session("follow_rotate", {"activity_journal.log": b"a0\n"}) / "activity_journal.log"
    client = follow(gateway, "/api/v1/ops/sessions/follow_rotate/preview?follow=true")
    seen = lines_of([client.next_event()])
    append(log, "a1", "a2")
    events = client.events_until(has_lines(2))
    seen += lines_of(events)
    resume_at = last_id(events)
    client.close()
    append(log, "a3")  # written while nobody follows
    os.rename(log, log.with_name("old.log"))  # rotated: a new file, a new inode
    append(log, "b0", "b1")
    again = follow(gateway, "/api/v1/ops/sessions/follow_rotate/preview?follow=true", **{"Last-Event-ID": resume_at})
    events = again.events_until(has_lines(2))
    assert [name for name, _, _ in events][0] == "reset"
    seen += lines_of(events)
    append(log, "b2")
    seen += lines_of(again.events_until(has_lines(1)))
    # a3 went with the rotated file: the reset says so; nothing else is missing or repeated
    assert seen == ["a0", "a1", "a2", "b0", "b1", "b2"]
    again.close()


def test_resume_with_cursor_parameter_gives_exactly_the_missed_lines(gateway: RunningGateway) -> None:
    log = gateway.make_session("follow_cursor", {"run.log": b"x0\n"}) / "run.log"
    client = follow(gateway, "/api/v1/ops/logs/tail?session_id=follow_cursor&follow=true")
    cursor = client.next_event()[1]
    client.close()
    append(log, *[f"x{i}" for i in range(1, 301)])
    again = follow(gateway, f"/api/v1/ops/logs/tail?session_id=follow_cursor&follow=true&cursor={cursor}")
    assert lines_of(again.events_until(has_lines(300))) == [f"x{i}" for i in range(1, 301)]
    again.close()


def test_deleting_the_session_ends_its_streams_with_a_final_event(gateway: RunningGateway) -> None:
    gateway.make_session("follow_delete", {"run.log": b"z\n"})
    client = follow(gateway, "/api/v1/ops/logs/tail?session_id=follow_delete&follow=true")
    client.next_event()
    assert gateway.delete("/api/v1/ops/sessions/follow_delete?confirm=true").status == 200
    events = client.events_until(lambda got: got[-1][0] == "end")
    assert events[-1][2]["reason"] == "the session was deleted"
    assert client.next_event() is None  # then the zero chunk: the answer is complete
    client.close()


def test_a_bad_cursor_is_refused_before_the_stream_starts(gateway: RunningGateway) -> None:
    gateway.make_session("follow_badcursor", {"run.log": b"z\n"})
    reply = gateway.get("/api/v1/ops/logs/tail?session_id=follow_badcursor&follow=true",
                        headers={"Last-Event-ID": "not-a-cursor"})
    assert reply.status == 400 and "cursor" in reply.json["detail"]


def test_following_an_unknown_session_is_a_404(gateway: RunningGateway) -> None:
    reply = gateway.get("/api/v1/ops/sessions/no_such_session_here/preview?follow=true")
    assert reply.status == 404


def test_an_idle_stream_gets_keepalive_comments(start_gateway) -> None:  # noqa: ANN001
    gw = start_gateway("--stream-keepalive", "0.2")
    gw.make_session("idle", {"run.log": b"z\n"})
    client = follow(gw, "/api/v1/ops/logs/tail?session_id=idle&follow=true")
    client.next_event()
    with pytest.raises(TimeoutError):
        client.next_event(timeout=0.7)
    assert client.comments >= 2
    client.close()


def test_gateway_stop_ends_the_stream_with_a_final_event(start_gateway) -> None:  # noqa: ANN001
    gw = start_gateway()
    gw.make_session("stopping", {"run.log": b"z\n"})
    client = follow(gw, "/api/v1/ops/logs/tail?session_id=stopping&follow=true")
    client.next_event()
    started = time.monotonic()
    gw.process.terminate()
    events = client.events_until(lambda got: got[-1][0] == "end")
    assert "stopping" in events[-1][2]["reason"]
    assert client.next_event() is None
    assert gw.process.wait(10) == 0 and time.monotonic() - started < 3


def test_a_reader_that_stops_reading_does_not_hold_back_the_others(start_gateway) -> None:  # noqa: ANN001
    gw = start_gateway("--send-stall-timeout", "2")
    log = gw.make_session("slow", {"run.log": b"start\n"}) / "run.log"
    stalled = socket.create_connection((gw.host, gw.port))
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.sendall(b"GET /api/v1/ops/logs/tail?session_id=slow&follow=true HTTP/1.1\r\nHost: x\r\n\r\n")
    reader = follow(gw, "/api/v1/ops/logs/tail?session_id=slow&follow=true")
    reader.next_event()
    batch = ["y" * 200 + f" {i}" for i in range(2000)]  # 400 KB a round: past any socket buffer and queue
    for round_ in range(5):
        append(log, *batch)
        got = reader.events_until(has_lines(len(batch)), timeout=5)
        assert len(lines_of(got)) == len(batch), f"round {round_}: the reader was held back"
    rss = int(next(line.split()[1] for line in open(f"/proc/{gw.process.pid}/status") if line.startswith("VmRSS")))
    assert rss < 200 * 1024  # KiB: the 2 MB the stalled reader left unread is not all held in memory
    stalled.close()
    reader.close()


def test_a_slow_reader_gets_a_resume_event_and_then_every_line(start_gateway) -> None:  # noqa: ANN001
    gw = start_gateway()
    log = gw.make_session("resume", {"run.log": b"start\n"}) / "run.log"
    slow = follow(gw, "/api/v1/ops/logs/tail?session_id=resume&follow=true")
    slow.next_event()
    # 6 MB: more than the queue and the socket hold (Linux lets a loopback send buffer grow to 4 MB:
    # a follower whose kernel buffers still take the lines keeps up, and gets them written at once).
    expected = [f"{i:05d} " + "r" * 300 for i in range(20000)]
    for start in range(0, len(expected), 500):
        append(log, *expected[start:start + 500])
        time.sleep(0.02)
    time.sleep(0.5)  # the follower has read nothing meanwhile
    events = slow.events_until(has_lines(len(expected)), timeout=15)
    assert "resume" in [name for name, _, _ in events]
    assert lines_of(events) == expected
    slow.close()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_n_shows_lines_as_they_are_written(gateway: RunningGateway) -> None:
    log = gateway.make_session("follow_curl", {"run.log": b"first\n"}) / "run.log"
    curl = subprocess.Popen(["curl", "-sN", f"{gateway.url}/api/v1/ops/logs/tail?session_id=follow_curl&follow=true"],
                            stdout=subprocess.PIPE)
    try:
        assert b"first" in b"".join(curl.stdout.readline() for _ in range(5))  # the connected comment, then the slice
        append(log, "second")
        got = b""
        deadline = time.monotonic() + 5
        while b"second" not in got and time.monotonic() < deadline:
            got += curl.stdout.readline()
        assert b'"lines":["second"]' in got
    finally:
        curl.kill()
        curl.wait()


def test_a_client_that_closes_its_side_ends_its_stream_at_once(gateway: RunningGateway) -> None:
    # A stream's client sends nothing after its request: its end of input (FIN) means it has gone. Before,
    # an idle stream held its slot until the next keep-alive write (15 s) found the peer gone.
    gateway.make_session("fin-1", {"run.log": b"one\n"})
    with socket.create_connection((gateway.host, gateway.port), timeout=10) as sock:
        sock.sendall(f"GET /api/v1/ops/logs/tail?session_id=fin-1&follow=true HTTP/1.1\r\nHost: {gateway.host}\r\n\r\n"
                     .encode())
        received = b""
        while b"event: slice" not in received:
            received += sock.recv(65536)
        sock.shutdown(socket.SHUT_WR)
        started = time.monotonic()
        sock.settimeout(5)
        while sock.recv(65536):
            pass
        assert time.monotonic() - started < 3  # closed by the gateway, not by the keep-alive 15 s later

"""The CLI client against a hostile or broken gateway: every command, every malformed answer -> exit 1
with one line of error naming what was wrong, never a traceback. The streaming commands (PROTOCOL.md §13)
get the same: their first answer (a malformed one is named, not taken for an old gateway to poll), then
each hostile event stream (the second half of this file).

The commands are walked from the client's own parser (a command added later is covered, and needs a
valid sample answer in VALID_ANSWERS before this file passes). The fake gateway is http.server on
127.0.0.1 in a thread; the client runs in-process, so an uncaught exception fails the test directly.
"""

from __future__ import annotations

import argparse
import copy
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Tuple

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import ua_client  # noqa: E402

SESSION = {
    "session_id": "sess-1", "status": "idle", "last_modified": "2026-11-26T10:00:00+00:00",
    "last_activity": "2026-11-26T10:00:00+00:00", "has_run_log": True, "has_activity_journal": False,
    "has_memory": False, "heartbeat_last": None, "heartbeat_last_at": None, "active_connections": 0, "running": False,
}
# One answer the real gateway could give to each command (PROTOCOL.md §5); `more` is true so that a followed
# tail asks again at once (and gets STOP) instead of waiting FOLLOW_INTERVAL.
VALID_ANSWERS = {
    ("sessions", "list"): {"sessions": [SESSION], "total": 1, "limit": 100, "offset": 0},
    ("sessions", "show"): {
        "session": dict(SESSION, heartbeat={"last_run": 1}),
        "memory": {"has_memory_md": False, "files": 0, "bytes": 0},
        "files": [{"name": "run.log", "size": 12, "modified": "2026-11-26T10:00:00+00:00"}],
        "archives": ["20261126T100000Z"],
    },
    ("sessions", "reset"): {"status": "reset", "archived": ["run.log"], "archive_dir": "archive/x"},
    ("sessions", "compact"): {"status": "compacted", "files": {"run.log": 3}, "bytes_freed": 10, "archive_dir": None},
    ("sessions", "delete"): {"status": "deleted", "session_id": "sess-1"},
    ("logs", "tail"): {"file": "run.log", "cursor": "c1", "size": 3, "lines": ["a"], "truncated": False,
                       "reset": False, "more": True},
    # the data of one event of the stream (PROTOCOL.md §13.3): there is no plain answer to `sessions watch`
    ("sessions", "watch"): {"kind": "updated", "session_id": "sess-1", "at": 1764151200.5, "description": "x"},
    ("audit",): {"file": "audit.log", "cursor": "c1", "size": 90, "truncated": False, "reset": False, "more": False,
                 "lines": ['{"time": "2026-11-26T10:00:00+00:00", "action": "reset", "session": "sess-1", '
                           '"client": "127.0.0.1", "scope": "full", "outcome": {"status": 200}}']},
}
STOP = (410, b'{"detail": "end of test"}')  # every request after the first: ends `logs tail --follow`
STREAM_ONLY = {("sessions", "watch")}  # commands that only stream: their sample answer is one event's data


class Sse(NamedTuple):
    """An answer of Content-Type text/event-stream carrying ``body`` (closed after it, as HTTP/1.0)."""
    body: bytes
    content_type: str = "text/event-stream; charset=utf-8"


def sse(name: str, data: Any, event_id: Any = None) -> bytes:
    """One event as the gateway writes it; ``data`` bytes go out as they are, anything else as JSON."""
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    head = b"" if event_id is None else b"id: " + (event_id if isinstance(event_id, bytes) else event_id.encode()) + b"\n"
    return head + b"event: " + name.encode() + b"\ndata: " + raw + b"\n\n"


END = sse("end", {"reason": "end of test"})


def leaf_commands(parser: argparse.ArgumentParser, words: Tuple[str, ...] = ()) -> Iterator[Tuple[Tuple[str, ...], argparse.ArgumentParser]]:
    """(command words, parser) of every command the client's parser knows, depth first."""
    subparsers = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    if not subparsers:
        yield words, parser
    for action in subparsers:
        for name, child in action.choices.items():
            yield from leaf_commands(child, words + (name,))


def command_lines() -> List[Tuple[Tuple[str, ...], List[str]]]:
    """For every command: (its words, argv) in each output form (--json, --follow) it has."""
    lines = []
    for words, parser in leaf_commands(ua_client.build_parser()):
        options = {option for action in parser._actions for option in action.option_strings}
        argv = list(words) + ["sess-1" for action in parser._actions
                              if not action.option_strings and not isinstance(action, argparse._SubParsersAction)]
        argv += ["--yes"] if "--yes" in options else []
        forms: List[List[str]] = [[], ["--json"]]
        forms += [["--follow"], ["--follow", "--json"]] if "--follow" in options else []
        lines += [(words, argv + form) for form in forms]
    return lines


COMMAND_LINES = command_lines()
COMMAND_IDS = [" ".join(argv) for _, argv in COMMAND_LINES]


class FakeGateway:
    """Answers the first request with ``first`` (status, body) or raw bytes; every later one with STOP."""

    def __init__(self) -> None:
        self.first: Any = (200, b"null")
        self.requests = 0
        self.seen: List[Tuple[str, Dict[str, str]]] = []  # (path, headers) of every request
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                fake.requests += 1
                fake.seen.append((self.path, dict(self.headers.items())))
                answer = fake.first if fake.requests == 1 else STOP
                if callable(answer):  # writes to the socket itself, e.g. for ever
                    self.close_connection = True
                    try:
                        answer(self.wfile)
                    except OSError:
                        pass  # the client hung up: what it should do
                    return
                if isinstance(answer, bytes):  # raw: whatever the socket should carry
                    self.wfile.write(answer)
                    self.close_connection = True
                    return
                if isinstance(answer, Sse):
                    self.send_response(200)
                    self.send_header("Content-Type", answer.content_type)
                    self.end_headers()
                    self.wfile.write(answer.body)
                    self.close_connection = True
                    return
                status, body = answer
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_DELETE = _any

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeGateway]:
    """One server for the file: starting and stopping one per test cost more than the tests themselves."""
    gateway = FakeGateway()
    yield gateway
    gateway.close()


@pytest.fixture
def fake(fake_server, monkeypatch) -> FakeGateway:
    for name in ("UA_OPS_TOKEN", "UA_OPS_TOKEN_FILE", "UA_GATEWAY_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(ua_client, "STREAM_BACKOFF", (0.0,))  # a drop reconnects at once: no test waits
    monkeypatch.setattr(ua_client, "FOLLOW_INTERVAL", 0.0)  # a caught-up poll asks again at once
    fake_server.first, fake_server.requests, fake_server.seen = (200, b"null"), 0, []
    return fake_server


def run(fake: FakeGateway, capsys, argv: List[str], answer: Any) -> Tuple[int, str]:
    """Exit status and stderr of the client for ``argv`` when the gateway answers ``answer``; for a command
    that only streams, a 200 body is the data of the stream's one event (then ``end``)."""
    if tuple(argv[:2]) in STREAM_ONLY and isinstance(answer, tuple) and answer[0] == 200:
        answer = Sse(sse("updated", answer[1], "run-1") + END)
    fake.first, fake.requests, fake.seen = answer, 0, []
    status = ua_client.main(argv + ["--url", fake.url])
    return status, capsys.readouterr().err


def one_line_error(stderr: str) -> bool:
    return stderr.startswith("ua_gateway: error: ") and stderr.count("\n") == 1 and "Traceback" not in stderr


def body(value: Any) -> Tuple[int, bytes]:
    return 200, json.dumps(value).encode()


DEEP = 200_000  # far past the recursion limit of json.loads
# (name, answer, a fragment the error must contain)
MALFORMED = [
    ("empty body", (200, b""), "should be an object, not null"),
    ("null", (200, b"null"), "should be an object, not null"),
    ("an array", (200, b"[]"), "should be an object, not an array"),
    ("an empty object", (200, b"{}"), "has no"),
    ("a string", (200, b'"text"'), "should be an object, not a string"),
    ("not JSON", (200, b"<html>oops</html>"), "not JSON"),
    ("not UTF-8", (200, b"\xff\xfe{}"), "not JSON"),
    ("NaN", (200, b"NaN"), "should be an object, not a number"),
    ("nested past the recursion limit", (200, b"[" * DEEP + b"]" * DEEP), "nested"),
    ("nested past MAX_ANSWER_DEPTH", (200, b'{"a":' * 150 + b"1" + b"}" * 150), "nested more than"),
    ("an error nested past the recursion limit", (500, b"[" * DEEP + b"]" * DEEP), "500"),
    ("not an HTTP status line", b"HELLO\r\n\r\n", "BadStatusLine"),
    ("a body cut short", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{", "99 bytes short"),
    ("too many header lines", b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 200 + b"\r\n", "HTTPException"),
]


def test_every_command_is_covered_by_a_valid_sample_answer():
    assert {words for words, _ in leaf_commands(ua_client.build_parser())} == set(VALID_ANSWERS)


@pytest.mark.parametrize("words,argv", COMMAND_LINES, ids=COMMAND_IDS)
def test_a_valid_answer_is_printed(fake, capsys, words, argv):
    status, stderr = run(fake, capsys, argv, body(VALID_ANSWERS[words]))
    if "--follow" in argv:
        assert (status, "end of test" in stderr) == (1, True), stderr
    else:
        assert status == 0 and all(line.startswith("-- ") for line in stderr.splitlines()), stderr  # notes only


@pytest.mark.parametrize("words,argv", COMMAND_LINES, ids=COMMAND_IDS)
def test_a_malformed_answer_exits_1_with_one_line_naming_what_is_wrong(fake, capsys, words, argv):
    failures = []
    for name, answer, fragment in MALFORMED:
        status, stderr = run(fake, capsys, argv, answer)
        if status != 1 or not one_line_error(stderr) or fragment not in stderr:
            failures.append(f"{name}: exit {status}, stderr {stderr[:300]!r}")
    assert not failures, "\n".join(failures)


def paths(value: Any, prefix: Tuple[Any, ...] = ()) -> Iterator[Tuple[Any, ...]]:
    """Every key of every object and the first item of every array in ``value``, as a path."""
    children = value.items() if isinstance(value, dict) else enumerate(value[:1]) if isinstance(value, list) else ()
    for key, child in children:
        yield prefix + (key,)
        yield from paths(child, prefix + (key,))


def mutated(value: Any, path: Tuple[Any, ...], change: Callable[[Any], Any]) -> Any:
    """A deep copy of ``value`` with the item at ``path`` replaced by change(item), or removed if that is REMOVE."""
    result = copy.deepcopy(value)
    parent = result
    for key in path[:-1]:
        parent = parent[key]
    replacement = change(parent[path[-1]])
    if replacement is REMOVE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = replacement
    return result


REMOVE = object()
CHANGES = {
    "removed": lambda old: REMOVE,
    "null": lambda old: None,
    "of another type": lambda old: 0 if isinstance(old, str) else "x",
    "a number too big for a float": lambda old: 10 ** 400,
    "negative": lambda old: -1,
    "an object": lambda old: {"x": [1]},
}


@pytest.mark.parametrize("words,argv", COMMAND_LINES, ids=COMMAND_IDS)
def test_any_field_removed_or_of_the_wrong_type_never_raises(fake, capsys, words, argv):
    """Exit 0 (a field the command does not read) or 1 with one line; no exception, no traceback."""
    failures = []
    valid = VALID_ANSWERS[words]
    for path in paths(valid):
        for change_name, change in CHANGES.items():
            try:
                status, stderr = run(fake, capsys, argv, body(mutated(valid, path, change)))
            except BaseException as error:  # noqa: B902 - exactly what must not happen
                failures.append(f"{path} {change_name}: raised {type(error).__name__}: {error}")
                capsys.readouterr()
                continue
            follow_stopped = "--follow" in argv and "end of test" in stderr
            # `audit` prints the next cursor on stderr ("-- next: ... --"): a note, not an error.
            notes_only = all(line.startswith("-- ") for line in stderr.splitlines())
            if not (status == 0 and notes_only or status == 1 and one_line_error(stderr) or follow_stopped):
                failures.append(f"{path} {change_name}: exit {status}, stderr {stderr[:300]!r}")
    assert not failures, "\n".join(failures[:20])


def test_a_session_without_keys_is_named_in_the_error(fake, capsys):
    answer = body({"sessions": [{}], "total": 1, "limit": 100, "offset": 0})
    status, stderr = run(fake, capsys, ["sessions", "list"], answer)
    assert status == 1 and one_line_error(stderr)
    assert "answer.sessions[0] has no 'session_id'" in stderr


@pytest.mark.parametrize("words,argv", COMMAND_LINES, ids=COMMAND_IDS)
def test_an_answer_over_the_cap_is_refused_unread(fake, capsys, monkeypatch, words, argv):
    monkeypatch.setattr(ua_client, "MAX_ANSWER_BYTES", 64 * 1024)
    monkeypatch.setattr(ua_client, "MAX_EVENT_LINE", 64 * 1024)  # the cap of a streamed answer
    padded = dict(VALID_ANSWERS[words], padding="x" * 256 * 1024)  # valid, only too big
    status, stderr = run(fake, capsys, argv, body(padded))
    assert status == 1 and one_line_error(stderr), stderr
    assert "over 65536 bytes" in stderr


def test_the_cap_is_16_mib_and_one_byte_more_is_refused(fake, capsys):
    assert ua_client.MAX_ANSWER_BYTES == 16 * 1024 * 1024
    answer = dict(VALID_ANSWERS[("sessions", "list")], padding="")
    answer["padding"] = "x" * (ua_client.MAX_ANSWER_BYTES + 1 - len(json.dumps(answer)))
    status, stderr = run(fake, capsys, ["sessions", "list", "--json"], body(answer))
    assert status == 1 and "over 16777216 bytes" in stderr


def test_a_huge_error_detail_is_cut_to_one_short_line(fake, capsys):
    status, stderr = run(fake, capsys, ["sessions", "list"], (500, json.dumps({"detail": "y" * 10 ** 6}).encode()))
    assert status == 1 and one_line_error(stderr)
    assert len(stderr) < 2 * ua_client.MAX_DETAIL_CHARS


def test_the_installed_command_prints_no_traceback_for_a_session_without_keys(fake):
    fake.first = body({"sessions": [{}], "total": 1, "limit": 100, "offset": 0})
    result = subprocess.run(
        [sys.executable, str(REPO / "ua_gateway.py"), "sessions", "list", "--url", fake.url],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_a_plain_answer_to_a_follow_is_the_first_poll_not_asked_again(fake, capsys):
    """A gateway without streams answers `follow=true` with the plain slice: polling goes on from it."""
    status, stderr = run(fake, capsys, ["logs", "tail", "--follow"], body(VALID_ANSWERS[("logs", "tail")]))
    assert (status, "end of test" in stderr) == (1, True), stderr
    assert [path.split("?")[1] for path, _ in fake.seen] == ["follow=true", "cursor=c1"]


def test_audit_follow_sends_its_cursor_in_the_query_too(fake, capsys):
    """So that a gateway without streams, which reads no Last-Event-ID, answers the records after it."""
    run(fake, capsys, ["audit", "--follow", "--cursor", "c0"], body(VALID_ANSWERS[("audit",)]))
    path, headers = fake.seen[0]
    assert "cursor=c0" in path and headers["Last-Event-ID"] == "c0"


# ---------------------------------------------------------------------------------------------------------
# Hostile streams: the gateway answers text/event-stream, and what it streams is broken
# ---------------------------------------------------------------------------------------------------------

STREAM_LINES = [(words, argv) for words, argv in COMMAND_LINES if "--follow" in argv or words in STREAM_ONLY]
STREAM_IDS = [" ".join(argv) for _, argv in STREAM_LINES]
Event = Tuple[str, Any, Any]  # (name, id or None, data: bytes as they are, else JSON)


def valid_events(words: Tuple[str, ...]) -> List[Event]:
    """A stream the real gateway could send each command (PROTOCOL.md §13.2, §13.3), before its `end`."""
    if words in STREAM_ONLY:
        change = VALID_ANSWERS[words]
        return [("updated", "run-1", change), ("deleted", "run-2", dict(change, kind="deleted"))]
    first = VALID_ANSWERS[words]["lines"][0]
    later = first.replace("sess-1", "sess-2") if "sess-1" in first else "sess-2 was here"
    return [("slice", "c1", VALID_ANSWERS[words]), ("lines", "c2", {"lines": [later], "truncated": False})]


def stream(events: List[Event], tail: bytes = END) -> Sse:
    return Sse(b"".join(sse(name, data, event_id) for name, event_id, data in events) + tail)


def replaced(events: List[Event], index: int, name: Any = None, event_id: Any = None, data: Any = None) -> List[Event]:
    """``events`` with the given parts of event ``index`` replaced (``REMOVE`` as the id: no id line)."""
    old = events[index]
    new = (name or old[0], old[1] if event_id is None else None if event_id is REMOVE else event_id,
           old[2] if data is None else data)
    return events[:index] + [new] + events[index + 1:]


def escaped_everywhere(value: Any) -> Any:
    """``value`` with terminal escapes (OSC 52 writes the clipboard, CSI 2J clears the screen) in every string."""
    if isinstance(value, dict):
        return {key: escaped_everywhere(item) for key, item in value.items()}
    if isinstance(value, list):
        return [escaped_everywhere(item) for item in value]
    return "\x1b]52;c;aGk=\x07" + value + "\x1b[2J\u202e" if isinstance(value, str) else value


def forever(piece: bytes, head: bytes = b"") -> Callable[[Any], None]:
    """An answer that streams ``head`` then ``piece`` again and again until the client hangs up."""
    def write(wfile: Any) -> None:
        wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n" + head)
        while True:
            wfile.write(piece)
    return write


CAP = 64 * 1024  # MAX_EVENT_LINE and MAX_EVENT_BYTES in these tests: a hostile stream is refused after this much
# (name, the hostile answer made from the command's valid events, a fragment the one-line error must contain)
BROKEN_STREAMS: List[Tuple[str, Callable[[List[Event]], Any], str]] = [
    ("data not JSON", lambda ev: stream(replaced(ev, 1, data=b"<html>oops</html>")), "not JSON"),
    ("data not UTF-8", lambda ev: stream(replaced(ev, 1, data=b"\xff\xfe{}")), "not JSON"),
    ("data an array", lambda ev: stream(replaced(ev, 1, data=b"[1]")), "should be an object, not an array"),
    ("data empty", lambda ev: stream(replaced(ev, 1, data=b"")), "should be an object, not null"),
    ("data nested past the recursion limit", lambda ev: stream(replaced(ev, 1, data=b"[" * 20_000 + b"]" * 20_000)),
     "nested"),
    ("data an empty object", lambda ev: stream(replaced(ev, 1, data={})), "has no"),
    ("an id that is not ASCII", lambda ev: stream(replaced(ev, 0, event_id="c\u00e9")), "is not an id the gateway"),
    ("an id with a control character", lambda ev: stream(replaced(ev, 0, event_id="c\x01")), "is not an id the gateway"),
    ("an id over MAX_EVENT_ID_CHARS", lambda ev: stream(replaced(ev, 0, event_id="c" * 2000)), "is not an id the gateway"),
    ("a resumable event without an id", lambda ev: stream(replaced(ev, 1, event_id=REMOVE)), "no id to resume from"),
    ("an end that is not an object", lambda ev: stream(ev, sse("end", [1])), "should be an object, not an array"),
    ("an end whose reason is a number", lambda ev: stream(ev, sse("end", {"reason": 5})), "reason should be a string"),
    ("a data line over MAX_EVENT_LINE", lambda ev: stream(replaced(ev, 1, data={"x": "y" * 4 * CAP})),
     f"over {CAP} bytes (MAX_EVENT_LINE)"),
    ("an event over MAX_EVENT_BYTES in ignored lines",
     lambda ev: stream(ev[:1], (b"x-pad: " + b"y" * 1000 + b"\n") * 100), "(MAX_EVENT_BYTES)"),
    ("a line that never ends", lambda ev: forever(b"y" * 8192, b"data: "), "(MAX_EVENT_LINE)"),
    ("an event that never ends", lambda ev: forever(b"x-pad: y\n"), "(MAX_EVENT_BYTES)"),
]


@pytest.fixture
def capped(monkeypatch) -> None:
    monkeypatch.setattr(ua_client, "MAX_EVENT_LINE", CAP)
    monkeypatch.setattr(ua_client, "MAX_EVENT_BYTES", CAP)


def printed(capsys_out: str) -> List[str]:
    return [line for line in capsys_out.splitlines() if line]


def run_streamed(fake: FakeGateway, capsys, argv: List[str], answer: Any) -> Tuple[int, str, str]:
    """Exit status, stdout and stderr of the client for ``argv`` when the gateway streams ``answer``."""
    fake.first, fake.requests, fake.seen = answer, 0, []
    status = ua_client.main(argv + ["--url", fake.url])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("words,argv", STREAM_LINES, ids=STREAM_IDS)
def test_a_broken_stream_exits_1_with_one_line_naming_what_is_wrong(fake, capsys, capped, words, argv):
    failures = []
    for name, make, fragment in BROKEN_STREAMS:
        status, _, err = run_streamed(fake, capsys, argv, make(valid_events(words)))
        if status != 1 or not one_line_error(err) or fragment not in err:
            failures.append(f"{name}: exit {status}, stderr {err[:300]!r}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("words,argv", STREAM_LINES, ids=STREAM_IDS)
def test_any_field_of_an_event_removed_or_of_the_wrong_type_never_raises(fake, capsys, words, argv):
    """Exit 0 (a field the command does not read) or 1 with one line; no exception, no traceback."""
    failures = []
    events = valid_events(words)
    for index, (_, _, data) in enumerate(events):
        for path in paths(data):
            for change_name, change in CHANGES.items():
                answer = stream(replaced(events, index, data=mutated(data, path, change)))
                try:
                    status, _, err = run_streamed(fake, capsys, argv, answer)
                except BaseException as error:  # noqa: B902 - exactly what must not happen
                    failures.append(f"event {index} {path} {change_name}: raised {type(error).__name__}: {error}")
                    capsys.readouterr()
                    continue
                notes_only = all(line.startswith("-- ") for line in err.splitlines())
                if not (status == 0 and notes_only or status == 1 and one_line_error(err)):
                    failures.append(f"event {index} {path} {change_name}: exit {status}, stderr {err[:300]!r}")
    assert not failures, "\n".join(failures[:20])


# (name, the answer made from the command's valid events): each prints what the valid stream prints, exit 0
HARMLESS_STREAMS: List[Tuple[str, Callable[[List[Event]], Any]]] = [
    ("an unknown event, its data not JSON", lambda ev: stream(ev[:1] + [("surprise", "z", b"<?>")] + ev[1:])),
    ("a retry field with a huge value", lambda ev: Sse(b"retry: " + b"9" * 400 + b"\n\n" + stream(ev).body)),
    ("keep-alive comments between every line", lambda ev: Sse(stream(ev).body.replace(b"\n", b"\n: keepalive\n"))),
    ("lines ended by CR LF and by CR alone",
     lambda ev: Sse(stream(ev[:1], b"").body.replace(b"\n", b"\r\n") + stream(ev[1:]).body.replace(b"\n", b"\r"))),
]


@pytest.mark.parametrize("words,argv", STREAM_LINES, ids=STREAM_IDS)
def test_an_odd_but_harmless_stream_prints_what_the_valid_one_prints(fake, capsys, words, argv):
    status, expected, err = run_streamed(fake, capsys, argv, stream(valid_events(words)))
    assert status == 0 and all(line.startswith("-- ") for line in err.splitlines()), err
    assert ("sess-2" in expected or "deleted" in expected) and fake.requests == 1  # both events, one request
    failures = []
    for name, make in HARMLESS_STREAMS:
        status, out, err = run_streamed(fake, capsys, argv, make(valid_events(words)))
        if status != 0 or out != expected:
            failures.append(f"{name}: exit {status}, stdout {out[:200]!r}, stderr {err[:200]!r}")
    assert not failures, "\n".join(failures)


def chunked(*pieces: bytes) -> bytes:
    """A raw event-stream answer in chunked encoding, each piece a chunk as it is (well-formed or not)."""
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n" + b"".join(pieces)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# (name, the answer from the command's valid events): each drops after the first event, and the client
# reconnects with that event's id (PROTOCOL.md §13.2) and nothing of the second
DROPPED_STREAMS: List[Tuple[str, Callable[[List[Event]], Any]]] = [
    ("closed mid-event", lambda ev: Sse(stream(ev[:1], b"").body + stream(ev[1:], b"").body[:25])),
    ("a chunk size that is not hex", lambda ev: chunked(chunk(stream(ev[:1], b"").body), b"zz\r\n", stream(ev[1:]).body)),
    ("a chunk shorter than its size", lambda ev: chunked(chunk(stream(ev[:1], b"").body), b"ffff\r\n" + stream(ev[1:]).body[:25])),
    ("a CR in the id carrying a header", lambda ev: Sse(stream(replaced(ev, 0, event_id=ev[0][1] + "\rX-Injected: yes")[:1],
                                                              b"").body)),
]


@pytest.mark.parametrize("words,argv", STREAM_LINES, ids=STREAM_IDS)
def test_a_dropped_stream_resumes_from_the_last_whole_event(fake, capsys, words, argv):
    events = valid_events(words)
    _, first_only, _ = run_streamed(fake, capsys, argv, stream(events[:1], b""))  # and then the fake's STOP
    failures = []
    for name, make in DROPPED_STREAMS:
        status, out, err = run_streamed(fake, capsys, argv, make(events))
        resumed = [headers.get("Last-Event-ID") for _, headers in fake.seen[1:]]
        injected = [headers for _, headers in fake.seen if "X-Injected" in headers]
        if (status, one_line_error(err), "end of test" in err) != (1, True, True) or out != first_only \
                or resumed != [events[0][1]] or injected:
            failures.append(f"{name}: exit {status}, resumed with {resumed}, stdout {out[:200]!r}, stderr {err[:200]!r}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("argv", [["sessions", "watch", "--last-event-id"], ["audit", "--follow", "--cursor"]])
def test_an_id_given_with_a_line_break_is_refused_before_any_request(fake, capsys, argv):
    status, _, err = run_streamed(fake, capsys, argv + ["run-1\r\nX-Injected: yes"], stream([]))
    assert status == 1 and one_line_error(err) and "cannot be sent as Last-Event-ID" in err, err
    assert fake.requests == 0


@pytest.mark.parametrize("words,argv", STREAM_LINES, ids=STREAM_IDS)
def test_terminal_escapes_in_every_field_of_every_event_are_shown_escaped(fake, capsys, words, argv):
    events = [(name, event_id, escaped_everywhere(data)) for name, event_id, data in valid_events(words)]
    events[0][2]["\x1b[2Jkey"] = "value"  # a name, too, reaches the terminal in `sessions watch`
    status, out, err = run_streamed(fake, capsys, argv, stream(events, sse("end", {"reason": "\x1b]0;title\x07"})))
    assert status == 0, err
    assert not set("\x1b\x07\u202e") & set(out + err)
    assert ("\\u001b" if "--json" in argv else "\\x1b") in out

"""The CLI client against a hostile or broken gateway: every command, every malformed answer -> exit 1
with one line of error naming what was wrong, never a traceback.

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
from typing import Any, Callable, Iterator, List, Tuple

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
    ("audit",): {"file": "audit.log", "cursor": "c1", "size": 90, "truncated": False, "reset": False, "more": False,
                 "lines": ['{"time": "2026-11-26T10:00:00+00:00", "action": "reset", "session": "sess-1", '
                           '"client": "127.0.0.1", "scope": "full", "outcome": {"status": 200}}']},
}
STOP = (410, b'{"detail": "end of test"}')  # every request after the first: ends `logs tail --follow`


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
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                fake.requests += 1
                answer = fake.first if fake.requests == 1 else STOP
                if isinstance(answer, bytes):  # raw: whatever the socket should carry
                    self.wfile.write(answer)
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


@pytest.fixture
def fake(monkeypatch) -> Iterator[FakeGateway]:
    for name in ("UA_OPS_TOKEN", "UA_OPS_TOKEN_FILE", "UA_GATEWAY_URL"):
        monkeypatch.delenv(name, raising=False)
    gateway = FakeGateway()
    yield gateway
    gateway.close()


def run(fake: FakeGateway, capsys, argv: List[str], answer: Any) -> Tuple[int, str]:
    """Exit status and stderr of the client for ``argv`` when the gateway answers ``answer``."""
    fake.first, fake.requests = answer, 0
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

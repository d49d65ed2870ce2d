"""The command-line client (``python ua_gateway.py sessions ...`` / ``logs ...``) against a real gateway.

Every test runs the client as an operator would, in a subprocess, and reads its output and exit status:
0 done, 1 the gateway refused or could not be reached, 2 usage.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

from conftest import ROOT, gateway_env

CLIENT = [sys.executable, str(ROOT / "ua_gateway.py")]
RUN_TIMEOUT = 30.0


def run_client(url: str, *args: str, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLIENT, *args, "--url", url], env=gateway_env(env), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=RUN_TIMEOUT,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LineReader:
    """Collects the lines of a pipe on a thread, so a test can wait for a line without blocking forever."""

    def __init__(self, stream) -> None:
        self.lines: List[str] = []
        self._queue: "queue.Queue[str]" = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 10.0) -> List[str]:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{text!r} did not appear; got {self.lines!r}")
            try:
                self.lines.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                pass
        return self.lines


# --- sessions list / show ------------------------------------------------------------------------------


def test_list_prints_a_table_with_the_session_ids(gateway):
    gateway.make_session("cli-list-a", {"run.log": b"a\n"})
    gateway.make_session("cli-list-b", {"activity_journal.log": b"b\n"})

    result = run_client(gateway.url, "sessions", "list", "--limit", "1000")

    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split()[:3] == ["SESSION", "STATUS", "LAST"]
    assert any(row.startswith("cli-list-a ") and " idle " in row for row in rows)
    assert any(row.startswith("cli-list-b ") for row in rows)
    assert rows[-1].endswith("sessions")


def test_list_json_is_the_gateway_answer(gateway):
    gateway.make_session("cli-json", {"run.log": b"a\n"})

    result = run_client(gateway.url, "sessions", "list", "--status", "idle", "--limit", "1000", "--json")

    assert result.returncode == 0, result.stderr
    page = json.loads(result.stdout)
    assert {"sessions", "total", "limit", "offset"} <= set(page)
    assert "cli-json" in [s["session_id"] for s in page["sessions"]]
    assert {s["status"] for s in page["sessions"]} == {"idle"}


def test_list_pages_with_limit_and_offset(gateway):
    for name in ("cli-page-1", "cli-page-2", "cli-page-3"):
        gateway.make_session(name)

    first = json.loads(run_client(gateway.url, "sessions", "list", "--limit", "2", "--json").stdout)
    second = json.loads(run_client(gateway.url, "sessions", "list", "--limit", "2", "--offset", "2", "--json").stdout)

    assert (first["limit"], first["offset"], second["offset"]) == (2, 0, 2)
    assert len(first["sessions"]) == 2
    assert not {s["session_id"] for s in first["sessions"]} & {s["session_id"] for s in second["sessions"]}


def test_show_prints_details_and_files(gateway):
    gateway.make_session("cli-show", {"run.log": b"x\n" * 10, "MEMORY.md": b"remember\n"})

    result = run_client(gateway.url, "sessions", "show", "cli-show")

    assert result.returncode == 0, result.stderr
    assert "cli-show" in result.stdout
    assert "MEMORY.md yes" in result.stdout
    assert any(line.startswith("run.log ") and "20 B" in line for line in result.stdout.splitlines())


def test_show_json_has_details(gateway):
    gateway.make_session("cli-show-json", {"run.log": b"x\n"})

    details = json.loads(run_client(gateway.url, "sessions", "show", "cli-show-json", "--json").stdout)

    assert details["session"]["session_id"] == "cli-show-json"
    assert [f["name"] for f in details["files"]] == ["run.log"]


def test_show_of_unknown_session_exits_1_with_the_detail(gateway):
    result = run_client(gateway.url, "sessions", "show", "cli-no-such-session")

    assert result.returncode == 1
    assert "404" in result.stderr and "not found" in result.stderr


# --- reset / compact / delete --------------------------------------------------------------------------


def test_reset_archives_the_logs(gateway):
    directory = gateway.make_session("cli-reset", {"run.log": b"old\n", "MEMORY.md": b"keep\n"})

    result = run_client(gateway.url, "sessions", "reset", "cli-reset")

    assert result.returncode == 0, result.stderr
    assert "run.log" in result.stdout and "archive/" in result.stdout
    assert not (directory / "run.log").exists()
    assert (directory / "MEMORY.md").exists()


def test_reset_flags_choose_what_is_archived(gateway):
    directory = gateway.make_session("cli-reset-flags", {"run.log": b"old\n", "MEMORY.md": b"m\n"})

    result = run_client(gateway.url, "sessions", "reset", "cli-reset-flags", "--keep-logs", "--clear-memory", "--json")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["archived"] == ["MEMORY.md"]
    assert (directory / "run.log").exists()


def test_compact_keeps_the_last_lines(gateway):
    directory = gateway.make_session("cli-compact", {"run.log": b"".join(b"line %d\n" % i for i in range(50))})

    result = run_client(gateway.url, "sessions", "compact", "cli-compact", "--max-lines", "5")

    assert result.returncode == 0, result.stderr
    assert "run.log keeps 5 lines" in result.stdout
    assert (directory / "run.log").read_bytes() == b"".join(b"line %d\n" % i for i in range(45, 50))


def test_delete_with_yes_removes_the_session(gateway):
    directory = gateway.make_session("cli-delete", {"run.log": b"x\n"})

    result = run_client(gateway.url, "sessions", "delete", "cli-delete", "--yes")

    assert result.returncode == 0, result.stderr
    assert "deleted cli-delete" in result.stdout
    assert not directory.exists()


def test_delete_without_yes_and_without_a_terminal_exits_2_and_deletes_nothing(gateway):
    directory = gateway.make_session("cli-delete-refused", {"run.log": b"x\n"})

    result = run_client(gateway.url, "sessions", "delete", "cli-delete-refused")

    assert result.returncode == 2
    assert "--yes" in result.stderr
    assert (directory / "run.log").exists()


def run_client_on_a_terminal(url: str, typed: bytes, *args: str) -> subprocess.CompletedProcess:
    """Run the client with a pseudo-terminal as stdin, as if an operator typed ``typed``."""
    controller, terminal = os.openpty()
    try:
        os.write(controller, typed)
        return subprocess.run([*CLIENT, *args, "--url", url], env=gateway_env(), stdin=terminal,
                              capture_output=True, text=True, timeout=RUN_TIMEOUT)
    finally:
        os.close(controller)
        os.close(terminal)


def test_delete_on_a_terminal_deletes_once_the_id_is_typed(gateway):
    directory = gateway.make_session("cli-delete-typed", {"run.log": b"x\n"})

    result = run_client_on_a_terminal(gateway.url, b"cli-delete-typed\n", "sessions", "delete", "cli-delete-typed")

    assert result.returncode == 0, result.stderr
    assert "Type the session id to confirm" in result.stdout
    assert not directory.exists()


def test_delete_on_a_terminal_keeps_the_session_when_the_id_is_wrong(gateway):
    directory = gateway.make_session("cli-delete-mistyped", {"run.log": b"x\n"})

    result = run_client_on_a_terminal(gateway.url, b"cli-delete\n", "sessions", "delete", "cli-delete-mistyped")

    assert result.returncode == 1
    assert "nothing was deleted" in result.stderr
    assert directory.exists()


# --- errors ---------------------------------------------------------------------------------------------


def test_missing_token_exits_1_with_the_detail(start_gateway):
    protected = start_gateway(env={"UA_OPS_TOKEN": "s3cret-token"})

    result = run_client(protected.url, "sessions", "list")

    assert result.returncode == 1
    assert "Unauthorized" in result.stderr and "UA_OPS_TOKEN" in result.stderr
    assert "s3cret-token" not in result.stderr


def test_token_from_the_environment_is_sent(start_gateway):
    protected = start_gateway(env={"UA_OPS_TOKEN": "s3cret-token"})
    protected.make_session("cli-token")

    result = run_client(protected.url, "sessions", "list", "--json", env={"UA_OPS_TOKEN": "s3cret-token"})

    assert result.returncode == 0, result.stderr
    assert [s["session_id"] for s in json.loads(result.stdout)["sessions"]] == ["cli-token"]


def test_token_from_the_file_ua_ops_token_file_names_is_sent(start_gateway, tmp_path):
    secret = tmp_path / "token"
    secret.write_text("s3cret-token\n")
    protected = start_gateway(env={"UA_OPS_TOKEN_FILE": str(secret)})
    protected.make_session("cli-token-file")

    result = run_client(protected.url, "sessions", "list", "--json", env={"UA_OPS_TOKEN_FILE": str(secret)})

    assert result.returncode == 0, result.stderr
    assert [s["session_id"] for s in json.loads(result.stdout)["sessions"]] == ["cli-token-file"]


def test_an_unreadable_token_file_exits_1_naming_it(gateway, tmp_path):
    result = run_client(gateway.url, "sessions", "list", env={"UA_OPS_TOKEN_FILE": str(tmp_path / "missing")})

    assert result.returncode == 1
    assert "UA_OPS_TOKEN_FILE" in result.stderr and "missing" in result.stderr


def test_connection_refused_exits_1_with_a_clear_message():
    result = run_client(f"http://127.0.0.1:{free_port()}", "sessions", "list")

    assert result.returncode == 1
    assert "cannot reach the gateway" in result.stderr and "connection refused" in result.stderr


def test_url_comes_from_the_environment(gateway):
    gateway.make_session("cli-env-url")

    result = subprocess.run(
        [*CLIENT, "sessions", "list", "--json", "--limit", "1000"], env=gateway_env({"UA_GATEWAY_URL": gateway.url}),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=RUN_TIMEOUT,
    )

    assert result.returncode == 0, result.stderr
    assert "cli-env-url" in result.stdout


def test_usage_errors_exit_2(gateway):
    for args in (["sessions"], ["sessions", "list", "--status", "busy"], ["logs", "tail", "--file", "run.log"]):
        result = run_client(gateway.url, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert "usage:" in result.stderr or "error:" in result.stderr


def test_token_is_not_accepted_on_the_command_line(gateway):
    result = run_client(gateway.url, "sessions", "list", "--token", "x")

    assert result.returncode == 2


# --- logs tail ------------------------------------------------------------------------------------------


def test_tail_prints_the_last_lines_of_a_session_log(gateway):
    gateway.make_session("cli-tail", {"activity_journal.log": b"".join(b"event %d\n" % i for i in range(10))})

    result = run_client(gateway.url, "logs", "tail", "--session", "cli-tail", "--file", "activity_journal.log",
                        "--limit", "3")

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["event 7", "event 8", "event 9"]
    assert "older lines" in result.stderr


def test_tail_json_is_a_slice(gateway):
    gateway.make_session("cli-tail-json", {"run.log": b"one\ntwo\n"})

    piece = json.loads(run_client(gateway.url, "logs", "tail", "--session", "cli-tail-json", "--json").stdout)

    assert piece["file"] == "run.log" and piece["lines"] == ["one", "two"]
    assert {"cursor", "size", "truncated", "reset", "more"} <= set(piece)


def test_tail_without_session_reads_the_gateway_log(gateway):
    gateway.get("/api/v1/health")

    result = run_client(gateway.url, "logs", "tail", "--limit", "5")

    assert result.returncode == 0, result.stderr
    assert all(json.loads(line)["event"] for line in result.stdout.splitlines())


def test_follow_prints_appended_lines_and_a_notice_after_a_reset(gateway):
    directory = gateway.make_session("cli-follow", {"run.log": b"before 1\nbefore 2\n"})
    follower = subprocess.Popen(
        [*CLIENT, "logs", "tail", "--session", "cli-follow", "--follow", "--url", gateway.url],
        env=gateway_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        output = LineReader(follower.stdout)
        output.wait_for("before 2")
        with open(directory / "run.log", "ab") as log:
            log.write(b"after 1\nafter 2\n")
        output.wait_for("after 2")

        assert gateway.post("/api/v1/ops/sessions/cli-follow/reset").status == 200
        (directory / "run.log").write_bytes(b"fresh 1\n")
        lines = output.wait_for("fresh 1")

        follower.send_signal(signal.SIGINT)  # Ctrl-C
        assert follower.wait(10) == 0
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    log_lines = [line for line in lines if not line.startswith("--")]
    assert log_lines == ["before 1", "before 2", "after 1", "after 2", "fresh 1"]
    notice = next(i for i, line in enumerate(lines) if "replaced or truncated" in line)
    assert notice < lines.index("fresh 1")

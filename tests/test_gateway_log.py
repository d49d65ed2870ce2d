"""The gateway log against floods (issue 16.4): an anonymous client must not be able to erase the
record of an authentication failure by rotating the log, nor make one record as large as its request.

The flood is the one of the issue, bounded: FLOOD_REQUESTS pipelined 404s whose paths are 511 '"'
(each one doubled by JSON escaping), against a gateway whose logs rotate at ROTATE_BYTES.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from conftest import RunningGateway, launch, wait_for

from uagw.limits import GATEWAY_LOG_BACKUPS, GATEWAY_LOG_FIELD_CHARS
from uagw.logs import log_field

TOKEN = "log-flood-test-token"
ROTATE_BYTES = 256 * 1024
FLOOD_REQUESTS = 20000
QUOTES = '"' * 511
MAX_RECORD_BYTES = 1024  # an access record: a time, a client, a method, a capped path and three numbers
LOCKOUT_FLOOD = 3000


def log_lines(directory: Path, pattern: str) -> List[str]:
    return [line for path in sorted(directory.glob(pattern)) for line in path.read_text().splitlines()]


def records(directory: Path, pattern: str) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in log_lines(directory, pattern)]


def pipeline(gateway: RunningGateway, request: bytes, count: int, timeout: float = 60.0) -> int:
    """Send ``count`` copies of ``request`` on one connection while reading; returns the answers counted."""
    marker = b"HTTP/1.1 "
    with socket.create_connection((gateway.host, gateway.port), timeout=timeout) as sock:
        sender = threading.Thread(target=sock.sendall, args=(request * count,), daemon=True)
        sender.start()
        answers, tail = 0, b""
        while answers < count:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            answers += (tail + chunk).count(marker) - tail.count(marker)
            tail = (tail + chunk)[-(len(marker) - 1):]
        sender.join(timeout)
    return answers


def wrong_token(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer wrong\r\n\r\n".encode()


def start(directory: Path) -> RunningGateway:
    return launch(directory, env={"UA_OPS_TOKEN": TOKEN, "UA_GATEWAY_LOG_ROTATE_BYTES": str(ROTATE_BYTES)})


@pytest.fixture(scope="module")
def flooded_logs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The _gateway directory of a gateway that saw one auth failure, then the flood, then stopped."""
    workspaces = tmp_path_factory.mktemp("logflood") / "workspaces"
    gateway = start(workspaces)
    try:
        assert gateway.get("/api/v1/ops/sessions", token="wrong").status == 401
        flood = f"GET /{QUOTES} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        assert pipeline(gateway, flood, FLOOD_REQUESTS) == FLOOD_REQUESTS
    finally:
        gateway.stop()
    yield workspaces / "_gateway"


def test_auth_failure_survives_a_flood_that_rotates_the_gateway_log(flooded_logs):
    assert not any(r["event"] == "auth_failure" for r in records(flooded_logs, "gateway.log*"))  # rotated away
    failures = [r for r in records(flooded_logs, "security.log") if r["event"] == "auth_failure"]
    assert [r["path"] for r in failures] == ["/api/v1/ops/sessions"]


def test_rotation_keeps_the_newest_backups_and_no_more(flooded_logs):
    rotated = sorted(p.name for p in flooded_logs.glob("gateway.log.*"))  # gateway.log itself may just have gone
    assert rotated == [f"gateway.log.{n}" for n in range(1, GATEWAY_LOG_BACKUPS + 1)]


def test_every_record_of_the_flood_is_bounded(flooded_logs):
    lines = log_lines(flooded_logs, "*.log*")
    longest = max(lines, key=len)
    assert len(longest.encode()) <= MAX_RECORD_BYTES, longest


def test_auth_failure_record_caps_a_long_path(tmp_path):
    gateway = start(tmp_path / "workspaces")
    try:
        long_path = "/api/v1/ops/sessions/" + "x" * 8000
        assert gateway.get(long_path, token="wrong").status == 401
    finally:
        gateway.stop()
    (failure,) = [line for line in log_lines(tmp_path / "workspaces" / "_gateway", "gateway.log")
                  if '"auth_failure"' in line]
    assert len(failure) <= MAX_RECORD_BYTES and "cut]" in json.loads(failure)["path"]


def test_lockout_flood_is_counted_not_written_record_by_record(tmp_path):
    gateway = start(tmp_path / "workspaces")
    try:
        assert pipeline(gateway, wrong_token("/api/v1/ops/sessions"), LOCKOUT_FLOOD) == LOCKOUT_FLOOD
    finally:
        gateway.stop()
    security = records(tmp_path / "workspaces" / "_gateway", "security.log")
    written = [r for r in security if r["event"] != "security_suppressed"]
    suppressed = sum(r["records"] for r in security if r["event"] == "security_suppressed")
    assert len(written) < 20 and len(written) + suppressed == LOCKOUT_FLOOD, security


def test_health_reports_log_records_lost_to_a_failing_disk(tmp_path):
    log_dir = tmp_path / "workspaces" / "_gateway"
    (log_dir / "gateway.log").mkdir(parents=True)  # every append now fails with EISDIR
    gateway = start(tmp_path / "workspaces")
    try:
        # the log is written every 0.1 s
        assert wait_for(lambda: gateway.get("/api/v1/health").json.get("log_dropped", 0) > 0)
    finally:
        gateway.stop()


@pytest.mark.parametrize("text", ['"' * 600, "\U0001F600" * 100, "\x00" * 300, "a" * 10000, "\udcff" * 300],
                         ids=["quotes", "emoji", "nul", "ascii", "surrogate"])
def test_log_field_bounds_the_escaped_length_and_marks_the_cut(text):
    capped = log_field(text)
    assert len(json.dumps(capped)) - 2 <= GATEWAY_LOG_FIELD_CHARS
    assert capped.endswith(f"...[{len(text)} chars, cut]") and text.startswith(capped.split("...[")[0])


def test_log_field_keeps_what_fits():
    assert log_field("/api/v1/health") == "/api/v1/health" and log_field(7) == 7 and log_field(None) is None

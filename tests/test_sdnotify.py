"""systemd integration (uagw/sdnotify.py, docs/deploy/ua-gateway.service): a live gateway tells the datagram
socket the test binds READY=1, then WATCHDOG=1 at half of WATCHDOG_USEC, then STOPPING=1, in that order;
it never fails when the socket is missing; and the unit file passes ``systemd-analyze verify``."""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

from conftest import ROOT, start_watched
from uagw.sdnotify import Notifier, watchdog_interval

UNIT = ROOT / "docs" / "deploy" / "ua-gateway.service"
WATCHDOG_USEC = 200_000  # a 0.2 s watchdog: pings every 0.1 s, so a second of the test sees about ten


@pytest.fixture
def notify_socket() -> Iterator[Tuple[socket.socket, str]]:
    """A datagram socket bound where systemd would put NOTIFY_SOCKET (a short path: sun_path holds 108 bytes)."""
    directory = tempfile.mkdtemp(prefix="uagw-notify-", dir="/tmp")
    path = os.path.join(directory, "notify")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(10)
    yield receiver, path
    receiver.close()
    shutil.rmtree(directory, ignore_errors=True)


def receive(receiver: socket.socket, count: int) -> List[Tuple[float, str]]:
    return [(time.monotonic(), receiver.recv(4096).decode()) for _ in range(count)]


def test_ready_then_watchdog_pings_at_half_the_interval_then_stopping(start_gateway, notify_socket):
    receiver, path = notify_socket
    gateway = start_gateway(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": str(WATCHDOG_USEC)})

    ready = receive(receiver, 1)[0][1]
    pings = receive(receiver, 8)
    gateway.process.terminate()
    rest = []
    while not rest or rest[-1].startswith("WATCHDOG=1"):
        rest.append(receiver.recv(4096).decode())

    assert ready.split("\n") == ["READY=1", f"STATUS=listening on {gateway.url}"]
    assert all(message == "WATCHDOG=1" for _, message in pings)
    gaps = [later - earlier for (earlier, _), (later, _) in zip(pings, pings[1:])]
    assert 0.07 <= statistics.median(gaps) <= 0.15, gaps
    assert rest[-1].split("\n")[0] == "STOPPING=1"
    assert gateway.process.wait(10) == 0


def test_an_abstract_socket_name_is_reached_in_the_abstract_namespace():
    name = f"uagw-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        receiver.settimeout(5)

        sent = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name}).ready("up")

        assert sent is True
        assert receiver.recv(4096) == b"READY=1\nSTATUS=up"


def test_a_missing_socket_is_reported_once_and_the_gateway_serves(tmp_path):
    # READY=1 and the first WATCHDOG=1 are sent, and fail, before the startup line is printed.
    gateway = start_watched(tmp_path / "workspaces",
                            env={"NOTIFY_SOCKET": str(tmp_path / "gone"), "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    try:
        statuses = [gateway.get("/api/v1/health").status for _ in range(5)]
    finally:
        code = gateway.stop()

    assert statuses == [200] * 5 and code == 0
    assert gateway.stderr.count(b"cannot notify systemd") == 1, gateway.stderr


def test_without_notify_socket_nothing_is_sent():
    assert Notifier.from_environ({}).ready("up") is False


def test_a_notify_socket_that_is_neither_a_path_nor_abstract_is_ignored(capsys):
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"})

    assert notifier.enabled is False and notifier.ready("up") is False
    assert "NOTIFY_SOCKET" in capsys.readouterr().err


@pytest.mark.parametrize("environ, expected", [
    ({"WATCHDOG_USEC": "1000000"}, 0.5),
    ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
    ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}, None),  # the watchdog is another process's
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_the_watchdog_interval_is_half_of_watchdog_usec_for_this_process_only(environ, expected):
    assert watchdog_interval(environ) == expected


def unit_settings() -> List[Tuple[str, str]]:
    return [tuple(line.split("=", 1)) for line in UNIT.read_text().splitlines()  # type: ignore[misc]
            if "=" in line and not line.startswith("#")]


def test_the_unit_is_a_hardened_notify_service_with_the_token_as_a_credential():
    settings = unit_settings()
    names = {name for name, _ in settings}

    for required in ("Type=notify", "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                     "ReadWritePaths=/var/lib/ua-gateway", "UA_OPS_TOKEN_FILE=%d/ops-token"):
        assert any(required in f"{name}={value}" for name, value in settings), required
    assert {"WatchdogSec", "LoadCredential", "User"} <= names
    assert not any("UA_OPS_TOKEN=" in value for _, value in settings)  # never the token itself


def test_the_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    # verify also loads the units the file names (network-online.target); a copy under its own name is enough
    unit = tmp_path / "ua-gateway.service"
    unit.write_bytes(UNIT.read_bytes())

    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)

    problems = [line for line in (result.stdout + result.stderr).splitlines() if "ua-gateway.service" in line]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr

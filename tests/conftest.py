"""Shared fixtures: real gateway processes on free ports, and small clients for HTTP and raw sockets.

Every server here is the real command line (``python ua_gateway.py --port 0``) in a subprocess, so the
tests exercise the same code path an operator runs, signals and exit codes included.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STARTUP_TIMEOUT = 15.0


class Reply:
    """A parsed HTTP response: status, headers (lower-case names), raw body and its JSON."""

    def __init__(self, status: int, headers: Dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.body[:200]!r})"


class RunningGateway:
    """A gateway subprocess and the means to talk to it."""

    def __init__(self, process: subprocess.Popen, host: str, port: int, workspaces: Path, startup_line: str) -> None:
        self.process = process
        self.host = host
        self.port = port
        self.workspaces = workspaces
        self.startup_line = startup_line
        self.url = f"http://{host}:{port}"
        self.ws_url = f"ws://{host}:{port}"

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: Optional[Dict[str, str]] = None,
        token: Optional[str] = None,
        timeout: float = 10.0,
    ) -> Reply:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            all_headers = dict(headers or {})
            if token is not None:
                all_headers["Authorization"] = f"Bearer {token}"
            data = None
            if body is not None:
                data = body if isinstance(body, (bytes, str)) else json.dumps(body)
                all_headers.setdefault("Content-Type", "application/json")
            connection.request(method, path, body=data, headers=all_headers)
            response = connection.getresponse()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            connection.close()

    def get(self, path: str, **kwargs: Any) -> Reply:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Reply:
        return self.request("POST", path, body=body, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Reply:
        return self.request("DELETE", path, **kwargs)

    def raw(self, data: bytes, timeout: float = 5.0, read_until_close: bool = True) -> bytes:
        """Send raw bytes and return everything received until the server closes (or the timeout)."""
        with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
            sock.sendall(data)
            return read_all(sock, timeout, read_until_close)

    def make_session(self, session_id: str, files: Optional[Dict[str, bytes]] = None) -> Path:
        directory = self.workspaces / session_id
        directory.mkdir(parents=True, exist_ok=True)
        for name, content in (files or {}).items():
            path = directory / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        return directory

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        return self.process.returncode


def read_all(sock: socket.socket, timeout: float = 5.0, until_close: bool = True) -> bytes:
    sock.settimeout(timeout)
    chunks: List[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        if not until_close and b"\r\n\r\n" in b"".join(chunks):
            break
    return b"".join(chunks)


def parse_responses(data: bytes) -> List[Tuple[int, Dict[str, str], bytes]]:
    """Split raw bytes holding one or more HTTP/1.1 responses with Content-Length bodies."""
    responses = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        responses.append((status, headers, rest[:length]))
        data = rest[length:]
    return responses


def gateway_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("UA_")}
    env.update(extra or {})
    return env


def launch(
    workspaces: Path,
    *args: str,
    env: Optional[Dict[str, str]] = None,
    cwd: Optional[Path] = None,
    command: Optional[List[str]] = None,
) -> RunningGateway:
    cmd = command or [sys.executable, str(ROOT / "ua_gateway.py")]
    cmd = cmd + ["--port", "0", "--workspaces", str(workspaces), *args]
    process = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=gateway_env(env),
        cwd=str(cwd or workspaces.parent),
    )
    line = read_startup_line(process)
    match = re.search(r"http://(\[[^\]]+\]|[^\s:]+):(\d+)", line)
    if not match:
        process.kill()
        raise AssertionError(f"no startup line with http://HOST:PORT: {line!r} stderr={process.stderr.read()!r}")
    host = match.group(1).strip("[]")
    return RunningGateway(process, host, int(match.group(2)), workspaces, line)


def read_startup_line(process: subprocess.Popen) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + STARTUP_TIMEOUT
    buffer = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.1)
        if ready:
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                break
            buffer += chunk
            if b"\n" in buffer:
                return buffer.split(b"\n", 1)[0].decode()
        elif process.poll() is not None:
            break
    err = process.stderr.read().decode() if process.poll() is not None and process.stderr else ""
    process.kill()
    raise AssertionError(f"gateway did not start: stdout={buffer!r} stderr={err!r}")


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Any]:
    """Start gateways with custom flags or environment; all are stopped after the test."""
    started: List[RunningGateway] = []

    def start(*args: str, env: Optional[Dict[str, str]] = None, workspaces: Optional[Path] = None) -> RunningGateway:
        gateway = launch(workspaces or tmp_path / "workspaces", *args, env=env)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    """One open (no token) gateway shared by a test module; tests use their own session ids."""
    running = launch(tmp_path_factory.mktemp("gw") / "workspaces")
    yield running
    running.stop()

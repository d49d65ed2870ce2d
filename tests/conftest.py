"""What the tests share, in one module: real gateway processes on free ports, small clients for HTTP and
raw sockets, the request parser fed in process, and polling helpers.

Every server here is the real command line (``python ua_gateway.py --port 0``) in a subprocess, so the
tests exercise the same code path an operator runs, signals and exit codes included. What is about
parsing, not sockets, feeds ``RequestParser`` bytes in process instead (``parse_stream``).
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import re
import select
import signal
import socket
import stat
import struct
import subprocess
import threading
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest
from websockets.exceptions import ConnectionClosed

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ops_service import OpsService  # noqa: E402
from uagw.http11 import HttpError, Request, RequestParser  # noqa: E402

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
            headers = {k.lower(): v for k, v in response.getheaders()}
            if headers.get("content-type", "").startswith("text/event-stream"):
                return Reply(response.status, headers, b"")  # a stream never ends by itself (tests/sse.py reads one)
            return Reply(response.status, headers, response.read())
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


def parse_stream(data: bytes, cuts: Sequence[int] = ()) -> Tuple[List[Request], Optional[HttpError]]:
    """Feed ``data`` to a fresh ``RequestParser``, split at ``cuts`` (in one piece without): the requests
    parsed, and the error that ended the stream, if any."""
    parser = RequestParser()
    requests: List[Request] = []
    bounds = sorted({min(max(cut, 0), len(data)) for cut in cuts} | {0, len(data)})
    for start, stop in zip(bounds, bounds[1:] or [len(data)]):
        parser.feed(data[start:stop])
        while True:
            try:
                request = parser.next_request()
            except HttpError as error:
                return requests, error
            if request is None:
                break
            requests.append(request)
    return requests, None


def assert_refused(data: bytes, status: int = 400) -> HttpError:
    """The first request of ``data`` is refused with ``status``, and the connection must close."""
    requests, error = parse_stream(data)
    assert not requests and error is not None, f"accepted {[(r.method, r.target, r.body) for r in requests]!r}"
    assert (error.status, error.close) == (status, True), error.detail
    return error


def serve_embedded(workspaces: Path, agent: Any, scenario: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run ``scenario(gateway)`` against an embedded ``Gateway`` (real sockets, port 0) that runs
    ``agent``; the gateway is stopped whatever happens."""
    from ua_gateway import Config, Gateway

    async def main() -> Any:
        gateway = Gateway(Config(port=0, workspaces=workspaces), agent=agent)
        await gateway.start()
        try:
            return await scenario(gateway)
        finally:
            await gateway.stop()

    return asyncio.run(main())


def wait_for(condition: Callable[[], Any], timeout: float = 5.0, interval: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something true (returned) or ``timeout`` s pass (its last value)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result or time.monotonic() >= deadline:
            return result
        time.sleep(interval)


def rss_kib(pid: int) -> int:
    """Resident memory of process ``pid`` in KiB."""
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS")).split()[1])


def rss_mib(pid: int) -> int:
    return rss_kib(pid) // 1024


# -- WebSocket clients (websockets' asyncio client) and agent commands --------------------------------------


def run(coro: Any, timeout: float = 60) -> Any:
    """Run a client scenario to its end, failing after ``timeout`` s."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def recv(ws: Any, timeout: float = 10.0) -> Dict[str, Any]:
    """The next frame, parsed as JSON."""
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def recv_until(ws: Any, kind: str, timeout: float = 20.0) -> List[Dict[str, Any]]:
    """Frames up to and including the first of type ``kind``."""
    frames = []
    deadline = time.monotonic() + timeout
    while True:
        frame = await recv(ws, max(0.1, deadline - time.monotonic()))
        frames.append(frame)
        if frame["type"] == kind:
            return frames


async def closed_with(ws: Any, timeout: float = 10.0) -> Tuple[int, str]:
    """Read until the server closes; its close code and reason (fails on a timeout)."""
    try:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    except ConnectionClosed as exc:
        return (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (1006, "")


async def close_code(ws: Any, timeout: float = 10.0) -> int:
    return (await closed_with(ws, timeout))[0]


def execute(text: str, **extra: Any) -> str:
    """An ``execute`` message asking for a turn on ``text``."""
    return json.dumps({"type": "execute", "data": {"user_input": text, **extra}})


def write_agent(tmp_path: Path, name: str, body: str) -> str:
    """An agent command running the Python ``body`` (dedented); the value of --agent-cmd."""
    script = tmp_path / f"{name}.py"
    script.write_text(textwrap.dedent(body))
    return f"{sys.executable} {script}"


# -- raw WebSocket frames ----------------------------------------------------------------------------------


def ws_frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, mask: bool = True,
             length: Optional[int] = None, key: bytes = b"\x01\x02\x03\x04") -> bytes:
    """One frame as a client would send it (RFC 6455 §5.2), masked with ``key`` unless ``mask`` is False;
    ``length`` lies about the payload size."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload) if length is None else length
    if n < 126:
        head = bytes([first, (0x80 if mask else 0) | n])
    elif n < 1 << 16:
        head = bytes([first, (0x80 if mask else 0) | 126]) + struct.pack(">H", n)
    else:
        head = bytes([first, (0x80 if mask else 0) | 127]) + struct.pack(">Q", n)
    if not mask:
        return head + payload
    if not payload:
        return head + key
    stream = (key * (len(payload) // 4 + 1))[: len(payload)]
    masked = int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")
    return head + key + masked.to_bytes(len(payload), "big")


def close_frame(code: Optional[int], reason: bytes = b"") -> bytes:
    return ws_frame(0x8, b"" if code is None else struct.pack(">H", code) + reason)


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


# -- gateways whose stderr is kept, and tree snapshots (the hostile, fault and load suites) ------------------
#
# ``launch`` pipes the gateway's stderr and never reads it; a gateway that logs a lot (an exception per
# hostile request, say) would block once the pipe fills. ``start_watched`` drains it on a thread, so the
# suites can also assert that nothing was logged as a traceback.

TRACEBACK_MARKERS = (b"Traceback", b'File "')


class WatchedGateway:
    """A ``RunningGateway`` plus everything it wrote to stderr."""

    def __init__(self, running: RunningGateway) -> None:
        self.running = running
        self._stderr: List[bytes] = []
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.running, name)

    def _drain(self) -> None:
        stream = self.running.process.stderr
        assert stream is not None
        while True:
            chunk = os.read(stream.fileno(), 65536)
            if not chunk:
                return
            self._stderr.append(chunk)

    @property
    def stderr(self) -> bytes:
        return b"".join(self._stderr)

    def tracebacks(self) -> str:
        """The gateway's stderr if it holds a traceback, else an empty string."""
        text = self.stderr
        return text.decode("utf-8", "replace") if any(m in text for m in TRACEBACK_MARKERS) else ""

    def kill(self) -> None:
        """SIGKILL, no grace: what a crash or the OOM killer does."""
        if self.running.process.poll() is None:
            self.running.process.send_signal(signal.SIGKILL)
        self.running.process.wait(10)
        self._thread.join(5)
        for stream in (self.running.process.stdout, self.running.process.stderr):
            if stream is not None:
                stream.close()

    def stop(self) -> int:
        # Close stderr only once the drain thread has seen its end, or it would read a closed fd.
        process = self.running.process
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except Exception:
                process.kill()
                process.wait()
        self._thread.join(5)
        return self.running.stop()


def start_watched(workspaces: Path, *args: str, env: Optional[Dict[str, str]] = None) -> WatchedGateway:
    return WatchedGateway(launch(workspaces, *args, env=env))


Snapshot = Dict[str, Tuple[str, int, str]]


def snapshot_tree(top: Path, skip: Optional[Path] = None) -> Snapshot:
    """Every entry under ``top`` (``skip`` excluded) with its kind, mode and content hash (or link target)."""
    result: Snapshot = {}
    for directory, dirs, files in os.walk(top, followlinks=False):
        if skip is not None and Path(directory) == skip:
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if skip is None or Path(directory, d) != skip]
        for name in dirs + files:
            path = Path(directory, name)
            st = path.lstat()
            rel = str(path.relative_to(top))
            if stat.S_ISLNK(st.st_mode):
                result[rel] = ("link", st.st_mode, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                result[rel] = ("dir", st.st_mode, "")
            else:
                result[rel] = ("file", st.st_mode, hashlib.sha256(path.read_bytes()).hexdigest())
    return result


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An empty workspaces root."""
    path = tmp_path / "root"
    path.mkdir()
    return path


@pytest.fixture
def svc(root: Path) -> OpsService:
    """An OpsService on ``root``, the root made ready."""
    service = OpsService(root)
    service.ensure_root()
    return service


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

"""PROTOCOL.md §1: starting, configuration, exposure refusal, and graceful shutdown, on the real command line."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time

from conftest import ROOT, gateway_env, launch, parse_responses, read_all

import ua_gateway


def run_cli(*args: str, env=None, timeout: float = 15.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "ua_gateway.py"), *args],
        capture_output=True,
        text=True,
        env=gateway_env(env),
        timeout=timeout,
    )


def test_version_prints_name_and_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"ua-gateway {ua_gateway.__version__}"


def test_version_is_written_once_and_pyproject_reads_it():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert not re.search(r'^version = "', pyproject, re.M)
    assert re.search(r'^version = \{ attr = "uagw.__version__" \}', pyproject, re.M)
    written = [path.name for path in (ROOT / "uagw").glob("*.py") if "__version__ = " in path.read_text()]
    assert written == ["__init__.py"]


def test_help_lists_flags_and_environment():
    result = run_cli("--help")
    assert result.returncode == 0
    for word in ("--host", "--port", "--workspaces", "--agent-cmd", "--insecure", "UA_OPS_TOKEN", "UA_WORKSPACES_DIR"):
        assert word in result.stdout
    # README and PROTOCOL §1 promise that --help names Universal Agent's variables too.
    text = " ".join(result.stdout.split())
    for word in ("UA_OPS_TOKEN_FILE", "UA_INTERNAL_API_TOKEN", "DEFAULT_USER_ID", "UA_SESSION_CREATE_RATE",
                 "UA_GATEWAY_LOG_ROTATE_BYTES", "usage: ua-gateway"):
        assert word in text


def test_port_zero_binds_a_free_port_and_prints_its_url(tmp_path):
    gateway = launch(tmp_path / "ws")
    try:
        assert re.search(rf"http://127\.0\.0\.1:{gateway.port}\b", gateway.startup_line)
        assert gateway.port != 0
        assert gateway.get("/api/v1/health").status == 200
    finally:
        assert gateway.stop() == 0


def test_defaults_create_the_workspaces_root_in_the_working_directory(tmp_path):
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "ua_gateway.py"), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(tmp_path), env=gateway_env(),
    )
    try:
        from conftest import read_startup_line

        line = read_startup_line(process)
        assert "127.0.0.1" in line
        assert (tmp_path / "AGENT_RUN_WORKSPACES").is_dir()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0


def test_environment_sets_host_port_and_workspaces(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "ua_gateway.py")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(tmp_path),
        env=gateway_env({"UA_GATEWAY_HOST": "127.0.0.1", "UA_GATEWAY_PORT": str(port),
                         "UA_WORKSPACES_DIR": str(tmp_path / "from-env")}),
    )
    try:
        from conftest import read_startup_line

        assert f"http://127.0.0.1:{port}" in read_startup_line(process)
        assert (tmp_path / "from-env").is_dir()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0


def test_flags_override_environment(tmp_path):
    gateway = launch(tmp_path / "flag-ws", env={"UA_WORKSPACES_DIR": str(tmp_path / "env-ws")})
    try:
        assert (tmp_path / "flag-ws").is_dir()
        assert not (tmp_path / "env-ws").exists()
    finally:
        gateway.stop()


def test_non_loopback_bind_without_token_is_refused_with_advice(tmp_path):
    result = run_cli("--host", "0.0.0.0", "--port", "0", "--workspaces", str(tmp_path / "ws"))
    assert result.returncode == 2
    assert "UA_OPS_TOKEN" in result.stderr
    assert "--insecure" in result.stderr
    assert not (tmp_path / "ws").exists()


def test_non_loopback_bind_with_insecure_flag_starts(tmp_path):
    gateway = launch(tmp_path / "ws", "--host", "0.0.0.0", "--insecure")
    try:
        reply = gateway.request("GET", "/api/v1/health") if gateway.host != "0.0.0.0" else None
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
            sock.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert parse_responses(read_all(sock))[0][0] == 200
        assert reply is None or reply.status == 200
    finally:
        assert gateway.stop() == 0


def test_non_loopback_bind_with_token_starts(tmp_path):
    gateway = launch(tmp_path / "ws", "--host", "0.0.0.0", env={"UA_OPS_TOKEN": "s3cret-token"})
    assert gateway.stop() == 0


def test_invalid_allow_from_entry_is_a_usage_error(tmp_path):
    result = run_cli("--port", "0", "--workspaces", str(tmp_path / "ws"), env={"UA_OPS_ALLOW_FROM": "10.0.0.0/8,nonsense"})
    assert result.returncode == 2
    assert "nonsense" in result.stderr


def test_sigterm_lets_a_request_in_flight_finish_then_exits_0(tmp_path):
    gateway = launch(tmp_path / "ws")
    sock = socket.create_connection((gateway.host, gateway.port), timeout=10)
    try:
        body = b'{"user_id": "me"}'
        sock.sendall(b"POST /api/v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])
        time.sleep(0.3)
        gateway.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert gateway.process.poll() is None, "the gateway must wait for the request in flight"
        sock.sendall(body[5:])
        responses = parse_responses(read_all(sock, timeout=10))
        assert responses and responses[0][0] == 200
        assert responses[0][1].get("connection") == "close"
    finally:
        sock.close()
    assert gateway.process.wait(10) == 0


def test_sigterm_gives_up_on_a_stalled_request_within_the_grace_period(tmp_path):
    grace = 1.0  # stands for the default 5 s
    gateway = launch(tmp_path / "ws", "--shutdown-grace", str(grace))
    sock = socket.create_connection((gateway.host, gateway.port), timeout=10)
    try:
        sock.sendall(b"POST /api/v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{")
        time.sleep(0.3)
        started = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        assert gateway.process.wait(15) == 0
        assert time.monotonic() - started < grace + 3
    finally:
        sock.close()


def test_sigint_stops_with_status_0(tmp_path):
    gateway = launch(tmp_path / "ws")
    assert gateway.get("/api/v1/health").status == 200
    assert gateway.stop(signal.SIGINT) == 0


def test_port_in_use_is_reported_clearly(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [sys.executable, str(ROOT / "ua_gateway.py"), "--port", str(port), "--workspaces", str(tmp_path / "ws")],
            capture_output=True, text=True, env=gateway_env(), timeout=15,
        )
    assert result.returncode == 1
    assert "--port" in result.stderr


def test_an_unusable_workspaces_root_exits_2_naming_the_root_not_the_port(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    result = run_cli("--port", "0", "--workspaces", str(blocker / "root"))
    assert result.returncode == 2
    assert "workspaces root" in result.stderr and str(blocker / "root") in result.stderr
    assert "--port" not in result.stderr


def test_a_relative_agent_command_is_found_from_where_the_gateway_starts(tmp_path):
    import asyncio
    import json

    import websockets

    (tmp_path / "agent.sh").write_text('#!/bin/sh\nread line\necho \'{"type": "text", "data": {"text": "from agent.sh"}}\'\n')
    (tmp_path / "agent.sh").chmod(0o755)
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "ua_gateway.py"), "--port", "0", "--workspaces", "ws", "--agent-cmd", "./agent.sh"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(tmp_path), env=gateway_env(),
    )
    try:
        line = process.stdout.readline().decode()
        url = re.search(r"http://([^\s]+)", line).group(1)

        async def turn():
            async with websockets.connect(f"ws://{url}/ws/agent", open_timeout=5) as ws:
                await ws.send(json.dumps({"type": "execute", "data": {"user_input": "go"}}))
                frames = []
                while not frames or frames[-1]["type"] != "query_complete":
                    frames.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
                return frames

        texts = [f["data"]["text"] for f in asyncio.run(turn()) if f["type"] == "text"]
        assert texts == ["from agent.sh"]
    finally:
        process.terminate()
        process.wait(15)


def test_a_missing_relative_agent_command_exits_2_naming_it(tmp_path):
    result = run_cli("--port", "0", "--workspaces", str(tmp_path / "ws"), "--agent-cmd", "./nope.sh --flag")
    assert result.returncode == 2
    assert "nope.sh" in result.stderr and "not found" in result.stderr

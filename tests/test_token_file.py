"""Keeping the token from the agent: UA_OPS_TOKEN_FILE, agent environments, and a non-dumpable gateway.

An agent command runs as the gateway's user. It used to be able to read the token from
/proc/<gateway pid>/environ. Now the token can come from a file (UA_OPS_TOKEN_FILE, the ``_FILE``
convention of container secrets and systemd credentials) and so never be in an environment; the
gateway marks itself non-dumpable, so a process of the same user cannot read its environment (or its
memory) either way; and no token variable is handed on to agent commands.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from conftest import ROOT, gateway_env, launch
from ua_gateway import Config, ConfigError
from uagw.limits import MAX_SECRET_FILE_BYTES

TOKEN = "token-file-secret-4d2a"
STARTUP_TIMEOUT = 10.0
PR_CAPBSET_DROP = 24  # <linux/prctl.h>
CAP_LAST = 63  # capability numbers fit in 64 bits; dropping one this kernel lacks fails harmlessly (EINVAL)

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and prctl are Linux's")


def token_file(tmp_path: Path, content: str) -> Path:
    path = tmp_path / "ua_ops_token"
    path.write_text(content)
    return path


def start_expecting_failure(tmp_path: Path, env: dict) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "ua_gateway.py"), "--port", "0", "--workspaces", str(tmp_path / "ws")]
    return subprocess.run(command, env=gateway_env(env), capture_output=True, text=True, timeout=STARTUP_TIMEOUT)


# --- UA_OPS_TOKEN_FILE -----------------------------------------------------------------------------------


def test_token_is_read_from_the_file_named_by_ua_ops_token_file(start_gateway, tmp_path):
    gateway = start_gateway(env={"UA_OPS_TOKEN_FILE": str(token_file(tmp_path, TOKEN + "\n"))})

    assert gateway.get("/api/v1/ops/sessions").status == 401
    assert gateway.get("/api/v1/ops/sessions", token=TOKEN).status == 200


def test_surrounding_whitespace_in_the_file_is_not_part_of_the_token(tmp_path):
    path = token_file(tmp_path, f"  {TOKEN}\r\n\n")

    assert Config.from_env({"UA_OPS_TOKEN_FILE": str(path)}).token == TOKEN


def test_empty_token_file_stops_startup_with_exit_2(tmp_path):
    path = token_file(tmp_path, " \n")

    result = start_expecting_failure(tmp_path, {"UA_OPS_TOKEN_FILE": str(path)})

    assert result.returncode == 2
    assert "UA_OPS_TOKEN_FILE" in result.stderr and "empty" in result.stderr and str(path) in result.stderr


def test_unreadable_token_file_stops_startup_with_exit_2_naming_it(tmp_path, monkeypatch):
    # A relative path, short whatever the temporary directory: the message shows a long path cut short.
    monkeypatch.chdir(tmp_path)
    missing = Path("no-such-token")

    result = start_expecting_failure(tmp_path, {"UA_OPS_TOKEN_FILE": str(missing)})

    assert result.returncode == 2
    assert "UA_OPS_TOKEN_FILE" in result.stderr and str(missing) in result.stderr
    assert "No such file or directory" in result.stderr


def test_token_and_token_file_together_stop_startup_with_exit_2(tmp_path):
    path = token_file(tmp_path, TOKEN)

    result = start_expecting_failure(tmp_path, {"UA_OPS_TOKEN": TOKEN, "UA_OPS_TOKEN_FILE": str(path)})

    assert result.returncode == 2
    assert "UA_OPS_TOKEN and UA_OPS_TOKEN_FILE" in result.stderr


def test_a_token_file_over_the_limit_is_refused(tmp_path):
    path = token_file(tmp_path, "x" * (MAX_SECRET_FILE_BYTES + 1))

    with pytest.raises(ConfigError, match="UA_OPS_TOKEN_FILE .* over"):
        Config.from_env({"UA_OPS_TOKEN_FILE": str(path)})


def test_agent_commands_get_no_token_variable(start_gateway, tmp_path):
    snoop = tmp_path / "snoop.py"
    snoop.write_text(
        "import json, os, sys\n"
        "sys.stdin.readline()\n"
        "names = sorted(name for name in os.environ if 'TOKEN' in name)\n"
        "print(json.dumps({'type': 'text', 'data': {'text': ' '.join(names) or 'none'}}), flush=True)\n"
    )
    path = token_file(tmp_path, TOKEN)
    gateway = start_gateway("--agent-cmd", f"{sys.executable} {snoop}", env={"UA_OPS_TOKEN_FILE": str(path)})
    gateway.make_session("snoop")

    async def turn() -> str:
        async with connect(f"{gateway.ws_url}/api/v1/sessions/snoop/stream", open_timeout=5,
                           additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
            await asyncio.wait_for(ws.recv(), 10)  # connected
            await ws.send(json.dumps({"type": "execute", "data": {"user_input": "go"}}))
            while True:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if frame["type"] == "text":
                    return frame["data"]["text"]

    assert asyncio.run(turn()) == "none"


# --- the gateway's own environment ------------------------------------------------------------------------

# Runs the rest of its command line with no capabilities. Processes of the test's user are then what
# they are for an ordinary user: root keeps CAP_SYS_PTRACE (and CAP_SYS_ADMIN, CAP_PERFMON), which read
# any environ, and Linux lets a process read another's only if it has all the capabilities the other
# has. An ordinary user has none to drop (EPERM, ignored).
WITHOUT_CAPABILITIES = [sys.executable, "-c", """
import ctypes, os, sys
for capability in range(%d):
    ctypes.CDLL(None).prctl(%d, capability, 0, 0, 0)
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
""" % (CAP_LAST + 1, PR_CAPBSET_DROP)]

READER = """
import sys
status = open("/proc/self/status").read()
if int(next(line for line in status.splitlines() if line.startswith("CapEff:")).split()[1], 16):
    sys.exit(4)  # still privileged: it could read any process, and the test would say nothing
try:
    sys.stdout.buffer.write(open("/proc/%s/environ" % sys.argv[1], "rb").read())
except PermissionError:
    sys.exit(3)
"""


def read_environ(pid: int) -> subprocess.CompletedProcess:
    """Read /proc/<pid>/environ from an unprivileged process of this user (exit 3: refused)."""
    result = subprocess.run([*WITHOUT_CAPABILITIES, "-c", READER, str(pid)], capture_output=True,
                            timeout=STARTUP_TIMEOUT)
    if result.returncode == 4:
        pytest.skip("cannot run a process without capabilities here")
    return result


def wait_until_unprivileged(pid: int, timeout: float = STARTUP_TIMEOUT) -> bool:
    """Whether process ``pid`` runs its final command (``sys.stdin.read()``) with no capabilities."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = open(f"/proc/{pid}/status").read()
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            return False
        effective = next(line for line in status.splitlines() if line.startswith("CapEff:")).split()[1]
        if int(effective, 16) == 0 and b"sys.stdin.read()" in cmdline:
            return True
        time.sleep(0.01)
    return False


@linux_only
def test_a_process_of_the_same_user_cannot_read_the_gateways_environment(tmp_path):
    gateway = launch(tmp_path / "ws", env={"UA_OPS_TOKEN": TOKEN},
                     command=[*WITHOUT_CAPABILITIES, str(ROOT / "ua_gateway.py")])
    ordinary = subprocess.Popen([*WITHOUT_CAPABILITIES, "-c", "import sys; sys.stdin.read()"],
                                stdin=subprocess.PIPE, env=gateway_env({"UA_OPS_TOKEN": TOKEN}))
    try:
        # Until it has dropped its capabilities and exec'd, the child is a copy of this privileged test
        # process, which the unprivileged reader may not read: wait for that, not for luck.
        assert wait_until_unprivileged(ordinary.pid), "the ordinary process never dropped its capabilities"
        assert TOKEN.encode() in read_environ(ordinary.pid).stdout, "the reader must read an ordinary process"

        result = read_environ(gateway.process.pid)
    finally:
        ordinary.communicate(timeout=STARTUP_TIMEOUT)
        gateway.stop()

    assert result.returncode == 3, result.stdout
    assert TOKEN.encode() not in result.stdout

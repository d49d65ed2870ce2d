"""Every timeout and limit of Config is a finite number above 0 (or 0 where 0 has a documented
meaning); anything else is refused at start, exit 2, with a message naming the flag and what it takes.

A timeout of 0, NaN or infinity once turned its deadline off silently (`--keepalive-timeout 0`).
The flags are walked from the gateway's own argument parser: every numeric flag but --port.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ua_gateway  # noqa: E402
import uagw.cli  # noqa: E402
from conftest import gateway_env  # noqa: E402

BAD_NUMBERS = ("0", "-1", "nan", "inf", "-inf")
BAD_WHOLE_NUMBERS = ("0", "-1")  # argparse's int() already refuses nan and inf


def limit_flags() -> List[Tuple[str, str]]:
    """(flag, bad value) for every numeric flag of the gateway but --port (where 0 picks a free port)."""
    cases = []
    for action in uagw.cli.build_arg_parser()._actions:
        if action.type in (int, float) and action.dest != "port":
            bad = BAD_NUMBERS if action.type is float else BAD_WHOLE_NUMBERS
            cases += [(action.option_strings[0], value) for value in bad]
    return cases


@pytest.mark.parametrize("flag,value", limit_flags())
def test_a_limit_flag_that_is_not_a_finite_number_above_0_exits_2_naming_the_flag(tmp_path, capsys, flag, value):
    # In-process: the command line's own main() refuses before it serves (one subprocess below shows
    # that the refusal is the process's exit status).
    status = uagw.cli.main(["--port", "0", "--workspaces", str(tmp_path / "ws"), f"{flag}={value}"])
    stderr = capsys.readouterr().err
    assert status == 2, stderr
    assert flag in stderr and f"not {value}" in stderr, stderr
    assert "Traceback" not in stderr


def test_a_refused_limit_flag_is_the_exit_status_of_the_process(tmp_path):
    process = subprocess.run(
        [sys.executable, str(ROOT / "ua_gateway.py"), "--port", "0", "--workspaces", str(tmp_path / "ws"),
         "--keepalive-timeout=0"],
        capture_output=True, text=True, env=gateway_env(), timeout=20,
    )
    assert process.returncode == 2, process.stdout + process.stderr
    assert "--keepalive-timeout" in process.stderr and "not 0" in process.stderr, process.stderr
    assert "Traceback" not in process.stderr


def test_the_walk_finds_the_timeout_flags():
    flags = {flag for flag, _ in limit_flags()}
    assert {"--keepalive-timeout", "--send-stall-timeout", "--max-connections", "--header-timeout", "--body-timeout",
            "--ws-ping-interval", "--ws-ping-timeout", "--ws-close-timeout", "--agent-kill-grace",
            "--shutdown-grace"} <= flags


def test_every_timeout_of_config_is_checked():
    checked = {attribute for attribute, *_ in ua_gateway.Config.LIMITS}
    assert {"keepalive_timeout", "header_timeout", "body_timeout", "close_linger", "send_stall_timeout",
            "ws_ping_interval", "ws_ping_timeout", "ws_close_timeout", "agent_kill_grace", "shutdown_grace"} <= checked


@pytest.mark.parametrize("name", ["keepalive_timeout", "header_timeout", "body_timeout", "close_linger",
                                  "send_stall_timeout", "ws_ping_interval", "ws_ping_timeout", "ws_close_timeout",
                                  "agent_kill_grace", "shutdown_grace"])
@pytest.mark.parametrize("value", [0, -1.0, math.nan, math.inf])
def test_an_embedded_config_refuses_a_timeout_that_turns_the_deadline_off(tmp_path, name, value):
    with pytest.raises(ua_gateway.ConfigError, match=name.replace("_", " ")):
        ua_gateway.Config(port=0, workspaces=tmp_path / "ws", **{name: value})

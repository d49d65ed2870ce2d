"""The command line of a source checkout on a Python without websockets (README "Run from a source
checkout"): only serving needs websockets, so --help, --version and the client commands work, and serving
says what to do. Also: the top-level help lists every client command, read from the client's parser."""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest

from conftest import ROOT

import ua_client
from uagw.cli import build_arg_parser

NO_WEBSOCKETS_CHECK = "import importlib.util, sys; sys.exit(importlib.util.find_spec('websockets') is not None)"


def pythons_without_websockets() -> List[str]:
    """CPython 3.9 and 3.13 (the supported ends) under ~/.pyenv, when present: they have no packages."""
    versions = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    found = [python for minor in (9, 13) for python in sorted(glob.glob(str(versions / f"3.{minor}*" / "bin" / "python3")))[:1]]
    return found or [pytest.param(None, marks=pytest.mark.skip(reason="no CPython 3.9 or 3.13 under ~/.pyenv/versions"))]


def run_isolated(python: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    if subprocess.run([python, "-I", "-c", NO_WEBSOCKETS_CHECK]).returncode != 0:
        pytest.skip(f"{python} has websockets installed")
    return subprocess.run([python, "-I", str(ROOT / "ua_gateway.py"), *args], capture_output=True, text=True,
                          cwd=cwd, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, timeout=30)


@pytest.mark.parametrize("python", pythons_without_websockets())
@pytest.mark.parametrize("args", [["--help"], ["--version"], ["audit", "--help"], ["sessions", "watch", "--help"]],
                         ids=" ".join)
def test_the_command_line_runs_without_websockets(python, args, tmp_path):
    result = run_isolated(python, *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "websockets" not in result.stderr


@pytest.mark.parametrize("python", pythons_without_websockets())
def test_serving_without_websockets_says_what_to_install(python, tmp_path):
    result = run_isolated(python, "--port", "0", cwd=tmp_path)
    assert result.returncode == 1
    assert "ua-gateway needs websockets 15.0.1 to serve: pip install websockets==15.0.1" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "workspaces").exists(), "nothing is created before the check"


def subcommands(parser: argparse.ArgumentParser) -> Dict[str, argparse.ArgumentParser]:
    return {name: sub for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name, sub in action.choices.items()}


def client_commands() -> List[str]:
    """Every client command as '<command>' or '<command> <action>', from the client's own parser."""
    return [f"{command} {action}".strip() for command, parser in subcommands(ua_client.build_parser()).items()
            for action in (subcommands(parser) or [""])]


def test_top_level_help_lists_every_client_command():
    help_text = " ".join(build_arg_parser().format_help().split())
    for command in client_commands():
        name, _, action = command.partition(" ")
        assert f"'{name}" in help_text and (not action or action in help_text), (command, help_text)


"""ua-gateway installs like any Python tool: ``pip install .`` into a fresh virtual environment gives
the ``ua-gateway`` command, ``python -m ua_gateway`` and ``python -m uagw``, and the installed gateway
serves its console, read as package data.

Offline after CI's pip step: both wheels are built here without build isolation, with the setuptools
of the interpreter running the tests (a test extra): the project's from a copy of the files the build
takes, websockets' from the pinned sdist zipapp_build.py fetches and verifies (pure Python:
BUILD_EXTENSION=no). The venv then installs from those two wheels only (``--no-index``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

import ua_gateway
import zipapp_build
from conftest import ROOT, launch

pytest.importorskip("setuptools", reason="building the wheels needs setuptools>=61 (a test extra)")

PIP_TIMEOUT_S = 300


def run(command: List[str], cwd: Path, env: Dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, cwd=str(cwd), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=PIP_TIMEOUT_S)
    assert proc.returncode == 0, f"{command} exited {proc.returncode}:\n{proc.stdout.decode(errors='replace')}"
    return proc


def clean_env() -> Dict[str, str]:
    """The environment without anything that would point Python or pip elsewhere."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV", "UA_"))}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", BUILD_EXTENSION="no")
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The bin/ directory of a fresh venv (no system site-packages) with ua-gateway installed."""
    scratch = tmp_path_factory.mktemp("install")
    env = clean_env()
    source = scratch / "source"  # a copy: building in the checkout would leave build/ and egg-info there
    source.mkdir()
    for module in zipapp_build.APP_MODULES + ("pyproject.toml",):
        shutil.copy2(ROOT / module, source / module)
    for package in zipapp_build.APP_PACKAGES:
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = scratch / "wheels"
    for what in (source, zipapp_build.fetch_websockets()):
        run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
             "-w", str(wheels), str(what)], scratch, env)
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(str(scratch / "venv"))
    bin_dir = scratch / "venv" / "bin"
    run([str(bin_dir / "python"), "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(wheels),
         "ua-gateway"], scratch, env)
    yield bin_dir


def test_installed_command_prints_the_version(installed: Path, tmp_path: Path):
    proc = run([str(installed / "ua-gateway"), "--version"], tmp_path, clean_env())
    assert proc.stdout.decode().strip() == f"ua-gateway {ua_gateway.__version__}"


@pytest.mark.parametrize("module", ["ua_gateway", "uagw"])
def test_python_dash_m_runs_the_installed_gateway(installed: Path, tmp_path: Path, module: str):
    proc = run([str(installed / "python"), "-I", "-m", module, "--version"], tmp_path, clean_env())
    assert proc.stdout.decode().strip() == f"ua-gateway {ua_gateway.__version__}"


def test_installed_modules_come_from_the_venv_not_the_checkout(installed: Path, tmp_path: Path):
    script = "import ua_gateway, uagw.app; print(ua_gateway.__file__); print(uagw.app.__file__)"
    proc = run([str(installed / "python"), "-I", "-c", script], tmp_path, clean_env())
    for path in proc.stdout.decode().split():
        assert Path(path).resolve().is_relative_to(installed.parent.resolve()), path


def test_installed_gateway_serves_the_console_page(installed: Path, tmp_path: Path):
    running = launch(tmp_path / "workspaces", command=[str(installed / "ua-gateway")], cwd=tmp_path)
    try:
        reply = running.get("/")
        assert reply.status == 200
        assert reply.headers["content-type"].startswith("text/html")
        assert reply.body == (ROOT / "uagw" / "console" / "index.html").read_bytes()
        assert running.get("/console/app.js").status == 200
    finally:
        running.stop()

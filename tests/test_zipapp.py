"""The zipapp contract (PROTOCOL.md §8): one reproducible file that runs on CPython 3.9 to 3.13 and writes
nothing when it runs.

The archive under test is built once per session from this checkout, with the websockets sdist
from build/cache (downloaded there with pip the first time). Interpreters come from
``$PYENV_ROOT/versions/3.9*`` to ``3.13*`` (default ``~/.pyenv``), or, when ``UA_TEST_PYTHONS`` is
set, from that os.pathsep-separated list of interpreter paths instead.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import zipapp_build  # noqa: E402  (the project root is not necessarily on sys.path)

EPOCH = 1735689600  # 2025-01-01T00:00:00Z; even, because zip dates count in 2-second steps
OTHER_EPOCH = 1700000000  # 2023-11-14T22:13:20Z
PROJECT_VERSION = zipapp_build.read_project_version(ROOT)
RUN_TIMEOUT_S = 60


# ---------------------------------------------------------------------------------------------
# Interpreters
# ---------------------------------------------------------------------------------------------


def _pyenv_interpreters(minors: range) -> list:
    versions = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    found = []
    for minor in minors:
        for python in sorted(glob.glob(str(versions / f"3.{minor}*" / "bin" / "python3"))):
            found.append(pytest.param(python, id=f"python{Path(python).parents[1].name}"))
    return found


def _supported_interpreters() -> list:
    listed = os.environ.get("UA_TEST_PYTHONS")
    if listed:
        found = [pytest.param(path, id=path) for path in listed.split(os.pathsep) if path]
    else:
        found = _pyenv_interpreters(range(9, 14))
    reason = "no CPython 3.9-3.13 under ~/.pyenv/versions and no UA_TEST_PYTHONS"
    return found or [pytest.param(None, marks=pytest.mark.skip(reason=reason))]


def _unsupported_interpreters() -> list:
    reason = "no CPython 3.6-3.8 under ~/.pyenv/versions"
    return _pyenv_interpreters(range(6, 9)) or [pytest.param(None, marks=pytest.mark.skip(reason=reason))]


SUPPORTED = _supported_interpreters()
UNSUPPORTED = _unsupported_interpreters()


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def websockets_release() -> Path:
    """The pinned sdist, from build/cache or downloaded into it (hash-checked either way)."""
    return zipapp_build.fetch_websockets()


@pytest.fixture(scope="session")
def pyz(tmp_path_factory: pytest.TempPathFactory, websockets_release: Path) -> Path:
    return zipapp_build.build(
        tmp_path_factory.mktemp("pyz") / "ua_gateway.pyz", websockets_release, source_date_epoch=EPOCH
    )


@pytest.fixture(scope="session")
def entries(pyz: Path) -> dict:
    with zipfile.ZipFile(pyz) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _snapshot(*roots: Path) -> dict:
    """Every path under roots with what would show a write: type and size, mtime."""
    found = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            status = path.lstat()
            found[str(path)] = (status.st_mode, status.st_size, status.st_mtime_ns)
    return found


def _run_isolated(python: str, args: list, tmp_path: Path, watched: Path) -> subprocess.CompletedProcess:
    """Run ``python -I args`` with a fresh cwd, HOME and TMPDIR; assert nothing was written
    there nor under watched (the archive's directory)."""
    cwd, home, tmp = tmp_path / "cwd", tmp_path / "home", tmp_path / "tmp"
    for directory in (cwd, home, tmp):
        directory.mkdir()
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "TMPDIR": str(tmp)}
    before = _snapshot(cwd, home, tmp, watched)
    proc = subprocess.run(
        [python, "-I", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=RUN_TIMEOUT_S,
    )
    after = _snapshot(cwd, home, tmp, watched)
    changed = sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))
    assert not changed, f"running from the zip wrote: {changed}"
    return proc


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", *args],
        cwd=cwd, check=True, capture_output=True,
    )


STUB_APP = '''\
import sys


def main(argv=None):
    print("ua-gateway 9.8.7")
    return 0
'''


def _make_project(root: Path, *, git: bool) -> Path:
    """A minimal project: pyproject, the app modules and the uagw package with its console/ data."""
    (root / "uagw" / "console" / "js").mkdir(parents=True)
    (root / "pyproject.toml").write_text('[project]\nname = "ua-gateway"\ndynamic = ["version"]\n')
    (root / "uagw" / "__init__.py").write_text('__version__ = "9.8.7"\n')
    (root / "ua_gateway.py").write_text(STUB_APP)
    (root / "ops_service.py").write_text('"""stub"""\n')
    (root / "ua_client.py").write_text('"""stub"""\n')
    (root / "uagw" / "console" / "index.html").write_text("<!doctype html>\n")
    (root / "uagw" / "console" / "js" / "app.js").write_text("'use strict';\n")
    if git:
        _git(root, "init", "-q")
        _git(root, "add", "-A")
        _git(root, "commit", "-q", "-m", "project")
    return root


def _names(pyz: Path) -> list:
    with zipfile.ZipFile(pyz) as archive:
        return archive.namelist()


def _build_info(pyz: Path) -> dict:
    with zipfile.ZipFile(pyz) as archive:
        return json.loads(archive.read("BUILD_INFO.json"))


needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


# ---------------------------------------------------------------------------------------------
# Reproducibility
# ---------------------------------------------------------------------------------------------


def test_building_twice_gives_identical_bytes(pyz: Path, websockets_release: Path, tmp_path: Path):
    again = zipapp_build.build(tmp_path / "again.pyz", websockets_release, source_date_epoch=EPOCH)

    assert again.read_bytes() == pyz.read_bytes()


def test_source_date_epoch_sets_every_timestamp(pyz: Path, websockets_release: Path, tmp_path: Path):
    other = zipapp_build.build(tmp_path / "other.pyz", websockets_release, source_date_epoch=OTHER_EPOCH)

    assert other.read_bytes() != pyz.read_bytes()
    with zipfile.ZipFile(other) as archive:
        assert {info.date_time for info in archive.infolist()} == {time.gmtime(OTHER_EPOCH)[:6]}


def test_source_date_epoch_from_the_environment_is_used(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(OTHER_EPOCH))

    assert zipapp_build.resolve_source_date_epoch(ROOT) == OTHER_EPOCH


def test_timestamps_before_1980_are_clamped(websockets_release: Path, tmp_path: Path):
    early = zipapp_build.build(tmp_path / "early.pyz", websockets_release, source_date_epoch=0)

    with zipfile.ZipFile(early) as archive:
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_every_entry_has_the_fixed_metadata(pyz: Path):
    data = pyz.read_bytes()
    with zipfile.ZipFile(pyz) as archive:
        infos = archive.infolist()
        assert archive.comment == b""
    assert data.startswith(b"#!/usr/bin/env python3\n")
    assert pyz.stat().st_mode & 0o777 == 0o755
    assert [info.filename for info in infos] == sorted(info.filename for info in infos)
    for info in infos:
        assert not info.is_dir(), info.filename
        assert info.date_time == time.gmtime(EPOCH)[:6], info.filename
        assert info.external_attr == 0o100644 << 16, info.filename
        assert info.compress_type == zipfile.ZIP_DEFLATED, info.filename
        assert info.create_system == 3, info.filename


@pytest.mark.parametrize("python", SUPPORTED)
def test_builder_gives_the_same_bytes_on_every_interpreter(
    python: str, pyz: Path, websockets_release: Path, tmp_path: Path
):
    out = tmp_path / "ua_gateway.pyz"
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(EPOCH))
    proc = subprocess.run(
        [python, "-I", str(ROOT / "zipapp_build.py"),
         "--output", str(out), "--websockets-from", str(websockets_release)],
        env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )

    assert proc.returncode == 0, proc.stderr
    their_zlib, our_zlib = (_build_info(path)["zlib_version"] for path in (out, pyz))
    if their_zlib != our_zlib:
        pytest.skip(f"{python} deflates with zlib {their_zlib}, this interpreter with {our_zlib}")
    assert out.read_bytes() == pyz.read_bytes()


# ---------------------------------------------------------------------------------------------
# Contents
# ---------------------------------------------------------------------------------------------


def test_archive_holds_the_app_modules_and_the_websockets_package(entries: dict):
    for name in (*zipapp_build.APP_MODULES, "websockets/__init__.py", "websockets/server.py",
                 "websockets/asyncio/server.py", "websockets/py.typed"):
        assert name in entries
    assert (ROOT / "ua_gateway.py").read_bytes() == entries["ua_gateway.py"]


def test_archive_ships_the_websockets_licence(entries: dict):
    licence = entries["licenses/websockets-15.0.1.LICENSE"].decode()

    assert "Aymeric Augustin" in licence
    assert "Redistributions in binary form must reproduce the above copyright notice" in licence


def test_archive_holds_no_native_code_bytecode_stubs_or_tests(entries: dict):
    for name in entries:
        parts = name.split("/")
        assert "__pycache__" not in parts, name
        assert not name.endswith((".so", ".pyd", ".pyc", ".pyo", ".c", ".pyi")), name
        assert parts[0] not in ("tests", "build", "dist", "bench", "docs"), name
        assert not parts[-1].startswith(("test_", "conftest")), name


def test_build_info_records_versions_and_hashes_every_other_entry(entries: dict):
    info = json.loads(entries["BUILD_INFO.json"])

    assert info["version"] == PROJECT_VERSION
    assert info["source_date_epoch"] == EPOCH
    assert info["websockets"] == {
        "version": "15.0.1",
        "source": "websockets-15.0.1.tar.gz",
        "sha256": zipapp_build.WEBSOCKETS_SHA256["websockets-15.0.1.tar.gz"],
    }
    assert info["zlib_version"]
    assert info["files"] == {
        name: hashlib.sha256(data).hexdigest() for name, data in entries.items() if name != "BUILD_INFO.json"
    }


def test_main_checks_the_python_version_before_importing_the_app(entries: dict):
    main = entries["__main__.py"].decode()

    assert main.index("sys.version_info < (3, 9)") < main.index("from ua_gateway import main")
    assert "sys.exit(2)" in main
    assert "import websockets" not in main


# ---------------------------------------------------------------------------------------------
# Running it (PROTOCOL.md §8: 3.9 to 3.13, nothing installed, nothing written)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("python", SUPPORTED)
def test_version_runs_isolated_and_writes_nothing(python: str, pyz: Path, tmp_path: Path):
    proc = _run_isolated(python, [str(pyz), "--version"], tmp_path, watched=pyz.parent)

    assert proc.returncode == 0, proc.stderr
    assert PROJECT_VERSION in proc.stdout


IMPORT_FROM_ZIP = """\
import sys
pyz = sys.argv[1]
sys.path.insert(0, pyz)
import ops_service, ua_gateway, websockets, websockets.asyncio.server, websockets.server
for module in (ops_service, ua_gateway, websockets, websockets.asyncio.server):
    assert module.__file__.startswith(pyz + "/"), module.__file__
print(websockets.version.version)
"""


@pytest.mark.parametrize("python", SUPPORTED)
def test_app_and_websockets_import_from_the_zip_and_write_nothing(python: str, pyz: Path, tmp_path: Path):
    proc = _run_isolated(python, ["-c", IMPORT_FROM_ZIP, str(pyz)], tmp_path, watched=pyz.parent)

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "15.0.1"


@pytest.mark.parametrize("python", UNSUPPORTED)
def test_older_pythons_are_refused_with_a_clear_message(python: str, pyz: Path, tmp_path: Path):
    proc = _run_isolated(python, [str(pyz), "--version"], tmp_path, watched=pyz.parent)

    assert proc.returncode == 2
    assert "needs Python 3.9 or newer" in proc.stderr


# ---------------------------------------------------------------------------------------------
# Inputs: which files, which websockets
# ---------------------------------------------------------------------------------------------


@needs_git
def test_untracked_files_stay_out_of_a_checkout_build(websockets_release: Path, tmp_path: Path):
    project = _make_project(tmp_path / "project", git=True)
    (project / "uagw" / "console" / "notes.txt").write_text("scratch\n")
    (project / "extra.py").write_text("junk = 1\n")

    names = _names(zipapp_build.build(tmp_path / "out.pyz", websockets_release, EPOCH, project_root=project))

    assert "uagw/console/index.html" in names
    assert "uagw/console/js/app.js" in names
    assert "uagw/console/notes.txt" not in names
    assert "extra.py" not in names


@needs_git
def test_untracked_app_module_is_refused_with_advice(websockets_release: Path, tmp_path: Path):
    project = _make_project(tmp_path / "project", git=True)
    _git(project, "rm", "-q", "--cached", "ops_service.py")

    with pytest.raises(zipapp_build.BuildError, match="git add ops_service.py"):
        zipapp_build.build(tmp_path / "out.pyz", websockets_release, EPOCH, project_root=project)
    assert not (tmp_path / "out.pyz").exists()


@needs_git
def test_symlinked_project_file_is_refused(websockets_release: Path, tmp_path: Path):
    project = _make_project(tmp_path / "project", git=True)
    (project / "uagw" / "console" / "link.html").symlink_to("index.html")
    _git(project, "add", "uagw/console/link.html")

    with pytest.raises(zipapp_build.BuildError, match="symlink"):
        zipapp_build.build(tmp_path / "out.pyz", websockets_release, EPOCH, project_root=project)


def test_outside_git_the_files_come_from_the_directory_without_bytecode(
    websockets_release: Path, tmp_path: Path
):
    project = _make_project(tmp_path / "project", git=False)
    (project / "uagw" / "console" / "__pycache__").mkdir()
    (project / "uagw" / "console" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")

    out = zipapp_build.build(tmp_path / "out.pyz", websockets_release, EPOCH, project_root=project)

    names = _names(out)
    assert {"ua_gateway.py", "ops_service.py", "uagw/console/index.html", "uagw/console/js/app.js"} <= set(names)
    assert not [name for name in names if "__pycache__" in name]
    info = _build_info(out)
    assert (info["version"], info["git_commit"]) == ("9.8.7", "unknown")


def test_symlinked_data_directory_is_refused_outside_git(websockets_release: Path, tmp_path: Path):
    project = _make_project(tmp_path / "project", git=False)
    (project / "uagw" / "console" / "linked").symlink_to(project / "uagw" / "console" / "js")

    with pytest.raises(zipapp_build.BuildError, match="symlink"):
        zipapp_build.build(tmp_path / "out.pyz", websockets_release, EPOCH, project_root=project)


def test_release_with_another_hash_is_refused(websockets_release: Path, tmp_path: Path):
    tampered = tmp_path / websockets_release.name
    tampered.write_bytes(websockets_release.read_bytes() + b"\0")

    with pytest.raises(zipapp_build.BuildError, match="sha256 mismatch"):
        zipapp_build.build(tmp_path / "out.pyz", tampered, EPOCH)


def _unpack_sdist(sdist: Path, into: Path) -> Path:
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            if member.isfile():
                target = into / member.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    return into / "websockets-15.0.1"


def test_source_tree_gives_the_same_websockets_entries_as_the_sdist(
    websockets_release: Path, entries: dict, tmp_path: Path
):
    source = _unpack_sdist(websockets_release, tmp_path / "unpacked") / "src"

    out = zipapp_build.build(tmp_path / "out.pyz", source, EPOCH)

    with zipfile.ZipFile(out) as archive:
        from_tree = {name: archive.read(name) for name in archive.namelist()}
    vendored = sorted(name for name in entries if name.startswith(("websockets/", "licenses/")))
    assert vendored == sorted(name for name in from_tree if name.startswith(("websockets/", "licenses/")))
    assert all(from_tree[name] == entries[name] for name in vendored)


def test_source_tree_of_another_version_is_refused(websockets_release: Path, tmp_path: Path):
    source = _unpack_sdist(websockets_release, tmp_path / "unpacked") / "src"
    version_py = source / "websockets" / "version.py"
    version_py.write_text(version_py.read_text().replace('"15.0.1"', '"16.0"'))

    with pytest.raises(zipapp_build.BuildError, match="expected '15.0.1'"):
        zipapp_build.build(tmp_path / "out.pyz", source, EPOCH)


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def test_check_builds_twice_runs_the_result_and_writes_the_same_bytes(
    pyz: Path, websockets_release: Path, tmp_path: Path
):
    out = tmp_path / "dist" / "ua_gateway.pyz"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "zipapp_build.py"), "--check", "--output", str(out),
         "--websockets-from", str(websockets_release)],
        env=dict(os.environ, SOURCE_DATE_EPOCH=str(EPOCH)), capture_output=True, text=True,
        timeout=RUN_TIMEOUT_S,
    )

    assert proc.returncode == 0, proc.stderr
    assert hashlib.sha256(out.read_bytes()).hexdigest() in proc.stdout
    assert out.read_bytes() == pyz.read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["ua_gateway.pyz"]


SERVE_FROM_ZIP = """\
import asyncio, json, re, signal, subprocess, sys, urllib.request
pyz, root = sys.argv[1], sys.argv[2]
server = subprocess.Popen([sys.executable, "-I", pyz, "--port", "0", "--workspaces", root],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
url = re.search(r"http://[^ ]+", server.stdout.readline().decode()).group(0)

def call(method, path, body=None):
    request = urllib.request.Request(url + path, method=method, data=body)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"null")

session = call("POST", "/api/v1/sessions", b"{}")["session_id"]
sys.path.insert(0, pyz)
from websockets.asyncio.client import connect

async def turn():
    async with connect(url.replace("http", "ws") + "/api/v1/sessions/" + session + "/stream") as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "execute", "data": {"user_input": "hello"}}))
        while json.loads(await ws.recv())["type"] != "query_complete":
            pass

asyncio.run(turn())
call("GET", "/api/v1/ops/sessions")
call("GET", "/api/v1/ops/logs/tail?session_id=" + session)
call("POST", "/api/v1/ops/sessions/" + session + "/compact", b'{"max_lines": 1}')
call("POST", "/api/v1/ops/sessions/" + session + "/reset")
call("DELETE", "/api/v1/ops/sessions/" + session + "?confirm=true")
server.send_signal(signal.SIGTERM)
print(server.wait(15))
"""


def test_serving_from_the_zip_writes_only_under_the_workspaces_root(pyz: Path, tmp_path: Path):
    """PROTOCOL.md §8: a whole session's life, served from the .pyz, writes nothing outside the root."""
    root = tmp_path / "root"
    proc = _run_isolated(sys.executable, ["-c", SERVE_FROM_ZIP, str(pyz), str(root)], tmp_path, watched=pyz.parent)

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0"
    assert (root / "_gateway" / "gateway.log").is_file()

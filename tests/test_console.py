"""The console's files as the gateway serves them: HTML under a strict CSP with no inline script or
style, the right content types, nothing but the shipped files, and the same from inside the .pyz.

The browser-level behaviour (tails, dialogs, the agent pane) is in test_browser.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

import zipapp_build
from conftest import ROOT, RunningGateway, gateway_env, launch

CONSOLE = ROOT / "uagw" / "console"
EPOCH = 1767225600  # any fixed SOURCE_DATE_EPOCH; the build needs one outside a git checkout


class ScriptAndHandlerFinder(HTMLParser):
    """Collects what a CSP without 'unsafe-inline' would block: script bodies, on* handlers, styles."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: List[Tuple[dict, str]] = []
        self.inline_handlers: List[str] = []
        self.style_attributes: List[str] = []
        self.style_elements = 0
        self._in_script: dict = {}
        self._script_body: List[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attributes = dict(attrs)
        self.inline_handlers += [f"<{tag} {name}>" for name, _ in attrs if name.lower().startswith("on")]
        self.style_attributes += [f"<{tag} style>" for name, _ in attrs if name.lower() == "style"]
        if tag == "style":
            self.style_elements += 1
        if tag == "script":
            self._in_script = attributes
            self._script_body = []

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self._script_body.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self.scripts.append((self._in_script, "".join(self._script_body)))
            self._in_script = {}


def test_root_serves_the_console_page_with_a_strict_csp(gateway):
    reply = gateway.get("/")

    assert reply.status == 200
    assert reply.headers["content-type"] == "text/html; charset=utf-8"
    policy = reply.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "unsafe-inline" not in policy
    assert reply.headers["x-frame-options"] == "DENY"
    assert reply.body == (CONSOLE / "index.html").read_bytes()


def test_console_page_has_no_inline_script_handlers_or_styles(gateway):
    page = ScriptAndHandlerFinder()
    page.feed(gateway.get("/").body.decode("utf-8"))

    assert page.scripts, "the page loads its script"
    for attributes, body in page.scripts:
        assert attributes.get("src", "").startswith("/console/"), attributes
        assert body.strip() == "", "inline script body"
    assert page.inline_handlers == []
    assert page.style_attributes == []
    assert page.style_elements == 0


def test_console_page_loads_only_files_the_gateway_serves(gateway):
    html = gateway.get("/").body.decode("utf-8")
    references = re.findall(r'(?:src|href)="([^"]+)"', html)

    for reference in references:
        assert not reference.startswith(("http:", "https:", "//")), f"external reference {reference}"
        if reference.startswith("/"):
            assert gateway.get(reference).status == 200, reference


@pytest.mark.parametrize("asset, content_type", [
    ("app.js", "text/javascript; charset=utf-8"),
    ("style.css", "text/css; charset=utf-8"),
    ("index.html", "text/html; charset=utf-8"),
    ("openapi.json", "application/json"),
])
def test_console_assets_are_served_with_their_types(gateway, asset, content_type):
    reply = gateway.get(f"/console/{asset}")

    assert reply.status == 200
    assert reply.headers["content-type"] == content_type
    assert "content-security-policy" in reply.headers
    assert reply.body == (CONSOLE / asset).read_bytes()


@pytest.mark.parametrize("asset", ["favicon.ico", "..%2Fua_gateway.py", "app.js.map", "%2e%2e", "ops_service.py"])
def test_unknown_console_asset_is_404(gateway, asset):
    reply = gateway.get(f"/console/{asset}")

    assert reply.status == 404
    assert "detail" in reply.json


# --- from the zipapp -------------------------------------------------------------------------------------


def copy_project(into: Path) -> Path:
    """The files the build takes, copied out of the checkout: outside git the build reads the
    directory, so files not yet committed are built too."""
    for module in zipapp_build.APP_MODULES:
        shutil.copy2(ROOT / module, into / module)
    for package in zipapp_build.APP_PACKAGES:
        shutil.copytree(ROOT / package, into / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "pyproject.toml", into / "pyproject.toml")
    return into


@pytest.fixture(scope="module")
def pyz_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tuple[Path, RunningGateway]]:
    scratch = tmp_path_factory.mktemp("pyz-console")
    project = copy_project(scratch)
    pyz = zipapp_build.build(scratch / "dist" / "ua_gateway.pyz", zipapp_build.fetch_websockets(), EPOCH,
                             project_root=project)
    running = launch(scratch / "workspaces", command=[sys.executable, "-I", str(pyz)])
    yield pyz, running
    running.stop()


def test_console_is_served_from_the_zipapp(pyz_gateway):
    _, running = pyz_gateway

    for path, name in (("/", "index.html"), ("/console/app.js", "app.js"), ("/console/style.css", "style.css"),
                       ("/api/v1/openapi.json", "openapi.json")):
        reply = running.get(path)
        assert reply.status == 200, path
        assert reply.body == (CONSOLE / name).read_bytes(), path


def test_client_runs_from_the_zipapp(pyz_gateway):
    pyz, running = pyz_gateway
    running.make_session("pyz-client-session")

    result = subprocess.run(
        [sys.executable, "-I", str(pyz), "sessions", "list", "--url", running.url], env=gateway_env(),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
    )

    assert result.returncode == 0, result.stderr
    assert "pyz-client-session" in result.stdout

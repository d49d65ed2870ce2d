"""The product modules type-check clean with mypy, configured in pyproject.toml ([tool.mypy]: Python 3.9,
the files ua_gateway.py, uagw/, ops_service.py and ua_client.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT

pytest.importorskip("mypy", reason="mypy is a test extra (pip install '.[test]'); CI installs it")


def test_mypy_finds_no_errors_in_the_product_modules(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy-cache"), "--no-error-summary"],
        cwd=str(ROOT), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout.decode(errors="replace")

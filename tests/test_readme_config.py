"""The README's configuration table is complete: every flag of ``--help`` and every UA_* variable the
gateway (uagw/config.py) or its client (ua_client.py) reads has a row, so an operator reading the table
sees every setting there is."""

from __future__ import annotations

import re

import pytest

from conftest import ROOT

from uagw.cli import build_arg_parser


def configuration_table() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    return "\n".join(line for line in section.splitlines() if line.startswith("|"))


def variables_read() -> list:
    names = set()
    for path in (ROOT / "uagw" / "config.py", ROOT / "ua_client.py"):
        names.update(re.findall(r'"(UA_[A-Z0-9_]+)"', path.read_text(encoding="utf-8")))
    return sorted(names)


def flags() -> list:
    return sorted(option for action in build_arg_parser()._actions for option in action.option_strings
                  if option.startswith("--") and option not in ("--help", "--version"))


@pytest.mark.parametrize("flag", flags())
def test_every_flag_has_a_row_in_the_configuration_table(flag):
    assert f"`{flag}`" in configuration_table(), f"README.md's configuration table lacks {flag}"


@pytest.mark.parametrize("variable", variables_read())
def test_every_variable_read_has_a_row_in_the_configuration_table(variable):
    assert f"`{variable}`" in configuration_table(), f"README.md's configuration table lacks {variable}"

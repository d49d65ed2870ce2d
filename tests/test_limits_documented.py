"""Every limit in the code is documented: a limit added later cannot go undocumented.

Which document holds which (derived from the code, not from a list kept here):
- docs/PROTOCOL.md §10 "Limits and timeouts" is the contract's one table: every name of
  ``uagw.limits.__all__`` and every public ``MAX_*`` bound of ``ops_service`` is a row there, with its value,
  what happens beyond it, and why.
- docs/SECURITY.md "Limits" gathers the bounds an attacker meets: every name of ``uagw.limits.__all__``
  except the tunings and defaults in ``NOT_ATTACKER_BOUNDS`` below (poll intervals, batching delays, the
  listen address), which bound nobody and are in PROTOCOL.md §10 only.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import FrozenSet, Set

import ops_service
from uagw import limits

ROOT = Path(__file__).resolve().parent.parent

# Tunings and defaults that bound no attacker: PROTOCOL.md §10 lists them, SECURITY.md's Limits does not.
# A name moves out of here when a defence comes to rely on it.
NOT_ATTACKER_BOUNDS: FrozenSet[str] = frozenset({
    "DEFAULT_HOST", "DEFAULT_PORT", "DEFAULT_WORKSPACES", "SERVER_NAME", "GIL_SWITCH_INTERVAL", "CORS_MAX_AGE",
    "RESERVED_SESSION_IDS", "AGENT_GROUP_POLL", "WRITER_BACKLOG_POLL", "SESSION_WRITE_DELAY",
    "GATEWAY_LOG_INTERVAL", "ROOT_CHECK_INTERVAL", "STREAM_KEEPALIVE", "STREAM_POLL_INTERVAL", "PRUNE_INTERVAL",
    "INDEX_RACY_NS", "INDEX_RESCAN_CPU_SHARE", "INDEX_RESCAN_INTERVAL", "INDEX_SAFETY_RESCAN",
    "INDEX_SCAN_BATCH", "INDEX_SETTLE", "INDEX_TURN_DELAY", "INDEX_ACTIVITY_INTERVAL",
})


def table_names(document: str, start: str, end: str) -> Set[str]:
    """Backquoted names in the table rows between the headings ``start`` and ``end`` of ``document``."""
    text = (ROOT / "docs" / document).read_text(encoding="utf-8")
    section = text[text.index(start):text.index(end)]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return {name for row in rows for name in re.findall(r"`([A-Za-z_][A-Za-z0-9_.]*)`", row)}


def protocol_table() -> Set[str]:
    return table_names("PROTOCOL.md", "## 10. Limits and timeouts", "## 11. ")


def security_table() -> Set[str]:
    return table_names("SECURITY.md", "## Limits", "## What is not defended")


def test_every_limit_is_a_row_of_protocol_section_10() -> None:
    missing = sorted(set(limits.__all__) - protocol_table())
    assert not missing, f"add a row to docs/PROTOCOL.md §10 for each of {missing} (value, beyond it, why)"


def test_every_ops_service_bound_is_a_row_of_protocol_section_10() -> None:
    bounds = {name for name, value in vars(ops_service).items() if name.startswith("MAX_") and isinstance(value, int)}
    missing = sorted(bounds - protocol_table())
    assert not missing, f"add a row to docs/PROTOCOL.md §10 for each of {missing} (value, beyond it, why)"


def test_every_attacker_bound_is_a_row_of_the_security_limits_table() -> None:
    missing = sorted(set(limits.__all__) - NOT_ATTACKER_BOUNDS - security_table())
    assert not missing, (f"add a row to docs/SECURITY.md's Limits table for each of {missing}, or, if it bounds "
                         "no attacker, name it in NOT_ATTACKER_BOUNDS in this test")


def test_names_left_out_of_the_security_table_are_still_limits() -> None:
    stale = sorted(NOT_ATTACKER_BOUNDS - set(limits.__all__))
    assert not stale, f"{stale} are no longer in uagw.limits.__all__: remove them from NOT_ATTACKER_BOUNDS"

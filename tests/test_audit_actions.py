"""The audit action names (uagw.audit.ACTIONS) are a second table keyed by the router's templates: these
tests keep the two from drifting apart (a renamed route would silently fall back to "<METHOD> <template>")."""

from __future__ import annotations

from pathlib import Path

import ua_gateway
from uagw.audit import ACTIONS


def test_every_audit_action_names_an_audited_route_method(tmp_path: Path):
    gateway = ua_gateway.Gateway(ua_gateway.Config(workspaces=tmp_path / "workspaces"))
    try:
        served = {(method, route.template) for route in gateway.router.routes for method in route.handlers
                  if route.changes_state(method)}
    finally:
        gateway.executor.shutdown(wait=False)
    assert set(ACTIONS) - served == set()


def test_audit_action_names_are_distinct():
    assert len(set(ACTIONS.values())) == len(ACTIONS)

"""The audit trail (docs/PROTOCOL.md §11.2): one JSON line in ``<root>/_gateway/audit.log`` for every call that
may change state, written durably (``OpsService.append_audit``: fsync) before the answer goes out, and one
for each session the WebSocket lobby creates.

What a record holds is decided here, in one place: the action (a name per route and method; a route this
table does not know is named by its template and method, so a route added later is audited too), the
session, the parameters (query and JSON body, bounded, with every key named like a secret redacted and
every configured token scrubbed wherever it appears), the client address, the token scope used, the
outcome (status, and for a success the archive directory and sizes the answer names) and the duration.
Never a header.

May import: the standard library, ``ops_service``, ``uagw.limits``, ``uagw.text``, ``uagw.http11``,
``uagw.changes`` and ``uagw.routing``.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import re
import sys
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Dict, Optional, Sequence, Set
from urllib.parse import unquote_plus

from ops_service import OpsError, OpsService

from .limits import AUDIT_BACKUPS, AUDIT_MAX_KEYS, AUDIT_PARAMS_BYTES, AUDIT_ROTATE_BYTES, AUDIT_VALUE_CHARS
from .text import loads_json
from .http11 import Request, Response
from .changes import ChangeKind
from .routing import Route, query_params

__all__ = [
    "ACTIONS",
    "AuditTrail",
    "REDACTED",
    "action_name",
    "in_audited_call",
    "is_secret_key",
    "mark_unrecorded",
    "warn_stderr",
]

# The actions of today's routes. A route that is not here is audited as "<METHOD> <template>".
ACTIONS: Dict[tuple, str] = {
    ("POST", "/api/v1/sessions"): "create_session",
    ("DELETE", "/api/v1/sessions/{session_id}"): "forget_session",
    ("DELETE", "/api/v1/ops/sessions/{session_id}"): "delete_session",
    ("PATCH", "/api/v1/ops/sessions/{session_id}"): "set_description",
    ("POST", "/api/v1/ops/sessions/cancel"): "cancel_sessions",
    ("POST", "/api/v1/ops/sessions/{session_id}/cancel"): "cancel_session",
    ("POST", "/api/v1/ops/sessions/{session_id}/archive"): "archive_session",
    ("POST", "/api/v1/ops/sessions/{session_id}/reset"): "reset_session",
    ("POST", "/api/v1/ops/sessions/{session_id}/compact"): "compact_session",
    ("POST", "/api/v1/ops/prune"): "prune",
}
LOBBY_ACTION = "create_session_ws"  # a session the /ws/agent lobby created (no HTTP call made it)
WS_CANCEL_ACTION = "cancel_session_ws"  # a turn cancelled by a WebSocket "cancel" message (no HTTP call)
POLICY_PRUNE_ACTION = "prune_policy"  # what the background pruner removed under the retention policies

REDACTED = "[redacted]"
# A key named like a credential is redacted whatever its value: a client may put a token anywhere.
_SECRET_KEY_RE = re.compile(r"token|secret|passw|authori[sz]|api[-_]?key|credential|cookie|bearer", re.IGNORECASE)
_NESTING = 3  # levels of nested objects kept in a parameter; deeper ones are cut (ours are flat)
# What a successful answer names that an operator asks after: where the logs went, how much was freed.
OUTCOME_KEYS = ("archive_dir", "archived", "bytes_dropped", "bytes_archived", "bytes_freed", "cleared",
                "sessions_cancelled", "task_cancelled",
                "totals", "dry_run", "deleted_count", "deleted", "skipped", "errors")  # prune, purge-stale, bulk-delete
_MAX_ANSWER_PARSED = 256 * 1024  # a larger answer's fields are not copied (ours are a few hundred bytes)

# True while an HTTP call is being audited: a change it publishes is in its own record already.
_AUDITED_CALL: "contextvars.ContextVar[bool]" = contextvars.ContextVar("ua_audited_call", default=False)


def in_audited_call() -> bool:
    return _AUDITED_CALL.get()


def action_name(route: Route, method: str) -> str:
    return ACTIONS.get((method, route.template)) or f"{method} {route.template}"


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY_RE.search(key))


def _scrubbed(text: str, secrets: Sequence[str]) -> str:
    """``text`` with every secret replaced by REDACTED: done before a string is cut, as a cut through a
    token would leave its first characters behind where ``AuditTrail.encode`` no longer sees a token."""
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


def _cut(text: str, secrets: Sequence[str]) -> str:
    text = _scrubbed(text, secrets)
    return text if len(text) <= AUDIT_VALUE_CHARS else text[:AUDIT_VALUE_CHARS] + "...[cut]"


def _bounded(value: Any, depth: int = 0, secrets: Sequence[str] = ()) -> Any:
    """``value`` with secret-named keys redacted, ``secrets`` scrubbed from every string and key, strings cut
    to AUDIT_VALUE_CHARS, at most AUDIT_MAX_KEYS keys or items per level and _NESTING levels."""
    if isinstance(value, str):
        return _cut(value, secrets)
    if isinstance(value, dict):
        if depth >= _NESTING:
            return "[nested object cut]"
        return {_cut(str(key), secrets): REDACTED if is_secret_key(str(key)) else _bounded(item, depth + 1, secrets)
                for key, item in list(value.items())[:AUDIT_MAX_KEYS]}
    if isinstance(value, list):
        if depth >= _NESTING:
            return "[nested list cut]"
        return [_bounded(item, depth + 1, secrets) for item in value[:AUDIT_MAX_KEYS]]
    return value  # numbers, booleans, null


def request_parameters(request: Request, secrets: Sequence[str] = ()) -> Dict[str, Any]:
    """The query and the JSON body's fields, bounded and redacted (``secrets`` scrubbed); never a header."""
    params: Dict[str, Any] = {}
    try:
        query = query_params(request)
    except Exception:  # the handler refused it already (400); the record says what it could
        # Decoded, as query_params decodes: a percent-encoded token is then a token, and scrubbed.
        query = {"_query": unquote_plus(request.query_string, errors="surrogateescape")}
    if query:
        params["query"] = _bounded(query, secrets=secrets)
    if request.body.strip():
        try:
            body = loads_json(request.body)
        except ValueError:
            body = "[not JSON]"
        params["body"] = _bounded(body, secrets=secrets) if isinstance(body, dict) else "[not a JSON object]"
    text = json.dumps(params, separators=(",", ":"))
    if len(text) > AUDIT_PARAMS_BYTES:
        # Only the names survive: which knobs were turned, not their (long) values.
        params = {part: sorted(value)[:AUDIT_MAX_KEYS] if isinstance(value, dict) else value
                  for part, value in params.items()}
        params["cut"] = f"parameters over {AUDIT_PARAMS_BYTES} bytes: only their names are kept"
    return params


def answer_fields(response: Response, secrets: Sequence[str] = ()) -> Dict[str, Any]:
    """What a JSON answer names of the change (OUTCOME_KEYS), and the session it made or touched."""
    if not (200 <= response.status < 300) or len(response.body) > _MAX_ANSWER_PARSED:
        return {}
    try:
        answer = loads_json(response.body)
    except ValueError:
        return {}
    if not isinstance(answer, dict):
        return {}
    fields = {key: _bounded(answer[key], secrets=secrets) for key in OUTCOME_KEYS + ("session_id",) if key in answer}
    if isinstance(answer.get("status"), str):
        fields["result"] = _cut(answer["status"], secrets)  # the answer's own word: reset, deleted, ...
    return fields


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AuditTrail:
    """Builds and writes audit records. ``secrets``: every configured token, scrubbed from each record
    wherever a client put it. Event-loop only; the write runs in ``run_ops`` (a worker thread)."""

    def __init__(
        self,
        ops: OpsService,
        run_ops: Callable[..., Awaitable[Any]],
        secrets: Sequence[Optional[str]],
        warn: Callable[[str], None],
        rotate_bytes: int = AUDIT_ROTATE_BYTES,
        backups: int = AUDIT_BACKUPS,
    ) -> None:
        self.ops = ops
        self.run_ops = run_ops
        self.warn = warn
        self.rotate_bytes = rotate_bytes
        self.backups = backups
        self.failures = 0  # records that could not be written (each also answered as such)
        self._secrets = [secret for secret in secrets if secret]
        self._tasks: Set[asyncio.Task] = set()

    def http_record(self, request: Request, route: Route, params: Dict[str, str], scope: str,
                    response: Response, duration: float) -> Dict[str, Any]:
        answer = answer_fields(response, self._secrets)
        session = params.get("session_id") or answer.pop("session_id", None)
        answer.pop("session_id", None)
        return {
            "time": _now(),
            "action": action_name(route, request.method),
            "method": request.method,
            "route": route.template,
            "session": session,
            "params": request_parameters(request, self._secrets),
            "client": request.client,
            "scope": scope,
            "outcome": {"status": response.status, **answer},
            "duration_ms": round(duration * 1000, 3),
        }

    def encode(self, record: Dict[str, Any]) -> bytes:
        """One line of JSON, with every configured token scrubbed (in whatever field a client put it)."""
        text = json.dumps(record, separators=(",", ":"), ensure_ascii=True)
        for secret in self._secrets:
            for form in (secret, json.dumps(secret, ensure_ascii=True)[1:-1]):
                text = text.replace(form, REDACTED)
        return text.encode("ascii") + b"\n"

    async def write(self, record: Dict[str, Any]) -> Optional[str]:
        """Append ``record`` durably; None once it is on disk, else what went wrong (also on stderr)."""
        try:
            await self.run_ops(self.ops.append_audit, self.encode(record), self.rotate_bytes, self.backups)
        except OpsError as exc:
            self.failures += 1
            self.warn(f"audit record of {record.get('action')} not written: {exc.detail}")
            return exc.detail
        return None

    async def audited(self, call: Callable[[], Awaitable[Response]], record: Callable[[Response], Dict[str, Any]]
                      ) -> Response:
        """Run ``call`` (an HTTP change), write its record, then give its answer: marked (header
        ``X-UA-Audit: failed`` and, in a JSON object answer, ``audit_warning``) when the record could not be
        written. The change itself stands: the status is its own (PROTOCOL.md §11.2)."""
        token = _AUDITED_CALL.set(True)
        try:
            response = await call()
        finally:
            _AUDITED_CALL.reset(token)
        problem = await self.write(record(response))
        if problem is not None:
            mark_unrecorded(response, problem)
        return response

    def observe(self, kind: ChangeKind, session_id: str, fields: Dict[str, Any]) -> None:
        """A ``Changes`` observer: a session created outside an audited HTTP call (the WebSocket lobby)
        gets its own record, written in the background (observers must not block)."""
        if kind is not ChangeKind.CREATED or in_audited_call():
            return
        record = {"time": _now(), "action": LOBBY_ACTION, "method": None, "route": "/ws/agent",
                  "session": session_id, "params": {"owner": _bounded(fields.get("owner"), secrets=self._secrets)},
                  "client": fields.get("client"), "scope": "session", "outcome": {"status": None},
                  "duration_ms": None}
        self._in_background(record)

    def websocket_cancel(self, session_id: str, client: str, reason: str) -> None:
        """Record a turn cancelled by a WebSocket ``cancel`` message, in the background: a cancel changes
        state as POST .../cancel does, and an operator asks who stopped the turn (PROTOCOL.md §11.2)."""
        self._in_background({"time": _now(), "action": WS_CANCEL_ACTION, "method": None, "route": "websocket",
                             "session": session_id, "params": {"reason": _bounded(reason, secrets=self._secrets)},
                             "client": client, "scope": "session", "outcome": {"status": None},
                             "duration_ms": None})

    async def policy_prune(self, result: Dict[str, Any]) -> None:
        """Record what one background prune (the retention policies, no HTTP call) removed: the totals and
        the sessions deleted, so that "who deleted this session?" has an answer in the audit log too."""
        sessions = [item.get("session_id") for item in result.get("items", ()) if item.get("kind") == "session"]
        await self.write({"time": _now(), "action": POLICY_PRUNE_ACTION, "method": None, "route": None,
                          "session": None, "params": {"sessions": _bounded(sessions, secrets=self._secrets)},
                          "client": None, "scope": "policy",
                          "outcome": {"status": None, **_bounded(result.get("totals") or {}),
                                      "failed": len(result.get("failed") or ())},
                          "duration_ms": None})

    def _in_background(self, record: Dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(self.write(record))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for the records still being written (at shutdown)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def mark_unrecorded(response: Response, problem: str) -> None:
    warning = f"the audit log could not record this call (what it changed stands): {problem}"
    response.headers.append(("X-UA-Audit", "failed"))
    if response.content_type != "application/json":
        return
    try:
        answer = loads_json(response.body)
    except ValueError:
        return
    if isinstance(answer, dict):
        answer["audit_warning"] = warning
        response.body = json.dumps(answer, separators=(",", ":")).encode()


def warn_stderr(message: str) -> None:
    print(f"ua-gateway: warning: {message}", file=sys.stderr, flush=True)


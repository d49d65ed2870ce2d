"""Retention on a running gateway (PROTOCOL.md §15): the background pruner, ``POST /api/v1/ops/prune``,
UA HEAD's ``purge-stale`` and ``bulk-delete``, and the disk figures of health and session details.

Rules this module keeps
-----------------------
* Disk work runs through ``app.run_ops`` (a worker thread), never on the event loop; what runs on the
  loop is only the look at live sessions and the announcements.
* A session with a running turn is never removed, whoever asks; one with a connection is removed only
  by UA's purge-stale and bulk-delete when their body says so (``include_active: true``,
  ``exclude_active: false``), as UA's do. Whether a session is live is asked again just before it is
  removed, not only when the plan is made.
* A removed session is closed and announced as ``_delete`` does it: its sockets get 4004, and
  ``ChangeKind.DELETED`` goes out on ``app.changes``.

May import: the standard library, ``ops_service`` and ``uagw`` modules up to ``sessions`` (the
application is seen through its attributes; its type only under TYPE_CHECKING).
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from ops_service import OpsError, SessionNotFound

from .changes import ChangeKind
from .config import ConfigError, parse_byte_size
from .http11 import HttpError, Request, Response, json_response
from .routing import json_object_body
from .text import loads_json, show
from .websocket import CloseCode

if TYPE_CHECKING:
    from .app import Application

__all__ = ["Pruner", "LiveSessions"]

# Fields of POST /api/v1/ops/prune (PROTOCOL.md §15); an absent one means the configured policy.
BYTE_SIZE = re.compile(r"[0-9]{1,18}([KMGTkmgt]([iI]?[bB])?|[bB])?")  # a budget given as text (OpenAPI: the same)
PRUNE_FIELDS = ("dry_run", "archives_older_than_days", "sessions_idle_days", "budget_bytes")
# UA HEAD's bodies: purge-stale {dry_run=false, older_than_hours=6 (min 1), include_active=false} and
# bulk-delete {older_than_days=7 (min 1), channels?, exclude_active=true} (ua_anchor.md §1.5).
PURGE_STALE_DEFAULT_HOURS = 6
BULK_DELETE_DEFAULT_DAYS = 7
# Channels one bulk-delete may name: UA's list has eight; more is not a filter but garbage.
MAX_CHANNELS = 64
MAX_CHANNEL_CHARS = 64


class LiveSessions:
    """The ids a prune must keep, asked at the moment of each removal (``in``): sessions with a running
    turn and, unless ``connected_too`` is False, those with a connection. Reads the hub's dict from a
    worker thread: a single lookup is atomic under the GIL, and a miss only means "not live"."""

    def __init__(self, app: "Application", connected_too: bool = True) -> None:
        self.app = app
        self.connected_too = connected_too

    def __contains__(self, session_id: object) -> bool:
        hub = self.app.hub
        live = hub.sessions.get(session_id) if hub is not None and isinstance(session_id, str) else None
        if live is None:
            return False
        return live.turn is not None or (self.connected_too and bool(live.sockets))


class Pruner:
    """The retention policies of one application: run on an interval, on request, and reported."""

    def __init__(self, app: "Application") -> None:
        self.app = app
        self.used_bytes: Optional[int] = None  # the root's size at the last prune or measure
        self.measured_at: Optional[float] = None  # epoch seconds of that measure
        self.last_prune: Optional[Dict[str, Any]] = None  # totals of the last real prune

    # -- the background task ------------------------------------------------------------------------------

    async def run_forever(self) -> None:
        """Apply the configured policies now and every ``prune_interval`` s; a failure (root gone, disk
        error) is logged and retried at the next interval, never ends the task."""
        while True:
            try:
                result = await self.prune(dry_run=False)
                if result["items"] or result["failed"]:
                    await self.app.audit.policy_prune(result)  # a change no HTTP call made (PROTOCOL.md §11.2)
            except OpsError as exc:
                if self.app.log is not None:
                    self.app.log.write("prune_failed", detail=exc.detail)
            await asyncio.sleep(self.app.config.prune_interval)

    async def prune(self, dry_run: bool, **policies: Any) -> Dict[str, Any]:
        """Plan (and unless ``dry_run`` apply) the configured policies, each overridden by ``policies``."""
        config = self.app.config
        settings = {
            "archives_older_than_days": config.retain_archives_days,
            "sessions_idle_days": config.retain_idle_sessions_days,
            "budget_bytes": config.disk_budget_bytes,
            "trash_older_than_days": config.retain_trash_days,  # None: any age
        }
        settings.update(policies)
        result = await self.app.run_ops(self.app.ops.prune, protected=LiveSessions(self.app), dry_run=dry_run,
                                        **settings)
        # A dry run's "after" is a projection: the root is as it was measured before.
        self.used_bytes = result["disk"]["used_bytes_before" if dry_run else "used_bytes_after"]
        self.measured_at = time.time()
        if not dry_run:
            self.last_prune = {"at": iso_time(self.measured_at), **result["totals"], "failed": len(result["failed"])}
            self._announce([item["session_id"] for item in result["items"] if item["kind"] == "session"])
            if self.app.log is not None and (result["items"] or result["failed"]):
                self.app.log.write("prune", items=result["totals"]["items"], bytes=result["totals"]["bytes"],
                                   sessions=result["totals"]["sessions"], failed=len(result["failed"]),
                                   paths=[item["path"] for item in result["items"]][:100])
        return result

    def _announce(self, removed: Sequence[str]) -> None:
        """Close the live state of removed sessions and announce them, as ``Application._delete`` does."""
        hub = self.app.hub
        for session_id in removed:
            if hub is not None:
                hub.close_session(session_id, CloseCode.SESSION_NOT_FOUND, "session deleted")
            self.app.changes.publish(ChangeKind.DELETED, session_id)

    # -- reports ------------------------------------------------------------------------------------------

    def health_fields(self) -> Dict[str, Any]:
        """The disk figures an authorized health answer carries (no disk work: the last measure)."""
        budget = self.app.config.disk_budget_bytes
        used = self.used_bytes
        return {"disk": {"used_bytes": used, "budget_bytes": budget,
                         "over_budget": None if used is None or budget is None else used > budget,
                         "measured_at": None if self.measured_at is None else iso_time(self.measured_at),
                         "last_prune": self.last_prune}}

    async def session_details(self, session_id: str) -> Response:
        """Session details plus ``disk``: this session's bytes (live and archived) against the budget."""
        ops = self.app.ops
        details = await self.app.run_ops(ops.session_details, session_id, runtime=self.app.runtime())
        usage = await self.app.run_ops(ops.disk_usage, session_id)
        details["disk"] = {**usage, "budget_bytes": self.app.config.disk_budget_bytes,
                           "root_used_bytes": self.used_bytes}
        return json_response(200, details)

    # -- HTTP handlers ------------------------------------------------------------------------------------

    async def prune_route(self, request: Request, params: Dict[str, str]) -> Response:
        """``POST /api/v1/ops/prune``: absent fields are the configured policies; ``null`` turns one off."""
        body = json_object_body(request, PRUNE_FIELDS)
        # Ours, not UA's: an unknown field is refused, not ignored. {"dryRun": true, ...} meant a preview and
        # was a real run (json_object_body has already checked the body is a JSON object).
        unknown = sorted(set(loads_json(request.body)) - set(PRUNE_FIELDS)) if request.body.strip() else []
        if unknown:
            raise HttpError(400, f"unknown field {show(unknown[0])} in the prune body; the fields are "
                                 f"{', '.join(PRUNE_FIELDS)} (a preview is \"dry_run\": true); nothing was removed")
        dry_run = _flag(body, "dry_run", False)
        for name in ("archives_older_than_days", "sessions_idle_days"):
            if name in body and body[name] is not None and not _positive_number(body[name]):
                raise HttpError(400, f"{name} must be a number of days above 0 (or null: that policy off), not "
                                     f"{show(body[name])}; nothing was removed")
        budget = body.get("budget_bytes")
        if isinstance(budget, str):  # "20G", as UA_DISK_BUDGET_BYTES and --disk-budget take it
            if not BYTE_SIZE.fullmatch(budget):  # "" or " 1G" is no size here: never "no budget" by accident
                raise HttpError(400, f"budget_bytes must be a size such as \"512M\" or \"20G\" (K, M, G, T: powers "
                                     f"of 1024) or a whole number of bytes, not {show(budget)}; nothing was removed")
            try:
                body["budget_bytes"] = budget = parse_byte_size(budget, "budget_bytes")
            except ConfigError as error:
                raise HttpError(400, f"{error}; nothing was removed") from None
        if "budget_bytes" in body and budget is not None and not (
                isinstance(budget, int) and not isinstance(budget, bool) and budget > 0):
            raise HttpError(400, f"budget_bytes must be a whole number of bytes above 0 or a size such as \"20G\" "
                                 f"(or null: no budget), not {show(budget)}; nothing was removed")
        policies = {name: body[name] for name in PRUNE_FIELDS[1:] if name in body}
        return json_response(200, await self.prune(dry_run, **policies))

    async def purge_stale_route(self, request: Request, params: Dict[str, str]) -> Response:
        """UA HEAD's ``POST /api/v1/ops/sessions/purge-stale``."""
        body = json_object_body(request, ("dry_run", "older_than_hours", "include_active"))
        dry_run = _flag(body, "dry_run", False)
        include_active = _flag(body, "include_active", False)
        hours = body.get("older_than_hours", PURGE_STALE_DEFAULT_HOURS)
        if not _positive_number(hours) or hours < 1:
            raise HttpError(400, f"older_than_hours must be a number of hours, at least 1, not {show(hours)}; "
                                 "nothing was deleted")
        rows = await self.app.run_ops(self.app.ops.session_activity)
        stale = {row["session_id"]: row["last_activity_ns"] for row in rows if row["idle_seconds"] >= hours * 3600}
        deleted, failed, skipped = await self._delete_sessions(stale, dry_run, connected_ok=include_active)
        return json_response(200, {"dry_run": dry_run, "older_than_hours": hours, "total_sessions": len(rows),
                                   "deleted_count": len(deleted), "deleted": deleted, "failed": failed,
                                   "skipped_active": skipped})

    async def bulk_delete_route(self, request: Request, params: Dict[str, str]) -> Response:
        """UA HEAD's ``POST /api/v1/ops/sessions/bulk-delete``: counts of deleted, skipped and errors."""
        body = json_object_body(request, ("older_than_days", "channels", "exclude_active"))
        exclude_active = _flag(body, "exclude_active", True)
        days = body.get("older_than_days", BULK_DELETE_DEFAULT_DAYS)
        if not _positive_number(days) or days < 1:
            raise HttpError(400, f"older_than_days must be a number of days, at least 1, not {show(days)}; "
                                 "nothing was deleted")
        channels = _channels(body.get("channels"))
        rows = await self.app.run_ops(self.app.ops.session_activity)
        old = [row for row in rows if row["idle_seconds"] >= days * 86400]
        chosen = {row["session_id"]: row["last_activity_ns"] for row in old if channels is None or row["channel"] in channels}
        deleted, failed, skipped = await self._delete_sessions(chosen, False, connected_ok=not exclude_active)
        return json_response(200, {"deleted": len(deleted), "skipped": len(skipped) + len(old) - len(chosen),
                                   "errors": len(failed)})

    async def _delete_sessions(self, session_ids: Dict[str, int], dry_run: bool,
                               connected_ok: bool) -> Tuple[List[str], List[Dict[str, str]], List[str]]:
        """Delete each session (id -> its last activity in ns when chosen) unless it is live ((deleted, failed,
        skipped) ids); a running turn is always kept, a connection only unless ``connected_ok``. Asked again
        just before each removal; one written to since it was chosen is kept (a failure that says so)."""
        live = LiveSessions(self.app, connected_too=not connected_ok)
        deleted: List[str] = []
        failed: List[Dict[str, str]] = []
        skipped: List[str] = []
        for session_id in session_ids:
            if session_id in live:
                skipped.append(session_id)
                continue
            if dry_run:
                deleted.append(session_id)
                continue
            try:
                kept = await self.app.run_ops(self.app.ops.delete_idle_session, session_id, session_ids[session_id])
            except SessionNotFound:
                failed.append({"session_id": session_id, "error": "already gone"})
                continue
            except OpsError as exc:
                failed.append({"session_id": session_id, "error": exc.detail})
                continue
            if kept is not None:
                failed.append({"session_id": session_id, "error": kept})
                continue
            deleted.append(session_id)
            self._announce([session_id])
        if deleted and not dry_run and self.app.log is not None:
            self.app.log.write("sessions_purged", count=len(deleted), sessions=deleted[:100])
        return deleted, failed, skipped


def iso_time(epoch: float) -> str:
    """ISO 8601 UTC with seconds, as every other time the gateway answers."""
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")


def _flag(body: Dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    # null is refused, not read as the default: on a call that removes files, a dry_run the client meant
    # to set must never quietly become a real run.
    if not isinstance(value, bool):
        raise HttpError(400, f"{name} must be true or false, not {show(value)}; nothing was removed")
    return value


def _positive_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value > 0)


def _channels(value: object) -> Optional[frozenset]:
    """bulk-delete's ``channels``: None (every channel) or a list of channel names."""
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) > MAX_CHANNELS
            or not all(isinstance(item, str) and 0 < len(item) <= MAX_CHANNEL_CHARS for item in value)):
        raise HttpError(400, f"channels must be a list of at most {MAX_CHANNELS} channel names (interactive, "
                             f"vp_mission, scheduled, discord, infrastructure, system, ...), not {show(value, 120)}; "
                             "nothing was deleted")
    return frozenset(value)

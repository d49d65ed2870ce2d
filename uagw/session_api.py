"""Universal Agent's session API (``/api/v1/sessions``; PROTOCOL.md §6.1): create a session (or resume one
by id or workspace), read one, list them, forget one's live state. The handlers of those routes, as
``SessionApi``; what they need of the application is ``SessionApiHost``.

May import: the standard library, ``ops_service``, ``uagw.limits``, ``uagw.text``, ``uagw.http11``,
``uagw.access``, ``uagw.changes``, ``uagw.config``, ``uagw.routing``, ``uagw.websocket``, ``uagw.sessions``.
"""

from __future__ import annotations

import os
from typing import Any, Awaitable, Callable, Dict, Optional, Protocol

import ops_service

from .limits import MAX_USER_ID_CHARS, RESERVED_SESSION_IDS
from .text import show
from .config import Config
from .http11 import HttpError, Request, Response, json_response
from .access import AccessControl
from .changes import ChangeKind, Changes
from .routing import int_param, json_object_body, query_params
from .websocket import CloseCode
from .sessions import SessionHub

__all__ = ["SessionApi", "SessionApiHost"]


class SessionApiHost(Protocol):
    """What the session API needs of the application (``uagw.app.Application``)."""

    config: Config
    access: AccessControl
    ops: ops_service.OpsService
    changes: Changes
    hub: Optional[SessionHub]

    def run_ops(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Awaitable[Any]: ...

    def admit_session_creation(self, address: str) -> None: ...

    async def list_page(self, **query: Any) -> Dict[str, Any]: ...


class SessionApi:
    """The handlers of Universal Agent's ``/api/v1/sessions`` routes."""

    def __init__(self, app: SessionApiHost) -> None:
        self.app = app

    def create(self, request: Request, params: Dict[str, str]) -> Awaitable[Response]:
        body = json_object_body(request, ("user_id", "workspace_dir", "session_id", "metadata"))
        for name in ("user_id", "workspace_dir", "session_id"):
            if body.get(name) is not None and not isinstance(body[name], str):
                raise HttpError(400, f"{name} must be a string or null")
        metadata = body.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise HttpError(400, "metadata must be a JSON object or null")
        claimed = (body.get("user_id") or "").strip() or None
        if claimed is not None and len(claimed) > MAX_USER_ID_CHARS:
            raise HttpError(400, f"user_id is {len(claimed)} characters; at most {MAX_USER_ID_CHARS} are accepted")
        user_id = claimed or self.app.config.default_user
        if not self.app.access.user_allowed(user_id):
            raise self._user_refused(user_id, claimed is None)
        session_id = self._requested_session_id(body.get("session_id"), body.get("workspace_dir"))
        self.app.admit_session_creation(request.client)
        return self._create(session_id, user_id, claimed, metadata or {})

    def _requested_session_id(self, session_id: Optional[str], workspace_dir: Optional[str]) -> Optional[str]:
        """The id a create asks for: ``session_id``, else the name of ``workspace_dir``, which must be a
        directory right under the workspaces root (a relative one is taken from the root); else None."""
        session_id = session_id or None  # "" is no id, as in Universal Agent
        if session_id in RESERVED_SESSION_IDS:
            raise HttpError(400, f"{show(session_id)} names an Ops route (/api/v1/ops/sessions/{session_id}); "
                                 "choose another session id")
        if session_id is not None and not ops_service.is_valid_session_id(session_id):
            raise HttpError(400, f"Invalid session id format: {show(session_id)}; use 1-128 characters of "
                                 "A-Z a-z 0-9 _ . - starting with a letter or digit")
        if not workspace_dir:
            return session_id
        root = str(self.app.ops.root)
        if "\0" in workspace_dir:
            raise HttpError(400, "Workspace path must remain under UA_WORKSPACES_DIR")
        path = os.path.normpath(os.path.join(root, workspace_dir))
        parent, name = os.path.split(path)
        if parent != root and os.path.realpath(parent) != os.path.realpath(root):
            raise HttpError(400, f"Workspace path must remain under UA_WORKSPACES_DIR: {show(workspace_dir)} is not "
                                 f"a directory right under {root}")
        if not ops_service.is_valid_session_id(name) or name == ops_service.GATEWAY_DIR_NAME:
            raise HttpError(400, f"the workspace name {show(name)} is not a valid session id: use 1-128 characters "
                                 "of A-Z a-z 0-9 _ . - starting with a letter or digit")
        if session_id is not None and session_id != name:
            raise HttpError(400, f"session_id {show(session_id)} and workspace_dir {show(workspace_dir)} name two "
                                 "sessions; send one of them, or the same name in both")
        return name

    async def _create(self, session_id: Optional[str], user_id: str, claimed: Optional[str],
                              metadata: Dict[str, Any]) -> Response:
        # Judge the owner the session has or will have before anything is written: a refused create
        # leaves no directory behind. The checks after the write close the race with another creator.
        if session_id is not None:
            try:
                owner: Optional[str] = await self.app.run_ops(self.app.ops.read_session_owner, session_id)
            except ops_service.SessionNotFound:
                owner = ops_service.implied_owner(session_id)
            self._judge_owner(session_id, owner or user_id, user_id, claimed)
        created = await self.app.run_ops(self.app.ops.create_session, session_id)
        session_id = created["session_id"]
        owner = await self.app.run_ops(self.app.ops.record_session_owner, session_id, user_id)
        if created["created"]:
            self.app.changes.publish(ChangeKind.CREATED, session_id, owner=owner)
        self._judge_owner(session_id, owner, user_id, claimed)
        return json_response(200, self._session_reply(session_id, owner, {**metadata, "resumed": False}))

    def _judge_owner(self, session_id: str, owner: str, user_id: str, claimed: Optional[str]) -> None:
        if owner != user_id and claimed is not None:
            raise HttpError(403, f"Access denied: session {session_id} belongs to another user")
        if not self.app.access.user_allowed(owner):
            raise self._user_refused(owner, False)

    @staticmethod
    def _user_refused(user_id: str, by_default: bool) -> HttpError:
        """403 with Universal Agent's detail, followed by which user was judged and what to do."""
        why = (" (the default user, judged because no user_id was given: send one, or set DEFAULT_USER_ID to a "
               "listed user)" if by_default else "")
        return HttpError(403, f"Access denied: User not allowed. {show(user_id)}{why} is not in UA_ALLOWED_USERS")

    def _session_reply(self, session_id: str, user_id: str, metadata: Dict[str, Any]) -> Dict[str, Any]:
        """Universal Agent's CreateSessionResponse."""
        return {
            "session_id": session_id,
            "user_id": user_id,
            "workspace_dir": str(self.app.ops.root / session_id),
            "metadata": {**metadata, "user_id": user_id},
            "run_id": None,
            "is_live_session": True,
        }

    def list_sessions(self, request: Request, params: Dict[str, str]) -> Awaitable[Response]:
        limit = int_param(query_params(request), "limit")
        return self._list_sessions(50 if limit is None else limit)

    async def _list_sessions(self, limit: int) -> Response:
        page = await self.app.list_page(limit=limit)
        rows = []
        for summary in page["sessions"]:
            session_id = summary["session_id"]
            try:
                owner = await self.app.run_ops(self.app.ops.read_session_owner, session_id)
            except ops_service.SessionNotFound:
                continue  # deleted since the listing
            rows.append({
                "session_id": session_id,
                "workspace_dir": str(self.app.ops.root / session_id),
                "status": summary["status"],
                "user_id": owner,
                "metadata": summary,
                "run_id": None,
                "is_live_session": False,
            })
        return json_response(200, {"sessions": rows})

    async def resume(self, request: Request, params: Dict[str, str]) -> Response:
        session_id = params["session_id"]
        try:
            owner = await self.app.run_ops(self.app.ops.read_session_owner, session_id)
        except ops_service.SessionNotFound:
            raise HttpError(404, "Session not found") from None
        if not self.app.access.user_allowed(owner or self.app.config.default_user):
            raise self._user_refused(owner or self.app.config.default_user, owner is None)
        owner = owner or self.app.config.default_user
        return json_response(200, self._session_reply(session_id, owner, {"resumed": True}))

    async def forget(self, request: Request, params: Dict[str, str]) -> Response:
        """Forget a session's live state (its running turn is cancelled, its sockets closed, its turn ids
        forgotten); its files stay. Only the Ops delete removes them."""
        session_id = params["session_id"]
        try:
            await self.app.run_ops(self.app.ops.session_dir, session_id)
        except ops_service.SessionNotFound:
            raise HttpError(404, "Session not found") from None
        hub = self.app.hub
        if hub is not None:
            await hub.cancel_and_wait(session_id, "session deleted")
            hub.close_session(session_id, CloseCode.NORMAL, "session deleted; its files stay")
        return json_response(200, {"status": "deleted", "session_id": session_id})

"""The bench's baseline: the Universal Agent gateway's design, rebuilt on FastAPI + uvicorn.

Rules this file keeps
- It reproduces the *cost* of the original, not its API quirks
  or its bugs' output: every handler is ``async def`` and does its disk work inline on the event loop
  (pathlib ``iterdir``/``stat``/``exists``, JSON reads, one read of up to ``max_bytes`` per log slice).
- The session list builds a summary for *every* directory (a heartbeat JSON parse each), sorts, then
  slices, as the original handler does.
- A log slice reads the whole window ``[size - max_bytes, size)`` in one read, decodes all of it and splits
  it, then keeps the last ``limit`` lines: the original's algorithm. (Its output bugs are not copied: an
  unfinished last line is not returned.)
- Compact is read-then-rewrite in place, like the original (not atomic, not archived).
- A WebSocket turn runs as a background task that sends each event and appends it to the journal with an
  open/write/close on the loop, as the original's ``log_to_journal`` does.
- Where the original did more than this file (the SQLite ``SELECT 1`` of health, the heartbeat service,
  trace.json reads), it is left out: the baseline is, if anything, faster than the original.

Bench-only: never part of the gateway. Run (bench/run.py does it, pinned to one CPU):
    UA_BENCH_WORKSPACES=DIR uvicorn baseline_app:app --app-dir bench --loop uvloop --http httptools --ws websockets
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional

from fastapi import FastAPI, HTTPException, Request, WebSocket, WebSocketDisconnect
from fastapi.middleware.cors import CORSMiddleware
from pydantic import BaseModel

__all__ = ["app", "read_log_slice", "session_summary"]

VERSION = "baseline-0.1"
WORKSPACES = Path(os.environ.get("UA_BENCH_WORKSPACES", "AGENT_RUN_WORKSPACES")).resolve()
OPS_TOKEN = os.environ.get("UA_OPS_TOKEN", "").strip()  # read once at import, as the original did
STARTED = time.monotonic()

# The original's clamps.
MAX_LOG_LIMIT = 5000
MAX_LOG_MAX_BYTES = 1_000_000
LOG_FILES = ("activity_journal.log", "run.log")
# Later versions of the original reject ids that fail this rule; keeping the check
# makes the baseline list the same sessions as the gateway and costs one regex match.
SESSION_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

# "active" in the original means "loaded in this process since it started".
loaded_sessions: set = set()

app = FastAPI(title="ua-gateway bench baseline", version=VERSION)
# The original allows every origin with credentials: the middleware runs on every request.
app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True, allow_methods=["*"], allow_headers=["*"])


# ---------------------------------------------------------------------------------------------------------
# Ops service: file-system work, called inline from the async handlers.
# ---------------------------------------------------------------------------------------------------------


def require_ops_auth(request: Request) -> None:
    if not OPS_TOKEN:
        return
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else ""
    if not token:
        token = request.headers.get("x-ua-ops-token", "").strip()
    if token != OPS_TOKEN:
        raise HTTPException(status_code=401, detail="Unauthorized")


def require_session_id(session_id: str) -> None:
    if not SESSION_ID_RE.match(session_id):
        raise HTTPException(status_code=400, detail="Invalid session id format")


def session_summary(session_dir: Path) -> Dict[str, Any]:
    """One row of the list, built the way the original's ``_build_session_summary`` does."""
    info = session_dir.stat()
    journal = session_dir / "activity_journal.log"
    last_modified = datetime.fromtimestamp(info.st_mtime).isoformat()
    summary: Dict[str, Any] = {
        "session_id": session_dir.name,
        "workspace_dir": str(session_dir),
        "status": "active" if session_dir.name in loaded_sessions else "idle",
        "last_modified": last_modified,
        "has_run_log": (session_dir / "run.log").exists(),
        "has_activity_journal": journal.exists(),
        "has_memory": (session_dir / "MEMORY.md").exists() or (session_dir / "memory").exists(),
    }
    summary["last_activity"] = (
        datetime.fromtimestamp(journal.stat().st_mtime).isoformat() if summary["has_activity_journal"] else last_modified
    )
    heartbeat_file = session_dir / "heartbeat_state.json"
    if heartbeat_file.exists():
        try:
            state = json.loads(heartbeat_file.read_text())
        except (OSError, ValueError):
            state = None
        if isinstance(state, dict) and state:
            summary["heartbeat_last"] = state.get("last_run")
            summary["heartbeat_summary"] = state.get("last_summary")
    return summary


def list_sessions(status_filter: str = "all") -> List[Dict[str, Any]]:
    rows = []
    for entry in WORKSPACES.iterdir():
        if entry.is_dir() and SESSION_ID_RE.match(entry.name):
            rows.append((entry.stat().st_mtime, session_summary(entry)))
    if status_filter != "all":
        rows = [row for row in rows if row[1]["status"] == status_filter]
    rows.sort(key=lambda row: row[0], reverse=True)  # directory mtime, newest first
    return [summary for _, summary in rows]


def read_log_slice(path: Path, cursor: Optional[int], limit: int, max_bytes: int) -> Dict[str, Any]:
    """The original's slice: one read of the whole byte window, decoded and split, last ``limit`` lines."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return {"file": path.name, "cursor": 0, "size": 0, "lines": [], "truncated": False, "reset": False}
    max_bytes = min(max(max_bytes, 1), MAX_LOG_MAX_BYTES)
    limit = min(max(limit, 1), MAX_LOG_LIMIT)
    reset = False
    if cursor is None:
        start = max(0, size - max_bytes)
    else:
        cursor = min(max(cursor, 0), size)
        if size - cursor > max_bytes:
            reset = True
            start = max(0, size - max_bytes)
        else:
            start = cursor
    truncated = start > 0
    if size == 0 or start >= size:
        return {"cursor": size, "size": size, "lines": [], "truncated": truncated, "reset": reset}
    with path.open("rb") as handle:
        previous = b"\n"
        if start > 0:
            handle.seek(start - 1)
            previous = handle.read(1)
        else:
            handle.seek(0)
        data = handle.read(size - start)
    lines = data.decode("utf-8", errors="replace").split("\n")
    if previous != b"\n" and lines:
        lines = lines[1:]  # the window began inside a line
    lines.pop()  # "" after the last newline, or an unfinished line: not returned
    if len(lines) > limit:
        lines = lines[-limit:]
    return {"cursor": size, "size": size, "lines": lines, "truncated": truncated, "reset": reset}


def tail_file(session_id: str, filename: str, cursor: Optional[int], limit: int, max_bytes: int) -> Dict[str, Any]:
    path = WORKSPACES / session_id / filename
    if not path.exists():
        return {"file": filename, "cursor": 0, "size": 0, "lines": [], "truncated": False, "reset": False}
    return read_log_slice(path, cursor, limit, max_bytes)


def compact_session(session_id: str, max_lines: int, max_bytes: int) -> Optional[Dict[str, Any]]:
    workspace = WORKSPACES / session_id
    if not workspace.is_dir():
        return None
    files = {}
    for name in LOG_FILES:
        path = workspace / name
        if not path.exists():
            continue
        kept = read_log_slice(path, None, max_lines, max_bytes)["lines"]
        path.write_text("\n".join(kept) + ("\n" if kept else ""))  # truncating rewrite, as the original
        files[name] = len(kept)
    return {"status": "compacted", "files": files}


# ---------------------------------------------------------------------------------------------------------
# HTTP handlers: async def, disk work inline.
# ---------------------------------------------------------------------------------------------------------


class CompactRequest(BaseModel):
    max_lines: int = 400
    max_bytes: int = 200_000


@app.get("/api/v1/health")
async def health() -> Dict[str, Any]:
    return {"status": "ok", "version": VERSION, "uptime_s": round(time.monotonic() - STARTED, 3)}


@app.get("/api/v1/ops/sessions")
async def ops_list_sessions(request: Request, limit: int = 100, offset: int = 0, status: str = "all") -> Dict[str, Any]:
    require_ops_auth(request)
    sessions = list_sessions(status)
    return {"sessions": sessions[offset:offset + limit], "total": len(sessions), "limit": limit, "offset": offset}


@app.get("/api/v1/ops/sessions/{session_id}")
async def ops_session(request: Request, session_id: str) -> Dict[str, Any]:
    require_ops_auth(request)
    require_session_id(session_id)
    workspace = WORKSPACES / session_id
    if not workspace.is_dir():
        raise HTTPException(status_code=404, detail="Session not found")
    return {"session": session_summary(workspace)}


@app.get("/api/v1/ops/sessions/{session_id}/preview")
async def ops_preview(request: Request, session_id: str, limit: int = 200, max_bytes: int = 200_000) -> Dict[str, Any]:
    require_ops_auth(request)
    require_session_id(session_id)
    result = tail_file(session_id, "activity_journal.log", None, limit, max_bytes)
    return {"session_id": session_id, **result}


@app.post("/api/v1/ops/sessions/{session_id}/compact")
async def ops_compact(request: Request, session_id: str, body: CompactRequest) -> Dict[str, Any]:
    require_ops_auth(request)
    require_session_id(session_id)
    result = compact_session(session_id, body.max_lines, body.max_bytes)
    if result is None:
        raise HTTPException(status_code=404, detail="Session not found")
    return result


@app.get("/api/v1/ops/logs/tail")
async def ops_logs_tail(
    request: Request,
    session_id: Optional[str] = None,
    cursor: Optional[int] = None,
    limit: int = 200,
    max_bytes: int = 250_000,
) -> Dict[str, Any]:
    require_ops_auth(request)
    if session_id is None:
        raise HTTPException(status_code=400, detail="session_id or path required")
    require_session_id(session_id)
    path = WORKSPACES / session_id / "run.log"
    return {"file": str(path), **tail_file(session_id, "run.log", cursor, limit, max_bytes)}


# ---------------------------------------------------------------------------------------------------------
# WebSocket: the original's stream endpoint with an echo agent.
# ---------------------------------------------------------------------------------------------------------


def envelope(event_type: str, data: Dict[str, Any]) -> Dict[str, Any]:
    return {"type": event_type, "data": data, "timestamp": datetime.now().isoformat()}


def log_to_journal(workspace: Path, event_type: str, text: str) -> None:
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    with open(workspace / "activity_journal.log", "a", encoding="utf-8") as journal:
        journal.write(f"[{stamp}] [{event_type.upper()}] {text}\n")


def append_run_log(workspace: Path, text: str) -> None:
    with open(workspace / "run.log", "a", encoding="utf-8") as run_log:
        run_log.write(text + "\n")


async def run_turn(websocket: WebSocket, workspace: Path, user_input: str) -> None:
    """The echo agent's turn, delivered like the original's background task: event, journal line, send."""
    try:
        append_run_log(workspace, f"echo: {user_input}")
        for event_type, data, text in (
            ("status", {"status": "processing"}, "processing"),
            ("text", {"text": user_input}, user_input),
        ):
            log_to_journal(workspace, event_type, text)
            await websocket.send_json(envelope(event_type, data))
        await websocket.send_json(envelope("query_complete", {"completed": True}))
    except Exception as exc:  # the peer went away mid-turn: the original logs and drops it
        if not isinstance(exc, (WebSocketDisconnect, RuntimeError)):
            raise


@app.websocket("/api/v1/sessions/{session_id}/stream")
async def session_stream(websocket: WebSocket, session_id: str) -> None:
    if not SESSION_ID_RE.match(session_id):
        await websocket.close(code=4000)
        return
    await websocket.accept()
    workspace = WORKSPACES / session_id
    if not workspace.is_dir():
        await websocket.close(code=4004, reason="Session not found")
        return
    loaded_sessions.add(session_id)
    await websocket.send_json(envelope("connected", {"session_id": session_id, "workspace_dir": str(workspace)}))
    turns = set()
    try:
        while True:
            raw = await websocket.receive_text()
            try:
                message = json.loads(raw)
            except ValueError:
                await websocket.send_json(envelope("error", {"message": "Invalid JSON"}))
                continue
            kind = message.get("type") if isinstance(message, dict) else None
            data = message.get("data") or {} if isinstance(message, dict) else {}
            if kind == "execute":
                user_input = data.get("user_input", "")
                if not isinstance(user_input, str) or not user_input.strip():
                    await websocket.send_json(envelope("error", {"message": "Empty user_input"}))
                    continue
                task = asyncio.create_task(run_turn(websocket, workspace, user_input))
                turns.add(task)
                task.add_done_callback(turns.discard)
            elif kind == "ping":
                await websocket.send_json(envelope("pong", {}))
            else:
                await websocket.send_json(envelope("error", {"message": f"Unknown message type: {kind}"}))
    except WebSocketDisconnect:
        pass

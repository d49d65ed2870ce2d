"""Sessions and agent connections (docs/PROTOCOL.md §6): who is connected (``SessionHub``,
``LiveSession``), which turn runs, finished turns remembered for retries (``FinishedTurns``), and the agent
protocol on one WebSocket (``AgentSocket``). Event-loop only.

May import: the standard library, ``ops_service``, and ``uagw`` modules below it (limits, text, config, http11, access,
logs, websocket, agents, transcripts). What it needs of the application above it (``SessionHost``) and of a WebSocket
(``MessageChannel``) are Protocols here.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List, Optional, Protocol, Tuple, Union

import ops_service
from ops_service import InvalidArgument, OpsError, OpsService, SessionNotFound

from .limits import (
    MAX_CLIENT_TURN_ID, MAX_PENDING_BYTES, MAX_PENDING_MESSAGES, REMEMBERED_SESSIONS, REMEMBERED_TURN_AGE,
    REMEMBERED_TURN_IDS, REPLAY_HOLD_BYTES, REPLAY_MAX_BYTES, REPLAY_MAX_EVENTS,
)
from .text import loads_json, show
from .config import Config
from .http11 import HttpError
from .access import AccessControl
from .changes import ChangeKind, Changes
from .logs import GatewayLog, SessionWriter
from .websocket import CloseCode
from .agents import (
    AgentFailed, AgentTurn, TurnEvent, TurnState, frame_json, inline_agent, journal_line, signal_group,
    terminate_group, turn_ids,
)
from .transcripts import QUERY_RECORD, EventRing, TranscriptRecorder, bounded_replay, replay_gap_status, seq_frame

__all__ = [
    "AgentSocket",
    "FinishedTurns",
    "LiveSession",
    "MessageChannel",
    "SessionHost",
    "SessionHub",
]


class SessionHost(Protocol):
    """What the hub and its sockets need of the application (``uagw.app.Application``)."""

    @property
    def ops(self) -> OpsService: ...

    @property
    def access(self) -> AccessControl: ...

    @property
    def log(self) -> Optional[GatewayLog]: ...

    @property
    def hub(self) -> Optional["SessionHub"]: ...

    @property
    def config(self) -> Config: ...

    @property
    def changes(self) -> Changes: ...

    def run_ops(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Awaitable[Any]: ...

    def admit_session_creation(self, address: str) -> None: ...

    def agent_command_limit(self) -> int: ...

    def audit_websocket_cancel(self, session_id: str, client: str, reason: str) -> None: ...


class MessageChannel(Protocol):
    """What an ``AgentSocket`` needs of its WebSocket (``uagw.websocket.WebSocketBridge``)."""

    @property
    def open(self) -> bool: ...

    @property
    def client(self) -> str: ...

    def send_text(self, text: str) -> None: ...

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None: ...


class LiveSession:
    """A session with connections or a running turn. Lives in ``SessionHub.sessions`` only meanwhile."""

    def __init__(self, session_id: str, workspace_dir: Path, event_seq: int = 0) -> None:
        self.session_id = session_id
        self.workspace_dir = workspace_dir
        self.sockets: "set[AgentSocket]" = set()
        self.turn: Optional[AgentTurn] = None
        # The seq of the session's last recorded event (UA's last_event_seq): it goes on from the turn
        # files across restarts (PROTOCOL.md §12). ``ring``: the recent ones, for replay.
        self.event_seq = event_seq
        self.ring = EventRing()


class FinishedTurns:
    """The client_turn_ids of finished turns, per session, so that a client that retries after a
    reconnect gets the first answer instead of a second run (issue 16.9). Event-loop only.

    Kept whether or not the session has a connection, and bounded: REMEMBERED_TURN_IDS ids per session,
    each for REMEMBERED_TURN_AGE s, for at most REMEMBERED_SESSIONS sessions (least recently used first out).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_sessions: int = REMEMBERED_SESSIONS,
                 max_ids: int = REMEMBERED_TURN_IDS, max_age: float = REMEMBERED_TURN_AGE) -> None:
        self.clock = clock
        self.max_sessions = max_sessions
        self.max_ids = max_ids
        self.max_age = max_age
        # session_id -> {client_turn_id: (turn_id, completed, finished at)}, both oldest first
        self._sessions: Dict[str, Dict[str, Tuple[str, bool, float]]] = {}

    def remember(self, session_id: str, client_turn_id: str, turn_id: str, completed: bool) -> None:
        ids = self._sessions.pop(session_id, None) or {}
        self._sessions[session_id] = ids
        ids.pop(client_turn_id, None)
        ids[client_turn_id] = (turn_id, completed, self.clock())
        while len(ids) > self.max_ids:
            del ids[next(iter(ids))]
        while len(self._sessions) > self.max_sessions:
            del self._sessions[next(iter(self._sessions))]

    def lookup(self, session_id: str, client_turn_id: str) -> Optional[Tuple[str, bool]]:
        """``(turn_id, completed)`` of the finished turn that had this client_turn_id, or None."""
        ids = self._sessions.get(session_id)
        if ids is None:
            return None
        horizon = self.clock() - self.max_age
        while ids and next(iter(ids.values()))[2] < horizon:
            del ids[next(iter(ids))]
        found = ids.get(client_turn_id)
        return None if found is None else (found[0], found[1])

    def forget(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)


class SessionHub:
    """Connections and turns of every live session. Event-loop only."""

    def __init__(self, gateway: SessionHost, agent: Callable[[AgentTurn], Awaitable[None]]) -> None:
        self.gateway = gateway
        self.agent = agent
        self.inline = inline_agent(agent)  # the agent's synchronous body, if it has one (the echo agent)
        self.sessions: Dict[str, LiveSession] = {}
        self.agent_groups: "set[int]" = set()  # process groups of running agent commands
        self.group_reapers: Dict[int, asyncio.Task] = {}  # groups being terminated, in the background
        self.finished = FinishedTurns()
        self.writer = SessionWriter(gateway.ops, gateway.log)
        self.transcripts = TranscriptRecorder(self.writer)
        # The last seq of sessions no longer live, so that one going live again before its files are read
        # back numbers on; REMEMBERED_SESSIONS at most (least recently forgotten first out).
        self.known_seqs: Dict[str, int] = {}
        self.replay_max_events = REPLAY_MAX_EVENTS
        self.replay_max_bytes = REPLAY_MAX_BYTES

    def snapshot(self) -> Dict[str, Tuple[int, bool, int]]:
        """{session_id: (connections, running, last_event_seq)} of the live sessions."""
        return {sid: (len(live.sockets), live.turn is not None, live.event_seq) for sid, live in self.sessions.items()}

    def running(self, session_id: str) -> bool:
        live = self.sessions.get(session_id)
        return live is not None and live.turn is not None

    def attach(self, session_id: str, workspace_dir: Path, sock: "AgentSocket", event_seq: int = 0) -> LiveSession:
        """Add ``sock`` to the session, making it live (numbering its events on from ``event_seq``) if needed."""
        live = self.sessions.get(session_id)
        if live is None:
            event_seq = max(event_seq, self.known_seqs.pop(session_id, 0))
            live = self.sessions[session_id] = LiveSession(session_id, workspace_dir, event_seq)
        live.sockets.add(sock)
        self.gateway.changes.publish(ChangeKind.CONNECTIONS, session_id, connections=len(live.sockets))
        return live

    def detach(self, sock: "AgentSocket") -> None:
        live = self.sessions.get(sock.session_id or "")
        if live is None:
            return
        if sock in live.sockets:
            live.sockets.discard(sock)
            self.gateway.changes.publish(ChangeKind.CONNECTIONS, live.session_id, connections=len(live.sockets))
        self._forget_if_idle(live)

    def _forget_if_idle(self, live: LiveSession) -> None:
        if not live.sockets and live.turn is None:
            self.sessions.pop(live.session_id, None)
            self.known_seqs[live.session_id] = live.event_seq
            while len(self.known_seqs) > REMEMBERED_SESSIONS:
                del self.known_seqs[next(iter(self.known_seqs))]

    def broadcast(self, session_id: str, event_type: str, data: Dict[str, Any], turn_id: Optional[str] = None) -> None:
        """Send an event to every connection of the session and append it to the journal. An event of a
        turn (``turn_id``, else the running turn's) gets the session's next seq and goes to its transcript."""
        live = self.sessions.get(session_id)
        turn_id = turn_id or (live.turn.turn_id if live is not None and live.turn is not None else None)
        if live is None or turn_id is None:
            frame = frame_json(event_type, data)
            for sock in list(live.sockets if live is not None else ()):
                sock.channel.send_text(frame)
        else:
            live.event_seq += 1
            frame = seq_frame(live.event_seq, event_type, data)
            self.transcripts.record(session_id, turn_id, live.ring, live.event_seq, frame)
            for sock in list(live.sockets):
                sock.deliver(live.event_seq, frame)
        self.writer.append(session_id, "activity_journal.log", journal_line(event_type, data))

    def start_turn(self, live: LiveSession, sock: "AgentSocket", user_input: str, metadata: Dict[str, Any],
                   client_turn_id: Optional[str]) -> None:
        if live.turn is not None:
            if client_turn_id is not None and client_turn_id == live.turn.client_turn_id:
                sock.send("status", {"status": "turn_in_progress", "turn_id": live.turn.turn_id})
                return
            # The refused attempt gets an id of its own, so that a client matching answers by turn_id
            # can tell this query_complete from the running turn's.
            refused = {"turn_id": next(turn_ids), **({"client_turn_id": client_turn_id} if client_turn_id else {})}
            sock.send("status", {"status": "turn_rejected_busy", "active_turn_id": live.turn.turn_id, **refused})
            sock.send("query_complete", {"completed": False, **refused})
            return
        finished = self.finished.lookup(live.session_id, client_turn_id) if client_turn_id is not None else None
        if finished is not None:
            turn_id, completed = finished
            sock.send("status", {"status": "duplicate_turn_ignored", "turn_id": turn_id, "client_turn_id": client_turn_id})
            sock.send("query_complete", {"completed": completed, "duplicate": True, "turn_id": turn_id})
            return
        turn = AgentTurn(self, live, user_input, metadata, client_turn_id)
        live.turn = turn
        live.event_seq += 1  # the query opens the transcript; it is not sent (the client knows what it sent)
        query = {"turn_id": turn.turn_id, "client_turn_id": client_turn_id, "user_input": user_input, "metadata": metadata}
        self.transcripts.record(live.session_id, turn.turn_id, live.ring, live.event_seq,
                                seq_frame(live.event_seq, QUERY_RECORD, query), sent=False)
        inline = self.inline
        if inline is not None:
            self.gateway.changes.publish(ChangeKind.TURN_STARTED, live.session_id, turn_id=turn.turn_id,
                                         client_turn_id=client_turn_id)
            self._run_inline(live, turn, inline)
            return
        turn.task = asyncio.get_running_loop().create_task(self._run_turn(live, turn))
        self.gateway.changes.publish(ChangeKind.TURN_STARTED, live.session_id, turn_id=turn.turn_id,
                                     client_turn_id=client_turn_id)
        # A task cancelled before its first step never runs its body (issue 16.1); its turn ends all the same.
        turn.task.add_done_callback(lambda _task: self._end_turn(live, turn, completed=False))

    async def _run_turn(self, live: LiveSession, turn: AgentTurn) -> None:
        completed = False
        try:
            if turn.advance(TurnEvent.RUN) is None:
                return  # cancelled before it started: the agent is never called
            await self.agent(turn)
            completed = True
        except asyncio.CancelledError:
            pass
        except AgentFailed as exc:
            turn.emit("error", {"message": str(exc)})
        except Exception as exc:  # an embedded agent's bug must not take the gateway down
            turn.emit("error", {"message": f"agent failed: {exc!r}"[:1000]})
        finally:
            self._end_turn(live, turn, completed)

    def _run_inline(self, live: LiveSession, turn: AgentTurn, body: Callable[[AgentTurn], None]) -> None:
        """``_run_turn`` for an agent that never awaits (``inline_agent``): the whole turn now, in the
        read that brought its execute, so its frames leave in that read's one write (no task, no loop
        passes). Nothing can cancel it meanwhile: it ends before anything else runs."""
        completed = False
        try:
            turn.advance(TurnEvent.RUN)
            body(turn)
            completed = True
        except AgentFailed as exc:
            turn.emit("error", {"message": str(exc)})
        except Exception as exc:  # as in _run_turn: a bug must not take the gateway down
            turn.emit("error", {"message": f"agent failed: {exc!r}"[:1000]})
        finally:
            self._end_turn(live, turn, completed)

    def _end_turn(self, live: LiveSession, turn: AgentTurn, completed: bool) -> None:
        """End ``turn``: query_complete to every connection, its client_turn_id remembered, the heartbeat.
        Every way a turn can end comes here; the END transition makes it happen once."""
        if turn.advance(TurnEvent.END) is None:
            return
        completed = completed and not turn.cancelled
        if live.turn is turn:
            live.turn = None
        done: Dict[str, Any] = {"completed": completed, "turn_id": turn.turn_id}
        if turn.client_turn_id is not None:
            self.finished.remember(live.session_id, turn.client_turn_id, turn.turn_id, completed)
            done["client_turn_id"] = turn.client_turn_id
        self.broadcast(live.session_id, "query_complete", done, turn_id=turn.turn_id)
        ended = time.time()
        self.gateway.changes.publish(ChangeKind.TURN_FINISHED, live.session_id, turn_id=turn.turn_id,
                                     completed=completed, cancelled=turn.cancelled, events=turn.events,
                                     duration_s=round(max(0.0, ended - turn.started), 6))
        self.writer.heartbeat(live.session_id, {
            "last_run": ended,
            "last_turn": {
                "turn_id": turn.turn_id,
                "completed": completed,
                "cancelled": turn.cancelled,
                "started": datetime.fromtimestamp(turn.started, timezone.utc).isoformat(),
                "ended": datetime.fromtimestamp(ended, timezone.utc).isoformat(),
                "events": turn.events,
            },
        })
        self._forget_if_idle(live)

    def stop_agent_group(self, group: int) -> asyncio.Task:
        """Terminate an agent command's process group in the background: SIGTERM, then SIGKILL after
        ``config.agent_kill_grace`` s. Once per group: a second call gets the same task. The shutdown SIGKILLs
        whatever is left of it."""
        reaper = self.group_reapers.get(group)
        if reaper is None:
            self.agent_groups.add(group)
            reaper = self.group_reapers[group] = asyncio.get_running_loop().create_task(
                terminate_group(group, self.gateway.config.agent_kill_grace))
            reaper.add_done_callback(lambda _task: self._group_stopped(group))
        return reaper

    def _group_stopped(self, group: int) -> None:
        self.group_reapers.pop(group, None)
        self.agent_groups.discard(group)

    def cancel(self, session_id: str, reason: str) -> Optional[asyncio.Task]:
        """Cancel the running turn: ``cancelled`` goes out now; the task ends once the agent has stopped.
        Returns the turn's task (also when a cancel was already under way), or None without a turn."""
        return self._cancel(session_id, reason)[0]

    def start_cancel(self, session_id: str, reason: str) -> bool:
        """Like ``cancel``; True only when this call started the cancellation (not a repeat)."""
        return self._cancel(session_id, reason)[1]

    def _cancel(self, session_id: str, reason: str) -> Tuple[Optional[asyncio.Task], bool]:
        live = self.sessions.get(session_id)
        if live is None or live.turn is None or live.turn.task is None:
            return None, False
        turn, task = live.turn, live.turn.task
        before = turn.advance(TurnEvent.CANCEL)
        if before is not None:
            self.broadcast(session_id, "cancelled", {"reason": reason, "turn_id": turn.turn_id, "session_id": session_id,
                                                     "run_id": None})
            if before is TurnState.RUNNING:
                task.cancel()  # a STARTING turn's task sees CANCELLING and never calls the agent
        return task, before is not None

    async def cancel_and_wait(self, session_id: str, reason: str) -> None:
        task = self.cancel(session_id, reason)
        if task is not None:
            await asyncio.wait([task])

    def close_session(self, session_id: str, code: int, reason: str) -> None:
        live = self.sessions.get(session_id)
        if live is not None:
            for sock in list(live.sockets):
                sock.channel.close(code, reason)
        self.finished.forget(session_id)  # deleted: a new session of that id starts with no history

    async def shutdown(self, grace: float) -> None:
        tasks = [t for t in (self.cancel(sid, "server shutting down") for sid in list(self.sessions)) if t is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        for live in list(self.sessions.values()):
            if live.turn is not None:
                # An embedded agent that ignores its cancel still has its turn ended before the sockets close.
                self._end_turn(live, live.turn, completed=False)
        for group in list(self.agent_groups):
            # An agent that ignored SIGTERM for the whole grace period must not outlive the gateway.
            signal_group(group, signal.SIGKILL)
        for reaper in list(self.group_reapers.values()):
            reaper.cancel()
        self.writer.hand_over()
        await asyncio.get_running_loop().run_in_executor(None, self.writer.close)


class AgentSocket:
    """The agent protocol on one WebSocket (PROTOCOL.md §6): attach, turns, input, cancel, ping."""

    def __init__(self, gateway: SessionHost, session_id: Optional[str], user_id: Optional[str],
                 last_seq: Optional[int] = None) -> None:
        assert gateway.hub is not None, "sockets are made by a started gateway"
        self.last_seq = last_seq  # ?last_seq=N: the events after N are replayed on attach (PROTOCOL.md §12)
        self.held: Optional[List[Tuple[int, str]]] = None  # live events held while the replay reads the disk
        self.held_bytes = 0
        self.gateway = gateway
        self.hub = gateway.hub
        self.session_id = session_id
        self.lobby = session_id is None
        self.live: Optional[LiveSession] = None
        self.pending: Optional[List[Union[str, bytes]]] = []  # messages held until attached; None once live
        self.pending_bytes = 0  # their memory (sys.getsizeof): MAX_PENDING_BYTES at most
        self.user_id = user_id
        self.bridge: Optional[MessageChannel] = None  # from on_open on

    @property
    def channel(self) -> MessageChannel:
        assert self.bridge is not None, "used once open"
        return self.bridge

    def send(self, event_type: str, data: Dict[str, Any]) -> None:
        self.channel.send_text(frame_json(event_type, data))

    def deliver(self, seq: int, frame: str) -> None:
        """Send an event of a turn, or hold it while this socket's replay is being read."""
        if self.held is None:
            self.channel.send_text(frame)
            return
        self.held.append((seq, frame))
        self.held_bytes += len(frame)
        if self.held_bytes > REPLAY_HOLD_BYTES:
            self.held = None
            self.channel.close(CloseCode.POLICY_VIOLATION, f"events came faster than the replay was read; reconnect "
                                                           f"with last_seq={self.last_seq}")

    # -- WebSocketBridge app interface ---------------------------------------------------------------------

    def on_open(self, bridge: MessageChannel) -> None:
        self.bridge = bridge
        # The session's owner is judged once it is known (_attach); a claim sent here must pass as well,
        # and in the lobby the claim (else the default user) will own the new session.
        claim = self.user_id if self.user_id is not None or not self.lobby else self.gateway.config.default_user
        if claim is not None and not self.gateway.access.user_allowed(claim):
            judged = "the default user" if self.user_id is None else "the user claimed by X-UA-User or user_id"
            bridge.close(CloseCode.USER_NOT_ALLOWED, f"Access denied: {judged} is not in UA_ALLOWED_USERS")
            return
        if self.lobby:
            self.pending = None
            return
        if not ops_service.is_valid_session_id(self.session_id or ""):
            bridge.close(CloseCode.INVALID_SESSION_ID, "invalid session id")
            return
        asyncio.get_running_loop().create_task(self._attach(self.session_id or "", None))

    def on_message(self, bridge: MessageChannel, message: Union[str, bytes]) -> None:
        if self.pending is not None:
            self.pending_bytes += sys.getsizeof(message)
            if len(self.pending) >= MAX_PENDING_MESSAGES:
                bridge.close(CloseCode.POLICY_VIOLATION, "too many messages before the session was attached; wait for 'connected'")
            elif self.pending_bytes > MAX_PENDING_BYTES:
                bridge.close(CloseCode.POLICY_VIOLATION, f"over {MAX_PENDING_BYTES >> 20} MiB sent before the session was attached; "
                                   "wait for 'connected'")
            else:
                self.pending.append(message)
            return
        self._handle(message)

    def on_close(self, bridge: MessageChannel) -> None:
        self.hub.detach(self)

    # -- protocol ------------------------------------------------------------------------------------------

    async def _attach(self, session_id: str, first: Optional[Union[str, bytes]], owner: Optional[str] = None) -> None:
        """Attach to ``session_id`` (``owner``: already known, as for a session the lobby just created)."""
        ops = self.gateway.ops
        try:
            workspace = await self.gateway.run_ops(ops.session_dir, session_id)
        except SessionNotFound:
            self.channel.close(CloseCode.SESSION_NOT_FOUND, "session not found")
            return
        except InvalidArgument:
            self.channel.close(CloseCode.INVALID_SESSION_ID, "invalid session id")
            return
        except OpsError as exc:
            self.channel.close(CloseCode.INTERNAL_ERROR, exc.detail)
            return
        if owner is None:
            try:
                owner = await self.gateway.run_ops(ops.read_session_owner, session_id)
            except OpsError:
                owner = None  # removed meanwhile: the session directory was found a moment ago
        owner = owner or self.gateway.config.default_user
        if not self.channel.open:
            return
        if not self.gateway.access.user_allowed(owner):
            self.channel.close(CloseCode.USER_NOT_ALLOWED, "Access denied: the session's owner is not in UA_ALLOWED_USERS")
            return
        event_seq = await self._stored_seq(session_id)
        if event_seq is None or not self.channel.open:
            return
        self.session_id = session_id
        if self.last_seq is not None:
            self.held, self.held_bytes = [], 0  # from now on until the replay is sent: no gap, no duplicate
        self.live = self.hub.attach(session_id, Path(workspace), self, event_seq)
        session = {"session_id": session_id, "workspace": str(workspace), "workspace_dir": str(workspace),
                   "user_id": owner, "run_id": None, "is_live_session": True, "session_url": None,
                   "logfire_enabled": False}
        self.send("connected", {"message": "Connected to Universal Agent", "session": session,
                                "session_id": session_id, "workspace_dir": str(workspace), "user_id": owner,
                                "run_id": None, "is_live_session": True})
        if self.last_seq is not None:
            await self._replay(self.live, self.last_seq)
            if not self.channel.open:
                return
        if self.live.turn is not None:
            self.send("status", {"status": "processing", "active_turn_id": self.live.turn.turn_id})
            if self.live.turn.awaiting_input is not None:
                self.send("input_required", self.live.turn.awaiting_input)
        held, self.pending, self.pending_bytes = self.pending or [], None, 0
        for message in ([first] if first is not None else []) + held:
            self._handle(message)

    async def _stored_seq(self, session_id: str) -> Optional[int]:
        """The last seq in the session's turn files if it is not live (0 if it is), read once the writer has
        written what it holds; None if that failed (the socket is closed)."""
        if session_id in self.hub.sessions:
            return 0
        await self.hub.writer.flushed(session_id)
        try:
            return int(await self.gateway.run_ops(self.gateway.ops.last_turn_seq, session_id))
        except SessionNotFound:
            self.channel.close(CloseCode.SESSION_NOT_FOUND, "session not found")
        except OpsError as exc:
            self.channel.close(CloseCode.INTERNAL_ERROR, f"the session's turn records cannot be read: {exc.detail}")
        return None

    async def _replay(self, live: LiveSession, after: int) -> None:
        """Send the events after seq ``after``, oldest first, from memory or else from the turn files,
        then the live ones held meanwhile (PROTOCOL.md §12). Bounded: what does not fit is named in a
        ``replay_incomplete`` status sent first."""
        current = live.event_seq  # every later event is held (or, from memory, there is no wait at all)
        hub = self.hub
        try:
            if after > current:
                self.send("status", {"status": "replay_incomplete", "last_seq": current, "detail":
                                     f"last_seq {after} is ahead of this session's last event ({current}): its "
                                     "history was deleted or belongs to another gateway; take what follows"})
                return
            if after == current:
                return
            if live.ring.covers(after):
                entries, complete = live.ring.after(after), True
            else:
                await hub.writer.flushed(live.session_id)
                try:
                    found = await self.gateway.run_ops(self.gateway.ops.read_turn_records, live.session_id, after,
                                                       current, hub.replay_max_events + 1, hub.replay_max_bytes)
                except OpsError as exc:
                    found = {"records": [], "complete": False, "first_seq": None, "error": exc.detail}
                entries = [(seq, line) for seq, kind, line in found["records"] if kind != QUERY_RECORD]
                seqs = [seq for seq, _kind, _line in found["records"]]
                # Anything missing (a lost write, a removed file) is reported, never skipped in silence.
                complete = found["complete"] and seqs == list(range(after + 1, current + 1))
            replay = bounded_replay(entries, after, current, complete, hub.replay_max_events, hub.replay_max_bytes)
            if not self.channel.open:
                return
            if replay.lost_from is not None and replay.lost_to is not None:
                self.send("status", replay_gap_status(live.session_id, replay.lost_from, replay.lost_to,
                                                      "past the replay limits, or no longer recorded"))
            for _seq, frame in replay.frames:
                self.channel.send_text(frame)
        finally:
            held, self.held, self.held_bytes = self.held or [], None, 0
            if self.channel.open:
                for _seq, frame in held:
                    self.channel.send_text(frame)

    async def _create_and_attach(self, first: Union[str, bytes]) -> None:
        try:
            self.gateway.admit_session_creation(self.channel.client)
        except HttpError as refusal:
            # Still a lobby: the client may retry this execute once the wait is over.
            self.session_id = None
            retry_after = dict(refusal.headers).get("Retry-After")
            self.send("error", {"message": refusal.detail, "retry_after": int(retry_after or 1)})
            held, self.pending, self.pending_bytes = self.pending or [], None, 0
            for message in held:
                self._handle(message)
            return
        ops = self.gateway.ops
        owner = self.user_id or self.gateway.config.default_user

        def create() -> Tuple[str, str]:  # one trip to the disk thread: messages wait meanwhile
            session_id = ops.create_session()["session_id"]
            return session_id, ops.record_session_owner(session_id, owner)

        try:
            session_id, owner = await self.gateway.run_ops(create)
        except OpsError as exc:
            self.send("error", {"message": f"could not create a session: {exc.detail}"})
            self.pending = None
            return
        self.gateway.changes.publish(ChangeKind.CREATED, session_id, owner=owner, client=self.channel.client)
        await self._attach(session_id, first, owner)

    def _handle(self, message: Union[str, bytes]) -> None:
        if isinstance(message, bytes):
            self.send("error", {"message": "binary messages are not supported; send JSON text frames"})
            return
        try:
            envelope = loads_json(message)
        except ValueError as exc:
            self.send("error", {"message": f"message is not valid JSON ({exc}); send {{\"type\": ..., \"data\": {{...}}}}"})
            return
        if not isinstance(envelope, dict) or not isinstance(envelope.get("type"), str):
            self.send("error", {"message": "message must be a JSON object with a string \"type\""})
            return
        kind = envelope["type"]
        data = envelope.get("data")
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.send("error", {"message": "\"data\" must be a JSON object"})
            return
        if kind == "ping":
            self.send("pong", {})
        elif kind in ("execute", "query"):
            self._execute(kind, data, message)
        elif kind == "input_response":
            self._input_response(data)
        elif kind == "cancel":
            reason = data.get("reason")
            reason = reason if isinstance(reason, str) else "cancelled by client"
            if self.live is None or self.hub.cancel(self.live.session_id, reason) is None:
                self.send("error", {"message": "no turn is running to cancel"})
            else:
                self.gateway.audit_websocket_cancel(self.live.session_id, self.channel.client, reason)
        else:
            self.send("error", {"message": f"unknown message type {show(kind)}; "
                                "expected execute, query, input_response, cancel or ping"})

    def _execute(self, kind: str, data: Dict[str, Any], raw: str) -> None:
        user_input = data.get("user_input" if kind == "execute" else "text")
        if not isinstance(user_input, str) or not user_input.strip():
            field = "data.user_input" if kind == "execute" else "data.text"
            self.send("error", {"message": f"{kind} needs a non-empty string {field}"})
            return
        metadata = data.get("metadata", {})
        if not isinstance(metadata, dict):
            metadata = {"raw": metadata}
        turn_id = data.get("client_turn_id")
        if turn_id is not None and (not isinstance(turn_id, str) or not 0 < len(turn_id) <= MAX_CLIENT_TURN_ID):
            self.send("error", {"message": f"client_turn_id must be a string of 1-{MAX_CLIENT_TURN_ID} characters"})
            return
        if self.live is None:
            if self.lobby and self.session_id is None:
                self.session_id = ""
                self.pending = []
                asyncio.get_running_loop().create_task(self._create_and_attach(raw))
            return
        self.hub.start_turn(self.live, self, user_input, metadata, turn_id)

    def _input_response(self, data: Dict[str, Any]) -> None:
        turn = self.live.turn if self.live is not None else None
        if turn is None:
            self.send("error", {"message": "no turn is waiting for input"})
            return
        input_id = data.get("input_id", "default")
        refused = turn.inputs.offer({"input_id": input_id if isinstance(input_id, str) else "default",
                                     "response": data.get("response")})
        if not refused:
            turn.awaiting_input = None
        if refused:
            self.send("error", {"message": f"{refused}; this one was dropped: send it again once the agent has read "
                                           "them (after its next input_required)"})

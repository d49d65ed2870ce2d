"""The agent runtime (docs/PROTOCOL.md §6.5, §6.8 and §9): one turn's life (``TurnState``,
``AgentTurn``), the echo agent, agent commands (``command_agent``: JSON lines on stdin and stdout, process
groups, cancel and kill), and the formats of what a turn writes (``one_line``, ``journal_line``). An agent
knows its turn, not the network.

May import: the standard library, ``uagw.limits``, ``uagw.text`` and ``uagw.config``. The session hub a
turn reports to (``uagw.sessions``) is named for type checking only.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import itertools
import json
import os
import re
import shlex
import signal
import sys
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Dict, List, Optional, Sequence, Tuple

from .limits import (
    AGENT_DRAIN_TIMEOUT, AGENT_EXIT_WAIT, AGENT_GROUP_POLL, AGENT_KILL_GRACE, MAX_AGENT_LINE, MAX_CLIENT_TURN_ID,
    MAX_JOURNAL_LINE, MAX_PENDING_INPUTS, MAX_PENDING_INPUT_BYTES,
)
from .text import PerSecond, loads_json, show
from .config import HIDDEN_FROM_AGENTS, ConfigError

if TYPE_CHECKING:  # names for annotations only: importing them would point up the layers
    from .sessions import LiveSession, SessionHub

__all__ = [
    "AGENT_EVENT_RE",
    "AgentFailed",
    "AgentLineSplitter",
    "AgentOutputReader",
    "AgentTurn",
    "InputQueue",
    "RESERVED_EVENT_TYPES",
    "SAFE_CLIENT_TURN_ID_RE",
    "TURN_TRANSITIONS",
    "TurnEvent",
    "TurnState",
    "command_agent",
    "cut_marker",
    "compact_json",
    "echo_agent",
    "echo_turn",
    "frame_json",
    "inline_agent",
    "journal_line",
    "journal_stamp",
    "one_line",
    "resolve_agent_command",
    "turn_ids",
    "signal_group",
    "terminate_group",
    "utc_now_iso",
]


AGENT_EVENT_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
RESERVED_EVENT_TYPES = frozenset(("connected", "query_complete", "cancelled", "pong"))  # the gateway's own


# The client_turn_ids that are handed to an agent command (UA_CLIENT_TURN_ID): nothing a shell would split,
# expand or glob. Others still de-duplicate turns; they just do not reach the agent's environment.
SAFE_CLIENT_TURN_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,%d}" % MAX_CLIENT_TURN_ID)


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


# Encoders made once: json.dumps with any option builds a JSONEncoder per call (~1.5 us), on every frame.
compact_json = json.JSONEncoder(separators=(",", ":")).encode
_journal_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, sort_keys=True).encode


def frame_json(event_type: str, data: Any) -> str:
    return compact_json({"type": event_type, "data": data, "timestamp": utc_now_iso()})


journal_stamp = PerSecond(lambda second: datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%d %H:%M:%S"))

# What ends or disguises a line in a log viewer, a terminal or a line-by-line reader: the C0 controls (CR,
# LF, ESC, ...), DEL, the C1 controls (NEL U+0085 among them), the Unicode line and paragraph separators,
# and the backslash, which the escapes themselves use.
_LINE_UNSAFE_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\\]")
_LINE_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(match: "re.Match[str]") -> str:
    char = match.group()
    return _LINE_ESCAPES.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def one_line(text: str) -> str:
    """``text`` made one log line: every character that could end it or start a forged one is escaped.

    The one escape for everything the gateway writes into a session's logs on a client's or an agent's
    behalf (journal lines, ``AgentTurn.log``): ``\\n``, ``\\r``, ``\\t``, ``\\\\``, else ``\\xNN`` or ``\\uNNNN``.
    """
    return _LINE_UNSAFE_RE.sub(_escape_char, text)


def cut_marker(cut_bytes: int) -> bytes:
    """What ends a line that was cut to a limit, so a reader knows how much is missing."""
    return f" ...[{cut_bytes} bytes cut]".encode()


def journal_line(event_type: str, data: Any) -> bytes:
    """``[YYYY-MM-DD HH:MM:SS] [TYPE] text`` (UTC), one line whatever the event holds."""
    stamp = journal_stamp()
    text = None
    if isinstance(data, dict):
        for key in ("text", "message", "status"):
            if isinstance(data.get(key), str):
                text = data[key]
                break
    if text is None:
        text = _journal_json(data)
    line = f"[{stamp}] [{event_type.upper()}] {one_line(text)}".encode("utf-8", "replace")
    if len(line) > MAX_JOURNAL_LINE:
        line = line[:MAX_JOURNAL_LINE] + cut_marker(len(line) - MAX_JOURNAL_LINE)
    return line + b"\n"


class InputQueue(asyncio.Queue):
    """The ``input_response``s a turn's agent has not taken yet (``AgentTurn.next_input``).

    ``offer`` holds an answer as compact JSON text and counts its memory in ``held_bytes``; ``get``
    parses it back. Anything else put (the ``None`` that tells a forwarder to stop) is passed as is.
    """

    def _init(self, maxsize: int) -> None:
        super()._init(maxsize)
        self.held_bytes = 0

    def offer(self, answer: Dict[str, Any]) -> Optional[str]:
        """Queue ``answer``, or say why not: over MAX_PENDING_INPUTS or MAX_PENDING_INPUT_BYTES (an empty
        queue takes any one answer, so that every answer can get through)."""
        if self.qsize() >= MAX_PENDING_INPUTS:
            return f"the agent has not read the last {MAX_PENDING_INPUTS} input responses"
        try:
            text = json.dumps(answer, ensure_ascii=False, separators=(",", ":"))
        except (ValueError, RecursionError):  # parsed by loads_json, so this is a safety net only
            return "the input response cannot be encoded as JSON"
        if self.qsize() and self.held_bytes + sys.getsizeof(text) > MAX_PENDING_INPUT_BYTES:
            return f"the agent has not read {self.held_bytes} bytes of earlier input responses"
        self.put_nowait(text)
        return None

    def _put(self, item: Any) -> None:
        if isinstance(item, str):
            self.held_bytes += sys.getsizeof(item)
        super()._put(item)

    def _get(self) -> Any:
        item = super()._get()
        if isinstance(item, str):
            self.held_bytes -= sys.getsizeof(item)
            return json.loads(item)
        return item


class TurnState(enum.Enum):
    """Where a turn is in its life. ``AgentTurn.advance`` is the only place that changes it."""

    STARTING = "starting"  # accepted and its task scheduled; the agent has not been called
    RUNNING = "running"  # the agent runs; its events reach the session's connections
    CANCELLING = "cancelling"  # "cancelled" went out; the agent is being stopped, its events are dropped
    ENDED = "ended"  # query_complete went out; nothing of the turn follows

    # Every advance looks a (state, event) pair up in TURN_TRANSITIONS; Enum's own __hash__ is Python code
    # (~0.4 us a call). Members compare by identity, so identity's hash is as good and runs in C.
    __hash__ = object.__hash__


class TurnEvent(enum.Enum):
    RUN = "run"  # the turn's task is about to call the agent
    CANCEL = "cancel"  # a client, a forced delete or the shutdown cancels the turn
    END = "end"  # the agent returned or raised, the task ended without calling it, or the shutdown gave up

    __hash__ = object.__hash__  # as TurnState's


# The whole life of a turn. A pair missing here is refused: a second cancel, a run after a cancel (so a
# turn cancelled before its task started never calls the agent), anything after the end. Every path to
# the end goes through END, so a turn ends, with one query_complete, exactly once (issue 16.1).
TURN_TRANSITIONS: Dict[Tuple[TurnState, TurnEvent], TurnState] = {
    (TurnState.STARTING, TurnEvent.RUN): TurnState.RUNNING,
    (TurnState.STARTING, TurnEvent.CANCEL): TurnState.CANCELLING,
    (TurnState.RUNNING, TurnEvent.CANCEL): TurnState.CANCELLING,
    (TurnState.STARTING, TurnEvent.END): TurnState.ENDED,
    (TurnState.RUNNING, TurnEvent.END): TurnState.ENDED,
    (TurnState.CANCELLING, TurnEvent.END): TurnState.ENDED,
}


class AgentTurn:
    """What an agent sees of one turn. ``emit`` and ``log`` may be called from the event loop only.

    An embedded agent is ``async def agent(turn: AgentTurn) -> None``: it calls ``turn.emit(type, data)``
    for each event, ``turn.log(text)`` for raw output, and ``await turn.next_input()`` to receive the
    client's ``input_response`` messages. Raising ends the turn with an ``error`` event.
    """

    def __init__(self, hub: "SessionHub", live: "LiveSession", user_input: str, metadata: Dict[str, Any],
                 client_turn_id: Optional[str]) -> None:
        self.hub = hub
        self.session_id = live.session_id
        self.workspace_dir = live.workspace_dir
        self.user_input = user_input
        self.metadata = metadata
        self.client_turn_id = client_turn_id
        self.turn_id = next(turn_ids)  # the gateway's own, never the client's: agents use it in commands
        self.inputs = InputQueue()
        self.state = TurnState.STARTING
        self.cancelled = False  # set on entering CANCELLING and kept after the end, for the heartbeat
        self.task: Optional[asyncio.Task] = None
        self.awaiting_input: Optional[Dict[str, Any]] = None  # the last input_required not yet answered
        self.started = time.time()
        self.events = 0

    def advance(self, event: TurnEvent) -> Optional[TurnState]:
        """Apply ``event`` (see TURN_TRANSITIONS); return the state it left, or None if refused."""
        before = self.state
        after = TURN_TRANSITIONS.get((before, event))
        if after is None:
            return None
        self.state = after
        self.cancelled = self.cancelled or after is TurnState.CANCELLING
        return before

    def emit(self, event_type: str, data: Any = None) -> None:
        if self.state is not TurnState.RUNNING:
            return  # cancelled (the client was told) or ended: nothing of this turn follows its query_complete
        if not isinstance(event_type, str) or not AGENT_EVENT_RE.fullmatch(event_type) or event_type in RESERVED_EVENT_TYPES:
            self.log(f"[gateway] agent sent an event of invalid type {show(event_type)}; ignored")
            return
        if not isinstance(data, dict):
            data = {} if data is None else {"value": data}
        self.events += 1
        if event_type == "input_required":
            self.awaiting_input = data  # asked again of a client that attaches before it is answered
        self.hub.broadcast(self.session_id, event_type, data)

    def log(self, text: str) -> None:
        """Append ``text`` to run.log as one line; line breaks in it are escaped (see ``one_line``)."""
        self.hub.writer.append(self.session_id, "run.log", one_line(text).encode("utf-8", "replace") + b"\n")

    async def next_input(self) -> Dict[str, Any]:
        return await self.inputs.get()


# Gateway-made turn ids: unique in this process and unlikely to repeat across restarts, without a
# system call per turn.
_TURN_ID_PREFIX = "turn_" + os.urandom(4).hex()
turn_ids = (f"{_TURN_ID_PREFIX}{n:06x}" for n in itertools.count(1))


class AgentFailed(Exception):
    """An agent's turn failed in a way the client should hear about as an ``error`` event."""


def echo_turn(turn: AgentTurn) -> None:
    """The built-in agent's whole turn: a status, the input back as text; the gateway adds query_complete."""
    turn.emit("status", {"status": "processing"})
    turn.log(f"echo: {turn.user_input}")
    turn.emit("text", {"text": turn.user_input})


async def echo_agent(turn: AgentTurn) -> None:
    """The built-in agent (``echo_turn``), as an agent coroutine for those who call it as one."""
    echo_turn(turn)


def inline_agent(agent: Callable[[AgentTurn], Awaitable[None]]) -> Optional[Callable[[AgentTurn], None]]:
    """The synchronous body of ``agent`` if it never awaits (the echo agent), else None. The hub runs such a
    turn at once, in the read that brought its execute: no task, no loop pass between it and its frames."""
    return echo_turn if agent is echo_agent else None


def resolve_agent_command(command: str) -> str:
    """``command`` with a relative program path (``./agent.sh args``) made absolute against the gateway's
    working directory: commands run in the session's directory, where such a path would not resolve.
    Raises ConfigError when that program does not exist. Anything else is left to the shell."""
    stripped = command.lstrip()
    word = stripped.split(None, 1)[0] if stripped else ""
    if "/" not in word or word.startswith(("/", "~")) or any(c in word for c in "'\"\\$`;&|<>(){}*?"):
        return command
    program = os.path.abspath(word)
    if not os.path.exists(program):
        raise ConfigError(f"agent command program {show(word)} not found (looked for {program}); agent commands "
                          "run in the session's directory, so give a path that exists from where the gateway starts")
    return shlex.quote(program) + stripped[len(word):]


def command_agent(command: str) -> Callable[[AgentTurn], Awaitable[None]]:
    """An agent that runs ``command`` per turn (PROTOCOL.md §6): the request as one JSON line on stdin,
    JSON-line events on stdout; other stdout lines and all stderr go to run.log.

    The turn ends when the command's process exits, whoever else still holds its pipes. Whatever ends
    it (that exit, a cancel, the shutdown, an error while reading), the command's whole process group is
    terminated: SIGTERM, then SIGKILL after AGENT_KILL_GRACE s for what is left. A turn whose command
    exited ends at once, while what it left behind is stopped in the background; a cancelled or failed
    turn ends once the group has stopped.
    """

    async def run(turn: AgentTurn) -> None:
        limit = turn.hub.gateway.agent_command_limit()
        if len(turn.hub.agent_groups) >= limit:
            raise AgentFailed(f"{limit} agent commands are running, the most this gateway allows at once "
                              "(its open-file limit and MAX_AGENT_COMMANDS); retry when one has finished")
        process, exited = await _start_agent_process(command, turn)
        group = process.pid  # start_new_session: the shell leads a process group of its own
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None
        stdin = process.stdin
        room = turn.hub.writer.wait_for_room
        readers = [AgentOutputReader(process.stdout, functools.partial(_on_agent_stdout, turn), room),
                   AgentOutputReader(process.stderr, functools.partial(_on_agent_raw_line, turn), room)]
        inputs = asyncio.ensure_future(_forward_inputs(turn, stdin))
        _write_json_line(stdin, _agent_request(turn))
        stopping: Optional[asyncio.Task] = None
        try:
            await _until_exit(exited, readers)
            stopping = turn.hub.stop_agent_group(group)  # what it started in the background ends with its turn
            await _drain(readers)
        finally:
            stopping = stopping or turn.hub.stop_agent_group(group)
            if not exited.done():
                # Cancelled, or failed while the agent runs: the turn ends once its group has stopped.
                await asyncio.wait([stopping])
                await asyncio.wait([exited], timeout=AGENT_EXIT_WAIT)
            for reader in readers:
                reader.stop()
            await _stop_inputs(turn, inputs, stdin)
        if process.returncode != 0:
            raise AgentFailed(f"agent command exited with status {process.returncode}; its output is in run.log")

    return run


class _AgentProcessProtocol(asyncio.subprocess.SubprocessStreamProtocol):
    """asyncio's protocol for a subprocess with pipes, plus ``exited``: a future set when it exits.

    ``Process.wait()`` cannot say that: from Python 3.11 on it also waits for every pipe to close, and
    a child the agent left behind holds them for as long as it lives (issue 16.6).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=2 ** 16, loop=loop)  # asyncio's default limit; we never readline()
        self.exited: "asyncio.Future[None]" = loop.create_future()

    def process_exited(self) -> None:
        super().process_exited()
        if not self.exited.done():
            self.exited.set_result(None)


def _agent_env(turn: AgentTurn) -> Dict[str, str]:
    """The command's environment: the gateway's, without any secret, with the turn's ids (never the
    client's id verbatim in UA_TURN_ID: an agent that interpolates it in a command must be safe)."""
    hidden = HIDDEN_FROM_AGENTS | {"UA_CLIENT_TURN_ID"}
    env = {key: value for key, value in os.environ.items() if key not in hidden}
    env["UA_SESSION_ID"] = turn.session_id
    env["UA_TURN_ID"] = turn.turn_id
    if turn.client_turn_id is not None and SAFE_CLIENT_TURN_ID_RE.fullmatch(turn.client_turn_id):
        env["UA_CLIENT_TURN_ID"] = turn.client_turn_id
    return env


async def _start_agent_process(
    command: str, turn: AgentTurn
) -> Tuple["asyncio.subprocess.Process", "asyncio.Future[None]"]:
    """Start ``command`` in the session directory, in a process group of its own, known to the hub.

    A cancel that arrives while the shell is being started lets it start, then stops its group and
    waits for it: no agent process may run without the hub knowing its group.
    """
    loop = asyncio.get_running_loop()
    pipe = asyncio.subprocess.PIPE
    starting = asyncio.ensure_future(loop.subprocess_shell(
        lambda: _AgentProcessProtocol(loop), command, cwd=str(turn.workspace_dir), env=_agent_env(turn),
        stdin=pipe, stdout=pipe, stderr=pipe, start_new_session=True))
    try:
        transport, protocol = await asyncio.shield(starting)
    except asyncio.CancelledError:
        transport, protocol = await starting
        await asyncio.wait([turn.hub.stop_agent_group(transport.get_pid())])
        await asyncio.wait([protocol.exited], timeout=AGENT_EXIT_WAIT)
        transport.close()
        raise
    turn.hub.agent_groups.add(transport.get_pid())
    return asyncio.subprocess.Process(transport, protocol, loop), protocol.exited


def _agent_request(turn: AgentTurn) -> Dict[str, Any]:
    return {
        "type": "execute",
        "session_id": turn.session_id,
        "turn_id": turn.turn_id,
        "workspace_dir": str(turn.workspace_dir),
        "data": {"user_input": turn.user_input, "metadata": turn.metadata, "client_turn_id": turn.client_turn_id},
    }


def _write_json_line(stdin: asyncio.StreamWriter, message: Dict[str, Any]) -> None:
    if not stdin.is_closing():
        stdin.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")


async def _forward_inputs(turn: AgentTurn, stdin: asyncio.StreamWriter) -> None:
    while True:
        answer = await turn.next_input()
        if answer is None:  # the turn is ending
            return
        _write_json_line(stdin, {"type": "input_response", "data": answer})
        try:
            await stdin.drain()  # an agent that does not read its stdin holds the inputs back
        except (ConnectionError, BrokenPipeError):
            return


async def _stop_inputs(turn: AgentTurn, inputs: "asyncio.Future[None]", stdin: asyncio.StreamWriter) -> None:
    turn.inputs.put_nowait(None)  # the forwarder's cue to stop
    await asyncio.wait([inputs], timeout=1.0)
    inputs.cancel()
    stdin.close()
    try:
        # Python 3.9 logs "Future exception was never retrieved" for a stdin pipe that broke
        # (the agent exited without reading it) unless someone awaits its closing.
        await asyncio.wait_for(stdin.wait_closed(), 1.0)
    except (OSError, asyncio.TimeoutError):
        pass


def _on_agent_stdout(turn: AgentTurn, line: bytes, cut: int) -> None:
    """A JSON event goes to the clients; any other line to run.log. A cut line is never parsed: it is
    not what the agent wrote (issue 16.7)."""
    event = None
    if not cut:
        try:
            event = loads_json(line)
        except ValueError:  # also a line of 5,000 "[" (issue 16.5), or NaN that no client could parse
            event = None
    if isinstance(event, dict) and isinstance(event.get("type"), str):
        turn.emit(event["type"], event.get("data"))
    else:
        _on_agent_raw_line(turn, line, cut)


def _on_agent_raw_line(turn: AgentTurn, line: bytes, cut: int) -> None:
    turn.hub.writer.append(turn.session_id, "run.log", line + (cut_marker(cut) if cut else b"") + b"\n")


class AgentLineSplitter:
    """Splits an agent's output into lines of at most ``max_line`` bytes. Sans-I/O: bytes in, lines out.

    ``feed`` and ``finish`` give ``(line, cut)`` pairs, ``cut`` being the bytes dropped from a line over
    the limit. Such a line comes out when its newline arrives (or at the end), its first ``max_line``
    bytes only; the rest of it is skipped, never taken for lines of its own (issue 16.7). A trailing CR
    is removed.
    """

    def __init__(self, max_line: int = MAX_AGENT_LINE) -> None:
        self.max_line = max_line
        self._line = bytearray()
        self._cut = 0

    def feed(self, data: bytes) -> List[Tuple[bytes, int]]:
        end = data.find(b"\n")
        if end < 0:
            self._add(data, 0, len(data))
            return []
        self._add(data, 0, end)
        lines = [self._take()]
        # The lines wholly inside ``data``, split at C speed: agents send many short lines per read.
        *whole, rest = data[end + 1:].split(b"\n")
        limit = self.max_line
        lines.extend((line.rstrip(b"\r"), 0) if len(line) <= limit else (line[:limit].rstrip(b"\r"), len(line) - limit)
                     for line in whole)
        self._add(rest, 0, len(rest))
        return lines

    def finish(self) -> Optional[Tuple[bytes, int]]:
        """The last line, when the output ended without a newline."""
        return self._take() if self._line or self._cut else None

    def _add(self, data: bytes, start: int, end: int) -> None:
        keep = max(0, min(end - start, self.max_line - len(self._line)))
        self._line += data[start:start + keep]
        self._cut += end - start - keep

    def _take(self) -> Tuple[bytes, int]:
        line, cut = bytes(self._line), self._cut
        self._line.clear()
        self._cut = 0
        return line.rstrip(b"\r"), cut


class AgentOutputReader:
    """Reads one output pipe of an agent command, line by line, until EOF or ``stop()``.

    It counts what it reads, so that ``_drain`` can tell a pipe that still delivers from a silent one.
    An exception of ``on_line`` ends the reading task with it.
    """

    def __init__(self, stream: asyncio.StreamReader, on_line: Callable[[bytes, int], None],
                 room: Callable[[], Awaitable[None]]) -> None:
        self.bytes_read = 0
        self._splitter = AgentLineSplitter()
        self._on_line = on_line
        self._room = room  # waits while the session writer is too far behind: backpressure to the agent
        self.task = asyncio.ensure_future(self._read(stream))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while True:
            await self._room()
            chunk = await stream.read(65536)
            if not chunk:
                break
            self.bytes_read += len(chunk)
            for line, cut in self._splitter.feed(chunk):
                self._on_line(line, cut)
        self._flush()

    def stop(self) -> None:
        """Stop reading (a child the agent left behind may hold the pipe); keep an unfinished last line."""
        if not self.task.done():
            self.task.cancel()
            self._flush()

    def _flush(self) -> None:
        last = self._splitter.finish()
        if last is not None:
            self._on_line(*last)


async def _until_exit(exited: "asyncio.Future[None]", readers: Sequence[AgentOutputReader]) -> None:
    """Wait for the agent's exit. An exception while reading its output ends the wait, and the turn."""
    waiting = {exited, *(reader.task for reader in readers)}
    while not exited.done():
        done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not exited and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]


async def _drain(readers: Sequence[AgentOutputReader]) -> None:
    """Read what an exited agent left in its pipes: until EOF, or until they have been silent for
    AGENT_DRAIN_TIMEOUT s (a child it left behind holds them; it is not waited for). Bounded in all by
    AGENT_KILL_GRACE: by then that child has been killed, unless it escaped the process group."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + AGENT_KILL_GRACE + AGENT_DRAIN_TIMEOUT
    tasks = [reader.task for reader in readers]
    seen = -1
    while True:
        read = sum(reader.bytes_read for reader in readers)
        if read == seen or loop.time() >= deadline:
            break
        seen = read
        _, pending = await asyncio.wait(tasks, timeout=AGENT_DRAIN_TIMEOUT)
        if not pending:
            break
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


async def terminate_group(group: int, grace: float = AGENT_KILL_GRACE) -> None:
    """SIGTERM a process group, then SIGKILL what is left of it after ``grace`` seconds.

    The group, not the process: the command runs under /bin/sh, which may die of the SIGTERM while the
    agent it started ignores it, and the children an agent starts in the background are in it too.
    """
    if not signal_group(group, signal.SIGTERM):
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while signal_group(group, 0):
        if loop.time() >= deadline:
            signal_group(group, signal.SIGKILL)
            return
        await asyncio.sleep(AGENT_GROUP_POLL)


def signal_group(group: int, signum: int) -> bool:
    """Send ``signum`` to a process group; False when no process of it is left (0 just checks)."""
    try:
        os.killpg(group, signum)
        return True
    except (ProcessLookupError, PermissionError):
        return False

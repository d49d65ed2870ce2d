"""ua-gateway's command-line client for the Ops API: sessions and logs from a terminal.

Rules this file keeps
- Standard library only, Python 3.9+: it ships inside ``ua_gateway.pyz`` and runs wherever the gateway
  runs (``python ua_gateway.pyz sessions list``).
- The token comes from the environment (``UA_OPS_TOKEN``) and never from the command line, where ``ps``
  and shell histories would show it. It is sent as ``Authorization: Bearer`` and never printed.
- Exit status: 0 done, 1 the gateway refused or could not be reached (its ``detail`` goes to stderr),
  2 a usage error (argparse's convention), including a delete that was not confirmed where nobody can
  be asked.
- Tables for people by default; ``--json`` prints the gateway's answer unchanged, for scripts.
- Text from the gateway (log lines, file names, error details) is an agent's or anybody's text: printed
  for people, its control characters are shown escaped (``\\x1b``), never sent to the terminal, which would
  obey them (OSC 52 writes the clipboard). ``logs tail --raw`` is the one way to print them as they are.
- Redirects are never followed: urllib would send the token along to wherever they point.
- An answer is untrusted input: at most MAX_ANSWER_BYTES are read, at most MAX_ANSWER_DEPTH levels of
  nesting are accepted, and its shape (the keys and types each command reads) is checked before any
  of it is used. Anything else is a ClientError naming what was wrong (exit 1), never a traceback.
- A stream is untrusted input too (PROTOCOL.md §18): each line and each event is capped, each event the
  command reads is checked like an answer, an id goes back as Last-Event-ID only if it is printable
  ASCII, and only a well-formed plain slice means "a gateway without streams: poll".

Theory of operation: ``main`` parses arguments and calls one ``run_*`` function per command. Those talk
to the gateway through ``GatewayClient`` (one method per endpoint, plain dicts in and out) and format
the answer. ``logs tail --follow``, ``audit --follow`` and ``sessions watch`` read Server-Sent Events
(``open_stream``, ``follow_stream``: reconnect with ``Last-Event-ID`` after a drop, bounded backoff); a
gateway that does not stream is polled by ``follow_log``, which passes the cursor back verbatim, asks
again at once while ``more`` is true, and otherwise waits ``FOLLOW_INTERVAL``.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, TextIO

__all__ = [
    "ApiError",
    "ClientError",
    "DEFAULT_URL",
    "GatewayClient",
    "build_parser",
    "SseEvent",
    "follow_log",
    "follow_stream",
    "format_table",
    "main",
    "shown",
]

DEFAULT_URL = "http://127.0.0.1:8002"  # the gateway's default bind (PROTOCOL.md §1)
REQUEST_TIMEOUT = 30.0  # a reset or compact of a large log takes a few seconds; a hung gateway does not hang us
FOLLOW_INTERVAL = 1.0  # how often `logs tail --follow` asks for new lines when it is caught up
# Streams (PROTOCOL.md §13). The gateway sends a keep-alive comment after 15 s of silence: four of them
# missed means the link is dead, even if no FIN or RST ever came.
STREAM_READ_TIMEOUT = 60.0
STREAM_RETRIES = 8  # reconnects in a row without an event in between, then the client gives up (exit 1)
STREAM_BACKOFF = (0.25, 0.5, 1.0, 2.0, 4.0)  # seconds before each reconnect in a row; the last repeats
MAX_EVENT_LINE = 4 * 1024 * 1024  # one SSE line: a slice of at most 1 MiB of log, JSON-escaped, fits
# One event, all its lines: its data line, id and name fit with room to spare. Lines of fields the client
# ignores count too: an event that never ends (no blank line ever) must not keep it reading for ever.
MAX_EVENT_BYTES = MAX_EVENT_LINE + 64 * 1024
# An event id is sent back verbatim as Last-Event-ID: the gateway's are a cursor (under 200 characters of
# base64url) or "<run>-<n>"; longer ones, and any character outside printable ASCII (CR and LF would end
# the header and start another: header injection), are no id the gateway gave.
MAX_EVENT_ID_CHARS = 1024
TAIL_LIMIT = 200  # the gateway's default slice size (PROTOCOL.md §5)
PROG = "ua_gateway"
MAX_ANSWER_BYTES = 16 * 1024 * 1024  # a page of 1,000 sessions or a log slice is well under 1 MiB; more is not
# the gateway's answer, and reading it unbounded would let whatever answers fill this process's memory
MAX_ERROR_BYTES = 64 * 1024  # an error's body is one sentence of detail; the rest is not read
MAX_DETAIL_CHARS = 1000  # an error detail printed on one line of stderr is cut to this
MAX_ANSWER_DEPTH = 100  # the gateway's own fields nest 3 levels, a heartbeat an agent wrote comes through as
# it is, so leave room; decoding and printing recurse, and 100 stays far from Python's recursion limit

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2

# Characters a terminal obeys or reorders rather than shows: C0 controls but TAB (ESC starts CSI and
# OSC sequences, CR overwrites a line), DEL, C1 controls (0x9B is CSI by itself), the Unicode line and
# paragraph separators, the bidi embeddings, overrides and isolates (text that reads other than it is,
# CVE-2021-42574), and lone surrogates (not characters; printing one would raise UnicodeEncodeError).
TERMINAL_UNSAFE = frozenset(
    [*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029,
     *range(0x202A, 0x202F), *range(0x2066, 0x206A), *range(0xD800, 0xE000)]
)
_SHOWN = {code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" for code in TERMINAL_UNSAFE}
# json.dumps escapes C0 itself; with ensure_ascii=False it leaves the rest raw. Inside JSON they can only
# be in strings, where \uXXXX is the same character: the output stays the gateway's answer.
_JSON_ESCAPED = {code: f"\\u{code:04x}" for code in TERMINAL_UNSAFE if code >= 0x7F}


# ---------------------------------------------------------------------------------------------------------
# Talking to the gateway
# ---------------------------------------------------------------------------------------------------------


class ClientError(Exception):
    """The request did not get an answer we can use; the message says what to do."""


class ApiError(ClientError):
    """The gateway answered with an error status. ``detail`` is its explanation."""

    def __init__(self, status: int, detail: str, retry_after: Optional[str] = None) -> None:
        self.status = status
        self.detail = detail
        self.retry_after = retry_after
        super().__init__(self._explain())

    def _explain(self) -> str:
        if self.status == 401:
            return (f"401 {self.detail}: the gateway needs its token; set UA_OPS_TOKEN to it "
                    "(the client reads the token from the environment only)")
        if self.status == 429 and self.retry_after:
            return f"429 {self.detail} (Retry-After: {self.retry_after} s)"
        return f"{self.status} {self.detail}"


def shown(value: Any) -> str:
    """``str(value)`` safe to print to a terminal: each TERMINAL_UNSAFE character as ``\\xNN`` or ``\\uNNNN``."""
    return str(value).translate(_SHOWN)


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Turns every redirect into an HTTPError: urllib's default follows it to any host, Authorization included."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        return None


def _is_loopback_url(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class GatewayClient:
    """One method per Ops API endpoint; each returns the decoded JSON answer or raises ClientError."""

    def __init__(self, base_url: str, token: Optional[str] = None, timeout: float = REQUEST_TIMEOUT) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token or None
        self.timeout = timeout
        # A proxy from the environment must not carry ops traffic meant for a gateway on this host.
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback_url(self.base_url) else []
        self._opener = urllib.request.build_opener(_RefuseRedirects(), *handlers)

    def request(self, method: str, path: str, query: Optional[Dict[str, Any]] = None, body: Any = None) -> Any:
        url = self.base_url + path
        params = {name: value for name, value in (query or {}).items() if value is not None}
        if params:
            url += "?" + urllib.parse.urlencode(params)
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                raw = response.read(MAX_ANSWER_BYTES + 1)
                missing = response.length if len(raw) <= MAX_ANSWER_BYTES else None  # Content-Length not yet read
        except urllib.error.HTTPError as error:
            if 300 <= error.code < 400:
                raise ClientError(self._redirected(url, error)) from None
            raise _api_error(error) from None
        except urllib.error.URLError as error:
            raise ClientError(self._unreachable(error.reason)) from None
        except (OSError, http.client.HTTPException) as error:  # timeouts, resets, a status line that is not HTTP
            raise ClientError(self._unusable(f"{type(error).__name__}: {error}")) from None
        return self._decoded(raw, missing)

    def _decoded(self, raw: bytes, missing: Optional[int]) -> Any:
        """An answer's body read up to MAX_ANSWER_BYTES + 1 bytes (``missing``: bytes of its Content-Length not
        read), decoded as JSON; ClientError when it was cut short, is too long or is not JSON."""
        if missing:
            raise ClientError(self._unusable(f"the answer ended {missing} bytes short of its Content-Length"))
        if len(raw) > MAX_ANSWER_BYTES:
            raise ClientError(self._unusable(f"the answer is over {MAX_ANSWER_BYTES} bytes (MAX_ANSWER_BYTES)"))
        try:
            return _decode_answer(raw)
        except ValueError as error:
            raise ClientError(self._unusable(str(error))) from None

    def _unusable(self, why: str) -> str:
        return f"no usable answer from the gateway at {self.base_url}: {why}"

    def _redirected(self, url: str, error: urllib.error.HTTPError) -> str:
        location = error.headers.get("Location")
        target = urllib.parse.urljoin(url, location) if location else "nowhere (no Location header)"
        return (f"the gateway at {self.base_url} answered {error.code}, a redirect to {target}; not followed, "
                "so that the token goes nowhere else. If that is the gateway's address, pass it with --url.")

    def _unreachable(self, reason: Any) -> str:
        if isinstance(reason, ConnectionRefusedError):
            why = "connection refused"
        else:
            why = str(getattr(reason, "strerror", None) or reason)
        return (f"cannot reach the gateway at {self.base_url}: {why}. Is it running? "
                "Point the client at it with --url or UA_GATEWAY_URL.")

    # -- endpoints -----------------------------------------------------------------------------------------

    def list_sessions(self, status: str = "all", limit: Optional[int] = None, offset: Optional[int] = None) -> Any:
        answer = self.request("GET", "/api/v1/ops/sessions", {"status": status, "limit": limit, "offset": offset})
        return self._checked(answer, SESSIONS_PAGE)

    def session_details(self, session_id: str) -> Any:
        return self._checked(self.request("GET", f"/api/v1/ops/sessions/{_quote(session_id)}"), SESSION_DETAILS)

    def reset_session(self, session_id: str, clear_logs: bool = True, clear_memory: bool = False,
                      clear_work_products: bool = False) -> Any:
        body = {"clear_logs": clear_logs, "clear_memory": clear_memory, "clear_work_products": clear_work_products}
        return self._checked(self.request("POST", f"/api/v1/ops/sessions/{_quote(session_id)}/reset", body=body),
                             RESET_RESULT)

    def compact_session(self, session_id: str, max_lines: Optional[int] = None, max_bytes: Optional[int] = None) -> Any:
        body = {name: value for name, value in (("max_lines", max_lines), ("max_bytes", max_bytes)) if value is not None}
        answer = self.request("POST", f"/api/v1/ops/sessions/{_quote(session_id)}/compact", body=body)
        return self._checked(answer, COMPACT_RESULT)

    def delete_session(self, session_id: str, force: bool = False) -> Any:
        query = {"confirm": "true", "force": "true" if force else None}
        return self._checked(self.request("DELETE", f"/api/v1/ops/sessions/{_quote(session_id)}", query), DELETE_RESULT)

    def read_log(self, session_id: Optional[str] = None, file_name: Optional[str] = None,
                 cursor: Optional[str] = None, limit: Optional[int] = None) -> Any:
        query = {"session_id": session_id, "file": file_name, "cursor": cursor, "limit": limit}
        return self._checked(self.request("GET", "/api/v1/ops/logs/tail", query), LOG_SLICE)

    def read_audit(self, cursor: Optional[str] = None, limit: Optional[int] = None) -> Any:
        """A slice of the audit trail (PROTOCOL.md §11.2): JSON lines, oldest first."""
        return self._checked(self.request("GET", "/api/v1/ops/audit", {"cursor": cursor, "limit": limit}), LOG_SLICE)
    def read_archive_log(self, session_id: str, stamp: str, file_name: Optional[str] = None,
                         cursor: Optional[str] = None, limit: Optional[int] = None) -> Any:
        """A slice of ``archive/<stamp>/<file_name>`` (PROTOCOL.md §16.3), plain or compressed alike."""
        path = "/api/v1/ops/sessions/{}/archives/{}/{}".format(_quote(session_id), _quote(stamp),
                                                               _quote(file_name or "run.log"))
        return self._checked(self.request("GET", path, {"cursor": cursor, "limit": limit}), LOG_SLICE)

    def open_stream(self, path: str, query: Optional[Dict[str, Any]] = None,
                    last_event_id: Optional[str] = None,
                    events: "Optional[Mapping[str, EventShape]]" = None) -> "Iterator[SseEvent]":
        """The events of one SSE stream (PROTOCOL.md §13) until it ends; ``last_event_id`` resumes it.

        ``events`` names the events the caller reads and the shape of each one's data: others are skipped
        unread, and one of them that does not fit is a ClientError (None: every event, unchecked).
        Raises ApiError for an error status; StreamUnavailable for a well-formed 200 that is not an event
        stream (a gateway without streams answers the plain slice: it is the error's ``answer``); ClientError
        for any other answer (not HTTP, cut short, not JSON); StreamDropped when the gateway cannot be
        reached. A drop while reading ends the iteration with StreamDropped."""
        parts = urllib.parse.urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ClientError(f"{self.base_url} is not an http:// or https:// URL; pass the gateway's with --url")
        try:
            port = parts.port
        except ValueError as error:  # "Port out of range", a port that is not a number
            raise ClientError(f"{self.base_url} has no usable port ({error}); pass the gateway's URL with --url") from None
        if last_event_id and not _sendable_id(last_event_id):
            raise ClientError(f"the event id {shown(last_event_id[:80])!r} cannot be sent as Last-Event-ID: "
                              f"an id is at most {MAX_EVENT_ID_CHARS} printable ASCII characters; pass one a "
                              "previous run printed")
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        params = {name: value for name, value in (query or {}).items() if value is not None}
        target = parts.path.rstrip("/") + path + ("?" + urllib.parse.urlencode(params) if params else "")
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-store"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        connection = kind(parts.hostname, port, timeout=STREAM_READ_TIMEOUT)
        try:
            connection.request("GET", target, headers=headers)
            response = connection.getresponse()
        except OSError as error:  # refused, reset, timed out, or closed before answering (RemoteDisconnected)
            connection.close()
            raise StreamDropped(self._unreachable(error)) from None
        except http.client.HTTPException as error:  # it answered, but not in HTTP: asking again changes nothing
            connection.close()
            raise ClientError(self._unusable(f"{type(error).__name__}: {error}")) from None
        if response.status != 200:
            try:
                raw = response.read(MAX_ERROR_BYTES)
            except (OSError, http.client.HTTPException):
                raw = b""
            connection.close()
            try:
                detail = str(_decode_answer(raw)["detail"])[:MAX_DETAIL_CHARS]
            except (ValueError, KeyError, TypeError):
                detail = raw.decode("utf-8", "replace").strip()[:MAX_DETAIL_CHARS] or response.reason
            raise ApiError(response.status, detail, response.getheader("Retry-After"))
        content_type = response.getheader("Content-Type") or ""
        if content_type.split(";")[0].strip().lower() != "text/event-stream":
            try:
                answer = self._plain_answer(response)
            finally:
                connection.close()
            raise StreamUnavailable(f"the gateway at {self.base_url} answered {path} with {content_type!r}, "
                                    "not an event stream (PROTOCOL.md §13)", answer)
        return _sse_events(connection, response, events)

    def _plain_answer(self, response: http.client.HTTPResponse) -> Any:
        """The JSON body of a 200 that is not a stream, read as ``request`` reads one: bounded, decoded."""
        try:
            raw = response.read(MAX_ANSWER_BYTES + 1)
        except (OSError, http.client.HTTPException) as error:
            raise ClientError(self._unusable(f"{type(error).__name__}: {error}")) from None
        missing = response.length if len(raw) <= MAX_ANSWER_BYTES else None  # Content-Length not yet read
        return self._decoded(raw, missing)

    def _checked(self, answer: Any, shape: "Shape") -> Any:
        try:
            shape(answer, "answer")
        except MalformedAnswer as error:
            raise ClientError(self._unusable(str(error))) from None
        return answer


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def _api_error(error: urllib.error.HTTPError) -> ApiError:
    try:
        raw = error.read(MAX_ERROR_BYTES)
    except (OSError, http.client.HTTPException):
        raw = b""  # the status alone says enough
    try:
        detail = _decode_answer(raw)["detail"]
    except (ValueError, KeyError, TypeError):
        detail = raw.decode("utf-8", "replace").strip() or error.reason
    detail = str(detail)
    if len(detail) > MAX_DETAIL_CHARS:
        detail = detail[: MAX_DETAIL_CHARS - 3] + "..."
    return ApiError(error.code, detail, error.headers.get("Retry-After"))


def _decode_answer(raw: bytes) -> Any:
    """The JSON value of an answer's body (null when empty). Raises ValueError saying what is wrong with it."""
    try:
        value = json.loads(raw or b"null")
    except RecursionError:
        raise ValueError(f"the answer is nested too deeply to decode (more than {MAX_ANSWER_DEPTH} levels)") from None
    except ValueError as error:  # not JSON, or not UTF-8 (UnicodeDecodeError is a ValueError)
        raise ValueError(f"the answer is not JSON ({error})") from None
    if _nesting_depth(value) > MAX_ANSWER_DEPTH:
        raise ValueError(f"the answer is nested more than {MAX_ANSWER_DEPTH} levels deep")
    return value


def _nesting_depth(value: Any) -> int:
    """How many arrays and objects deep ``value`` goes; iterative, so that no depth can exhaust the stack."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if depth <= MAX_ANSWER_DEPTH:
            pending.extend((child, depth + 1) for child in children)
    return deepest


# ---------------------------------------------------------------------------------------------------------
# The shape of each answer: the keys and types the commands read (PROTOCOL.md §5). Checked before any is used.
# ---------------------------------------------------------------------------------------------------------


class MalformedAnswer(ValueError):
    """An answer lacks a key a command reads, or holds a value of the wrong type there."""


Shape = Callable[[Any, str], None]  # shape(value, where) raises MalformedAnswer naming ``where``
MAX_COUNT = 2 ** 63 - 1  # counts and sizes are 64-bit on the gateway; bigger ones break float formatting


class EventShape(NamedTuple):
    """What one named event must hold for the command reading it: its data's shape, and an id when the
    command resumes from it (an event without one would make a reconnect repeat or skip what it carried)."""
    data: "Shape"
    needs_id: bool = False


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)


def _scalar(name: str, accepts: Callable[[Any], bool]) -> Shape:
    def check(value: Any, where: str) -> None:
        if not accepts(value):
            raise MalformedAnswer(f"{where} should be {name}, not {_kind(value)}")
    return check


STRING = _scalar("a string", lambda value: isinstance(value, str))
OPTIONAL_STRING = _scalar("a string or null", lambda value: value is None or isinstance(value, str))
BOOLEAN = _scalar("a boolean", lambda value: isinstance(value, bool))
COUNT = _scalar(f"a whole number from 0 to {MAX_COUNT}",
                lambda value: type(value) is int and 0 <= value <= MAX_COUNT)


def _object(**fields: Shape) -> Shape:
    def check(value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise MalformedAnswer(f"{where} should be an object, not {_kind(value)}")
        for key, field in fields.items():
            if key not in value:
                raise MalformedAnswer(f"{where} has no {key!r}")
            field(value[key], f"{where}.{key}")
    return check


def _optional(**fields: Shape) -> Shape:
    """An object whose ``fields``, each where present, have their shape (a missing one is read as absent)."""
    def check(value: Any, where: str) -> None:
        _object()(value, where)
        for key, field in fields.items():
            if key in value:
                field(value[key], f"{where}.{key}")
    return check


def _all_of(*shapes: Shape) -> Shape:
    def check(value: Any, where: str) -> None:
        for shape in shapes:
            shape(value, where)
    return check


def _array_of(item: Shape) -> Shape:
    def check(value: Any, where: str) -> None:
        if not isinstance(value, list):
            raise MalformedAnswer(f"{where} should be an array, not {_kind(value)}")
        for index, element in enumerate(value):
            item(element, f"{where}[{index}]")
    return check


def _map_of(item: Shape) -> Shape:
    def check(value: Any, where: str) -> None:
        _object()(value, where)
        for key, element in value.items():
            item(element, f"{where}[{json.dumps(key)}]")
    return check


SESSION_SUMMARY = _object(
    session_id=STRING, status=STRING, last_activity=OPTIONAL_STRING, last_modified=OPTIONAL_STRING,
    has_run_log=BOOLEAN, has_activity_journal=BOOLEAN, has_memory=BOOLEAN, heartbeat_last_at=OPTIONAL_STRING,
    active_connections=COUNT, running=BOOLEAN,
)
SESSIONS_PAGE = _object(sessions=_array_of(SESSION_SUMMARY), total=COUNT, offset=COUNT)
SESSION_DETAILS = _object(
    session=SESSION_SUMMARY,
    memory=_object(has_memory_md=BOOLEAN, files=COUNT, bytes=COUNT),
    files=_array_of(_object(name=STRING, size=COUNT, modified=OPTIONAL_STRING)),
    archives=_array_of(STRING),
)
RESET_RESULT = _object(archived=_array_of(STRING), archive_dir=OPTIONAL_STRING)
COMPACT_RESULT = _object(files=_map_of(COUNT), bytes_freed=COUNT, archive_dir=OPTIONAL_STRING)
DELETE_RESULT = _object(session_id=STRING)
LOG_SLICE = _object(file=STRING, cursor=STRING, lines=_array_of(STRING), truncated=BOOLEAN, reset=BOOLEAN,
                    more=BOOLEAN)
# Stream events (PROTOCOL.md §13): the ones each command reads; any other name is skipped unread.
LATEST_TIME = 253402300799  # 9999-12-31T23:59:59Z: the last second time.localtime can show everywhere
EPOCH_SECONDS = _scalar(f"seconds since the epoch from 0 to {LATEST_TIME}",
                        lambda value: type(value) in (int, float) and 0 <= value <= LATEST_TIME)
NOTICE = _optional(reason=STRING)  # reset, resume, end: the reason is shown to people
LOG_EVENTS = {
    "slice": EventShape(LOG_SLICE, needs_id=True),
    "lines": EventShape(_all_of(_object(lines=_array_of(STRING)), _optional(truncated=BOOLEAN)), needs_id=True),
    "reset": EventShape(NOTICE),
    "resume": EventShape(NOTICE, needs_id=True),
    "end": EventShape(NOTICE),
}
SESSION_CHANGE = _object(kind=STRING, session_id=STRING, at=EPOCH_SECONDS)


def _change_or_notice(value: Any, where: str) -> None:
    """``reset`` names both a session's reset (a change) and the stream's own "list again" notice (no session)."""
    (SESSION_CHANGE if isinstance(value, dict) and "session_id" in value else NOTICE)(value, where)


SESSION_EVENTS = {
    **{kind: EventShape(SESSION_CHANGE, needs_id=True)
       for kind in ("created", "updated", "archived", "compacted", "deleted", "connections", "turn_started",
                    "turn_finished")},
    "reset": EventShape(_change_or_notice),
    "end": EventShape(NOTICE),
}


# ---------------------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces, the header first."""
    cells = [[shown(value) for value in row] for row in [headers, *rows]]
    widths = [max(len(row[column]) for row in cells) for column in range(len(headers))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells)


def _when(iso: Optional[str]) -> str:
    """``2026-11-26T10:00:00+00:00`` as ``2026-11-26 10:00:00`` (the column header says UTC)."""
    if not iso:
        return "-"
    return iso.replace("T", " ").replace("+00:00", "")


def _yes_no(value: Any) -> str:
    return "yes" if value else "no"


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    if count < 1024 * 1024:
        return f"{count / 1024:.1f} KiB"
    return f"{count / (1024 * 1024):.1f} MiB"


def _json_text(value: Any, indent: Optional[int] = None) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=False).translate(_JSON_ESCAPED)


def _print_json(value: Any, out: TextIO) -> None:
    print(_json_text(value, indent=2), file=out)


def _print_sessions(page: Dict[str, Any], out: TextIO) -> None:
    rows = [
        (s["session_id"], s["status"], _when(s["last_activity"]), _yes_no(s["has_run_log"]),
         _yes_no(s["has_activity_journal"]), _yes_no(s["has_memory"]), _when(s["heartbeat_last_at"]),
         s["active_connections"], "running" if s["running"] else "-")
        for s in page["sessions"]
    ]
    headers = ("SESSION", "STATUS", "LAST ACTIVITY (UTC)", "RUN.LOG", "JOURNAL", "MEMORY", "HEARTBEAT (UTC)",
               "CONN", "TURN")
    if rows:
        print(format_table(headers, rows), file=out)
    first = page["offset"] + 1 if rows else page["offset"]
    print(f"{first}-{page['offset'] + len(rows)} of {page['total']} sessions", file=out)


def _print_details(details: Dict[str, Any], out: TextIO) -> None:
    session, memory = details["session"], details["memory"]
    facts = [
        ("session", session["session_id"]),
        ("status", session["status"] + (" (turn running)" if session["running"] else "")),
        ("connections", session["active_connections"]),
        ("last activity", _when(session["last_activity"]) + " UTC"),
        ("last modified", _when(session["last_modified"]) + " UTC"),
        ("heartbeat", _when(session["heartbeat_last_at"]) + (" UTC" if session["heartbeat_last_at"] else "")),
        ("memory", f"MEMORY.md {_yes_no(memory['has_memory_md'])}, {memory['files']} file(s) in memory/, "
                   f"{_size(memory['bytes'])}"),
        ("archives", ", ".join(details["archives"]) or "-"),
    ]
    width = max(len(name) for name, _ in facts)
    for name, value in facts:
        print(f"{name.ljust(width)}  {shown(value)}", file=out)
    if details["files"]:
        print(file=out)
        rows = [(f["name"], _size(f["size"]), _when(f["modified"])) for f in details["files"]]
        print(format_table(("FILE", "SIZE", "MODIFIED (UTC)"), rows), file=out)


# ---------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------


def run_sessions_list(client: GatewayClient, args: argparse.Namespace, out: TextIO) -> int:
    page = client.list_sessions(args.status, args.limit, args.offset)
    if args.json:
        _print_json(page, out)
    else:
        _print_sessions(page, out)
    return EXIT_OK


def run_sessions_show(client: GatewayClient, args: argparse.Namespace, out: TextIO) -> int:
    details = client.session_details(args.session_id)
    if args.json:
        _print_json(details, out)
    else:
        _print_details(details, out)
    return EXIT_OK


def run_sessions_reset(client: GatewayClient, args: argparse.Namespace, out: TextIO) -> int:
    result = client.reset_session(args.session_id, clear_logs=not args.keep_logs, clear_memory=args.clear_memory,
                                  clear_work_products=args.clear_work_products)
    if args.json:
        _print_json(result, out)
    elif result["archived"]:
        print(f"reset {shown(args.session_id)}: moved {shown(', '.join(result['archived']))} to "
              f"{shown(result['archive_dir'])}", file=out)
    else:
        print(f"reset {shown(args.session_id)}: nothing to archive", file=out)
    return EXIT_OK


def run_sessions_compact(client: GatewayClient, args: argparse.Namespace, out: TextIO) -> int:
    result = client.compact_session(args.session_id, args.max_lines, args.max_bytes)
    if args.json:
        _print_json(result, out)
    else:
        kept = ", ".join(f"{name} keeps {lines} lines" for name, lines in result["files"].items()) or "no live logs"
        where = f"; the full logs are in {result['archive_dir']}" if result.get("archive_dir") else ""
        dropped = result.get("bytes_dropped")
        moved = "" if not isinstance(dropped, int) else (
            f"{_size(dropped)} dropped, {_size(result.get('bytes_archived') or 0)} archived, ")
        print(shown(f"compacted {args.session_id}: {kept}; {moved}{_size(result['bytes_freed'])} freed{where}"), file=out)
    return EXIT_OK


def run_sessions_delete(client: GatewayClient, args: argparse.Namespace, out: TextIO) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            print(f"{PROG}: refusing to delete {args.session_id} without confirmation: nobody can be asked "
                  "(stdin is not a terminal); pass --yes", file=sys.stderr)
            return EXIT_USAGE
        try:
            typed = input(f"Deleting {args.session_id} removes its logs, memory and archives for good.\n"
                          "Type the session id to confirm: ").strip()
        except EOFError:
            typed = ""
        if typed != args.session_id:
            print(f"{PROG}: {typed!r} is not {args.session_id!r}; nothing was deleted", file=sys.stderr)
            return EXIT_ERROR
    try:
        result = client.delete_session(args.session_id, force=args.force)
    except ApiError as error:
        if error.status == 409 and not args.force:
            raise ClientError(f"{error} (pass --force to cancel the turn and delete)") from None
        raise
    if args.json:
        _print_json(result, out)
    else:
        print(f"deleted {shown(result['session_id'])}", file=out)
    return EXIT_OK


def run_logs_tail(client: GatewayClient, args: argparse.Namespace, out: TextIO) -> int:
    read = _log_reader(client, args.session, args.file, args.limit, args.archive)
    if not args.follow:
        piece = read(None)
        if args.json:
            _print_json(piece, out)
        else:
            _print_slice(piece, out, first=True, raw=args.raw)
        return EXIT_OK
    emit = lambda piece, first: _emit_followed(piece, first, args.json, args.raw, out)  # noqa: E731
    query = {"session_id": args.session, "file": args.file, "limit": args.limit}
    try:
        _stream_or_poll(client, "/api/v1/ops/logs/tail", query, (args.file or "run.log") if args.session else "gateway.log",
                        read, emit)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how an operator stops following: not an error
    return EXIT_OK


def _log_reader(client: GatewayClient, session_id: Optional[str], file_name: Optional[str],
                limit: Optional[int], archive: Optional[str] = None) -> Callable[[Optional[str]], Dict[str, Any]]:
    """``read(cursor)`` for one log: the cursor is the only argument that changes while following."""
    if archive is not None and session_id is not None:
        return lambda cursor: client.read_archive_log(session_id, archive, file_name, cursor=cursor, limit=limit)
    return lambda cursor: client.read_log(session_id, file_name, cursor=cursor, limit=limit)


def follow_log(read: Callable[[Optional[str]], Dict[str, Any]],
               emit: Callable[[Dict[str, Any], bool], None],
               interval: Optional[float] = None,
               sleep: Callable[[float], None] = time.sleep, first: Optional[Dict[str, Any]] = None) -> None:
    """Call ``emit(slice, first)`` for the tail of a log (``first`` when the caller has it already), then
    for every slice after it, forever.

    The cursor of each slice is passed back verbatim; while ``more`` is true the next slice is asked
    for at once, otherwise after ``interval`` seconds. Ends only by an exception (ClientError, or
    KeyboardInterrupt from the caller's Ctrl-C).
    """
    interval = FOLLOW_INTERVAL if interval is None else interval  # read now: a test may set it
    piece = read(None) if first is None else first
    emit(piece, True)
    while True:
        if not piece["more"]:
            sleep(interval)
        piece = read(piece["cursor"])
        emit(piece, False)


def _emit_followed(piece: Dict[str, Any], first: bool, as_json: bool, raw: bool, out: TextIO) -> None:
    if as_json:
        print(_json_text(piece), file=out, flush=True)
    else:
        _print_slice(piece, out, first, raw)


def _print_slice(piece: Dict[str, Any], out: TextIO, first: bool, raw: bool = False) -> None:
    """The slice's lines on ``out`` (escaped unless ``raw``), its notices on stderr."""
    # Notices go to stderr so that stdout holds the log's lines only (safe to pipe into grep or a file).
    name = shown(piece["file"])
    if piece["reset"]:
        print(f"-- {name} was replaced or truncated; reading it from the start --", file=sys.stderr, flush=True)
    if piece["truncated"]:
        if first:
            print(f"-- older lines of {name} are not shown (--limit sets how many) --", file=sys.stderr, flush=True)
        else:
            print(f"-- a line of {name} longer than the slice was cut --", file=sys.stderr, flush=True)
    for line in piece["lines"]:
        print(line if raw else shown(line), file=out)
    out.flush()


# ---------------------------------------------------------------------------------------------------------
# Streams (PROTOCOL.md §13): `logs tail --follow`, `audit --follow` and `sessions watch`
# ---------------------------------------------------------------------------------------------------------


class StreamDropped(ClientError):
    """The stream broke off (or never connected) before its ``end`` event: reconnecting may help."""


class StreamUnavailable(ClientError):
    """A well-formed 200 that is not an event stream (a gateway from before PROTOCOL.md §13): poll instead,
    starting from ``answer``, the decoded body it did send (already one poll's answer: not asked again)."""

    def __init__(self, message: str, answer: Any = None) -> None:
        super().__init__(message)
        self.answer = answer


class SseEvent(NamedTuple):
    name: str
    id: Optional[str]
    data: Any


def _sendable_id(value: str) -> bool:
    """Whether ``value`` can go back in a Last-Event-ID header as it is: printable ASCII, bounded."""
    return 0 < len(value) <= MAX_EVENT_ID_CHARS and all(" " < char <= "~" for char in value)


def _sse_lines(raw: bytes) -> List[str]:
    """The SSE lines in one LF-ended read: CR alone ends a line too (WHATWG HTML §9.2.6), so a CR in a
    field can never carry the rest of it into a header this client sends."""
    text = raw.decode("utf-8", "replace")
    text = text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text
    return text.split("\r")


def _sse_events(connection: http.client.HTTPConnection, response: http.client.HTTPResponse,
                shapes: Optional[Mapping[str, EventShape]] = None) -> Iterator[SseEvent]:
    """Parse SSE (WHATWG HTML §9.2.6) from a chunked answer, one line at a time, each line bounded by
    MAX_EVENT_LINE and each event by MAX_EVENT_BYTES. Comments, ``retry`` (the client's own backoff is
    bounded: STREAM_BACKOFF) and unknown fields are skipped; so are events ``shapes`` does not name."""
    fields: Dict[str, str] = {}
    size = 0  # bytes of the event being read, comments excluded
    try:
        while True:
            try:
                raw = response.readline(MAX_EVENT_LINE + 1)
            except (OSError, ValueError, http.client.HTTPException) as error:  # ValueError: a bad chunk size
                raise StreamDropped(f"the stream broke off ({type(error).__name__}: {error})") from None
            if not raw:
                raise StreamDropped("the stream ended without an end event")
            if len(raw) > MAX_EVENT_LINE:
                raise ClientError(f"an event line is over {MAX_EVENT_LINE} bytes (MAX_EVENT_LINE): not the gateway's stream")
            if not raw.startswith(b":"):
                size += len(raw)
            if size > MAX_EVENT_BYTES:
                raise ClientError(f"an event is over {MAX_EVENT_BYTES} bytes (MAX_EVENT_BYTES): not the gateway's stream")
            for line in _sse_lines(raw):
                if line.startswith(":"):
                    continue  # a keep-alive comment
                if line:
                    name, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if name == "data" and "data" in fields:
                        value = fields["data"] + "\n" + value  # several data lines are one, joined by LF
                    if name in ("event", "data", "id"):
                        fields[name] = value
                    continue
                event, fields, size = _sse_event(fields, shapes), {}, 0
                if event is None:
                    continue
                yield event
                if event.name == "end":
                    return
    finally:
        connection.close()


def _sse_event(fields: Mapping[str, str], shapes: Optional[Mapping[str, EventShape]]) -> Optional[SseEvent]:
    """The event ``fields`` make up, its data decoded and checked; None for no event or one not read."""
    name = fields.get("event") or "message"
    if not fields or (shapes is not None and name not in shapes):
        return None  # a blank line between events, or an event this command does not read (PROTOCOL.md §13)
    event_id = fields.get("id")
    if event_id is not None and event_id != "" and not _sendable_id(event_id):
        raise ClientError(f"the {shown(name)!r} event's id {shown(event_id[:80])!r} is not an id the gateway gives "
                          f"(at most {MAX_EVENT_ID_CHARS} printable ASCII characters); it is not sent back")
    try:
        data = _decode_answer(fields.get("data", "").encode())
        if shapes is not None:
            shapes[name].data(data, f"the {name} event's data")
    except ValueError as error:  # not JSON, too deep, or MalformedAnswer
        raise ClientError(f"an unusable event from the gateway: {shown(error)}") from None
    if shapes is not None and shapes[name].needs_id and not event_id:
        raise ClientError(f"an unusable event from the gateway: the {name} event has no id to resume from")
    return SseEvent(name, event_id or None, data)


def follow_stream(open_stream: Callable[[Optional[str]], Iterator[SseEvent]], emit: Callable[[SseEvent], None],
                  retries: int = STREAM_RETRIES, sleep: Callable[[float], None] = time.sleep,
                  last_event_id: Optional[str] = None) -> SseEvent:
    """Call ``emit`` for every event of a stream, reconnecting with the last ``id`` seen after a drop
    (no gap, no duplicate: PROTOCOL.md §13.2) after a bounded backoff; ``retries`` drops in a row
    without an event between them, and StreamDropped is raised. Returns the ``end`` event."""
    failures, streamed = 0, False
    while True:
        try:
            for event in open_stream(last_event_id):
                failures, streamed = 0, True
                if event.id is not None:
                    last_event_id = event.id
                emit(event)
                if event.name == "end":
                    return event
        except StreamUnavailable as error:
            if streamed:  # polling from its plain answer would repeat or skip what the stream already gave
                raise ClientError(f"{error}, after it had streamed: reconnect when it streams again") from None
            raise
        except (StreamDropped, ApiError) as error:
            if isinstance(error, ApiError) and error.status not in (429, 502, 503, 504):
                raise  # refused for good (401, 403, 404, a bad cursor): retrying changes nothing
            failures += 1
            if failures > retries:
                raise StreamDropped(f"{error}; gave up after {retries} reconnects in a row") from None
            sleep(STREAM_BACKOFF[min(failures, len(STREAM_BACKOFF)) - 1])


def _stream_slices(file_name: str, emit: Callable[[Dict[str, Any], bool], None]) -> Callable[[SseEvent], None]:
    """Turn a log stream's events back into the slices a polling follow emits (same output either way)."""
    state = {"reset": False}

    def on_event(event: SseEvent) -> None:
        if event.name == "slice":
            emit(event.data, True)
        elif event.name == "lines":
            piece = {"file": file_name, "lines": event.data["lines"], "cursor": event.id, "more": False,
                     "reset": state["reset"], "truncated": event.data.get("truncated", False)}
            state["reset"] = False
            emit(piece, False)
        elif event.name == "reset":
            state["reset"] = True
        elif event.name == "end":
            print(f"-- the stream ended: {shown(event.data.get('reason', '?'))} --", file=sys.stderr, flush=True)
    return on_event


def _stream_or_poll(client: GatewayClient, path: str, query: Dict[str, Any], file_name: str,
                    read: Callable[[Optional[str]], Dict[str, Any]], emit: Callable[[Dict[str, Any], bool], None],
                    last_event_id: Optional[str] = None) -> None:
    """Follow by streaming; poll (as before streams existed) when the gateway does not stream. Only a
    well-formed plain slice means that: it is the first poll's answer (the same request), so it is used,
    not asked for again; any other answer is an error naming what was wrong with it."""
    try:
        follow_stream(lambda last: client.open_stream(path, {**query, "follow": "true"}, last, LOG_EVENTS),
                      _stream_slices(file_name, emit), last_event_id=last_event_id)
    except StreamUnavailable as error:
        follow_log(read, emit, first=client._checked(error.answer, LOG_SLICE))


def _event_line(data: Dict[str, Any]) -> str:
    """One session event for people: time, kind, session, then its details as name=value."""
    at = data.get("at")
    when = time.strftime("%H:%M:%S", time.localtime(at)) if isinstance(at, (int, float)) else "-"
    details = " ".join(f"{shown(name)}={shown(_json_text(value))}" for name, value in data.items()
                       if name not in ("kind", "session_id", "at"))
    return f"{when} {shown(data.get('kind', '?')):<13} {shown(data.get('session_id', '-'))} {details}".rstrip()


def run_sessions_watch(client: GatewayClient, args: argparse.Namespace, out: TextIO) -> int:
    """Print every session event (PROTOCOL.md §13.3), one line each, until Ctrl-C."""
    def emit(event: SseEvent) -> None:
        data = event.data if isinstance(event.data, dict) else {}
        if args.json:
            print(_json_text({"event": event.name, "id": event.id, **data}), file=out, flush=True)
        elif "session_id" not in data:  # the stream's own notices (reset: list again; end): not a change
            print(f"-- {shown(event.name)}: {shown(data.get('reason', ''))} --", file=sys.stderr, flush=True)
        else:
            print(_event_line(data), file=out, flush=True)
    try:
        follow_stream(lambda last: client.open_stream("/api/v1/ops/events", None, last, SESSION_EVENTS), emit,
                      last_event_id=args.last_event_id)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how an operator stops watching: not an error
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------


AUDIT_COLUMNS = ("TIME", "ACTION", "SESSION", "CLIENT", "SCOPE", "STATUS")


def audit_row(line: str) -> List[str]:
    """One audit record as table cells; a line that is not a record (a cut piece) shows as such."""
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        return ["?", f"(not a record: {shown(line[:80])})", "", "", "", ""]
    outcome = record.get("outcome")
    if not isinstance(outcome, dict):
        outcome = {}
    return [shown(record.get(key) if record.get(key) is not None else "-")
            for key in ("time", "action", "session", "client", "scope")] + [shown(outcome.get("status", "-"))]


def run_audit(client: GatewayClient, args: argparse.Namespace, out: TextIO) -> int:
    if args.follow:
        return _follow_audit(client, args, out)
    piece = client.read_audit(cursor=args.cursor, limit=args.limit)
    if args.json:
        _print_json(piece, out)
        return EXIT_OK
    if piece["reset"]:
        print("-- the cursor's file was rotated away; reading from the oldest kept --", file=sys.stderr)
    print(format_table(AUDIT_COLUMNS, [audit_row(line) for line in piece["lines"]]), file=out)
    # The cursor is for the next call: on stderr, so stdout stays the table.
    print(f"-- next: --cursor {piece['cursor']}{' (more waiting)' if piece['more'] else ''} --", file=sys.stderr)
    return EXIT_OK


def _follow_audit(client: GatewayClient, args: argparse.Namespace, out: TextIO) -> int:
    """``audit --follow``: the newest records (or those after --cursor), then each one as it is written."""
    def emit(piece: Dict[str, Any], first: bool) -> None:
        if args.json:
            print(_json_text(piece), file=out, flush=True)
        elif piece["lines"] or first:
            table = format_table(AUDIT_COLUMNS, [audit_row(line) for line in piece["lines"]])
            print(table if first else table.split("\n", 1)[-1], file=out, flush=True)
    # cursor= as well as Last-Event-ID: a gateway that does not stream reads the query only, and its plain
    # slice is then the records after --cursor; one that streams takes the header (PROTOCOL.md §13.2).
    query = {"limit": args.limit, "cursor": args.cursor}
    read = lambda cursor: client.read_audit(cursor=cursor, limit=args.limit)  # noqa: E731
    try:
        _stream_or_poll(client, "/api/v1/ops/audit", query, "audit.log", read, emit, last_event_id=args.cursor)
    except KeyboardInterrupt:
        pass  # Ctrl-C ends following: not an error
    return EXIT_OK


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def build_parser() -> argparse.ArgumentParser:
    target = argparse.ArgumentParser(add_help=False)
    target.add_argument("--url", default=os.environ.get("UA_GATEWAY_URL") or DEFAULT_URL,
                        help=f"the gateway (default: UA_GATEWAY_URL, else {DEFAULT_URL})")
    target.add_argument("--json", action="store_true", help="print the gateway's JSON answer instead of a table")

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="The Ops API client: look at and manage agent sessions and logs of a running gateway.",
        epilog="The token is read from UA_OPS_TOKEN or the file UA_OPS_TOKEN_FILE names (never from the command line). Exit status: 0 done, "
        "1 the gateway refused or could not be reached, 2 usage error.",
    )
    commands = parser.add_subparsers(dest="command", metavar="{sessions,logs,audit}", required=True)

    sessions = commands.add_parser("sessions", help="list, show, reset, compact, delete or watch sessions")
    actions = sessions.add_subparsers(dest="action", metavar="{list,show,reset,compact,delete,watch}", required=True)

    listing = actions.add_parser("list", parents=[target], help="one page of sessions, newest activity first")
    listing.add_argument("--status", choices=("all", "running", "active", "idle", "archived"), default="all")
    listing.add_argument("--limit", type=_non_negative_int, help="sessions per page (gateway default 100, at most 1000)")
    listing.add_argument("--offset", type=_non_negative_int, help="sessions to skip")
    listing.set_defaults(run=run_sessions_list)

    show = actions.add_parser("show", parents=[target], help="details of one session")
    show.add_argument("session_id", metavar="ID")
    show.set_defaults(run=run_sessions_show)

    reset = actions.add_parser("reset", parents=[target], help="move the logs (and more) into a new archive")
    reset.add_argument("session_id", metavar="ID")
    reset.add_argument("--clear-memory", action="store_true", help="archive MEMORY.md and memory/ too")
    reset.add_argument("--clear-work-products", action="store_true", help="archive work_products/ too")
    reset.add_argument("--keep-logs", action="store_true", help="leave run.log and activity_journal.log in place")
    reset.set_defaults(run=run_sessions_reset)

    compact = actions.add_parser("compact", parents=[target], help="keep only the tail of each live log")
    compact.add_argument("session_id", metavar="ID")
    compact.add_argument("--max-lines", type=_non_negative_int, help="lines kept per log (gateway default 400)")
    compact.add_argument("--max-bytes", type=_non_negative_int, help="bytes kept per log (gateway default 250000)")
    compact.set_defaults(run=run_sessions_compact)

    delete = actions.add_parser("delete", parents=[target], help="delete a session and everything in it")
    delete.add_argument("session_id", metavar="ID")
    delete.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    delete.add_argument("--force", action="store_true", help="cancel a running turn instead of refusing")
    delete.set_defaults(run=run_sessions_delete)

    watch = actions.add_parser("watch", parents=[target],
                               help="print session events (created, turns, resets, deletions) as they happen")
    watch.add_argument("--last-event-id", metavar="ID", help="resume after this event id (a previous watch printed it)")
    watch.set_defaults(run=run_sessions_watch)

    logs = commands.add_parser("logs", help="read logs")
    log_actions = logs.add_subparsers(dest="action", metavar="{tail}", required=True)
    tail = log_actions.add_parser("tail", parents=[target],
                                  help="the last lines of a session log, or of the gateway's own log")
    tail.add_argument("--session", metavar="ID", help="a session's log (default: the gateway's own log)")
    tail.add_argument("--file", choices=("run.log", "activity_journal.log"),
                      help="which session log (default run.log)")
    tail.add_argument("--archive", metavar="STAMP",
                      help="read that archive of the session's log (as 'sessions show' lists them), plain or compressed")
    tail.add_argument("--follow", "-f", action="store_true", help="keep printing new lines until Ctrl-C")
    tail.add_argument("--limit", type=_non_negative_int, help=f"lines per request (gateway default {TAIL_LIMIT})")
    tail.add_argument("--raw", action="store_true",
                      help="print lines exactly as written, terminal escape sequences included "
                      "(by default control characters are shown escaped, e.g. \\x1b)")
    tail.set_defaults(run=run_logs_tail)

    audit = commands.add_parser("audit", parents=[target],
                                help="the audit trail: who changed what, when (the newest records, or those after --cursor)")
    audit.add_argument("--limit", type=_non_negative_int, help=f"records per request (gateway default {TAIL_LIMIT})")
    audit.add_argument("--cursor", help="the cursor a previous 'audit' printed: the records after it, oldest first")
    audit.add_argument("--follow", "-f", action="store_true", help="keep printing new records until Ctrl-C")
    audit.set_defaults(run=run_audit)
    return parser


def environment_token(env: Mapping[str, str]) -> str:
    """The token from UA_OPS_TOKEN, or from the file UA_OPS_TOKEN_FILE names (as the gateway reads it)."""
    path = env.get("UA_OPS_TOKEN_FILE")
    if not path or env.get("UA_OPS_TOKEN"):
        return env.get("UA_OPS_TOKEN", "").strip()
    try:
        with open(path, "rb") as secret_file:
            return secret_file.read(64 * 1024).decode("utf-8", "replace").strip()
    except OSError as exc:
        raise ClientError(f"UA_OPS_TOKEN_FILE names {path!r}, which cannot be read: {exc.strerror or exc}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one client command, e.g. ``main(["sessions", "list", "--json"])``; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
        if getattr(args, "file", None) and not getattr(args, "session", None):
            parser.error("--file needs --session; without it the gateway's own log is read")
        if getattr(args, "archive", None) and not getattr(args, "session", None):
            parser.error("--archive needs --session: archives belong to a session")
    except SystemExit as exit_request:  # --help (0) or a usage error (2): a status, not an exception
        return exit_request.code if isinstance(exit_request.code, int) else EXIT_OK
    try:
        client = GatewayClient(args.url, environment_token(os.environ))
        return args.run(client, args, sys.stdout)
    except ClientError as error:
        print(f"{PROG}: error: {shown(error)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130  # interrupted before finishing: the shell's convention for SIGINT
    except BrokenPipeError:
        # `... | head` closed the pipe: the reader has what it wanted. Point stdout at /dev/null so
        # the interpreter's final flush does not complain about the same pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

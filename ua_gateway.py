"""ua-gateway: the operations gateway for AI agent runs, in one file.

Rules this file keeps
- One asyncio HTTP/1.1 front door owns the port. It parses requests itself (``RequestParser`` is
  Sans-I/O: bytes in, requests out) and hands WebSocket upgrades, raw bytes and all, to websockets'
  documented Sans-I/O ``ServerProtocol``.
- Disk work never runs on the event loop: every ``OpsService`` call and every log write goes through a
  thread. A slow disk never stalls a WebSocket.
- Client input never causes a 5xx (505 for a foreign HTTP version excepted) and never stops the server:
  every failure a client can cause is an ``HttpError`` with a status and a ``detail`` a person can act on.
- Limits and timeouts are named constants in the "Limits" section, each with the reason for its value.
- The token is compared in constant time and never written anywhere.

Theory of operation
    socket bytes -> HttpConnection -> RequestParser -> Request -> Router -> handler -> Response bytes
                                                  \\-> upgrade -> WebSocketBridge -> SessionHub -> Agent
A handler returns a ``Response`` at once (health, errors) or an awaitable that runs ``OpsService`` in the
executor. Requests on one connection are answered in order (pipelining); a slow handler only holds up its
own connection.

Sections, in dependency order: limits, configuration, HTTP parsing, responses, access control, gateway
log, the Ops API, connections, the server, the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import codecs
import collections
import concurrent.futures
import email.utils
import enum
import errno
import functools
import hashlib
import hmac
import http
import ipaddress
import itertools
import json
import logging
import math
import os
import queue
import re
import shlex
import signal
import socket
import stat
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union
from urllib.parse import parse_qsl, unquote

from websockets.frames import Opcode
from websockets.http11 import Request as WsRequest
from websockets.protocol import State as WsState
from websockets.server import ServerProtocol

import ops_service
from ops_service import (
    InvalidArgument,
    OpsError,
    OpsService,
    SessionBusy,
    SessionNotFound,
    StorageFull,
    WorkspacesUnavailable,
)

__all__ = [
    "__version__",
    "AgentTurn",
    "Config",
    "Gateway",
    "HttpError",
    "Request",
    "RequestParser",
    "Response",
    "main",
]

__version__ = "0.1.0"


# ---------------------------------------------------------------------------------------------------------
# Limits. Each can be overridden in one place: here, or through Config where an operator may need to.
# ---------------------------------------------------------------------------------------------------------

MAX_HEAD_BYTES = 64 * 1024  # SPEC §3: request headers over 64 KiB -> 431
MAX_REQUEST_LINE = 8192  # the most common default of popular HTTP servers; longer -> 414
MAX_HEADER_COUNT = 128  # the limit websockets applies to handshakes; more -> 431
MAX_BODY_BYTES = 1024 * 1024  # SPEC §3: a body over 1 MiB -> 413
MAX_CHUNK_LINE = 4096  # a chunk-size line with extensions; nobody needs more
MAX_CHUNKED_OVERHEAD = 256 * 1024  # framing bytes allowed beyond the body, against 1-byte-chunk floods
MAX_INT_DIGITS = 18  # number parameters fit in 64 bits; longer strings are rejected before int()
HEADER_TIMEOUT = 10.0  # SPEC §3: a request head not complete within 10 s -> disconnect
BODY_TIMEOUT = 30.0  # a body of at most 1 MiB arrives in 30 s even on a poor link
KEEPALIVE_TIMEOUT = 75.0  # SPEC §3 default; the value nginx and most proxies expect of an upstream
SHUTDOWN_GRACE = 5.0  # SPEC §1: in-flight requests get at most 5 s on SIGTERM
MAX_CONNECTIONS = 10000  # far above the 1,000 idle WebSockets we must hold; below a typical fd limit
MAX_PIPELINE_BUFFER = 256 * 1024  # unread pipelined bytes held while a handler runs; then stop reading
WRITE_BUFFER_HIGH = 4 * 1024 * 1024  # WebSocket output a peer has yet to read before its input stops being
# read: a 1 MB event fits; the bridge's own bound (WS_MAX_SEND_BUFFER) then closes a peer that stays behind
MAX_SEND_BACKLOG = 64 * 1024  # asyncio's own high-water mark: answers an HTTP peer has yet to read, beyond
# which its next pipelined request waits. Enough to keep a reading peer's socket busy; times the
# connection cap, what non-reading peers can pin (the kernel's socket buffers come on top, outside RSS).
SEND_STALL_TIMEOUT = 30.0  # s without a byte taken from a non-empty send buffer -> abort; half nginx's
# send_timeout, since a stalled peer pins a connection slot and its unsent answers meanwhile
OPS_THREADS = 8  # disk workers; OpsService serializes per session, so more only helps across sessions
GIL_SWITCH_INTERVAL = 0.0005  # s; see serve(): bounds how long a busy worker thread can delay the loop
AUTH_FAILURE_LIMIT = 10  # SPEC §4: after 10 failures within the window ...
AUTH_FAILURE_WINDOW = 60.0  # ... of 60 s ...
AUTH_LOCKOUT = 300.0  # ... the address is locked out for 5 minutes
AUTH_TRACKED_ADDRESSES = 10000  # per table (failures, lockouts): bounded memory when an attacker rotates addresses
SESSION_CREATE_RATE = 10.0  # sessions a second per client address, sustained: far above a person or an agent
# runner at work, far below the 2,400 a second one local script made (4,800 directories a second)
SESSION_CREATE_BURST = 1000  # ... after a burst of this many: a fleet of 1,000 clients starting at once fits
SESSION_CREATE_PER_MINUTE = 3000  # all addresses together: 180,000 session directories an hour at most, whoever asks
SESSION_CREATE_TRACKED_ADDRESSES = 10000  # buckets kept; the least recently used goes first (it has refilled most)
GATEWAY_LOG_ROTATE_BYTES = 64 * 1024 * 1024  # a log file past this size is renamed to <name>.1 (Config.log_rotate_bytes)
GATEWAY_LOG_BACKUPS = 3  # rotated files kept per log (<name>.1 .. .3): 256 MiB of history each at the default size
GATEWAY_LOG_INTERVAL = 0.1  # the gateway log is written in batches this often: cheap, and near enough to live
GATEWAY_LOG_FIELD_CHARS = 256  # a logged string, JSON-escaped, is cut to this: a whole API path, not a client's 8 KiB
GATEWAY_LOG_MAX_PENDING = 50000  # records waiting for a slow disk (2.5 s of a 20k/s flood); more are counted as dropped
SECURITY_LOG_BURST = 100  # security.log takes this many records at once ...
SECURITY_LOG_RATE = 10.0  # ... then this many a second: 64 MiB takes hours of flooding, not seconds
FD_RESERVE = 16 + 4 * OPS_THREADS  # descriptors kept from connections: std streams, epoll, self-pipe, listening and
# log files, a spawning agent's pipes (16), and a directory and a file or two per disk worker
AGENT_TURN_FDS = 4  # a running agent command holds its stdin, stdout and stderr pipes, and a pidfd on 3.12+
HTTP_FD_SHARE = 4  # agent commands may take at most (1 - 1/this) of the descriptor budget: a quarter always
# stays for connections, so running turns can never lock operators (and health) out
MAX_AGENT_COMMANDS = 256  # agent commands running at once, whatever the descriptor budget: each is a process
# group with its own memory; past this a turn ends at once with an error saying to retry
MAX_WRITER_BACKLOG = 16 * 1024 * 1024  # bytes of journal and run.log waiting for the disk; past this the
# gateway stops reading agents' output (their writes block) until the writer catches up
WRITER_BACKLOG_POLL = 0.01  # s; how often a paused agent output reader looks again
MAX_REFUSALS_LINGERING = 8  # refused sockets kept open briefly so the 503 is read, not reset (taken from
# FD_RESERVE: few, since refusals happen when descriptors are short); more close at once
REFUSAL_LINGER = 0.2  # s
ACCEPT_BATCH = 100  # connections accepted per wake-up, so that a connect flood cannot starve open connections
ACCEPT_RETRY_DELAY = 0.1  # s; accepting pauses this long when accept() fails (out of descriptors): 10 tries a second
REPORT_INTERVAL = 1.0  # s; refused connections and event loop errors are reported at most this often, with a count
ROOT_CHECK_INTERVAL = 1.0  # how stale health's view of the workspaces root may be
CORS_MAX_AGE = 600  # browsers cache a preflight for 10 minutes

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8002
DEFAULT_WORKSPACES = "AGENT_RUN_WORKSPACES"
SERVER_NAME = "ua-gateway"


def _show(value: Any, limit: int = 80) -> str:
    """Quote an offending value for an error detail: printable, ASCII, and short."""
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("latin-1")
    text = ascii(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


MAX_JSON_DEPTH = 100  # nesting accepted in any JSON we are sent; deeper is refused before it can recurse


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {_show(text, 40)} is too large for a finite double")
    return value


def loads_json(data: Union[str, bytes, bytearray]) -> Any:
    """Parse JSON from a client or an agent as strict RFC 8259: no NaN or Infinity (browsers' JSON.parse
    refuses them, so forwarding one would break every client), no number that overflows to infinity,
    and at most MAX_JSON_DEPTH levels of nesting, so that what we accept we can also encode again.

    Raises ValueError with a reason; never RecursionError.
    """
    try:
        value = json.loads(data, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return value


# ---------------------------------------------------------------------------------------------------------
# Configuration: environment variables (Universal Agent's names) overridden by command-line flags.
# ---------------------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A configuration value is unusable; the message says which and how to fix it."""


# Variables that hold a secret. Each may instead be given as <NAME>_FILE, the path of a file holding it
# (the convention of container secrets and systemd credentials), which keeps the secret out of every
# process environment. Neither form is handed on to agent commands.
SECRET_VARIABLES = ("UA_OPS_TOKEN",)
SECRET_FILE_SUFFIX = "_FILE"
HIDDEN_FROM_AGENTS = frozenset(name + suffix for name in SECRET_VARIABLES for suffix in ("", SECRET_FILE_SUFFIX))
MAX_SECRET_FILE_BYTES = 64 * 1024  # a token is tens of bytes; a bigger file is the wrong file (or /dev/zero)


def read_secret(env: Dict[str, str], name: str) -> Optional[str]:
    """The secret ``name`` from ``env``, or from the file that ``<name>_FILE`` names; None when neither is set.

    Surrounding whitespace (a file's trailing newline) is not part of it. Raises ConfigError when both
    are set, or when the file cannot be read, is empty, is over MAX_SECRET_FILE_BYTES or is not UTF-8.
    """
    file_variable = name + SECRET_FILE_SUFFIX
    value = (env.get(name) or "").strip()
    path = env.get(file_variable) or ""
    if not path:
        return value or None
    if value:
        raise ConfigError(f"both {name} and {file_variable} are set; unset one of them "
                          f"({file_variable}, which keeps the secret out of the environment, is preferred)")
    try:
        with open(path, "rb") as secret_file:
            data = secret_file.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{file_variable} names {_show(path)}, which cannot be read: {exc.strerror or exc}; "
                          "point it at a readable file that holds the secret") from None
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise ConfigError(f"{file_variable} names {_show(path)}, which is over {MAX_SECRET_FILE_BYTES} bytes: "
                          "not a secret; point it at the file that holds only the secret")
    try:
        secret = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{file_variable} names {_show(path)}, which is not UTF-8 text; "
                          "write the secret into it as text") from None
    if not secret:
        raise ConfigError(f"{file_variable} names {_show(path)}, which is empty; write the secret into it, e.g.\n"
                          f"  python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > {path}")
    return secret


def _split_list(value: Optional[str]) -> List[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def _parse_networks(value: Optional[str]) -> List[Union[ipaddress.IPv4Network, ipaddress.IPv6Network]]:
    networks = []
    for item in _split_list(value):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(
                f"UA_OPS_ALLOW_FROM entry {_show(item)} is not an IP address or CIDR range "
                "(examples: 10.0.0.5, 10.0.0.0/8, ::1, fd00::/8)"
            ) from None
    return networks


def _env_number(env: Dict[str, str], name: str, kind: Callable[[str], Any]) -> Any:
    """A non-negative number from the environment, None when unset (the default applies)."""
    text = (env.get(name) or "").strip()
    if not text:
        return None
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value < float("inf"):
        what = "a whole number" if kind is int else "a number"
        raise ConfigError(f"{name} must be {what}, 0 or more (0 turns the limit off), not {_show(text)}")
    return value


def _positive_int(env: Dict[str, str], name: str, default: int) -> int:
    text = env.get(name) or ""
    if not text:
        return default
    if not text.isdigit() or len(text) > MAX_INT_DIGITS or int(text) < 1:
        raise ConfigError(f"{name} must be a whole number of at least 1, not {_show(text)}")
    return int(text)


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Config:
    """Everything the gateway is told at start. Build it with ``Config.from_env`` or by hand."""

    def __init__(
        self,
        *,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        workspaces: Union[str, os.PathLike] = DEFAULT_WORKSPACES,
        token: Optional[str] = None,
        allowed_users: Sequence[str] = (),
        cors_origins: Sequence[str] = (),
        allow_from: Sequence[Any] = (),
        allowed_hosts: Sequence[str] = (),
        agent_cmd: Optional[str] = None,
        ws_echo: bool = False,
        insecure: bool = False,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT,
        header_timeout: float = HEADER_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        send_stall_timeout: float = SEND_STALL_TIMEOUT,
        session_create_rate: float = SESSION_CREATE_RATE,
        session_create_burst: int = SESSION_CREATE_BURST,
        session_create_per_minute: int = SESSION_CREATE_PER_MINUTE,
        log_rotate_bytes: int = GATEWAY_LOG_ROTATE_BYTES,
    ) -> None:
        self.host = "127.0.0.1" if host == "localhost" else host
        self.port = port
        self.workspaces = Path(os.path.abspath(os.fspath(workspaces)))
        self.token = token or None
        self.allowed_users = frozenset(allowed_users)
        self.cors_origins = frozenset(origin.rstrip("/") for origin in cors_origins)
        self.allow_from = [
            n if not isinstance(n, str) else ipaddress.ip_network(n, strict=False) for n in allow_from
        ]
        self.allowed_hosts = frozenset(h.lower() for h in allowed_hosts)
        self.agent_cmd = agent_cmd
        self.ws_echo = ws_echo
        self.insecure = insecure
        self.keepalive_timeout = keepalive_timeout
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.send_stall_timeout = send_stall_timeout
        self.session_create_rate = session_create_rate  # 0: no limit per address
        self.session_create_burst = session_create_burst
        self.session_create_per_minute = session_create_per_minute  # 0: no limit for all together
        self.log_rotate_bytes = log_rotate_bytes
        self._check_limits()

    # Every timeout and limit: (attribute, how an operator sets it, 0 allowed and what it means, whole number).
    # A timeout of 0, NaN or infinity would silently turn its deadline off; a negative limit refuses all.
    LIMITS = (
        ("keepalive_timeout", "--keepalive-timeout", None, False),
        ("header_timeout", "Config(header_timeout=...)", None, False),
        ("send_stall_timeout", "--send-stall-timeout", None, False),
        ("max_connections", "--max-connections", None, True),
        ("session_create_rate", "UA_SESSION_CREATE_RATE", "no limit per address", False),
        ("session_create_burst", "UA_SESSION_CREATE_BURST", "a burst of 1", True),
        ("session_create_per_minute", "UA_SESSION_CREATE_PER_MINUTE", "no limit for all addresses together", True),
        ("log_rotate_bytes", "UA_GATEWAY_LOG_ROTATE_BYTES", None, True),
    )

    def _check_limits(self) -> None:
        """Raise ConfigError naming the first timeout or limit that is not a finite number above 0
        (or exactly 0 where LIMITS gives 0 a meaning), and how to set it."""
        for attribute, where, zero_means, whole in self.LIMITS:
            value = getattr(self, attribute)
            is_number = isinstance(value, int if whole else (int, float)) and not isinstance(value, bool)
            if is_number and math.isfinite(value) and (value > 0 or (value == 0 and zero_means)):
                continue
            kind = "a whole number" if whole else "a finite number" + (" of seconds" if "timeout" in attribute else "")
            allowed = f"0 ({zero_means}) or more" if zero_means else "above 0"
            raise ConfigError(f"{attribute.replace('_', ' ')} ({where}) must be {kind}, {allowed}, not {_show(value)}")

    def check_exposure(self) -> None:
        """Refuse a non-loopback bind without a token (SPEC §1), unless ``insecure`` says otherwise."""
        if self.token or self.insecure or is_loopback_host(self.host):
            return
        raise ConfigError(
            f"refusing to listen on {self.host} without a token: anyone who can reach this address could "
            "read and delete agent sessions. Set one, e.g.\n"
            "  export UA_OPS_TOKEN=\"$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')\"\n"
            "(or write it into a file and set UA_OPS_TOKEN_FILE to its path) "
            "and send it as 'Authorization: Bearer <token>', or bind 127.0.0.1, or pass --insecure "
            "if something else guards this address."
        )

    @classmethod
    def from_env(cls, environ: Optional[Dict[str, str]] = None, **overrides: Any) -> "Config":
        """Read the UA_* variables of ``environ`` (default os.environ); ``overrides`` that are not None win.

        Raises ConfigError naming the variable that is unusable and how to fix it.
        """
        env = os.environ if environ is None else environ
        port_text = env.get("UA_GATEWAY_PORT", str(DEFAULT_PORT))
        try:
            port = int(port_text)
        except ValueError:
            raise ConfigError(f"UA_GATEWAY_PORT must be a port number, not {_show(port_text)}") from None
        values: Dict[str, Any] = dict(
            host=env.get("UA_GATEWAY_HOST") or DEFAULT_HOST,
            port=port,
            workspaces=env.get("UA_WORKSPACES_DIR") or DEFAULT_WORKSPACES,
            token=read_secret(env, "UA_OPS_TOKEN"),
            allowed_users=_split_list(env.get("UA_ALLOWED_USERS")),
            cors_origins=_split_list(env.get("UA_CORS_ORIGINS")),
            allow_from=_parse_networks(env.get("UA_OPS_ALLOW_FROM")),
            allowed_hosts=_split_list(env.get("UA_ALLOWED_HOSTS")),
            agent_cmd=env.get("UA_AGENT_CMD") or None,
            session_create_rate=_env_number(env, "UA_SESSION_CREATE_RATE", float),
            session_create_burst=_env_number(env, "UA_SESSION_CREATE_BURST", int),
            session_create_per_minute=_env_number(env, "UA_SESSION_CREATE_PER_MINUTE", int),
            log_rotate_bytes=_positive_int(env, "UA_GATEWAY_LOG_ROTATE_BYTES", GATEWAY_LOG_ROTATE_BYTES),
        )
        values = {key: value for key, value in values.items() if value is not None}  # unset: the default
        values.update({key: value for key, value in overrides.items() if value is not None})
        if not 0 <= values["port"] <= 65535:
            raise ConfigError(f"port must be between 0 and 65535, not {values['port']}")
        return cls(**values)  # Config checks every timeout and limit (_check_limits)


# ---------------------------------------------------------------------------------------------------------
# HTTP parsing (RFC 9112), Sans-I/O: feed bytes, take Request objects or an HttpError.
# ---------------------------------------------------------------------------------------------------------


class HttpError(Exception):
    """A request the gateway answers with an error status; ``detail`` tells the client what to do."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        headers: Sequence[Tuple[str, str]] = (),
        close: bool = False,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = list(headers)
        self.close = close


_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 §5.6.2 token
_TARGET_RE = re.compile(rb"/[\x21-\x7e]*")  # origin-form, visible ASCII only (RFC 9112 §3.2)
_VERSION_RE = re.compile(rb"HTTP/[0-9](\.[0-9])?")
_INT_RE = re.compile(r"[+-]?[0-9]+")
_DIGITS_RE = re.compile(r"[0-9]+")  # str.isdigit() also accepts "²", which int() refuses
# RFC 9110 §5.5: a field value is visible characters, SP and HTAB; any other control character is
# refused, since a proxy in front may read it differently (request smuggling, log injection).
_FIELD_VALUE_BAD_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_OWS = " \t"  # RFC 9110 §5.6.3 optional whitespace; str.strip() would also drop \x0b, \x1c-\x1f, \x85, \xa0
# RFC 9112 §7.1 and §7.1.1: chunk = chunk-size [ chunk-ext ] CRLF, chunk-size = 1*HEXDIG (at most 16 here:
# 64 bits), chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS ( token / quoted-string ) ]). Nothing
# else is allowed on the line: a front end that ends the line at a bare LF, or skips a NUL, would read
# different chunk boundaries than ours and could hide a second request in chunk data.
_QUOTED_STRING = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'  # RFC 9110 §5.6.4
_CHUNK_EXT = rb"(?:[ \t]*;[ \t]*%s(?:[ \t]*=[ \t]*(?:%s|%s))?)*" % (
    _TOKEN_RE.pattern, _TOKEN_RE.pattern, _QUOTED_STRING,
)
_CHUNK_LINE_RE = re.compile(rb"([0-9A-Fa-f]{1,16})%s" % _CHUNK_EXT)


class Request:
    """One parsed HTTP request. Header names are lower-case; values are latin-1 decoded strings."""

    __slots__ = (
        "method",
        "target",
        "path",
        "query_string",
        "version",
        "headers",
        "body",
        "raw_head",
        "keep_alive",
        "upgrade",
        "client",
        "started",
    )

    def __init__(self, method: str, target: str, version: str, headers: List[Tuple[str, str]]) -> None:
        self.method = method
        self.target = target
        self.path, _, self.query_string = target.partition("?")
        self.version = version
        self.headers = headers
        self.body = b""
        self.raw_head = b""
        self.keep_alive = True
        self.upgrade = False
        self.client = ""
        self.started = 0.0

    def header(self, name: str, default: Optional[str] = None) -> Optional[str]:
        """The last value of a header (names are case-insensitive), or ``default``."""
        for key, value in reversed(self.headers):
            if key == name:
                return value
        return default

    def header_tokens(self, name: str) -> List[str]:
        """All comma-separated tokens of every instance of a header, lower-cased."""
        return [
            token.strip(_OWS).lower()
            for key, value in self.headers
            if key == name
            for token in value.split(",")
            if token.strip(_OWS)
        ]


def _parse_field_line(line: bytes, kind: str) -> Tuple[str, str]:
    """A header or trailer line (RFC 9112 §5): ``(lower-case name, value)``, or a 400 that closes."""
    name, colon, value = line.partition(b":")
    if not colon or not _TOKEN_RE.fullmatch(name):
        # Also catches obs-fold (a line starting with whitespace), which RFC 9112 §5.2 lets us reject.
        raise HttpError(400, f"malformed {kind} line {_show(line)}", close=True)
    value = value.strip(b" \t")
    if _FIELD_VALUE_BAD_RE.search(value):
        raise HttpError(400, f"{kind} {_show(name)} contains a control character (CR, LF, NUL, ...)", close=True)
    return name.decode("ascii").lower(), value.decode("latin-1")


class RequestParser:
    """Turns the bytes of one connection into ``Request`` objects, enforcing SPEC §3's limits.

    Call ``feed(data)`` with bytes as they arrive, then ``next_request()`` until it returns None (more
    bytes needed). A malformed request raises ``HttpError``; after one with ``close=True`` the stream is
    out of sync and the connection must be closed. Not thread-safe (one per connection).
    """

    def __init__(self, max_head: int = MAX_HEAD_BYTES, max_body: int = MAX_BODY_BYTES) -> None:
        self.max_head = max_head
        self.max_body = max_body
        self._buffer = bytearray()
        self._pending: Optional[Request] = None  # head parsed, body still arriving
        self._body_length = 0  # Content-Length of the pending request
        self._chunked: Optional[_ChunkedBody] = None
        self.expects_continue = False  # the pending request asked for "100 Continue"

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def in_request(self) -> bool:
        """True while part of a request has arrived (so the head or body timeout applies)."""
        return self._pending is not None or bool(self._buffer.lstrip(b"\r\n"))

    @property
    def in_body(self) -> bool:
        return self._pending is not None

    @property
    def pending_head(self) -> Optional[Request]:
        """The request whose head has arrived and whose body is still arriving, if any."""
        return self._pending

    def take_remaining(self) -> bytes:
        """Hand over what follows the last request (the first WebSocket frames after an upgrade)."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def next_request(self) -> Optional[Request]:
        if self._pending is None:
            request = self._parse_head()
            if request is None:
                return None
        request = self._pending
        assert request is not None
        if self._chunked is not None:
            body = self._chunked.feed(self._buffer)
            if body is None:
                return None
            request.body = body
        elif self._body_length:
            if len(self._buffer) < self._body_length:
                return None
            request.body = bytes(self._buffer[: self._body_length])
            del self._buffer[: self._body_length]
        self._pending = None
        self._chunked = None
        self._body_length = 0
        self.expects_continue = False
        return request

    def _parse_head(self) -> Optional[Request]:
        # RFC 9112 §2.2: a server SHOULD ignore empty lines received before the request line.
        while self._buffer[:2] == b"\r\n":
            del self._buffer[:2]
        end = self._buffer.find(b"\r\n\r\n", 0, self.max_head + 4)
        if end < 0:
            if len(self._buffer) > self.max_head:
                raise HttpError(
                    431, f"request head exceeds {self.max_head} bytes; send fewer or shorter headers",
                    close=True,
                )
            first_line_end = self._buffer.find(b"\r\n")
            if first_line_end < 0 and len(self._buffer) > MAX_REQUEST_LINE:
                raise HttpError(414, f"request line exceeds {MAX_REQUEST_LINE} bytes", close=True)
            if b"\n\n" in self._buffer and b"\r\n\r\n" not in self._buffer:
                raise HttpError(400, "header lines must end with CRLF (RFC 9112 §2.2)", close=True)
            return None
        raw_head = bytes(self._buffer[: end + 4])
        del self._buffer[: end + 4]
        request = self._parse_head_bytes(raw_head[:-4])
        request.raw_head = raw_head
        self._pending = request
        return request

    def _parse_head_bytes(self, head: bytes) -> Request:
        lines = head.split(b"\r\n")
        request_line = lines[0]
        if len(request_line) > MAX_REQUEST_LINE:
            raise HttpError(414, f"request line exceeds {MAX_REQUEST_LINE} bytes", close=True)
        parts = request_line.split(b" ")
        if len(parts) != 3:
            raise HttpError(400, f"malformed request line {_show(request_line)}", close=True)
        method, target, version = parts
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            if _VERSION_RE.fullmatch(version):
                raise HttpError(505, f"HTTP version {_show(version)} is not supported; use HTTP/1.1", close=True)
            raise HttpError(400, f"malformed HTTP version {_show(version)}", close=True)
        if not _TOKEN_RE.fullmatch(method):
            raise HttpError(400, f"malformed method {_show(method)}", close=True)
        if not _TARGET_RE.fullmatch(target):
            raise HttpError(
                400,
                f"request target {_show(target)} must be a path starting with '/' in visible ASCII "
                "(percent-encode anything else)",
                close=True,
            )
        if len(lines) - 1 > MAX_HEADER_COUNT:
            raise HttpError(431, f"more than {MAX_HEADER_COUNT} header fields", close=True)
        headers = [_parse_field_line(line, "header") for line in lines[1:]]
        request = Request(method.decode("ascii"), target.decode("ascii"), version.decode("ascii"), headers)
        self._frame_body(request)
        connection = request.header_tokens("connection")
        if request.version == "HTTP/1.1":
            request.keep_alive = "close" not in connection
            hosts = [v for k, v in headers if k == "host"]
            if len(hosts) != 1:
                # close: the body (framed above) was not read, so the stream is out of sync.
                raise HttpError(400, "an HTTP/1.1 request needs exactly one Host header (RFC 9112 §3.2)", close=True)
        else:
            request.keep_alive = "keep-alive" in connection
        request.upgrade = (
            request.method == "GET"
            and "upgrade" in connection
            and "websocket" in request.header_tokens("upgrade")
        )
        return request

    def _frame_body(self, request: Request) -> None:
        """Work out how the body is delimited (RFC 9112 §6), refusing anything that could smuggle.

        Framing headers are read from their raw values, never through ``header_tokens``, which drops
        empty list elements: ``Transfer-Encoding:`` (empty) or ``Content-Length: ,2`` must not pass as
        absent or as ``2``, since a front end may read them otherwise.
        """
        lengths = [value for name, value in request.headers if name == "content-length"]
        encodings = [value for name, value in request.headers if name == "transfer-encoding"]
        if encodings:
            codings = [coding.strip(_OWS).lower() for value in encodings for coding in value.split(",")]
            if lengths:
                raise HttpError(
                    400, "Content-Length and Transfer-Encoding together are not allowed (RFC 9112 §6.1)",
                    close=True,
                )
            if request.version != "HTTP/1.1":
                raise HttpError(400, "Transfer-Encoding requires HTTP/1.1", close=True)
            if not all(codings):
                raise HttpError(
                    400, f"Transfer-Encoding {_show(encodings)} has an empty element; send exactly 'chunked'",
                    close=True,
                )
            if codings[-1] != "chunked":
                raise HttpError(400, "chunked must be the final transfer coding (RFC 9112 §6.3)", close=True)
            if len(codings) > 1:
                # RFC 9112 §6.1 suggests 501, but SPEC §3 allows no 5xx for client input: a 400 it is.
                raise HttpError(
                    400, f"transfer codings {_show(codings[:-1])} are not supported; send the body chunked "
                    "or with Content-Length", close=True,
                )
            self._chunked = _ChunkedBody(self.max_body)
        elif lengths:
            # One decimal number per field line; a list ("2, 2", ",2", "2,") is refused even where RFC 9110
            # §8.6 would let us fold it, since front ends disagree on it. Repeated field lines are accepted
            # only when spelt alike (RFC 9110 §8.6), so "2" and "02" are refused as front ends that compare
            # the text (h11 does) would.
            if not all(_DIGITS_RE.fullmatch(value) and len(value) <= MAX_INT_DIGITS for value in lengths):
                raise HttpError(
                    400, f"malformed Content-Length {_show(lengths)}; send one decimal number, not a list",
                    close=True,
                )
            if len(set(lengths)) != 1:
                raise HttpError(400, f"conflicting Content-Length values {_show(lengths)}", close=True)
            self._body_length = int(lengths[0])
            if self._body_length > self.max_body:
                raise HttpError(
                    413, f"request body of {self._body_length} bytes exceeds the limit of {self.max_body}",
                    close=True,
                )
        expect = request.header("expect")
        if expect is not None:
            if expect.lower() != "100-continue":
                raise HttpError(417, f"unsupported Expect value {_show(expect)}", close=True)
            self.expects_continue = request.version == "HTTP/1.1" and (
                self._chunked is not None or self._body_length > 0
            )


class _ChunkedBody:
    """Incremental decoder of a chunked body (RFC 9112 §7.1); trailers are checked, then ignored."""

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.body = bytearray()
        self.remaining = -1  # bytes left in the current chunk; -1 = expecting a size line
        self.in_trailers = False
        self.trailers = 0  # trailer fields seen, bounded like header fields
        self.consumed = 0  # raw bytes taken from the stream, for the overhead limit

    def feed(self, buffer: bytearray) -> Optional[bytes]:
        """Consume what it can from ``buffer``; the body once complete, else None."""
        while True:
            if self.consumed - len(self.body) > MAX_CHUNKED_OVERHEAD:
                raise HttpError(400, "chunked framing overhead is excessive; send larger chunks", close=True)
            if self.remaining > 0:
                take = min(self.remaining, len(buffer))
                if take == 0:
                    return None
                self.body += buffer[:take]
                del buffer[:take]
                self.consumed += take
                self.remaining -= take
                continue
            if self.remaining == 0:  # the CRLF after chunk data
                if len(buffer) < 2:
                    return None
                if buffer[:2] != b"\r\n":
                    raise HttpError(400, "chunk data not followed by CRLF", close=True)
                del buffer[:2]
                self.consumed += 2
                self.remaining = -1
                continue
            line = self._take_line(buffer)
            if line is None:
                return None
            if self.in_trailers:
                if not line:
                    return bytes(self.body)
                self._check_trailer(line)
                continue
            match = _CHUNK_LINE_RE.fullmatch(line)
            if match is None:
                raise HttpError(
                    400, f"malformed chunk line {_show(line)}; send hex digits, then only RFC 9112 §7.1.1 "
                    "extensions", close=True,
                )
            size = int(match.group(1), 16)
            if size == 0:
                self.in_trailers = True
                continue
            if len(self.body) + size > self.max_body:
                raise HttpError(413, f"request body exceeds the limit of {self.max_body} bytes", close=True)
            self.remaining = size

    def _take_line(self, buffer: bytearray) -> Optional[bytes]:
        """The next chunk or trailer line without its CRLF, or None until it is complete.

        RFC 9112 §7.1: these lines end in CRLF exactly. A bare LF is refused as soon as it arrives, since
        a front end may have ended the line there (and so framed the body differently).
        """
        end = buffer.find(b"\n", 0, MAX_CHUNK_LINE)
        if end < 0:
            if len(buffer) >= MAX_CHUNK_LINE:
                raise HttpError(400, f"chunk line exceeds {MAX_CHUNK_LINE} bytes", close=True)
            return None
        if end == 0 or buffer[end - 1] != 0x0D:
            raise HttpError(
                400, f"chunk line {_show(bytes(buffer[: end + 1]))} ends in a bare LF; end it with CRLF",
                close=True,
            )
        line = bytes(buffer[: end - 1])
        del buffer[: end + 1]
        self.consumed += end + 1
        return line

    def _check_trailer(self, line: bytes) -> None:
        """RFC 9112 §7.1.2: a trailer has field syntax; its value is never used."""
        self.trailers += 1
        if self.trailers > MAX_HEADER_COUNT:
            raise HttpError(400, f"more than {MAX_HEADER_COUNT} trailer fields", close=True)
        _parse_field_line(line, "trailer")


# ---------------------------------------------------------------------------------------------------------
# Responses. One function builds the error shape; every response is JSON unless it serves a static file.
# ---------------------------------------------------------------------------------------------------------


_REASONS = {status.value: status.phrase for status in http.HTTPStatus}
_REASONS[507] = "Insufficient Storage"


class Response:
    """A complete HTTP response: status, extra headers, body bytes."""

    __slots__ = ("status", "headers", "body", "content_type", "close")

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        *,
        content_type: str = "application/json",
        headers: Optional[List[Tuple[str, str]]] = None,
        close: bool = False,
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers if headers is not None else []
        self.close = close


def json_response(status: int, payload: Any, headers: Optional[List[Tuple[str, str]]] = None) -> Response:
    return Response(status, json.dumps(payload, separators=(",", ":")).encode(), headers=headers)


def error_response(error: HttpError) -> Response:
    """The one error shape of SPEC §3: ``{"detail": ...}`` with the error's status."""
    return json_response(error.status, {"detail": error.detail}, list(error.headers))


class _PerSecond:
    """A timestamp format that changes once a second, computed once a second rather than per use."""

    def __init__(self, format_second: Callable[[int], str]) -> None:
        self._format = format_second
        self._second = -1
        self._value = ""

    def __call__(self, second: Optional[int] = None) -> str:
        if second is None:
            second = int(time.time())
        if second != self._second:
            self._second = second
            self._value = self._format(second)
        return self._value


http_date = _PerSecond(lambda second: email.utils.formatdate(second, usegmt=True))
_log_second = _PerSecond(lambda second: datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"))


def _log_stamp() -> str:
    """UTC time with milliseconds, as in 2026-11-26T10:00:00.123+00:00."""
    now = time.time()
    second = int(now)
    return f"{_log_second(second)}.{int((now - second) * 1000):03d}+00:00"


def serialize_response(response: Response, keep_alive: bool, head_only: bool = False) -> bytes:
    lines = [
        f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Unknown')}",
        f"Date: {http_date()}",
        f"Server: {SERVER_NAME}",
        f"Content-Length: {len(response.body)}",
    ]
    if response.body or response.status not in (204, 304):
        lines.append(f"Content-Type: {response.content_type}")
    lines.append("X-Content-Type-Options: nosniff")
    if response.content_type == "application/json" and not any(n == "Cache-Control" for n, _ in response.headers):
        lines.append("Cache-Control: no-store")
    lines.extend(f"{name}: {value}" for name, value in response.headers)
    if not keep_alive:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + response.body


# ---------------------------------------------------------------------------------------------------------
# Access control: token, failed-auth lockout, address allowlist, CORS and Origin (SPEC §4).
# ---------------------------------------------------------------------------------------------------------


def _digest(value: str) -> bytes:
    # Comparing fixed-length digests hides the token's length as well as its content.
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


def client_ip(address: str) -> Optional[Union[ipaddress.IPv4Address, ipaddress.IPv6Address]]:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class AccessControl:
    """Decides who may use protected endpoints and how fast sessions may be created. All methods run on
    the event loop (not thread-safe).

    The failure and lockout tables are kept in time order (an entry that changes moves to the end), so
    expired entries are always at the front: each call forgets them in time proportional to their number,
    and a full table drops its oldest entry. Neither table ever holds more than AUTH_TRACKED_ADDRESSES.
    """

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic) -> None:
        self.token_digest = _digest(config.token) if config.token else None
        self.allow_from = config.allow_from
        self.cors_origins = config.cors_origins
        self.allowed_users = config.allowed_users
        self.clock = clock
        self._failures: "collections.OrderedDict[str, List[float]]" = collections.OrderedDict()  # by last failure
        self._locked_until: "collections.OrderedDict[str, float]" = collections.OrderedDict()  # by lockout start
        self._create_rate = config.session_create_rate
        self._create_burst = max(1, config.session_create_burst)
        self._create_per_minute = config.session_create_per_minute
        self._create_buckets: "collections.OrderedDict[str, Tuple[float, float]]" = collections.OrderedDict()
        self._created: "collections.deque[float]" = collections.deque()  # creations of the last 60 s, oldest first

    def address_allowed(self, address: str) -> bool:
        if not self.allow_from:
            return True
        ip = client_ip(address)
        return ip is not None and any(ip in network for network in self.allow_from)

    def lockout_remaining(self, address: str) -> float:
        now = self.clock()
        self._forget_expired(now)
        until = self._locked_until.get(address)
        return 0.0 if until is None else until - now

    def token_matches(self, candidates: Iterable[Optional[str]]) -> bool:
        if self.token_digest is None:
            return True
        matched = False
        for candidate in candidates:
            if candidate:
                # No short-circuit: every candidate is compared, so timing does not reveal which matched.
                matched |= hmac.compare_digest(_digest(candidate), self.token_digest)
        return matched

    def record_failure(self, address: str) -> bool:
        """Count a failed authentication; True when this failure starts a lockout."""
        now = self.clock()
        self._forget_expired(now)
        recent = [t for t in self._failures.pop(address, ()) if now - t < AUTH_FAILURE_WINDOW]
        recent.append(now)
        if len(recent) >= AUTH_FAILURE_LIMIT:
            self._locked_until.pop(address, None)
            _put_bounded(self._locked_until, address, now + AUTH_LOCKOUT, AUTH_TRACKED_ADDRESSES)
            return True
        _put_bounded(self._failures, address, recent, AUTH_TRACKED_ADDRESSES)
        return False

    def _forget_expired(self, now: float) -> None:
        failures, locked = self._failures, self._locked_until
        while failures and now - next(iter(failures.values()))[-1] >= AUTH_FAILURE_WINDOW:
            failures.popitem(last=False)
        while locked and next(iter(locked.values())) <= now:
            locked.popitem(last=False)

    def session_creation_wait(self, address: str) -> float:
        """Count a session creation by ``address``: 0.0 when admitted, else the seconds to wait before
        one would be (nothing is counted then). A token bucket per address (``session_create_rate`` a
        second after ``session_create_burst``), and at most ``session_create_per_minute`` in any 60 s."""
        now = self.clock()
        created = self._created
        while created and now - created[0] >= 60.0:
            created.popleft()
        wait = 0.0
        if self._create_per_minute and len(created) >= self._create_per_minute:
            wait = created[-self._create_per_minute] + 60.0 - now  # when the one that frees a place is 60 s old
        if self._create_rate:
            level, then = self._create_buckets.pop(address, (self._create_burst, now))
            tokens = min(self._create_burst, level + (now - then) * self._create_rate)
            wait = max(wait, (1.0 - tokens) / self._create_rate)
            _put_bounded(self._create_buckets, address, (tokens - (wait <= 0), now), SESSION_CREATE_TRACKED_ADDRESSES)
        if wait > 0:
            return wait
        if self._create_per_minute:
            created.append(now)
        return 0.0

    def user_allowed(self, user_id: Optional[str]) -> bool:
        return not self.allowed_users or (user_id is not None and user_id in self.allowed_users)

    def cors_headers(self, request: Request) -> List[Tuple[str, str]]:
        origin = request.header("origin")
        if origin and origin.rstrip("/") in self.cors_origins:
            return [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
        return []


def _put_bounded(table: "collections.OrderedDict[str, Any]", key: str, value: Any, limit: int) -> None:
    """Append ``key`` to a table kept oldest first, dropping the oldest entries beyond ``limit``."""
    while len(table) >= limit:
        table.popitem(last=False)
    table[key] = value


def request_tokens(request: Request) -> List[Optional[str]]:
    """The token candidates a request carries: a Bearer credential and the X-UA-OPS-TOKEN header."""
    candidates = [request.header("x-ua-ops-token")]
    authorization = request.header("authorization") or ""
    scheme, _, credential = authorization.partition(" ")
    if scheme.lower() == "bearer":
        candidates.append(credential.strip(_OWS))  # RFC 9110 §11.4: NBSP and friends are part of the credential
    return candidates


# ---------------------------------------------------------------------------------------------------------
# The gateway's own log: JSON lines under <root>/_gateway/, written by one thread so the loop never waits.
# ---------------------------------------------------------------------------------------------------------

SECURITY_EVENTS = frozenset({"auth_failure", "connection_limit"})  # records also kept in security.log ...
SECURITY_STATUSES = frozenset({403, 421, 429})  # ... and so are the access records of these refusals
_LOG_FIELD_SHORT = GATEWAY_LOG_FIELD_CHARS // 12  # no string this short escapes past the cap (an emoji takes 12)
_json_string = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]  # the C escaper json.dumps uses


def log_field(value: Any) -> Any:
    """``value`` as a log record holds it: None, booleans and numbers as they are; anything else as a
    string whose JSON escaping is at most GATEWAY_LOG_FIELD_CHARS characters, cut and marked when longer.

    The bound is on the escaped text, because that is what reaches the disk: a path of 512 '"' is 1,024
    characters once escaped, and one astral character is 12.
    """
    if value is None or isinstance(value, (int, float)):
        return value
    text = value if isinstance(value, str) else str(value)
    if len(text) <= _LOG_FIELD_SHORT or len(_json_string(text)) - 2 <= GATEWAY_LOG_FIELD_CHARS:
        return text
    mark = f"...[{len(text)} chars, cut]"
    room = GATEWAY_LOG_FIELD_CHARS - len(mark)
    low, high = 0, min(len(text), room)  # the longest prefix that fits lies in [low, high]
    while low < high:
        middle = (low + high + 1) // 2
        if len(_json_string(text[:middle])) - 2 <= room:
            low = middle
        else:
            high = middle - 1
    return text[:low] + mark


def _security_kind(event: str, fields: Dict[str, Any]) -> Optional[str]:
    """What a record is for security.log's budget ("lockout", "access 429", ...), or None: not a security record."""
    if event == "access":
        status = fields.get("status")
        return f"access {status}" if status in SECURITY_STATUSES else None
    if event == "auth_failure" and fields.get("lockout"):
        return "lockout"
    return event if event in SECURITY_EVENTS else None


class _SecurityBudget:
    """Which security records reach security.log: one a second per (kind, client), and SECURITY_LOG_RATE a
    second in all after a burst of SECURITY_LOG_BURST. A flood from one address costs one record a second;
    one from many addresses costs SECURITY_LOG_RATE a second. What is held back is counted by kind.
    Not thread-safe: GatewayLog's lock guards it.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.tokens = float(SECURITY_LOG_BURST)
        self.refilled = clock()
        self.second = -1
        self.written: "set[Tuple[str, Any]]" = set()  # keys written this second: at most BURST + RATE of them
        self.suppressed: Dict[str, int] = {}

    def admit(self, kind: str, client: Any) -> bool:
        now = self.clock()
        if int(now) != self.second:
            self.second = int(now)
            self.written.clear()
        self.tokens = min(float(SECURITY_LOG_BURST), self.tokens + (now - self.refilled) * SECURITY_LOG_RATE)
        self.refilled = now
        key = (kind, client)
        if key in self.written or self.tokens < 1.0:
            self.suppressed[kind] = self.suppressed.get(kind, 0) + 1
            return False
        self.tokens -= 1.0
        self.written.add(key)
        return True

    def take_suppressed(self) -> Dict[str, int]:
        counts, self.suppressed = self.suppressed, {}
        return counts


class GatewayLog:
    """Append-only JSON-lines logs of access and events. ``write`` is cheap and thread-safe.

    Records are collected in memory and written by one thread every GATEWAY_LOG_INTERVAL: waking a
    thread per request would make the event loop queue for the GIL after every socket call.
    Records never contain a token: callers pass only the fields listed in each call, never headers.

    Every record goes to gateway.log, each field capped by ``log_field``, so a record is bounded whatever
    a client sends. Security records (SECURITY_EVENTS, refusals with SECURITY_STATUSES) also go to
    security.log within a ``_SecurityBudget``, with a ``security_suppressed`` record a second at most
    counting what the budget held back: a request flood rotates gateway.log, not the auth failures.
    Each file rotates past ``rotate_bytes`` and keeps GATEWAY_LOG_BACKUPS older files. ``dropped``
    counts records lost to a full queue or a failed write (health shows it).
    """

    def __init__(self, directory: Path, rotate_bytes: int = GATEWAY_LOG_ROTATE_BYTES) -> None:
        self.path = directory / ops_service.GATEWAY_LOG_NAME
        self.security_path = directory / ops_service.SECURITY_LOG_NAME
        self.rotate_bytes = rotate_bytes
        self.dropped = 0
        self.problem: Optional[str] = None  # why records are being dropped, while they are (health shows it)
        self._pending: List[str] = []
        self._security: List[str] = []
        self._budget = _SecurityBudget()
        self._summarized = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ua-gateway-log", daemon=True)
        self._thread.start()

    def write(self, event: str, **fields: Any) -> None:
        for name, value in fields.items():
            if not (value is None or isinstance(value, (int, float)) or (isinstance(value, str) and len(value) <= _LOG_FIELD_SHORT)):
                fields[name] = log_field(value)
        # Formatted now: a string is not tracked by the garbage collector, while dicts held here for
        # 100 ms at 20k requests/s would survive into old generations and cost full collections.
        line = json.dumps({"ts": _log_stamp(), "event": event, **fields}, separators=(",", ":"))
        kind = _security_kind(event, fields)
        with self._lock:
            if len(self._pending) < GATEWAY_LOG_MAX_PENDING:
                self._pending.append(line)
            else:
                self.dropped += 1
            if kind is not None and self._budget.admit(kind, fields.get("client")):
                self._security.append(line)

    def close(self, timeout: float = 2.0) -> None:
        """Write what is pending and stop the thread."""
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(GATEWAY_LOG_INTERVAL)
            with self._lock:
                batch, self._pending = self._pending, []
                security, self._security = self._security, []
                summary = self._summary(final=stopping)
            if summary:
                security.append(summary)
            if batch or security:
                self._write_batches([(self.path.name, batch), (self.security_path.name, security)])
            if stopping:
                return

    def _summary(self, final: bool) -> Optional[str]:
        """A record of what the security budget held back, once a second at most (the caller holds the lock)."""
        now = time.monotonic()
        if not self._budget.suppressed or (now - self._summarized < REPORT_INTERVAL and not final):
            return None
        self._summarized = now
        counts = self._budget.take_suppressed()
        return json.dumps({"ts": _log_stamp(), "event": "security_suppressed", "records": sum(counts.values()),
                           "by_kind": counts}, separators=(",", ":"))

    def _write_batches(self, batches: List[Tuple[str, List[str]]]) -> None:
        """Append each (file name, records) to its file in the log directory, opened for this tick.

        The directory is opened from a descriptor of the root with O_NOFOLLOW, and the files relative to
        it, on every tick: ``<root>/_gateway`` swapped for a symlink (anyone who can write the root can)
        is never followed, so the log never lands outside the root, and rotation never renames files
        there. Its records are dropped and ``problem`` says why, until the directory is ours again.
        """
        try:
            dir_fd = self._open_directory()
        except OSError as exc:
            self._drop(batches, exc)
            return
        try:
            failed = False
            for name, batch in batches:
                if batch:
                    try:
                        self._append(dir_fd, name, batch)
                    except OSError as exc:  # this file's records only: the other file may still be fine
                        self._drop([(name, batch)], exc)
                        failed = True
            if not failed:
                self._report(None)
        finally:
            os.close(dir_fd)

    def _open_directory(self) -> int:
        """A descriptor of our log directory, created if missing, but never the workspaces root: a missing
        root is the operator's to fix, and health reports it. Raises OSError (ELOOP, ENOTDIR: not ours)."""
        directory = self.path.parent
        try:
            root_fd = os.open(directory.parent, os.O_RDONLY | _O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:  # the root's problem, not the log directory's: health reports it as such
            raise FileNotFoundError(errno.ENOENT, f"workspaces root: {exc.strerror or exc}") from None
        try:
            try:
                return os.open(directory.name, _LOG_DIR_FLAGS, dir_fd=root_fd)
            except FileNotFoundError:
                try:
                    os.mkdir(directory.name, 0o750, dir_fd=root_fd)
                except FileExistsError:
                    pass
                return os.open(directory.name, _LOG_DIR_FLAGS, dir_fd=root_fd)
        finally:
            os.close(root_fd)

    def _append(self, dir_fd: int, name: str, batch: List[str]) -> None:
        data = ("\n".join(batch) + "\n").encode()
        # O_NONBLOCK: a FIFO planted as the log must not block this thread; only a regular file of one
        # link is written (a second link may be a name outside the root).
        fd = os.open(name, _LOG_FILE_FLAGS, 0o640, dir_fd=dir_fd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise OSError(errno.EPERM, f"{name} is not a regular file of one link; it is left alone")
            os.write(fd, data)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size > self.rotate_bytes:
            _rotate(dir_fd, name, GATEWAY_LOG_BACKUPS)

    def _drop(self, batches: List[Tuple[str, List[str]]], error: OSError) -> None:
        with self._lock:
            self.dropped += sum(len(batch) for _, batch in batches)
        if error.errno in (errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.EPERM):
            self._report(f"the gateway log directory {self.path.parent} (or a log in it) is a symlink or not a "
                         f"regular directory or file ({error.strerror or error}); its records are dropped, never "
                         "written through it: remove it, and the gateway creates its own")

    def _report(self, problem: Optional[str]) -> None:
        """Set ``problem``; a new one is printed to stderr once (the log itself cannot hold it)."""
        if problem != self.problem and problem is not None:
            print(f"ua-gateway: warning: {problem}", file=sys.stderr, flush=True)
        self.problem = problem


# _gateway and its logs are opened without following a symlink (see GatewayLog._write_batches).
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_LOG_DIR_FLAGS = os.O_RDONLY | _O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_LOG_FILE_FLAGS = (os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
                   | getattr(os, "O_NOCTTY", 0))


def _rotate(dir_fd: int, name: str, backups: int) -> None:
    """<name>.N-1 -> <name>.N, ..., <name> -> <name>.1 inside ``dir_fd``: the oldest of ``backups`` rotated
    files is replaced. A rename replaces a symlink at the destination itself, never its target."""
    for index in range(backups - 1, 0, -1):
        try:
            os.replace(f"{name}.{index}", f"{name}.{index + 1}", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except FileNotFoundError:
            pass
    os.replace(name, f"{name}.1", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


# ---------------------------------------------------------------------------------------------------------
# Request helpers: path segments, query parameters and JSON bodies, each failing with a clear 400.
# ---------------------------------------------------------------------------------------------------------


def path_segments(path: str) -> List[str]:
    """Split a path and percent-decode each segment exactly once (SPEC §3)."""
    return [unquote(segment, errors="surrogateescape") if "%" in segment else segment for segment in path.split("/")[1:]]


def query_params(request: Request) -> Dict[str, str]:
    if not request.query_string:
        return {}
    try:
        pairs = parse_qsl(request.query_string, keep_blank_values=True, errors="surrogateescape", max_num_fields=64)
    except ValueError:
        raise HttpError(400, "too many query parameters (at most 64)") from None
    params: Dict[str, str] = {}
    for name, value in pairs:
        if name in params:
            raise HttpError(400, f"query parameter {_show(name)} is given more than once; give it once")
        params[name] = value
    return params


def int_param(params: Dict[str, str], name: str) -> Optional[int]:
    text = params.get(name)
    if text is None:
        return None
    if len(text) > MAX_INT_DIGITS + 1 or not _INT_RE.fullmatch(text):
        raise HttpError(400, f"query parameter {name} must be an integer, not {_show(text)}")
    return int(text)


_TRUE = frozenset(("true", "1", "yes", "on"))
_FALSE = frozenset(("false", "0", "no", "off"))


def bool_param(params: Dict[str, str], name: str) -> bool:
    text = params.get(name)
    if text is None:
        return False
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise HttpError(400, f"query parameter {name} must be true or false, not {_show(text)}")


def json_object_body(request: Request, allowed: Sequence[str]) -> Dict[str, Any]:
    """The request's JSON object body (an empty body is ``{}``), with only the ``allowed`` keys."""
    if not request.body.strip():
        return {}
    try:
        value = loads_json(request.body)
    except ValueError as exc:
        raise HttpError(400, f"request body is not valid JSON ({_show(str(exc), 120)}); send a JSON object") from None
    if not isinstance(value, dict):
        raise HttpError(400, f"request body must be a JSON object, not {type(value).__name__}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise HttpError(
            400, f"unknown field(s) {_show(unknown)} in the request body; allowed: {', '.join(allowed) or 'none'}"
        )
    return value


def session_id_param(value: str) -> str:
    if not ops_service.is_valid_session_id(value):
        raise HttpError(
            400,
            f"invalid session id {_show(value)}: use 1-128 characters of A-Z a-z 0-9 _ . - "
            "starting with a letter or digit",
        )
    return value


# OpsService raises named exceptions; this table is the one place that turns them into statuses.
OPS_ERROR_STATUS: Tuple[Tuple[type, int], ...] = (
    (InvalidArgument, 400),
    (SessionNotFound, 404),
    (SessionBusy, 409),
    (StorageFull, 507),
    (WorkspacesUnavailable, 503),
)


def ops_error_response(error: OpsError) -> Response:
    for kind, status in OPS_ERROR_STATUS:
        if isinstance(error, kind):
            return error_response(HttpError(status, error.detail))
    return error_response(HttpError(500, error.detail))


# ---------------------------------------------------------------------------------------------------------
# Routing: a table of path patterns; "{session_id}" segments are validated before any handler runs.
# ---------------------------------------------------------------------------------------------------------

Handler = Callable[[Request, Dict[str, str]], Union[Response, Awaitable[Response]]]


class Scope(str, enum.Enum):
    """What a route needs from its caller. A property of the route in the router table, read after
    matching: never guessed from the raw path, which has many spellings (SPEC §4)."""

    PUBLIC = "public"  # anyone who can reach the port (health, the console's files, the OpenAPI document)
    TOKEN = "token"  # the token (UA_OPS_TOKEN), the address allowlist, the lockout and the cross-site refusal


class Route:
    """A path pattern with its handlers and the ``scope`` every method on it needs (OPTIONS excepted:
    a CORS preflight carries no credentials, and answers only which methods exist)."""

    __slots__ = ("pattern", "handlers", "scope", "websocket")

    def __init__(
        self,
        pattern: str,
        handlers: Dict[str, Handler],
        *,
        scope: Scope,
        websocket: Optional[Callable[..., Any]] = None,
    ) -> None:
        self.pattern = tuple(pattern.split("/")[1:])
        self.handlers = handlers
        self.scope = scope
        self.websocket = websocket

    @property
    def template(self) -> str:
        return "/" + "/".join(self.pattern)

    @property
    def allow(self) -> str:
        methods = set(self.handlers) | ({"GET"} if self.websocket else set())
        return ", ".join(sorted(methods | {"OPTIONS"}))

    def match(self, segments: Sequence[str]) -> Optional[Dict[str, str]]:
        if len(segments) != len(self.pattern):
            return None
        params = {}
        for expected, actual in zip(self.pattern, segments):
            if expected.startswith("{"):
                params[expected[1:-1]] = actual
            elif expected != actual:
                return None
        return params


def refuse_unread_body(request: Request, pending: bool) -> None:
    """A body on a method no handler reads (GET, HEAD, DELETE, OPTIONS) is a 400, whether it is still
    arriving (``pending``: refused before it is read) or came with the head: never silently ignored."""
    if request.method not in BODY_METHODS and (pending or request.body):
        raise HttpError(400, f"{request.method} takes no request body; send it without one")


def method_not_allowed(request: Request, route: Route) -> HttpError:
    return HttpError(405, f"method {request.method} is not allowed on {_show(request.path)}; use {route.allow}",
                     headers=[("Allow", route.allow)])


class Router:
    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = list(routes)
        self._static = {route.pattern: route for route in routes if not any(p.startswith("{") for p in route.pattern)}
        self._dynamic = [route for route in routes if route.pattern not in self._static]

    def match(self, segments: Sequence[str]) -> Tuple[Optional[Route], Dict[str, str]]:
        route = self._static.get(tuple(segments))
        if route is not None:
            return route, {}
        for route in self._dynamic:
            params = route.match(segments)
            if params is not None:
                return route, params
        return None, {}


CONSOLE_ASSETS = {  # the console's files, shipped in console/ beside this module (and inside the .pyz)
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "openapi.json": "application/json",
}
CONSOLE_HEADERS = [
    # The console loads nothing from elsewhere; it talks to this gateway only (HTTP and WebSocket).
    ("Content-Security-Policy", "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
                                "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-cache"),
]


def read_console_assets() -> Dict[str, bytes]:
    """The console files that exist, read through this module's loader so it works from the zip too."""
    loader = globals().get("__loader__")
    base = os.path.join(os.path.dirname(os.path.abspath(__file__)), "console")
    assets = {}
    for name in CONSOLE_ASSETS:
        try:
            assets[name] = loader.get_data(os.path.join(base, name))  # type: ignore[union-attr]
        except (OSError, AttributeError):
            continue
    return assets
CORS_ALLOW_HEADERS = "Authorization, Content-Type, X-UA-OPS-Token, X-UA-User"
# Methods whose handlers read a request body; a body sent with any other is refused before it is read.
BODY_METHODS = frozenset(("POST", "PUT", "PATCH"))
# Sec-Fetch-Site values of a request made by the gateway's own pages, or typed by the user (Fetch Metadata).
SAME_ORIGIN_FETCH_SITES = frozenset(("same-origin", "none"))


# ---------------------------------------------------------------------------------------------------------
# The gateway: routes, the Ops API handlers, and the lifecycle of the listening socket.
# ---------------------------------------------------------------------------------------------------------


class Gateway:
    """The whole server. ``await start()``, then ``await stop()``; ``url`` is known once started.

    ``agent`` (for embedding) is an async callable that runs one turn; see "Agents" below.
    """

    def __init__(self, config: Config, *, agent: Optional[Callable[..., Awaitable[Any]]] = None) -> None:
        self.config = config
        self.ops = OpsService(config.workspaces)
        self.access = AccessControl(config)
        self.agent = agent
        self.executor = concurrent.futures.ThreadPoolExecutor(OPS_THREADS, thread_name_prefix="ua-ops")
        self.connections: "set[HttpConnection]" = set()
        self.draining = False
        self.started_at = time.monotonic()
        self.root_problem: Optional[str] = None
        self.log: Optional[GatewayLog] = None
        self.server: Optional[Listener] = None
        self.fd_budget: Optional[int] = None  # connections the open-file limit leaves room for, if it has one
        self.port = config.port
        self._tasks: List[asyncio.Task] = []
        self.hub: Optional[SessionHub] = None
        self.assets: Dict[str, bytes] = {}
        self.router = Router(self._routes())

    # -- lifecycle -----------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.config.check_exposure()
        try:
            await loop.run_in_executor(self.executor, self.ops.ensure_root)
        except OSError as exc:
            raise ConfigError(f"cannot create or open the workspaces root {self.ops.root}: {exc.strerror or exc}; "
                              "create it, fix its permissions, or point UA_WORKSPACES_DIR / --workspaces elsewhere") from None
        self.assets = await loop.run_in_executor(self.executor, read_console_assets)
        self.log = GatewayLog(self.ops.root / ops_service.GATEWAY_DIR_NAME, self.config.log_rotate_bytes)
        self.fd_budget = descriptor_budget()
        if self.agent is not None:
            agent = self.agent
        elif self.config.agent_cmd:
            agent = command_agent(resolve_agent_command(self.config.agent_cmd))
        else:
            agent = echo_agent
        self.hub = SessionHub(self, agent)
        self.server = await Listener.open(self, self.config.host, self.config.port, backlog=1024)
        self.port = self.server.sockets[0].getsockname()[1]
        self.started_at = time.monotonic()
        self._tasks = [loop.create_task(self._sweep_deadlines()), loop.create_task(self._watch_root())]
        self.log.write("start", version=__version__, url=self.url, workspaces=str(self.ops.root),
                       connection_limit=self.connection_limit())

    async def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop accepting, let in-flight requests finish (at most ``grace`` seconds), close the rest."""
        self.draining = True
        if self.server is not None:
            self.server.close()
        deadline = time.monotonic() + grace
        if self.hub is not None:
            await self.hub.shutdown(grace)
        for connection in list(self.connections):
            connection.shutdown()
        while any(c.in_flight for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for connection in list(self.connections):
            connection.abort()
        for task in self._tasks:
            task.cancel()
        if self.log is not None:
            self.log.write("stop", uptime_s=round(time.monotonic() - self.started_at, 3))
            self.log.close()
        self.executor.shutdown(wait=False)

    def connection_limit(self) -> int:
        """How many connections may be open now: ``max_connections``, lowered to what the open-file limit
        leaves (``fd_budget``) once every running agent command has its AGENT_TURN_FDS descriptors."""
        limit = self.config.max_connections
        if self.fd_budget is not None:
            commands = len(self.hub.agent_groups) if self.hub is not None else 0
            limit = min(limit, self.fd_budget - AGENT_TURN_FDS * commands)
        return limit

    def agent_command_limit(self) -> int:
        """How many agent commands may run at once: MAX_AGENT_COMMANDS, and no more than leave a share
        of the descriptor budget (1/HTTP_FD_SHARE) to connections."""
        if self.fd_budget is None:
            return MAX_AGENT_COMMANDS
        return min(MAX_AGENT_COMMANDS, (self.fd_budget - self.fd_budget // HTTP_FD_SHARE) // AGENT_TURN_FDS)

    async def _sweep_deadlines(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0.25)
            now = loop.time()
            for connection in list(self.connections):
                if connection.deadline and now >= connection.deadline:
                    connection.on_deadline()
                connection.check_send_progress(now)

    async def _watch_root(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                await loop.run_in_executor(self.executor, functools.partial(self.ops.check_root, writable=True))
                await loop.run_in_executor(self.executor, self.ops.check_space)  # a full volume is not writable
                problem = None
            except (WorkspacesUnavailable, StorageFull) as exc:
                problem = exc.detail
            if problem != self.root_problem:
                # Named in full here and to an authorized health call; a public one gets it without the path.
                if problem is not None:
                    print(f"ua-gateway: warning: {problem}", file=sys.stderr, flush=True)
                if self.log is not None:
                    self.log.write("root_problem" if problem else "root_recovered", detail=problem)
            self.root_problem = problem
            await asyncio.sleep(ROOT_CHECK_INTERVAL)

    async def run_ops(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run an OpsService call in a worker thread: disk work never blocks the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(function, *args, **kwargs))

    # -- dispatch ------------------------------------------------------------------------------------------

    def dispatch(self, request: Request) -> Union[Response, Awaitable[Response]]:
        """Route one request. Returns a response now, or an awaitable for work that touches the disk."""
        try:
            route, params = self.admit(request)
            if request.method == "OPTIONS":
                return self._options(request, route)
            handler = route.handlers.get(request.method)
            if handler is None:
                raise method_not_allowed(request, route)
            refuse_unread_body(request, pending=False)
            for name, value in params.items():
                if name == "session_id":
                    session_id_param(value)  # an upgrade's bad id is the WebSocket's to refuse (close 4000)
            return handler(request, params)
        except HttpError as error:
            return error_response(error)
        except Exception as error:  # a bug of ours: answer 500, log it, keep serving
            return self.internal_error(request, error)

    def admit(self, request: Request, extra_token: Optional[str] = None) -> Tuple[Route, Dict[str, str]]:
        """The one place that decides whether a request may reach a route, for HTTP and upgrades alike.

        The route is matched on the decoded path segments first; what it needs is then read from the
        route itself (``Route.scope``), so every spelling of a path that reaches a route gets that route's
        decision. Raises HttpError: 421 for a Host not served, 404 for no route, the refusals of
        ``authorize``.
        """
        if self.config.allowed_hosts:
            self._check_host(request)
        route, params = self.router.match(path_segments(request.path))
        if route is None:
            raise HttpError(404, f"no endpoint at {_show(request.path)}; the API is described at /api/v1/openapi.json")
        if route.scope is not Scope.PUBLIC and request.method != "OPTIONS":
            self.authorize(request, "WebSocket" if request.upgrade else "request", extra_token)
        return route, params

    def refuse_before_body(self, request: Request) -> Optional[Response]:
        """The answer to a request whose body has not arrived yet, when ``admit`` refuses it; else None.

        The refusal closes the connection: the unread body is discarded, never parsed as requests."""
        try:
            route, _ = self.admit(request, _subprotocol_token(request) if request.upgrade else None)
            if request.method not in route.handlers and request.method != "OPTIONS":
                raise method_not_allowed(request, route)
            refuse_unread_body(request, pending=True)
        except HttpError as error:
            response = error_response(error)
            response.close = True
            return response
        return None

    def internal_error(self, request: Request, error: BaseException) -> Response:
        if self.log is not None:
            self.log.write("internal_error", path=request.path[:512], error=repr(error)[:500])
        return error_response(HttpError(500, "internal error; the gateway log has the details"))

    def authorize(self, request: Request, what: str, extra_token: Optional[str] = None) -> None:
        """SPEC §4 for a protected request (``what`` names it in errors): a cross-site browser request is
        refused first, then the address allowlist, the lockout, and the token (or ``extra_token``, the
        one a browser offers as a WebSocket subprotocol). Raises HttpError on refusal."""
        self._refuse_cross_site(request, what)
        address = request.client
        if not self.access.address_allowed(address):
            raise HttpError(403, f"client address {address} is not allowed by UA_OPS_ALLOW_FROM")
        remaining = self.access.lockout_remaining(address)
        if remaining:
            seconds = int(remaining) + 1
            raise HttpError(
                429,
                f"too many failed authentications from {address}; try again in {seconds} s with the right token",
                headers=[("Retry-After", str(seconds))],
            )
        if not self.access.token_matches(request_tokens(request) + [extra_token]):
            locked = self.access.record_failure(address)
            if self.log is not None:
                self.log.write("auth_failure", client=address, path=request.path, lockout=locked)
            raise HttpError(401, "Unauthorized", headers=[("WWW-Authenticate", 'Bearer realm="ua-gateway"')])

    def _check_host(self, request: Request) -> None:
        host = (request.header("host") or "").lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.strip("[]")
        if not (is_loopback_host(name) or name in self.config.allowed_hosts or host in self.config.allowed_hosts):
            raise HttpError(421, f"Host {_show(host)} is not served here; list it in UA_ALLOWED_HOSTS")

    def _options(self, request: Request, route: Route) -> Response:
        headers = [("Allow", route.allow)]
        cors = self.access.cors_headers(request)
        if cors:
            headers += cors + [
                ("Access-Control-Allow-Methods", route.allow),
                ("Access-Control-Allow-Headers", CORS_ALLOW_HEADERS),
                ("Access-Control-Max-Age", str(CORS_MAX_AGE)),
            ]
        return Response(204, headers=headers)

    async def _ops_response(self, http_status: int, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Response:
        return json_response(http_status, await self.run_ops(function, *args, **kwargs))

    def runtime(self) -> Dict[str, Tuple[int, bool]]:
        """{session_id: (active_connections, running)} for sessions with live connections or turns."""
        return self.hub.snapshot() if self.hub is not None else {}

    # -- WebSocket upgrades --------------------------------------------------------------------------------

    def try_upgrade(self, request: Request, connection: "HttpConnection") -> bool:
        """Hand a WebSocket upgrade on a WebSocket route to the bridge. False: not ours, serve it as HTTP."""
        route, _ = self.router.match(path_segments(request.path))
        if route is None or route.websocket is None:
            return False
        try:
            route, params = self.admit(request, _subprotocol_token(request))
        except HttpError as error:
            response = error_response(error)
            response.close = True
            connection._send(response, request)
            return True
        app = route.websocket(request, params)
        protocol = ServerProtocol(
            subprotocols=[WS_SUBPROTOCOL],
            select_subprotocol=_select_subprotocol,
            max_size=WS_ECHO_MAX_MESSAGE if isinstance(app, EchoApp) else WS_MAX_MESSAGE,
            logger=_ws_logger,
        )
        bridge = WebSocketBridge(connection, protocol, app)
        connection.bridge = bridge
        connection.deadline = 0.0
        if self.log is not None:
            self.log.write("websocket", client=request.client, path=request.path[:512])
        bridge.start(request, request.raw_head, connection.parser.take_remaining())
        if connection.peer_eof and connection.bridge is bridge:
            # The peer half-closed while this upgrade waited behind earlier pipelined requests.
            bridge.eof_received()
            connection._close()
        return True

    def _refuse_cross_site(self, request: Request, what: str) -> None:
        """A browser request that is not same-origin (CSRF, cross-site WebSocket hijacking, a page on a
        sibling subdomain) → 403, unless its Origin is the gateway's own or listed in UA_CORS_ORIGINS.

        Browsers send Origin on every WebSocket and on cross-origin requests that change state, and
        Sec-Fetch-Site on every request (an <img> or a form post included); other clients send neither.
        ``same-site`` is refused too: a page on another port or subdomain of the same site is another
        origin. Checked before the token, so that a web page cannot lock the operator's own address out
        by failing authentications on its behalf.
        """
        origin = request.header("origin")
        if origin is not None and self.access.cors_headers(request):
            return
        fetch_site = (request.header("sec-fetch-site") or "").lower()
        if fetch_site and fetch_site not in SAME_ORIGIN_FETCH_SITES:
            listed = "list its Origin in UA_CORS_ORIGINS" if origin else "it sent no Origin to check"
            raise HttpError(403, f"{what} from another origin refused (Sec-Fetch-Site: {_show(fetch_site)}); {listed}")
        if origin is None:
            return
        own = (request.header("host") or "").lower()
        scheme, _, origin_host = origin.lower().partition("://")
        if origin_host.rstrip("/") != own:
            raise HttpError(403, f"{what} from Origin {_show(origin)} refused; list it in UA_CORS_ORIGINS")

    def _agent_socket(self, request: Request, params: Dict[str, str]) -> "AgentSocket":
        query = dict(parse_qsl(request.query_string, keep_blank_values=True))
        session_id = params.get("session_id", query.get("session_id"))
        return AgentSocket(self, session_id, user_id=request.header("x-ua-user") or query.get("user_id"))

    def _websocket_only(self, request: Request, params: Dict[str, str]) -> Response:
        raise HttpError(426, "this endpoint is a WebSocket; connect with a WebSocket client",
                        headers=[("Upgrade", "websocket")])

    def _routes(self) -> List[Route]:
        public, token = Scope.PUBLIC, Scope.TOKEN
        return [
            Route("/", {"GET": self.console_page}, scope=public),
            Route("/console/{asset}", {"GET": self.console_asset}, scope=public),
            Route("/api/v1/openapi.json", {"GET": self.openapi}, scope=public),
            Route("/api/v1/health", {"GET": self.health}, scope=public),
            Route("/api/v1/ops/sessions", {"GET": self.list_sessions}, scope=token),
            Route("/api/v1/ops/sessions/{session_id}", {"GET": self.session_details, "DELETE": self.delete_session},
                  scope=token),
            Route("/api/v1/ops/sessions/{session_id}/preview", {"GET": self.preview}, scope=token),
            Route("/api/v1/ops/sessions/{session_id}/reset", {"POST": self.reset_session}, scope=token),
            Route("/api/v1/ops/sessions/{session_id}/compact", {"POST": self.compact_session}, scope=token),
            Route("/api/v1/ops/logs/tail", {"GET": self.logs_tail}, scope=token),
            Route("/api/v1/sessions", {"POST": self.create_session}, scope=token),
            Route("/api/v1/sessions/{session_id}/stream", {"GET": self._websocket_only}, scope=token,
                  websocket=self._agent_socket),
            Route("/ws/agent", {"GET": self._websocket_only}, scope=token, websocket=self._agent_socket),
        ] + ([Route("/ws/echo", {"GET": self._websocket_only}, scope=token, websocket=lambda r, p: EchoApp())]
             if self.config.ws_echo else [])

    # -- handlers ------------------------------------------------------------------------------------------

    def console_page(self, request: Request, params: Dict[str, str]) -> Response:
        return self._asset("index.html")

    def console_asset(self, request: Request, params: Dict[str, str]) -> Response:
        return self._asset(params["asset"])

    def openapi(self, request: Request, params: Dict[str, str]) -> Response:
        return self._asset("openapi.json")

    def _asset(self, name: str) -> Response:
        body = self.assets.get(name)
        if body is None:
            raise HttpError(404, f"no console file {_show(name)} in this build")
        return Response(200, body, content_type=CONSOLE_ASSETS[name], headers=list(CONSOLE_HEADERS))

    def health(self, request: Request, params: Dict[str, str]) -> Response:
        uptime = round(time.monotonic() - self.started_at, 3)
        log_dropped = self.log.dropped if self.log is not None else 0  # records lost to a failing disk or a full queue
        problem = self.root_problem or (self.log.problem if self.log is not None else None)
        if problem:
            if not self._may_see_paths(request):
                problem = problem.replace(str(self.ops.root), "<workspaces root>") + (
                    " (the path is on the gateway's stderr, and in the answer to a health call with the token)")
            return json_response(503, {"status": "degraded", "detail": problem, "version": __version__, "uptime_s": uptime,
                                       "log_dropped": log_dropped})
        return json_response(200, {"status": "ok", "version": __version__, "uptime_s": uptime, "log_dropped": log_dropped})

    def _may_see_paths(self, request: Request) -> bool:
        """True if ``request`` passes the checks of a token route (``authorize``: cross-site refusal, allowlist,
        lockout, token), so health may name file-system paths to it. A caller that offers no token when one
        is configured is simply public: that is not a failed authentication, and monitors poll health so."""
        if self.access.token_digest is not None and not any(request_tokens(request)):
            return False
        try:
            self.authorize(request, "request")
        except HttpError:
            return False
        return True

    def list_sessions(self, request: Request, params: Dict[str, str]) -> Awaitable[Response]:
        query = query_params(request)
        return self._ops_response(
            200,
            self.ops.list_sessions,
            status=query.get("status", "all"),
            limit=int_param(query, "limit"),
            offset=int_param(query, "offset"),
            runtime=self.runtime(),
        )

    def session_details(self, request: Request, params: Dict[str, str]) -> Awaitable[Response]:
        return self._ops_response(200, self.ops.session_details, params["session_id"], runtime=self.runtime())

    def preview(self, request: Request, params: Dict[str, str]) -> Awaitable[Response]:
        query = query_params(request)
        return self._ops_response(
            200,
            self.ops.read_log,
            params["session_id"],
            "activity_journal.log",
            cursor=query.get("cursor"),
            limit=int_param(query, "limit"),
            max_bytes=int_param(query, "max_bytes"),
        )

    def logs_tail(self, request: Request, params: Dict[str, str]) -> Awaitable[Response]:
        query = query_params(request)
        session_id = query.get("session_id")
        file_name = query.get("file") or None  # "file=" means the default, as for any empty parameter
        slice_args = dict(cursor=query.get("cursor"), limit=int_param(query, "limit"), max_bytes=int_param(query, "max_bytes"))
        if session_id is None:
            if file_name not in (None, ops_service.GATEWAY_LOG_NAME):
                raise HttpError(400, f"file {_show(file_name)} needs session_id; without it the gateway's own log is read")
            return self._ops_response(200, self.ops.read_gateway_log, **slice_args)
        session_id_param(session_id)
        file_name = file_name or "run.log"
        if file_name not in ops_service.LOG_FILES:
            raise HttpError(400, f"file must be one of {', '.join(ops_service.LOG_FILES)}, not {_show(file_name)}")
        return self._ops_response(200, self.ops.read_log, session_id, file_name, **slice_args)

    def reset_session(self, request: Request, params: Dict[str, str]) -> Awaitable[Response]:
        body = json_object_body(request, ("clear_logs", "clear_memory", "clear_work_products"))
        return self._ops_response(200, self.ops.reset_session, params["session_id"], **body)

    def compact_session(self, request: Request, params: Dict[str, str]) -> Awaitable[Response]:
        body = json_object_body(request, ("max_lines", "max_bytes"))
        return self._ops_response(200, self.ops.compact_session, params["session_id"], **body)

    def delete_session(self, request: Request, params: Dict[str, str]) -> Awaitable[Response]:
        query = query_params(request)
        if not bool_param(query, "confirm"):
            raise HttpError(400, "deleting a session needs ?confirm=true; nothing was touched")
        force = bool_param(query, "force")
        return self._delete(params["session_id"], force)

    async def _delete(self, session_id: str, force: bool) -> Response:
        hub = self.hub
        if hub is not None and hub.running(session_id):
            if not force:
                raise HttpError(409, f"session {session_id} has a turn running; cancel it first or add force=true")
            await hub.cancel_and_wait(session_id, "session deleted")
        result = await self.run_ops(self.ops.delete_session, session_id)
        if hub is not None:
            hub.close_session(session_id, 4004, "session deleted")
        return json_response(200, result)

    def create_session(self, request: Request, params: Dict[str, str]) -> Awaitable[Response]:
        body = json_object_body(request, ("user_id",))
        user_id = body.get("user_id")
        if user_id is not None and not isinstance(user_id, str):
            raise HttpError(400, "user_id must be a string")
        if not self.access.user_allowed(user_id):
            raise HttpError(403, "user_id is missing or not in UA_ALLOWED_USERS")
        self.admit_session_creation(request.client)
        return self._ops_response(201, self.ops.create_session)

    def admit_session_creation(self, address: str) -> None:
        """Count one session creation (HTTP or the WebSocket lobby) by ``address``; HttpError 429 with
        Retry-After when it is over UA_SESSION_CREATE_RATE/_BURST or UA_SESSION_CREATE_PER_MINUTE."""
        wait = self.access.session_creation_wait(address)
        if wait:
            seconds = max(1, math.ceil(wait))
            raise HttpError(
                429,
                f"too many sessions created (from {address} or in all); retry in {seconds} s, or attach to an "
                "existing session; the limits are UA_SESSION_CREATE_RATE, _BURST and _PER_MINUTE",
                headers=[("Retry-After", str(seconds))],
            )


# ---------------------------------------------------------------------------------------------------------
# Connections: one HttpConnection per socket; it owns the parser, the timeouts and the order of answers.
# ---------------------------------------------------------------------------------------------------------


class HttpConnection(asyncio.Protocol):
    """Moves bytes between a socket, the parser and the gateway. Runs on the event loop only.

    Deadlines (checked by the gateway's sweeper): the request head within ``header_timeout`` of its first
    byte (or of the connection), a body within BODY_TIMEOUT, and an idle keep-alive connection closes after
    ``keepalive_timeout``. While a handler runs there is no deadline; pipelined bytes wait, bounded.

    Sending: while more than MAX_SEND_BACKLOG bytes of answers wait for the peer to read them, no further
    pipelined request is answered (and reading stops once MAX_PIPELINE_BUFFER bytes of them wait). When
    the peer takes none of a non-empty send buffer for ``send_stall_timeout``, the connection is aborted,
    closing or not: ``transport.close()`` alone would wait for that peer forever.
    """

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.loop = asyncio.get_event_loop()
        self.parser = RequestParser()
        self.transport: Optional[asyncio.Transport] = None
        self.client = ""
        self.busy = False
        self.closed = False
        self.write_paused = False
        self.reading_paused = False
        self.peer_eof = False
        self.continue_sent = False
        self.deadline = 0.0
        self.phase = "head"  # head | body | idle | busy | send | linger
        self.bridge: Any = None  # the WebSocket bridge once upgraded
        self.unsent = 0  # the transport's write buffer when the sweeper last looked
        self.resumed = False  # resume_writing() since the sweeper last looked: the peer took bytes
        self.send_progress_at = self.loop.time()  # when the peer last took bytes, or none were waiting

    # -- asyncio.Protocol ----------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.client = str(peer[0]) if peer else ""
        if self.gateway.draining:  # the connection limit is the Listener's, decided before accepting
            transport.write(refusal_bytes("the gateway is shutting down"))  # type: ignore[attr-defined]
            transport.close()
            self.closed = True
            return
        self.gateway.connections.add(self)
        self.transport.set_write_buffer_limits(high=MAX_SEND_BACKLOG)
        self._enter("head")

    def data_received(self, data: bytes) -> None:
        if self.bridge is not None:
            self.bridge.data_received(data)
            return
        if self.closed or self.phase == "linger":
            return
        self.parser.feed(data)
        if self.phase == "idle":
            self._enter("head")
        if not self.busy:
            self._process()
        # Stop reading while requests wait, behind a handler or behind a peer that does not read its
        # answers: either way, what it keeps sending must not pile up here without bound.
        waiting = self.busy or self.write_paused
        if waiting and self.parser.buffered > MAX_PIPELINE_BUFFER and not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def eof_received(self) -> Optional[bool]:
        if self.bridge is not None:
            return self.bridge.eof_received()
        self.peer_eof = True
        if self.busy or self.write_paused:
            # Keep the write side open: the answer in flight, and those to requests pipelined before
            # the half-close, are still delivered; _await_more closes once none is left.
            return True
        self._close()
        return None

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.closed = True
        self.gateway.connections.discard(self)
        if self.bridge is not None:
            self.bridge.connection_lost(exc)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.bridge is not None and self.transport is not None:
            self.transport.pause_reading()  # a peer that does not read gets no more of its input read

    def resume_writing(self) -> None:
        self.write_paused = False
        self.resumed = True
        if self.bridge is not None:
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
        elif not self.busy and not self.closed:
            # Soon, not now: this runs inside the transport's write callback, and answering may close
            # the transport there, which makes asyncio (3.11) report the connection lost twice.
            self.loop.call_soon(self._process)

    # -- request loop --------------------------------------------------------------------------------------

    def _enter(self, phase: str) -> None:
        self.phase = phase
        timeouts = {
            "head": self.gateway.config.header_timeout,
            "body": BODY_TIMEOUT,
            "idle": self.gateway.config.keepalive_timeout,
            "linger": 2.0,
        }
        timeout = timeouts.get(phase)
        self.deadline = self.loop.time() + timeout if timeout else 0.0

    def _process(self) -> None:
        while not self.busy and not self.closed and not self.write_paused and self.phase != "linger":
            try:
                request = self.parser.next_request()
            except HttpError as error:
                self._send(error_response(error), None)
                return
            if request is None:
                self._await_more()
                return
            self.continue_sent = False
            request.client = self.client
            request.started = self.loop.time()
            if request.upgrade and self.gateway.try_upgrade(request, self):
                if self.bridge is not None:
                    # The bridge bounds its own backlog (WS_MAX_SEND_BUFFER); the mark only decides
                    # when a WebSocket peer that does not read stops being read.
                    self.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)  # type: ignore[union-attr]
                return
            result = self.gateway.dispatch(request)
            if isinstance(result, Response):
                self._send(result, request)
            else:
                self.busy = True
                self._enter("busy")
                self.loop.create_task(self._finish(request, result))
        if self.write_paused and not self.busy and not self.closed and self.phase != "linger":
            # The requests have arrived; their answers wait for the peer. A 408 would be a lie queued
            # behind them: the send-stall deadline (check_send_progress) applies instead.
            self._enter("send")

    def _await_more(self) -> None:
        head = self.parser.pending_head
        if head is not None and not head.client:
            # Its body is still to come: refuse now if the route would, before a byte of it is held
            # or a "100 Continue" invites it (an anonymous client could otherwise pin 1 MiB per socket).
            head.client = self.client
            head.started = self.loop.time()
            refusal = self.gateway.refuse_before_body(head)
            if refusal is not None:
                self._send(refusal, head)
                return
        if self.parser.expects_continue and not self.continue_sent:
            self.continue_sent = True
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # type: ignore[union-attr]
        if self.parser.in_body:
            if self.phase != "body":
                self._enter("body")
        elif self.parser.in_request:
            if self.phase != "head":
                self._enter("head")
        elif self.phase != "idle":
            self._enter("idle")
        if self.reading_paused and self.parser.buffered <= MAX_PIPELINE_BUFFER:
            self.reading_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        if self.peer_eof or (self.gateway.draining and self.phase == "idle"):
            self._close()

    async def _finish(self, request: Request, pending: Awaitable[Response]) -> None:
        try:
            response = await pending
        except HttpError as error:
            response = error_response(error)
        except OpsError as error:
            response = ops_error_response(error)
        except Exception as error:  # a bug of ours: answer 500, log it, keep serving
            response = self.gateway.internal_error(request, error)
        self.busy = False
        if self.closed:
            return
        self._send(response, request)
        if not self.closed:
            self._process()

    def _send(self, response: Response, request: Optional[Request]) -> None:
        if self.closed or self.transport is None:
            return
        keep_alive = (
            request is not None
            and request.keep_alive
            and not response.close
            and not self.gateway.draining
        )
        if request is not None and request.method != "OPTIONS":
            response.headers.extend(self.gateway.access.cors_headers(request))
        # RFC 9110 §9.3.2: a response to HEAD has no content, whatever its status; a body would be read
        # by the client as the start of the next response.
        head_only = request is not None and request.method == "HEAD"
        self.transport.write(serialize_response(response, keep_alive, head_only))
        log = self.gateway.log
        if log is not None:
            log.write(
                "access",
                client=self.client,
                method=request.method if request else None,
                path=request.path[:512] if request else None,
                status=response.status,
                bytes=len(response.body),
                ms=round((self.loop.time() - request.started) * 1000, 3) if request else None,
            )
        if not keep_alive:
            self._linger()

    # -- closing -------------------------------------------------------------------------------------------

    def _linger(self) -> None:
        """Half-close after the last answer and discard input briefly, so the peer reads the answer
        instead of a reset caused by bytes it already sent (an unread 2 MiB body, say)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.can_write_eof() and not self.peer_eof:
            transport.write_eof()
            self._enter("linger")
            if self.reading_paused:
                self.reading_paused = False
                transport.resume_reading()
        else:
            self._close()

    def on_deadline(self) -> None:
        if self.bridge is not None:
            return
        if self.phase in ("head", "body"):
            what = "request head" if self.phase == "head" else "request body"
            limit = self.gateway.config.header_timeout if self.phase == "head" else BODY_TIMEOUT
            self._send(error_response(HttpError(408, f"{what} not received within {limit:g} s")), None)
        else:
            self._close()

    def check_send_progress(self, now: float) -> None:
        """The sweeper's look at the send side: abort after ``send_stall_timeout`` without progress.

        Progress is the write buffer emptying, shrinking or crossing the low-water mark since the last
        look. A peer that reads, but more slowly than a WebSocket app writes, for the whole timeout
        counts as stalled too: it falls behind without bound.
        """
        transport = self.transport
        if transport is None:
            return
        unsent = transport.get_write_buffer_size()
        progressed = not unsent or unsent < self.unsent or self.resumed
        self.unsent, self.resumed = unsent, False
        if progressed:
            self.send_progress_at = now
        elif now - self.send_progress_at >= self.gateway.config.send_stall_timeout:
            log = self.gateway.log
            if log is not None:
                log.write("send_stalled", client=self.client, unsent=unsent, phase=self.phase)
            transport.abort()

    @property
    def in_flight(self) -> bool:
        """A request is being received or answered, or a WebSocket is still closing."""
        return not self.closed and (self.busy or self.parser.in_request or self.bridge is not None)

    def shutdown(self) -> None:
        """Graceful stop: idle connections close now, busy ones after their answer."""
        if self.bridge is not None:
            self.bridge.shutdown()
        elif not self.busy and not self.parser.in_request:
            self._close()

    def _close(self) -> None:
        self.deadline = 0.0
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


# ---------------------------------------------------------------------------------------------------------
# WebSocket bridge: websockets' Sans-I/O ServerProtocol driven by our connection (ecosystem.md §1b).
# What the Sans-I/O layer leaves to us lives here: keepalive pings, the closing timeout, message
# reassembly with incremental UTF-8 checks, and a bounded send buffer.
# ---------------------------------------------------------------------------------------------------------

WS_MAX_MESSAGE = 1024 * 1024  # SPEC §6: a frame (or message) over 1 MiB closes with 1009
WS_ECHO_MAX_MESSAGE = 16 * 1024 * 1024  # SPEC §6: the diagnostic echo route allows 16 MiB
WS_PING_INTERVAL = 20.0  # SPEC §6: ping every 20 s ...
WS_PING_TIMEOUT = 20.0  # ... and drop a peer that has not answered within 20 s
WS_CLOSE_TIMEOUT = 10.0  # the peer has 10 s to finish the closing handshake (websockets' default)
WS_MAX_SEND_BUFFER = 8 * 1024 * 1024  # a consumer this far behind is closed with 1008, not buffered for
WS_MAX_CLOSE_REASON = 123  # RFC 6455 §5.5: a control frame carries at most 125 bytes, 2 of them the code
WS_SUBPROTOCOL = "ua.v1"
WS_BEARER_PREFIX = "bearer."  # a token offered as a subprotocol, base64url without padding (Kubernetes' way)

_ws_logger = logging.getLogger("ua_gateway.websocket")
_ws_logger.addHandler(logging.NullHandler())
_ws_logger.propagate = False


def close_reason(reason: str) -> str:
    """``reason`` as a close frame can carry it: UTF-8 of at most WS_MAX_CLOSE_REASON bytes.

    A longer reason is cut on a character boundary and ends with "..."; a lone surrogate (an undecodable
    file name in a path) is shown as ``\\udcxx``. websockets raises ProtocolError for anything longer.
    """
    encoded = reason.encode("utf-8", "backslashreplace")
    if len(encoded) <= WS_MAX_CLOSE_REASON:
        return encoded.decode("utf-8")
    return encoded[: WS_MAX_CLOSE_REASON - len(b"...")].decode("utf-8", "ignore") + "..."


def _subprotocol_token(request: Request) -> Optional[str]:
    """The token a browser offered as ``bearer.<base64url>`` in Sec-WebSocket-Protocol, if any."""
    for name, value in request.headers:
        if name != "sec-websocket-protocol":
            continue
        for offered in value.split(","):
            offered = offered.strip(" \t")
            if offered[: len(WS_BEARER_PREFIX)].lower() == WS_BEARER_PREFIX:
                encoded = offered[len(WS_BEARER_PREFIX):]  # base64url is case-sensitive: kept as sent
                try:
                    return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode("utf-8")
                except (ValueError, UnicodeDecodeError):
                    return None
    return None


def _select_subprotocol(protocol: Any, offered: Sequence[str]) -> Optional[str]:
    # Select ua.v1 when offered; never echo a bearer token back (SPEC §4).
    return WS_SUBPROTOCOL if WS_SUBPROTOCOL in offered else None


class WebSocketBridge:
    """One WebSocket connection: bytes <-> ``ServerProtocol`` <-> whole messages for ``app``.

    ``app`` gets ``on_open(bridge)``, ``on_message(bridge, text_or_bytes)`` and ``on_close(bridge)``.
    Everything runs on the event loop. Sending never blocks: when the peer falls WS_MAX_SEND_BUFFER
    bytes behind, the connection is closed with 1008 ("slow consumer") rather than buffering without bound.
    "Behind" counts what the transport holds and what is queued for it in this loop iteration, so the
    peer never holds more than WS_MAX_SEND_BUFFER plus the one message that crossed it.
    """

    def __init__(self, connection: HttpConnection, protocol: Any, app: Any) -> None:
        self.connection = connection
        self.transport = connection.transport
        self.protocol = protocol
        self.app = app
        self.loop = connection.loop
        self.open = False
        self.closed = False
        self.request: Optional[Request] = None
        # One buffer, not a list of pieces: a flood of tiny or empty continuation frames then costs
        # no more memory than the message it builds, which max_size bounds.
        self.fragments = bytearray()
        self.fragment_opcode: Any = None
        self.utf8: Any = None
        self.ping_payload: Optional[bytes] = None
        self.ping_timer: Optional[asyncio.TimerHandle] = None
        self.close_timer: Optional[asyncio.TimerHandle] = None
        self.flush_scheduled = False
        self.unflushed = 0  # bytes of messages sent since the last flush, still in the protocol's queue
        # Where the incoming stream's frames end (see _frame_end): the protocol is fed one frame at a time.
        self.frame_head = bytearray()
        self.frame_left = 0
        self.frame_opcode = -1

    # -- bytes in ------------------------------------------------------------------------------------------

    def start(self, request: Request, head: bytes, rest: bytes) -> None:
        """Run the opening handshake on the raw request head, then any frames that followed it."""
        self.request = request
        # The head alone: frames fed with it would be parsed before the handshake is answered, and
        # a bad one would queue the protocol's EOF ahead of the response.
        self.protocol.receive_data(head)
        events = self.protocol.events_received()
        ws_request = events[0] if events and isinstance(events[0], WsRequest) else None
        response = None
        if ws_request is None:
            # websockets' parser is stricter than ours (HTTP/1.1 only, no body, lines up to 8 KiB)
            # and has already queued its EOF, so it cannot send a response: answer as plain HTTP.
            exc = self.protocol.handshake_exc
            reason = str(exc.__cause__ if exc is not None and exc.__cause__ is not None else exc)
        else:
            try:
                response = self.protocol.accept(ws_request)
            except UnicodeError:  # its refusal quotes the offending header, which it cannot encode
                reason = "a WebSocket header holds bytes that are not ASCII"
            else:
                if response.status_code == 500:
                    # websockets answers 500 when a header breaks it in a way it did not foresee (a
                    # non-ASCII Sec-WebSocket-Key): that is the client's input, so a 400 (SPEC §3).
                    reason, response = str(self.protocol.handshake_exc), None
        if response is None:
            self.closed = True
            self.connection.bridge = None
            refusal = error_response(HttpError(400, f"malformed WebSocket handshake: {_show(reason, 160)}"))
            refusal.close = True
            self.connection._send(refusal, request)
            return
        if response.status_code != 101:
            # SPEC §3: every error is JSON {"detail"}; websockets words its refusals in plain text.
            body = json.dumps({"detail": response.body.decode("utf-8", "replace").strip()}).encode()
            for name in ("Content-Type", "Content-Length"):
                del response.headers[name]
            response.headers["Content-Type"] = "application/json"
            response.headers["Content-Length"] = str(len(body))
            response.headers["Server"] = SERVER_NAME
            response.body = body
        self.protocol.send_response(response)
        self.flush()
        if response.status_code != 101:
            self.closed = True
            self._arm_close_timer()
            return
        self.open = True
        self._schedule_ping()
        self.app.on_open(self)
        if rest:
            self.data_received(rest)

    def data_received(self, data: bytes) -> None:
        # One frame at a time, each handled before the next is parsed: when a bad frame follows good
        # ones in the same read, the replies to the good ones go out before the close (Autobahn 3.2, 5.15).
        # A memoryview, so that a read of many tiny frames costs no copy of its rest per frame.
        view = memoryview(data)
        while view:
            if self.closed and not self.protocol.close_expected():
                break
            cut = self._frame_end(view)
            piece, view = view[:cut], view[cut:]
            if self.frame_opcode == Opcode.CLOSE.value and getattr(self.protocol, "cur_size", None) is not None:
                # RFC 6455 §5.4: a Close may come between the fragments of a message; the partial message
                # is dropped and the Close answered as usual. websockets would fail with 1002 (Autobahn 7.1.5).
                self.protocol.cur_size = None
            try:
                self.protocol.receive_data(piece)
            except EOFError:
                break
            self._handle_events(self.protocol.events_received())
        self.flush()  # once per read: one write for all the replies it caused

    def _frame_end(self, data: memoryview) -> int:
        """How much of ``data`` runs to the end of the first frame that ends in it (all of it if none does)."""
        pos = 0
        while True:
            if self.frame_left:
                if self.frame_left > len(data) - pos:
                    self.frame_left -= len(data) - pos
                    return len(data)
                pos += self.frame_left
                self.frame_left = 0
                return pos
            head = bytes(self.frame_head) + data[pos:pos + 14]
            if len(head) >= 2:
                length = head[1] & 0x7F
                extra = 2 if length == 126 else 8 if length == 127 else 0
                size = 2 + extra + (4 if head[1] & 0x80 else 0)
                if len(head) >= size:
                    if extra:
                        length = int.from_bytes(head[2:2 + extra], "big")
                    pos += size - len(self.frame_head)
                    self.frame_head = bytearray()
                    self.frame_opcode = head[0] & 0x0F
                    self.frame_left = length
                    if not length:
                        return pos
                    continue
            self.frame_head += data[pos:]
            return len(data)

    def eof_received(self) -> Optional[bool]:
        self.protocol.receive_eof()
        self.flush()
        self._handle_events(self.protocol.events_received())
        return None

    def connection_lost(self, exc: Optional[Exception]) -> None:
        for timer in (self.ping_timer, self.close_timer):
            if timer is not None:
                timer.cancel()
        if self.open:
            self.open = False
            self.app.on_close(self)
        self.closed = True

    def _handle_events(self, events: Sequence[Any]) -> None:
        for frame in events:
            opcode = frame.opcode
            if opcode is Opcode.PONG:
                if self.ping_payload is not None and frame.data == self.ping_payload:
                    self.ping_payload = None
                continue
            if opcode is Opcode.CLOSE:
                self._closing()
                continue
            if opcode is Opcode.PING or not self.open:
                continue
            if opcode in (Opcode.TEXT, Opcode.BINARY):
                self.fragment_opcode = opcode
                self.fragments = bytearray()
                self.utf8 = codecs.getincrementaldecoder("utf-8")() if opcode is Opcode.TEXT else None
            if self.utf8 is not None:
                try:
                    self.utf8.decode(frame.data, final=frame.fin)
                except UnicodeDecodeError as exc:
                    # Fail fast on invalid text, fragment by fragment (RFC 6455 §8.1).
                    self.fail(1007, f"invalid UTF-8 in text message: {exc.reason}")
                    return
            if not frame.fin:
                self.fragments += frame.data
            else:
                payload = bytes(self.fragments + frame.data) if self.fragments else bytes(frame.data)
                self.fragments = bytearray()
                message: Union[str, bytes] = payload.decode() if self.fragment_opcode is Opcode.TEXT else payload
                self.app.on_message(self, message)
                if self.closed:
                    return
        if self.protocol.close_expected():
            self._closing()

    # -- bytes out -----------------------------------------------------------------------------------------

    def flush(self) -> None:
        self.flush_scheduled = False
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        outgoing = self.protocol.data_to_send()
        self.unflushed = 0
        # Frames the protocol made itself (pongs) are judged here, messages in send_text/send_binary.
        # `sendable`, not `open`: fail() flushes its own close frame through here, which must not fail
        # again (that recursed without end).
        if outgoing and self._too_far_behind() and self.sendable:
            self._cut_off_slow_consumer()
            return
        pending: List[bytes] = []
        for data in outgoing:
            if data:
                pending.append(data)
                continue
            if pending:
                transport.write(b"".join(pending))
                pending = []
            if transport.can_write_eof():
                transport.write_eof()
        if pending:
            # One write (one syscall) for all the frames queued in this loop iteration.
            transport.write(b"".join(pending))

    @property
    def sendable(self) -> bool:
        # The protocol may already be closing while we still handle the messages that came in the same
        # read as the peer's close frame; websockets refuses to send then.
        return self.open and not self.closed and self.protocol.state is WsState.OPEN

    def send_text(self, text: str) -> None:
        if self.sendable:
            self._queue(text.encode(), self.protocol.send_text)

    def send_binary(self, data: bytes) -> None:
        if self.sendable:
            self._queue(data, self.protocol.send_binary)

    def _queue(self, data: bytes, send: Callable[[bytes], None]) -> None:
        if self._too_far_behind():
            self._cut_off_slow_consumer()
            return
        send(data)
        self.unflushed += len(data)
        self._flush_soon()

    def _too_far_behind(self) -> bool:
        # Judged before adding more: one message bigger than the bound (the echo route takes 16 MiB) is
        # no slow consumer; a peer still that far behind when more is to be sent is.
        transport = self.transport
        return transport is not None and transport.get_write_buffer_size() + self.unflushed > WS_MAX_SEND_BUFFER

    def _cut_off_slow_consumer(self) -> None:
        # Clawdbot's rule too: a peer that does not read is cut off, not buffered for; what was still to
        # be sent is dropped and the close frame queued behind the backlog instead.
        self.protocol.data_to_send()
        self.unflushed = 0
        self.fail(1008, f"slow consumer: the client fell {WS_MAX_SEND_BUFFER >> 20} MiB behind in reading its messages")

    def _flush_soon(self) -> None:
        # The events of a turn are often emitted in one loop iteration; sending them together saves
        # a syscall (and a GIL hand-off to the writer thread) per frame.
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def close(self, code: int = 1000, reason: str = "") -> None:
        if self.sendable:
            self.protocol.send_close(code, close_reason(reason))
            self.flush()
            self._closing()

    def fail(self, code: int, reason: str = "") -> None:
        if not self.closed:
            self.protocol.fail(code, close_reason(reason))
            self.flush()
            self._closing()

    def shutdown(self) -> None:
        self.close(1001, "server shutting down")

    def _closing(self) -> None:
        if self.open:
            self.open = False
            self.app.on_close(self)
        self.closed = True
        if self.ping_timer is not None:
            self.ping_timer.cancel()
        self._arm_close_timer()

    def _arm_close_timer(self) -> None:
        if self.close_timer is None:
            self.close_timer = self.loop.call_later(WS_CLOSE_TIMEOUT, self._abort)

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- keepalive -----------------------------------------------------------------------------------------

    def _schedule_ping(self) -> None:
        self.ping_timer = self.loop.call_later(WS_PING_INTERVAL, self._ping)

    def _ping(self) -> None:
        if not self.open:
            return
        if self.ping_payload is not None:
            self.fail(1011, "keepalive ping timeout")
            return
        self.ping_payload = os.urandom(4)
        self.protocol.send_ping(self.ping_payload)
        self.flush()
        self.ping_timer = self.loop.call_later(WS_PING_TIMEOUT, self._ping)


class EchoApp:
    """WS /ws/echo (only with --ws-echo): every message back unchanged, for conformance suites."""

    def on_open(self, bridge: WebSocketBridge) -> None:
        pass

    def on_message(self, bridge: WebSocketBridge, message: Union[str, bytes]) -> None:
        if isinstance(message, str):
            bridge.send_text(message)
        else:
            bridge.send_binary(message)

    def on_close(self, bridge: WebSocketBridge) -> None:
        pass


# ---------------------------------------------------------------------------------------------------------
# Sessions and agents (SPEC §6): who is connected, which turn runs, and what gets written where.
# ---------------------------------------------------------------------------------------------------------

AGENT_EVENT_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
RESERVED_EVENT_TYPES = frozenset(("connected", "query_complete", "cancelled", "pong"))  # the gateway's own
MAX_CLIENT_TURN_ID = 128
REMEMBERED_TURN_IDS = 256  # completed client_turn_ids kept per session to answer duplicates
MAX_JOURNAL_LINE = 64 * 1024  # a longer event is cut in the journal (the client still gets all of it)
MAX_PENDING_MESSAGES = 32  # messages a client may send before its attach has finished
MAX_PENDING_BYTES = 4 * 1024 * 1024  # ... and their memory: one 1 MiB message at 4 bytes a character (a str
# holding one emoji takes that for each of its characters); an attach takes milliseconds
MAX_PENDING_INPUTS = 32  # input_responses the agent has not taken yet; a client may not pile up more
MAX_PENDING_INPUT_BYTES = 1024 * 1024  # ... and their memory, held as JSON text: one full-size answer; more
# waits until the agent has read it (a parsed [{}, {}, ...] would take 20 times its text)
AGENT_KILL_GRACE = 5.0  # SPEC §6: cancel sends SIGTERM, then SIGKILL after 5 s
MAX_AGENT_LINE = 1024 * 1024  # a longer stdout/stderr line from an agent command is cut
SESSION_WRITE_DELAY = 0.01  # s: journal lines are on disk this soon after their event; batching them
# amortizes the writer thread, whose work would otherwise compete with the loop for the GIL per turn
AGENT_DRAIN_TIMEOUT = 0.2  # s: once an agent has exited, what it left in its pipes (a pipe buffer, 64 KiB by
# default) is read in microseconds; pipes silent this long are held by a child it left behind, not waited for
AGENT_GROUP_POLL = 0.05  # s between checks whether a terminated process group is gone
AGENT_EXIT_WAIT = 5.0  # s a cancelled turn waits for its agent's exit after the SIGKILL (a process in D state)
REMEMBERED_TURN_AGE = 3600.0  # s a finished client_turn_id is remembered: a client retries within minutes
REMEMBERED_SESSIONS = 256  # sessions whose finished client_turn_ids are kept, connected or not, least
# recently used dropped first: x REMEMBERED_TURN_IDS ids of at most 128 characters, 23 MiB at worst
# The client_turn_ids that are handed to an agent command (UA_CLIENT_TURN_ID): nothing a shell would split,
# expand or glob. Others still de-duplicate turns; they just do not reach the agent's environment.
SAFE_CLIENT_TURN_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,%d}" % MAX_CLIENT_TURN_ID)


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def frame_json(event_type: str, data: Any) -> str:
    return json.dumps({"type": event_type, "data": data, "timestamp": utc_now_iso()}, separators=(",", ":"))


journal_stamp = _PerSecond(lambda second: datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%d %H:%M:%S"))

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
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
    line = f"[{stamp}] [{event_type.upper()}] {one_line(text)}".encode("utf-8", "replace")
    if len(line) > MAX_JOURNAL_LINE:
        line = line[:MAX_JOURNAL_LINE] + cut_marker(len(line) - MAX_JOURNAL_LINE)
    return line + b"\n"


class SessionWriter:
    """Writes journals, run logs and heartbeats on one thread, in the order they were asked for.

    All writes go through ``OpsService.append_log``/``write_heartbeat``, which take the session's lock
    and open the file per call: a reset or compact between two writes sends the next one to the new
    live file, and nothing is written into an archive. ``append`` and ``heartbeat`` are called on the
    event loop; what they collect within SESSION_WRITE_DELAY reaches the thread as one batch, so a
    burst of events and turns costs one hand-off, one write per file and one heartbeat per session.

    The thread never waits for a session's lock: a session that is busy (a long compaction or reset
    holds its lock) keeps its items, in order, for the next pass, retried every BUSY_RETRY seconds,
    so one slow session cannot stall the journals and heartbeats of all others.
    """

    # s: how soon the items of a busy session are tried again; short, so that its lines reach disk
    # right after the lock is free, yet a try is one non-blocking acquire, so retrying costs nothing.
    BUSY_RETRY = 0.02

    def __init__(self, ops: OpsService, log: Optional[GatewayLog]) -> None:
        self.ops = ops
        self.log = log
        self.dropped = 0
        # Bytes handed to append() (counted on the event loop) and done with by the thread (written or
        # dropped): each counter has one writer, so their difference is the backlog without a lock.
        self.queued_bytes = 0
        self.done_bytes = 0
        self._pending: List[Tuple[str, str, Optional[str], Any]] = []
        self._queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="ua-session-writer", daemon=True)
        self._thread.start()

    def append(self, session_id: str, file_name: str, data: bytes) -> None:
        self.queued_bytes += len(data)
        self._add(("append", session_id, file_name, data))

    @property
    def backlog_bytes(self) -> int:
        return self.queued_bytes - self.done_bytes

    async def wait_for_room(self) -> None:
        """Return once the backlog is under MAX_WRITER_BACKLOG (event loop only)."""
        while self.backlog_bytes > MAX_WRITER_BACKLOG:
            await asyncio.sleep(WRITER_BACKLOG_POLL)

    def heartbeat(self, session_id: str, state: Dict[str, Any]) -> None:
        self._add(("heartbeat", session_id, None, state))

    def _add(self, item: Tuple[str, str, Optional[str], Any]) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_later(SESSION_WRITE_DELAY, self.hand_over)
        self._pending.append(item)

    def hand_over(self) -> None:
        """Pass what this loop iteration collected to the writer thread (event loop only)."""
        if self._pending:
            batch, self._pending = self._pending, []
            self._queue.put(batch)

    def close(self, timeout: float = 5.0) -> None:
        """Write everything handed over so far, then stop the thread (any thread)."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        # Items of sessions that were busy at the last pass, oldest first: they go before anything
        # newer of the same session, so no file's lines are reordered.
        deferred: List[Tuple[str, str, Optional[str], Any]] = []
        while True:
            try:
                batch = self._queue.get(timeout=self.BUSY_RETRY) if deferred else self._queue.get()
            except queue.Empty:
                batch = []
            stop = batch is None
            batch = deferred + (batch or [])
            # Take the whole backlog at once: when writing falls behind (200 busy sessions, a slow
            # disk), it folds into one write per file and one heartbeat per session.
            while not stop:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                else:
                    batch.extend(more)
            # At close, wait for busy sessions: what was handed over is written, not left behind.
            deferred = self._write(batch, wait=stop) if batch else []
            if stop:
                return

    def _write(self, batch: List[Tuple[str, str, Optional[str], Any]], wait: bool = False
               ) -> List[Tuple[str, str, Optional[str], Any]]:
        """Write the batch; returns the items of the sessions whose lock was busy (unless ``wait``)."""
        # One write per file and one heartbeat per session for the whole batch: order matters only
        # within a file, and a heartbeat is a state of which the latest is the one to keep.
        appends: Dict[Tuple[str, str], List[bytes]] = {}
        heartbeats: Dict[str, Any] = {}
        for kind, session_id, file_name, payload in batch:
            if kind == "append":
                appends.setdefault((session_id, file_name or ""), []).append(payload)
            else:
                heartbeats[session_id] = payload
        actions: Dict[str, List[Tuple[Optional[str], Callable[[], Any]]]] = {}
        for (session_id, file_name), chunks in appends.items():
            actions.setdefault(session_id, []).append(
                (file_name, functools.partial(self.ops.append_log, session_id, file_name, b"".join(chunks))))
        for session_id, state in heartbeats.items():
            actions.setdefault(session_id, []).append(
                (None, functools.partial(self.ops.write_heartbeat, session_id, state)))
        busy = set()
        for session_id, session_actions in actions.items():
            # The same re-entrant lock append_log and write_heartbeat take: holding it across the
            # session's writes makes their own acquire immediate.
            lock = self.ops.session_lock(session_id)
            if not lock.acquire(blocking=wait):
                busy.add(session_id)
                continue
            try:
                for file_name, action in session_actions:
                    self._run_action(session_id, file_name, action)
            finally:
                lock.release()
        self.done_bytes += sum(len(item[3]) for item in batch if item[0] == "append" and item[1] not in busy)
        return [item for item in batch if item[1] in busy]

    def _run_action(self, session_id: str, file_name: Optional[str], action: Callable[[], Any]) -> None:
        try:
            action()
        except SessionNotFound:
            pass  # deleted while its turn was ending: nothing to keep
        except (OpsError, OSError) as exc:
            self.dropped += 1
            if self.log is not None:
                self.log.write("write_failed", session_id=session_id, file=file_name or "heartbeat_state.json",
                               detail=str(exc)[:300])


class TurnState(enum.Enum):
    """Where a turn is in its life. ``AgentTurn.advance`` is the only place that changes it."""

    STARTING = "starting"  # accepted and its task scheduled; the agent has not been called
    RUNNING = "running"  # the agent runs; its events reach the session's connections
    CANCELLING = "cancelling"  # "cancelled" went out; the agent is being stopped, its events are dropped
    ENDED = "ended"  # query_complete went out; nothing of the turn follows


class TurnEvent(enum.Enum):
    RUN = "run"  # the turn's task is about to call the agent
    CANCEL = "cancel"  # a client, a forced delete or the shutdown cancels the turn
    END = "end"  # the agent returned or raised, the task ended without calling it, or the shutdown gave up


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
        self.turn_id = next(_turn_ids)  # the gateway's own, never the client's: agents use it in commands
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
            self.log(f"[gateway] agent sent an event of invalid type {_show(event_type)}; ignored")
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
_turn_ids = (f"{_TURN_ID_PREFIX}{n:06x}" for n in itertools.count(1))


class AgentFailed(Exception):
    """An agent's turn failed in a way the client should hear about as an ``error`` event."""


async def echo_agent(turn: AgentTurn) -> None:
    """The built-in agent: a status, the input back as text; the gateway adds query_complete."""
    turn.emit("status", {"status": "processing"})
    turn.log(f"echo: {turn.user_input}")
    turn.emit("text", {"text": turn.user_input})


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
        raise ConfigError(f"agent command program {_show(word)} not found (looked for {program}); agent commands "
                          "run in the session's directory, so give a path that exists from where the gateway starts")
    return shlex.quote(program) + stripped[len(word):]


def command_agent(command: str) -> Callable[[AgentTurn], Awaitable[None]]:
    """An agent that runs ``command`` per turn (SPEC §6): the request as one JSON line on stdin,
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
    turn.inputs.put_nowait(None)  # type: ignore[arg-type]  # the forwarder's cue to stop
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


async def _terminate_group(group: int, grace: float = AGENT_KILL_GRACE) -> None:
    """SIGTERM a process group, then SIGKILL what is left of it after ``grace`` seconds.

    The group, not the process: the command runs under /bin/sh, which may die of the SIGTERM while the
    agent it started ignores it, and the children an agent starts in the background are in it too.
    """
    if not _signal_group(group, signal.SIGTERM):
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while _signal_group(group, 0):
        if loop.time() >= deadline:
            _signal_group(group, signal.SIGKILL)
            return
        await asyncio.sleep(AGENT_GROUP_POLL)


def _signal_group(group: int, signum: int) -> bool:
    """Send ``signum`` to a process group; False when no process of it is left (0 just checks)."""
    try:
        os.killpg(group, signum)
        return True
    except (ProcessLookupError, PermissionError):
        return False


class LiveSession:
    """A session with connections or a running turn. Lives in ``SessionHub.sessions`` only meanwhile."""

    def __init__(self, session_id: str, workspace_dir: Path) -> None:
        self.session_id = session_id
        self.workspace_dir = workspace_dir
        self.sockets: "set[AgentSocket]" = set()
        self.turn: Optional[AgentTurn] = None


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

    def __init__(self, gateway: Gateway, agent: Callable[[AgentTurn], Awaitable[None]]) -> None:
        self.gateway = gateway
        self.agent = agent
        self.sessions: Dict[str, LiveSession] = {}
        self.agent_groups: "set[int]" = set()  # process groups of running agent commands
        self.group_reapers: Dict[int, asyncio.Task] = {}  # groups being terminated, in the background
        self.finished = FinishedTurns()
        self.writer = SessionWriter(gateway.ops, gateway.log)

    def snapshot(self) -> Dict[str, Tuple[int, bool]]:
        return {sid: (len(live.sockets), live.turn is not None) for sid, live in self.sessions.items()}

    def running(self, session_id: str) -> bool:
        live = self.sessions.get(session_id)
        return live is not None and live.turn is not None

    def attach(self, session_id: str, workspace_dir: Path, sock: "AgentSocket") -> LiveSession:
        live = self.sessions.get(session_id)
        if live is None:
            live = self.sessions[session_id] = LiveSession(session_id, workspace_dir)
        live.sockets.add(sock)
        return live

    def detach(self, sock: "AgentSocket") -> None:
        live = self.sessions.get(sock.session_id or "")
        if live is None:
            return
        live.sockets.discard(sock)
        self._forget_if_idle(live)

    def _forget_if_idle(self, live: LiveSession) -> None:
        if not live.sockets and live.turn is None:
            self.sessions.pop(live.session_id, None)

    def broadcast(self, session_id: str, event_type: str, data: Dict[str, Any]) -> None:
        """Send an event of a turn to every connection of the session and append it to the journal."""
        frame = frame_json(event_type, data)
        live = self.sessions.get(session_id)
        if live is not None:
            for sock in list(live.sockets):
                sock.bridge.send_text(frame)
        self.writer.append(session_id, "activity_journal.log", journal_line(event_type, data))

    def start_turn(self, live: LiveSession, sock: "AgentSocket", user_input: str, metadata: Dict[str, Any],
                   client_turn_id: Optional[str]) -> None:
        if live.turn is not None:
            if client_turn_id is not None and client_turn_id == live.turn.client_turn_id:
                sock.send("status", {"status": "turn_in_progress", "turn_id": live.turn.turn_id})
                return
            # The refused attempt gets an id of its own, so that a client matching answers by turn_id
            # can tell this query_complete from the running turn's.
            refused = {"turn_id": next(_turn_ids), **({"client_turn_id": client_turn_id} if client_turn_id else {})}
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
        turn.task = asyncio.get_running_loop().create_task(self._run_turn(live, turn))
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
        self.broadcast(live.session_id, "query_complete", done)
        ended = time.time()
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
        AGENT_KILL_GRACE s. Once per group: a second call gets the same task. The shutdown SIGKILLs
        whatever is left of it."""
        reaper = self.group_reapers.get(group)
        if reaper is None:
            self.agent_groups.add(group)
            reaper = self.group_reapers[group] = asyncio.get_running_loop().create_task(_terminate_group(group))
            reaper.add_done_callback(lambda _task: self._group_stopped(group))
        return reaper

    def _group_stopped(self, group: int) -> None:
        self.group_reapers.pop(group, None)
        self.agent_groups.discard(group)

    def cancel(self, session_id: str, reason: str) -> Optional[asyncio.Task]:
        """Cancel the running turn: ``cancelled`` goes out now; the task ends once the agent has stopped."""
        live = self.sessions.get(session_id)
        if live is None or live.turn is None or live.turn.task is None:
            return None
        turn = live.turn
        before = turn.advance(TurnEvent.CANCEL)
        if before is not None:
            self.broadcast(session_id, "cancelled", {"reason": reason, "turn_id": turn.turn_id})
            if before is TurnState.RUNNING:
                turn.task.cancel()  # a STARTING turn's task sees CANCELLING and never calls the agent
        return turn.task

    async def cancel_and_wait(self, session_id: str, reason: str) -> None:
        task = self.cancel(session_id, reason)
        if task is not None:
            await asyncio.wait([task])

    def close_session(self, session_id: str, code: int, reason: str) -> None:
        live = self.sessions.get(session_id)
        if live is not None:
            for sock in list(live.sockets):
                sock.bridge.close(code, reason)
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
            _signal_group(group, signal.SIGKILL)
        for reaper in list(self.group_reapers.values()):
            reaper.cancel()
        self.writer.hand_over()
        await asyncio.get_running_loop().run_in_executor(None, self.writer.close)


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
        self.put_nowait(text)  # type: ignore[arg-type]
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


class AgentSocket:
    """The agent protocol on one WebSocket (SPEC §6): attach, turns, input, cancel, ping."""

    def __init__(self, gateway: Gateway, session_id: Optional[str], user_id: Optional[str]) -> None:
        self.gateway = gateway
        self.hub = gateway.hub
        self.session_id = session_id
        self.lobby = session_id is None
        self.live: Optional[LiveSession] = None
        self.pending: Optional[List[Union[str, bytes]]] = []  # messages held until attached; None once live
        self.pending_bytes = 0  # their memory (sys.getsizeof): MAX_PENDING_BYTES at most
        self.user_id = user_id
        self.bridge: Any = None

    def send(self, event_type: str, data: Dict[str, Any]) -> None:
        self.bridge.send_text(frame_json(event_type, data))

    # -- WebSocketBridge app interface ---------------------------------------------------------------------

    def on_open(self, bridge: WebSocketBridge) -> None:
        self.bridge = bridge
        if not self.gateway.access.user_allowed(self.user_id):
            bridge.close(4003, "user not allowed (X-UA-User or user_id is missing or not in UA_ALLOWED_USERS)")
            return
        if self.lobby:
            self.pending = None
            return
        if not ops_service.is_valid_session_id(self.session_id or ""):
            bridge.close(4000, "invalid session id")
            return
        asyncio.get_running_loop().create_task(self._attach(self.session_id or "", None))

    def on_message(self, bridge: WebSocketBridge, message: Union[str, bytes]) -> None:
        if self.pending is not None:
            self.pending_bytes += sys.getsizeof(message)
            if len(self.pending) >= MAX_PENDING_MESSAGES:
                bridge.close(1008, "too many messages before the session was attached; wait for 'connected'")
            elif self.pending_bytes > MAX_PENDING_BYTES:
                bridge.close(1008, f"over {MAX_PENDING_BYTES >> 20} MiB sent before the session was attached; "
                                   "wait for 'connected'")
            else:
                self.pending.append(message)
            return
        self._handle(message)

    def on_close(self, bridge: WebSocketBridge) -> None:
        self.hub.detach(self)

    # -- protocol ------------------------------------------------------------------------------------------

    async def _attach(self, session_id: str, first: Optional[Union[str, bytes]]) -> None:
        ops = self.gateway.ops
        try:
            workspace = await self.gateway.run_ops(ops.session_dir, session_id)
        except SessionNotFound:
            self.bridge.close(4004, "session not found")
            return
        except InvalidArgument:
            self.bridge.close(4000, "invalid session id")
            return
        except OpsError as exc:
            self.bridge.close(1011, exc.detail)
            return
        if not self.bridge.open:
            return
        self.session_id = session_id
        self.live = self.hub.attach(session_id, Path(workspace), self)
        self.send("connected", {"session_id": session_id, "workspace_dir": str(workspace)})
        if self.live.turn is not None:
            self.send("status", {"status": "processing", "active_turn_id": self.live.turn.turn_id})
            if self.live.turn.awaiting_input is not None:
                self.send("input_required", self.live.turn.awaiting_input)
        held, self.pending, self.pending_bytes = self.pending or [], None, 0
        for message in ([first] if first is not None else []) + held:
            self._handle(message)

    async def _create_and_attach(self, first: Union[str, bytes]) -> None:
        try:
            self.gateway.admit_session_creation(self.bridge.request.client)
        except HttpError as refusal:
            # Still a lobby: the client may retry this execute once the wait is over.
            self.session_id = None
            retry_after = dict(refusal.headers).get("Retry-After")
            self.send("error", {"message": refusal.detail, "retry_after": int(retry_after or 1)})
            held, self.pending, self.pending_bytes = self.pending or [], None, 0
            for message in held:
                self._handle(message)
            return
        try:
            created = await self.gateway.run_ops(self.gateway.ops.create_session)
        except OpsError as exc:
            self.send("error", {"message": f"could not create a session: {exc.detail}"})
            self.pending = None
            return
        await self._attach(created["session_id"], first)

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
            if self.live is None or self.hub.cancel(self.live.session_id, reason if isinstance(reason, str) else "cancelled by client") is None:
                self.send("error", {"message": "no turn is running to cancel"})
        else:
            self.send("error", {"message": f"unknown message type {_show(kind)}; "
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


# ---------------------------------------------------------------------------------------------------------
# Running the server: accepting within the open-file limit, signals, the startup line, exit codes.
# ---------------------------------------------------------------------------------------------------------


def _raise_fd_limit() -> None:
    """Raise the soft open-file limit to the hard one; ``descriptor_budget`` then sizes connections from it."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


PR_SET_DUMPABLE = 4  # <linux/prctl.h>


def _forbid_inspection() -> bool:
    """Mark this process non-dumpable where Linux's prctl is available; returns whether it took effect.

    Processes of the same user, the agent commands included, can then neither read the gateway's
    /proc/<pid>/environ (where UA_OPS_TOKEN may be) or /proc/<pid>/mem nor ptrace it, and a crash leaves
    no core dump holding the token. Agent commands are unaffected: exec makes a process dumpable again.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    except (ImportError, OSError, AttributeError):  # no ctypes, no libc, no prctl: nothing to do
        return False


def descriptor_budget() -> Optional[int]:
    """How many connections the soft RLIMIT_NOFILE leaves room for once FD_RESERVE is kept, or None
    where the limit is unknown or unlimited."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, ValueError, OSError):
        return None
    if soft == resource.RLIM_INFINITY:
        return None
    return max(soft - FD_RESERVE, 1)


def refusal_bytes(detail: str) -> bytes:
    """A complete 503 answer, for a connection the gateway will not serve."""
    error = HttpError(503, detail, headers=[("Retry-After", "1")])
    return serialize_response(error_response(error), keep_alive=False)


def _discard_input(conn: socket.socket) -> None:
    try:
        while conn.recv(65536):
            pass
    except OSError:  # nothing more for now (BlockingIOError), or the peer is gone
        pass


class Listener:
    """The listening sockets and the accept loop of a gateway. Event loop only.

    asyncio's own accept loop, when accept() fails for want of descriptors, reports a traceback and
    schedules a retry for every remaining connection of a backlog-sized batch (CPython 3.9 to 3.13): at
    the limit that is a busy CPU and megabytes of stderr a second. Here each accepted socket is checked
    against ``Gateway.connection_limit`` first: past it, the peer gets a short 503 at once and the socket
    is closed, from the descriptors FD_RESERVE keeps free. If accept() fails all the same (descriptors
    taken by something else), accepting pauses for ACCEPT_RETRY_DELAY. Either way one ``connection_limit``
    record a REPORT_INTERVAL at most says how many were refused, and nothing is written to stderr.
    """

    def __init__(self, gateway: Gateway, sockets: List[socket.socket]) -> None:
        self.gateway = gateway
        self.sockets = sockets
        self.loop = asyncio.get_running_loop()
        self.pending = 0  # accepted sockets whose HttpConnection is not made yet: they count against the limit
        self.refused = 0  # since the last report
        self.lingering = 0  # refused sockets waiting to be closed
        self.accept_failures = 0  # since the last report
        self.detail = ""
        self.paused = False
        self.closed = False
        self._report: Optional[asyncio.TimerHandle] = None
        self._reported = -REPORT_INTERVAL

    @classmethod
    async def open(cls, gateway: Gateway, host: str, port: int, backlog: int) -> "Listener":
        """Bind every address ``host`` resolves to (as ``loop.create_server`` does) and start accepting.
        Raises OSError when an address cannot be bound."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        sockets: List[socket.socket] = []
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # IPv4 has its own socket
                sock.bind(address)
                sock.listen(backlog)
                sock.setblocking(False)
        except OSError:
            for sock in sockets:
                sock.close()
            raise
        listener = cls(gateway, sockets)
        listener._start_accepting()
        return listener

    def close(self) -> None:
        """Stop accepting and close the listening sockets; report refusals not yet reported."""
        if self.closed:
            return
        self.closed = True
        for sock in self.sockets:
            self.loop.remove_reader(sock.fileno())
            sock.close()
        if self._report is not None:
            self._report.cancel()
            self._write_report()

    def _start_accepting(self) -> None:
        self.paused = False
        if not self.closed:
            for sock in self.sockets:
                self.loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS, ENOMEM: retrying now would only spin
                self.accept_failures += 1
                self._pause(f"accept() failed: {exc.strerror or exc}")
                return
            if len(self.gateway.connections) + self.pending >= self.gateway.connection_limit():
                self._refuse(conn)
                continue
            self.pending += 1
            self.loop.create_task(self._connect(conn))

    async def _connect(self, conn: socket.socket) -> None:
        try:
            conn.setblocking(False)
            await self.loop.connect_accepted_socket(lambda: HttpConnection(self.gateway), conn)
        except OSError:  # the peer is gone already
            conn.close()
        finally:
            self.pending -= 1

    def _refuse(self, conn: socket.socket) -> None:
        limit = self.gateway.connection_limit()
        try:
            conn.setblocking(False)
            conn.send(refusal_bytes(f"the gateway is at its connection limit ({max(limit, 0)}); retry shortly"))
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        # Closing with the client's request unread would make the kernel answer with a reset, which can
        # destroy the 503 before it is read: discard what came, and let a few linger a moment first.
        _discard_input(conn)
        if self.lingering < MAX_REFUSALS_LINGERING:
            self.lingering += 1
            self.loop.call_later(REFUSAL_LINGER, self._close_refused, conn)
        else:
            conn.close()
        self.refused += 1
        self._note(f"at the connection limit ({max(limit, 0)} for an open-file limit leaving {self.gateway.fd_budget})")

    def _close_refused(self, conn: socket.socket) -> None:
        self.lingering -= 1
        _discard_input(conn)
        conn.close()

    def _pause(self, detail: str) -> None:
        if not self.paused:
            self.paused = True
            for sock in self.sockets:
                self.loop.remove_reader(sock.fileno())
            self.loop.call_later(ACCEPT_RETRY_DELAY, self._start_accepting)
        self._note(detail)

    def _note(self, detail: str) -> None:
        self.detail = detail
        if self._report is None:
            delay = max(0.0, self._reported + REPORT_INTERVAL - self.loop.time())
            self._report = self.loop.call_later(delay, self._write_report)

    def _write_report(self) -> None:
        self._report = None
        self._reported = self.loop.time()
        if self.gateway.log is not None:
            self.gateway.log.write("connection_limit", refused=self.refused, accept_failures=self.accept_failures,
                                   connections=len(self.gateway.connections) + self.pending, detail=self.detail)
        self.refused = self.accept_failures = 0


class LoopErrorReporter:
    """The event loop's exception handler when the gateway owns the loop: asyncio's report on stderr,
    one a REPORT_INTERVAL at most, the next one saying how many were left out. Whatever repeats an
    error per event (a bug, an exhausted resource) then costs a line a second, not a flooded disk."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.reported = -REPORT_INTERVAL
        self.left_out = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: Dict[str, Any]) -> None:
        now = time.monotonic()
        if now - self.reported < REPORT_INTERVAL:
            self.left_out += 1
            return
        if self.left_out:
            context = dict(context, message=f"{context.get('message')} ({self.left_out} earlier errors not reported)")
        self.reported, self.left_out = now, 0
        loop.default_exception_handler(context)
        if self.gateway.log is not None:
            self.gateway.log.write("loop_error", message=context.get("message"), error=repr(context.get("exception")))


async def serve(config: Config, *, agent: Optional[Callable[..., Awaitable[Any]]] = None) -> int:
    """Run a gateway until SIGTERM or SIGINT; returns the exit status."""
    _forbid_inspection()
    gateway = Gateway(config, agent=agent)
    asyncio.get_running_loop().set_exception_handler(LoopErrorReporter(gateway))
    try:
        await gateway.start()
    except ConfigError as exc:
        print(f"ua-gateway: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"ua-gateway: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}"
              " (another gateway may be running there; choose another --port)", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # Disk work runs in threads; a waiting event loop gets the GIL back within this time rather than
    # CPython's default 5 ms, which would otherwise show up as latency whenever a worker is busy.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    print(f"ua-gateway {__version__} listening on {gateway.url} (workspaces {gateway.ops.root})", flush=True)
    await stop.wait()
    await gateway.stop()
    return 0


CLIENT_COMMANDS = ("sessions", "logs")


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ua_gateway",
        description="The operations gateway for AI agent runs: WebSocket agent sessions and an Ops API on one port. "
        "Without a command it serves (same as 'serve'). The Ops API client: 'sessions ...' and 'logs ...' "
        "(see 'sessions --help').",
        epilog="Environment: UA_GATEWAY_HOST, UA_GATEWAY_PORT, UA_WORKSPACES_DIR, UA_OPS_TOKEN (or UA_OPS_TOKEN_FILE, "
        "the path of a file holding it), UA_ALLOWED_USERS, UA_CORS_ORIGINS, UA_OPS_ALLOW_FROM, UA_ALLOWED_HOSTS, "
        "UA_AGENT_CMD, UA_SESSION_CREATE_RATE, UA_SESSION_CREATE_BURST, UA_SESSION_CREATE_PER_MINUTE, "
        "UA_GATEWAY_LOG_ROTATE_BYTES. Flags override them.",
    )
    parser.add_argument("--version", action="version", version=f"ua-gateway {__version__}")
    parser.add_argument("--host", help=f"address to bind (default {DEFAULT_HOST}; non-loopback needs UA_OPS_TOKEN)")
    parser.add_argument("--port", type=int, help=f"port to bind (default {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--workspaces", help=f"workspaces root (default ./{DEFAULT_WORKSPACES}, created if missing)")
    parser.add_argument("--agent-cmd", help="run each agent turn with this command (JSON lines on stdin/stdout)")
    parser.add_argument("--ws-echo", action="store_true", default=None, help="enable WS /ws/echo for conformance tests")
    parser.add_argument("--insecure", action="store_true", default=None, help="allow a non-loopback bind without a token")
    parser.add_argument("--keepalive-timeout", type=float, help=f"idle keep-alive timeout in seconds (default {KEEPALIVE_TIMEOUT:g})")
    parser.add_argument("--max-connections", type=int, help=f"open connections at most; more get 503 (default {MAX_CONNECTIONS})")
    parser.add_argument(
        "--send-stall-timeout", type=float,
        help=f"abort a connection whose peer reads none of its answers for this many seconds (default {SEND_STALL_TIMEOUT:g})",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] and args_list[0] in CLIENT_COMMANDS:
        import ua_client  # the command-line client of the Ops API; it needs nothing of the server

        return ua_client.main(args_list)
    if args_list[:1] == ["serve"]:
        args_list = args_list[1:]
    parser = build_arg_parser()
    args = parser.parse_args(args_list)
    try:
        config = Config.from_env(
            host=args.host,
            port=args.port,
            workspaces=args.workspaces,
            agent_cmd=args.agent_cmd,
            ws_echo=args.ws_echo,
            insecure=args.insecure,
            keepalive_timeout=args.keepalive_timeout,
            max_connections=args.max_connections,
            send_stall_timeout=args.send_stall_timeout,
        )
        config.check_exposure()
    except ConfigError as exc:
        print(f"ua-gateway: error: {exc}", file=sys.stderr)
        return 2
    _raise_fd_limit()
    try:
        return asyncio.run(serve(config))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())

"""Configuration: environment variables (Universal Agent's names) overridden by command-line flags, and
secrets read from files (``read_secret``). ``Config`` checks every timeout and limit in one place.

May import: the standard library, ``uagw.limits`` and ``uagw.text``.
"""

from __future__ import annotations

import ipaddress
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from .limits import (
    AGENT_KILL_GRACE, BODY_TIMEOUT, DEFAULT_HOST, DEFAULT_PORT, DEFAULT_WORKSPACES, GATEWAY_LOG_ROTATE_BYTES,
    HEADER_TIMEOUT, INDEX_RESCAN_INTERVAL, KEEPALIVE_TIMEOUT, PRUNE_INTERVAL, MAX_CONNECTIONS, MAX_INT_DIGITS, MAX_SECRET_FILE_BYTES, CLOSE_LINGER,
    SHUTDOWN_GRACE,
    SEND_STALL_TIMEOUT, STREAM_KEEPALIVE, SESSION_CREATE_BURST, SESSION_CREATE_PER_MINUTE, SESSION_CREATE_RATE, WS_CLOSE_TIMEOUT,
    WS_PING_INTERVAL, WS_PING_TIMEOUT,
)
from .limits import ARCHIVE_COMPRESS_DELAY
from .text import show

__all__ = [
    "Config",
    "ConfigError",
    "HIDDEN_FROM_AGENTS",
    "SECRET_FILE_SUFFIX",
    "SECRET_VARIABLES",
    "is_loopback_host",
    "parse_byte_size",
    "read_secret",
]


class ConfigError(ValueError):
    """A configuration value is unusable; the message says which and how to fix it."""


# Variables that hold a secret. Each may instead be given as <NAME>_FILE, the path of a file holding it
# (the convention of container secrets and systemd credentials), which keeps the secret out of every
# process environment. Neither form is handed on to agent commands.
SECRET_VARIABLES = ("UA_OPS_TOKEN", "UA_INTERNAL_API_TOKEN", "UA_OPS_READ_TOKEN")
SECRET_FILE_SUFFIX = "_FILE"
HIDDEN_FROM_AGENTS = frozenset(name + suffix for name in SECRET_VARIABLES for suffix in ("", SECRET_FILE_SUFFIX))


def read_secret(env: Mapping[str, str], name: str) -> Optional[str]:
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
        raise ConfigError(f"{file_variable} names {show(path)}, which cannot be read: {exc.strerror or exc}; "
                          "point it at a readable file that holds the secret") from None
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise ConfigError(f"{file_variable} names {show(path)}, which is over {MAX_SECRET_FILE_BYTES} bytes: "
                          "not a secret; point it at the file that holds only the secret")
    try:
        secret = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{file_variable} names {show(path)}, which is not UTF-8 text; "
                          "write the secret into it as text") from None
    if not secret:
        raise ConfigError(f"{file_variable} names {show(path)}, which is empty; write the secret into it, e.g.\n"
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
                f"UA_OPS_ALLOW_FROM entry {show(item)} is not an IP address or CIDR range "
                "(examples: 10.0.0.5, 10.0.0.0/8, ::1, fd00::/8)"
            ) from None
    return networks


def _env_number(env: Mapping[str, str], name: str, kind: Callable[[str], Any]) -> Any:
    """A number from the environment, None when unset (the default applies). Its range is Config's to
    check (LIMITS), as for every other way a limit is set."""
    text = (env.get(name) or "").strip()
    if not text:
        return None
    try:
        if len(text) > MAX_INT_DIGITS + 8:  # int() of a huge string is slow (and refused from 3.11 on)
            raise ValueError(text)
        return kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ConfigError(f"{name} must be {what} (see README, Configuration), not {show(text)}") from None


def _env_switch(env: Mapping[str, str], name: str) -> Optional[bool]:
    """An on/off variable: 1/on/true/yes or 0/off/false/no; None when unset (the default applies)."""
    text = (env.get(name) or "").strip().lower()
    if not text:
        return None
    if text in ("1", "on", "true", "yes"):
        return True
    if text in ("0", "off", "false", "no"):
        return False
    raise ConfigError(f"{name} must be 1 or 0 (on or off), not {show(text)}")


# Suffixes of a byte size (UA_DISK_BUDGET_BYTES, --disk-budget): powers of 1024, as du and df print them.
BYTE_SUFFIXES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_byte_size(text: Optional[str], name: str) -> Optional[int]:
    """A byte count such as ``500000000``, ``512M`` or ``20G`` (suffixes K, M, G, T: powers of 1024, an
    optional trailing ``B`` or ``iB``); None when unset. Raises ConfigError naming ``name``."""
    text = (text or "").strip()
    if not text:
        return None
    upper = text.upper()
    for tail in ("IB", "B"):
        if upper.endswith(tail) and len(upper) > len(tail) and upper[-len(tail) - 1] in BYTE_SUFFIXES:
            upper = upper[:-len(tail)]
            break
    factor = BYTE_SUFFIXES.get(upper[-1:], 1)
    digits = upper[:-1] if factor > 1 else upper
    if not (digits.isascii() and digits.isdigit()) or len(digits) > MAX_INT_DIGITS or int(digits) == 0:
        raise ConfigError(f"{name} must be a byte count above 0 such as 500000000, 512M or 20G (K, M, G, T: "
                          f"powers of 1024), not {show(text)}")
    return int(digits) * factor


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# Universal Agent's user when a client names none (its identity resolver): COMPOSIO_USER_ID, else
# DEFAULT_USER_ID, else this.
DEFAULT_USER = "user_universal"


def default_user(env: Mapping[str, str]) -> str:
    return (env.get("COMPOSIO_USER_ID") or "").strip() or (env.get("DEFAULT_USER_ID") or "").strip() or DEFAULT_USER


def allowed_users(env: Mapping[str, str]) -> List[str]:
    """UA_ALLOWED_USERS; when it lists anyone, extended as Universal Agent extends it: with COMPOSIO_USER_ID,
    DEFAULT_USER_ID, UA_DASHBOARD_OWNER_ID and each id of TELEGRAM_ALLOWED_USER_IDS (else ALLOWED_USER_IDS)."""
    users = _split_list(env.get("UA_ALLOWED_USERS"))
    if users:
        users += [value.strip() for value in (env.get(name) for name in (
            "COMPOSIO_USER_ID", "DEFAULT_USER_ID", "UA_DASHBOARD_OWNER_ID")) if value and value.strip()]
        users += _split_list(env.get("TELEGRAM_ALLOWED_USER_IDS") or env.get("ALLOWED_USER_IDS"))
    return users


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
        body_timeout: float = BODY_TIMEOUT,
        close_linger: float = CLOSE_LINGER,
        ws_ping_interval: float = WS_PING_INTERVAL,
        ws_ping_timeout: float = WS_PING_TIMEOUT,
        ws_close_timeout: float = WS_CLOSE_TIMEOUT,
        agent_kill_grace: float = AGENT_KILL_GRACE,
        shutdown_grace: float = SHUTDOWN_GRACE,
        max_connections: int = MAX_CONNECTIONS,
        send_stall_timeout: float = SEND_STALL_TIMEOUT,
        session_create_rate: float = SESSION_CREATE_RATE,
        session_create_burst: int = SESSION_CREATE_BURST,
        session_create_per_minute: int = SESSION_CREATE_PER_MINUTE,
        log_rotate_bytes: int = GATEWAY_LOG_ROTATE_BYTES,
        archive_compress_delay: float = ARCHIVE_COMPRESS_DELAY,
        internal_token: Optional[str] = None,
        default_user: str = DEFAULT_USER,
        read_token: Optional[str] = None,
        stream_keepalive: float = STREAM_KEEPALIVE,
        retain_archives_days: Optional[float] = None,
        retain_idle_sessions_days: Optional[float] = None,
        disk_budget_bytes: Optional[int] = None,
        retain_trash_days: Optional[float] = None,
        prune_interval: float = PRUNE_INTERVAL,
        session_index: bool = True,
        index_rescan_interval: float = INDEX_RESCAN_INTERVAL,
        index_scan_pause: float = 0.0,
    ) -> None:
        self.host = "127.0.0.1" if host == "localhost" else host
        self.port = port
        self.workspaces = Path(os.path.abspath(os.fspath(workspaces)))
        self.token = token or None
        # UA_INTERNAL_API_TOKEN: the session API and WebSockets accept it beside the Ops token (PROTOCOL.md §4)
        self.internal_token = internal_token or None
        # UA_OPS_READ_TOKEN: GET and HEAD on the Ops routes only, never a change (PROTOCOL.md §11.1)
        self.read_token = read_token or None
        self.default_user = default_user  # who a session belongs to when its creator names nobody
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
        self.body_timeout = body_timeout
        self.close_linger = close_linger
        self.ws_ping_interval = ws_ping_interval
        self.ws_ping_timeout = ws_ping_timeout
        self.ws_close_timeout = ws_close_timeout
        self.agent_kill_grace = agent_kill_grace
        self.shutdown_grace = shutdown_grace  # what the command line's stop on SIGTERM allows
        self.max_connections = max_connections
        self.send_stall_timeout = send_stall_timeout
        self.session_create_rate = session_create_rate  # 0: no limit per address
        self.session_create_burst = session_create_burst
        self.session_create_per_minute = session_create_per_minute  # 0: no limit for all together
        self.log_rotate_bytes = log_rotate_bytes
        self.stream_keepalive = stream_keepalive  # s between keep-alive comments on an idle SSE stream
        # Retention (PROTOCOL.md §15): each policy None = off; the pruner runs only when one is set.
        self.retain_archives_days = retain_archives_days
        self.retain_idle_sessions_days = retain_idle_sessions_days
        self.disk_budget_bytes = disk_budget_bytes
        self.retain_trash_days = retain_trash_days
        self.prune_interval = prune_interval
        self.archive_compress_delay = archive_compress_delay  # 0: archived logs are compressed at once
        self.session_index = session_index  # False: every list scans the root (the direct listing, for comparison)
        self.index_rescan_interval = index_rescan_interval  # s between the index's rescans where inotify is missing
        self.index_scan_pause = index_scan_pause  # s the first scan pauses per INDEX_SCAN_BATCH sessions: a slow disk
        self._check_limits()
        self._check_read_token()
        self._check_retention()

    # Every timeout and limit: (attribute, how an operator sets it, 0 allowed and what it means, whole number).
    # A timeout of 0, NaN or infinity would silently turn its deadline off; a negative limit refuses all.
    LIMITS = (
        ("keepalive_timeout", "--keepalive-timeout", None, False),
        ("header_timeout", "--header-timeout", None, False),
        ("body_timeout", "--body-timeout", None, False),
        ("close_linger", "Config(close_linger=...)", None, False),
        ("ws_ping_interval", "--ws-ping-interval", None, False),
        ("ws_ping_timeout", "--ws-ping-timeout", None, False),
        ("ws_close_timeout", "--ws-close-timeout", None, False),
        ("agent_kill_grace", "--agent-kill-grace", None, False),
        ("shutdown_grace", "--shutdown-grace", None, False),
        ("send_stall_timeout", "--send-stall-timeout", None, False),
        ("stream_keepalive", "--stream-keepalive", None, False),
        ("max_connections", "--max-connections", None, True),
        ("session_create_rate", "UA_SESSION_CREATE_RATE", "no limit per address", False),
        ("session_create_burst", "UA_SESSION_CREATE_BURST", "a burst of 1", True),
        ("session_create_per_minute", "UA_SESSION_CREATE_PER_MINUTE", "no limit for all addresses together", True),
        ("log_rotate_bytes", "UA_GATEWAY_LOG_ROTATE_BYTES", None, True),
        ("prune_interval", "UA_PRUNE_INTERVAL / --prune-interval", None, False),
        ("archive_compress_delay", "UA_ARCHIVE_COMPRESS_DELAY", "compress at once", False),
        ("index_rescan_interval", "UA_INDEX_RESCAN_INTERVAL", None, False),
        ("index_scan_pause", "UA_INDEX_SCAN_PAUSE", "no pause", False),
    )

    # The retention policies that may be off (None), with how an operator sets each.
    RETENTION = (
        ("retain_archives_days", "UA_RETAIN_ARCHIVES_DAYS / --retain-archives-days", False),
        ("retain_idle_sessions_days", "UA_RETAIN_IDLE_SESSIONS_DAYS / --retain-idle-sessions-days", False),
        ("disk_budget_bytes", "UA_DISK_BUDGET_BYTES / --disk-budget", True),
    )

    @property
    def retention_enabled(self) -> bool:
        """True when a policy is set: only then does the background pruner run."""
        return any(getattr(self, attribute) is not None for attribute, _, _ in self.RETENTION)

    # Unset: every prune empties the trash whatever the age of its entries (they are deleted sessions).
    TRASH_RETENTION = ("retain_trash_days", "UA_RETAIN_TRASH_DAYS / --retain-trash-days", False)

    def _check_retention(self) -> None:
        for attribute, where, whole in self.RETENTION + (self.TRASH_RETENTION,):
            value = getattr(self, attribute)
            if value is None:
                continue
            is_number = isinstance(value, int if whole else (int, float)) and not isinstance(value, bool)
            if not (is_number and math.isfinite(value) and value > 0):
                kind = "a number of bytes (suffix K, M, G or T allowed)" if whole else "a number of days"
                raise ConfigError(f"{attribute.replace('_', ' ')} ({where}) must be {kind} above 0, or unset "
                                  f"(policy off), not {show(value)}")

    def _check_limits(self) -> None:
        """Raise ConfigError naming the first timeout or limit that is not a finite number above 0
        (or exactly 0 where LIMITS gives 0 a meaning), and how to set it."""
        for attribute, where, zero_means, whole in self.LIMITS:
            value = getattr(self, attribute)
            is_number = isinstance(value, int if whole else (int, float)) and not isinstance(value, bool)
            if is_number and math.isfinite(value) and (value > 0 or (value == 0 and zero_means)):
                continue
            seconds = attribute.endswith(("_timeout", "_interval", "_linger", "_grace", "_keepalive"))
            kind = "a whole number" if whole else "a finite number" + (" of seconds" if seconds else "")
            allowed = f"0 ({zero_means}) or more" if zero_means else "above 0"
            raise ConfigError(f"{attribute.replace('_', ' ')} ({where}) must be {kind}, {allowed}, not {show(value)}")

    def _check_read_token(self) -> None:
        """A read token must be a token of its own beside a full one: equal to UA_OPS_TOKEN or
        UA_INTERNAL_API_TOKEN it would make every read-only holder a full one (or the other way round),
        and alone it would leave every change and every turn with no token that may make it."""
        if self.read_token is None:
            return
        if self.read_token in (self.token, self.internal_token):
            other = "UA_OPS_TOKEN" if self.read_token == self.token else "UA_INTERNAL_API_TOKEN"
            raise ConfigError(f"UA_OPS_READ_TOKEN is the same as {other}; a read-only token must differ from "
                              "every full one: generate another, e.g.\n"
                              "  python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")
        if self.token is None and self.internal_token is None:
            raise ConfigError("UA_OPS_READ_TOKEN is set without UA_OPS_TOKEN: nothing could then change a session "
                              "or run a turn. Set UA_OPS_TOKEN (or UA_OPS_TOKEN_FILE) too, or unset "
                              "UA_OPS_READ_TOKEN to run without tokens on loopback")

    def check_exposure(self) -> None:
        """Refuse a non-loopback bind without a token (PROTOCOL.md §1), unless ``insecure`` says otherwise.
        UA_OPS_READ_TOKEN never counts: alone it is refused already (``_check_read_token``)."""
        if self.token or self.internal_token or self.insecure or is_loopback_host(self.host):
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
    def from_env(cls, environ: Optional[Mapping[str, str]] = None, **overrides: Any) -> "Config":
        """Read the UA_* variables of ``environ`` (default os.environ); ``overrides`` that are not None win.

        Raises ConfigError naming the variable that is unusable and how to fix it.
        """
        env = os.environ if environ is None else environ
        port_text = env.get("UA_GATEWAY_PORT", str(DEFAULT_PORT))
        try:
            port = int(port_text)
        except ValueError:
            raise ConfigError(f"UA_GATEWAY_PORT must be a port number, not {show(port_text)}") from None
        values: Dict[str, Any] = dict(
            host=env.get("UA_GATEWAY_HOST") or DEFAULT_HOST,
            port=port,
            workspaces=env.get("UA_WORKSPACES_DIR") or DEFAULT_WORKSPACES,
            token=read_secret(env, "UA_OPS_TOKEN"),
            internal_token=read_secret(env, "UA_INTERNAL_API_TOKEN"),
            read_token=read_secret(env, "UA_OPS_READ_TOKEN"),
            default_user=default_user(env),
            allowed_users=allowed_users(env),
            cors_origins=_split_list(env.get("UA_CORS_ORIGINS")),
            allow_from=_parse_networks(env.get("UA_OPS_ALLOW_FROM")),
            allowed_hosts=_split_list(env.get("UA_ALLOWED_HOSTS")),
            agent_cmd=env.get("UA_AGENT_CMD") or None,
            session_create_rate=_env_number(env, "UA_SESSION_CREATE_RATE", float),
            session_create_burst=_env_number(env, "UA_SESSION_CREATE_BURST", int),
            session_create_per_minute=_env_number(env, "UA_SESSION_CREATE_PER_MINUTE", int),
            log_rotate_bytes=_env_number(env, "UA_GATEWAY_LOG_ROTATE_BYTES", int),
            retain_archives_days=_env_number(env, "UA_RETAIN_ARCHIVES_DAYS", float),
            retain_idle_sessions_days=_env_number(env, "UA_RETAIN_IDLE_SESSIONS_DAYS", float),
            disk_budget_bytes=parse_byte_size(env.get("UA_DISK_BUDGET_BYTES"), "UA_DISK_BUDGET_BYTES"),
            retain_trash_days=_env_number(env, "UA_RETAIN_TRASH_DAYS", float),
            prune_interval=_env_number(env, "UA_PRUNE_INTERVAL", float),
            archive_compress_delay=_env_number(env, "UA_ARCHIVE_COMPRESS_DELAY", float),
            session_index=_env_switch(env, "UA_SESSION_INDEX"),
            index_rescan_interval=_env_number(env, "UA_INDEX_RESCAN_INTERVAL", float),
            index_scan_pause=_env_number(env, "UA_INDEX_SCAN_PAUSE", float),
        )
        values = {key: value for key, value in values.items() if value is not None}  # unset: the default
        values.update({key: value for key, value in overrides.items() if value is not None})
        if not 0 <= values["port"] <= 65535:
            raise ConfigError(f"port must be between 0 and 65535, not {values['port']}")
        return cls(**values)  # Config checks every timeout and limit (_check_limits)

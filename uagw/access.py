"""Access control (docs/PROTOCOL.md §4): the token, the failed-auth lockout, the address allowlist, CORS
and Origin, and the session-creation rate limits. Event-loop only.

May import: the standard library, ``uagw.limits``, ``uagw.config`` and ``uagw.http11``.
"""

from __future__ import annotations

import collections
import enum
import hashlib
import hmac
import ipaddress
import time
from typing import Any, Callable, Iterable, List, Optional, Tuple, Union

from .limits import (
    AUTH_FAILURE_LIMIT, AUTH_FAILURE_WINDOW, AUTH_LOCKOUT, AUTH_TRACKED_ADDRESSES,
    SESSION_CREATE_TRACKED_ADDRESSES,
)
from .config import Config
from .http11 import OWS, Request

__all__ = [
    "AccessControl",
    "Grant",
    "client_ip",
    "offers_credential",
    "request_tokens",
]


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


class Grant(str, enum.Enum):
    """What the token a request carried grants (``AccessControl.grant``; PROTOCOL.md §11.1); audit
    records name it as the scope used."""

    OPEN = "open"  # no token is configured (loopback only, PROTOCOL.md §1)
    FULL = "full"  # UA_OPS_TOKEN (or UA_INTERNAL_API_TOKEN on Ops routes when it is the only one set)
    INTERNAL = "internal"  # UA_INTERNAL_API_TOKEN
    READ = "read"  # UA_OPS_READ_TOKEN: reading Ops routes, nothing else


class AccessControl:
    """Decides who may use protected endpoints and how fast sessions may be created. All methods run on
    the event loop (not thread-safe).

    The failure and lockout tables are kept in time order (an entry that changes moves to the end), so
    expired entries are always at the front: each call forgets them in time proportional to their number,
    and a full table drops its oldest entry. Neither table ever holds more than AUTH_TRACKED_ADDRESSES.
    """

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic) -> None:
        # The Ops token; when only UA_INTERNAL_API_TOKEN is set, the Ops API takes that one (never open then).
        ops_token = config.token or config.internal_token
        self.token_digest = _digest(ops_token) if ops_token else None
        # The session API and WebSockets take either token (Universal Agent's SESSION_API_TOKEN or UA_OPS_TOKEN).
        self.session_digests = [_digest(t) for t in (config.token, config.internal_token) if t]
        # Every configured token with what it grants, compared all together by ``grant``.
        self._grants: List[Tuple[bytes, Grant]] = [(_digest(token), grant) for token, grant in (
            (config.token, Grant.FULL), (config.internal_token, Grant.INTERNAL), (config.read_token, Grant.READ))
            if token]
        self.default_user = config.default_user
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

    def grant(self, candidates: Iterable[Optional[str]]) -> Optional[Grant]:
        """What the candidates grant: the widest grant of any configured token among them (FULL, then
        INTERNAL, then READ), OPEN when no token is configured, None when none matches.

        Every candidate is compared with every configured token, whichever matched: the time taken
        does not reveal which token (or whether the read token) was offered."""
        if not self._grants:
            return Grant.OPEN
        matched = {grant: False for _, grant in self._grants}
        for candidate in candidates:
            if candidate:
                digest = _digest(candidate)
                for wanted, grant in self._grants:
                    matched[grant] |= hmac.compare_digest(digest, wanted)
        for grant in (Grant.FULL, Grant.INTERNAL, Grant.READ):
            if matched.get(grant):
                return grant
        return None

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
        """UA_ALLOWED_USERS as Universal Agent reads it: empty admits everyone; else a listed id, or
        ``telegram_<n>`` whose ``<n>`` is listed. Universal Agent's own service ids (SYSTEM_USERS,
        SYSTEM_USER_PREFIXES) pass too when a token is configured: only its holders reach these checks then."""
        if not self.allowed_users:
            return True
        if not user_id:
            return False
        if user_id in self.allowed_users:
            return True
        if user_id.startswith("telegram_") and user_id[len("telegram_"):] in self.allowed_users:
            return True
        return bool(self.session_digests) and (user_id in SYSTEM_USERS or user_id.startswith(SYSTEM_USER_PREFIXES))

    def cors_headers(self, request: Request) -> List[Tuple[str, str]]:
        origin = request.header("origin")
        if origin and origin.rstrip("/") in self.cors_origins:
            return [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
        return []


# Ids Universal Agent's own services use (its worker pool, web UI, CLI, cron, webhooks).
SYSTEM_USERS = frozenset(("webhook", "user_ui", "user_cli", "owner_primary", "ops_tutorial_review", "cron_system",
                          "ops:system-configuration-agent"))
SYSTEM_USER_PREFIXES = ("cron:", "worker_", "vp.")


def _put_bounded(table: "collections.OrderedDict[str, Any]", key: str, value: Any, limit: int) -> None:
    """Append ``key`` to a table kept oldest first, dropping the oldest entries beyond ``limit``."""
    while len(table) >= limit:
        table.popitem(last=False)
    table[key] = value


def request_tokens(request: Request) -> List[Optional[str]]:
    """The token candidates a request carries: a Bearer credential, X-UA-OPS-TOKEN and X-UA-Internal-Token."""
    candidates = [request.header("x-ua-ops-token"), request.header("x-ua-internal-token")]
    authorization = request.header("authorization") or ""
    scheme, _, credential = authorization.partition(" ")
    if scheme.lower() == "bearer":
        candidates.append(credential.strip(OWS))  # RFC 9110 §11.4: NBSP and friends are part of the credential
    return candidates


def offers_credential(request: Request, extra_token: Optional[str] = None) -> bool:
    """Whether a request offers any credential at all: an Authorization header (any scheme), a token
    header, or ``extra_token`` (a WebSocket subprotocol token). A request offering none guesses nothing,
    so its 401 does not count toward the lockout (PROTOCOL.md §4): a console opened before its token
    is typed must not lock its operator out."""
    return bool(extra_token or request.header("authorization") or any(request_tokens(request)))

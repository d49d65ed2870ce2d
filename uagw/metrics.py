"""Metrics for ``GET /metrics`` (PROTOCOL.md §14): counters, gauges and histograms, written in the
Prometheus text exposition format 0.0.4 with the standard library, and ``GatewayMetrics``, the gateway's
own instruments and what a scrape reads.

Rules this module keeps: label values are bounded. A request is counted by its route *template*
(``/api/v1/ops/sessions/{session_id}``), never its raw path or a session id; a path no route matches
counts under UNMATCHED, a method outside KNOWN_METHODS under "other". Every other label takes values from
a fixed list named here.

Theory of operation: the event loop updates counters in place (``GatewayMetrics.request_done`` is on the
hot path: a dict update and a bisect). A scrape takes two steps: ``loop_families`` copies what lives in
memory on the event loop (requests, turns, connections, writer-thread counters), then ``disk_families``
runs in a worker thread (``Application.run_ops``) for what reads the disk or /proc: statvfs, the cached
walk of the workspaces root, the cached session counts, the process metrics. ``render`` writes both.

May import: the standard library, ``ops_service``, ``uagw.limits``, ``uagw.changes`` and ``uagw.routing``.
"""

from __future__ import annotations

import bisect
import math
import os
import re
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from ops_service import OpsService

from .changes import ChangeKind
from .limits import (
    METRICS_SESSION_COUNT_INTERVAL, METRICS_WALK_INTERVAL, METRICS_WALK_MAX_ENTRIES, METRICS_WALK_MAX_SECONDS,
)
from .routing import Route

__all__ = [
    "Counter",
    "EXPOSITION_CONTENT_TYPE",
    "GatewayMetrics",
    "Gauge",
    "Histogram",
    "KNOWN_METHODS",
    "LATENCY_BUCKETS",
    "MetricFamily",
    "REFUSAL_REASONS",
    "TURN_BUCKETS",
    "UNMATCHED",
    "escape_label_value",
    "format_value",
    "process_families",
    "render",
    "session_counts",
    "workspaces_usage",
]

EXPOSITION_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what Prometheus asks for and parses
UNMATCHED = "unmatched"  # the route label of a request no route matches: raw paths would be unbounded
KNOWN_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))  # others count as "other"
# s; request latency: health answers in tens of microseconds, disk work in milliseconds, a big listing in seconds.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TURN_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)  # s; an agent turn
# Why ``authorize``/``admit`` refuse a request: (status, reason label). A new refusal adds its row here.
REFUSAL_REASONS = (
    ("401", "token"),  # no token, or a wrong one
    ("403", "cross_site"),  # a browser request from another origin (Origin / Sec-Fetch-Site)
    ("403", "address"),  # not in UA_OPS_ALLOW_FROM
    ("421", "host"),  # a Host not in UA_ALLOWED_HOSTS
    ("429", "lockout"),  # the address is locked out after failed authentications
    ("429", "session_create_rate"),  # over UA_SESSION_CREATE_RATE / _BURST / _PER_MINUTE
)
TURN_OUTCOMES = ("completed", "failed", "cancelled")
SESSION_STATUSES = ("running", "active", "idle", "archived")  # PROTOCOL.md §5: a session has exactly one

_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
Labels = Tuple[str, ...]
_monotonic = time.monotonic  # looked up once: request_done runs per request
_bisect_left = bisect.bisect_left


# -- the exposition format ------------------------------------------------------------------------------------


def escape_label_value(value: str) -> str:
    """A label value as the text format quotes it: backslash, double quote and line feed escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value: integers without a fraction, floats as Python's repr, and +Inf, -Inf, NaN."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


class MetricFamily:
    """One metric's HELP and TYPE and its samples: (name suffix, label pairs, value)."""

    __slots__ = ("name", "kind", "help", "samples")

    def __init__(self, name: str, help: str, kind: str) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        self.name = name
        self.kind = kind
        self.help = help
        self.samples: List[Tuple[str, Sequence[Tuple[str, str]], float]] = []

    def add(self, value: float, labels: Sequence[Tuple[str, str]] = (), suffix: str = "") -> "MetricFamily":
        self.samples.append((suffix, labels, value))
        return self


def _label_text(labels: Sequence[Tuple[str, str]]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{name}="{escape_label_value(value)}"' for name, value in labels) + "}"


def render(families: Iterable[MetricFamily]) -> str:
    """The text exposition format 0.0.4: per family a HELP and a TYPE line, then its samples."""
    lines: List[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for suffix, labels, value in family.samples:
            lines.append(f"{family.name}{suffix}{_label_text(labels)} {format_value(value)}")
    return "\n".join(lines) + "\n"


# -- instruments (event loop only: none of them locks) ---------------------------------------------------------


class _Instrument:
    kind = ""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = (), initial: Iterable[Labels] = ()) -> None:
        for label in labelnames:
            if not _LABEL_RE.match(label) or label.startswith("__") or label == "le":
                raise ValueError(f"invalid label name {label!r}")
        MetricFamily(name, help, self.kind)  # validates the name
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self.values: Dict[Tuple[Any, ...], float] = {labels: 0 for labels in initial}  # series shown before their first event

    def _pairs(self, labels: Tuple[Any, ...]) -> List[Tuple[str, str]]:
        return [(name, str(label)) for name, label in zip(self.labelnames, labels)]

    def family(self) -> MetricFamily:
        family = MetricFamily(self.name, self.help, self.kind)
        for labels, value in sorted(self.values.items()):
            family.add(value, self._pairs(labels))
        return family


class Counter(_Instrument):
    """A count that only goes up; by convention its name ends in ``_total``."""

    kind = "counter"

    def inc(self, *labels: str, amount: float = 1) -> None:
        self.values[labels] = self.values.get(labels, 0) + amount


class Gauge(_Instrument):
    """A value that goes up and down."""

    kind = "gauge"

    def set(self, value: float, *labels: str) -> None:
        self.values[labels] = value


class _Series:
    __slots__ = ("counts", "sum")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * (buckets + 1)  # per bucket, not cumulative; the last is above the highest bound
        self.sum = 0.0


class Histogram(_Instrument):
    """Observations counted into buckets (upper bounds, inclusive: the ``le`` label), with their sum."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float], labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        if list(buckets) != sorted(set(buckets)) or not buckets:
            raise ValueError("histogram buckets must be distinct and increasing")
        self.bounds = tuple(float(bound) for bound in buckets)
        self.series: Dict[Labels, _Series] = {}

    def observe(self, value: float, *labels: str) -> None:
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = _Series(len(self.bounds))
        series.counts[bisect.bisect_left(self.bounds, value)] += 1
        series.sum += value

    def family(self) -> MetricFamily:
        family = MetricFamily(self.name, self.help, self.kind)
        les = [format_value(bound) for bound in self.bounds] + ["+Inf"]
        for labels, series in sorted(self.series.items()):
            if not any(series.counts):
                continue  # a series made ahead of its first observation is not shown until it has one
            pairs = self._pairs(labels)
            cumulative = 0
            for le, count in zip(les, series.counts):
                cumulative += count
                family.add(cumulative, pairs + [("le", le)], "_bucket")
            family.add(series.sum, pairs, "_sum")
            family.add(cumulative, pairs, "_count")
        return family


# -- what a scrape reads from the disk and /proc (worker threads only) ------------------------------------------


def session_counts(lister: Callable[..., Dict[str, Any]], runtime: Dict[str, Any]) -> Dict[str, int]:
    """Sessions by status (SESSION_STATUSES), from ``lister`` (``OpsService.list_sessions``: directory scans;
    the session index counts in one pass, ``SessionIndex.count_by_status``). Raises OpsError. GatewayMetrics
    calls it at most every METRICS_SESSION_COUNT_INTERVAL seconds, in a worker thread.
    """
    def total(status: str) -> int:
        return int(lister(status=status, limit=1, runtime=runtime)["total"])

    everything, archived, active, running = total("all"), total("archived"), total("active"), total("running")
    return {"running": running, "active": active - running, "archived": archived,
            "idle": max(0, everything - active - archived)}


def workspaces_usage(root: str, max_entries: int = METRICS_WALK_MAX_ENTRIES,
                     max_seconds: float = METRICS_WALK_MAX_SECONDS) -> Tuple[int, bool]:
    """(bytes allocated under ``root``, as du counts them, and whether the walk stopped early at
    ``max_entries`` entries or ``max_seconds``). Symlinks are counted, never followed; entries that
    vanish or cannot be read are skipped."""
    used = 0
    entries = 0
    deadline = time.monotonic() + max_seconds
    pending = [root]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as iterator:
                for entry in iterator:
                    entries += 1
                    if entries > max_entries or (entries % 1024 == 0 and time.monotonic() > deadline):
                        return used, True
                    try:
                        info = entry.stat(follow_symlinks=False)
                        if entry.is_dir(follow_symlinks=False):
                            pending.append(entry.path)
                    except OSError:
                        continue
                    used += getattr(info, "st_blocks", 0) * 512 or info.st_size
        except OSError:
            continue
    return used, False


def _proc_stat() -> Optional[Dict[str, float]]:
    """CPU seconds, start time, virtual and resident bytes of this process from /proc (Linux), or None."""
    try:
        with open("/proc/self/stat", "rb") as stream:
            stat = stream.read().decode("ascii", "replace")
        with open("/proc/stat", "rb") as stream:
            boot = next(float(line.split()[1]) for line in stream.read().decode().splitlines() if line.startswith("btime"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    ticks = float(os.sysconf("SC_CLK_TCK"))
    # proc(5): utime=14, stime=15, starttime=22, vsize=23, rss=24 (1-based, counting pid and comm)
    return {
        "cpu": (int(fields[11]) + int(fields[12])) / ticks,
        "start": boot + int(fields[19]) / ticks,
        "virtual": float(fields[20]),
        "resident": float(int(fields[21]) * os.sysconf("SC_PAGE_SIZE")),
    }


def _open_fds() -> Optional[int]:
    for directory in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(directory)) - 1  # less the descriptor listdir itself holds open
        except OSError:
            continue
    return None


def process_families(started_wall: float) -> List[MetricFamily]:
    """The standard ``process_*`` metrics. Without /proc, from the resource module: CPU time, the peak
    resident size (the current one is unknown there) and ``started_wall``, the start time seen by the
    gateway itself."""
    families: List[MetricFamily] = []
    stat = _proc_stat()
    if stat is None:
        try:
            import resource

            usage = resource.getrusage(resource.RUSAGE_SELF)
            # ru_maxrss: KiB on Linux, bytes on macOS
            peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
            stat = {"cpu": usage.ru_utime + usage.ru_stime, "start": started_wall, "resident": float(peak)}
        except (ImportError, OSError):
            stat = {"start": started_wall}
    described = (
        ("cpu", "process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds."),
        ("start", "process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds."),
        ("virtual", "process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes."),
        ("resident", "process_resident_memory_bytes", "gauge", "Resident memory size in bytes."),
    )
    for key, name, kind, help in described:
        if key in stat:
            families.append(MetricFamily(name, help, kind).add(stat[key]))
    fds = _open_fds()
    if fds is not None:
        families.append(MetricFamily("process_open_fds", "Number of open file descriptors.", "gauge").add(fds))
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY:
            families.append(MetricFamily("process_max_fds", "Maximum number of open file descriptors.", "gauge")
                            .add(soft))
    except (ImportError, OSError, ValueError):
        pass
    return families


class _Cached:
    """A value recomputed by ``compute`` at most every ``interval`` seconds; the thread that finds it stale
    recomputes it, and one arriving meanwhile takes the previous value rather than wait (thread-safe)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.value: Any = None
        self.at = -math.inf
        self._lock = threading.Lock()

    def get(self, compute: Callable[[], Any]) -> Any:
        if time.monotonic() - self.at < self.interval or not self._lock.acquire(blocking=self.value is None):
            return self.value
        try:
            if time.monotonic() - self.at >= self.interval:
                self.value = compute()
                self.at = time.monotonic()
        finally:
            self._lock.release()
        return self.value


# -- the gateway's metrics -----------------------------------------------------------------------------------


class GatewayMetrics:
    """The gateway's instruments, updated on the event loop, and the two halves of a scrape.

    ``routes``: the router table, whose templates label requests (computed once here, not per request).
    """

    def __init__(self, routes: Sequence[Route]) -> None:
        self.requests = Counter("ua_gateway_http_requests_total",
                                "HTTP requests answered, by route template, method and status.",
                                ("route", "method", "status"))
        self.latency = Histogram("ua_gateway_http_request_duration_seconds",
                                 "Time from a request's arrival to its answer, by route template.",
                                 LATENCY_BUCKETS, ("route",))
        # Each route's label and latency series, found with one lookup per request (None: no route matched).
        self._by_route: Dict[Optional[Route], Tuple[str, _Series]] = {}
        for route in [*routes, None]:
            template = route.template if route is not None else UNMATCHED
            self._by_route[route] = (template, self.latency.series.setdefault((template,), _Series(len(LATENCY_BUCKETS))))
        self.refused = Counter("ua_gateway_refused_requests_total",
                               "Requests refused by the access checks, by status and reason.",
                               ("status", "reason"), initial=REFUSAL_REASONS)
        self.lockouts = Counter("ua_gateway_lockouts_total",
                                "Client addresses locked out after repeated failed authentications.", initial=[()])
        self.turns_started = Counter("ua_gateway_turns_started_total", "Agent turns started.", initial=[()])
        self.turns_finished = Counter("ua_gateway_turns_finished_total",
                                      "Agent turns finished, by outcome (completed, failed, cancelled).",
                                      ("outcome",), initial=[(outcome,) for outcome in TURN_OUTCOMES])
        self.turn_duration = Histogram("ua_gateway_turn_duration_seconds", "Duration of finished agent turns.",
                                       TURN_BUCKETS)
        self._sessions = _Cached(METRICS_SESSION_COUNT_INTERVAL)
        self._walk = _Cached(METRICS_WALK_INTERVAL)
        self.started_wall = time.time()

    # -- updates (event loop) ------------------------------------------------------------------------------

    def request_done(self, route: Optional[Route], method: str, status: int, started: float) -> None:
        """Count one answered request; ``started`` is its arrival on the monotonic clock (0: unknown).

        The hot path (health answers ~20k requests/s): the instruments' dicts are updated in place here,
        with the status kept an int until a scrape writes it."""
        template, series = self._by_route[route]
        key = (template, method if method in KNOWN_METHODS else "other", status)
        values = self.requests.values
        values[key] = values.get(key, 0) + 1
        if started:
            elapsed = _monotonic() - started
            series.counts[_bisect_left(LATENCY_BUCKETS, elapsed)] += 1
            series.sum += elapsed

    def refuse(self, status: str, reason: str) -> None:
        """Count one refusal; (status, reason) is a row of REFUSAL_REASONS."""
        self.refused.inc(status, reason)

    def on_change(self, kind: ChangeKind, session_id: str, fields: Dict[str, Any]) -> None:
        """A ``Changes`` observer: counts turns started and finished, and how long they took."""
        if kind is ChangeKind.TURN_STARTED:
            self.turns_started.inc()
        elif kind is ChangeKind.TURN_FINISHED:
            outcome = ("completed" if fields.get("completed") else
                       "cancelled" if fields.get("cancelled") else "failed")
            self.turns_finished.inc(outcome)
            self.turn_duration.observe(float(fields.get("duration_s") or 0.0))

    # -- a scrape ------------------------------------------------------------------------------------------

    def loop_families(self, *, connections: Tuple[int, int], agent_processes: int,
                      writers: Dict[str, Any], version: str) -> List[MetricFamily]:
        """What lives in memory, copied on the event loop. ``connections``: (HTTP, WebSocket) open now;
        ``writers``: the writer threads by log name, each with ``bytes_written`` and ``dropped_by_reason``."""
        info = MetricFamily("ua_gateway_build_info", "The gateway's version (always 1).", "gauge")
        info.add(1, [("version", version)])
        open_connections = MetricFamily("ua_gateway_open_connections", "Open client connections, by kind.", "gauge")
        open_connections.add(connections[0], [("kind", "http")]).add(connections[1], [("kind", "websocket")])
        written = MetricFamily("ua_gateway_log_bytes_written_total", "Bytes the writer threads wrote, by log.", "counter")
        dropped = MetricFamily("ua_gateway_log_records_dropped_total",
                               "Log records (lines, or session writes) lost, by log and reason.", "counter")
        for log, writer in sorted(writers.items()):
            written.add(writer.bytes_written, [("log", log)])
            for reason, count in sorted(dict(writer.dropped_by_reason).items()):
                dropped.add(count, [("log", log), ("reason", reason)])
        agents = MetricFamily("ua_gateway_agent_processes", "Agent command processes running.", "gauge")
        return [
            info,
            self.requests.family(),
            self.latency.family(),
            open_connections,
            self.refused.family(),
            self.lockouts.family(),
            self.turns_started.family(),
            self.turns_finished.family(),
            self.turn_duration.family(),
            agents.add(agent_processes),
            written,
            dropped,
        ]

    def disk_families(self, ops: OpsService, runtime: Dict[str, Any],
                      counter: Optional[Callable[[Dict[str, Any]], Dict[str, int]]] = None) -> List[MetricFamily]:
        """What reads the disk or /proc: run in a worker thread (``Application.run_ops``), never on the loop.
        ``runtime``: the hub's snapshot, taken on the loop; ``counter``: counts sessions by status from it (the
        session index's ``count_by_status``); by default ``session_counts`` scans with ``ops.list_sessions``."""
        families = process_families(self.started_wall)
        root = str(ops.root)
        try:
            space = os.statvfs(root)
        except OSError:
            space = None
        if space is not None:
            families.append(MetricFamily("ua_gateway_workspaces_filesystem_size_bytes",
                                         "Size of the file system holding the workspaces root.", "gauge")
                            .add(space.f_blocks * space.f_frsize))
            families.append(MetricFamily("ua_gateway_workspaces_filesystem_free_bytes",
                                         "Bytes free for the gateway on the workspaces root's file system.", "gauge")
                            .add(space.f_bavail * space.f_frsize))
        used, truncated = self._walk.get(lambda: workspaces_usage(root))
        families.append(MetricFamily("ua_gateway_workspaces_used_bytes",
                                     f"Bytes allocated under the workspaces root (walked at most every "
                                     f"{METRICS_WALK_INTERVAL:g} s; a lower bound when the walk was truncated).",
                                     "gauge").add(used))
        families.append(MetricFamily("ua_gateway_workspaces_walk_truncated",
                                     f"1 if the last walk stopped at {METRICS_WALK_MAX_ENTRIES} entries or "
                                     f"{METRICS_WALK_MAX_SECONDS:g} s.", "gauge").add(int(truncated)))
        try:
            counts = self._sessions.get(lambda: counter(runtime) if counter is not None
                                        else session_counts(ops.list_sessions, runtime))
        except Exception:  # an unavailable root: health says why; the other metrics still answer
            counts = None
        if counts is not None:
            sessions = MetricFamily("ua_gateway_sessions",
                                    f"Sessions by status (counted at most every {METRICS_SESSION_COUNT_INTERVAL:g} s).",
                                    "gauge")
            for status in SESSION_STATUSES:
                sessions.add(counts.get(status, 0), [("status", status)])  # a status no session has is 0
            families.append(sessions)
        return families

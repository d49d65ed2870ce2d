"""GET /metrics (uagw/metrics.py, PROTOCOL.md §14): the text exposition format 0.0.4 written in process, and
a live gateway with a token whose metrics follow the traffic the tests send, with bounded label values."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import threading
import time
import urllib.request
from typing import Any, Dict, Iterator, Tuple

import pytest
from websockets.asyncio.client import connect

from conftest import RunningGateway, launch, run, serve_embedded, wait_for
from ops_service import OpsService
from uagw import metrics
from uagw.index import SessionIndex
from uagw.metrics import Counter, Gauge, Histogram, render

TOKEN = "metrics-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SAMPLE_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Samples = Dict[Tuple[str, frozenset], float]


def parse(text: str) -> Samples:
    """{(name, frozenset of label pairs): value} of an exposition; every line must be a comment or a sample."""
    samples: Samples = {}
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        match = SAMPLE_RE.match(line)
        assert match, f"not a sample line: {line!r}"
        labels = frozenset(LABEL_RE.findall(match.group(2) or ""))
        samples[(match.group(1), labels)] = float(match.group(3))
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


# -- the exposition format, in process -------------------------------------------------------------------------


def test_label_values_escape_backslash_quote_and_newline():
    assert metrics.escape_label_value('a\\b"c\nd') == 'a\\\\b\\"c\\nd'


def test_a_counter_renders_help_type_and_one_line_per_series():
    counter = Counter("demo_total", "Demo\ncounter.", ("kind",))
    counter.inc("x")
    counter.inc("x", amount=2)

    assert render([counter.family()]) == '# HELP demo_total Demo\\ncounter.\n# TYPE demo_total counter\ndemo_total{kind="x"} 3\n'


def test_a_histogram_has_cumulative_buckets_up_to_inf_with_sum_and_count():
    histogram = Histogram("demo_seconds", "Demo.", (0.1, 1.0))
    for observed in (0.05, 0.1, 0.5, 7.0):
        histogram.observe(observed)

    lines = render([histogram.family()]).splitlines()[2:]
    assert lines == ['demo_seconds_bucket{le="0.1"} 2', 'demo_seconds_bucket{le="1"} 3', 'demo_seconds_bucket{le="+Inf"} 4',
                     "demo_seconds_sum 7.65", "demo_seconds_count 4"]


def test_special_values_are_written_as_the_format_spells_them():
    gauge = Gauge("demo", "Demo.", ("v",))
    for label, number in (("inf", float("inf")), ("ninf", float("-inf")), ("nan", float("nan")), ("half", 0.5)):
        gauge.set(number, label)

    text = render([gauge.family()])
    assert 'demo{v="inf"} +Inf' in text and 'demo{v="ninf"} -Inf' in text and 'demo{v="nan"} NaN' in text
    assert 'demo{v="half"} 0.5' in text


@pytest.mark.parametrize("name, labels", [("2bad", ()), ("ok", ("le",)), ("ok", ("bad-label",)), ("ok", ("__x",))])
def test_invalid_metric_or_label_names_are_refused(name, labels):
    with pytest.raises(ValueError):
        Counter(name, "Demo.", labels)


def test_the_workspaces_walk_stops_at_its_entry_bound_and_says_so(tmp_path):
    for index in range(10):
        (tmp_path / f"f{index}").write_bytes(b"x" * 5000)

    _, truncated = metrics.workspaces_usage(str(tmp_path), max_entries=5)
    used, complete_truncated = metrics.workspaces_usage(str(tmp_path))

    assert truncated is True and complete_truncated is False
    assert used >= 10 * 4096


def test_the_workspaces_walk_counts_a_symlink_never_its_target(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big").write_bytes(b"x" * 1_000_000)
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(outside)

    used, _ = metrics.workspaces_usage(str(root))

    assert used < 100_000


def test_process_metrics_fall_back_to_the_resource_module_without_proc(monkeypatch):
    monkeypatch.setattr(metrics, "_proc_stat", lambda: None)

    names = {family.name: family.samples[0][2] for family in metrics.process_families(started_wall=1234.0)}

    assert names["process_start_time_seconds"] == 1234.0
    assert names["process_cpu_seconds_total"] > 0
    assert names["process_resident_memory_bytes"] > 0


def test_sessions_are_counted_by_status_with_the_runtime(tmp_path):
    ops = OpsService(tmp_path)
    ops.ensure_root()
    for session_id in ("a", "b", "c"):
        ops.create_session(session_id)

    runtime = {"a": (1, True, 0), "b": (2, False, 0)}
    index = SessionIndex(ops)
    index.rescan()  # the first scan, in this thread

    counts = metrics.session_counts(ops.list_sessions, runtime)

    assert counts == {"running": 1, "active": 1, "idle": 1, "archived": 0}
    assert metrics.session_counts(index.list_sessions, runtime) == counts  # the index counts the same
    assert {status: index.count_by_status(runtime).get(status, 0) for status in counts} == counts  # in one pass


# -- a live gateway --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    running = launch(tmp_path_factory.mktemp("metrics") / "workspaces",
                     env={"UA_OPS_TOKEN": TOKEN, "UA_ALLOWED_HOSTS": "gw.example"})
    yield running
    running.stop()


def scrape(gateway: RunningGateway) -> Samples:
    reply = gateway.get("/metrics", headers=AUTH)
    assert reply.status == 200, reply.body
    return parse(reply.body.decode())


def test_metrics_need_the_token(gw):
    assert gw.get("/metrics").status == 401


def test_metrics_are_served_as_text_format_0_0_4(gw):
    reply = gw.get("/metrics", headers=AUTH)

    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert parse(reply.body.decode())


def test_requests_are_counted_by_route_template_never_by_session_id(gw):
    for _ in range(3):
        assert gw.get("/api/v1/ops/sessions/no-such-session-4711", headers=AUTH).status == 404

    reply = gw.get("/metrics", headers=AUTH)
    samples = parse(reply.body.decode())

    assert value(samples, "ua_gateway_http_requests_total", route="/api/v1/ops/sessions/{session_id}",
                 method="GET", status="404") == 3
    assert b"no-such-session-4711" not in reply.body


def test_an_unmatched_path_and_an_unknown_method_count_under_fixed_labels(gw):
    gw.get("/nothing/here/8812")
    gw.request("BREW", "/api/v1/health")

    reply = gw.get("/metrics", headers=AUTH)
    samples = parse(reply.body.decode())

    assert value(samples, "ua_gateway_http_requests_total", route="unmatched", method="GET", status="404") >= 1
    assert value(samples, "ua_gateway_http_requests_total", route="/api/v1/health", method="other", status="405") == 1
    assert b"8812" not in reply.body and b"BREW" not in reply.body


def test_request_latency_is_a_histogram_per_route(gw):
    gw.get("/api/v1/health")

    samples = scrape(gw)

    count = value(samples, "ua_gateway_http_request_duration_seconds_count", route="/api/v1/health")
    assert count >= 1
    assert value(samples, "ua_gateway_http_request_duration_seconds_bucket", route="/api/v1/health", le="+Inf") == count


def test_an_echo_turn_is_counted_started_and_completed_with_its_duration(gw):
    async def turn() -> None:
        async with connect(f"{gw.ws_url}/api/v1/sessions/metrics-turn/stream", additional_headers=AUTH) as ws:
            await ws.recv()  # connected
            await ws.send(json.dumps({"type": "query", "data": {"text": "hello"}}))
            while json.loads(await ws.recv())["type"] != "query_complete":
                pass

    gw.make_session("metrics-turn")
    before = scrape(gw)
    run(turn(), timeout=20)
    after = scrape(gw)

    assert value(after, "ua_gateway_turns_started_total") - value(before, "ua_gateway_turns_started_total") == 1
    assert (value(after, "ua_gateway_turns_finished_total", outcome="completed")
            - value(before, "ua_gateway_turns_finished_total", outcome="completed")) == 1
    assert value(after, "ua_gateway_turns_finished_total", outcome="failed") == value(
        before, "ua_gateway_turns_finished_total", outcome="failed")
    assert value(after, "ua_gateway_turn_duration_seconds_count") - value(before, "ua_gateway_turn_duration_seconds_count") == 1


def test_open_websockets_are_gauged_apart_from_http_connections(gw):
    async def scrape_while_connected() -> Samples:
        async with connect(f"{gw.ws_url}/api/v1/sessions/metrics-gauge/stream", additional_headers=AUTH) as ws:
            await ws.recv()  # connected
            return await asyncio.get_running_loop().run_in_executor(None, scrape, gw)

    gw.make_session("metrics-gauge")
    during = run(scrape_while_connected(), timeout=20)

    assert value(during, "ua_gateway_open_connections", kind="websocket") == 1
    assert value(during, "ua_gateway_open_connections", kind="http") >= 1  # the scrape's own
    assert wait_for(lambda: value(scrape(gw), "ua_gateway_open_connections", kind="websocket") == 0)


def test_refusals_are_counted_by_status_and_reason(gw):
    before = scrape(gw)
    assert gw.get("/api/v1/ops/sessions", headers={"Authorization": "Bearer wrong"}).status == 401
    assert gw.get("/api/v1/ops/sessions", headers={**AUTH, "Sec-Fetch-Site": "cross-site"}).status == 403
    assert gw.get("/api/v1/health", headers={"Host": "evil.example"}).status == 421

    after = scrape(gw)

    for status, reason in (("401", "token"), ("403", "cross_site"), ("421", "host")):
        key = {"status": status, "reason": reason}
        assert value(after, "ua_gateway_refused_requests_total", **key) - value(
            before, "ua_gateway_refused_requests_total", **key) == 1, (status, reason)


def test_a_lockout_is_counted_once_and_its_refusals_by_reason(gw):
    def from_other_address(headers: Dict[str, str]) -> int:
        # 127.0.0.2 is loopback too: the lockout it earns leaves the tests' own address (127.0.0.1) alone.
        connection = http.client.HTTPConnection(gw.host, gw.port, timeout=10, source_address=("127.0.0.2", 0))
        try:
            connection.request("GET", "/api/v1/ops/sessions", headers=headers)
            return connection.getresponse().status
        finally:
            connection.close()

    statuses = [from_other_address({"Authorization": "Bearer wrong"}) for _ in range(11)]
    samples = scrape(gw)

    assert statuses[-1] == 429
    assert value(samples, "ua_gateway_lockouts_total") == 1
    assert value(samples, "ua_gateway_refused_requests_total", status="429", reason="lockout") == 1


def test_log_bytes_written_grow_as_the_gateway_logs(gw):
    first = value(scrape(gw), "ua_gateway_log_bytes_written_total", log="gateway")

    grown = wait_for(lambda: value(scrape(gw), "ua_gateway_log_bytes_written_total", log="gateway") > first)

    assert grown
    assert value(scrape(gw), "ua_gateway_log_records_dropped_total", log="gateway", reason="queue_full") == 0


def test_process_and_disk_metrics_describe_this_process_and_its_root(gw):
    samples = scrape(gw)

    assert value(samples, "process_resident_memory_bytes") > 1_000_000
    assert 3 <= value(samples, "process_open_fds") <= value(samples, "process_max_fds")
    assert abs(value(samples, "process_start_time_seconds") - time.time()) < 600
    assert value(samples, "process_cpu_seconds_total") > 0
    assert value(samples, "ua_gateway_workspaces_filesystem_free_bytes") > 0
    assert value(samples, "ua_gateway_workspaces_used_bytes") > 0


def test_sessions_are_gauged_by_status(start_gateway, tmp_path):
    gateway = start_gateway(env={"UA_OPS_TOKEN": TOKEN})
    for session_id in ("s1", "s2"):
        gateway.make_session(session_id, {"run.log": b"line\n"})

    samples = scrape(gateway)

    assert value(samples, "ua_gateway_sessions", status="idle") == 2
    assert value(samples, "ua_gateway_sessions", status="running") == 0


def test_a_scrape_waits_for_the_disk_in_a_worker_thread_while_health_answers(tmp_path, monkeypatch):
    walking = threading.Event()
    release = threading.Event()

    def slow_walk(root: str, *args: Any) -> Tuple[int, bool]:
        walking.set()
        release.wait(10)
        return 0, False

    monkeypatch.setattr(metrics, "workspaces_usage", slow_walk)

    async def agent(turn: Any) -> None:
        return None

    def get(url: str) -> int:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status

    async def scenario(gateway: Any) -> Tuple[int, int]:
        loop = asyncio.get_running_loop()
        scraping = loop.run_in_executor(None, get, f"{gateway.url}/metrics")
        assert await loop.run_in_executor(None, walking.wait, 10)
        health = await loop.run_in_executor(None, get, f"{gateway.url}/api/v1/health")
        release.set()
        return health, await scraping

    assert serve_embedded(tmp_path, agent, scenario) == (200, 200)


def test_series_whose_labels_are_known_in_advance_are_present_from_the_start_at_0(start_gateway):
    """§14: refusal reasons, turn outcomes, session statuses and drop reasons exist at 0 before any happens
    (``value`` reads an absent series as 0 too, so the keys are checked, not only the values)."""
    gateway = start_gateway(env={"UA_OPS_TOKEN": TOKEN})
    reply = gateway.get("/metrics", headers=AUTH)
    assert reply.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = parse(reply.body.decode())
    expected = [("ua_gateway_refused_requests_total", {"status": status, "reason": reason})
                for status, reason in (("401", "token"), ("403", "cross_site"), ("403", "address"), ("421", "host"),
                                       ("429", "lockout"), ("429", "session_create_rate"))]
    expected += [("ua_gateway_turns_finished_total", {"outcome": o}) for o in ("completed", "failed", "cancelled")]
    expected += [("ua_gateway_sessions", {"status": s}) for s in ("running", "active", "idle", "archived")]
    # each writer's own drop reasons: the session writer never drops for a full queue (it only fails writes)
    expected += [("ua_gateway_log_records_dropped_total", {"log": log, "reason": reason})
                 for log, reason in (("gateway", "queue_full"), ("gateway", "write_failed"),
                                     ("session", "write_failed"))]
    expected += [("ua_gateway_lockouts_total", {}), ("ua_gateway_turns_started_total", {}),
                 ("ua_gateway_agent_processes", {})]
    missing = [(name, labels) for name, labels in expected if (name, frozenset(labels.items())) not in samples]
    assert not missing, f"series absent from a fresh gateway's scrape: {missing}"
    assert all(samples[(name, frozenset(labels.items()))] == 0 for name, labels in expected)


def test_build_info_is_1_and_the_root_file_system_is_gauged(gw):
    """§14 (README table): ``ua_gateway_build_info{version}`` is always 1; the root's file system size is at
    least what is free on it."""
    samples = scrape(gw)
    [(labels, info)] = [(dict(key[1]), v) for key, v in samples.items() if key[0] == "ua_gateway_build_info"]
    assert info == 1 and set(labels) == {"version"} and labels["version"]
    size = value(samples, "ua_gateway_workspaces_filesystem_size_bytes")
    assert size >= value(samples, "ua_gateway_workspaces_filesystem_free_bytes") > 0
    assert ("ua_gateway_workspaces_walk_truncated", frozenset()) in samples

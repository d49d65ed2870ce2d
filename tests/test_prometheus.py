"""A real Prometheus (Debian's ``prometheus`` package; .ci/run installs it) scrapes a live gateway with a bearer
token; its HTTP API must then report the target up and the request and turn counts of the traffic this test
sent. ``promtool check metrics`` must accept the exposition.

Without the binaries the tests skip with the reason, except in CI (env CI set), where a missing binary fails.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
from websockets.asyncio.client import connect

from conftest import RunningGateway, launch, run, wait_for

TOKEN = "prometheus-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HEALTH_CALLS = 7
LIST_CALLS = 3
PROMETHEUS_TIMEOUT = 12.0  # s; Prometheus starts in about a second and scrapes every second


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing in CI: .ci/run installs Debian's prometheus package")
        pytest.skip(f"{name} is not installed (Debian package prometheus; .ci/run installs it as root)")
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[RunningGateway]:
    """A gateway of the test's own, with a token: the counts the test expects are all its traffic."""
    running = launch(tmp_path / "workspaces", env={"UA_OPS_TOKEN": TOKEN})
    yield running
    running.stop()


def send_known_traffic(gateway: RunningGateway) -> None:
    for _ in range(HEALTH_CALLS):
        assert gateway.get("/api/v1/health").status == 200
    for _ in range(LIST_CALLS):
        assert gateway.get("/api/v1/ops/sessions", headers=AUTH).status == 200
    gateway.make_session("prom-turn")

    async def echo_turn() -> None:
        async with connect(f"{gateway.ws_url}/api/v1/sessions/prom-turn/stream", additional_headers=AUTH) as ws:
            await ws.recv()  # connected
            await ws.send(json.dumps({"type": "query", "data": {"text": "hello"}}))
            while json.loads(await ws.recv())["type"] != "query_complete":
                pass

    run(echo_turn(), timeout=20)


def query(base: str, promql: str) -> Optional[float]:
    """The single value of an instant query, or None (no series yet, or Prometheus not answering yet)."""
    try:
        with urllib.request.urlopen(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': promql})}",
                                    timeout=5) as answer:
            result = json.loads(answer.read())["data"]["result"]
    except OSError:
        return None
    return float(result[0]["value"][1]) if len(result) == 1 else None


def test_prometheus_scrapes_the_gateway_and_counts_the_traffic_sent(gw, tmp_path):
    prometheus = binary("prometheus")
    send_known_traffic(gw)
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n"
        "  - job_name: ua-gateway\n"
        f"    authorization: {{credentials: {TOKEN}}}\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{gw.port}']}}]\n"
    )
    process = subprocess.Popen(
        [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    expected = {
        'up{job="ua-gateway"}': 1,
        'ua_gateway_http_requests_total{route="/api/v1/health",method="GET",status="200"}': HEALTH_CALLS,
        'ua_gateway_http_requests_total{route="/api/v1/ops/sessions",method="GET",status="200"}': LIST_CALLS,
        "ua_gateway_turns_started_total": 1,
        'ua_gateway_turns_finished_total{outcome="completed"}': 1,
        "ua_gateway_turn_duration_seconds_count": 1,
    }
    try:
        seen: Any = wait_for(lambda: (lambda values: values if values == expected else None)(
            {promql: query(base, promql) for promql in expected}), timeout=PROMETHEUS_TIMEOUT, interval=0.25)
        last = {promql: query(base, promql) for promql in expected}
    finally:
        process.terminate()
        try:
            _, stderr = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()

    assert seen == expected, (last, stderr.decode(errors="replace")[-2000:])


def test_promtool_accepts_the_exposition(gw):
    promtool = binary("promtool")
    send_known_traffic(gw)
    body = gw.get("/metrics", headers=AUTH).body

    result = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=30)

    assert result.returncode == 0, (result.stdout + result.stderr).decode(errors="replace")

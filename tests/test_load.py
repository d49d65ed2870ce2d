"""Load, short version for CI (loopback only, bounded in time): many clients at once, zero errors.

* 200 HTTP clients (keep-alive GETs of health, listings, tails and previews) and 500 WebSocket agent
  clients (pings, and an echo turn every fifth message) against one gateway for ~10 s: no error of any
  kind, and the p99 of each is printed.
* 1,000 slowloris sockets trickling request heads that never end: a normal client is still served within
  1 s all along, and every slowloris socket is cut off by the head timeout (trickling, a byte every 0.5 to
  1.5 s, does not extend it). The test sets it to 3 s (``--header-timeout``) rather than wait out the
  default 10 s; the soak script keeps the default.

``tests/soak/soak.py --seconds 60`` runs the same for longer and prints the same counts.
"""

from __future__ import annotations

import asyncio

from conftest import start_watched
from soak.loadgen import prepare_sessions, report, run_mixed, run_slowloris

MIXED_SECONDS = 10.0
HEAD_TIMEOUT = 3.0  # s; long enough for a few trickled bytes per socket, so that trickling is seen not to extend it


def test_200_http_and_500_websocket_clients_for_10_s_without_an_error(tmp_path):
    root = tmp_path / "ws"
    prepare_sessions(root, ["load-0"])
    gateway = start_watched(root)
    try:
        http_stats, ws_stats = asyncio.run(run_mixed(gateway.host, gateway.port, MIXED_SECONDS))
        print(f"\n{report(http_stats)}\n{report(ws_stats)}")
        assert gateway.get("/api/v1/health").status == 200
        sessions = gateway.get("/api/v1/ops/sessions?limit=1").json["total"]
    finally:
        gateway.stop()
    assert http_stats.errors == 0, report(http_stats)
    assert ws_stats.errors == 0, report(ws_stats)
    assert len(http_stats.latencies) > 1000 and len(ws_stats.latencies) > 2000
    assert sessions >= 501, "every WebSocket client's first turn created its session"
    assert not gateway.tracebacks()


def test_1000_slowloris_sockets_do_not_keep_a_normal_client_waiting(tmp_path):
    gateway = start_watched(tmp_path / "ws", "--header-timeout", str(HEAD_TIMEOUT))
    try:
        result, probes = asyncio.run(run_slowloris(gateway.host, gateway.port, sockets=1000, seconds=HEAD_TIMEOUT + 2.5))
        print(f"\nslowloris: {result}\n{report(probes)}")
        assert gateway.get("/api/v1/health").status == 200
    finally:
        gateway.stop()
    assert result["opened"] == 1000
    assert probes.errors == 0, report(probes)
    assert max(probes.latencies) < 1.0, report(probes)
    assert result["closed_by_server"] == 1000 and result["timed_out"] >= 990, result
    assert not gateway.tracebacks()

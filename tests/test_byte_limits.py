"""Limits in bytes and counts on what a client can make the gateway hold (issue 16 items 2 and 10):
input nobody reads, messages sent before an attach, output a peer has not read, the failed-authentication
tables, and how fast sessions may be created.

Memory is measured as the gateway process's VmRSS (real subprocess, real WebSocket clients); the bounds
asserted sit between what the gateway holds now and what it held before these limits (numbers in each test).
Where a moment cannot be produced from outside (an attach still running, a burst emitted in one loop
iteration), the gateway is embedded in-process, still over real sockets.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, List, Tuple

import pytest
from websockets.asyncio.client import connect

from conftest import closed_with, execute, rss_mib, run
from ua_gateway import AgentTurn, Config, ConfigError, Gateway
from uagw import limits
from uagw.access import AccessControl

MiB = 1024 * 1024


def serve_embedded(tmp_path: Path, scenario: Any, agent: Any = None, patch: Any = None) -> Any:
    async def main() -> Any:
        gateway = Gateway(Config(port=0, workspaces=tmp_path / "ws"), agent=agent)
        await gateway.start()
        if patch is not None:
            patch(gateway)
        try:
            return await scenario(gateway)
        finally:
            await gateway.stop(grace=1.0)

    return run(main())


# -- input_responses an agent does not read (16.2) ------------------------------------------------------------


def test_input_responses_a_deaf_agent_never_reads_are_bounded_in_bytes(start_gateway, tmp_path):
    # 20 lobby clients, each starting a turn whose agent never reads stdin, then sending 24 answers of
    # 1 MiB. Before: each turn held all of them (20 x 24 MiB: +520 MiB of RSS). Now a turn holds at most
    # MAX_PENDING_INPUT_BYTES queued plus the one answer on its way to the agent: about +100 MiB in all,
    # most of it transient parsing buffers the allocator keeps.
    deaf = tmp_path / "deaf_agent.py"
    deaf.write_text("import time\ntime.sleep(60)\n")
    gateway = start_gateway("--agent-cmd", f"{sys.executable} {deaf}")
    answer = json.dumps({"type": "input_response", "data": {"input_id": "q", "response": "x" * (MiB - 100)}})
    clients, answers = 20, 24

    async def client() -> List[str]:
        async with connect(f"{gateway.ws_url}/ws/agent", max_size=None) as ws:
            await ws.send(execute("wait for my answers"))
            # The lobby creates the session first (now audited, with an fsync): answers sent before
            # 'connected' would count against MAX_PENDING_BYTES, which is another bound's test.
            while json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] != "connected":
                pass
            for _ in range(answers):
                await ws.send(answer)
            await ws.send('{"type": "ping"}')
            errors = []
            while True:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
                if frame["type"] == "pong":
                    return errors
                if frame["type"] == "error":
                    errors.append(frame["data"]["message"])

    async def scenario() -> Tuple[int, List[List[str]]]:
        before = rss_mib(gateway.process.pid)
        refusals = await asyncio.gather(*(client() for _ in range(clients)))
        return rss_mib(gateway.process.pid) - before, refusals

    grown, refusals = run(scenario())
    print(f"\n{clients} turns x {answers} MiB of unread input: gateway RSS +{grown} MiB")
    assert grown < 250, f"the gateway grew by {grown} MiB holding input no agent reads"
    for errors in refusals:
        assert len(errors) >= answers - 2, "answers beyond the bound are refused, each with an error event"
        assert "bytes of earlier input responses" in errors[-1] and "send it again" in errors[-1]


# -- messages sent before the session is attached (16.2) ------------------------------------------------------


def hold_attach(release: threading.Event) -> Any:
    """A patch for serve_embedded: session "held" exists, and attaching to it waits for ``release``."""

    def patch(gateway: Gateway) -> None:
        session_dir = gateway.ops.session_dir

        def slow(session_id: str) -> Any:
            release.wait(10)
            return session_dir(session_id)

        gateway.ops.session_dir = slow  # type: ignore[method-assign]
        gateway.ops.create_session("held")

    return patch


PADDED_PING = json.dumps({"type": "ping", "data": {"pad": "p" * (MiB - 100)}})


def test_messages_sent_before_attach_beyond_the_byte_bound_close_with_1008(tmp_path):
    # The attach is held open (a workspaces root that answers slowly) while the client sends 8 messages
    # of 1 MiB: under the 32-message cap, but over MAX_PENDING_BYTES (4 MiB). Before: all 8 were held.
    release = threading.Event()

    async def scenario(gateway: Gateway) -> Tuple[int, str]:
        try:
            async with connect(f"ws://127.0.0.1:{gateway.port}/api/v1/sessions/held/stream", max_size=None) as ws:
                for _ in range(8):
                    await ws.send(PADDED_PING)
                return await closed_with(ws, timeout=5)
        finally:
            release.set()

    code, reason = serve_embedded(tmp_path, scenario, patch=hold_attach(release))
    assert code == 1008
    assert "before the session was attached" in reason and "wait for 'connected'" in reason


# -- output a peer has not read (16.2) ------------------------------------------------------------------------


def test_output_queued_past_the_send_bound_in_one_burst_closes_with_1008(tmp_path):
    # An agent that emits 12 MiB of events in one go: before, all of it was queued for the connection at
    # once (the bound was only checked between loop iterations); now the connection is cut at
    # WS_MAX_SEND_BUFFER (8 MiB) plus one message, with a reason that says why.
    async def burst(turn: AgentTurn) -> None:
        for _ in range(12):
            turn.emit("text", {"text": "t" * MiB})

    async def scenario(gateway: Gateway) -> Tuple[int, str]:
        async with connect(f"ws://127.0.0.1:{gateway.port}/ws/agent", max_size=None) as ws:
            await ws.send(execute("flood me"))
            return await closed_with(ws, timeout=5)

    code, reason = serve_embedded(tmp_path, scenario, agent=burst)
    assert code == 1008
    assert "slow consumer" in reason and "8 MiB behind" in reason


# -- the failed-authentication tables (16.10) -----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fail_times(access: AccessControl, address: str, times: int) -> None:
    for _ in range(times):
        access.record_failure(address)


def addresses(count: int) -> List[str]:
    return [f"127.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}" for n in range(1, count + 1)]


def test_lockout_table_never_holds_more_than_the_tracked_addresses(tmp_path):
    access = AccessControl(Config(workspaces=tmp_path), clock=Clock())
    for address in addresses(limits.AUTH_TRACKED_ADDRESSES + 1000):
        fail_times(access, address, limits.AUTH_FAILURE_LIMIT)
    assert len(access._locked_until) == limits.AUTH_TRACKED_ADDRESSES
    assert access.lockout_remaining("127.0.0.1") == 0.0, "the oldest lockout made room for the newest"
    assert access.lockout_remaining(addresses(limits.AUTH_TRACKED_ADDRESSES + 1000)[-1]) > 0


def test_expired_lockouts_are_forgotten(tmp_path):
    clock = Clock()
    access = AccessControl(Config(workspaces=tmp_path), clock=clock)
    for address in addresses(100):
        fail_times(access, address, limits.AUTH_FAILURE_LIMIT)
    clock.now += limits.AUTH_LOCKOUT
    assert access.lockout_remaining("10.0.0.1") == 0.0
    assert len(access._locked_until) == 0


def test_expired_failures_are_forgotten_before_the_table_is_full(tmp_path):
    clock = Clock()
    access = AccessControl(Config(workspaces=tmp_path), clock=clock)
    for address in addresses(100):
        fail_times(access, address, 1)
    clock.now += limits.AUTH_FAILURE_WINDOW
    access.record_failure("10.0.0.1")
    assert list(access._failures) == ["10.0.0.1"]


def test_an_address_that_keeps_failing_keeps_its_count_when_the_table_is_full(tmp_path):
    # The failure table drops its least recently failing address first, not the one under attack.
    clock = Clock()
    access = AccessControl(Config(workspaces=tmp_path), clock=clock)
    access.record_failure("10.0.0.1")
    for address in addresses(limits.AUTH_TRACKED_ADDRESSES - 1):
        fail_times(access, address, 1)
    clock.now += 1
    fail_times(access, "10.0.0.1", limits.AUTH_FAILURE_LIMIT - 2)  # first seen long ago, failing still
    access.record_failure("10.0.0.2")  # the table is full: 127.0.0.1 goes, not 10.0.0.1
    assert len(access._failures) == limits.AUTH_TRACKED_ADDRESSES
    assert access.record_failure("10.0.0.1") is True, "the tenth failure still locks out"


# -- session creation rate (issue 16, "also measured") --------------------------------------------------------


def test_session_creation_past_the_burst_is_429_with_retry_after(start_gateway):
    gateway = start_gateway(env={"UA_SESSION_CREATE_RATE": "0.5", "UA_SESSION_CREATE_BURST": "3"})
    statuses = [gateway.post("/api/v1/sessions", body={}).status for _ in range(3)]
    refused = gateway.post("/api/v1/sessions", body={})
    assert statuses == [200, 200, 200]
    assert refused.status == 429
    assert refused.headers["retry-after"] == "2"
    assert "retry in 2 s" in refused.json["detail"] and "UA_SESSION_CREATE_RATE" in refused.json["detail"]
    assert len([p for p in gateway.workspaces.iterdir() if not p.name.startswith("_")]) == 3


def test_session_creation_past_the_global_cap_per_minute_is_429(start_gateway):
    gateway = start_gateway(env={"UA_SESSION_CREATE_RATE": "0", "UA_SESSION_CREATE_PER_MINUTE": "5"})
    statuses = [gateway.post("/api/v1/sessions", body={}).status for _ in range(6)]
    assert statuses == [200] * 5 + [429]
    assert 55 <= int(gateway.post("/api/v1/sessions", body={}).headers["retry-after"]) <= 60


def test_the_default_gateway_caps_anonymous_session_creation(start_gateway):
    # Before: no cap at all (about 2,400 sessions a second from one local script).
    gateway = start_gateway()
    started = time.monotonic()
    for created in range(limits.SESSION_CREATE_BURST * 2):
        status = gateway.post("/api/v1/sessions", body={}).status
        if status != 200:
            break
    refilled = limits.SESSION_CREATE_RATE * (time.monotonic() - started)  # each create is audited (fsync): slow
    assert status == 429
    assert limits.SESSION_CREATE_BURST <= created <= limits.SESSION_CREATE_BURST + refilled + 1


def test_the_lobby_counts_against_the_same_limit_and_may_retry(start_gateway):
    gateway = start_gateway(env={"UA_SESSION_CREATE_RATE": "5", "UA_SESSION_CREATE_BURST": "1"})
    assert gateway.post("/api/v1/sessions", body={}).status == 200

    async def scenario() -> Tuple[dict, dict]:
        async with connect(f"{gateway.ws_url}/ws/agent") as ws:
            await ws.send(execute("hello"))
            refusal = json.loads(await asyncio.wait_for(ws.recv(), 10))
            deadline = time.monotonic() + 5
            while True:  # the same connection may try again; the bucket refills at 5 a second
                await ws.send(execute("hello again"))
                frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if frame["type"] != "error" or time.monotonic() > deadline:
                    return refusal, frame
                await asyncio.sleep(0.05)

    refusal, accepted = run(scenario())
    assert refusal["type"] == "error" and refusal["data"]["retry_after"] == 1
    assert "too many sessions created" in refusal["data"]["message"]
    assert accepted["type"] == "connected"


@pytest.mark.parametrize("name, value", [("UA_SESSION_CREATE_RATE", "fast"), ("UA_SESSION_CREATE_BURST", "2.5"),
                                         ("UA_SESSION_CREATE_PER_MINUTE", "-1")])
def test_a_malformed_creation_limit_is_a_configuration_error_naming_it(name, value):
    with pytest.raises(ConfigError, match=name):
        Config.from_env({name: value})

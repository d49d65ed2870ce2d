"""Replay after a WebSocket reconnect (issue 13 item 4; PROTOCOL.md §6.3 and §12).

Every event of a turn carries the session's ``seq``; a client that attaches with ``?last_seq=N`` gets,
after ``connected``, every event with a seq above N that it missed (from memory, or from the turn files),
then the live ones: no gap, no duplicate. Embedded gateways run agents that emit one event per token the
test hands them, so "k events, then a disconnect, then more while away" happens exactly, without sleeps.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from conftest import execute, recv, recv_until, serve_embedded
from ua_gateway import AgentTurn, Gateway
from uagw.transcripts import EventRing

EVENTS = 8  # events of the paced agent's turn


class Pacer:
    """An agent that emits ``text`` e0, e1, ... one per ``release()``, then ends its turn."""

    def __init__(self, events: int = EVENTS) -> None:
        self.events = events
        self.tokens: "asyncio.Queue[None]" = asyncio.Queue()

    def release(self, count: int = 1) -> None:
        for _ in range(count):
            self.tokens.put_nowait(None)

    async def agent(self, turn: AgentTurn) -> None:
        for index in range(self.events):
            await self.tokens.get()
            turn.emit("text", {"text": f"e{index}"})


async def until(condition: Any, timeout: float = 5.0) -> None:
    """Poll ``condition`` on the loop (the gateway runs on this loop too) until true."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never became true"
        await asyncio.sleep(0.005)


def url(gateway: Gateway, session_id: Optional[str] = None, last_seq: Any = None) -> str:
    query = [f"session_id={session_id}"] if session_id else []
    query += [f"last_seq={last_seq}"] if last_seq is not None else []
    return f"ws://127.0.0.1:{gateway.port}/ws/agent" + ("?" + "&".join(query) if query else "")


async def events(ws: Any, count: int) -> List[Dict[str, Any]]:
    """The next ``count`` frames that carry a seq (frames without one, like ``status processing``, skipped)."""
    found: List[Dict[str, Any]] = []
    while len(found) < count:
        frame = await recv(ws, 5)
        if "seq" in frame:
            found.append(frame)
    return found


async def rest_of_turn(ws: Any) -> List[Dict[str, Any]]:
    return [frame for frame in await recv_until(ws, "query_complete", 10) if "seq" in frame]


async def start_paced_turn(gateway: Gateway, pacer: Pacer, shown: int) -> Tuple[str, List[Dict[str, Any]]]:
    """Start a turn on a new session, read its first ``shown`` events on a socket, close that socket."""
    async with connect(url(gateway)) as ws:
        await ws.send(execute("go"))
        connected = await recv(ws)
        session_id = connected["data"]["session_id"]
        pacer.release(shown)
        seen = await events(ws, shown)
    await until(lambda: len(gateway.hub.sessions[session_id].sockets) == 0)
    return session_id, seen


def assert_whole_turn(frames: List[Dict[str, Any]], events_count: int = EVENTS) -> None:
    """Each text event once, in order, seqs consecutive, and the turn's query_complete last."""
    texts = [frame["data"]["text"] for frame in frames if frame["type"] == "text"]
    assert texts == [f"e{index}" for index in range(events_count)]
    seqs = [frame["seq"] for frame in frames]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    assert frames[-1]["type"] == "query_complete"


def test_reconnect_mid_turn_gets_the_missed_events_then_the_live_ones(tmp_path: Path) -> None:
    pacer = Pacer()

    async def scenario(gateway: Gateway) -> None:
        session_id, seen = await start_paced_turn(gateway, pacer, 3)
        pacer.release(2)  # emitted while nobody is connected
        live = gateway.hub.sessions[session_id]
        await until(lambda: live.event_seq == seen[-1]["seq"] + 2)
        async with connect(url(gateway, session_id, seen[-1]["seq"])) as ws:
            assert (await recv(ws))["type"] == "connected"
            replayed = await events(ws, 2)
            pacer.release(EVENTS - 5)
            later = await rest_of_turn(ws)
        assert_whole_turn(seen + replayed + later)

    serve_embedded(tmp_path / "ws", pacer.agent, scenario)


def test_replay_from_the_turn_file_holds_events_emitted_while_it_reads(tmp_path: Path) -> None:
    pacer = Pacer()

    async def scenario(gateway: Gateway) -> None:
        session_id, seen = await start_paced_turn(gateway, pacer, 2)
        pacer.release(3)
        live = gateway.hub.sessions[session_id]
        await until(lambda: live.event_seq == seen[-1]["seq"] + 3)
        live.ring = EventRing()  # forgets what came before: the replay reads the turn file
        loop = asyncio.get_running_loop()
        original = gateway.ops.read_turn_records
        reads = []

        def read_while_events_arrive(*args: Any, **kwargs: Any) -> Dict[str, Any]:
            before = live.event_seq
            loop.call_soon_threadsafe(pacer.release, 1)
            deadline = time.monotonic() + 5
            while live.event_seq == before and time.monotonic() < deadline:
                time.sleep(0.002)  # the agent emits its next event while this replay is being read
            reads.append(live.event_seq - before)
            return original(*args, **kwargs)

        gateway.ops.read_turn_records = read_while_events_arrive  # type: ignore[method-assign]
        async with connect(url(gateway, session_id, seen[-1]["seq"])) as ws:
            assert (await recv(ws))["type"] == "connected"
            replayed = await events(ws, 4)
            pacer.release(EVENTS - 6)
            later = await rest_of_turn(ws)
        assert reads == [1]
        assert_whole_turn(seen + replayed + later)

    serve_embedded(tmp_path / "ws", pacer.agent, scenario)


def test_reconnect_after_the_turn_ended_gets_its_end_from_the_files(tmp_path: Path) -> None:
    pacer = Pacer()

    async def scenario(gateway: Gateway) -> None:
        session_id, seen = await start_paced_turn(gateway, pacer, 4)
        pacer.release(EVENTS - 4)
        await until(lambda: session_id not in gateway.hub.sessions)  # ended, nobody attached: not live any more
        async with connect(url(gateway, session_id, seen[-1]["seq"])) as ws:
            assert (await recv(ws))["type"] == "connected"
            replayed = await events(ws, EVENTS - 4 + 1)
        assert_whole_turn(seen + replayed)

    serve_embedded(tmp_path / "ws", pacer.agent, scenario)


def test_replay_and_numbering_go_on_across_a_gateway_restart(tmp_path: Path) -> None:
    first_run: List[Dict[str, Any]] = []

    async def talk(gateway: Gateway, session_id: Optional[str]) -> Tuple[str, List[Dict[str, Any]]]:
        async with connect(url(gateway, session_id, 0 if session_id else None)) as ws:
            if session_id is None:
                await ws.send(execute("hello"))
                session_id = (await recv(ws))["data"]["session_id"]
                return session_id, await rest_of_turn(ws)
            assert (await recv(ws))["type"] == "connected"
            replayed = await events(ws, len(first_run))
            await ws.send(execute("again"))
            return session_id, replayed + await rest_of_turn(ws)

    session_id, frames = serve_embedded(tmp_path / "ws", None, lambda g: talk(g, None))
    first_run.extend(frames)
    assert [frame["type"] for frame in first_run] == ["status", "text", "query_complete"]
    _, frames = serve_embedded(tmp_path / "ws", None, lambda g: talk(g, session_id))
    assert frames[: len(first_run)] == first_run  # byte for byte what was sent live, timestamps included
    seqs = [frame["seq"] for frame in frames]
    # The second turn's query took one seq of its own: recorded, never sent.
    assert seqs == list(range(2, 2 + len(first_run))) + list(range(3 + len(first_run), 3 + len(frames)))


def test_replay_past_its_limit_says_what_was_lost_and_sends_the_newest(tmp_path: Path) -> None:
    pacer = Pacer()

    async def scenario(gateway: Gateway) -> None:
        gateway.hub.replay_max_events = 2
        session_id, seen = await start_paced_turn(gateway, pacer, 1)
        pacer.release(5)
        live = gateway.hub.sessions[session_id]
        await until(lambda: live.event_seq == seen[-1]["seq"] + 5)
        async with connect(url(gateway, session_id, seen[-1]["seq"])) as ws:
            assert (await recv(ws))["type"] == "connected"
            notice = await recv(ws)
            replayed = await events(ws, 2)
        assert notice["type"] == "status" and notice["data"]["status"] == "replay_incomplete"
        lost = (notice["data"]["lost_from_seq"], notice["data"]["lost_to_seq"])
        assert lost == (seen[-1]["seq"] + 1, seen[-1]["seq"] + 3)
        assert f"/api/v1/ops/sessions/{session_id}/turns" in notice["data"]["detail"]
        assert [frame["data"]["text"] for frame in replayed] == ["e4", "e5"]
        pacer.release(EVENTS)

    serve_embedded(tmp_path / "ws", pacer.agent, scenario)


def test_last_seq_ahead_of_the_session_is_told_not_silently_ignored(tmp_path: Path) -> None:
    async def scenario(gateway: Gateway) -> Dict[str, Any]:
        async with connect(url(gateway)) as ws:
            await ws.send(execute("hi"))
            session_id = (await recv(ws))["data"]["session_id"]
            last = (await rest_of_turn(ws))[-1]["seq"]
        async with connect(url(gateway, session_id, last + 50)) as ws:
            assert (await recv(ws))["type"] == "connected"
            return await recv(ws)

    notice = serve_embedded(tmp_path / "ws", None, scenario)
    assert notice["data"]["status"] == "replay_incomplete"
    assert "ahead" in notice["data"]["detail"]


@pytest.mark.parametrize("value", ["-1", "abc", "1.5", "", "1" * 19])
def test_a_bad_last_seq_is_refused_before_the_upgrade(tmp_path: Path, value: str) -> None:
    async def scenario(gateway: Gateway) -> InvalidStatus:
        (tmp_path / "ws" / "s1").mkdir()
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url(gateway, "s1") + f"&last_seq={value}"):
                pass
        return refused.value

    refusal = serve_embedded(tmp_path / "ws", None, scenario)
    assert refusal.response.status_code == 400
    assert b"last_seq must be the seq of the last event received" in refusal.response.body


def test_last_seq_without_a_session_is_refused(tmp_path: Path) -> None:
    async def scenario(gateway: Gateway) -> InvalidStatus:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url(gateway, None, 3)):
                pass
        return refused.value

    refusal = serve_embedded(tmp_path / "ws", None, scenario)
    assert refusal.response.status_code == 400
    assert b"last_seq needs a session" in refusal.response.body


def test_every_event_frame_of_a_turn_carries_its_seq_and_keeps_ua_s_fields(tmp_path: Path) -> None:
    async def scenario(gateway: Gateway) -> List[Dict[str, Any]]:
        async with connect(url(gateway)) as ws:
            await ws.send(execute("hi"))
            return await recv_until(ws, "query_complete", 10)

    frames = serve_embedded(tmp_path / "ws", None, scenario)
    assert [frame["type"] for frame in frames] == ["connected", "status", "text", "query_complete"]
    assert "seq" not in frames[0]
    for frame in frames[1:]:
        assert set(frame) == {"seq", "type", "data", "timestamp"}
    assert [frame["seq"] for frame in frames[1:]] == [2, 3, 4]  # 1 is the turn's query, recorded only


def test_events_missing_from_the_files_are_reported_not_skipped_in_silence(tmp_path: Path) -> None:
    async def scenario(gateway: Gateway) -> Tuple[int, List[Dict[str, Any]]]:
        async with connect(url(gateway)) as ws:
            await ws.send(execute("hi"))
            session_id = (await recv(ws))["data"]["session_id"]
            last = (await rest_of_turn(ws))[-1]["seq"]
        await until(lambda: session_id not in gateway.hub.sessions)
        await gateway.hub.writer.flushed(session_id)
        for transcript in (tmp_path / "ws" / session_id / "turns").iterdir():
            transcript.unlink()  # what a careless clean-up does
        async with connect(url(gateway, session_id, 0)) as ws:
            assert (await recv(ws))["type"] == "connected"
            return last, [await recv(ws)]

    last, [notice] = serve_embedded(tmp_path / "ws", None, scenario)
    assert notice["data"]["status"] == "replay_incomplete"
    assert (notice["data"]["lost_from_seq"], notice["data"]["lost_to_seq"]) == (1, last)

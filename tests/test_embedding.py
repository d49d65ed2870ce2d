"""PROTOCOL.md §6: ``Gateway(..., agent=...)`` runs an embedded async agent, in-process, over real sockets."""

from __future__ import annotations

import asyncio
import json

from websockets.asyncio.client import connect

from conftest import serve_embedded
from ua_gateway import AgentTurn, Gateway


async def run_turn(gateway: Gateway, text: str, follow_up=None):
    async with connect(f"ws://127.0.0.1:{gateway.port}/ws/agent") as ws:
        await ws.send(json.dumps({"type": "execute", "data": {"user_input": text}}))
        frames = []
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
            frames.append(frame)
            if frame["type"] == "input_required" and follow_up is not None:
                await ws.send(json.dumps({"type": "input_response", "data": follow_up}))
            if frame["type"] == "query_complete":
                return frames


def serve_and(agent, scenario, tmp_path):
    return serve_embedded(tmp_path / "ws", agent, scenario)


def test_embedded_agent_events_reach_the_client(tmp_path):
    async def shout(turn: AgentTurn) -> None:
        turn.emit("thinking", {"text": "hmm"})
        turn.emit("text", {"text": turn.user_input.upper()})
        turn.log("raw line")

    frames = serve_and(shout, lambda g: run_turn(g, "quiet please"), tmp_path)
    assert [f["type"] for f in frames] == ["connected", "thinking", "text", "query_complete"]
    assert frames[2]["data"]["text"] == "QUIET PLEASE"
    assert frames[-1]["data"]["completed"] is True
    session = frames[0]["data"]["session_id"]
    assert (tmp_path / "ws" / session / "run.log").read_text() == "raw line\n"


def test_embedded_agent_can_ask_for_input(tmp_path):
    async def asker(turn: AgentTurn) -> None:
        turn.emit("input_required", {"input_id": "q", "prompt": "colour?"})
        answer = await turn.next_input()
        turn.emit("text", {"text": f"{answer['input_id']}={answer['response']}"})

    frames = serve_and(asker, lambda g: run_turn(g, "go", {"input_id": "q", "response": "blue"}), tmp_path)
    assert next(f for f in frames if f["type"] == "text")["data"]["text"] == "q=blue"


def test_embedded_agent_that_raises_gives_an_error_and_the_gateway_keeps_serving(tmp_path):
    async def broken(turn: AgentTurn) -> None:
        if turn.user_input == "boom":
            raise RuntimeError("kaput")
        turn.emit("text", {"text": "fine"})

    async def scenario(gateway):
        failed = await run_turn(gateway, "boom")
        healthy = await run_turn(gateway, "again")
        return failed, healthy

    failed, healthy = serve_and(broken, scenario, tmp_path)
    error = next(f for f in failed if f["type"] == "error")
    assert "kaput" in error["data"]["message"]
    assert failed[-1]["data"]["completed"] is False
    assert healthy[-1]["data"]["completed"] is True


def test_agent_events_of_reserved_or_invalid_types_are_not_forwarded(tmp_path):
    async def rogue(turn: AgentTurn) -> None:
        turn.emit("query_complete", {"completed": True})
        turn.emit("Not A Type", {})
        turn.emit("text", "plain string data")

    frames = serve_and(rogue, lambda g: run_turn(g, "x"), tmp_path)
    assert [f["type"] for f in frames] == ["connected", "text", "query_complete"]
    assert frames[1]["data"] == {"value": "plain string data"}

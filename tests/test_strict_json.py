"""JSON from clients and agents is strict RFC 8259 (README, agent sessions): no NaN or Infinity, no
number that overflows, at most MAX_JSON_DEPTH levels; what the gateway accepts it can encode again."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets

from conftest import wait_for
from uagw.limits import MAX_JSON_DEPTH
from uagw.text import loads_json


@pytest.mark.parametrize("text", ['{"a": NaN}', '{"a": Infinity}', '{"a": -Infinity}', '{"a": 1e999}',
                                  "[" * 101 + "]" * 101, "[" * 5000])
def test_loads_json_refuses_what_no_strict_parser_reads(text):
    with pytest.raises(ValueError):
        loads_json(text)


def test_loads_json_accepts_the_deepest_allowed_nesting_and_ordinary_numbers():
    deepest = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert loads_json(deepest) is not None
    assert loads_json('{"a": 1e308, "b": -2.5, "c": 12345678901234567890}')["c"] == 12345678901234567890


async def exchange(url: str, messages) -> list:
    frames = []
    async with websockets.connect(url, open_timeout=5) as ws:
        for message in messages:
            await ws.send(message)
            frames.append(json.loads(await asyncio.wait_for(ws.recv(), 5)))
    return frames


def test_a_client_message_with_nan_or_deep_nesting_gets_an_error_and_the_socket_stays(gateway):
    gateway.make_session("strict-json")
    url = f"{gateway.ws_url}/api/v1/sessions/strict-json/stream"
    deep = '{"type": "input_response", "data": {"response": ' + "[" * 978 + "]" * 978 + "}}"
    nan = '{"type": "execute", "data": {"user_input": "x", "metadata": {"v": NaN}}}'

    async def scenario():
        async with websockets.connect(url, open_timeout=5) as ws:
            connected = json.loads(await ws.recv())
            answers = []
            for message in (deep, nan, '{"type": "ping"}'):
                await ws.send(message)
                answers.append(json.loads(await asyncio.wait_for(ws.recv(), 5)))
            return connected, answers

    connected, answers = asyncio.run(scenario())
    assert connected["type"] == "connected"
    assert [a["type"] for a in answers] == ["error", "error", "pong"]
    assert "nested deeper" in answers[0]["data"]["message"] and "NaN" in answers[1]["data"]["message"]


def test_an_agent_line_with_nan_goes_to_run_log_not_to_clients(start_gateway, tmp_path):
    agent = tmp_path / "nan_agent.py"
    agent.write_text("import sys\nsys.stdin.readline()\n"
                     "print('{\"type\": \"text\", \"data\": {\"text\": \"ok\", \"v\": NaN}}', flush=True)\n")
    gateway = start_gateway("--agent-cmd", f"python3 {agent}")
    gateway.make_session("nan-agent")

    async def scenario():
        frames = []
        async with websockets.connect(f"{gateway.ws_url}/api/v1/sessions/nan-agent/stream", open_timeout=5) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "execute", "data": {"user_input": "go"}}))
            while True:
                text = await asyncio.wait_for(ws.recv(), 10)
                assert "NaN" not in text
                frames.append(json.loads(text))
                if frames[-1]["type"] == "query_complete":
                    return frames

    frames = asyncio.run(scenario())
    assert "text" not in [f["type"] for f in frames]
    run_log = gateway.workspaces / "nan-agent" / "run.log"
    # journal and run.log lines are written in batches
    assert wait_for(lambda: run_log.exists() and "NaN" in run_log.read_text(), interval=0.02)


@pytest.mark.parametrize("text", ['{"a": "\\ud800x"}', '{"\\udc00": 1}', '["\\uDBFF"]'])
def test_loads_json_refuses_lone_surrogates(text):
    with pytest.raises(ValueError, match="surrogate"):
        loads_json(text)


def test_loads_json_keeps_escaped_surrogate_pairs():
    assert loads_json('{"a": "\\ud83d\\ude00"}') == {"a": "\U0001F600"}

"""The session-change hook (uagw/changes.py): every change the gateway makes to a session is announced
once, in order, to every observer, through a real embedded gateway driven over real sockets."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any, Dict, List, Tuple

import websockets

from conftest import serve_embedded
from uagw.changes import ChangeKind, Changes


def _call(url: str, method: str = "GET", body: Any = None) -> Dict[str, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


async def _in_thread(*args: Any, **kwargs: Any) -> Dict[str, Any]:
    return await asyncio.get_running_loop().run_in_executor(None, lambda: _call(*args, **kwargs))


def test_each_change_the_gateway_makes_is_announced_once_in_order(tmp_path):
    seen: List[Tuple[str, str, Dict[str, Any]]] = []

    async def agent(turn: Any) -> None:
        turn.emit("text", {"text": "hi"})

    async def scenario(gateway: Any) -> None:
        gateway.changes.subscribe(lambda kind, session_id, fields: seen.append((kind.value, session_id, fields)))
        base = gateway.url
        await _in_thread(f"{base}/api/v1/sessions", "POST", {"session_id": "s1"})
        await _in_thread(f"{base}/api/v1/sessions", "POST", {"session_id": "s1"})  # a resume creates nothing
        async with websockets.connect(f"{base.replace('http', 'ws')}/api/v1/sessions/s1/stream") as ws:
            await ws.recv()  # connected
            await ws.send(json.dumps({"type": "query", "data": {"text": "go"}}))
            while json.loads(await ws.recv())["type"] != "query_complete":
                pass
        await asyncio.sleep(0.05)  # the close reaches the hub
        await _in_thread(f"{base}/api/v1/ops/sessions/s1", "PATCH", {"description": "d"})
        await _in_thread(f"{base}/api/v1/ops/sessions/s1/compact", "POST", {})
        await _in_thread(f"{base}/api/v1/ops/sessions/s1/reset", "POST", {})
        await _in_thread(f"{base}/api/v1/ops/sessions/s1/archive", "POST", {})
        await _in_thread(f"{base}/api/v1/ops/sessions/s1?confirm=true", "DELETE")

    serve_embedded(tmp_path, agent, scenario)
    kinds = [kind for kind, session_id, _ in seen]
    assert kinds == ["created", "connections", "turn_started", "turn_finished", "connections", "updated",
                     "compacted", "reset", "archived", "deleted"]
    assert all(session_id == "s1" for _, session_id, _ in seen)
    finished = seen[3][2]
    assert finished["completed"] is True and finished["cancelled"] is False and finished["turn_id"]
    assert seen[1][2] == {"connections": 1} and seen[4][2] == {"connections": 0}


def test_an_observer_that_raises_does_not_stop_the_others(capsys):
    changes = Changes()
    seen: List[str] = []

    def broken(kind: ChangeKind, session_id: str, fields: Dict[str, Any]) -> None:
        raise RuntimeError("bug in a view")

    changes.subscribe(broken)
    unsubscribe = changes.subscribe(lambda kind, session_id, fields: seen.append(session_id))
    changes.publish(ChangeKind.CREATED, "a")
    changes.publish(ChangeKind.CREATED, "b")
    unsubscribe()
    changes.publish(ChangeKind.CREATED, "c")
    assert seen == ["a", "b"]
    assert capsys.readouterr().err.count("observer failed") == 1  # reported once per kind of error

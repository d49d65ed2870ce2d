"""A hostile review of the live streams (issue 13, PROTOCOL.md §13): inputs and failures that broke them."""

from __future__ import annotations

import asyncio
import urllib.parse
from typing import Any, Awaitable, Optional

from conftest import RunningGateway
from sse import SseClient
from uagw.config import Config
from uagw.http11 import Request, Response, StreamingResponse
from uagw.server import Server


def test_an_event_id_with_non_ascii_digits_gets_a_reset_not_a_dead_stream(gateway: RunningGateway) -> None:
    # "²".isdigit() is True but int("²") raises: the id must be checked as ASCII digits (PROTOCOL.md §13.3).
    first = SseClient(gateway.host, gateway.port, "/api/v1/ops/events?last_event_id=0-1")
    _, event_id, _ = first.next_event()
    first.close()
    boot = (event_id or "").partition("-")[0]
    for number in ("\u00b2", "\u0661"):  # superscript two; Arabic-Indic one (int() would take it as 1)
        query = urllib.parse.quote(f"{boot}-{number}")
        client = SseClient(gateway.host, gateway.port, f"/api/v1/ops/events?last_event_id={query}", timeout=3.0)
        name, _, data = client.next_event(timeout=3.0)
        assert name == "reset" and "list the sessions again" in data["reason"]
        client.close()


class _Failing:
    """A stream source that sends one chunk, then fails as a bug in a source would."""

    def __init__(self) -> None:
        self.closed = False
        self.sent = False

    def __aiter__(self) -> "_Failing":
        return self

    async def __anext__(self) -> bytes:
        if not self.sent:
            self.sent = True
            return b"data: one\n\n"
        raise ValueError("a bug in the source")

    async def aclose(self) -> None:
        self.closed = True


class _App:
    log = None
    fd_budget = None

    def __init__(self, source: Any) -> None:
        self.source = source

    def dispatch(self, request: Request) -> Awaitable[Response]:
        return self._answer()  # a stream is always an awaitable answer, as Application.dispatch gives it

    async def _answer(self) -> Response:
        return StreamingResponse(200, self.source, lambda: None)

    def refuse_before_body(self, request: Request) -> Optional[Response]:
        return None

    def descriptors_reserved(self) -> int:
        return 0


def test_a_stream_whose_source_fails_is_cut_not_left_hanging() -> None:
    # Before: the exception escaped _finish, the connection stayed BUSY and silent until the client gave up.
    source = _Failing()

    async def scenario() -> bytes:
        server = Server(_App(source), Config(host="127.0.0.1", port=0), lambda *args: None)  # type: ignore[arg-type]
        await server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /s HTTP/1.1\r\nHost: x\r\n\r\n")
        got = await asyncio.wait_for(reader.read(), 3.0)  # b"" at EOF: the gateway closed the connection
        writer.close()
        server.stop_accepting()
        await server.drain(0)
        return got

    got = asyncio.run(scenario())
    assert b"data: one" in got and not got.endswith(b"0\r\n\r\n")  # cut: no zero chunk claims a complete answer
    assert source.closed

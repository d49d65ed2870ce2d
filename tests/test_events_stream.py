"""PROTOCOL.md §13.3: GET /api/v1/ops/events streams session changes; Last-Event-ID resumes them."""

from __future__ import annotations

from conftest import RunningGateway
from sse import SseClient


def events(gw: RunningGateway, **headers: str) -> SseClient:
    client = SseClient(gw.host, gw.port, "/api/v1/ops/events", headers=headers)
    assert client.status == 200
    return client


def of_session(session_id: str, count: int):  # noqa: ANN201
    return lambda got: len([e for e in got if e[2]["session_id"] == session_id]) >= count


def test_created_and_deleted_sessions_are_streamed_in_order(gateway: RunningGateway) -> None:
    client = events(gateway)
    assert gateway.post("/api/v1/sessions", {"session_id": "ev_order"}).status == 200
    assert gateway.delete("/api/v1/ops/sessions/ev_order?confirm=true").status == 200
    got = [e for e in client.events_until(of_session("ev_order", 2)) if e[2]["session_id"] == "ev_order"]
    assert [name for name, _, _ in got] == ["created", "deleted"]
    client.close()


def test_last_event_id_replays_exactly_the_missed_changes(gateway: RunningGateway) -> None:
    client = events(gateway)
    gateway.post("/api/v1/sessions", {"session_id": "ev_resume"})
    first = [e for e in client.events_until(of_session("ev_resume", 1))][-1]
    client.close()
    gateway.request("PATCH", "/api/v1/ops/sessions/ev_resume", {"description": "while away"})
    gateway.delete("/api/v1/ops/sessions/ev_resume?confirm=true")
    again = events(gateway, **{"Last-Event-ID": first[1]})
    got = [e for e in again.events_until(of_session("ev_resume", 2)) if e[2]["session_id"] == "ev_resume"]
    assert [name for name, _, _ in got] == ["updated", "deleted"]
    again.close()


def test_an_id_that_is_not_kept_gets_a_reset_event(gateway: RunningGateway) -> None:
    client = events(gateway, **{"Last-Event-ID": "0-5"})
    name, event_id, data = client.next_event()
    assert name == "reset" and "list the sessions again" in data["reason"] and event_id
    client.close()

"""A closed live stream (PROTOCOL.md §13) leaves nothing behind: its Subscription, its EventStream and,
once no follower is left, the file's LogWatcher are freed by reference counting when the stream ends,
not kept by a reference cycle until a full cyclic collection (which may be minutes away, while each
stalled follower's queue and connection held ~300 KiB).

The cyclic collector is off while these tests run, so anything that only a cycle collection would free
is still alive when they look."""

from __future__ import annotations

import asyncio
import gc
import socket
import struct
import weakref
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, List

import pytest

from conftest import serve_embedded

FOLLOWERS = 3  # more than one: the watcher must outlive all but the last
FREED_WITHIN = 2.0  # s for the server to notice the closed connections and end their streams


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.collect()  # start clean, then only reference counting frees anything
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


async def open_stream(port: int, path: str) -> "asyncio.StreamWriter":
    """A client that asks for ``path`` and reads the answer's head: the stream is being sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), FREED_WITHIN)
    assert head.startswith(b"HTTP/1.1 200"), head
    return writer


async def eventually(condition: Callable[[], bool]) -> bool:
    deadline = asyncio.get_running_loop().time() + FREED_WITHIN
    while not condition() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    return condition()


def live_sources(gateway: Any) -> List[Any]:
    return [conn.streaming.source for conn in gateway.server.connections if conn.streaming is not None]


async def close_all(writers: List["asyncio.StreamWriter"]) -> None:
    """Reset the connections, as a client that goes away does: a plain close (FIN) on an idle stream is
    noticed only at the next keep-alive write, STREAM_KEEPALIVE later."""
    for writer in writers:
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()
    for writer in writers:
        await writer.wait_closed()


Check = Callable[[Any, List["weakref.ref[Any]"], List["weakref.ref[Any]"]], Awaitable[None]]


def follow_then_close(tmp_path: Path, path: str, check: Check) -> None:
    """Open FOLLOWERS streams of ``path`` on an embedded gateway, take weak references to their sources
    and subscriptions and to the log watchers, close the streams and run ``check(gateway, streams,
    watchers)`` once the gateway counts no open stream."""
    workspaces = tmp_path / "workspaces"
    (workspaces / "leaky").mkdir(parents=True)
    (workspaces / "leaky" / "activity_journal.log").write_bytes(b"one\n")

    async def scenario(gateway: Any) -> None:
        writers = [await open_stream(gateway.port, path) for _ in range(FOLLOWERS)]
        assert await eventually(lambda: len(live_sources(gateway)) == FOLLOWERS)
        streams = [weakref.ref(source) for source in live_sources(gateway)]
        streams += [weakref.ref(source.subscription) for source in live_sources(gateway)]
        watchers = [weakref.ref(watcher) for watcher in gateway.log_watchers.watchers.values()]
        await close_all(writers)
        assert await eventually(lambda: gateway.stream_slots.open == 0)
        await check(gateway, streams, watchers)

    serve_embedded(workspaces, None, scenario)


async def streams_freed(gateway: Any, streams: List["weakref.ref[Any]"], watchers: List["weakref.ref[Any]"]) -> None:
    assert await eventually(lambda: all(ref() is None for ref in streams)), \
        f"{sum(ref() is not None for ref in streams)} of {len(streams)} EventStreams/Subscriptions outlived their streams"


async def watcher_freed(gateway: Any, streams: List["weakref.ref[Any]"], watchers: List["weakref.ref[Any]"]) -> None:
    assert len(watchers) == 1, "the followers of one file share one watcher"
    assert gateway.log_watchers.watchers == {}, "a file with no followers is no longer watched"
    assert await eventually(lambda: watchers[0]() is None), "the LogWatcher outlived its last follower"


def test_closed_log_followers_free_their_subscriptions_and_streams(tmp_path: Path, no_cyclic_gc: None) -> None:
    follow_then_close(tmp_path, "/api/v1/ops/sessions/leaky/preview?follow=true", streams_freed)


def test_closed_events_streams_free_their_subscriptions_and_streams(tmp_path: Path, no_cyclic_gc: None) -> None:
    follow_then_close(tmp_path, "/api/v1/ops/events", streams_freed)


def test_the_watcher_of_a_log_whose_last_follower_left_is_freed(tmp_path: Path, no_cyclic_gc: None) -> None:
    follow_then_close(tmp_path, "/api/v1/ops/logs/tail?session_id=leaky&follow=true", watcher_freed)

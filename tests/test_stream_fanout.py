"""The fan-out of live stream events (PROTOCOL.md §13; uagw/streams.py): a follower that keeps up gets
each event by one direct write of bytes framed once for all; one that cannot take it now gets it queued,
in order, and every event exactly once."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, List, Tuple

from uagw.streams import (APPEND_COALESCE, APPEND_COALESCE_MAX, KEEPALIVE, EventStream, Subscription,
                          coalesce_delay, frame_chunk, sse_event)

KEEPALIVE_S = 0.2  # the keep-alive interval of these streams: long against the loop turns the tests take


class Connection:
    """A stream's connection as the server's ``direct`` sink sees it: takes a chunk unless ``paused``."""

    def __init__(self) -> None:
        self.paused = False
        self.wire: List[bytes] = []  # what went out, in order: direct chunks and those the task yielded
        self.direct: List[bytes] = []

    def sink(self, framed: bytes, size: int) -> bool:
        if self.paused:
            return False
        self.wire.append(framed)
        self.direct.append(framed)
        return True


async def no_catch_up(sub: Subscription) -> Any:
    sub.behind = False
    return
    yield  # an async generator that reads nothing: these subscriptions start in step


def open_stream(connection: Connection) -> Tuple[Subscription, EventStream, "asyncio.Task[None]"]:
    """A subscription at cursor "0", its stream attached to ``connection`` and iterated as the server does."""
    sub = Subscription("0")
    stream = EventStream(sub, no_catch_up, KEEPALIVE_S, lambda: None)
    stream.attach(connection.sink)

    async def serve() -> None:
        async for chunk in stream:
            connection.wire.append(frame_chunk(chunk))
            while connection.paused:
                await asyncio.sleep(0.001)

    return sub, stream, asyncio.get_running_loop().create_task(serve())


async def close(stream: EventStream, task: "asyncio.Task[None]") -> None:
    task.cancel()  # the connection went away, as the server cancels a stream's task
    await asyncio.gather(task, return_exceptions=True)
    await stream.aclose()


async def settle() -> None:
    """Let every stream task run until it waits again (a few loop turns; nothing here sleeps)."""
    for _ in range(10):
        await asyncio.sleep(0)


def event(n: int) -> bytes:
    return sse_event("lines", {"lines": [f"line {n}"], "truncated": False}, str(n))


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 10))


def test_200_followers_of_one_batch_are_written_the_identical_bytes_object_once_each() -> None:
    async def main() -> None:
        connections = [Connection() for _ in range(200)]
        streams = [open_stream(c) for c in connections]
        await settle()
        payload = event(1)
        framed = frame_chunk(payload)
        for sub, _, _ in streams:
            sub.offer(payload, "0", "1", framed)
        assert all(len(c.direct) == 1 and c.direct[0] is framed for c in connections)
        assert all(sub.cursor == "1" and not sub.queue and not sub.wake.is_set() for sub, _, _ in streams)
        for _, stream, task in streams:
            await close(stream, task)
    run(main)


def test_a_follower_that_cannot_take_a_batch_gets_it_and_the_next_ones_queued_in_order() -> None:
    async def main() -> None:
        connection = Connection()
        sub, stream, task = open_stream(connection)
        await settle()
        sub.offer(event(1), "0", "1")
        connection.paused = True  # its send buffer is full
        sub.offer(event(2), "1", "2")
        connection.paused = False  # it drained, but event 2 is still queued: 3 must wait behind it
        sub.offer(event(3), "2", "3")
        await settle()
        assert connection.wire[1:] == [frame_chunk(event(n)) for n in (1, 2, 3)]  # after the connected comment
        assert sub.cursor == "3"
        await close(stream, task)
    run(main)


def test_a_follower_written_directly_gets_no_keepalive_comment_while_events_flow() -> None:
    async def main() -> None:
        connection = Connection()
        sub, stream, task = open_stream(connection)
        await settle()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2.5 * KEEPALIVE_S
        n = 0
        while loop.time() < deadline:
            sub.offer(event(n + 1), str(n), str(n + 1))
            n += 1
            await asyncio.sleep(KEEPALIVE_S / 10)
        assert frame_chunk(KEEPALIVE) not in connection.wire
        assert len(connection.direct) == n
        await close(stream, task)
    run(main)


def test_the_gateways_appends_are_gathered_longer_the_more_followers_wait() -> None:
    assert coalesce_delay(1) < 2 * APPEND_COALESCE
    assert coalesce_delay(1) < coalesce_delay(50) < coalesce_delay(200) == APPEND_COALESCE_MAX

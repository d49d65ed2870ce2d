"""WebSocket close reasons fit a close frame: at most 123 bytes of UTF-8 (RFC 6455 §5.5).

A reason cut by characters (``reason[:120]``) is up to 480 bytes when it is not ASCII, and websockets
refuses to send it (``ProtocolError: control frame too long``): the close 1011 of an attach to a
gateway whose workspaces root is missing never went out when the root's path was long and not ASCII.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State
from websockets.server import ServerProtocol

from conftest import start_watched
from uagw.limits import WS_MAX_CLOSE_REASON
from uagw.websocket import close_reason

# One character of each UTF-8 length, the last one a lone surrogate as an undecodable file name gives.
WIDE = ["a", "é", "ワ", "😀", "\udcff"]


@pytest.mark.parametrize("char", WIDE)
@pytest.mark.parametrize("length", [1, 30, 41, 42, 61, 62, 119, 120, 121, 123, 124, 500])
def test_close_reason_is_valid_utf8_of_at_most_123_bytes(char, length):
    reason = close_reason(char * length)

    assert len(reason.encode("utf-8")) <= WS_MAX_CLOSE_REASON


@pytest.mark.parametrize("char", WIDE[:4])
def test_a_cut_reason_keeps_whole_characters_and_says_it_was_cut(char):
    original = "root " + char * 200

    reason = close_reason(original)

    assert reason.endswith("...")
    assert original.startswith(reason[:-3])
    assert len(reason.encode("utf-8")) > WS_MAX_CLOSE_REASON - 3 - len(char.encode("utf-8"))


def test_a_reason_that_fits_is_unchanged():
    reason = "é" * 61 + "a"  # 123 bytes

    assert close_reason(reason) == reason


@pytest.mark.parametrize("char", WIDE)
def test_websockets_sends_every_cut_reason(char):
    protocol = ServerProtocol(state=State.OPEN)

    protocol.send_close(1011, close_reason(char * 300))

    frame = protocol.data_to_send()[0]
    assert frame[:2] == b"\x88" + bytes([len(frame) - 2]) and len(frame) - 2 <= 125


async def attach_close(url: str, session_id: str):
    async with connect(f"{url}/api/v1/sessions/{session_id}/stream", open_timeout=5, close_timeout=2) as ws:
        try:
            await asyncio.wait_for(ws.recv(), 5)
        except ConnectionClosed as closed:
            return closed.rcvd
    raise AssertionError("the gateway sent a frame instead of closing")


def test_attach_to_a_missing_long_non_ascii_root_closes_with_1011_and_the_cut_detail(tmp_path):
    root = tmp_path.joinpath(*["ワークスペース"] * 6)  # 6 x 21 bytes: a name each within NAME_MAX
    root.parent.mkdir(parents=True)
    gateway = start_watched(root)
    try:
        gateway.make_session("kept")
        os.rename(root, tmp_path / "moved-away")

        received = asyncio.run(attach_close(gateway.ws_url, "kept"))

        assert received is not None and received.code == 1011
        assert received.reason.startswith(f"Workspaces root {Path(root)}"[:20])
        assert received.reason.endswith("...")
        assert gateway.tracebacks() == ""
    finally:
        gateway.stop()

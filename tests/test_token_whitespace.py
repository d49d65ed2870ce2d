"""PROTOCOL.md §4: a Bearer credential loses only RFC 9110 optional whitespace (SP, HTAB) around it.

str.strip() would also drop NBSP (0xA0) and NEL (0x85), which a latin-1 header value can carry: a token
with them around it is a different token, and must be refused.
"""

from __future__ import annotations

import pytest

from conftest import parse_responses

TOKEN = "correct-horse-battery-staple"


@pytest.fixture
def secured(start_gateway):
    return start_gateway(env={"UA_OPS_TOKEN": TOKEN})


def sessions_status(gateway, authorization: bytes) -> int:
    request = (b"GET /api/v1/ops/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
               b"Authorization: " + authorization + b"\r\n\r\n")
    return parse_responses(gateway.raw(request))[0][0]


@pytest.mark.parametrize("credential", [
    TOKEN.encode() + b"\xa0",
    b"\xa0" + TOKEN.encode(),
    TOKEN.encode() + b"\x85",
], ids=["trailing NBSP", "leading NBSP", "trailing NEL"])
def test_a_token_with_non_ows_whitespace_around_it_is_refused(secured, credential):
    assert sessions_status(secured, b"Bearer " + credential) == 401


def test_the_token_itself_is_accepted_with_ows_around_it(secured):
    assert sessions_status(secured, b"Bearer \t" + TOKEN.encode() + b" \t") == 200

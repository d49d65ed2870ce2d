"""Framing a front proxy could read differently is refused with 400 and a close (docs/SECURITY.md,
"Parser strictness"). In-process: RequestParser is Sans-I/O, so these feed it bytes."""

from __future__ import annotations

import socket

import pytest

from conftest import assert_refused, parse_stream

HEAD = b"POST /api/v1/sessions HTTP/1.1\r\nHost: x\r\n"


REFUSED = {
    "bare LF in a chunk extension": HEAD + b"Transfer-Encoding: chunked\r\n\r\n2;\nxx\r\nab\r\n0\r\n\r\n",
    "NUL in a chunk extension": HEAD + b"Transfer-Encoding: chunked\r\n\r\n2;a\x00\r\nab\r\n0\r\n\r\n",
    "control character in a chunk extension": HEAD + b"Transfer-Encoding: chunked\r\n\r\n2;a=\x01\r\nab\r\n0\r\n\r\n",
    "bare CR in a chunk size line": HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r;x\r\nab\r\n0\r\n\r\n",
    "space before the chunk size": HEAD + b"Transfer-Encoding: chunked\r\n\r\n 2\r\nab\r\n0\r\n\r\n",
    "extension without a name": HEAD + b"Transfer-Encoding: chunked\r\n\r\n2;=x\r\nab\r\n0\r\n\r\n",
    "unterminated quoted extension": HEAD + b"Transfer-Encoding: chunked\r\n\r\n2;a=\"x\r\nab\r\n0\r\n\r\n",
    "bare LF in a trailer": HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\nX-T: 1\nGET / HTTP/1.1\r\n\r\n",
    "NUL in a trailer": HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\nX-T: \x00\r\n\r\n",
    "trailer without a colon": HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\nnonsense\r\n\r\n",
    "folded trailer": HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\nX-T: 1\r\n folded\r\n\r\n",
    "empty Transfer-Encoding beside Content-Length": HEAD + b"Transfer-Encoding: \r\nContent-Length: 2\r\n\r\nab",
    "Transfer-Encoding of a lone comma": HEAD + b"Transfer-Encoding: ,\r\nContent-Length: 2\r\n\r\nab",
    "Transfer-Encoding with an empty element": HEAD + b"Transfer-Encoding: chunked,\r\n\r\n0\r\n\r\n",
    "empty Content-Length": HEAD + b"Content-Length: \r\n\r\n",
    "Content-Length of ,2": HEAD + b"Content-Length: ,2\r\n\r\nab",
    "Content-Length of 2,": HEAD + b"Content-Length: 2,\r\n\r\nab",
    "Content-Length list of equal values": HEAD + b"Content-Length: 2, 2\r\n\r\nab",
    "repeated Content-Length spelt differently": HEAD + b"Content-Length: 2\r\nContent-Length: 02\r\n\r\nab",
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_ambiguous_framing_is_400_and_closes(name):
    assert_refused(REFUSED[name])


@pytest.mark.parametrize("data,body", [
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\n2;name=value;q=\"a \\\" b\"\r\nab\r\n0\r\n\r\n", b"ab"),
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\n2 ; name = value\r\nab\r\n0\r\n\r\n", b"ab"),
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\nX-Checksum: abc\r\nX-B:\t1 \r\n\r\n", b"ab"),
    (HEAD + b"Content-Length: 2\r\nContent-Length: 2\r\n\r\nab", b"ab"),
])
def test_well_formed_framing_is_accepted(data, body):
    [request], error = parse_stream(data)
    assert error is None and request.body == body


def test_a_request_smuggled_in_a_chunk_extension_is_never_answered(gateway):
    smuggled = (HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
                b"2;\nGET /api/v1/ops/sessions HTTP/1.1\r\nHost: x\r\n\r\nab\r\n0\r\n\r\n")
    with socket.create_connection((gateway.host, gateway.port), timeout=5) as sock:
        sock.sendall(smuggled)
        answer = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert answer.count(b"HTTP/1.1 ") == 1

"""Property fuzzing, in process: the request parser, the router and the log-slice reader.

* ``RequestParser`` fed random bytes, or valid requests with structured mutations, in random chunk
  splits: the only outcomes are a ``Request``, None (more bytes needed) or an ``HttpError``. A valid
  request (or a pipeline of them) split anywhere parses exactly as it does in one piece. Every request
  it accepts, re-serialised with Content-Length framing, parses to the same request.
* ``Gateway.dispatch`` with random methods, paths, queries and bodies: never a 5xx.
* ``read_log_slice`` on random files with random cursors, limits and file changes: a slice or
  ``InvalidCursor``/``InvalidArgument``, nothing else.

In CI (``CI`` set) the examples are derandomized, so a run is reproducible; elsewhere each run explores
new ones. Each test stays within a few seconds.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import ops_service
import ua_gateway
from conftest import parse_stream
from ops_service import InvalidArgument, InvalidCursor, decode_cursor, read_log_slice
from ua_gateway import HttpError, Request, RequestParser
from uagw.http11 import error_response
from uagw.limits import MAX_HEAD_BYTES
from uagw.routing import ops_error_response

FUZZ = settings(
    max_examples=400,
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
PARSER_FUZZ = settings(FUZZ, max_examples=1000)  # the parser alone is cheap: explore more


# -- the request parser ------------------------------------------------------------------------------------


def feed_in_chunks(data: bytes, cuts: List[int]) -> Tuple[List[Request], Optional[HttpError]]:
    """``parse_stream``, checking the error that ended the stream: a 4xx (or 505) with a detail, that closes
    (the parser has no error after which the stream could go on)."""
    requests, error = parse_stream(data, cuts)
    if error is not None:
        assert 400 <= error.status < 600 and error.detail
        assert error.status < 500 or error.status == 505, error.detail
        assert error.close, error.detail
    return requests, error


def shape(request: Request) -> tuple:
    return (request.method, request.target, request.version, request.headers, request.body, request.keep_alive,
            request.upgrade)


TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~"
tokens = st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=12)
field_values = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"),
                       max_size=40).map(lambda v: v.strip(" \t"))
paths = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=60).map(lambda p: "/" + p)


@st.composite
def valid_requests(draw: Any) -> bytes:
    method = draw(st.sampled_from(["GET", "POST", "DELETE", "PUT", "OPTIONS"]) | tokens)
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0"]))
    headers = [("Host", "localhost")] if version == "HTTP/1.1" else []
    skip = {"host", "content-length", "transfer-encoding", "expect", "connection"}
    for name, value in draw(st.lists(st.tuples(tokens, field_values), max_size=6)):
        if name.lower() not in skip:
            headers.append((name, value))
    body = draw(st.binary(max_size=300))
    framing = draw(st.sampled_from(["length", "chunked"] if version == "HTTP/1.1" else ["length"]))
    if framing == "length":
        headers.append(("Content-Length", str(len(body))))
        encoded = body
    else:
        headers.append(("Transfer-Encoding", "chunked"))
        sizes = draw(st.lists(st.integers(1, 64), max_size=8))
        encoded, pos = b"", 0
        for size in sizes:
            piece = body[pos:pos + size]
            pos += len(piece)
            if piece:
                encoded += b"%x\r\n%s\r\n" % (len(piece), piece)
        if pos < len(body):
            encoded += b"%x\r\n%s\r\n" % (len(body) - pos, body[pos:])
        encoded += b"0\r\n" + (b"X-Trailer: 1\r\n" if draw(st.booleans()) else b"") + b"\r\n"
    head = f"{method} {draw(paths)} {version}\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers) + "\r\n"
    return head.encode("latin-1") + encoded


MUTATIONS = ("insert", "delete", "replace", "duplicate_line", "drop_cr", "swap_digits", "nul", "truncate",
             "confusable", "header_value")
# Bytes that look like digits, separators or blanks to one parser and not to another.
CONFUSABLES = [b"\xb2", b"\xb3", b"\xb9", b"\xbc", b"\xa0", b"\x0b", b"\x0c", b"\x1c", b"\x85", b"+", b"-", b" ", b"\t",
               b"0x", b"\xd9\xa3", b",", b";"]
INTERESTING_VALUES = [b"chunked", b"chunked, chunked", b"gzip, chunked", b"0", b"-0", b"00", b"1, 1", b"1,2",
                      b"close", b"upgrade", b"websocket", b"100-continue", b"", b" ", b"\xb2", b"1" * 30]


@st.composite
def mutated_requests(draw: Any) -> bytes:
    data = bytearray(draw(valid_requests()))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(MUTATIONS))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8) | st.sampled_from([b"\r\n", b":", b" ", b"\n", b"\r", b";", b",", b"\xb2"]))
        elif kind == "delete" and data:
            del data[pos:pos + draw(st.integers(1, 8))]
        elif kind == "replace" and data:
            data[pos] = draw(st.integers(0, 255))
        elif kind == "duplicate_line":
            lines = bytes(data).split(b"\r\n")
            i = draw(st.integers(0, len(lines) - 1))
            lines.insert(i, lines[i])
            data = bytearray(b"\r\n".join(lines))
        elif kind == "drop_cr":
            data = bytearray(bytes(data).replace(b"\r\n", b"\n", draw(st.integers(1, 3))))
        elif kind == "swap_digits":
            data = bytearray(bytes(data).replace(b"1", b"9", 1).replace(b"0", b"f", 1))
        elif kind == "nul":
            data[pos:pos] = b"\x00"
        elif kind == "confusable":
            digits = [i for i, byte in enumerate(data) if 0x30 <= byte <= 0x39 or byte in b" ,\t"]
            if digits:
                i = draw(st.sampled_from(digits))
                data[i:i + 1] = draw(st.sampled_from(CONFUSABLES))
        elif kind == "header_value":
            lines = bytes(data).split(b"\r\n")
            headed = [i for i, line in enumerate(lines) if b": " in line]
            if headed:
                i = draw(st.sampled_from(headed))
                name = draw(st.sampled_from([lines[i].split(b":")[0], b"Content-Length", b"Transfer-Encoding",
                                             b"Connection", b"Expect", b"Host", b"Upgrade"]))
                lines[i] = name + b": " + draw(st.sampled_from(INTERESTING_VALUES))
                data = bytearray(b"\r\n".join(lines))
        elif kind == "truncate":
            del data[pos:]
    return bytes(data)


cut_lists = st.lists(st.integers(0, 2000), max_size=12)


@PARSER_FUZZ
@given(data=st.binary(max_size=2000), cuts=cut_lists)
def test_parser_on_random_bytes_only_parses_or_raises_http_error(data, cuts):
    feed_in_chunks(data, cuts)


@PARSER_FUZZ
@given(data=mutated_requests(), cuts=cut_lists)
def test_parser_on_mutated_requests_only_parses_or_raises_http_error(data, cuts):
    feed_in_chunks(data, cuts)


framing_values = (
    st.text(alphabet="0123456789\xb2\xb3\xb9\xbc", min_size=1, max_size=6)  # digits, and latin-1 "digits"
    | st.text(alphabet="0123456789abcdefABCDEF,; \t-+x\x0b\x0c\x1c\x85\xa0", max_size=10)  # numbers, separators, blanks
    | st.lists(st.sampled_from(["chunked", "gzip", "identity", "Chunked", "\x0bchunked", "chunked\xa0", ""]),
               max_size=3).map(", ".join)
)


@PARSER_FUZZ
@given(name=st.sampled_from(["Content-Length", "Transfer-Encoding", "content-length", "Transfer-encoding"]),
       values=st.lists(framing_values, min_size=1, max_size=3), size_line=framing_values, cuts=cut_lists)
def test_parser_on_any_framing_header_value_only_parses_or_raises_http_error(name, values, size_line, cuts):
    head = "POST /x HTTP/1.1\r\nHost: h\r\n" + "".join(f"{name}: {value}\r\n" for value in values) + "\r\n"
    body = f"{size_line}\r\nabc\r\n0\r\n\r\n"
    feed_in_chunks((head + body).encode("latin-1"), cuts)


@FUZZ
@given(pipeline=st.lists(valid_requests(), min_size=1, max_size=4), cuts=cut_lists)
def test_valid_requests_split_anywhere_parse_as_in_one_piece(pipeline, cuts):
    data = b"".join(pipeline)
    whole, error = feed_in_chunks(data, [])
    assert error is None, error.detail
    assert len(whole) == len(pipeline)
    split, error = feed_in_chunks(data, cuts)
    assert error is None, error.detail
    assert [shape(r) for r in split] == [shape(r) for r in whole]


FRAMING_HEADERS = ("content-length", "transfer-encoding")


def unframed(request: Request) -> tuple:
    """What a request means, whichever framing carried its body."""
    headers = [(name, value) for name, value in request.headers if name not in FRAMING_HEADERS]
    return (request.method, request.target, request.version, headers, request.body, request.keep_alive,
            request.upgrade)


def with_content_length(request: Request) -> bytes:
    """The request re-serialised as a well-behaved proxy would forward it: its body framed by Content-Length."""
    lines = [f"{request.method} {request.target} {request.version}"]
    lines += [f"{name}: {value}" for name, value in request.headers if name not in FRAMING_HEADERS]
    lines.append(f"Content-Length: {len(request.body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + request.body


@PARSER_FUZZ
@given(pipeline=st.lists(valid_requests() | mutated_requests(), min_size=1, max_size=3))
def test_every_accepted_request_reserialised_with_content_length_parses_to_the_same_request(pipeline):
    accepted, _ = feed_in_chunks(b"".join(pipeline), [])
    for request in accepted:
        again, error = feed_in_chunks(with_content_length(request), [])
        assert error is None, error.detail
        assert [unframed(r) for r in again] == [unframed(request)]


@PARSER_FUZZ
@given(st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=200))
def test_parser_buffers_at_most_the_head_limit_without_answering(pieces):
    parser = RequestParser()
    for piece in pieces:
        parser.feed(piece.replace(b"\r\n\r\n", b"").replace(b"\n\n", b""))
        try:
            parser.next_request()
        except HttpError:
            return
        assert parser.buffered <= MAX_HEAD_BYTES + 64


# -- the router and handlers, in process --------------------------------------------------------------------


@pytest.fixture(scope="module")
def inproc_gateway(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("fuzz-gw") / "ws"
    (root / "s1").mkdir(parents=True)
    (root / "s1" / "run.log").write_bytes(b"one\ntwo\n")
    gateway = ua_gateway.Gateway(ua_gateway.Config(workspaces=root))
    gateway.ops.ensure_root()
    loop = asyncio.new_event_loop()
    yield gateway, loop
    loop.close()
    gateway.executor.shutdown(wait=True)


segments = st.sampled_from(["api", "v1", "ops", "sessions", "s1", "preview", "reset", "compact", "logs", "tail",
                            "health", "stream", "ws", "agent", "console", "..", "%2e%2e", "%00", "%ff", ""]) | st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters="/?"), max_size=10)
query_values = st.sampled_from(["", "0", "-1", "1", "99999999999999999999", "true", "yes", "x", "%ff", "..",
                                "run.log", "activity_journal.log", "s1", "all", "archived"]) | st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters="&#"), max_size=12)
query_names = st.sampled_from(["status", "limit", "offset", "cursor", "max_bytes", "session_id", "file", "confirm",
                               "force", "user_id"])
bodies = st.sampled_from([b"", b"{}", b"[]", b"null", b'{"max_lines": 0}', b'{"clear_logs": false}',
                          b'{"user_id": "u"}', b'{"max_bytes": -1}', b"\xff", b'{"x": 1}']) | st.binary(max_size=40)


@FUZZ
@given(method=st.sampled_from(["GET", "POST", "DELETE", "PUT", "OPTIONS", "HEAD", "PATCH"]),
       parts=st.lists(segments, max_size=7), query=st.lists(st.tuples(query_names, query_values), max_size=4),
       body=bodies)
def test_dispatch_never_answers_5xx(inproc_gateway, method, parts, query, body):
    gateway, loop = inproc_gateway
    target = "/" + "/".join(parts)
    if query:
        target += "?" + "&".join(f"{name}={value}" for name, value in query)
    request = Request(method, target, "HTTP/1.1", [("host", "localhost")])
    request.body = body
    request.client = "127.0.0.1"
    assume(not (method == "DELETE" and "confirm=true" in target.lower()))  # keep the fixture's session
    result = gateway.dispatch(request)
    if not isinstance(result, ua_gateway.Response):
        try:
            result = loop.run_until_complete(result)
        except HttpError as error:
            result = error_response(error)
        except ops_service.OpsError as error:
            result = ops_error_response(error)
    assert result.status < 500, (target, result.status, result.body[:300])


# -- the log slice reader ----------------------------------------------------------------------------------

log_bytes = st.lists(st.sampled_from([b"a", b"line", b"\n", b"\r\n", b"\r", b"\xff", b"\xe2\x82", b"\xac", b"\x00",
                                      b"x" * 100, b"\n\n"]), max_size=60).map(b"".join)
limits = st.none() | st.integers(-5, 10**7) | st.sampled_from([0, 1, 2, 5000, 5001, 10**30, True, 1.5, "3", [1]])
raw_cursors = st.none() | st.sampled_from(["", "0", "-1", "x", "=" * 66, "A" * 66, "00000000000000000000"]) | \
    st.integers(-(2**70), 2**70) | st.text(max_size=80) | st.floats(allow_nan=True) | st.binary(max_size=10)


def check_slice(result: dict, size: int, limit: Any) -> None:
    assert set(result) == {"file", "cursor", "size", "lines", "truncated", "reset", "more"}
    assert result["size"] == size
    clamped = 200 if limit is None else max(1, min(5000, limit))
    assert len(result["lines"]) <= clamped
    assert all(isinstance(line, str) for line in result["lines"])
    decode_cursor(result["cursor"])


@pytest.fixture
def scratch() -> Any:
    directory = Path(tempfile.mkdtemp(prefix="fuzz-slice-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@FUZZ
@given(content=log_bytes, cursor=raw_cursors, limit=limits, max_bytes=limits)
def test_slice_of_random_file_and_arguments_is_a_slice_or_an_argument_error(scratch, content, cursor, limit, max_bytes):
    path = scratch / "run.log"
    path.write_bytes(content)
    try:
        result = read_log_slice(path, cursor, limit, max_bytes)
    except (InvalidCursor, InvalidArgument):
        return
    check_slice(result, len(content), limit)


CHANGES = ("append", "truncate", "replace", "remove", "grow_past", "none")


@FUZZ
@given(first=log_bytes, change=st.sampled_from(CHANGES), more=log_bytes, limit=st.none() | st.integers(1, 50),
       max_bytes=st.none() | st.integers(1, 400), flip=st.none() | st.integers(0, 65), tail=st.booleans())
def test_follow_after_any_change_or_edit_of_the_cursor_never_raises_anything_else(
    scratch, first, change, more, limit, max_bytes, flip, tail
):
    path = scratch / "run.log"
    path.write_bytes(first)
    cursor = read_log_slice(path, None if tail else "0", limit, max_bytes)["cursor"]
    if flip is not None and flip < len(cursor):
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        cursor = cursor[:flip] + alphabet[(alphabet.index(cursor[flip]) + 1) % 64] + cursor[flip + 1:]
    if change == "append":
        with path.open("ab") as handle:
            handle.write(more)
    elif change == "truncate":
        os.truncate(path, len(first) // 2)
    elif change == "replace":
        os.rename(path, scratch / "run.log.1")
        path.write_bytes(more)
    elif change == "remove":
        path.unlink()
    elif change == "grow_past":
        os.rename(path, scratch / "run.log.1")
        path.write_bytes(more + first + more)
    size = path.stat().st_size if path.exists() else 0
    try:
        result = read_log_slice(path, cursor, limit, max_bytes)
    except InvalidCursor:
        assert flip is not None, "a cursor the gateway issued was refused"
        return
    check_slice(result, size, limit)

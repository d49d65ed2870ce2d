"""RequestParser's framing strictness (issue 9 item 3), and a differential fuzz against h11.

* Chunk-size lines and trailer lines end in CRLF exactly; chunk extensions keep RFC 9112 §7.1.1's grammar;
  trailers keep field syntax; ``Transfer-Encoding`` and ``Content-Length`` are not lists with empty or
  repeated elements. Each violation is a 400 that closes the connection, checked in process by feeding
  bytes, and once over a real socket, where a request hidden behind a bare LF is never answered.
* The same byte streams (pipelines of requests with mutated framing headers, chunk syntax, whitespace,
  obs-fold, bare LF/CR, NUL, duplicated headers, TE+CL) go to our parser and to h11, a strict reference.
  Wherever we accept a request, h11 must accept the same request at the same boundary, with the same
  body, or the difference must be one of ``KNOWN_DIFFERENCES`` below, each with its reason. Where h11
  accepts what we refuse, we are the stricter one, which is allowed.

Deterministic (``derandomize=True``) and bounded, so a run is reproducible and takes seconds.
"""

from __future__ import annotations

import collections
import os
import re
from typing import Any, Callable, List, NamedTuple, Optional, Tuple

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import assert_refused, parse_responses
from test_fuzz import mutated_requests, valid_requests
from ua_gateway import HttpError, Request, RequestParser
from uagw.limits import MAX_HEAD_BYTES, MAX_HEADER_COUNT


CHUNKED_HEAD = b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
NEXT = b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n"


# -- chunk lines -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("line", [b"2;\nxx", b"2;a\n", b"2;a=b\nc"])
def test_chunk_line_with_a_bare_lf_is_400_and_closes(line):
    assert_refused(CHUNKED_HEAD + line + b"\r\nab\r\n0\r\n\r\n" + NEXT)


def test_chunk_line_with_a_bare_lf_is_refused_before_its_crlf_arrives():
    assert_refused(CHUNKED_HEAD + b"2;\nxx")


@pytest.mark.parametrize("extension", [
    b";", b";=b", b";a=", b";a b", b";a=b c", b";a=\x00", b";\x01", b";a=\x7f", b";a=b\r", b'; a="open',
    b';a="\x00"', b';a="x"y', b";a=b=c", b";a,b", b"\t", b" ", b" ;a ", b";a\t",
])
def test_chunk_extension_outside_the_rfc_grammar_is_400_and_closes(extension):
    assert_refused(CHUNKED_HEAD + b"2" + extension + b"\r\nab\r\n0\r\n\r\n" + NEXT)


@pytest.mark.parametrize("size", [b" 2", b"\t2", b"2 ", b"2\t"])
def test_chunk_size_with_whitespace_around_it_is_400_and_closes(size):
    assert_refused(CHUNKED_HEAD + size + b"\r\nab\r\n0\r\n\r\n" + NEXT)


@pytest.mark.parametrize("trailer", [
    b"X-T: a\nb", b"X-T: a\x00b", b"X-T: \x01", b"X-T: a\rb", b"no colon", b" folded: x", b"\tfolded",
    b"X T: 1", b"X-T : 1", b": v", b"X-\xff: 1",
])
def test_trailer_line_outside_field_syntax_is_400_and_closes(trailer):
    assert_refused(CHUNKED_HEAD + b"2\r\nab\r\n0\r\n" + trailer + b"\r\n\r\n" + NEXT)


def test_trailer_ending_in_a_bare_lf_is_400_and_closes():
    assert_refused(CHUNKED_HEAD + b"2\r\nab\r\n0\r\nX-T: 1\n\r\n" + NEXT)


def test_more_trailer_fields_than_header_fields_allowed_is_400_and_closes():
    trailers = b"".join(b"X-%d: 1\r\n" % i for i in range(MAX_HEADER_COUNT + 1))
    assert_refused(CHUNKED_HEAD + b"2\r\nab\r\n0\r\n" + trailers + b"\r\n" + NEXT)


# -- Transfer-Encoding and Content-Length ------------------------------------------------------------------


@pytest.mark.parametrize("value", [b"", b" ", b",", b"chunked,", b", chunked", b"chunked, ,"])
def test_transfer_encoding_that_is_empty_or_has_an_empty_element_is_400_and_closes(value):
    head = b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: " + value + b"\r\n\r\n"
    assert_refused(head + b"5\r\nhello\r\n0\r\n\r\n" + NEXT)


@pytest.mark.parametrize("value", [b"", b" ", b","])
def test_empty_transfer_encoding_beside_content_length_is_400_and_closes(value):
    head = b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: " + value + b"\r\nContent-Length: 5\r\n\r\n"
    assert_refused(head + b"hello" + NEXT)


@pytest.mark.parametrize("value", [b"", b" ", b",2", b"2,", b"2, 2", b"2,2", b",", b"2,,2"])
def test_content_length_that_is_not_one_decimal_number_is_400_and_closes(value):
    assert_refused(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: " + value + b"\r\n\r\nxx" + NEXT)


def test_repeated_content_length_lines_spelt_differently_are_400_and_close():
    assert_refused(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nContent-Length: 02\r\n\r\nxx" + NEXT)


# -- over a real socket ------------------------------------------------------------------------------------


def bare_lf_smuggling_stream(smuggled: bytes) -> bytes:
    """A chunked body that hides ``smuggled`` from a front end that ends chunk lines at a bare LF.

    Such a front end reads chunk ``2;`` (data ``AB``), then chunk ``NN`` whose data is ``0\\r\\n\\r\\n`` +
    ``smuggled``: one request. A parser that only ends lines at CRLF reads chunk ``2;\\nAB`` (data
    ``NN``), then the last chunk ``0``, and then ``smuggled`` as a second request of its own.
    """
    hidden = b"0\r\n\r\n" + smuggled
    assert 16 <= len(hidden) <= 255, "the hidden part's size must be two hex digits"
    return (b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"2;\nAB\r\n" + b"%02x\r\n" % len(hidden) + hidden + b"\r\n0\r\n\r\n")


def test_request_hidden_behind_a_bare_lf_in_a_chunk_line_is_never_answered(gateway):
    gateway.make_session("s-smuggle", {"run.log": b"keep me\n"})
    smuggled = b"DELETE /api/v1/ops/sessions/s-smuggle?confirm=true HTTP/1.1\r\nHost: x\r\n\r\n"
    responses = parse_responses(gateway.raw(bare_lf_smuggling_stream(smuggled)))
    assert [status for status, _, _ in responses] == [400]
    assert responses[0][1]["connection"] == "close"
    assert (gateway.workspaces / "s-smuggle" / "run.log").is_file()


# -- differential fuzzing against h11 ----------------------------------------------------------------------


class Parsed(NamedTuple):
    """One request as both parsers report it: framing headers are compared through the body they frame."""

    method: str
    target: str
    headers: Tuple[Tuple[str, str], ...]
    body: bytes


class Outcome(NamedTuple):
    requests: List[Parsed]
    spans: List[bytes]  # ours only: the raw bytes each request took, leading empty lines included
    error: Optional[str]  # why the parser gave up, or None when it wants more bytes


FRAMING = ("content-length", "transfer-encoding")


def ends_the_comparison(request: Request) -> bool:
    """After this request the two parsers stop reading the stream for reasons that are not framing.

    h11 never keeps an HTTP/1.0 connection alive (we honour ``Connection: keep-alive``); both stop at
    ``Connection: close``; after an upgrade our connection hands the rest of the stream to WebSocket.
    """
    return not request.keep_alive or request.version != "HTTP/1.1" or request.upgrade


def ours(data: bytes) -> Outcome:
    parser = RequestParser()
    parser.feed(data)
    requests: List[Parsed] = []
    spans: List[bytes] = []
    while True:
        before = len(data) - parser.buffered
        try:
            request = parser.next_request()
        except HttpError as error:
            return Outcome(requests, spans, error.detail)
        if request is None:
            return Outcome(requests, spans, None)
        headers = tuple((n, v) for n, v in request.headers if n not in FRAMING)
        requests.append(Parsed(request.method, request.target, headers, request.body))
        spans.append(data[before:len(data) - parser.buffered])
        if ends_the_comparison(request):
            return Outcome(requests, spans, "stop")


def h11s(data: bytes, count: int) -> Outcome:
    """h11 as a server, answering each request with a 404 (which also refuses any protocol switch)."""
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    if data:  # h11 reads b"" as the end of the stream
        connection.receive_data(data)
    requests: List[Parsed] = []
    head: Any = None
    body = bytearray()
    while len(requests) < count:
        try:
            event = connection.next_event()
        except h11.RemoteProtocolError as error:
            return Outcome(requests, [], str(error))
        if event is h11.NEED_DATA or event is h11.PAUSED:
            return Outcome(requests, [], None)
        if isinstance(event, h11.Request):
            head, body = event, bytearray()
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            headers = tuple((n.decode("ascii"), v.decode("latin-1")) for n, v in head.headers if n not in
                            (b"content-length", b"transfer-encoding"))
            requests.append(Parsed(head.method.decode("ascii"), head.target.decode("ascii"), headers, bytes(body)))
            connection.send(h11.Response(status_code=404, headers=[("content-length", "0")]))
            connection.send(h11.EndOfMessage())
            if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                return Outcome(requests, [], "stop")
            connection.start_next_cycle()
    return Outcome(requests, [], "stop")


class KnownDifference(NamedTuple):
    name: str
    reason: str
    applies: Callable[[bytes, str], bool]  # (our raw bytes of the request, h11's error) -> bool


# Where h11 refuses or frames differently a request that we accept. Each entry is a deliberate choice.
KNOWN_DIFFERENCES = [
    KnownDifference(
        "empty lines before the request line",
        "RFC 9112 §2.2: a server SHOULD ignore at least one empty line (CRLF) received before the request "
        "line; h11 refuses them. Framing is unaffected: the request that follows is the same.",
        lambda span, error: span.startswith(b"\r\n") and "no request line" in error,
    ),
    KnownDifference(
        "whitespace before a chunk extension",
        "RFC 9112 §7.1.1 allows BWS before ';' and RFC 9110 §5.6.3 says a recipient MUST parse and remove "
        "it; h11's chunk-header pattern has no room for it. A front end without BWS support refuses the "
        "line (no smuggling); the size before the whitespace is the same for both.",
        lambda span, error: re.search(r"illegal chunk header: bytearray\(b'[0-9A-Fa-f]+( |\\t)+;", error) is not None,
    ),
]


def explain(ours_: Outcome, theirs: Outcome, data: bytes) -> Optional[str]:
    """None when h11 agrees with every request we accepted, else a description of the first difference."""
    for index, (mine, span) in enumerate(zip(ours_.requests, ours_.spans)):
        if index < len(theirs.requests):
            if theirs.requests[index] != mine:
                return f"request {index} differs: ours {mine!r}, h11 {theirs.requests[index]!r} in {data!r}"
            continue
        error = theirs.error or "h11 wants more bytes (a different request boundary)"
        for known in KNOWN_DIFFERENCES:
            if known.applies(span, error):
                return known.name
        return f"request {index} accepted by us, not by h11 ({error}): ours {mine!r} from {span!r} in {data!r}"
    return None


DIFFERENTIAL = settings(
    max_examples=int(os.environ.get("DIFF_EXAMPLES", 2500)),  # about 7 s; raise it for a longer local hunt
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TALLY: collections.Counter = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def report_tally() -> Any:
    yield
    if TALLY:
        print("\ndifferential against h11:", dict(sorted(TALLY.items())))


class Choices(NamedTuple):
    """One part of a request: spellings a parser must accept, and hostile ones it may refuse."""

    part: str
    valid: List[Any]
    hostile: List[Any]


LINE_ENDS = Choices("line end", [b"\r\n"], [b"\n", b"\r", b"\r\r\n", b"\n\r\n", b" \r\n", b"\x00\r\n"])
SIZE_FORMS = Choices("chunk size", ["%x", "%X", "00%x"], [" %x", "%x ", "%x\t", "+%x", "0x%x", "%x%x", "-%x"])
CHUNK_EXTENSIONS = Choices(
    "chunk extension",
    [b"", b"", b";a", b";a=b", b';a="q"', b' ; a = "x\\"y"', b";a;b=c", b'\t;a="\xff;=\t"'],
    [b";", b";=b", b";a=", b";a b", b";a=b c", b";\nxx", b";a=\x00", b";\x01", b';a="\n"', b";a=\x7f", b";a=\xff",
     b";a=b\r", b"\x00", b';a="open', b";a=b=c", b";a,b", b" ", b";a\t"],
)
TRAILERS = Choices(
    "trailer", [b"X-T: 1", b"X-T:", b"X-T:  v  ", b"X-T:\tv", b"Content-Length: 5", b"X-T: \xff"],
    [b"no colon", b" folded", b"X T: 1", b"X-T : 1", b"X-T: a\x00b", b"X-T: \x01", b"X-T: 1\nX-U: 2", b": v"],
)
CONTENT_LENGTHS = Choices(
    "content-length", ["{n}", "0{n}"],
    ["{n}, {n}", ",{n}", "{n},", "", " ", "{n} ,{n}", "+{n}", "{n}{n}", "{m}", "{n}\x0b", "\xb2", "{n}.0"],
)
TRANSFER_CODINGS = Choices(
    "transfer-encoding", ["chunked", "Chunked", "CHUNKED", "chunked "],
    ["", ",", "chunked,", ", chunked", "chunked, chunked", "gzip, chunked", "identity", "chunked;a=b",
     "\x0bchunked", "chunked\x00", "chunked, gzip"],
)
EXTRA_HEADERS = Choices(
    "header",
    [b"X-A: 1", b"X-A:", b"X-A:\t 1 \t", b"Connection: close", b"Connection: keep-alive", b"Expect: 100-continue",
     b"Upgrade: websocket", b"Connection: upgrade", b"X-A: \xe9"],
    [b"Host: other", b" folded", b"\tfolded: x", b"X-A : 1", b"X-A: a\x00b", b"X-A: a\rb", b"X-A:\x0bb",
     b"X-A: a\nb"],
)
FRAMINGS = Choices("framing", ["cl", "te", "none"], ["te+cl", "cl+te", "cl,cl", "te,te"])


PARTS = [choices.part for choices in (LINE_ENDS, SIZE_FORMS, CHUNK_EXTENSIONS, TRAILERS, CONTENT_LENGTHS,
                                      TRANSFER_CODINGS, EXTRA_HEADERS, FRAMINGS)]


def pick(draw: Any, choices: Choices, defect: Optional[str]) -> Any:
    """A valid spelling, or a hostile one now and then if this request's defect is in this part."""
    hostile = choices.part == defect and draw(st.booleans())
    return draw(st.sampled_from(choices.hostile if hostile else choices.valid))


@st.composite
def framed_requests(draw: Any) -> bytes:
    """A request built from parts; at most one kind of part is spelt in ways parsers disagree on."""
    defect = draw(st.sampled_from([None] + PARTS))
    version = draw(st.sampled_from([b"HTTP/1.1"] * 5 + [b"HTTP/1.0"]))
    method = draw(st.sampled_from([b"POST", b"GET", b"PUT"]))
    body = draw(st.binary(max_size=40))
    lines = [method + b" /" + draw(st.sampled_from([b"", b"x", b"a/b?c=d"])) + b" " + version]
    if version == b"HTTP/1.1" or draw(st.booleans()):
        lines.append(b"Host: h")
    lines += [pick(draw, EXTRA_HEADERS, defect) for _ in range(draw(st.integers(0, 3)))]
    framing = pick(draw, FRAMINGS, defect)
    chunked = False
    for kind in framing.replace("+", ",").split(","):
        if kind == "cl":
            value = pick(draw, CONTENT_LENGTHS, defect).format(n=len(body), m=len(body) + 1)
            lines.append(b"Content-Length: " + value.encode("latin-1"))
        elif kind == "te":
            value = pick(draw, TRANSFER_CODINGS, defect)
            chunked = chunked or "chunked" in value.lower()
            lines.append(b"Transfer-Encoding: " + value.encode("latin-1"))
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    if draw(st.integers(0, 9)) == 0:
        head = b"\r\n" + head
    if not chunked:
        return head + (body if framing != "none" else b"")
    encoded, rest = b"", body
    while rest:
        size = draw(st.integers(1, len(rest)))
        form = pick(draw, SIZE_FORMS, defect)
        encoded += (form % ((size,) * form.count("%"))).encode("ascii")
        encoded += pick(draw, CHUNK_EXTENSIONS, defect) + pick(draw, LINE_ENDS, defect)
        encoded += rest[:size] + pick(draw, LINE_ENDS, defect)
        rest = rest[size:]
    encoded += b"0" + pick(draw, CHUNK_EXTENSIONS, defect) + pick(draw, LINE_ENDS, defect)
    for _ in range(draw(st.integers(0, 2))):
        encoded += pick(draw, TRAILERS, defect) + pick(draw, LINE_ENDS, defect)
    return head + encoded + pick(draw, LINE_ENDS, defect)


streams = st.lists(framed_requests() | valid_requests() | mutated_requests(), min_size=1, max_size=3).map(b"".join)


@DIFFERENTIAL
@given(data=streams)
def test_every_request_we_accept_h11_accepts_with_the_same_framing(data):
    mine = ours(data)
    theirs = h11s(data, len(mine.requests) + 1)  # one more: to count where h11 is more lenient
    TALLY["examples"] += 1
    TALLY["requests we accepted"] += len(mine.requests)
    TALLY["requests h11 accepted"] += min(len(theirs.requests), len(mine.requests))
    TALLY["streams where h11 accepted a request we refused"] += len(theirs.requests) > len(mine.requests)
    difference = explain(mine, theirs, data)
    if difference is None:
        return
    assert any(difference == known.name for known in KNOWN_DIFFERENCES), difference
    TALLY[f"known: {difference}"] += 1

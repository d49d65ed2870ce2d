"""PROTOCOL.md §3: the HTTP rules every endpoint keeps.

What the request parser decides (limits, malformed lines, framing) is checked in process by feeding
``RequestParser`` bytes (``parse_stream``); a parser error becomes the response of the same status, and one
that closes makes the connection close (test_conflicting_content_lengths_are_400_and_close shows both over
a socket). Routing and handlers, keep-alive, pipelining, Expect, timeouts and slow clients are checked over
real sockets.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from conftest import assert_refused, parse_responses, parse_stream, read_all
from uagw.config import Config


def raw_request(method: str, path: str, *, body: bytes = b"", headers: str = "", version: str = "HTTP/1.1") -> bytes:
    head = f"{method} {path} {version}\r\nHost: localhost\r\n{headers}"
    if body and "Content-Length" not in headers and "Transfer-Encoding" not in headers:
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def test_unknown_path_is_404_with_detail(gateway):
    reply = gateway.get("/no/such/thing")
    assert reply.status == 404
    assert reply.headers["content-type"] == "application/json"
    assert "detail" in reply.json


def test_unknown_path_under_ops_is_404(gateway):
    assert gateway.get("/api/v1/ops/nothing-here").status == 404


def test_wrong_method_is_405_with_allow_header(gateway):
    reply = gateway.request("PUT", "/api/v1/ops/sessions")
    assert reply.status == 405
    assert "GET" in reply.headers["allow"]
    assert "PUT" in reply.json["detail"]


def test_wrong_method_on_session_path_lists_get_delete_and_patch(gateway):
    gateway.make_session("s-405")
    reply = gateway.request("PUT", "/api/v1/ops/sessions/s-405")
    assert reply.status == 405
    assert {"GET", "DELETE", "PATCH"} <= {m.strip() for m in reply.headers["allow"].split(",")}


def test_body_that_is_not_json_is_400(gateway):
    gateway.make_session("s-badjson")
    reply = gateway.post("/api/v1/ops/sessions/s-badjson/reset", body=b"{not json")
    assert reply.status == 400
    assert "JSON" in reply.json["detail"]


@pytest.mark.parametrize("body", [b"[1, 2]", b'"text"', b"42", b"null"])
def test_body_that_is_not_an_object_is_400(gateway, body):
    gateway.make_session("s-notobj")
    assert gateway.post("/api/v1/ops/sessions/s-notobj/compact", body=body).status == 400


def test_deeply_nested_json_body_is_400_not_500(gateway):
    gateway.make_session("s-deep")
    reply = gateway.post("/api/v1/ops/sessions/s-deep/reset", body=b"[" * 100000 + b"]" * 100000)
    assert reply.status in (400, 413)


def test_unknown_body_field_is_ignored_as_ua_ignores_it(gateway):
    directory = gateway.make_session("s-unknown-field", {"run.log": b"x\n"})
    reply = gateway.post("/api/v1/ops/sessions/s-unknown-field/reset", body={"clear_logs": False, "clear_log": True})
    assert reply.status == 200 and reply.json["archived"] == []
    assert (directory / "run.log").exists()


def test_body_over_1_mib_is_413():
    assert_refused(raw_request("POST", "/api/v1/ops/sessions/s-big/reset", body=b" " * (1024 * 1024 + 1)), 413)


def test_body_of_exactly_1_mib_is_accepted(gateway):
    gateway.make_session("s-1mib")
    body = b"{}" + b" " * (1024 * 1024 - 2)
    data = gateway.raw(raw_request("POST", "/api/v1/ops/sessions/s-1mib/reset", body=body, headers="Connection: close\r\n"))
    assert parse_responses(data)[0][0] == 200


def test_headers_over_64_kib_are_431():
    headers = "".join(f"X-Filler-{i}: {'a' * 1000}\r\n" for i in range(70))
    assert_refused(raw_request("GET", "/api/v1/health", headers=headers), 431)


def test_too_many_header_fields_are_431():
    headers = "".join(f"X-H{i}: 1\r\n" for i in range(200))
    assert_refused(raw_request("GET", "/api/v1/health", headers=headers), 431)


@pytest.mark.parametrize("param", ["limit=abc", "limit=1.5", "offset=1e3", "limit=", "offset=0x10", "limit=99999999999999999999999"])
def test_number_parameter_that_is_not_an_integer_is_400(gateway, param):
    reply = gateway.get(f"/api/v1/ops/sessions?{param}")
    assert reply.status == 400
    assert param.split("=")[0] in reply.json["detail"]


def test_repeated_query_parameter_is_400(gateway):
    assert gateway.get("/api/v1/ops/sessions?limit=1&limit=2").status == 400


@pytest.mark.parametrize("version", ["HTTP/2.0", "HTTP/0.9", "HTTP/3"])
def test_other_http_versions_are_505(version):
    assert_refused(raw_request("GET", "/api/v1/health", version=version), 505)


@pytest.mark.parametrize("line", [b"GET /api/v1/health\r\n\r\n", b"GET  /api/v1/health HTTP/1.1\r\n\r\n",
                                  b"G(T /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n", b"GET api HTTP/1.1\r\nHost: x\r\n\r\n",
                                  b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n"])
def test_malformed_request_lines_are_400(line):
    assert_refused(line)


def test_http11_without_host_is_400():
    assert_refused(b"GET /api/v1/health HTTP/1.1\r\n\r\n")


def test_header_line_without_colon_is_400():
    assert_refused(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nBroken\r\n\r\n")


def test_keep_alive_serves_several_requests_on_one_connection(gateway):
    with socket.create_connection((gateway.host, gateway.port), timeout=5) as sock:
        for _ in range(3):
            sock.sendall(raw_request("GET", "/api/v1/health"))
            data = b""
            while b"}" not in data:
                data += sock.recv(65536)
            assert parse_responses(data)[0][0] == 200


def test_pipelined_requests_are_answered_in_order(gateway):
    gateway.make_session("s-pipe")
    requests = (
        raw_request("GET", "/api/v1/ops/sessions/s-pipe")
        + raw_request("GET", "/nope")
        + raw_request("GET", "/api/v1/health")
        + raw_request("GET", "/api/v1/ops/sessions/s-pipe/preview", headers="Connection: close\r\n")
    )
    responses = parse_responses(gateway.raw(requests))
    assert [status for status, _, _ in responses] == [200, 404, 200, 200]
    assert json.loads(responses[0][2])["session"]["session_id"] == "s-pipe"
    assert responses[-1][1]["connection"] == "close"


def test_connection_close_is_honoured(gateway):
    with socket.create_connection((gateway.host, gateway.port), timeout=5) as sock:
        sock.sendall(raw_request("GET", "/api/v1/health", headers="Connection: close\r\n"))
        data = read_all(sock, timeout=5)  # returns only once the server closed
        assert parse_responses(data)[0][1]["connection"] == "close"


def test_http10_closes_after_the_response(gateway):
    with socket.create_connection((gateway.host, gateway.port), timeout=5) as sock:
        sock.sendall(b"GET /api/v1/health HTTP/1.0\r\n\r\n")
        started = time.monotonic()
        data = read_all(sock, timeout=5)
        assert time.monotonic() - started < 2
        assert parse_responses(data)[0][0] == 200


def test_http10_keep_alive_is_honoured(gateway):
    with socket.create_connection((gateway.host, gateway.port), timeout=5) as sock:
        for _ in range(2):
            sock.sendall(b"GET /api/v1/health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            data = b""
            while b"}" not in data:
                data += sock.recv(65536)
            assert data.startswith(b"HTTP/1.1 200")


def test_idle_keep_alive_connection_is_closed_after_the_timeout(start_gateway):
    gateway = start_gateway("--keepalive-timeout", "1")
    with socket.create_connection((gateway.host, gateway.port), timeout=10) as sock:
        sock.sendall(raw_request("GET", "/api/v1/health"))
        started = time.monotonic()
        data = read_all(sock, timeout=8)
        assert parse_responses(data)[0][0] == 200
        assert 0.8 < time.monotonic() - started < 4


def test_chunked_request_body_is_accepted(gateway):
    gateway.make_session("s-chunked", {"run.log": b"".join(b"line %d\n" % i for i in range(10))})
    body = b'{"max_lines": 3}'
    chunked = b"5\r\n" + body[:5] + b"\r\n" + b"%x;ext=1\r\n" % (len(body) - 5) + body[5:] + b"\r\n0\r\nX-Trailer: 1\r\n\r\n"
    request = raw_request("POST", "/api/v1/ops/sessions/s-chunked/compact", body=chunked,
                          headers="Transfer-Encoding: chunked\r\nConnection: close\r\n")
    [parsed], error = parse_stream(request)
    assert error is None and parsed.body == body  # chunks joined, extension and trailer dropped
    status, _, reply = parse_responses(gateway.raw(request))[0]  # and the handler gets that body
    assert status == 200
    assert json.loads(reply)["files"]["run.log"] == 3


def test_chunked_body_over_1_mib_is_413():
    chunk = b" " * 65536
    body = b"".join(b"%x\r\n" % len(chunk) + chunk + b"\r\n" for _ in range(17)) + b"0\r\n\r\n"
    request = raw_request("POST", "/api/v1/ops/sessions/s-chunked-big/reset", body=body, headers="Transfer-Encoding: chunked\r\n")
    assert_refused(request, 413)


def test_content_length_with_transfer_encoding_is_400_and_closes():
    request = raw_request("POST", "/api/v1/sessions", body=b"0\r\n\r\n",
                          headers="Content-Length: 5\r\nTransfer-Encoding: chunked\r\n")
    smuggled = raw_request("GET", "/api/v1/health")
    assert_refused(request + smuggled)  # refused before the smuggled request is read


def test_conflicting_content_lengths_are_400_and_close(gateway):
    request = raw_request("POST", "/api/v1/sessions", body=b"{}", headers="Content-Length: 2\r\nContent-Length: 3\r\n")
    responses = parse_responses(gateway.raw(request + raw_request("GET", "/api/v1/health")))
    assert [r[0] for r in responses] == [400]
    assert responses[0][1]["connection"] == "close"


def test_identical_repeated_content_length_is_accepted():
    request = raw_request("POST", "/api/v1/sessions", body=b"{}", headers="Content-Length: 2\r\nContent-Length: 2\r\nConnection: close\r\n")
    [parsed], error = parse_stream(request)
    assert error is None and parsed.body == b"{}"


def test_unsupported_transfer_coding_is_rejected():
    request = raw_request("POST", "/api/v1/sessions", body=b"", headers="Transfer-Encoding: gzip, chunked\r\n")
    assert_refused(request)  # PROTOCOL.md §3: no 5xx for client input


def test_expect_100_continue_gets_an_interim_response(gateway):
    with socket.create_connection((gateway.host, gateway.port), timeout=5) as sock:
        sock.sendall(b"POST /api/v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(b"{}")
        data = b""
        while b"}" not in data:
            data += sock.recv(65536)
        assert parse_responses(data)[0][0] == 200


@pytest.mark.parametrize("encoded", ["%2E%2E", "%2e%2e", ".%2E", "%2E", "a%2Fb", "a%5Cb", "a%00b", "%252E%252E", "%C0%AE%C0%AE", "x" * 129])
def test_path_segment_is_decoded_once_and_bad_ids_are_400(gateway, encoded):
    sentinel = gateway.workspaces.parent / "sentinel.txt"
    sentinel.write_text("keep me")
    assert gateway.delete(f"/api/v1/ops/sessions/{encoded}?confirm=true").status == 400
    assert gateway.get(f"/api/v1/ops/sessions/{encoded}").status == 400
    assert gateway.post(f"/api/v1/ops/sessions/{encoded}/reset").status == 400
    assert sentinel.read_text() == "keep me"
    assert gateway.workspaces.is_dir()


def test_percent_encoded_valid_id_is_found(gateway):
    gateway.make_session("s-enc")
    assert gateway.get("/api/v1/ops/sessions/s%2Denc").json["session"]["session_id"] == "s-enc"


def test_the_request_head_deadline_is_10_s_by_default():
    assert Config(port=0).header_timeout == 10.0  # PROTOCOL.md §3


def test_slow_request_head_is_disconnected_after_the_head_deadline(start_gateway):
    deadline = 2.0  # stands for the default 10 s
    gateway = start_gateway("--header-timeout", str(deadline))
    with socket.create_connection((gateway.host, gateway.port), timeout=20) as sock:
        sock.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        for _ in range(4):
            time.sleep(deadline / 8)
            sock.sendall(b"X-Slow: 1\r\n")  # trickling headers does not extend the deadline
        data = read_all(sock, timeout=15)
        elapsed = time.monotonic() - started
    assert deadline * 0.9 <= elapsed <= deadline + 2.5
    assert parse_responses(data)[0][0] == 408


def test_many_slow_clients_do_not_block_others(gateway):
    idle = []
    try:
        for _ in range(300):
            sock = socket.create_connection((gateway.host, gateway.port), timeout=5)
            sock.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n")  # never finished
            idle.append(sock)
        started = time.monotonic()
        assert gateway.get("/api/v1/health").status == 200
        assert time.monotonic() - started < 1
    finally:
        for sock in idle:
            sock.close()


def test_error_responses_are_json_with_detail(gateway):
    for reply in (gateway.get("/nope"), gateway.request("PUT", "/api/v1/health"), gateway.get("/api/v1/ops/sessions?limit=x")):
        assert reply.headers["content-type"] == "application/json"
        assert isinstance(reply.json["detail"], str) and reply.json["detail"]

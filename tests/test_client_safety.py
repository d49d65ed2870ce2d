"""The command-line client against hostile text and hostile redirects.

What the gateway answers is partly an agent's text: log lines, file names in a session, and (from
anything that answers on the gateway's address) error details. Printed for people, none of it may reach
the terminal as control sequences (OSC 52 writes the clipboard, OSC 0 the title, CSI moves the cursor
and recolours; bidi overrides make text read other than it is). And a redirect must never carry the
token to another address. Every test runs the client in a subprocess, as an operator would, and looks
at the bytes it wrote.
"""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

from conftest import ROOT, gateway_env

CLIENT = [sys.executable, str(ROOT / "ua_gateway.py")]
RUN_TIMEOUT = 30.0
TOKEN = "client-safety-token"

# What an agent may write into its run.log: each line a different way to command a terminal.
HOSTILE_LINES = [
    "clipboard \x1b]52;c;cm0gLXJmIH4=\x07 end",  # OSC 52: sets the clipboard
    "title \x1b]0;owned\x07 end",  # OSC 0: sets the window title
    "csi \x1b[2J\x1b[31mred\x1b[0m end",  # CSI: clears the screen, recolours
    "c1 \u009b31m end",  # C1 CSI, one character (UTF-8 c2 9b)
    "cr fake\rreal end",  # CR: the rest overwrites the start of the line
    "del \x7f end",
    "bidi \u202eevil\u202c \u2066iso\u2069 end",  # RLO/PDF and LRI/PDI
    "separators \u2028 and \u2029 end",
]
# The code points the client must never print raw (C0 but TAB, DEL, C1, separators, bidi controls).
FORBIDDEN = (
    {chr(code) for code in range(0x20) if code not in (0x09, 0x0A)}
    | {"\x7f"}
    | {chr(code) for code in range(0x80, 0xA0)}
    | {"\u2028", "\u2029"}
    | {chr(code) for code in range(0x202A, 0x202F)}
    | {chr(code) for code in range(0x2066, 0x206A)}
)


def run_client(url: str, *args: str, token: Optional[str] = None) -> subprocess.CompletedProcess:
    """The client's exit status and raw output bytes (stdout and stderr as UTF-8)."""
    env = {"PYTHONIOENCODING": "utf-8", **({"UA_OPS_TOKEN": token} if token else {})}
    return subprocess.run(
        [*CLIENT, *args, "--url", url], env=gateway_env(env), stdin=subprocess.DEVNULL,
        capture_output=True, timeout=RUN_TIMEOUT,
    )


def forbidden_in(output: bytes) -> List[str]:
    return sorted({char for char in output.decode("utf-8") if char in FORBIDDEN})


class Server:
    """A tiny HTTP server on 127.0.0.1 answering every request with ``answer(path)``; records headers."""

    def __init__(self, answer) -> None:
        self.requests: List[Dict[str, str]] = []
        recorded, respond = self.requests, answer

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self) -> None:
                recorded.append({name.lower(): value for name, value in self.headers.items()})
                status, headers, body = respond(self.path)
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_DELETE = _any

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve() -> Iterator:
    started: List[Server] = []

    def start(answer) -> Server:
        server = Server(answer)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def json_answer(status: int, payload: object) -> Tuple[int, List[Tuple[str, str]], bytes]:
    return status, [("Content-Type", "application/json")], json.dumps(payload).encode()


# --- terminal escapes ----------------------------------------------------------------------------------


def hostile_log(gateway, session_id: str) -> None:
    gateway.make_session(session_id, {"run.log": "".join(line + "\n" for line in HOSTILE_LINES).encode()})


def test_tail_shows_control_characters_escaped(gateway):
    hostile_log(gateway, "safety-tail")

    result = run_client(gateway.url, "logs", "tail", "--session", "safety-tail")

    assert result.returncode == 0, result.stderr
    assert forbidden_in(result.stdout) == []
    text = result.stdout.decode()
    for shown in ("clipboard \\x1b]52;c;cm0gLXJmIH4=\\x07 end", "c1 \\x9b31m end", "cr fake\\x0dreal end",
                  "del \\x7f end", "bidi \\u202eevil\\u202c \\u2066iso\\u2069 end", "separators \\u2028 and \\u2029"):
        assert shown in text


def test_tail_raw_prints_the_lines_as_written(gateway):
    hostile_log(gateway, "safety-raw")

    result = run_client(gateway.url, "logs", "tail", "--session", "safety-raw", "--raw")

    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().split("\n")[:-1] == HOSTILE_LINES


def test_tail_json_keeps_the_lines_and_prints_no_control_character(gateway):
    hostile_log(gateway, "safety-json")

    result = run_client(gateway.url, "logs", "tail", "--session", "safety-json", "--json")

    assert result.returncode == 0, result.stderr
    assert forbidden_in(result.stdout) == []
    assert json.loads(result.stdout)["lines"] == HOSTILE_LINES


def test_show_escapes_a_file_name_written_by_an_agent(gateway):
    gateway.make_session("safety-show", {"\x1b]52;c;aGk=\x07": b"x"})

    result = run_client(gateway.url, "sessions", "show", "safety-show")

    assert result.returncode == 0, result.stderr
    assert forbidden_in(result.stdout) == []
    assert "\\x1b]52;c;aGk=\\x07" in result.stdout.decode()


def test_error_detail_is_printed_escaped(serve):
    server = serve(lambda path: json_answer(404, {"detail": "gone \x1b]0;owned\x07 \u009b2J \u202eevil"}))

    result = run_client(server.url, "sessions", "show", "anything")

    assert result.returncode == 1
    assert forbidden_in(result.stderr) == []
    assert "gone \\x1b]0;owned\\x07 \\x9b2J \\u202eevil" in result.stderr.decode()


# --- redirects -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_to_another_port_is_reported_and_never_gets_the_token(serve, status):
    elsewhere = serve(lambda path: json_answer(200, {"sessions": [], "offset": 0, "total": 0}))
    target = f"{elsewhere.url}/api/v1/ops/sessions"
    redirector = serve(lambda path: (status, [("Location", target)], b""))

    result = run_client(redirector.url, "sessions", "list", token=TOKEN)

    assert [request.get("authorization") for request in elsewhere.requests] == []
    assert result.returncode == 1
    assert target in result.stderr.decode() and "--url" in result.stderr.decode()
    assert TOKEN not in result.stderr.decode()


def test_relative_redirect_is_reported_with_its_full_target(serve):
    redirector = serve(lambda path: (302, [("Location", "/moved")], b""))

    result = run_client(redirector.url, "sessions", "list", token=TOKEN)

    assert result.returncode == 1
    assert f"{redirector.url}/moved" in result.stderr.decode()
    assert len(redirector.requests) == 1

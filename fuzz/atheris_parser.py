"""Coverage-guided fuzzing of the HTTP request parser with atheris (libFuzzer for Python). An extra:
CI runs the hypothesis tests of tests/test_fuzz.py instead.

The property is the parser's contract: whatever bytes arrive, in whatever chunks, ``RequestParser``
yields ``Request`` objects, asks for more (None), or raises ``HttpError`` with a 4xx status (505 for a
foreign HTTP version). Any other exception, or a 5xx, is a crash that libFuzzer saves as ``crash-<sha1>``.
The chunking of the stream is taken from the input itself, so splits are explored too, and each
accepted request is re-parsed in one piece to check that it parses identically.

How to run (atheris 3.0.0 has wheels for CPython 3.11 on x86-64 Linux; other versions build from source):

    python3.11 -m venv /tmp/atheris && /tmp/atheris/bin/pip install atheris==3.0.0 websockets==15.0.1
    /tmp/atheris/bin/python fuzz/atheris_parser.py -max_total_time=60 -max_len=4096 fuzz/corpus

``fuzz/corpus`` (created if missing) keeps the interesting inputs between runs; seeds are written into
it on the first run. Any libFuzzer flag works (``-jobs=2``, ``-dict=...``, ``-runs=N``). Replay a crash:

    /tmp/atheris/bin/python fuzz/atheris_parser.py crash-<sha1>
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Tuple

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports():
    from ua_gateway import HttpError, RequestParser
    from uagw.limits import MAX_HEAD_BYTES

SEEDS = [
    b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"POST /api/v1/ops/sessions/s1/reset HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /api/v1/sessions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2;e=1\r\n{}\r\n0\r\nT: 1\r\n\r\n",
    b"GET /ws/agent HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET / HTTP/1.1\r\nHost: y\r\nExpect: 100-continue\r\n"
    b"Content-Length: 1\r\n\r\nx",
]


def parse(data: bytes, cuts: List[int]) -> Tuple[List[tuple], bool]:
    """Parse ``data`` fed in pieces ending at ``cuts``; (shapes of the requests, ended by an error)."""
    parser = RequestParser()
    shapes = []
    start = 0
    for stop in cuts + [len(data)]:
        parser.feed(data[start:stop])
        start = stop
        while True:
            try:
                request = parser.next_request()
            except HttpError as error:
                if not (400 <= error.status < 500 or error.status == 505):
                    raise AssertionError(f"status {error.status} for client input: {error.detail}")
                if error.close:
                    return shapes, True
                continue
            if request is None:
                break
            shapes.append((request.method, request.target, request.version, tuple(request.headers), request.body,
                           request.keep_alive, request.upgrade))
    return shapes, False


def test_one_input(raw: bytes) -> None:
    provider = atheris.FuzzedDataProvider(raw)
    cut_count = provider.ConsumeIntInRange(0, 8)
    cuts = sorted(provider.ConsumeIntInRange(0, 4096) for _ in range(cut_count))
    data = provider.ConsumeBytes(provider.remaining_bytes())
    cuts = [min(c, len(data)) for c in cuts]
    split, failed = parse(data, cuts)
    whole, whole_failed = parse(data, [])
    if not failed and not whole_failed and split != whole:
        raise AssertionError(f"split parse differs: {split!r} != {whole!r}")


def main() -> None:
    args = sys.argv[1:]
    corpus = next((a for a in args if not a.startswith("-")), None)
    if corpus is not None and not os.path.isfile(corpus):
        os.makedirs(corpus, exist_ok=True)
        for index, seed in enumerate(SEEDS):
            path = os.path.join(corpus, f"seed-{index}")
            if not os.path.exists(path):
                with open(path, "wb") as handle:
                    handle.write(b"\x00" + seed)  # first byte: no cuts
    atheris.Setup([sys.argv[0]] + args, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    assert MAX_HEAD_BYTES > 0
    main()

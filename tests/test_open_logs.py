"""uagw.logcache: a log kept open answers tails on the event loop, and never with a stale or foreign file.

Each stale-answer test reads the log twice first (the first read, in a worker, keeps it open; the second is
answered from the kept descriptors), then changes the file behind the gateway's back and reads once more: the
answer must be the file as it is now, exactly what a fresh open would give (PROTOCOL.md §5.11).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path
from typing import Any, Dict

import pytest

import ops_service
from conftest import serve_embedded
from uagw.logcache import slice_response

pytestmark = pytest.mark.skipif(not ops_service.NOWAIT_READS, reason="no RWF_NOWAIT: every read goes to a worker")


def lines_bytes(prefix: str, count: int) -> bytes:
    return "".join(f"{prefix} {i}\n" for i in range(count)).encode()


def tail(gateway: Any, session_id: str, file_name: str = "run.log") -> Dict[str, Any]:
    reply = gateway.get(f"/api/v1/ops/logs/tail?session_id={session_id}&file={file_name}")
    assert reply.status == 200, reply
    return reply.json


def kept_tail(gateway: Any, session_id: str, content: bytes) -> Path:
    """A session whose run.log holds ``content``, read twice: the gateway now keeps it open."""
    directory = gateway.make_session(session_id, {"run.log": content})
    for _ in range(2):
        assert tail(gateway, session_id)["size"] == len(content)
    return directory


@pytest.mark.parametrize("content", [
    b"plain ascii line\n" * 3,
    b'a "quoted" word and a back\\slash\n',
    "caf\u00e9 \u2028 \U0001F600\n".encode(),
    b"windows line\r\nnext\r\n",
    b"tab\tand bell\x07 and del\x7f\n",
    b"broken utf-8 \xff\xfe\n",
    b"no newline at the end",
])
def test_an_answer_from_the_kept_log_is_byte_for_byte_the_workers(gateway, content):
    session_id = f"keep-bytes-{len(content)}"
    gateway.make_session(session_id, {"run.log": content})
    path = f"/api/v1/ops/logs/tail?session_id={session_id}"
    answers = [gateway.get(path).body for _ in range(3)]  # a worker's, then two from the kept log
    assert answers[1] == answers[0] and answers[2] == answers[0]


def test_a_log_replaced_under_the_same_name_is_read_anew(gateway):
    directory = kept_tail(gateway, "keep-replaced", lines_bytes("old", 5))
    (directory / "run.log.new").write_bytes(lines_bytes("new", 3))
    os.replace(directory / "run.log.new", directory / "run.log")
    body = tail(gateway, "keep-replaced")
    assert body["lines"] == ["new 0", "new 1", "new 2"] and body["size"] == len(lines_bytes("new", 3))


def test_a_log_truncated_in_place_is_read_at_its_new_size(gateway):
    directory = kept_tail(gateway, "keep-truncated", lines_bytes("long line", 50))
    with open(directory / "run.log", "r+b") as handle:
        handle.truncate(0)
        handle.write(b"short\n")
    body = tail(gateway, "keep-truncated")
    assert body["lines"] == ["short"] and body["size"] == 6


def test_a_log_appended_to_shows_the_new_lines(gateway):
    directory = kept_tail(gateway, "keep-appended", b"one\n")
    with open(directory / "run.log", "ab") as handle:
        handle.write(b"two\n")
    assert tail(gateway, "keep-appended")["lines"] == ["one", "two"]


def test_a_deleted_log_reads_as_missing(gateway):
    directory = kept_tail(gateway, "keep-deleted", b"gone soon\n")
    (directory / "run.log").unlink()
    body = tail(gateway, "keep-deleted")
    assert body["lines"] == [] and body["size"] == 0


def test_a_session_directory_replaced_under_the_same_name_is_read_anew(gateway):
    directory = kept_tail(gateway, "keep-dir", b"first directory\n")
    shutil.rmtree(directory)
    gateway.make_session("keep-dir", {"run.log": b"second directory\n"})
    assert tail(gateway, "keep-dir")["lines"] == ["second directory"]


def test_a_deleted_session_is_not_found(gateway):
    directory = kept_tail(gateway, "keep-gone", b"x\n")
    shutil.rmtree(directory)
    assert gateway.get("/api/v1/ops/logs/tail?session_id=keep-gone").status == 404


def test_a_log_given_a_second_name_outside_the_session_is_not_served(gateway, tmp_path):
    directory = kept_tail(gateway, "keep-linked", b"secret\n")
    os.link(directory / "run.log", tmp_path / "outside")  # same device: tmp_path and the workspaces share /tmp
    body = tail(gateway, "keep-linked")
    assert body["lines"] == [] and body["size"] == 0


def test_a_reset_between_two_tails_empties_the_log(gateway):
    kept_tail(gateway, "keep-reset", lines_bytes("before reset", 3))
    assert gateway.post("/api/v1/ops/sessions/keep-reset/reset", {"clear_logs": True}).status == 200
    assert tail(gateway, "keep-reset")["lines"] == []


def test_preview_from_a_kept_journal_follows_a_replacement(gateway):
    directory = gateway.make_session("keep-preview", {"activity_journal.log": b"a\n"})
    for _ in range(2):
        assert gateway.get("/api/v1/ops/sessions/keep-preview/preview").json["lines"] == ["a"]
    (directory / "next").write_bytes(b"b\n")
    os.replace(directory / "next", directory / "activity_journal.log")
    body = gateway.get("/api/v1/ops/sessions/keep-preview/preview").json
    assert body["lines"] == ["b"] and body["session_id"] == "keep-preview"


def _get(url: str) -> Dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.loads(answer.read())


def test_a_second_tail_is_answered_from_the_kept_log_and_a_deletion_lets_it_go(tmp_path):
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "run.log").write_bytes(b"hello\n")

    async def scenario(gateway: Any) -> Dict[str, Any]:
        loop = asyncio.get_running_loop()
        url = f"{gateway.url}/api/v1/ops/logs/tail?session_id=s1"
        first = await loop.run_in_executor(None, _get, url)
        kept = gateway.open_logs.descriptors()
        now = json.loads(slice_response({}, gateway.open_logs.read_now("s1", "run.log", None, None, None)).body)
        request = urllib.request.Request(f"{gateway.url}/api/v1/ops/sessions/s1?confirm=true", method="DELETE")
        await loop.run_in_executor(None, lambda: urllib.request.urlopen(request, timeout=10).read())
        return {"first": first, "kept": kept, "now": now, "after_delete": gateway.open_logs.descriptors()}

    seen = serve_embedded(tmp_path, None, scenario)
    assert seen["kept"] == 2  # the session directory and the log
    assert seen["now"] == seen["first"]  # the same answer, without a worker
    assert seen["after_delete"] == 0


def test_a_log_on_a_file_system_that_cannot_read_without_waiting_is_not_kept(tmp_path):
    # tmpfs answers RWF_NOWAIT with EOPNOTSUPP: a kept log there would cost three stats on the loop per
    # tail and still go to a worker, so after the first try it is let go and logs there are not kept.
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm (tmpfs) on this machine")
    root = Path(tempfile.mkdtemp(dir=shm))
    try:
        (root / "s1").mkdir()
        (root / "s1" / "run.log").write_bytes(b"hello\n")

        async def scenario(gateway: Any) -> Dict[str, Any]:
            loop = asyncio.get_running_loop()
            url = f"{gateway.url}/api/v1/ops/logs/tail?session_id=s1"
            answers = [await loop.run_in_executor(None, _get, url) for _ in range(3)]
            return {"answers": answers, "kept": gateway.open_logs.descriptors()}

        seen = serve_embedded(root, None, scenario)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert seen["answers"][0] == seen["answers"][1] == seen["answers"][2]
    assert seen["answers"][0]["lines"] == ["hello"]
    assert seen["kept"] == 0

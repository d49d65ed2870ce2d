"""Compressed archives that stay readable (PROTOCOL.md §16): the format, the slice over it, its bounds,
the background compressor, and the archive routes."""

from __future__ import annotations

import functools
import gzip
import json
import os
import random
from pathlib import Path
from typing import Dict, List

import pytest

import ops_service
from ops_service import ArchiveCorrupt, ArchiveNotFound, InvalidArgument, OpsService

from conftest import launch, wait_for

MEMBER = ops_service.ARCHIVE_MEMBER_BYTES


@functools.lru_cache(maxsize=None)
def journal(count: int, seed: int = 7) -> bytes:
    """JSON lines like the agent's journal: events with ids, times, tool names and some text."""
    rnd = random.Random(seed)
    words = ["build", "file", "error", "ok", "test", "src/app.py", "passed", "Traceback"]
    lines = []
    for seq in range(count):
        text = " ".join(words[rnd.randrange(8)] for _ in range(rnd.randrange(3, 30)))
        lines.append('{"seq":%d,"ts":%.3f,"type":"tool_result","turn_id":"turn-%04d","id":"%08x","text":"%s"}\n'
                     % (seq, 1764500000.0 + seq * 0.37, seq // 40, rnd.getrandbits(32), text))
    return "".join(lines).encode()


def archived(svc: OpsService, root: Path, session_id: str, data: bytes) -> str:
    """A session whose run.log ``data`` was compacted away into an archive; returns the stamp."""
    svc.create_session(session_id)
    (root / session_id / "run.log").write_bytes(data)
    result = svc.compact_session(session_id, max_lines=0)
    return result["archive_path"].split("/")[1]


def follow_all(svc: OpsService, session_id: str, stamp: str, max_bytes: int = 100_000) -> List[str]:
    lines: List[str] = []
    cursor = None
    while True:
        page = svc.read_archive_log(session_id, stamp, "run.log", cursor=cursor or 0, limit=5000, max_bytes=max_bytes)
        lines += page["lines"]
        cursor = page["cursor"]
        if not page["more"]:
            return lines


def test_gunzip_of_a_compressed_archive_equals_the_original(svc, root):
    data = journal(12_000)
    stamp = archived(svc, root, "s", data)
    assert svc.compress_archives("s")["files"] == 1
    stamp_dir = root / "s" / "archive" / stamp
    assert not (stamp_dir / "run.log").exists()
    assert gzip.decompress((stamp_dir / "run.log.gz").read_bytes()) == data


def test_archive_members_are_cut_after_a_newline_near_the_member_size(svc, root):
    data = journal(12_000)
    stamp = archived(svc, root, "s", data)
    svc.compress_archives("s")
    index = json.loads((root / "s" / "archive" / stamp / "run.log.gz.idx").read_bytes())
    assert len(index["members"]) > 1 and index["size"] == len(data)
    for _, _, offset, size, _ in index["members"][:-1]:
        assert data[offset + size - 1 : offset + size] == b"\n" and MEMBER <= size <= MEMBER + ops_service.MAX_LINE_SCAN


def test_tail_of_a_compressed_archive_equals_tail_of_the_plain(svc, root):
    stamp = archived(svc, root, "s", journal(12_000))
    plain = svc.read_archive_log("s", stamp, "run.log", limit=300)
    svc.compress_archives("s")
    packed = svc.read_archive_log("s", stamp, "run.log", limit=300)
    assert (plain["compressed"], packed["compressed"]) == (False, True)
    assert {**packed, "compressed": False} == plain


def test_a_tail_inflates_only_the_last_members(svc, root, monkeypatch):
    data = journal(40_000)  # several members
    stamp = archived(svc, root, "s", data)
    svc.compress_archives("s")
    inflated: List[int] = []
    original = ops_service._ArchiveStream._inflate
    monkeypatch.setattr(ops_service._ArchiveStream, "_inflate", lambda self, member, prefix=None: inflated.append(
        member.size if prefix is None else prefix) or original(self, member, prefix))
    page = svc.read_archive_log("s", stamp, "run.log", limit=10)
    assert page["lines"] == data.decode().splitlines()[-10:]
    # The last member, and the first 64 bytes of the head's (the cursor's fingerprint): never the whole file.
    assert sorted(inflated) == [ops_service.FINGERPRINT_SPAN, json.loads(
        (root / "s" / "archive" / stamp / "run.log.gz.idx").read_bytes())["members"][-1][3]]


def test_cursor_paging_sees_no_gap_or_duplicate_when_the_archive_is_compressed_midway(svc, root):
    data = journal(15_000)
    stamp = archived(svc, root, "s", data)
    lines: List[str] = []
    cursor = 0
    pages = 0
    while True:
        page = svc.read_archive_log("s", stamp, "run.log", cursor=cursor, limit=1000, max_bytes=200_000)
        assert not page["reset"]
        lines += page["lines"]
        cursor = page["cursor"]
        pages += 1
        if pages == 3:
            assert svc.compress_archives("s")["files"] == 1  # the rest is read from the .gz
        if not page["more"]:
            break
    assert pages > 3 and lines == data.decode().splitlines()


def test_a_member_that_inflates_past_its_index_is_corrupt_not_read(svc, root):
    stamp = archived(svc, root, "s", journal(3000))
    svc.compress_archives("s")
    stamp_dir = root / "s" / "archive" / stamp
    bomb = gzip.compress(b"\n" * (50 * MEMBER), mtime=0)  # 50 MiB of newlines in ~50 KB
    (stamp_dir / "run.log.gz").write_bytes(bomb)
    index = json.loads((stamp_dir / "run.log.gz.idx").read_bytes())
    index.update(size=1000, members=[[0, len(bomb), 0, 1000, 1000]])
    (stamp_dir / "run.log.gz.idx").write_text(json.dumps(index))
    with pytest.raises(ArchiveCorrupt, match="does not hold the 1000 bytes"):
        svc.read_archive_log("s", stamp, "run.log")


def test_an_index_that_does_not_tile_the_gzip_file_is_corrupt(svc, root):
    stamp = archived(svc, root, "s", journal(3000))
    svc.compress_archives("s")
    with (root / "s" / "archive" / stamp / "run.log.gz").open("ab") as extra:
        extra.write(b"junk")
    with pytest.raises(ArchiveCorrupt, match="covers"):
        svc.read_archive_log("s", stamp, "run.log")


@pytest.mark.parametrize("stamp", ["..", "../s", "20261130_124933_123456/..", "x", ""])
def test_a_stamp_that_is_not_a_stamp_name_is_refused(svc, root, stamp):
    svc.create_session("s")
    with pytest.raises(InvalidArgument, match="archive stamp must look like"):
        svc.read_archive_log("s", stamp, "run.log")


def test_a_symlinked_archive_log_reads_as_missing(svc, root, tmp_path):
    stamp = archived(svc, root, "s", b"a\n")
    (root / "s" / "archive" / stamp / "run.log").unlink()
    secret = tmp_path / "secret"
    secret.write_bytes(b"password\n")
    (root / "s" / "archive" / stamp / "run.log").symlink_to(secret)
    with pytest.raises(ArchiveNotFound):
        svc.read_archive_log("s", stamp, "run.log")


def test_an_archive_log_hard_linked_outside_the_session_is_not_read(svc, root, tmp_path):
    stamp = archived(svc, root, "s", b"a\n")
    (root / "s" / "archive" / stamp / "run.log").unlink()
    secret = tmp_path / "secret"
    secret.write_bytes(b"password\n")
    os.link(secret, root / "s" / "archive" / stamp / "run.log")
    with pytest.raises(ArchiveNotFound):
        svc.read_archive_log("s", stamp, "run.log")


def test_list_archives_gives_each_file_its_size_and_disk_use(svc, root):
    data = journal(12_000)
    stamp = archived(svc, root, "s", data)
    svc.compress_archives("s")
    listing = svc.list_archives("s")
    [entry] = listing["archives"]
    [log] = entry["files"]
    gz = root / "s" / "archive" / stamp / "run.log.gz"
    assert entry["stamp"] == stamp and entry["created"].startswith(stamp[:4])
    assert log == {"name": "run.log", "kind": "log", "compressed": True, "bytes": len(data),
                   "disk_bytes": log["disk_bytes"]}
    assert gz.stat().st_blocks * 512 <= log["disk_bytes"] < len(data) / 3


def test_a_killed_compression_leaves_the_plain_file_and_is_redone(svc, root):
    data = journal(3000)
    stamp = archived(svc, root, "s", data)
    stamp_dir = root / "s" / "archive" / stamp
    # Killed after both renames, before the plain file was removed; and a stale temp file.
    (stamp_dir / "run.log.gz").write_bytes(b"half")
    (stamp_dir / "run.log.gz.idx").write_bytes(b"{}")
    (stamp_dir / "run.log.gz.tmp").write_bytes(b"partial")
    assert svc.compress_archives("s")["files"] == 1
    assert sorted(os.listdir(stamp_dir)) == ["run.log.gz", "run.log.gz.idx"]
    assert gzip.decompress((stamp_dir / "run.log.gz").read_bytes()) == data


def test_an_archive_younger_than_min_age_stays_plain(svc, root):
    stamp = archived(svc, root, "s", journal(100))
    assert svc.compress_archives("s", min_age=3600)["deferred"] == 1
    assert (root / "s" / "archive" / stamp / "run.log").exists()


# -- through the gateway -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    running = launch(tmp_path_factory.mktemp("gw") / "workspaces", env={"UA_ARCHIVE_COMPRESS_DELAY": "0"})
    yield running
    running.stop()


def test_the_gateway_compresses_an_archive_after_a_compact_and_still_serves_it(gw):
    data = journal(5000)
    directory = gw.make_session("gz-1", {"run.log": data})
    stamp = gw.post("/api/v1/ops/sessions/gz-1/compact", body={"max_lines": 0}).json["archive_path"].split("/")[1]
    wait_for(lambda: (directory / "archive" / stamp / "run.log.gz").exists()
             and not (directory / "archive" / stamp / "run.log").exists())
    reply = gw.get(f"/api/v1/ops/sessions/gz-1/archives/{stamp}/run.log?limit=3")
    assert reply.status == 200
    assert reply.json["compressed"] is True and reply.json["lines"] == data.decode().splitlines()[-3:]
    listing = gw.get("/api/v1/ops/sessions/gz-1/archives").json
    assert listing["archives"][0]["files"][0]["compressed"] is True


def test_the_archive_route_answers_404_for_a_missing_archive(gw):
    gw.make_session("gz-2", {"run.log": b"x\n"})
    reply = gw.get("/api/v1/ops/sessions/gz-2/archives/20200101_000000_000000/run.log")
    assert reply.status == 404 and "archives lists what it has" in reply.json["detail"]


def test_the_archive_route_answers_400_for_a_file_that_is_not_a_log(gw):
    gw.make_session("gz-3", {"run.log": b"x\n"})
    reply = gw.get("/api/v1/ops/sessions/gz-3/archives/20200101_000000_000000/MEMORY.md")
    assert reply.status == 400 and "file must be one of" in reply.json["detail"]


def test_a_corrupt_archive_answers_500_with_what_is_wrong(gw):
    directory = gw.make_session("gz-4", {})
    stamp_dir = directory / "archive" / "20200101_000000_000000"
    stamp_dir.mkdir(parents=True)
    (stamp_dir / "run.log.gz").write_bytes(b"not gzip")
    (stamp_dir / "run.log.gz.idx").write_text(json.dumps(
        {"format": "ua-gateway-archive-index", "version": 1, "size": 5, "lines": 1, "members": [[0, 8, 0, 5, 1]]}))
    reply = gw.get("/api/v1/ops/sessions/gz-4/archives/20200101_000000_000000/run.log")
    assert reply.status == 500 and "corrupt" in reply.json["detail"]


def test_the_client_tails_an_archive_with_archive_stamp(gw, capsys):
    import ua_client

    data = journal(2000)
    gw.make_session("gz-5", {"run.log": data})
    stamp = gw.post("/api/v1/ops/sessions/gz-5/compact", body={"max_lines": 0}).json["archive_path"].split("/")[1]
    status = ua_client.main(["logs", "tail", "--session", "gz-5", "--archive", stamp, "--limit", "2", "--url", gw.url])
    assert status == 0
    assert capsys.readouterr().out.splitlines()[-2:] == data.decode().splitlines()[-2:]

"""A hostile review of issue 12 (disk): what broke when the compressor, compaction's accounting and the
pruner met a full disk, an old archive, a compaction killed half way, and a session woken mid-prune."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

import ops_service
from ops_service import OpsService, StorageFull

DAY = 86400.0


def du(path: Path) -> int:
    """du-style bytes under ``path``: each inode once, st_blocks * 512, symlinks not followed."""
    seen = set()
    total = 0
    for directory, dirs, files in os.walk(path):
        for name in [directory] + [os.path.join(directory, entry) for entry in files]:
            st = os.lstat(name)
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def lines(count: int) -> bytes:
    return b"".join(b"line %08d of an archived run, padded to look like a journal entry\n" % n for n in range(count))


def reset_archive(svc: OpsService, root: Path, session_id: str, data: bytes) -> Path:
    """A session whose run.log ``data`` a reset moved into an archive; returns the stamp's directory."""
    svc.create_session(session_id)
    (root / session_id / "run.log").write_bytes(data)
    return root / session_id / svc.reset_session(session_id)["archive_path"]


def test_a_compression_cut_short_by_a_full_disk_leaves_no_partial_gzip(svc, root, monkeypatch):
    stamp_dir = reset_archive(svc, root, "s", lines(50_000))
    real_write_all = ops_service._write_all
    writes = []

    def full_after_the_first_member(fd: int, data: bytes) -> None:
        writes.append(len(data))
        if len(writes) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write_all(fd, data)

    monkeypatch.setattr(ops_service, "_write_all", full_after_the_first_member)
    with pytest.raises(StorageFull):
        svc.compress_archives("s")
    # The partial .gz.tmp would hold the very bytes the full disk lacks until the next pass (an hour).
    assert sorted(os.listdir(stamp_dir)) == ["run.log"]
    assert (stamp_dir / "run.log").read_bytes() == lines(50_000)


def test_compressing_an_archive_keeps_its_age_for_retention(svc, root):
    stamp_dir = reset_archive(svc, root, "s", lines(1000))
    long_ago = time.time() - 100 * DAY
    os.utime(stamp_dir / "run.log", (long_ago, long_ago))
    os.utime(stamp_dir, (long_ago, long_ago))
    assert svc.compress_archives("s")["files"] == 1
    # Compression writes into the stamp (its mtime, the archive's age): it must not make the archive new.
    planned = svc.prune(archives_older_than_days=30, dry_run=True)["items"]
    assert [item["path"] for item in planned] == ["s/archive/" + stamp_dir.name]


def test_compact_without_archive_frees_nothing_while_an_archive_still_links_the_old_log(svc, root):
    svc.create_session("s")
    log = root / "s" / "run.log"
    log.write_bytes(lines(100_000))
    # What a compaction killed between its link and its swap leaves: the live log also named in an archive.
    leftover = root / "s" / "archive" / "20260101_000000_000000"
    leftover.mkdir(parents=True)
    os.link(log, leftover / "run.log")
    before = du(root / "s")
    result = svc.compact_session("s", max_lines=10, archive=False)
    assert result["bytes_freed"] == max(0, before - du(root / "s")) == 0
    assert (leftover / "run.log").read_bytes() == lines(100_000)


class WritesWhenAsked:
    """A ``protected`` set that is never live, but whose question "is it live?" comes just after the
    session's agent wrote to its run.log: activity between the plan and the removal."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __contains__(self, session_id: object) -> bool:
        with (self.root / str(session_id) / "run.log").open("ab") as log:
            log.write(b"a line written after the plan\n")
        return False


def test_a_prune_keeps_an_idle_session_that_wrote_after_the_plan(svc, root):
    svc.create_session("s")
    (root / "s" / "run.log").write_bytes(lines(10))
    long_ago = time.time() - 100 * DAY
    for path in (root / "s" / "run.log", root / "s"):
        os.utime(path, (long_ago, long_ago))
    result = svc.prune(sessions_idle_days=30, protected=WritesWhenAsked(root))
    assert (root / "s" / "run.log").read_bytes().endswith(b"a line written after the plan\n")
    assert result["items"] == [] and [entry["path"] for entry in result["failed"]] == ["s"]
    assert "active" in result["failed"][0]["error"]


def test_listing_archives_mid_swap_shows_the_log_once(svc, root):
    stamp_dir = reset_archive(svc, root, "s", lines(1000))
    assert svc.compress_archives("s")["files"] == 1
    # The moment between the compressor's renames and its unlink of the plain file (or a kill there).
    (stamp_dir / "run.log").write_bytes(lines(1000))
    files = svc.list_archives("s")["archives"][0]["files"]
    assert [(entry["name"], entry["kind"], entry["bytes"]) for entry in files] == [("run.log", "log", len(lines(1000)))]


def test_listing_archives_while_a_file_goes_answers_without_it(svc, root, monkeypatch):
    stamp_dir = reset_archive(svc, root, "s", lines(1000))
    real_stat = os.stat

    def gone_meanwhile(path, *args, **kwargs):  # the compressor's unlink, between listdir and stat
        if path == "run.log" and kwargs.get("dir_fd") is not None:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", gone_meanwhile)
    listing = svc.list_archives("s")
    monkeypatch.setattr(os, "stat", real_stat)
    assert [archive["stamp"] for archive in listing["archives"]] == [stamp_dir.name]


@pytest.mark.parametrize("typo", ["dryRun", "dry-run", "dryrun"])
def test_prune_refuses_a_misspelled_field_instead_of_running_for_real(gateway, typo):
    session_id = "typo-" + typo.lower()
    path = gateway.make_session(session_id, {"run.log": b"precious\n"})
    long_ago = time.time() - 100 * DAY
    for entry in (path / "run.log", path):
        os.utime(entry, (long_ago, long_ago))
    # Meant as a preview of a harsh policy; an ignored field made it a real run that deleted the session.
    reply = gateway.post("/api/v1/ops/prune", {typo: True, "sessions_idle_days": 30})
    assert reply.status == 400 and typo in reply.json["detail"] and "dry_run" in reply.json["detail"]
    assert (path / "run.log").read_bytes() == b"precious\n"


def test_a_sparse_archived_log_stays_plain_since_compressing_it_would_fill_the_disk(svc, root):
    svc.create_session("s")
    with (root / "s" / "run.log").open("wb") as log:  # a writer without O_APPEND after a truncate: holes
        log.write(b"first line\n")
        log.seek(64 << 20)
        log.write(b"last line\n")
    stamp_dir = root / "s" / svc.reset_session("s")["archive_path"]
    before = du(stamp_dir)
    assert svc.compress_archives("s")["files"] == 0
    assert sorted(os.listdir(stamp_dir)) == ["run.log"] and du(stamp_dir) == before
    assert svc.read_archive_log("s", stamp_dir.name, "run.log", limit=1)["lines"][0].endswith("\0last line")


def test_an_archive_whose_index_would_be_too_big_to_read_stays_plain(svc, root, monkeypatch):
    data = lines(40_000)  # three members
    stamp_dir = reset_archive(svc, root, "s", data)
    monkeypatch.setattr(ops_service, "MAX_ARCHIVE_INDEX_BYTES", 100)  # stands for a log of 300 GiB
    assert svc.compress_archives("s")["files"] == 0
    assert sorted(os.listdir(stamp_dir)) == ["run.log"]
    assert svc.read_archive_log("s", stamp_dir.name, "run.log", limit=1)["lines"] == [data.decode().splitlines()[-1]]


def test_purge_stale_keeps_a_session_written_to_after_it_was_chosen(svc, root):
    svc.create_session("s")
    (root / "s" / "run.log").write_bytes(lines(10))
    long_ago = time.time() - 100 * DAY
    for path in (root / "s" / "run.log", root / "s"):
        os.utime(path, (long_ago, long_ago))
    chosen = {row["session_id"]: row["last_activity_ns"] for row in svc.session_activity()}
    with (root / "s" / "run.log").open("ab") as log:  # between purge-stale's listing and its delete
        log.write(b"a line written after the listing\n")
    assert "active" in (svc.delete_idle_session("s", chosen["s"]) or "")
    assert (root / "s" / "run.log").read_bytes().endswith(b"a line written after the listing\n")
    assert svc.delete_idle_session("s", time.time_ns()) is None and not (root / "s").exists()


def test_a_planted_index_of_several_mib_is_refused_unread(svc, root):
    # Parsing a 13 MB index took 2 s of CPU (holding the GIL the event loop needs) and 190 MB, per request.
    svc.create_session("s")
    stamp_dir = root / "s" / "archive" / "20260101_000000_000000"
    stamp_dir.mkdir(parents=True)
    count = 250_000
    rows = ",".join("[%d,1,%d,1,0]" % (n, n) for n in range(count))
    index = '{"format":"ua-gateway-archive-index","version":1,"size":%d,"lines":0,"members":[%s]}' % (count, rows)
    assert len(index) > 5 << 20
    (stamp_dir / "run.log.gz.idx").write_text(index)
    with (stamp_dir / "run.log.gz").open("wb") as packed:
        packed.truncate(count)
    with pytest.raises(ops_service.ArchiveCorrupt, match="over"):
        svc.read_archive_log("s", stamp_dir.name, "run.log")

"""Compact and reset say what happened on disk, checked against a du-style measure (issue 12, item 1;
PROTOCOL.md §16.1): bytes dropped from the live logs, bytes held by the archive, bytes really freed."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from ops_service import InvalidArgument

from conftest import wait_for


def du(top: Path) -> int:
    """What ``du`` counts of the regular files under ``top``: allocated blocks, each inode once."""
    seen = set()
    total = 0
    for directory, _, files in os.walk(top):
        for name in files:
            st = os.lstat(os.path.join(directory, name))
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def numbered(count: int, width: int = 100) -> bytes:
    return b"".join(b"%0*d\n" % (width - 1, i) for i in range(count))


def test_compact_that_archives_reports_zero_freed_as_du_sees(svc, root):
    svc.create_session("s")
    (root / "s" / "run.log").write_bytes(numbered(20_000))
    before = du(root / "s")
    result = svc.compact_session("s", max_lines=100)
    assert result["bytes_freed"] == 0 and du(root / "s") >= before
    assert result["bytes_dropped"] == 19_900 * 100
    assert result["bytes_archived"] == 20_000 * 100


def test_repeated_compacts_never_claim_space_the_archive_keeps(svc, root):
    # The measurement: three compacts with appends between grew the directory each time.
    svc.create_session("s")
    (root / "s" / "run.log").write_bytes(numbered(5000))
    for _ in range(3):
        before = du(root / "s")
        result = svc.compact_session("s", max_lines=10)
        assert result["bytes_freed"] == max(0, before - du(root / "s")) == 0
        with (root / "s" / "run.log").open("ab") as log:
            log.write(numbered(3000))


def test_compact_without_archive_frees_exactly_what_du_loses(svc, root):
    svc.create_session("s")
    (root / "s" / "run.log").write_bytes(numbered(20_000))
    (root / "s" / "activity_journal.log").write_bytes(numbered(3000))
    before = du(root / "s")
    result = svc.compact_session("s", max_lines=100, archive=False)
    assert result["bytes_freed"] == before - du(root / "s") > 1_500_000
    assert result["bytes_archived"] == 0 and result["archive_path"] is None and result["archived"] is False
    assert not (root / "s" / "archive").exists()
    assert (root / "s" / "run.log").read_bytes() == numbered(20_000)[-100 * 100:]


def test_compact_refuses_an_archive_flag_that_is_not_a_boolean(svc, root):
    svc.create_session("s")
    with pytest.raises(InvalidArgument, match="archive"):
        svc.compact_session("s", archive="no")


def test_reset_reports_what_it_moved_and_frees_nothing(svc, root):
    svc.create_session("s")
    (root / "s" / "run.log").write_bytes(numbered(1000))
    (root / "s" / "MEMORY.md").write_bytes(b"m" * 5000)
    before = du(root / "s")
    result = svc.reset_session("s", clear_memory=True)
    assert result["bytes_dropped"] == 100_000
    assert result["bytes_archived"] == 105_000
    assert result["bytes_freed"] == 0 and du(root / "s") == before


def test_details_split_disk_use_into_live_and_archived_as_du_does(svc, root):
    svc.create_session("s")
    (root / "s" / "run.log").write_bytes(numbered(10_000))
    svc.compact_session("s", max_lines=10)
    disk = svc.session_details("s")["disk_bytes"]
    assert disk == {"total": du(root / "s"), "live": du(root / "s") - du(root / "s" / "archive"),
                    "archived": du(root / "s" / "archive")}


def test_list_sorted_by_disk_bytes_puts_the_largest_session_first(svc, root):
    for session_id, lines in (("small", 10), ("large", 5000), ("medium", 500)):
        svc.create_session(session_id)
        (root / session_id / "run.log").write_bytes(numbered(lines))
    for older in ("large", "medium"):
        os.utime(root / older / "run.log", (1_700_000_000, 1_700_000_000))  # small first in the default order
    sessions = svc.list_sessions(sort="disk_bytes")["sessions"]
    assert [s["session_id"] for s in sessions] == ["large", "medium", "small"]
    assert sessions[0]["disk_bytes"]["total"] == du(root / "large")


def test_list_keeps_the_default_order_for_a_sort_it_does_not_know(svc, root):
    for session_id, lines in (("small", 10), ("large", 5000)):
        svc.create_session(session_id)
        (root / session_id / "run.log").write_bytes(numbered(lines))
    os.utime(root / "large" / "run.log", (1_700_000_000, 1_700_000_000))  # small is the newest
    sessions = svc.list_sessions(sort="newest")["sessions"]  # UA's value: ignored, as UA ignores it
    assert [s["session_id"] for s in sessions] == ["small", "large"] and "disk_bytes" not in sessions[0]


def test_compact_without_archive_is_audited_in_the_gateway_log(gateway):
    directory = gateway.make_session("audit-1", {"run.log": numbered(2000)})
    reply = gateway.post("/api/v1/ops/sessions/audit-1/compact", body={"max_lines": 5, "archive": False})
    assert reply.status == 200 and reply.json["bytes_freed"] > 0
    log = gateway.workspaces / "_gateway" / "gateway.log"

    def audit():
        for line in log.read_text().splitlines() if log.exists() else []:
            record = json.loads(line)
            if record.get("event") == "compact_discard" and record.get("session_id") == "audit-1":
                return record
        return None

    record = wait_for(audit)
    assert record["bytes_dropped"] == reply.json["bytes_dropped"] and record["bytes_freed"] == reply.json["bytes_freed"]
    assert not (directory / "archive").exists()


def test_compact_answers_400_for_an_archive_flag_that_is_not_a_boolean(gateway):
    directory = gateway.make_session("audit-2", {"run.log": numbered(20)})
    reply = gateway.post("/api/v1/ops/sessions/audit-2/compact", body={"max_lines": 5, "archive": "false"})
    assert reply.status == 400 and "archive" in reply.json["detail"]
    assert (directory / "run.log").read_bytes() == numbered(20)

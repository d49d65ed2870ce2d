"""Retention on OpsService in process (PROTOCOL.md §15, issue 12 item 3): a simulated long run under a disk
budget, and the policies one at a time. The clock is injected (``now``) and the test sets mtimes, so 90
days run in a second or two.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

from ops_service import InvalidArgument, OpsService

DAY = 86400
T0 = 1_700_000_000  # the simulated run's first day (epoch seconds)
SESSIONS = 50
DAYS = 90
TURNS_PER_DAY = 4
DU_EVERY = 20  # turns between two independent measures of the root
TURN_BYTES = 6000  # one turn's output: a few lines appended to run.log
BUDGET = 3 * 1024 * 1024
ARCHIVE_DAYS = 45


def du(top: Path) -> int:
    """What ``du -sB1`` says: st_blocks * 512 of every entry, each inode once; independent of OpsService."""
    seen: Set[Tuple[int, int]] = set()
    total = 0
    for directory, dirs, files in os.walk(top):
        for name in [""] + dirs + files:
            st = os.lstat(os.path.join(directory, name)) if name else os.lstat(directory)
            if name in dirs:
                continue  # counted when walked into
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def protected_files(root: Path) -> Dict[str, Tuple[int, int, int]]:
    """Every live log and memory file under the root (archives excluded) with (inode, size, mtime):
    removing, truncating or rewriting one changes its entry."""
    found = {}
    for session in os.scandir(root):
        if session.name.startswith("_"):
            continue
        for entry in os.scandir(session.path):
            if entry.name in ("run.log", "activity_journal.log", "MEMORY.md"):
                st = entry.stat(follow_symlinks=False)
                found[f"{session.name}/{entry.name}"] = (st.st_ino, st.st_size, st.st_mtime_ns)
            elif entry.name == "memory":
                for memory in os.scandir(entry.path):
                    st = memory.stat(follow_symlinks=False)
                    found[f"{session.name}/memory/{memory.name}"] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return found


def archives(root: Path) -> Dict[str, float]:
    """Every archive stamp under the root with its mtime."""
    return {str(stamp.relative_to(root)): stamp.lstat().st_mtime
            for stamp in root.glob("*/archive/*")}


def age(path: Path, when: float) -> None:
    os.utime(path, (when, when), follow_symlinks=False)


class LongRun:
    """90 days of turns, compactions and resets across 50 sessions, pruned after every turn."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.svc = OpsService(root)
        self.svc.ensure_root()
        self.rng = random.Random(12)
        self.ids = [f"s{n:02d}" for n in range(SESSIONS)]
        for sid in self.ids:
            self.svc.create_session(sid)
            (root / sid / "MEMORY.md").write_text(f"memory of {sid}\n")
            (root / sid / "memory").mkdir()
            (root / sid / "memory" / "notes.md").write_text("notes\n" * 10)
        self.peak = 0
        self.largest_turn = 0
        self.prunes: List[dict] = []

    def turn(self, now: float) -> None:
        sid = self.rng.choice(self.ids)
        self.svc.append_log(sid, "run.log", (f"turn at {now}: " + "x" * 90 + "\n").encode() * (TURN_BYTES // 110))
        age(self.root / sid / "run.log", now)
        roll = self.rng.random()
        made = None
        if roll < 0.25:
            made = self.svc.compact_session(sid, max_lines=5)["archive_path"]
        elif roll < 0.35:
            made = self.svc.reset_session(sid, clear_memory=False)["archive_path"]
        if made:
            age(self.root / sid / made, now)

    def prune(self, now: float, dry_run: bool = False) -> dict:
        return self.svc.prune(archives_older_than_days=ARCHIVE_DAYS, budget_bytes=BUDGET, now=now, dry_run=dry_run)


@pytest.fixture(scope="module")
def long_run(tmp_path_factory: pytest.TempPathFactory) -> LongRun:
    """Runs the whole simulation once, recording each prune; the tests read what it recorded. The root is
    measured by the test's own du every DU_EVERY turns (a du of 50 sessions costs as much as a prune)."""
    run = LongRun(tmp_path_factory.mktemp("long") / "root")
    run.dry_runs_matched = 0  # type: ignore[attr-defined]
    after_prune = du(run.root)
    turns = 0
    for day in range(DAYS):
        for step in range(TURNS_PER_DAY):
            now = T0 + day * DAY + step * 60
            run.turn(now)
            turns += 1
            kept_before = protected_files(run.root)
            archives_before = archives(run.root)
            planned = run.prune(now, dry_run=True) if step == 0 and day % 9 == 0 else None
            if planned is not None:
                assert archives(run.root) == archives_before, "a dry run removed nothing"
            result = run.prune(now)
            record = {"day": day, "result": result, "kept_before": kept_before, "kept_after": protected_files(run.root),
                      "archives_before": archives_before, "archives_after": archives(run.root)}
            if planned is not None:
                assert planned["items"] == result["items"], f"day {day}: the dry run listed what the run removed"
                run.dry_runs_matched += 1  # type: ignore[attr-defined]
            grown = result["disk"]["used_bytes_before"]
            run.largest_turn = max(run.largest_turn, grown - after_prune)
            run.peak = max(run.peak, grown)
            after_prune = result["disk"]["used_bytes_after"]
            if turns % DU_EVERY == 0:
                record["du_after"] = du(run.root)
            run.prunes.append(record)
    return run


def test_long_run_stays_within_the_budget_but_for_one_turn(long_run):
    reasons = [item["reason"] for p in long_run.prunes for item in p["result"]["items"]]
    assert reasons.count("budget") > 20 and reasons.count("age") > 20, "both policies were exercised"
    assert all(p["result"]["disk"]["used_bytes_after"] <= BUDGET for p in long_run.prunes)
    assert all(p["du_after"] <= BUDGET for p in long_run.prunes if "du_after" in p)
    assert long_run.peak <= BUDGET + long_run.largest_turn


def test_long_run_never_removes_a_live_log_byte_or_a_memory_file(long_run):
    for prune in long_run.prunes:
        assert prune["kept_after"] == prune["kept_before"], f"day {prune['day']}"


def test_long_run_removes_only_archives_older_than_every_archive_kept(long_run):
    for prune in long_run.prunes:
        gone = set(prune["archives_before"]) - set(prune["archives_after"])
        assert gone == {item["path"] for item in prune["result"]["items"]}
        if gone and prune["archives_after"]:
            assert max(prune["archives_before"][p] for p in gone) <= min(prune["archives_after"].values())


def test_long_run_reports_the_root_size_as_du_measures_it(long_run):
    measured = [p for p in long_run.prunes if "du_after" in p]
    assert len(measured) >= DAYS * TURNS_PER_DAY // DU_EVERY
    for prune in measured:
        assert prune["result"]["disk"]["used_bytes_after"] == prune["du_after"], f"day {prune['day']}"


def test_long_run_frees_exactly_the_bytes_it_reports(long_run):
    for prune in long_run.prunes:
        disk = prune["result"]["disk"]
        assert disk["used_bytes_before"] - disk["used_bytes_after"] == prune["result"]["totals"]["bytes"]


def test_long_run_dry_runs_list_exactly_what_the_run_removed(long_run):
    assert long_run.dry_runs_matched >= 9


def test_long_run_age_policy_leaves_no_archive_older_than_its_retention(long_run):
    last_day = T0 + (DAYS - 1) * DAY
    assert min(archives(long_run.root).values()) > last_day - ARCHIVE_DAYS * DAY - DAY


# -- the policies one at a time ------------------------------------------------------------------------


def make_session(svc: OpsService, sid: str, when: float, archive_stamps: int = 0) -> Path:
    svc.create_session(sid)
    path = svc.root / sid
    (path / "run.log").write_bytes(b"live\n")
    for n in range(archive_stamps):
        stamp = path / "archive" / f"2023010{n}_000000_000000"
        stamp.mkdir(parents=True)
        (stamp / "run.log").write_bytes(b"old\n" * 1000)
        age(stamp, when - n * DAY)
    for entry in (path / "run.log", path):
        age(entry, when)
    return path


def test_idle_sessions_are_removed_whole_but_never_a_protected_one(svc):
    make_session(svc, "old-free", T0 - 30 * DAY)
    make_session(svc, "old-live", T0 - 30 * DAY)
    make_session(svc, "recent", T0 - 1 * DAY)
    result = svc.prune(sessions_idle_days=7, protected={"old-live"}, now=T0)
    assert [(i["kind"], i["session_id"]) for i in result["items"]] == [("session", "old-free")]
    assert result["kept_live"] == ["old-live"]
    assert sorted(p.name for p in svc.root.iterdir()) == ["_gateway", "old-live", "recent"]


def test_a_session_that_becomes_live_after_the_plan_is_kept(svc):
    make_session(svc, "old", T0 - 30 * DAY)

    class LiveOnSecondLook:
        looks = 0

        def __contains__(self, sid):
            self.looks += 1
            return self.looks > 1

    result = svc.prune(sessions_idle_days=7, protected=LiveOnSecondLook(), now=T0)
    assert result["items"] == [] and "became active" in result["failed"][0]["error"]
    assert (svc.root / "old" / "run.log").exists()


def test_an_archive_holding_memory_is_never_pruned(svc):
    path = make_session(svc, "mem", T0)
    stamp = path / "archive" / "20230101_000000_000000"
    stamp.mkdir(parents=True)
    (stamp / "MEMORY.md").write_text("remember\n")
    age(stamp, T0 - 400 * DAY)
    result = svc.prune(archives_older_than_days=1, budget_bytes=1, now=T0)
    assert result["items"] == [] and (stamp / "MEMORY.md").exists()
    assert result["disk"]["over_budget"] is True


def test_trash_entries_older_than_their_retention_are_emptied_first_under_a_budget(svc):
    trash = svc.root / "_gateway" / "trash"
    trash.mkdir(parents=True, exist_ok=True)
    for name, days in (("a.20230101", 10), ("b.20230102", 1)):
        (trash / name).mkdir()
        (trash / name / "run.log").write_bytes(b"gone\n" * 100)
        age(trash / name, T0 - days * DAY)
    result = svc.prune(trash_older_than_days=5, now=T0)
    assert [i["path"] for i in result["items"]] == ["_gateway/trash/a.20230101"]
    result = svc.prune(trash_older_than_days=5, budget_bytes=1, now=T0)
    assert [(i["kind"], i["reason"]) for i in result["items"]] == [("trash", "budget")]
    assert list(trash.iterdir()) == []


def test_budget_removes_archives_oldest_first_across_sessions(svc):
    make_session(svc, "a", T0, archive_stamps=3)  # archives aged 0, 1, 2 days
    make_session(svc, "b", T0 - DAY // 2, archive_stamps=3)  # 0.5, 1.5, 2.5 days
    plan = svc.prune(budget_bytes=1, now=T0, dry_run=True)
    used, one = plan["disk"]["used_bytes_before"], plan["items"][0]["bytes"]
    result = svc.prune(budget_bytes=used - 3 * one, now=T0)
    assert [i["path"] for i in result["items"]] == [
        "b/archive/20230102_000000_000000", "a/archive/20230102_000000_000000", "b/archive/20230101_000000_000000"]
    assert not result["disk"]["over_budget"] and svc.disk_usage()["used_bytes"] <= used - 3 * one


def test_a_hard_linked_archive_file_is_not_counted_as_freed(svc):
    path = make_session(svc, "linked", T0)
    stamp = path / "archive" / "20230101_000000_000000"
    stamp.mkdir(parents=True)
    os.link(path / "run.log", stamp / "run.log")  # what a compaction killed midway leaves
    age(stamp, T0 - 10 * DAY)
    directory_only = os.lstat(stamp).st_blocks * 512  # the file's blocks stay in use by run.log
    item = svc.prune(archives_older_than_days=1, now=T0)["items"][0]
    assert item["bytes"] == directory_only
    assert (path / "run.log").read_bytes() == b"live\n" and os.lstat(path / "run.log").st_nlink == 1


@pytest.mark.parametrize("field, value", [
    ("archives_older_than_days", -1), ("archives_older_than_days", "7"), ("sessions_idle_days", float("nan")),
    ("budget_bytes", 0), ("budget_bytes", 1.5), ("budget_bytes", True), ("dry_run", "yes"),
])
def test_bad_policy_values_are_refused_naming_the_field(svc, field, value):
    with pytest.raises(InvalidArgument) as caught:
        svc.prune(**{field: value})
    assert field in caught.value.detail


def test_session_disk_usage_splits_live_and_archived_bytes(svc):
    make_session(svc, "split", T0, archive_stamps=2)
    usage = svc.disk_usage("split")
    assert usage["archive_bytes"] > 0 and usage["used_bytes"] == usage["archive_bytes"] + usage["live_bytes"]
    assert usage["used_bytes"] == du(svc.root / "split")
    assert stat.S_ISDIR(os.lstat(svc.root / "split").st_mode)

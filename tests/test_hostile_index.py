"""A hostile review of the session index and the kept-open logs (issue 15; PROTOCOL.md §17): what other
writers do to the workspaces root that the first build missed. Each list here must equal
``OpsService.list_sessions`` on the same disk within the stated bound."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import wait_for
from ops_service import OpsService
from test_session_index import OUTSIDE_BOUND, running_index, strip, without_ages


def agrees(index, svc: OpsService) -> bool:
    return without_ages(strip(index.list_sessions(limit=1000))) == without_ages(svc.list_sessions(limit=1000))


def described(svc: OpsService, session_id: str) -> Path:
    svc.create_session(session_id)
    directory = svc.root / session_id
    (directory / "description.txt").write_bytes(b"before")
    return directory


def test_a_session_renamed_by_another_process_still_shows_later_writes_to_it(svc, root):
    described(svc, "before-mv")
    with running_index(svc) as index:
        watch = next(wd for wd, name in index._watches.items() if name == "before-mv")
        os.rename(root / "before-mv", root / "after-mv")
        assert wait_for(lambda: agrees(index, svc), timeout=OUTSIDE_BOUND)
        # The directory's own IN_MOVE_SELF handled (its first watch let go), as it is before any later write.
        assert wait_for(lambda: index.catch_up() or watch not in index._watches, timeout=OUTSIDE_BOUND)
        (root / "after-mv" / "description.txt").write_bytes(b"written after the rename")
        assert wait_for(lambda: agrees(index, svc), timeout=OUTSIDE_BOUND)


def test_a_swapped_root_lists_the_new_roots_sessions_not_the_old_ones(svc, root, tmp_path):
    described(svc, "old-only")
    described(svc, "in-both")
    with running_index(svc) as index:
        os.rename(root, tmp_path / "old-root")
        root.mkdir()
        described(svc, "in-both").joinpath("description.txt").write_bytes(b"the new root's")
        assert wait_for(lambda: agrees(index, svc), timeout=OUTSIDE_BOUND)


def test_after_a_root_swap_writes_in_the_new_roots_sessions_are_seen(svc, root, tmp_path):
    described(svc, "in-both")
    with running_index(svc) as index:
        os.rename(root, tmp_path / "old-root")
        root.mkdir()
        described(svc, "in-both")
        assert wait_for(lambda: agrees(index, svc), timeout=OUTSIDE_BOUND)
        (root / "in-both" / "description.txt").write_bytes(b"written in the new root later")
        assert wait_for(lambda: agrees(index, svc), timeout=OUTSIDE_BOUND)


def test_a_root_removed_and_made_again_lists_what_is_put_in_it(svc, root):
    described(svc, "removed-with-the-root")
    with running_index(svc) as index:
        for path in sorted(root.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        root.rmdir()
        root.mkdir()  # often the same inode number as the removed root
        svc.ensure_root()
        described(svc, "made-in-the-new-root")
        assert wait_for(lambda: agrees(index, svc), timeout=OUTSIDE_BOUND)

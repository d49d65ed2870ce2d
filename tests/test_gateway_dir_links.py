"""Names an agent can plant under the workspaces root never lead the gateway outside it, nor make it slow.

(A) ``<root>/_gateway`` swapped for a symlink: the gateway log, rotation, start-up and the trash never
follow it. (B) a live log with two links and a huge ``archive/``: reads look at a few stamps only, and
session details list at most DETAILS_MAX_ENTRIES names. (C) health names the root's path only to a caller
who passes the token checks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ops_service
from conftest import ROOT, gateway_env, launch, wait_for
from ops_service import DETAILS_MAX_ENTRIES, GATEWAY_DIR_NAME, OWN_LOG_STAMPS, TRASH_DIR_NAME, OpsService

TOKEN = "t" * 32
POLL_TIMEOUT = 5.0  # the log is written every 0.1 s and the root checked every 1 s


def poll(condition):
    return wait_for(condition, timeout=POLL_TIMEOUT)


def swap_gateway_dir_for_link(workspaces: Path, outside: Path) -> None:
    (workspaces / GATEWAY_DIR_NAME).rename(workspaces / "_gateway.moved")
    (workspaces / GATEWAY_DIR_NAME).symlink_to(outside)


# -- (A) _gateway as a symlink -------------------------------------------------------------------------------


def test_gateway_log_is_never_written_through_a_symlinked_gateway_dir(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    gateway = launch(tmp_path / "workspaces")
    try:
        swap_gateway_dir_for_link(gateway.workspaces, outside)
        for _ in range(3):
            gateway.get("/api/v1/ops/sessions")  # every request is logged
        health = poll(lambda: (lambda r: r if r.json["log_dropped"] else None)(gateway.get("/api/v1/health")))
        assert health is not None and health.status == 503 and "symlink" in health.json["detail"]
        assert os.listdir(outside) == []
    finally:
        gateway.stop()
    assert os.listdir(outside) == []


def test_gateway_log_writes_again_once_the_symlink_is_replaced_by_a_directory(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    gateway = launch(tmp_path / "workspaces")
    try:
        swap_gateway_dir_for_link(gateway.workspaces, outside)
        assert poll(lambda: gateway.get("/api/v1/health").status == 503)
        (gateway.workspaces / GATEWAY_DIR_NAME).unlink()
        assert poll(lambda: gateway.get("/api/v1/health").status == 200)
    finally:
        gateway.stop()
    assert (gateway.workspaces / GATEWAY_DIR_NAME / "gateway.log").is_file()
    assert os.listdir(outside) == []


def test_start_refuses_a_symlinked_gateway_dir_and_names_it(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    workspaces = tmp_path / "workspaces"
    workspaces.mkdir()
    (workspaces / GATEWAY_DIR_NAME).symlink_to(outside)
    process = subprocess.run(
        [sys.executable, str(ROOT / "ua_gateway.py"), "--port", "0", "--workspaces", str(workspaces)],
        env=gateway_env(), capture_output=True, timeout=15,
    )
    assert process.returncode == 2
    assert b"_gateway is a symlink" in process.stderr
    assert os.listdir(outside) == []


def test_trash_removal_never_follows_a_symlinked_gateway_dir(tmp_path):
    outside = tmp_path / "outside"
    (outside / TRASH_DIR_NAME / "victim.1" / "data").mkdir(parents=True)
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / GATEWAY_DIR_NAME).symlink_to(outside)
    ops = OpsService(tmp_path / "root")
    ops._remove_from_trash(str(tmp_path / "root" / GATEWAY_DIR_NAME / TRASH_DIR_NAME / "victim.1"))
    assert (outside / TRASH_DIR_NAME / "victim.1" / "data").is_dir()


def test_trash_removal_removes_a_tree_deeper_than_the_descriptor_bound(tmp_path):
    ops = OpsService(tmp_path / "root")
    ops.ensure_root()
    deep = tmp_path / "root" / GATEWAY_DIR_NAME / TRASH_DIR_NAME / "s.1"
    path = deep
    for _ in range(ops_service.MAX_TREE_DEPTH * 3):
        path = path / "d"
    path.mkdir(parents=True)
    (path / "f").write_text("x")
    (deep / "link").symlink_to(tmp_path)
    ops._remove_from_trash(str(deep))
    assert os.listdir(tmp_path / "root" / GATEWAY_DIR_NAME / TRASH_DIR_NAME) == []
    assert (tmp_path / "root").is_dir()


# -- (B) a hard-linked live log and a huge archive -------------------------------------------------------------


def linked_session_with_archive(root: Path, stamps: int) -> None:
    session = root / "s1"
    (session / "archive").mkdir(parents=True)
    outside = root.parent / "outside.txt"
    outside.write_text("outside\n")
    os.link(outside, session / "run.log")  # two links: the other name is outside the session
    for index in range(stamps):
        (session / "archive" / f"20260101T000000.{index:06d}Z").mkdir()


def test_own_log_check_opens_only_the_newest_stamps(tmp_path, monkeypatch):
    root = tmp_path / "root"
    linked_session_with_archive(root, 500)
    opened = []
    real = ops_service._dir_at

    def counting(name, dir_fd):
        opened.append(name)
        return real(name, dir_fd)

    monkeypatch.setattr(ops_service, "_dir_at", counting)
    OpsService(root).read_log("s1", "run.log")
    assert len(opened) <= OWN_LOG_STAMPS + 1  # archive/ and the newest stamps


def test_session_details_cap_files_and_archives(tmp_path):
    workspaces = tmp_path / "workspaces"
    linked_session_with_archive(workspaces, DETAILS_MAX_ENTRIES + 5)
    for index in range(DETAILS_MAX_ENTRIES + 7):
        (workspaces / "s1" / f"f{index:05d}").write_bytes(b"")
    gateway = launch(workspaces)
    try:
        details = gateway.get("/api/v1/ops/sessions/s1").json
    finally:
        gateway.stop()
    assert len(details["archives"]) == DETAILS_MAX_ENTRIES and details["archives_truncated"] is True
    assert details["archives_total"] == DETAILS_MAX_ENTRIES + 5
    assert details["archives"][-1] == f"20260101T000000.{DETAILS_MAX_ENTRIES + 4:06d}Z"  # the newest kept
    assert len(details["files"]) == DETAILS_MAX_ENTRIES and details["files_truncated"] is True
    assert details["files_total"] == DETAILS_MAX_ENTRIES + 7 + 2  # plus archive and run.log


# -- (C) health and the root's path ----------------------------------------------------------------------------


def missing_root_health(tmp_path: Path, token: str | None):
    gateway = launch(tmp_path / "workspaces", env={"UA_OPS_TOKEN": TOKEN})
    try:
        (tmp_path / "workspaces").rename(tmp_path / "elsewhere")
        assert poll(lambda: gateway.get("/api/v1/health").status == 503)
        return gateway.get("/api/v1/health", token=token)
    finally:
        gateway.stop()


def test_public_health_tells_the_root_is_missing_without_its_path(tmp_path):
    reply = missing_root_health(tmp_path, None)
    assert reply.status == 503 and "missing" in reply.json["detail"]
    assert str(tmp_path) not in reply.json["detail"]


def test_health_with_the_token_names_the_missing_root(tmp_path):
    reply = missing_root_health(tmp_path, TOKEN)
    assert reply.status == 503 and str(tmp_path / "workspaces") in reply.json["detail"]


def test_health_with_a_wrong_token_does_not_name_the_root(tmp_path):
    reply = missing_root_health(tmp_path, "wrong" * 8)
    assert reply.status == 503 and str(tmp_path) not in reply.json["detail"]

"""The walker on real temp trees: FIFOs, symlink loops, permissions, vanished files."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from agent import platform
from agent.sources.walk import WalkCounters, iter_files
from tests.conftest import FIXTURES


def _paths(items):
    return sorted(os.path.relpath(i.path) for i in items)


def test_fifo_is_reported_and_never_opened(tmp_path):
    os.mkfifo(tmp_path / "pipe.exe")
    shutil.copy(FIXTURES / "files" / "pulseway.exe", tmp_path / "a.exe")
    started = time.monotonic()
    items = {os.path.basename(i.path): i for i in iter_files([str(tmp_path)])}
    assert time.monotonic() - started < 5
    assert items["pipe.exe"].status == "NOT_PE" and "fifo" in items["pipe.exe"].detail
    assert items["a.exe"].status == "" and items["a.exe"].size > 0


def test_open_regular_refuses_a_fifo_without_blocking(tmp_path):
    fifo = tmp_path / "p"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(platform.SpecialFile, match="fifo"):
        platform.open_regular(str(fifo))
    assert time.monotonic() - started < 2


def test_symlink_loops_end(tmp_path):
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "e" / "f.bin").write_bytes(b"x")
    os.symlink(tmp_path / "d", tmp_path / "d" / "e" / "loop")
    os.symlink(tmp_path / "d" / "e" / "f.bin", tmp_path / "link.bin")
    counters = WalkCounters()
    items = list(iter_files([str(tmp_path)], counters=counters))
    assert [os.path.basename(i.path) for i in items] == ["f.bin"]
    assert counters.symlinks_skipped == 2
    followed = list(iter_files([str(tmp_path)], follow_symlinks=True))
    names = sorted(os.path.basename(i.path) for i in followed)
    assert names == ["f.bin", "link.bin"]  # the loop is entered once at most, the file link is read


def test_skip_dirs_are_not_entered(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "x").write_bytes(b"x")
    (tmp_path / "y").write_bytes(b"y")
    counters = WalkCounters()
    items = list(iter_files([str(tmp_path)], skip_dirs=frozenset({str(tmp_path / "proc")}), counters=counters))
    assert [os.path.basename(i.path) for i in items] == ["y"]
    assert counters.mounts_skipped == 1


def test_a_missing_root_is_an_error_not_a_crash(tmp_path):
    errors: list = []
    assert list(iter_files([str(tmp_path / "nope")], errors=errors)) == []
    assert errors and "VANISHED" in errors[0][1]


def test_mountinfo_parsing_skips_pseudo_filesystems():
    info = (
        "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n"
        "23 22 0:5 / /proc rw - proc proc rw\n"
        "24 22 0:6 / /sys rw - sysfs sysfs rw\n"
        "25 22 0:7 / /mnt/my\\040share rw - cifs //srv/share rw\n"
        "26 22 0:8 / /home rw - xfs /dev/sdb1 rw\n"
        "27 22 0:9 / /sys/fs/cgroup rw - cgroup2 cgroup rw\n"
    )
    mounts = platform.linux_mounts(info)
    assert ("/mnt/my share", "cifs") in mounts
    skipped = platform.skipped_mount_points(mounts)
    assert {"/proc", "/sys", "/mnt/my share", "/sys/fs/cgroup", "/dev", "/run"} <= skipped
    assert "/home" not in skipped and "/" not in skipped


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to an unprivileged user")
def test_permission_denied_is_a_status_when_unprivileged():
    """Scan as 'nobody' in a forked child (root reads everything, so the denial needs a real other user)."""
    import json
    import pwd
    import tempfile
    import traceback
    from pathlib import Path

    from agent.rows import Device
    from agent.scanner import Matcher, Scanner
    from agent.store import Store

    tmp_path = Path(tempfile.mkdtemp(prefix="rmmhunt-perm-"))  # pytest's tmp_path is not reachable by nobody
    tree = tmp_path / "tree"
    (tree / "locked").mkdir(parents=True)
    shutil.copy(FIXTURES / "files" / "pulseway.exe", tree / "open.exe")
    shutil.copy(FIXTURES / "files" / "pulseway.exe", tree / "secret.exe")
    os.chmod(tree / "secret.exe", 0o000)
    os.chmod(tree / "locked", 0o000)
    for p in (tmp_path, tree):
        os.chmod(p, 0o777)
    nobody = pwd.getpwnam("nobody")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop privileges, scan, report, exit without running pytest's teardown
        code = 1
        try:
            os.close(read_end)
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            with Store(tmp_path / "state.sqlite3") as store:
                scanner = Scanner(
                    store,
                    Device("0" * 40, "host"),
                    Matcher([]),
                    None,
                    max_file_size=1 << 20,
                    file_time_budget=10,
                    reobserve_interval=60,
                )
                stats = scanner.scan([str(tree)])
            os.write(write_end, json.dumps({"errors": stats.errors, "statuses": stats.statuses}).encode())
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    os.chmod(tree / "locked", 0o755)
    shutil.rmtree(tmp_path)
    assert os.waitstatus_to_exitcode(status) == 0
    payload = json.loads(data)
    statuses = {os.path.basename(e["path"]): e["status"] for e in payload["errors"]}
    assert statuses == {"secret.exe": "ACCESS_DENIED", "locked": "DIRECTORY_ERROR"}
    assert payload["statuses"]["OK"] == 1

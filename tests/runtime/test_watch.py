"""watch / run: real watchdog events on real temporary directories, the real store and rules."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.cli import main
from agent.service.budgets import JsonFormatter
from agent.service.runner import CONFIG_CHECK_EVERY
from agent.service.status import load_status
from agent.sources.watch import LINUX_WATCH_ROOTS, Watcher, linux_default_watch_roots, windows_default_watch_roots
from agent.textenc import escape_path
from tests.conftest import ROOT
from tests.runtime.conftest import (
    PULSEWAY_RULE,
    SIGNED_DWSERVICE,
    SIGNED_PULSEWAY,
    loader,
    stored_rows,
    wait_for,
    write_config,
)


@contextlib.contextmanager
def finding_lines():
    """The finding log lines, as the agent writes them (JSON)."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("rmmhunt.finding")
    logger.addHandler(handler)
    try:
        yield lambda: [json.loads(line) for line in buf.getvalue().splitlines()]
    finally:
        logger.removeHandler(handler)


def rows_for(state: Path, path: Path) -> list[dict]:
    return [r for r in stored_rows(state) if r["FolderPath"] == str(path)]


def committed_sources(state: Path, path: Path) -> list[str]:
    """Source of each committed row for ``path``, read through a read-only connection."""
    import sqlite3

    db = sqlite3.connect(f"file:{state / 'rmmhunt.sqlite3'}?mode=ro", uri=True)
    try:
        return [r[0] for r in db.execute('SELECT "Source" FROM cert_rows WHERE "FolderPath" = ?', (str(path),))]
    finally:
        db.close()


def status_json(state: Path) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["status", "--format", "json", "--state-dir", str(state)])
    return json.loads(out.getvalue())[0]


def test_watch_catches_up_then_reports_a_renamed_binary_in_a_new_directory(tmp_path, agent_thread):
    watched, state = tmp_path / "w", tmp_path / "state"
    watched.mkdir()
    before = watched / "while_down.exe"
    shutil.copy(SIGNED_DWSERVICE, before)  # landed while the agent was down
    config = write_config(tmp_path / "agent.toml", settle_seconds=0.3)
    with finding_lines() as findings:
        agent = agent_thread(loader(config, state), mode="watch", paths=[str(watched)])
        assert [r["Source"] for r in rows_for(state, before)] == ["scan"]  # the start-up walk caught it

        new_dir = watched / "new" / "deeper"  # created after start: watched too
        new_dir.mkdir(parents=True)
        time.sleep(0.2)
        partial = new_dir / "download.part"
        shutil.copy(SIGNED_PULSEWAY, partial)
        final = new_dir / "Pulseway Setup.exe"
        partial.rename(final)

        rows = wait_for(lambda: rows_for(state, final))
        assert {r["Source"] for r in rows} == {"watch"}
        lines = wait_for(lambda: [x for x in findings() if x["FolderPath"] == escape_path(str(final))])
        assert lines[0]["event"] == "finding" and lines[0]["RuleId"] == PULSEWAY_RULE
        assert lines[0]["Tool"] == "Pulseway" and lines[0]["ReportId"] == rows[0]["ReportId"]

        status = status_json(state)
        assert status["Running"] is True and status["Pid"] == os.getpid()
        assert status["WatchedRoots"] == [str(watched)] and status["UncoveredRoots"] == []
        assert status["LastFullScanSummary"]["files"] == 1
        agent.runner.status_requested.set()
        wait_for(lambda: status_json(state)["FindingsByTool"] == {"DWService": 1, "Pulseway": 1})
        assert agent.stop() == 0
    after = status_json(state)
    assert after["Running"] is False and load_status(state)["state"] == "stopped"


def test_a_half_written_file_waits_and_is_never_forgotten(tmp_path, agent_thread):
    watched, state = tmp_path / "w", tmp_path / "state"
    watched.mkdir()
    config = write_config(tmp_path / "agent.toml", settle_seconds=0.6)
    data = SIGNED_PULSEWAY.read_bytes()
    agent = agent_thread(loader(config, state), mode="watch", paths=[str(watched)])

    # a writer that pauses (shorter than the settle time) is not parsed half-way
    slow = watched / "slow.exe"
    with open(slow, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(0.3)
        assert agent.runner.watch_stats.parsed == 0
        f.write(data[len(data) // 2 :])
    wait_for(lambda: rows_for(state, slow))
    assert agent.runner.watch_stats.statuses["PARSE_ERROR"] == 0

    # a writer that pauses longer: the half file is examined (and fails), then the rest arrives
    paused = watched / "paused.exe"
    with open(paused, "wb") as f:
        f.write(data[:1024])
        f.flush()
        wait_for(lambda: agent.runner.watch_stats.parsed >= 2)  # settled, examined half-written
        assert not rows_for(state, paused)
        f.write(data[1024:])
    rows = wait_for(lambda: rows_for(state, paused))  # not forgotten: the completed file is examined again
    assert rows[0]["SHA256"] == rows_for(state, slow)[0]["SHA256"]
    agent.stop()


def _root_inotify_watches() -> int:
    """Inotify watches held by root's processes right now (what max_user_watches counts)."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid != 0:
                continue
            for fd in os.listdir(f"/proc/{pid}/fdinfo"):
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    total += sum(1 for line in f if line.startswith("inotify wd:"))
        except OSError:
            continue
    return total


def test_running_out_of_inotify_watches_is_a_status_with_periodic_scans(tmp_path, agent_thread):
    """Provoked for real: fs.inotify.max_user_watches is lowered just above what is in use while the
    watches are placed (we run as root), and restored at once."""
    limit_file = Path("/proc/sys/fs/inotify/max_user_watches")
    watched, state = tmp_path / "w", tmp_path / "state"
    for i in range(30):
        (watched / f"d{i:02d}" / "inner").mkdir(parents=True)
    config = write_config(tmp_path / "agent.toml", settle_seconds=0.2)
    original = limit_file.read_text()
    try:
        limit_file.write_text(str(_root_inotify_watches() + 8))
    except OSError as exc:  # not allowed here: say so instead of pretending
        pytest.fail(f"cannot lower max_user_watches ({exc}); this test needs root")
    try:
        agent = agent_thread(loader(config, state), mode="watch", paths=[str(watched)], uncovered_scan_interval=0.5)
    finally:
        limit_file.write_text(original)
    uncovered = agent.runner.watcher.uncovered()
    assert uncovered, "some directories must be left without a watch"
    assert all("ENOSPC" in u.reason for u in uncovered)
    agent.runner.status_requested.set()
    expected = {escape_path(u.path) for u in uncovered}
    wait_for(lambda: {u["path"] for u in status_json(state)["UncoveredRoots"]} == expected)

    # a file landing in an uncovered subtree is found by the periodic fallback scan
    target = Path(uncovered[-1].path) / "late.exe"
    shutil.copy(SIGNED_PULSEWAY, target)
    rows = wait_for(lambda: rows_for(state, target), timeout=15)
    assert rows[0]["Source"] == "scan"
    agent.stop()


def test_watcher_ignores_the_agents_own_state_directory(tmp_path):
    watched = tmp_path / "w"
    (watched / "state").mkdir(parents=True)
    with Watcher([str(watched)], settle_seconds=0.0, ignore=[str(watched / "state")]) as w:
        (watched / "state" / "db").write_bytes(b"x")
        (watched / "other.bin").write_bytes(b"y")
        ready = wait_for(lambda: w.poll())
    assert [r.path for r in ready] == [str(watched / "other.bin")]


def test_sighup_and_a_changed_config_reload_and_a_bad_reload_keeps_the_last_good_set(tmp_path):
    watched, state = tmp_path / "w", tmp_path / "state"
    watched.mkdir()
    log_file = state / "agent.log"
    good = {"watch_roots": [str(watched)], "settle_seconds": 0.2, "log_file": str(log_file), "rescan_interval": 0}
    config = write_config(tmp_path / "agent.toml", **good, process_sweep_interval=0)
    cmd = [sys.executable, "-m", "agent.cli", "run", "--config", str(config), "--state-dir", str(state)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def events(name: str) -> list[dict]:
        try:
            text = log_file.read_text()
        except FileNotFoundError:
            return []
        complete = text[: text.rfind("\n") + 1].splitlines()  # the agent may be writing the last line
        return [json.loads(line) for line in complete if f'"{name}"' in line]

    try:
        wait_for(lambda: (load_status(state) or {}).get("state") == "running", 30)
        write_config(config, **{**good, "settle_seconds": -1}, process_sweep_interval=0)
        proc.send_signal(signal.SIGHUP)
        failed = wait_for(lambda: events("reload_failed"))
        assert "settle_seconds" in failed[0]["message"] and "keeping the last good" in failed[0]["message"]
        assert proc.poll() is None
        assert "settle_seconds" in wait_for(lambda: load_status(state).get("last_error"))

        write_config(
            config, (("here", 'file.name == "p.exe"'),), **good, process_sweep_interval=0
        )  # noticed as a changed file
        wait_for(lambda: events("reloaded"))
        time.sleep(CONFIG_CHECK_EVERY + 0.5)
        before = len(events("reloaded"))
        proc.send_signal(signal.SIGHUP)  # and on SIGHUP alone
        wait_for(lambda: len(events("reloaded")) > before)
        shutil.copy(SIGNED_PULSEWAY, watched / "p.exe")
        rows = wait_for(lambda: rows_for(state, watched / "p.exe"))
        assert rows[0]["Excluded"] is True and rows[0]["ExclusionId"] == "here"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert load_status(state)["state"] == "stopped"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stderr.close()


def test_memory_ceiling_logs_flushes_and_exits_non_zero(tmp_path):
    from agent.service.runner import Runner

    watched, state = tmp_path / "w", tmp_path / "state"
    watched.mkdir()
    shutil.copy(SIGNED_PULSEWAY, watched / "a.exe")
    config = write_config(tmp_path / "agent.toml", memory_limit_mb=1)
    code = Runner(loader(config, state), mode="run", paths=[str(watched)], low_priority=False).run()
    assert code == 2
    status = load_status(state)
    assert status["state"] == "stopped" and "memory ceiling" in status["last_error"]


def test_default_watch_roots():
    assert linux_default_watch_roots() == list(LINUX_WATCH_ROOTS)
    assert linux_default_watch_roots(["/mnt/share"])[-1] == "/mnt/share"
    env = {
        "SystemDrive": "C:",
        "ProgramFiles": r"C:\Program Files",
        "ProgramFiles(x86)": r"C:\Program Files (x86)",
        "ProgramData": r"C:\ProgramData",
        "SystemRoot": r"C:\Windows",
        "PUBLIC": r"C:\Users\Public",
    }
    roots = windows_default_watch_roots(env, [r"C:\Users\alice", r"C:\Users\bob"])
    assert roots == [
        r"C:\Program Files",
        r"C:\Program Files (x86)",
        r"C:\ProgramData",
        r"C:\Users\alice\AppData",
        r"C:\Users\alice\Downloads",
        r"C:\Users\bob\AppData",
        r"C:\Users\bob\Downloads",
        r"C:\Windows\Temp",
        r"C:\Users\Public\Desktop",
    ]


def test_a_file_moved_in_from_outside_is_ready_at_once(tmp_path):
    watched, outside = tmp_path / "w", tmp_path / "outside"
    watched.mkdir()
    outside.mkdir()
    shutil.copy(SIGNED_PULSEWAY, outside / "x.exe")
    with Watcher([str(watched)], settle_seconds=3600) as w:  # no settling: a rename is complete
        os.rename(outside / "x.exe", watched / "x.exe")
        ready = wait_for(lambda: w.poll())
    assert [(r.path, r.kind, r.why) for r in ready] == [(str(watched / "x.exe"), "file", "moved")]


def test_no_inotify_instance_left_leaves_every_root_uncovered_instead_of_crashing(tmp_path):
    """Injected at the observer boundary (lowering fs.inotify.max_user_instances would break
    every other inotify user on this shared machine): the observer cannot be created."""
    import errno

    def no_instance(*_args):
        raise OSError(errno.EMFILE, "Too many open files")

    with Watcher([str(tmp_path)], settle_seconds=1.0, observer_factory=no_instance) as w:
        assert w.watched_roots == []
        assert [(u.path, u.reason) for u in w.uncovered()] == [
            (str(tmp_path), "inotify instance limit reached (EMFILE)")
        ]
        assert w.poll() == []


def test_status_without_an_agent_and_with_a_dead_one(tmp_path):
    from agent.service.status import write_status

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["status", "--state-dir", str(tmp_path)]) == 0
    assert out.getvalue().startswith("running: no\nno status file")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_status(tmp_path, {"state": "running", "pid": dead.pid, "version": "0.1.0", "started": time.time()})
    record = status_json(tmp_path)
    assert record["Running"] is False and record["State"] == "not running" and record["Pid"] == dead.pid
    (tmp_path / "status.json").write_text("{torn")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["status", "--state-dir", str(tmp_path)]) == 2


def test_a_file_landing_during_a_long_scan_is_stored_before_the_scan_ends(tmp_path, agent_thread):
    """The start-up walk is slowed down by a tiny CPU cap; the watch still handles a new file."""
    watched, state = tmp_path / "w", tmp_path / "state"
    for i in range(150):
        d = watched / f"d{i // 50}"
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(SIGNED_DWSERVICE, d / f"f{i}.exe")
    config = write_config(tmp_path / "agent.toml", settle_seconds=0.2, max_cpu_percent=1)
    from tests.runtime.conftest import AgentThread

    agent = AgentThread(loader(config, state), mode="watch", paths=[str(watched)])
    agent.thread.start()
    try:
        wait_for(lambda: agent.runner.status.get("state") == "starting" and agent.runner._bulk, 30)
        target = watched / "d0" / "arrived.exe"
        shutil.copy(SIGNED_PULSEWAY, tmp_path / "arrived.tmp")
        os.rename(tmp_path / "arrived.tmp", target)
        # read-only: the agent holds the store's write transaction for its scan
        sources = wait_for(lambda: committed_sources(state, target), 20)
        assert sources == ["watch"]
        assert agent.runner.status["state"] == "starting"  # the start-up walk is still going
    finally:
        assert agent.stop() == 0

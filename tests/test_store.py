"""The store: idempotent observations, the schema 1 -> 2 migration, time-bounded commits, the
writer lock, and kill -9 at random points of real scans (issue 6 items 8 and 9)."""

from __future__ import annotations

import datetime as dt
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from agent.schema import COLUMN_NAMES
from agent.store import LOCK_FILE, LOCK_OWNER_FILE, SCHEMA_VERSION, Store, StoreError, StoreLock
from tests.conftest import FIXTURES, ROOT

DEVICE = "d" * 40
T0 = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)
SIGNED = {"pulseway.exe": 1, "dual_signed.exe": 2}  # fixture -> rows (one per signer certificate)


def row(path: str, *, index: int = 0, sha256: str = "ab" * 32, when: dt.datetime = T0) -> dict:
    values = dict.fromkeys(COLUMN_NAMES)
    values.update(
        Timestamp=when,
        DeviceId=DEVICE,
        DeviceName="host",
        FolderPath=path,
        FileName=os.path.basename(path),
        SHA256=sha256,
        SignatureIndex=index,
        Signer="Example Signer",
        SignerHash="cd" * 20,
        IsSigned=True,
        IsTrusted=False,
        Excluded=False,
        Source="scan",
    )
    return values


def stored(path) -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        return db.execute('SELECT "ReportId", "FolderPath", "SignatureIndex" FROM cert_rows ORDER BY 1').fetchall()
    finally:
        db.close()


def counter(path) -> int:
    """The ReportId counter (one device per test)."""
    db = sqlite3.connect(path)
    try:
        got = db.execute("SELECT max(value) FROM counters WHERE name='ReportId'").fetchone()
        return int(got[0] or 0)
    finally:
        db.close()


# --- idempotent insertion (6.9)


def test_a_retried_batch_is_stored_once_and_takes_no_new_report_ids(tmp_path):
    db = tmp_path / "s.sqlite3"
    with Store(db) as store:
        batch = [row("/x/a.exe"), row("/x/a.exe", index=1), row("/x/b.exe")]
        store.insert_rows(batch)
        assert [r["ReportId"] for r in batch] == [1, 2, 3]
        retry = [row("/x/a.exe"), row("/x/a.exe", index=1), row("/x/b.exe"), row("/x/c.exe")]
        store.insert_rows(retry)  # the same observations plus one new one
        assert [r["ReportId"] for r in retry] == [1, 2, 3, 4]  # the stored ids; only the new row allocates
        store.insert_rows([row("/x/a.exe", when=T0 + dt.timedelta(hours=25))])  # a new observation of a.exe
    assert [r[0] for r in stored(db)] == [1, 2, 3, 4, 5]
    assert counter(db) == 5


def test_a_counter_behind_the_stored_report_ids_heals_instead_of_reusing_one(tmp_path):
    db = tmp_path / "s.sqlite3"
    with Store(db) as store:
        store.insert_rows([row("/x/a.exe"), row("/x/b.exe")])
    raw = sqlite3.connect(db)
    raw.execute("UPDATE counters SET value = 0")  # a damaged counter
    raw.commit()
    raw.close()
    with Store(db) as store:
        new = [row("/x/c.exe")]
        store.insert_rows(new)
    assert new[0]["ReportId"] == 3 and counter(db) == 3


def _v1_database(path) -> None:
    """A store as main wrote it before this change: schema_version 1, no observation key."""
    with Store(path) as store:
        store.db.execute("DROP INDEX cert_rows_observation")
        store.db.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    cols = ", ".join(f'"{c}"' for c in COLUMN_NAMES)
    marks = ", ".join("?" for _ in COLUMN_NAMES)
    raw = sqlite3.connect(path)
    for report_id, (name, when) in enumerate(
        [("a.exe", T0), ("a.exe", T0), ("b.exe", T0), ("a.exe", T0 + dt.timedelta(days=1))], start=1
    ):  # two writers at once stored the a.exe observation twice (ReportIds 1 and 2)
        values = row(f"/x/{name}", when=when)
        values["ReportId"] = report_id
        values["Timestamp"] = when.isoformat()
        raw.execute(f"INSERT INTO cert_rows ({cols}) VALUES ({marks})", [values[c] for c in COLUMN_NAMES])
        raw.execute("INSERT INTO hits VALUES (?, ?, 'rule-1', 'Rule one', '[]', NULL)", (DEVICE, report_id))
    raw.execute("INSERT INTO counters VALUES (?, 'ReportId', 4)", (DEVICE,))
    raw.commit()
    raw.close()


def test_schema_1_databases_migrate_and_keep_working(tmp_path):
    db = tmp_path / "s.sqlite3"
    _v1_database(db)
    with Store(db, readonly=True) as reader:  # a reader never migrates, and reads schema 1 as it is
        assert len(list(reader.iter_rows())) == 4
    with Store(db) as store:
        assert store.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(
            SCHEMA_VERSION
        )
        assert [r["ReportId"] for r in store.iter_rows()] == [1, 3, 4]  # the repeated observation is gone
        assert store.db.execute("SELECT count(*) FROM hits").fetchone()[0] == 3
        again = [row("/x/b.exe"), row("/x/new.exe")]
        store.insert_rows(again)
        assert [r["ReportId"] for r in again] == [3, 5]  # idempotent now, and the counter goes on from 4


def test_a_newer_schema_is_refused_with_one_line(tmp_path):
    db = tmp_path / "s.sqlite3"
    with Store(db) as store:
        store.db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(StoreError, match=r"s\.sqlite3: written by a newer rmmhunt \(schema 99"):
        Store(db)


def test_a_writer_commits_at_least_every_interval(tmp_path):
    db = tmp_path / "s.sqlite3"
    with Store(db, commit_interval=0.05) as store:
        store.begin()
        store.insert_rows([row("/x/a.exe")])
        assert stored(db) == []  # not committed yet: another connection sees nothing
        time.sleep(0.06)
        store.insert_rows([row("/x/b.exe")])  # due: the earlier rows are committed first
        assert [r[1] for r in stored(db)] == ["/x/a.exe"]
        store.commit()
    assert [r[1] for r in stored(db)] == ["/x/a.exe", "/x/b.exe"]


def test_after_a_failure_the_store_refuses_every_further_statement(tmp_path):
    db = tmp_path / "s.sqlite3"
    with Store(db) as store:
        store.begin()
        store.insert_rows([row("/x/a.exe")])
        with pytest.raises(StoreError, match=r"s\.sqlite3: "):
            store.db.execute("INSERT INTO no_such_table VALUES (1)")
        with pytest.raises(StoreError):  # the half-done transaction was rolled back, never committed later
            store.commit()
    assert stored(db) == []


def test_readers_open_nothing_when_there_is_no_store(tmp_path):
    with Store(tmp_path / "none" / "s.sqlite3", readonly=True) as reader:
        assert list(reader.iter_rows()) == []
    assert not (tmp_path / "none").exists()


# --- the writer lock (6.9)


def test_the_lock_tells_who_holds_it_and_gives_up_after_the_timeout(tmp_path):
    with StoreLock(tmp_path, timeout=5, command="scan"):
        waits: list[str] = []
        second = StoreLock(tmp_path, timeout=0.3, command="scan", on_wait=waits.append)
        started = time.monotonic()
        with pytest.raises(StoreError, match=rf"{LOCK_FILE}: still held by the scan by pid {os.getpid()} after 0.3 s"):
            second.acquire()
        assert 0.25 <= time.monotonic() - started < 5
        assert waits == [f"waiting for the scan by pid {os.getpid()} to finish (up to 0.3 s, setting lock_timeout)..."]
    with StoreLock(tmp_path, timeout=0.3):  # released: taken at once
        pass


def _scan(state, tree, *extra: str, **kwargs) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "agent.cli", "scan", str(tree), "--no-progress", "--state-dir", str(state), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _signed_tree(root, copies: int):
    root.mkdir()
    for i in range(copies):
        for name in SIGNED:
            shutil.copy(FIXTURES / "files" / name, root / f"{i:03d}-{name}")
    return root


def test_two_scans_at_once_store_each_row_once(tmp_path):
    tree = _signed_tree(tmp_path / "tree", 5)
    state = tmp_path / "state"
    first, second = _scan(state, tree), _scan(state, tree)
    outs = [p.communicate(timeout=120) for p in (first, second)]
    assert [first.returncode, second.returncode] == [1, 1], outs
    assert len(stored(state / "rmmhunt.sqlite3")) == 5 * sum(SIGNED.values())  # 15, not 30


def test_a_second_writer_refuses_after_lock_timeout_and_readers_never_wait(tmp_path):
    tree = _signed_tree(tmp_path / "tree", 1)
    state = tmp_path / "state"
    config = tmp_path / "agent.toml"
    config.write_text("[agent]\nlock_timeout = 0.5\n", encoding="utf-8")
    with Store(state / "rmmhunt.sqlite3") as store:
        store.insert_rows([row("/x/stored-before.exe")])
    with StoreLock(state, timeout=5, command="scan"):
        blocked = _scan(state, tree, "--config", str(config))
        _out, err = blocked.communicate(timeout=120)
        assert blocked.returncode == 2
        assert err.strip().splitlines() == [
            f"rmmhunt: waiting for the scan by pid {os.getpid()} to finish (up to 0.5 s, setting lock_timeout)...",
            f"rmmhunt: error: {state / LOCK_FILE}: still held by the scan by pid {os.getpid()} after 0.5 s: "
            "one writer at a time per state directory; try again later or raise lock_timeout in the config",
        ]
        cmd = [sys.executable, "-m", "agent.cli", "rows", "--format", "csv", "--state-dir", str(state)]
        reader = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert reader.returncode == 0 and not reader.stderr, reader.stderr
        assert "/x/stored-before.exe" in reader.stdout


# --- kill -9 at random points (issue 6, "Deliver also")


def _committed_rows(db) -> int:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return int(conn.execute("SELECT count(*) FROM cert_rows").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:  # no store yet
        return 0


def test_kill_9_at_random_points_loses_no_committed_row_and_reuses_no_report_id(tmp_path):
    rng = random.Random(6)
    copies = 30
    tree = _signed_tree(tmp_path / "tree", copies)
    state = tmp_path / "state"
    db = state / "rmmhunt.sqlite3"
    config = tmp_path / "agent.toml"
    config.write_text("[agent]\ncommit_interval = 0.05\n", encoding="utf-8")  # many commits in a short run
    seen: dict[int, tuple] = {}  # every committed ReportId -> its row: never lost, never changed, never reused
    # Kill points: "early" = a random moment in the first half second after the scan took the lock (store
    # open, migration, first files); "mid" = a random moment up to 0.2 s after this run's first commit.
    plan = ["early", "mid", "early", "mid", "mid"]
    rng.shuffle(plan)
    kills = attempts = 0
    while kills < len(plan) and attempts < 12:
        attempts += 1
        stamp = time.time_ns()  # touched: the run has every file to parse again, not only the uncached ones
        for path in tree.iterdir():
            os.utime(path, ns=(stamp, stamp))
        before = _committed_rows(db)
        proc = _scan(state, tree, "--config", str(config))
        if plan[kills] == "early":
            while proc.poll() is None and not (state / LOCK_OWNER_FILE).exists():
                time.sleep(0.005)
            pause = rng.uniform(0.0, 0.5)
        else:
            while proc.poll() is None and _committed_rows(db) == before:
                time.sleep(0.01)
            pause = rng.uniform(0.0, 0.2)
        deadline = time.monotonic() + pause
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=120)
        (state / LOCK_OWNER_FILE).unlink(missing_ok=True)  # left behind by a killed writer
        if not db.exists():
            continue
        check = sqlite3.connect(db)
        try:
            assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            check.close()
        rows = {r[0]: r for r in stored(db)}
        assert counter(db) >= max(rows, default=0)
        for report_id, before in seen.items():
            assert rows.get(report_id) == before  # committed rows survive every kill, unchanged
        seen.update(rows)
    assert kills == len(plan) == 5
    assert seen  # the "mid" kills landed after commits of their own run
    final = _scan(
        state, tree, "--config", str(config)
    )  # no touch: files cached by a committed run are not parsed again
    final.communicate(timeout=120)
    assert final.returncode == 1
    rows = stored(db)
    ids = [r[0] for r in rows]
    assert len(ids) == len(set(ids)) and counter(db) >= max(ids)
    assert set(seen) <= set(ids)
    assert all(new > max(seen, default=0) for new in set(ids) - set(seen))  # a re-run only allocates new ids
    per_file: dict[str, set[int]] = {}
    for _id, path, index in rows:
        per_file.setdefault(os.path.basename(path), set()).add(index)
    for i in range(copies):
        for name, count in SIGNED.items():
            assert per_file.get(f"{i:03d}-{name}") == set(range(count))  # every signed file has its rows

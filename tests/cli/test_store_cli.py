"""The store under faults, end to end (issue 6 item 8): a full disk, a damaged database, a read-only
state directory and one the user cannot write each give one line and exit 2 with nothing committed
lost; `store check` finds the damage and `store check --repair` rebuilds from what reads."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli import main
from tests.conftest import FIXTURES, ROOT

SIGNED = {"pulseway.exe": 1, "dual_signed.exe": 2}
DB = "rmmhunt.sqlite3"


def rmmhunt(
    *args: str, state: Path, timeout: float = 120, prefix: tuple[str, ...] = (), **kwargs
) -> subprocess.CompletedProcess:
    """The console script in a fresh process (what a user sees on stderr, exit code, rlimits, caps)."""
    cmd = [*prefix, sys.executable, "-m", "agent.cli", *args, "--state-dir", str(state)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kwargs)


def cli(*args: str, state: Path) -> subprocess.CompletedProcess:
    """The same entry point, in this process (saves the interpreter start-up where nothing else differs)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*args, "--state-dir", str(state)])
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def one_error_line(out: subprocess.CompletedProcess, state: Path, *phrases: str) -> str:
    """Exit 2 and exactly one line `rmmhunt: error: <state file>: ...` without a traceback."""
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = [line for line in out.stderr.splitlines() if line.startswith("rmmhunt: error:")]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith(f"rmmhunt: error: {state}/"), lines[0]
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def signed_tree(root: Path, copies: int, prefix: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(copies):
        for name in SIGNED:
            shutil.copy(FIXTURES / "files" / name, root / f"{prefix}{i:03d}-{name}")
    return root


def stored(db: Path) -> list[tuple]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute('SELECT "ReportId", "FolderPath", "SignatureIndex" FROM cert_rows ORDER BY 1').fetchall()
    finally:
        conn.close()


def csv_rows(out: subprocess.CompletedProcess) -> list[str]:
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[1:]


@pytest.fixture(scope="module")
def scanned(tmp_path_factory) -> tuple[Path, Path]:
    """(state dir, tree): 12 copies of two signed fixtures scanned once; tests copy the state."""
    base = tmp_path_factory.mktemp("scanned")
    tree = signed_tree(base / "tree", 12)
    out = cli("scan", str(tree), "--no-progress", state=base / "state")
    assert out.returncode == 1, out.stderr
    return base / "state", tree


def copy_state(scanned: tuple[Path, Path], dest: Path) -> Path:
    shutil.copytree(scanned[0], dest)
    return dest


# --- a full disk


@contextlib.contextmanager
def small_filesystem(mount_point: Path, size: str) -> Iterator[bool]:
    """A real tmpfs of ``size`` at ``mount_point`` (ENOSPC when full); False when this machine does
    not let us mount, and the caller limits the file size instead (RLIMIT_FSIZE: EFBIG)."""
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)], check=False)
    try:
        yield done.returncode == 0
    finally:
        if done.returncode == 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("how", ["tmpfs", "rlimit"])
def test_a_full_disk_mid_scan_is_one_line_and_keeps_committed_rows(tmp_path, how):
    first_tree = signed_tree(tmp_path / "first", 2)
    big_tree = signed_tree(tmp_path / "big", 15, prefix="big-")
    with small_filesystem(tmp_path / "state", "4m") as mounted:
        state = tmp_path / "state"
        out = cli("scan", str(first_tree), "--no-progress", state=state)
        assert out.returncode == 1, out.stderr
        before = stored(state / DB)
        assert len(before) == 2 * 3
        if how == "tmpfs" and mounted:  # fill what is left of the filesystem: the store cannot grow
            with open(state / "filler", "wb") as filler, contextlib.suppress(OSError):
                while True:
                    filler.write(b"\0" * 65536)
                    filler.flush()
            os.truncate(state / "filler", os.path.getsize(state / "filler") - 48 * 1024)  # room to start, not finish
            limit = {}
            phrase = "disk full"
        else:  # no mount here (or the rlimit case): every file of the scan may grow only a little
            limit = {"preexec_fn": _limit_file_size(os.path.getsize(state / DB) + 64 * 1024)}
            phrase = "work committed before this point is kept"
        out = rmmhunt("scan", str(big_tree), "--no-progress", state=state, **limit)
        line = one_error_line(out, state, phrase)
        assert line.startswith(f"rmmhunt: error: {state / DB}: ")  # the store failed mid-scan, not the lock
        after = stored(state / DB)
        assert after[: len(before)] == before  # nothing committed was lost
        (state / "filler").unlink(missing_ok=True)
        conn = sqlite3.connect(state / DB)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()
        if how == "rlimit":
            return
        out = cli("scan", str(big_tree), "--no-progress", state=state)  # space again: it completes
        assert out.returncode == 1, out.stderr
        paths = {os.path.basename(p) for _i, p, _s in stored(state / DB)}
        assert {f"big-{i:03d}-{name}" for i in range(15) for name in SIGNED} <= paths
        ids = [r[0] for r in stored(state / DB)]
        assert len(ids) == len(set(ids))


# --- damaged databases: garbage, truncated, one page overwritten


def _damage(db: Path, how: str) -> None:
    if how == "garbage":
        db.write_bytes(os.urandom(os.path.getsize(db)))
    elif how == "truncated":
        with open(db, "r+b") as f:
            f.truncate(os.path.getsize(db) // 3)
    else:  # one leaf page of the rows table in the middle overwritten
        conn = sqlite3.connect(db)
        pages = [p for (p,) in conn.execute("SELECT pageno FROM dbstat WHERE name='cert_rows' AND pagetype='leaf'")]
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.close()
        with open(db, "r+b") as f:
            f.seek((pages[len(pages) // 2] - 1) * page_size)
            f.write(os.urandom(page_size))


@pytest.mark.parametrize("how", ["garbage", "truncated", "page"])
def test_a_damaged_store_is_one_line_then_check_finds_it_and_repair_rebuilds_it(tmp_path, scanned, how):
    state = copy_state(scanned, tmp_path / "state")
    tree = scanned[1]
    db = state / DB
    total = len(stored(db))
    old_top = max(r[0] for r in stored(db))
    _damage(db, how)
    damaged_sha = hashlib.sha256(db.read_bytes()).hexdigest()

    one_error_line(rmmhunt("rows", state=state), state, "damaged", "store check --repair")
    one_error_line(cli("hunt", state=state), state, "damaged")
    check = cli("store", "check", state=state)
    assert check.returncode == 1 and "Traceback" not in check.stderr, check.stderr
    assert check.stdout.strip().splitlines()[-1] == (
        f"{db}: {len(check.stdout.strip().splitlines()) - 1} problem(s): `rmmhunt store check --repair` rebuilds "
        "the store"
    )
    assert hashlib.sha256(db.read_bytes()).hexdigest() == damaged_sha  # check reads only

    repair = cli("store", "check", "--repair", state=state)
    assert repair.returncode == 0, repair.stdout + repair.stderr
    asides = sorted(state.glob(f"{DB}.corrupt-*"))
    main_aside = [p for p in asides if not p.name.endswith(("-wal", "-shm"))]
    assert len(main_aside) == 1 and f"moved aside to {main_aside[0]}" in repair.stdout
    assert hashlib.sha256(main_aside[0].read_bytes()).hexdigest() == damaged_sha  # kept, never deleted
    assert cli("store", "check", state=state).returncode == 0

    recovered = stored(db)
    if how == "page":  # one page of rows lost, the rest recovered with their ReportIds
        assert total - 20 <= len(recovered) < total
    assert len(csv_rows(cli("rows", "--format", "csv", state=state))) == len(recovered)

    out = cli("scan", str(tree), "--no-progress", state=state)  # the file cache was dropped: all re-parsed
    assert out.returncode == 1, out.stderr
    rows = stored(db)
    per_file: dict[str, set[int]] = {}
    for _id, path, index in rows:
        per_file.setdefault(os.path.basename(path), set()).add(index)
    assert all(per_file[f"{i:03d}-{n}"] == set(range(c)) for i in range(12) for n, c in SIGNED.items())
    new_ids = {r[0] for r in rows} - {r[0] for r in recovered}
    assert new_ids and min(new_ids) > old_top  # no ReportId used before the damage is handed out again


# --- read-only and unwritable state directories


@contextlib.contextmanager
def read_only_state(state: Path) -> Iterator[dict]:
    """``state`` made read-only for real: a read-only tmpfs as root, else (no mount rights) mode 0555."""
    mount_point = state.with_name("ro")
    if os.geteuid() == 0:
        mount_point.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mount_point)], check=False).returncode == 0
        if mounted:
            try:
                shutil.copytree(state, mount_point, dirs_exist_ok=True)
                subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True)
                yield {"state": mount_point}
            finally:
                subprocess.run(["umount", "-l", str(mount_point)], check=False)
            return
    with unwritable_state(state) as kwargs:
        yield kwargs


#: root without the capabilities that let it ignore file modes: a user like any other
AS_PLAIN_USER = (
    "setpriv",
    "--inh-caps=-dac_override,-dac_read_search,-fowner",
    "--bounding-set=-dac_override,-dac_read_search,-fowner",
    "--",
)


@contextlib.contextmanager
def unwritable_state(state: Path) -> Iterator[dict]:
    """A state directory the user cannot write (mode 0555). Root ignores modes, so as root the
    commands run without CAP_DAC_OVERRIDE (setpriv), which makes the mode apply to root too."""
    state.chmod(0o555)
    try:
        yield {"state": state, "prefix": AS_PLAIN_USER if os.geteuid() == 0 else ()}
    finally:
        state.chmod(0o755)


@pytest.mark.parametrize("fault", ["read-only", "unwritable"])
def test_scan_refuses_an_unwritable_state_directory_and_readers_still_work(tmp_path, scanned, fault):
    state = copy_state(scanned, tmp_path / "state")
    expected = csv_rows(cli("rows", "--format", "csv", state=state))
    for leftover in [*state.glob("*-wal"), *state.glob("*-shm")]:  # as a writer leaves it: no WAL index to reuse
        assert leftover.name.endswith("-shm") or leftover.stat().st_size == 0
        leftover.unlink()
    context = read_only_state(state) if fault == "read-only" else unwritable_state(state)
    with context as kwargs:
        where = kwargs.pop("state")
        before = sorted(p.name for p in where.iterdir())
        out = rmmhunt("scan", str(scanned[1]), "--no-progress", state=where, **kwargs)
        one_error_line(out, where, "writable state directory")
        run = (lambda *a: rmmhunt(*a, state=where, **kwargs)) if kwargs else (lambda *a: cli(*a, state=where))
        assert csv_rows(run("rows", "--format", "csv")) == expected
        hunt = run("hunt", "--format", "json")
        assert hunt.returncode == 1 and "Pulseway" in hunt.stdout, hunt.stderr
        check = run("store", "check")
        assert check.returncode == 0 and ": ok (schema 2" in check.stdout, check.stdout + check.stderr
        assert sorted(p.name for p in where.iterdir()) == before


# --- logical damage: what integrity_check cannot see


def test_check_reports_duplicate_report_ids_repeated_rows_and_a_counter_behind_and_repair_fixes_them(tmp_path):
    from agent.schema import COLUMN_NAMES
    from agent.store import Store

    state = tmp_path / "state"
    db = state / DB
    with Store(db) as store:
        base = dict.fromkeys(COLUMN_NAMES)
        base.update(DeviceId="e" * 40, DeviceName="h", SHA256="ab" * 32, SignatureIndex=0, SignerHash="cd" * 20)
        for name in ("a", "b", "c"):
            store.insert_rows([{**base, "FolderPath": f"/x/{name}.exe", "Timestamp": _when(0)}])
    conn = sqlite3.connect(db)
    cols = ", ".join(f'"{c}"' for c in COLUMN_NAMES)
    # A table whose primary key and observation key were lost (as a damaged index would let through):
    conn.executescript(
        "CREATE TABLE loose AS SELECT * FROM cert_rows; DROP TABLE cert_rows; ALTER TABLE loose RENAME TO cert_rows;"
    )
    moved = cols.replace('"FolderPath"', "'/x/d.exe'")
    conn.execute(f'INSERT INTO cert_rows ({cols}) SELECT {moved} FROM cert_rows WHERE "ReportId" = 2')  # 2 held twice
    again = cols.replace('"ReportId"', "9")
    conn.execute(f'INSERT INTO cert_rows ({cols}) SELECT {again} FROM cert_rows WHERE "ReportId" = 1')  # a.exe twice
    conn.execute("UPDATE counters SET value = 1")
    conn.commit()
    conn.close()

    check = cli("store", "check", state=state)
    assert check.returncode == 1, check.stdout + check.stderr
    assert f"ReportId 2 of device {'e' * 40} is held by 2 rows" in check.stdout
    assert "1 row(s) repeat an observation already stored (stored twice)" in check.stdout
    assert f"the ReportId counter of device {'e' * 40} (1) is behind the ReportIds in use (up to 9)" in check.stdout

    repair = cli("store", "check", "--repair", state=state)
    assert repair.returncode == 0, repair.stdout + repair.stderr
    assert "1 repeated observation(s) dropped, 1 row(s) given a new ReportId" in repair.stdout
    rows = stored(db)
    assert sorted(p for _i, p, _s in rows) == ["/x/a.exe", "/x/b.exe", "/x/c.exe", "/x/d.exe"]  # nothing dropped
    ids = [i for i, _p, _s in rows]
    assert len(set(ids)) == 4 and max(ids) == 10  # the second holder of 2 moved above everything used (9)
    assert cli("store", "check", state=state).returncode == 0


def _when(seconds: int):
    import datetime as dt

    return dt.datetime(2026, 11, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=seconds)

"""Paths end to end: hostile names, paths past PATH_MAX, symlink statuses, and a scan that
answers for the disk as it is now (current files, gone files). Real files, real SQLite."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from agent.extract.authenticode import extract_stream
from agent.rows import Device
from agent.scanner import Matcher, Scanner, ScanStats, examine_path
from agent.sources.walk import MAX_OPEN_DIRS, iter_files
from agent.store import Store
from agent.textenc import unescape_path
from tests.conftest import FIXTURES, ROOT, TEST_ROOT_CA
from tests.hostile_tree import RMM_FIXTURE, make_deep_chain, remove_deep_chain

DEVICE = Device("b" * 40, "host.example")
PULSEWAY_RULE = "6192b741-4540-4416-8dbb-ce0405166d0a"


class Clock:
    """A settable clock (time is an input here, not a mock of anything)."""

    def __init__(self) -> None:
        self.now = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


def _scanner(store: Store, clock: Clock | None = None, **kw) -> Scanner:
    return Scanner(
        store,
        DEVICE,
        Matcher([]),
        None,
        max_file_size=1 << 20,
        file_time_budget=10,
        reobserve_interval=24 * 3600,
        clock=clock or Clock(),
        **kw,
    )


def rmmhunt(*args: str, state) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "agent.cli", *args, "--state-dir", str(state)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


# --------------------------------------------------------------------------- hostile names


def test_hostile_names_scan_finds_the_rmm_copies_and_keeps_every_path_exactly(tmp_path, hostile_tree):
    state = tmp_path / "state"
    out = rmmhunt("scan", str(hostile_tree.root), "--no-progress", state=state)
    assert out.returncode == 1, out.stderr  # findings, not a crash
    assert "Traceback" not in out.stderr
    assert "Pulseway" in out.stdout

    with Store(state / "rmmhunt.sqlite3") as store:
        rows = list(store.iter_rows())
        cache = store.load_cache(_device_id(store))
    # every signed copy is stored with its exact bytes, FileName included
    assert sorted(os.fsencode(r["FolderPath"]) for r in rows) == sorted(hostile_tree.signed)
    for row in rows:
        assert os.fsencode(row["FileName"]) == os.path.basename(os.fsencode(row["FolderPath"]))
        assert row["Signer"] == "MMSoft Design Ltd."
    # every file, signed or not, is in the cache under its exact path, with a clean status
    assert {os.fsencode(p) for p in cache} == set(hostile_tree.files)
    assert {e.status for e in cache.values()} == {"OK", "NOT_PE"}

    # the stored path reopens the file: what was stored is what is on disk
    deep = next(r for r in rows if os.fsencode(r["FolderPath"]) == hostile_tree.long_path)
    status, facts, _detail, _ident = examine_path(
        deep["FolderPath"], (0, 0, 0, 0), verifier=None, max_file_size=1 << 20, time_budget=10
    )
    assert status == "OK" and facts is not None and facts.signatures[0].signer.display_name == "MMSoft Design Ltd."

    # a re-scan recognises every file as unchanged and still reports the copies (they are there)
    again = rmmhunt("scan", str(hostile_tree.root), "--no-progress", "-v", state=state)
    assert again.returncode == 1, again.stderr
    # the summary line may wrap (a fast scan prints more digits of files/s)
    assert f"parsed 0, unchanged {len(hostile_tree.files)}" in " ".join(again.stderr.split())


def _device_id(store: Store) -> str:
    return store.db.execute('SELECT DISTINCT "DeviceId" FROM cert_rows').fetchone()[0]


def test_hostile_names_through_the_scanner_api(tmp_path, hostile_tree):
    with Store(tmp_path / "db.sqlite3") as store:
        first = _scanner(store).scan([str(hostile_tree.root)])
        second = _scanner(store).scan([str(hostile_tree.root)])
    assert first.errors == [] and first.statuses["OK"] == len(hostile_tree.signed)
    assert first.files == len(hostile_tree.files)
    assert {os.fsencode(p) for p, _sha in first.current} == set(hostile_tree.signed)
    assert second.parsed == 0 and second.unchanged == len(hostile_tree.files)
    assert second.current == first.current


def test_exclusions_see_the_exact_path(tmp_path, hostile_tree):
    from agent.exclusions import Exclusion, parse_expression

    exclusion = Exclusion("latin1-dir", parse_expression('file.path contains "vu/caf"'))
    rule = _pulseway_rule()
    with Store(tmp_path / "db.sqlite3") as store:
        scanner = Scanner(
            store,
            DEVICE,
            Matcher([rule], [exclusion]),
            None,
            max_file_size=1 << 20,
            file_time_budget=10,
            reobserve_interval=3600,
        )
        stats = scanner.scan([str(hostile_tree.root)])
        excluded = [r for r in store.iter_rows() if r["Excluded"]]
    assert stats.findings == len(hostile_tree.signed) - 1 and stats.excluded_hits == 1
    assert [os.fsencode(r["FolderPath"]) for r in excluded] == [hostile_tree.signed[1]]


def _pulseway_rule():
    from agent.resources import shipped_rules_dir
    from agent.rules.loader import load_rules

    rules = load_rules([shipped_rules_dir()]).rules
    return next(r for r in rules if r.id == PULSEWAY_RULE)


# --------------------------------------------------------------------------- past PATH_MAX


@pytest.fixture
def deep_base(tmp_path):
    """An empty directory for a 10,000-level chain: on tmpfs when there is one, because this
    machine's ext4 (mounted with discard) spends about 3 ms on every rmdir."""
    import tempfile

    shm = "/dev/shm"
    base = Path(tempfile.mkdtemp(prefix="rmmhunt-deep-", dir=shm)) if os.access(shm, os.W_OK) else tmp_path / "deep"
    base.mkdir(exist_ok=True)
    yield base
    remove_deep_chain(base)
    shutil.rmtree(base)


def test_a_file_10000_levels_deep_is_scanned_with_bounded_descriptors(tmp_path, deep_base):
    base = deep_base
    leaf = make_deep_chain(base, 10_000, b"bottom.exe", RMM_FIXTURE.read_bytes())
    fds_before = len(os.listdir("/proc/self/fd"))
    peak = [0]

    def progress(_stats: ScanStats, _path: str) -> None:
        peak[0] = max(peak[0], len(os.listdir("/proc/self/fd")))

    with Store(tmp_path / "db.sqlite3") as store:
        stats = _scanner(store).scan([str(base)], progress=progress)
        rows = list(store.iter_rows())
        again = _scanner(store).scan([str(base)])
    assert stats.errors == [] and stats.walk.directory_errors == 0
    assert stats.statuses["OK"] == 1 and stats.walk.directories == 10_001
    assert [os.fsencode(r["FolderPath"]) for r in rows] == [leaf]
    assert len(leaf) > 20_000
    assert peak[0] - fds_before <= MAX_OPEN_DIRS + 4  # never one descriptor per level
    assert again.unchanged == 1 and again.current == stats.current


def test_explain_style_examine_opens_a_path_longer_than_path_max(tmp_path, hostile_tree):
    path = os.fsdecode(hostile_tree.long_path)
    status, facts, detail, ident = examine_path(
        path, (0, 0, 0, 0), verifier=None, max_file_size=1 << 20, time_budget=10
    )
    assert (status, detail) == ("OK", "") and ident[2] == RMM_FIXTURE.stat().st_size


# --------------------------------------------------------------------------- symlink labels


def test_symlink_loop_under_follow_symlinks_has_its_own_label(tmp_path):
    (tmp_path / "t").mkdir()
    os.symlink("self", tmp_path / "t" / "self")
    os.symlink("b", tmp_path / "t" / "a")
    os.symlink("a", tmp_path / "t" / "b")
    items = {os.path.basename(i.path): i for i in iter_files([str(tmp_path / "t")], follow_symlinks=True)}
    for name in ("self", "a", "b"):
        assert (items[name].status, items[name].detail) == ("NOT_PE", "symlink loop: not read")
    status, _facts, detail, _ = examine_path(
        str(tmp_path / "t" / "self"),
        (0, 0, 0, 0),
        verifier=None,
        max_file_size=1 << 20,
        time_budget=1,
        follow_symlinks=True,
    )
    assert (status, detail) == ("NOT_PE", "symlink loop: not read")
    with Store(tmp_path / "db.sqlite3") as store:
        stats = _scanner(store).scan([str(tmp_path / "t")], follow_symlinks=True)
    assert stats.statuses["ACCESS_DENIED"] == 0 and stats.statuses["NOT_PE"] == 3 and stats.errors == []


def test_dangling_symlink_is_vanished_not_access_denied(tmp_path):
    link = tmp_path / "dangling.exe"
    os.symlink(tmp_path / "nowhere.exe", link)
    for follow in (False, True):  # explain names the link itself; a followed walk reaches it too
        status, facts, detail, _ = examine_path(
            str(link), (0, 0, 0, 0), verifier=None, max_file_size=1 << 20, time_budget=1, follow_symlinks=follow
        )
        assert (status, facts, detail) == ("VANISHED", None, "dangling symlink")
    items = list(iter_files([str(tmp_path)], follow_symlinks=True))
    assert [(i.status, i.detail) for i in items] == [("VANISHED", "dangling symlink")]


def test_a_followed_file_symlink_is_read_and_a_plain_one_is_labelled(tmp_path):
    shutil.copy(RMM_FIXTURE, tmp_path / "real.exe")
    os.symlink("real.exe", tmp_path / "link.exe")
    status, facts, _detail, _ = examine_path(
        str(tmp_path / "link.exe"), (0, 0, 0, 0), verifier=None, max_file_size=1 << 20, time_budget=10
    )
    assert (status, facts) == ("NOT_PE", None) and _detail == "symlink (not followed): not read"
    with Store(tmp_path / "db.sqlite3") as store:
        stats = _scanner(store).scan([str(tmp_path)], follow_symlinks=True)
    assert stats.statuses["OK"] == 2 and stats.errors == []  # the link is read through, not ACCESS_DENIED


# --------------------------------------------------------------------------- the disk as it is now


@pytest.fixture
def rmm_tree(tmp_path):
    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    shutil.copy(RMM_FIXTURE, root / "sub" / "agent.exe")
    shutil.copy(FIXTURES / "files" / "text.exe", root / "text.exe")
    return root


def test_a_deleted_rmm_binary_is_gone_and_no_longer_a_finding(tmp_path, rmm_tree):
    """Two copies; one deleted: the scan shows the one on disk, not the history of both; both
    deleted: clean. The rows stay, and hunt keeps the published history semantics."""
    shutil.copy(RMM_FIXTURE, rmm_tree / "second.exe")
    state = tmp_path / "state"
    first = rmmhunt("scan", str(rmm_tree), "--no-progress", state=state)
    assert first.returncode == 1 and "Pulseway" in first.stdout
    deleted, kept = str(rmm_tree / "sub" / "agent.exe"), str(rmm_tree / "second.exe")
    os.unlink(deleted)
    out = rmmhunt("scan", str(rmm_tree), "--no-progress", "--format", "json", "--rows", state=state)
    assert out.returncode == 1, out.stderr
    results = json.loads(out.stdout)["results"]
    assert {unescape_path(r["FolderPath"]) for res in results for r in res["Rows"]} == {kept}
    hunt = rmmhunt("hunt", "--format", "json", "--rows", state=state)
    payload = json.loads(hunt.stdout)
    assert {unescape_path(row["FolderPath"]) for r in payload["results"] for row in r["Rows"]} == {deleted, kept}
    assert payload["summary"]["gone"] == 1  # hunt keeps the history and says which file disappeared

    os.unlink(kept)
    last = rmmhunt("scan", str(rmm_tree), "--no-progress", state=state)
    assert last.returncode == 0, last.stdout + last.stderr
    assert "Pulseway" not in last.stdout
    with Store(state / "rmmhunt.sqlite3") as store:
        gone = store.gone_map(_device_id(store))
        rows = list(store.iter_rows())
    assert sorted(r["FolderPath"] for r in rows) == sorted([deleted, kept])  # rows are never deleted
    assert set(gone) == {(r["FolderPath"], r["SHA256"]) for r in rows}
    assert all(gone[(r["FolderPath"], r["SHA256"])] >= r["Timestamp"] for r in rows)


def test_gone_changed_returned_and_unreached_files(tmp_path, rmm_tree):
    from agent.extract.authenticode import TrustVerifier, load_roots

    verifier = TrustVerifier(load_roots([TEST_ROOT_CA]))  # hashes known: a content change is seen
    clock = Clock()
    target = rmm_tree / "sub" / "agent.exe"

    def _scanner(store: Store, clock: Clock) -> Scanner:
        return Scanner(
            store,
            DEVICE,
            Matcher([]),
            verifier,
            max_file_size=1 << 20,
            file_time_budget=10,
            reobserve_interval=24 * 3600,
            clock=clock,
        )

    with Store(tmp_path / "db.sqlite3") as store:
        first = _scanner(store, clock).scan([str(rmm_tree)])
        ((path, sha),) = first.current
        assert path == str(target) and first.gone == []

        # a directory not walked (skipped) is not a deletion: the file is still there
        clock.now += dt.timedelta(hours=1)
        skipped = _scanner(store, clock).scan([str(rmm_tree)], skip_dirs=frozenset({str(rmm_tree / "sub")}))
        assert skipped.gone == [] and skipped.current == set()

        # deleted: gone, with the time, and its cache entry dropped
        target.unlink()
        clock.now += dt.timedelta(hours=1)
        gone = _scanner(store, clock).scan([str(rmm_tree)])
        assert gone.gone == [(path, sha, clock.now)] and gone.current == set()
        assert store.gone_map(DEVICE.device_id) == {(path, sha): clock.now}
        assert path not in store.load_cache(DEVICE.device_id)
        gone_again = _scanner(store, clock).scan([str(rmm_tree)])
        assert gone_again.gone == []  # recorded once

        # it comes back: new again (parsed), current, and no longer gone
        shutil.copy(RMM_FIXTURE, target)
        back = _scanner(store, clock).scan([str(rmm_tree)])
        assert back.parsed == 1 and back.current == {(path, sha)} and back.rows == 1
        assert store.gone_map(DEVICE.device_id) == {}

        # changed to other signed content: the old (path, sha) is gone, the new one current
        shutil.copy(FIXTURES / "files" / "dwservice.exe", target)
        os.utime(target, ns=(0, 10**18))
        changed = _scanner(store, clock).scan([str(rmm_tree)])
        ((_p, new_sha),) = changed.current
        assert new_sha != sha and changed.gone == [(path, sha, clock.now)]

        # scanning another root never marks this one's files gone
        other = tmp_path / "other"
        other.mkdir()
        target.unlink()
        assert _scanner(store, clock).scan([str(other)]).gone == []


# --------------------------------------------------------------------------- scanner odds and ends


def test_commits_by_count_and_by_time(tmp_path):
    root = tmp_path / "many"
    root.mkdir()
    for i in range(520):
        (root / f"{i:04}.txt").write_bytes(b"x")
    db_path = tmp_path / "db.sqlite3"
    lag: list[int] = []

    def committed() -> int:
        other = sqlite3.connect(db_path)
        try:
            return other.execute("SELECT count(*) FROM file_cache").fetchone()[0]
        finally:
            other.close()

    def progress(stats: ScanStats, _path: str) -> None:
        lag.append(stats.files - committed())

    with Store(db_path) as store:
        _scanner(store).scan([str(root)], progress=progress)
    assert len(lag) == 520 and max(lag) < 500  # never 500 files of work uncommitted

    (root / "late").mkdir()
    shutil.copy(RMM_FIXTURE, root / "first.exe")
    for i in range(3):
        (root / "late" / f"{i}.txt").write_bytes(b"y")
    rows_seen: list[int] = []
    slept = [False]

    def slow(stats: ScanStats, path: str) -> None:
        if stats.rows and not slept[0]:
            slept[0] = True
            import time

            time.sleep(1.1)
        elif slept[0]:
            other = sqlite3.connect(db_path)
            try:
                rows_seen.append(other.execute("SELECT count(*) FROM cert_rows").fetchone()[0])
            finally:
                other.close()

    with Store(db_path) as store:
        _scanner(store).scan([str(root)], progress=slow)
    assert rows_seen and rows_seen[0] == 1  # committed within about a second, long before 500 files


def test_timeout_with_signer_facts_still_gives_rows(tmp_path):
    """The extractor returns partial facts (signers, digest unknown) with status TIMEOUT when the
    hashing runs out of time; here those facts are the real ones with the status the extract
    branch gives them."""
    data = RMM_FIXTURE.read_bytes()
    real = extract_stream(io.BytesIO(data), len(data), verifier=None)
    timed_out = dataclasses.replace(real, status="TIMEOUT", detail="time budget exceeded while hashing", sha256="")
    with Store(tmp_path / "db.sqlite3") as store:
        scanner = _scanner(store)
        stats = ScanStats()
        rows = scanner.observe_facts("/x/agent.exe", "TIMEOUT", timed_out, timed_out.detail, (1, 2, 3, 4), stats)
        store.commit()
        stored = list(store.iter_rows())
    assert len(rows) == 1 and stored[0]["Signer"] == "MMSoft Design Ltd." and stored[0]["DigestValid"] is None
    assert stats.statuses["TIMEOUT"] == 1 and stats.errors[0]["status"] == "TIMEOUT"
    assert stats.current == {("/x/agent.exe", "")}


def test_not_verified_means_none_not_false(tmp_path):
    shutil.copy(RMM_FIXTURE, tmp_path / "a.exe")
    with Store(tmp_path / "db.sqlite3") as store:
        _scanner(store).scan([str(tmp_path / "a.exe")])  # verifier None: --no-verify
        (row,) = list(store.iter_rows())
    assert row["VerificationStatus"] == "NOT_VERIFIED"
    assert row["IsTrusted"] is None and row["DigestValid"] is None


def test_the_path_based_walk_for_windows_gives_the_same_items(tmp_path, hostile_tree, monkeypatch):
    """Windows has no dir_fd: the walk lists and opens by path. Both ways yield the same files
    (short of the path past PATH_MAX, which only the relative walk reaches on Linux)."""
    from agent.sources import walk

    root = hostile_tree.root
    (root / "loopdir").mkdir()
    os.symlink("..", root / "loopdir" / "up")
    shutil.copy(RMM_FIXTURE, root / "plain.exe")
    os.symlink("plain.exe", root / "link.exe")

    def items(relative: bool) -> set[tuple[str, str, str]]:
        monkeypatch.setattr(walk, "RELATIVE_OPEN", relative)
        return {(i.path, i.status, i.detail) for i in walk.iter_files([str(root)], follow_symlinks=True)}

    by_fd, by_path = items(True), items(False)
    long_file = os.fsdecode(hostile_tree.long_path)
    assert by_fd - by_path == {(long_file, "", "")} | {
        (os.path.join(os.path.dirname(long_file), "plain \udcff beside.txt"), "", "")
    }
    assert by_path <= by_fd
    assert (str(root / "link.exe"), "", "") in by_fd


def test_a_gone_file_seen_again_outside_a_scan_is_not_gone(tmp_path, rmm_tree):
    """watch and process sweeps observe files one by one: a row newer than gone_at means back."""
    target = rmm_tree / "sub" / "agent.exe"
    clock = Clock()
    with Store(tmp_path / "db.sqlite3") as store:
        _scanner(store, clock).scan([str(rmm_tree)])
        target.unlink()
        clock.now += dt.timedelta(minutes=5)
        assert len(_scanner(store, clock).scan([str(rmm_tree)]).gone) == 1
        assert len(store.gone_map(DEVICE.device_id)) == 1
        shutil.copy(RMM_FIXTURE, target)
        clock.now += dt.timedelta(minutes=5)
        (item,) = iter_files([str(target)])
        store.begin()
        rows = _scanner(store, clock).observe(item, ScanStats())
        store.commit()
        assert len(rows) == 1 and store.gone_map(DEVICE.device_id) == {}


def test_a_rule_on_folderpath_keeps_its_hit_for_an_undecodable_name(tmp_path, hostile_tree):
    """Evidence quotes the column's value; a path with raw bytes is quoted in the path escape,
    so storing the hit cannot fail (and lose the finding)."""
    from agent.rules.loader import load_rules

    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "by_path.yaml").write_text(
        "id: 11111111-2222-3333-4444-555555555555\n"
        "name: Anything named pulse\n"
        "description: test\n"
        "tactics: CommandAndControl\n"
        "relevantTechniques: T1219\n"
        "query: |\n"
        "  DeviceFileCertificateInfo\n"
        "  | where FolderPath contains 'pulse'\n"
        "  | summarize Count=count() by DeviceId, DeviceName\n",
        encoding="utf-8",
    )
    ruleset = load_rules([rules_dir])
    assert ruleset.problems == ()
    with Store(tmp_path / "db.sqlite3") as store:
        scanner = Scanner(
            store,
            DEVICE,
            Matcher(ruleset.rules),
            None,
            max_file_size=1 << 20,
            file_time_budget=10,
            reobserve_interval=3600,
        )
        stats = scanner.scan([str(hostile_tree.root)])
        evidence = [json.loads(e) for (e,) in store.db.execute("SELECT evidence FROM hits")]
    assert stats.errors == [] and stats.findings == 2  # the top-level copy and the deep one
    values = sorted(e[0]["value"] for e in evidence)
    assert all("%FF" in v for v in values)
    assert {os.fsencode(unescape_path(v)) for v in values} == {hostile_tree.signed[0], hostile_tree.long_path}

"""The scan engine's economies keep its results: the file cache is looked up per batch (never
loaded whole), the walk comes in per-directory batches, one clock read per batch."""

from __future__ import annotations

import datetime as dt
import os
import shutil

from agent.rows import Device
from agent.scanner import Matcher, Scanner
from agent.sources.walk import iter_batches, iter_files
from agent.store import Store
from tests.conftest import FIXTURES

SIGNED = FIXTURES / "files" / "pulseway.exe"


def _tree(base, files_in_big_dir: int = 600):
    big = base / "big"
    big.mkdir(parents=True)
    for i in range(files_in_big_dir):
        (big / f"f{i:04d}.txt").write_bytes(b"x" * (i % 7))
    for d in ("a", "a/b", "c"):
        (base / d).mkdir(parents=True, exist_ok=True)
        shutil.copy(SIGNED, base / d / "tool.exe")
        (base / d / "note.txt").write_text("hello")


def test_batches_are_the_walk_in_order_one_directory_at_a_time(tmp_path):
    _tree(tmp_path)
    batches = list(iter_batches([str(tmp_path)], batch_size=256))
    flat = [item.path for batch in batches for item in batch]
    assert flat == [item.path for item in iter_files([str(tmp_path)])]
    assert all(1 <= len(b) <= 256 for b in batches)
    assert all(len({os.path.dirname(i.path) for i in b}) == 1 for b in batches)
    assert len(flat) == 600 + 6


def test_scan_looks_the_cache_up_per_batch_and_keeps_its_correctness(tmp_path, monkeypatch):
    tree = tmp_path / "tree"
    _tree(tree)
    clock_reads = []

    def clock() -> dt.datetime:
        clock_reads.append(1)
        return dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

    loads = []
    real_load = Store.load_cache
    monkeypatch.setattr(Store, "load_cache", lambda self, device_id: loads.append(1) or real_load(self, device_id))
    with Store(tmp_path / "s.sqlite3") as store:

        def scan():
            scanner = Scanner(
                store,
                Device("a" * 40, "host"),
                Matcher([]),
                None,
                max_file_size=1 << 26,
                file_time_budget=30,
                reobserve_interval=86400,
                clock=clock,
            )
            return scanner.scan([str(tree)])

        first = scan()
        assert (first.files, first.parsed, first.signed_files, first.rows) == (606, 606, 3, 3)
        assert len(clock_reads) < 20  # one per batch (+ the closing gone check), not one per file
        again = scan()
        assert (again.parsed, again.unchanged, again.rows) == (0, 606, 0)
        (tree / "big" / "f0003.txt").write_bytes(b"changed content")
        (tree / "c" / "tool.exe").write_bytes(b"MZ not a PE any more" * 10)
        third = scan()
        assert (third.parsed, third.unchanged) == (2, 604)
        assert [(p, s) for p, s, _ in third.gone] == [(str(tree / "c" / "tool.exe"), "")]
        os.unlink(tree / "a" / "tool.exe")
        fourth = scan()
        assert {p for p, _s, _w in fourth.gone} == {str(tree / "a" / "tool.exe")}
        assert fourth.parsed == 0
    assert loads == []  # the whole cache was never loaded


def _results(tmp_path, tree, threads: int, state: str):
    """(statuses, per-path outcome list) of one scan with that many prefetch threads."""
    with Store(tmp_path / state) as store:
        scanner = Scanner(
            store,
            Device("a" * 40, "host"),
            Matcher([]),
            None,
            max_file_size=1 << 26,
            file_time_budget=30,
            reobserve_interval=86400,
            prefetch_threads=threads,
        )
        seen: list[str] = []
        stats = scanner.scan([str(tree)], progress=lambda _s, path: seen.append(path))
        rows = [(r["FolderPath"], r["Signer"]) for r in store.iter_rows()]
    return dict(stats.statuses), stats.errors, seen, rows


def test_prefetch_pool_keeps_order_and_every_status(tmp_path, monkeypatch):
    from agent.sources import prefetch
    from tests.hostile_tree import make_hostile_tree

    monkeypatch.setattr(prefetch, "COLD_SECONDS", -1.0)  # every stat counts as cold: the pool always works
    warmed = []
    real_warm = prefetch.warm
    monkeypatch.setattr(prefetch, "warm", lambda item: warmed.append(item.path) or real_warm(item))

    tree = tmp_path / "tree"
    _tree(tree, files_in_big_dir=300)
    make_hostile_tree(tree)
    os.mkfifo(tree / "big" / "a.fifo")  # never opened, by the scanner or the pool
    (tree / "big" / "locked.txt").write_text("x")
    os.chmod(tree / "big" / "locked.txt", 0)
    serial = _results(tmp_path, tree, 0, "serial.sqlite3")
    pooled = _results(tmp_path, tree, 8, "pooled.sqlite3")
    assert pooled == serial
    assert len(warmed) > 300  # the pool did the reading ahead
    assert serial[0]["OK"] >= 3 and serial[0]["NOT_PE"] > 300


def _scanner(store, verifier=None):
    return Scanner(
        store,
        Device("a" * 40, "host"),
        Matcher([]),
        verifier,
        max_file_size=1 << 26,
        file_time_budget=30,
        reobserve_interval=0,
    )


def test_identical_signed_copies_are_parsed_once_and_rows_keep_their_own_paths(tmp_path):
    from agent.extract.authenticode import TrustVerifier, load_roots

    tree = tmp_path / "tree"
    _tree(tree)
    verifier = TrustVerifier(load_roots([FIXTURES / "pki" / "root-ca.pem"]))
    with Store(tmp_path / "s.sqlite3") as store:
        stats = _scanner(store, verifier).scan([str(tree)])
        rows = list(store.iter_rows())
    assert stats.signed_files == 3
    assert stats.content_hits == 2  # three byte-identical copies: one parse and verification
    assert sorted(r["FolderPath"] for r in rows) == sorted(str(tree / d / "tool.exe") for d in ("a", "a/b", "c"))
    assert len({r["SHA256"] for r in rows}) == 1 and rows[0]["SHA256"]


def test_content_cache_is_bounded_and_keeps_only_outcomes_of_the_bytes():
    from agent.extract.authenticode import FileFacts
    from agent.scanner import ContentCache

    cache = ContentCache(max_entries=2, max_bytes=10_000)
    for i in range(3):
        cache.put((i, b"k"), FileFacts("NOT_PE", "", i))
    assert len(cache) == 2 and cache.get((0, b"k")) is None and cache.get((2, b"k")) is not None
    for status in ("TIMEOUT", "PARSE_ERROR", "ACCESS_DENIED"):
        cache.put((9, status.encode()), FileFacts(status, "PE", 9))
        assert cache.get((9, status.encode())) is None
    small = ContentCache(max_entries=100, max_bytes=600)  # 256 bytes counted per entry at least
    for i in range(5):
        small.put((i, b""), FileFacts("NOT_SIGNED", "PE", i))
    assert len(small) == 2 and small.bytes <= 600


def test_rescan_never_reparses_an_unchanged_file_and_always_a_changed_one(tmp_path, monkeypatch):
    from agent import filecache, scanner

    monkeypatch.setattr(scanner, "MIN_RECORDED_BATCH", 1)  # every directory recorded, however small
    asked: list[str] = []
    real_lookup = filecache.lookup
    monkeypatch.setattr(filecache, "lookup", lambda db, dev, paths: asked.extend(paths) or real_lookup(db, dev, paths))
    tree = tmp_path / "tree"
    _tree(tree, files_in_big_dir=40)
    with Store(tmp_path / "s.sqlite3") as store:
        first = _scanner(store).scan([str(tree)])
        assert first.parsed == first.files == 46
        asked.clear()
        again = _scanner(store).scan([str(tree)])
        assert (again.parsed, again.unchanged, again.signed_files, again.rows) == (0, 46, 3, 3)
        assert sorted(asked) == sorted(p for p, _s in first.current)  # per-file lookups: the signed files only
        assert dict(again.statuses) == dict(first.statuses) and again.current == first.current
        big = tree / "big"
        changes = [
            lambda: os.utime(big / "f0001.txt", ns=(1, 1)),  # mtime
            lambda: (big / "f0002.txt").write_bytes(b"longer than before"),  # size
            lambda: ((big / "new").write_bytes(b"x"), os.replace(big / "new", big / "f0003.txt")),  # inode
            lambda: (big / "f9999.txt").write_bytes(b"MZ" + b"\0" * 100),  # a new file
        ]
        for change in changes:
            change()
            stats = _scanner(store).scan([str(tree)])
            assert stats.parsed == 1, stats.as_dict()
            assert stats.unchanged == stats.files - 1
            assert _scanner(store).scan([str(tree)]).parsed == 0
        os.unlink(big / "f0004.txt")  # a file removed: the others stay unchanged
        stats = _scanner(store).scan([str(tree)])
        assert (stats.parsed, stats.files) == (0, 46)
        os.unlink(tree / "a" / "tool.exe")  # a signed file gone from a recorded batch
        stats = _scanner(store).scan([str(tree)])
        assert {p for p, _s, _w in stats.gone} == {str(tree / "a" / "tool.exe")}
        (tree / "c" / "tool.exe").write_bytes(b"MZ" * 100)  # a signed file replaced: changed, gone
        stats = _scanner(store).scan([str(tree)])
        assert stats.parsed == 1 and {p for p, _s, _w in stats.gone} == {str(tree / "c" / "tool.exe")}


def test_content_cache_respects_the_time_budget_and_never_keeps_a_timeout(tmp_path):
    from agent.extract.authenticode import TrustVerifier, load_roots
    from agent.scanner import ContentCache, examine_path

    verifier = TrustVerifier(load_roots([FIXTURES / "pki" / "root-ca.pem"]))

    def examine(content, budget=30.0, verify=verifier):
        return examine_path(
            str(SIGNED), (0, 0, 0, 0), verifier=verify, max_file_size=1 << 26, time_budget=budget, content=content
        )

    content = ContentCache()
    status, facts, _detail, _ident = examine(content, budget=1e-9)
    assert status == "TIMEOUT" and facts is not None and facts.kind == "PE"
    assert len(content) == 0
    first = examine(content)
    again = examine(content)
    assert first[0] == again[0] == "OK" and again[1] is first[1] and content.hits == 1
    small = ContentCache(max_file_size=1000)  # larger files are read as a stream, never cached
    assert examine(small)[0] == "OK"
    assert len(small) == 0
    # without verification the signers are read from the certificate table alone: the file is not
    # read whole and hashed, so the content cache is not used
    unverified = ContentCache()
    plain, plain_again = examine(unverified, verify=None), examine(unverified, verify=None)
    assert plain[0] == plain_again[0] == "OK" and plain[1].sha256 == ""
    assert len(unverified) == 0 and unverified.hits == unverified.misses == 0


def test_only_directories_of_min_recorded_batch_files_get_a_batch_record(tmp_path, monkeypatch):
    """A batch record costs more than it saves in a small directory: those are re-scanned file by
    file (one cache lookup each), the big one is counted from its record, and both ways agree."""
    from agent import filecache, scanner

    assert scanner.MIN_RECORDED_BATCH > 2
    asked: list[str] = []
    real_lookup = filecache.lookup
    monkeypatch.setattr(filecache, "lookup", lambda db, dev, paths: asked.extend(paths) or real_lookup(db, dev, paths))
    tree = tmp_path / "tree"
    _tree(tree, files_in_big_dir=scanner.MIN_RECORDED_BATCH + 4)
    with Store(tmp_path / "s.sqlite3") as store:
        first = _scanner(store).scan([str(tree)])
        recorded = {str(k).split("\0")[0] for (k,) in store.db.execute("SELECT batch FROM dir_cache")}
        assert recorded == {str(tree / "big")}
        asked.clear()
        again = _scanner(store).scan([str(tree)])
        assert (again.parsed, again.unchanged) == (0, first.files)
        assert not any(p.startswith(str(tree / "big") + os.sep) for p in asked)  # the big one: its record
        small = [p for p in asked if not p.startswith(str(tree / "big") + os.sep)]
        assert len(small) == first.files - (scanner.MIN_RECORDED_BATCH + 4)  # the small ones: per file
        assert dict(again.statuses) == dict(first.statuses) and again.current == first.current

"""Store and scanner: ReportId persistence, the file cache, the reobserve policy."""

from __future__ import annotations

import datetime as dt
import os
import shutil

import pytest

from agent.extract.authenticode import TrustVerifier, load_roots
from agent.rows import Device
from agent.scanner import Matcher, Scanner
from agent.store import Store, facts_from_json, facts_to_json
from tests.conftest import FIXTURES, TEST_ROOT_CA

DEVICE = Device("a" * 40, "host.example")


class Clock:
    """A settable clock for the reobserve policy (time is an input, not a mock of anything)."""

    def __init__(self) -> None:
        self.now = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "tree"
    root.mkdir()
    for name in ("pulseway.exe", "dual_signed.exe", "unsigned.exe", "text.exe"):
        shutil.copy(FIXTURES / "files" / name, root / name)
    return root


def _scanner(store, clock, verifier=None):
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


def test_report_ids_are_monotonic_and_survive_reopen(tmp_path, tree):
    clock = Clock()
    with Store(tmp_path / "db.sqlite3") as store:
        _scanner(store, clock).scan([str(tree)])
        first = sorted(r["ReportId"] for r in store.iter_rows())
    assert first == [1, 2, 3]  # pulseway (1 row) + dual_signed (2 rows)
    (tree / "pulseway.exe").write_bytes((FIXTURES / "files" / "dwservice.exe").read_bytes())  # content changes
    with Store(tmp_path / "db.sqlite3") as store:
        stats = _scanner(store, clock).scan([str(tree)])
        ids = sorted(r["ReportId"] for r in store.iter_rows())
    assert stats.parsed == 1 and stats.unchanged == 3
    assert ids == [1, 2, 3, 4]


def test_unchanged_files_are_not_reparsed_and_reobserved_once_per_interval(tmp_path, tree):
    clock = Clock()
    with Store(tmp_path / "db.sqlite3") as store:
        first = _scanner(store, clock).scan([str(tree)])
        assert first.parsed == 4 and first.rows == 3
        clock.now += dt.timedelta(hours=1)
        second = _scanner(store, clock).scan([str(tree)])
        assert second.parsed == 0 and second.unchanged == 4 and second.rows == 0
        assert second.statuses == first.statuses  # the cache keeps each file's status
        clock.now += dt.timedelta(hours=24)
        third = _scanner(store, clock).scan([str(tree)])
        assert third.parsed == 0 and third.rows == 3  # re-emitted from cached facts: LastSeen advances
        rows = list(store.iter_rows())
    assert max(r["Timestamp"] for r in rows) == clock.now
    assert len({r["ReportId"] for r in rows}) == 6


def test_a_touched_file_is_parsed_again(tmp_path, tree):
    clock = Clock()
    with Store(tmp_path / "db.sqlite3") as store:
        _scanner(store, clock).scan([str(tree)])
        st = os.stat(tree / "unsigned.exe")
        os.utime(tree / "unsigned.exe", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        stats = _scanner(store, clock).scan([str(tree)])
    assert stats.parsed == 1


def test_rows_have_all_columns_and_the_verification_facts(tmp_path, tree):
    from agent.schema import COLUMN_NAMES

    clock = Clock()
    with Store(tmp_path / "db.sqlite3") as store:
        _scanner(store, clock, TrustVerifier(load_roots([TEST_ROOT_CA]))).scan([str(tree)])
        rows = list(store.iter_rows())
    assert all(set(r) == set(COLUMN_NAMES) for r in rows)
    pulse = next(r for r in rows if r["FileName"] == "pulseway.exe")
    assert pulse["Signer"] == "MMSoft Design Ltd." and pulse["IsTrusted"] is True and pulse["DigestValid"] is True
    assert pulse["DeviceId"] == DEVICE.device_id and pulse["SignatureType"] == "Embedded"
    assert len(pulse["SHA1"]) == 40 and len(pulse["SHA256"]) == 64 and pulse["IsSigned"] is True
    assert pulse["CrlDistributionPointUrls"].startswith('["http')
    assert pulse["Source"] == "scan" and pulse["VerificationStatus"] == "OK"
    dual = sorted((r["SignatureIndex"], r["Signer"]) for r in rows if r["FileName"] == "dual_signed.exe")
    assert dual == [(0, "Contoso Benign Tools Ltd."), (1, "MMSoft Design Ltd.")]


def test_facts_round_trip_through_the_cache():
    import io

    from agent.extract.authenticode import extract_stream

    data = (FIXTURES / "files" / "timestamped.exe").read_bytes()
    facts = extract_stream(io.BytesIO(data), len(data), verifier=None)
    assert facts_from_json(facts_to_json(facts)) == facts


def test_size_cap_applies_to_pe_candidates_only(tmp_path, tree):
    big_text = tree / "big.log"
    big_text.write_bytes(b"x" * 5000)
    clock = Clock()
    with Store(tmp_path / "db.sqlite3") as store:
        scanner = Scanner(
            store,
            DEVICE,
            Matcher([]),
            None,
            max_file_size=3000,
            file_time_budget=10,
            reobserve_interval=3600,
            clock=clock,
        )
        stats = scanner.scan([str(tree)])
    by_path = {os.path.basename(e["path"]): e["status"] for e in stats.errors}
    assert by_path["pulseway.exe"] == "TOO_LARGE" and by_path["dual_signed.exe"] == "TOO_LARGE"
    assert "big.log" not in by_path and stats.statuses["NOT_PE"] == 2  # big.log and text.exe
    assert stats.files == sum(stats.statuses.values()) == 5

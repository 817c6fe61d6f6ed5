"""`store check` and `store check --repair`: what is wrong with a store, and a rebuild from what reads.

The check opens the database read-only and reports, one line each: SQLite's integrity_check,
duplicate ReportIds, repeated observations, a ReportId counter behind the ReportIds in use, and
rule hits whose row is gone.

The repair never deletes the damaged database: it copies every row, hit and counter that still
reads into a fresh database, moves the old files aside (``rmmhunt.sqlite3.corrupt-<UTC time>``,
with its -wal and -shm), and puts the fresh one in place. Reading goes by rowid and steps over
unreadable pages, so one overwritten page costs the rows on that page, not the table. The ReportId
counter is set above every ReportId still readable and the old counter; when the counters
themselves are unreadable, a floor 1,000,000 above the highest readable ReportId keeps new rows
from reusing an id that was lost with them. The file cache is dropped, so the next scan re-parses
every file (and re-emits rows for the signed ones).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.schema import COLUMN_NAMES
from agent.store import OBSERVATION_EXPRS, OBSERVATION_WHERE, Store, StoreError, explain_sqlite_error

log = logging.getLogger(__name__)

#: the jump of the ReportId counter when the counters could not be read (see the module docstring)
REPORT_ID_MARGIN = 1_000_000
_MAX_INTEGRITY_LINES = 20
_BATCH = 256


@dataclass(frozen=True)
class CheckReport:
    path: Path
    exists: bool
    problems: tuple[str, ...]
    rows: int = 0
    hits: int = 0
    schema_version: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class RepairReport:
    path: Path
    aside: Path | None = None
    rows: int = 0
    hits: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    skipped_ranges: int = 0  # unreadable stretches stepped over (rows or hits lost there)
    repeated_dropped: int = 0
    reassigned: int = 0  # rows that shared a ReportId with another and got a new one
    orphan_hits_dropped: int = 0  # rule hits whose row could not be read
    counters_lost: bool = False
    report_id_floor: int = 0
    problems: tuple[str, ...] = ()


def check_store(path: Path) -> CheckReport:
    """Every problem found in the store at ``path``. Reads only; never raises for the store's sake."""
    path = Path(path)
    if not path.exists():
        return CheckReport(path, False, ())
    problems: list[str] = []
    try:
        store = Store(path, readonly=True)
    except StoreError as exc:
        return CheckReport(path, True, (str(exc).removeprefix(f"{path}: "),))
    rows = hits = 0
    with store:
        db = store.db

        failures: set[str] = set()

        def run(label: str, sql: str) -> list[Any]:
            try:
                return list(db.execute(sql).fetchall())
            except StoreError as exc:
                db.failure = None  # keep checking the rest
                text = str(exc).removeprefix(f"{path}: ")
                if text not in failures:  # one damaged page fails several checks alike: say it once
                    failures.add(text)
                    problems.append(f"{label}: {text}")
                return []

        version = run("schema", "SELECT value FROM meta WHERE key='schema_version'")
        schema = int(version[0][0]) if version else None
        integrity = run("integrity_check", f"PRAGMA integrity_check({_MAX_INTEGRITY_LINES})")
        if integrity and integrity[0][0] != "ok":
            problems.extend(f"integrity_check: {line}" for (line,) in integrity)
        count = run("rows", "SELECT count(*) FROM cert_rows NOT INDEXED")
        rows = int(count[0][0]) if count else 0
        count = run("hits", "SELECT count(*) FROM hits NOT INDEXED")
        hits = int(count[0][0]) if count else 0
        for device_id, report_id, n in run(
            "duplicate ReportIds",
            'SELECT "DeviceId", "ReportId", count(*) FROM cert_rows NOT INDEXED GROUP BY 1, 2 HAVING count(*) > 1',
        ):
            problems.append(f"ReportId {report_id} of device {device_id} is held by {n} rows")
        repeated = run(
            "repeated observations",
            f"SELECT count(*) - count(DISTINCT json_array({OBSERVATION_EXPRS})) FROM cert_rows NOT INDEXED",
        )
        if repeated and repeated[0][0]:
            problems.append(f"{repeated[0][0]} row(s) repeat an observation already stored (stored twice)")
        counters = dict(run("counters", "SELECT device_id, value FROM counters WHERE name='ReportId'"))
        in_use = run(
            "ReportIds in use",
            'SELECT "DeviceId", max("ReportId") FROM cert_rows NOT INDEXED GROUP BY 1 '
            "UNION ALL SELECT device_id, max(report_id) FROM hits NOT INDEXED GROUP BY 1",
        )
        highest: dict[str, int] = {}
        for device_id, top in in_use:
            highest[device_id] = max(highest.get(device_id, 0), int(top or 0))
        for device_id, top in sorted(highest.items()):
            if counters.get(device_id, 0) < top:
                problems.append(
                    f"the ReportId counter of device {device_id} ({counters.get(device_id, 0)}) is behind "
                    f"the ReportIds in use (up to {top})"
                )
        orphans = run(
            "hits without a row",
            "SELECT count(*) FROM hits NOT INDEXED WHERE NOT EXISTS (SELECT 1 FROM cert_rows r "
            'WHERE r."DeviceId" = hits.device_id AND r."ReportId" = hits.report_id)',
        )
        if orphans and orphans[0][0]:
            problems.append(f"{orphans[0][0]} rule hit(s) whose row is missing")
    return CheckReport(path, True, tuple(problems), rows, hits, schema)


def _iter_salvage(src: sqlite3.Connection, table: str, cols: str, report: RepairReport) -> Iterator[tuple[Any, ...]]:
    """Every readable record of ``table`` in rowid order, stepping over unreadable stretches."""
    last = -(1 << 63)
    single = False  # after a failed batch: one record at a time up to the bad stretch

    def probe(after: int) -> bool:
        try:
            src.execute(f"SELECT rowid FROM {table} WHERE rowid > ? ORDER BY rowid LIMIT 1", (after,)).fetchone()
        except sqlite3.DatabaseError:
            return False
        return True

    while True:
        try:
            batch = src.execute(
                f"SELECT rowid, {cols} FROM {table} WHERE rowid > ? ORDER BY rowid LIMIT ?",
                (last, 1 if single else _BATCH),
            ).fetchall()
        except sqlite3.DatabaseError as exc:
            if not single:
                single = True
                continue
            log.debug("%s: unreadable after rowid %d: %s", table, last, exc)
            step = 1
            while step < (1 << 62) and not probe(last + step):
                step *= 2
            if step >= (1 << 62):
                report.skipped_ranges += 1
                return
            low, high = step // 2, step  # probe(last + low) failed (or low is 0), probe(last + high) reads
            while high - low > 1:
                mid = (low + high) // 2
                low, high = (low, mid) if probe(last + mid) else (mid, high)
            report.skipped_ranges += 1
            last += high
            single = False
            continue
        if not batch:
            return
        for record in batch:
            yield record[1:]
        last = batch[-1][0]
        single = False


def repair_store(path: Path) -> RepairReport:
    """Rebuild the store at ``path`` from what reads (see the module docstring). The caller holds the
    state directory's writer lock. Raises StoreError when the rebuild itself cannot be written."""
    path = Path(path)
    report = RepairReport(path)
    fresh_path = path.with_name(path.name + ".rebuild")
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{fresh_path}{suffix}").unlink(missing_ok=True)  # a rebuild of ours that was interrupted
    counters: dict[tuple[str, str], int] = {}
    highest: dict[str, int] = {}
    try:
        src = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: {explain_sqlite_error(exc)}") from exc
    try:
        with Store(fresh_path) as fresh:
            fresh.begin()
            counters_ok = True
            try:
                for device_id, name, value in _iter_salvage(src, "counters", "device_id, name, value", report):
                    counters[(device_id, name)] = int(value)
            except sqlite3.Error:
                counters_ok = False
            counters_ok = counters_ok and not report.skipped_ranges
            skipped_before = report.skipped_ranges
            _copy_rows(src, fresh, report, highest, counters)
            _copy_hits(src, fresh, report, highest)
            report.orphan_hits_dropped = fresh.db.execute(  # their rows were lost with the damage
                "DELETE FROM hits WHERE NOT EXISTS (SELECT 1 FROM cert_rows r "
                'WHERE r."DeviceId" = hits.device_id AND r."ReportId" = hits.report_id)'
            ).rowcount
            report.hits -= report.orphan_hits_dropped
            rows_lost = report.skipped_ranges > skipped_before
            for (device_id, name), value in counters.items():
                if name != "ReportId":
                    fresh.db.execute("INSERT INTO counters VALUES (?, ?, ?)", (device_id, name, value))
            for device_id in {d for d, n in counters if n == "ReportId"} | set(highest):
                value = max(counters.get((device_id, "ReportId"), 0), highest.get(device_id, 0))
                report.counters[device_id] = value
                fresh.db.execute("INSERT INTO counters VALUES (?, 'ReportId', ?)", (device_id, value))
            if not counters_ok and rows_lost:  # the highest ReportIds may be among what was lost
                report.counters_lost = True
                report.report_id_floor = max(highest.values(), default=0) + REPORT_ID_MARGIN
                fresh.db.execute("INSERT INTO meta VALUES ('report_id_floor', ?)", (str(report.report_id_floor),))
            fresh.commit()
    finally:
        src.close()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    try:
        for suffix in ("-wal", "-shm", ""):  # the main file last: until then the old store is whole in place
            if os.path.exists(f"{path}{suffix}"):
                os.replace(f"{path}{suffix}", f"{aside}{suffix}")
        os.replace(fresh_path, path)
    except OSError as exc:
        raise StoreError(f"{path}: cannot move the damaged store aside: {explain_sqlite_error(exc)}") from exc
    report.aside = aside
    return report


def _has_table(src: sqlite3.Connection, name: str) -> bool | None:
    try:
        return src.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None
    except sqlite3.Error:
        return None


def _copy_rows(
    src: sqlite3.Connection,
    fresh: Store,
    report: RepairReport,
    highest: dict[str, int],
    counters: dict[tuple[str, str], int],
) -> None:
    cols = ", ".join(f'"{c}"' for c in COLUMN_NAMES)
    marks = ", ".join("?" for _ in COLUMN_NAMES)
    insert = f"INSERT OR IGNORE INTO cert_rows ({cols}) VALUES ({marks})"
    device_at, report_at = COLUMN_NAMES.index("DeviceId"), COLUMN_NAMES.index("ReportId")
    key_at = [COLUMN_NAMES.index(c) for c in ("DeviceId", "FolderPath", "SHA256", "SignatureIndex", "SignerHash")]
    ts_at = COLUMN_NAMES.index("Timestamp")
    clash: list[list[Any]] = []
    try:
        for record in _iter_salvage(src, "cert_rows", cols, report):
            device_id, report_id = record[device_at], record[report_at]
            highest[device_id] = max(highest.get(device_id, 0), int(report_id or 0))  # used, even if dropped
            if fresh.db.execute(insert, record).rowcount:
                report.rows += 1
                continue
            key = (*(record[i] for i in key_at), record[ts_at])
            if fresh.db.execute(f"SELECT 1 FROM cert_rows WHERE {OBSERVATION_WHERE}", key).fetchone():
                report.repeated_dropped += 1
            else:
                clash.append(list(record))
    except sqlite3.Error as exc:  # no such table (garbage or empty file): nothing to copy
        log.debug("cert_rows unreadable: %s", exc)
    for values in clash:  # a ReportId held by two different rows: the second gets a new one, never dropped
        device_id = values[device_at]
        highest[device_id] = max(highest.get(device_id, 0), counters.get((device_id, "ReportId"), 0)) + 1
        values[report_at] = highest[device_id]
        fresh.db.execute(insert, values)
        report.rows += 1
        report.reassigned += 1


def _copy_hits(src: sqlite3.Connection, fresh: Store, report: RepairReport, highest: dict[str, int]) -> None:
    try:
        for device_id, report_id, rule_id, rule_name, evidence, excluded_by in _iter_salvage(
            src, "hits", "device_id, report_id, rule_id, rule_name, evidence, excluded_by", report
        ):
            highest[device_id] = max(highest.get(device_id, 0), int(report_id or 0))
            cur = fresh.db.execute(
                "INSERT OR IGNORE INTO hits VALUES (?, ?, ?, ?, ?, ?)",
                (device_id, report_id, rule_id, rule_name, evidence, excluded_by),
            )
            report.hits += cur.rowcount
    except sqlite3.Error as exc:
        log.debug("hits unreadable: %s", exc)

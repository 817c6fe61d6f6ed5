"""The embedded SQLite store: certificate rows, rule hits, the file cache and counters.

One database per state directory. ReportId is a per-device counter kept in the database,
so it survives restarts and never repeats.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from agent.extract.authenticode import FileFacts, SignatureFacts
from agent.extract.certinfo import CertIdentity
from agent.schema import COLUMN_NAMES, COLUMN_TYPES

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_SQL_TYPES = {"datetime": "TEXT", "string": "TEXT", "bool": "INTEGER", "long": "INTEGER", "int": "INTEGER"}


def _ddl() -> str:
    cols = ",\n  ".join(f'"{name}" {_SQL_TYPES[COLUMN_TYPES[name]]}' for name in COLUMN_NAMES)
    return f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (device_id TEXT NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL,
  PRIMARY KEY (device_id, name));
CREATE TABLE IF NOT EXISTS cert_rows (
  {cols},
  PRIMARY KEY ("DeviceId", "ReportId"));
CREATE INDEX IF NOT EXISTS cert_rows_ts ON cert_rows ("Timestamp");
CREATE INDEX IF NOT EXISTS cert_rows_path ON cert_rows ("FolderPath");
CREATE TABLE IF NOT EXISTS hits (device_id TEXT NOT NULL, report_id INTEGER NOT NULL, rule_id TEXT NOT NULL,
  rule_name TEXT NOT NULL, evidence TEXT NOT NULL, excluded_by TEXT, PRIMARY KEY (device_id, report_id, rule_id));
CREATE TABLE IF NOT EXISTS file_cache (
  device_id TEXT NOT NULL, path TEXT NOT NULL, st_dev INTEGER NOT NULL, st_ino INTEGER NOT NULL,
  size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, status TEXT NOT NULL, kind TEXT NOT NULL, facts TEXT,
  last_emitted TEXT, PRIMARY KEY (device_id, path));
"""


class CacheEntry(NamedTuple):  # a tuple: hundreds of thousands are loaded at scan start
    st_dev: int
    st_ino: int
    size: int
    mtime_ns: int
    status: str
    kind: str  # PE, MSI or ""
    facts: str | None  # JSON of FileFacts for signed files
    last_emitted: str | None

    def same_file(self, st_dev: int, st_ino: int, size: int, mtime_ns: int) -> bool:
        return (self.st_dev, self.st_ino, self.size, self.mtime_ns) == (st_dev, st_ino, size, mtime_ns)


# --- facts (de)serialisation: the cache keeps the facts so an unchanged file is never re-parsed


def _encode(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return {"$dt": value.isoformat()}
    if isinstance(value, tuple):
        return [_encode(v) for v in value]
    return value


def facts_to_json(facts: FileFacts) -> str:
    def conv(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return {f.name: conv(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, (list, tuple)):
            return [conv(v) for v in obj]
        return _encode(obj)

    return json.dumps(conv(facts), ensure_ascii=False)


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "$dt" in value:
        return dt.datetime.fromisoformat(value["$dt"])
    return value


def facts_from_json(text: str) -> FileFacts:
    raw = json.loads(text)
    sigs = []
    for s in raw["signatures"]:
        signer = {k: _decode(v) for k, v in s["signer"].items()}
        signer["crl_urls"] = tuple(signer["crl_urls"])
        s = {k: _decode(v) for k, v in s.items()}
        s["signer"] = CertIdentity(**signer)
        sigs.append(SignatureFacts(**s))
    raw["signatures"] = tuple(sigs)
    raw["warnings"] = tuple(raw.get("warnings", ()))
    return FileFacts(**raw)


# --- row values <-> SQLite


def _to_sql(name: str, value: Any) -> Any:
    if value is None:
        return None
    kind = COLUMN_TYPES[name]
    if kind == "datetime":
        return value.astimezone(dt.UTC).isoformat()
    if kind == "bool":
        return int(bool(value))
    return value


def _from_sql(name: str, value: Any) -> Any:
    if value is None:
        return None
    kind = COLUMN_TYPES[name]
    if kind == "datetime":
        return dt.datetime.fromisoformat(value)
    if kind == "bool":
        return bool(value)
    return value


class Store:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_ddl())
        self.db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # transactions: the scan groups many files into one transaction for speed
    def begin(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        if self.db.in_transaction:
            self.db.execute("COMMIT")

    # --- counters
    def counter(self, device_id: str, name: str) -> int:
        row = self.db.execute("SELECT value FROM counters WHERE device_id=? AND name=?", (device_id, name)).fetchone()
        return int(row[0]) if row else 0

    def allocate(self, device_id: str, name: str, count: int) -> int:
        """Reserve ``count`` values of a monotonic counter; returns the first one (1-based)."""
        self.db.execute(
            "INSERT INTO counters (device_id, name, value) VALUES (?, ?, ?) "
            "ON CONFLICT (device_id, name) DO UPDATE SET value = value + excluded.value",
            (device_id, name, count),
        )
        return self.counter(device_id, name) - count + 1

    # --- rows
    def insert_rows(self, rows: Sequence[dict[str, Any]]) -> None:
        """Assign ReportIds (per device, persisted) and store the rows. Mutates rows in place."""
        by_device: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            if row.get("ReportId") is None:
                by_device.setdefault(row["DeviceId"], []).append(row)
        for device_id, group in by_device.items():
            first = self.allocate(device_id, "ReportId", len(group))
            for offset, row in enumerate(group):
                row["ReportId"] = first + offset
        cols = ", ".join(f'"{c}"' for c in COLUMN_NAMES)
        marks = ", ".join("?" for _ in COLUMN_NAMES)
        self.db.executemany(
            f"INSERT OR IGNORE INTO cert_rows ({cols}) VALUES ({marks})",
            [tuple(_to_sql(c, row.get(c)) for c in COLUMN_NAMES) for row in rows],
        )

    def iter_rows(self, *, where: str = "", params: Sequence[Any] = ()) -> Iterator[dict[str, Any]]:
        cols = ", ".join(f'"{c}"' for c in COLUMN_NAMES)
        sql = f'SELECT {cols} FROM cert_rows {("WHERE " + where) if where else ""} ORDER BY "DeviceId", "ReportId"'
        for values in self.db.execute(sql, tuple(params)):
            yield {c: _from_sql(c, v) for c, v in zip(COLUMN_NAMES, values, strict=True)}

    # --- hits
    def insert_hits(self, hits: Iterable[tuple[str, int, str, str, list[dict[str, Any]], str | None]]) -> None:
        """(DeviceId, ReportId, RuleId, RuleName, evidence, excluded_by exclusion id or None)."""
        self.db.executemany(
            "INSERT OR IGNORE INTO hits (device_id, report_id, rule_id, rule_name, evidence, excluded_by) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [
                (d, r, rid, name, json.dumps(ev, ensure_ascii=False, default=str), excl)
                for d, r, rid, name, ev, excl in hits
            ],
        )

    def excluded_hits(self) -> dict[tuple[str, int], set[str]]:
        """(DeviceId, ReportId) -> rule ids whose hit on that row an exclusion removed when stored."""
        out: dict[tuple[str, int], set[str]] = {}
        cur = self.db.execute("SELECT device_id, report_id, rule_id FROM hits WHERE excluded_by IS NOT NULL")
        for device_id, report_id, rule_id in cur:
            out.setdefault((device_id, report_id), set()).add(rule_id)
        return out

    # --- file cache
    def load_cache(self, device_id: str) -> dict[str, CacheEntry]:
        cur = self.db.execute(
            "SELECT path, st_dev, st_ino, size, mtime_ns, status, kind, facts, last_emitted FROM file_cache "
            "WHERE device_id=?",
            (device_id,),
        )
        return {row[0]: CacheEntry._make(row[1:]) for row in cur}

    def put_cache(self, device_id: str, entries: Iterable[tuple[str, CacheEntry]]) -> None:
        self.db.executemany(
            "INSERT OR REPLACE INTO file_cache (device_id, path, st_dev, st_ino, size, mtime_ns, status, kind, facts, "
            "last_emitted) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (device_id, path, e.st_dev, e.st_ino, e.size, e.mtime_ns, e.status, e.kind, e.facts, e.last_emitted)
                for path, e in entries
            ],
        )

    # --- outbox (fleet)
    # Rows waiting for the collector, queued in the same transaction as the rows (scan's
    # store_rows), bounded in bytes: the oldest are dropped first and counted. Forwarding is
    # off until `rmmhunt forward` records a policy in meta (outbox_forward = hits | all).
    _OUTBOX_DDL = (
        "CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT NOT NULL, "
        "report_id INTEGER NOT NULL, payload TEXT NOT NULL, bytes INTEGER NOT NULL)"
    )

    def outbox_policy(self) -> tuple[str, int] | None:
        """(forward mode, max outbox bytes), or None while forwarding is not set up."""
        sql = "SELECT key, value FROM meta WHERE key IN ('outbox_forward', 'outbox_max_bytes')"
        got = dict(self.db.execute(sql).fetchall())
        if "outbox_forward" not in got:
            return None
        return got["outbox_forward"], int(got.get("outbox_max_bytes", 0))

    def set_outbox_policy(self, forward: str, max_bytes: int) -> bool:
        """Record the policy; True when forwarding was not set up before (the caller backfills)."""
        first = self.outbox_policy() is None
        self.db.execute(self._OUTBOX_DDL)
        self.db.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [("outbox_forward", forward), ("outbox_max_bytes", str(int(max_bytes)))],
        )
        return first

    def queue_outbox(self, rows: Sequence[dict[str, Any]], hit_keys: set[tuple[str, int]]) -> None:
        """Queue new rows for the collector: those in ``hit_keys`` ((DeviceId, ReportId) with a rule
        hit not excluded), or every row when the policy is ``all``."""
        policy = self.outbox_policy()
        if policy is None or not rows:
            return
        from agent.transport.outbox import encode_entry

        forward, max_bytes = policy
        entries = []
        for row in rows:
            if forward == "all" or (row["DeviceId"], row["ReportId"]) in hit_keys:
                payload = encode_entry(row)
                entries.append((row["DeviceId"], row["ReportId"], payload, len(payload.encode("utf-8"))))
        if not entries:
            return
        self.db.executemany("INSERT INTO outbox (device_id, report_id, payload, bytes) VALUES (?, ?, ?, ?)", entries)
        self.allocate("", "outbox_bytes", sum(e[3] for e in entries))
        if max_bytes > 0 and self.counter("", "outbox_bytes") > max_bytes:
            self._outbox_trim(max_bytes)

    def _outbox_trim(self, max_bytes: int) -> None:
        excess = self.counter("", "outbox_bytes") - max_bytes
        freed = dropped = 0
        last = None
        for seq, size in self.db.execute("SELECT seq, bytes FROM outbox ORDER BY seq"):
            if freed >= excess:
                break
            freed += size
            dropped += 1
            last = seq
        if last is None:
            return
        self.db.execute("DELETE FROM outbox WHERE seq <= ?", (last,))
        self.allocate("", "outbox_bytes", -freed)
        self.allocate("", "outbox_dropped", dropped)
        log.warning("outbox over %d bytes: dropped the %d oldest rows", max_bytes, dropped)

    def outbox_backfill(self) -> int:
        """Queue the rows stored before forwarding was set up (by the policy); returns the count."""
        self.db.execute(self._OUTBOX_DDL)
        sql = "SELECT DISTINCT device_id, report_id FROM hits WHERE excluded_by IS NULL"
        hit_keys = {(d, r) for d, r in self.db.execute(sql)}
        queued = 0
        batch: list[dict[str, Any]] = []
        for row in self.iter_rows():
            batch.append(row)
            if len(batch) >= 1000:
                before = self.outbox_stats()["queued"]
                self.queue_outbox(batch, hit_keys)
                queued += self.outbox_stats()["queued"] - before
                batch = []
        before = self.outbox_stats()["queued"]
        self.queue_outbox(batch, hit_keys)
        return queued + self.outbox_stats()["queued"] - before

    def outbox_batch(self, max_rows: int, max_bytes: int) -> list[tuple[int, str]]:
        """The oldest entries, (seq, payload), at most ``max_rows`` and about ``max_bytes``."""
        self.db.execute(self._OUTBOX_DDL)
        out: list[tuple[int, str]] = []
        size = 0
        for seq, payload, nbytes in self.db.execute(
            "SELECT seq, payload, bytes FROM outbox ORDER BY seq LIMIT ?", (max_rows,)
        ):
            if out and size + nbytes > max_bytes:
                break
            out.append((seq, payload))
            size += nbytes
        return out

    def outbox_ack(self, seqs: Sequence[int], *, dropped: int = 0) -> None:
        """Delete entries the collector acknowledged (or refused for good: counted as dropped)."""
        if not seqs:
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            freed = 0
            for start in range(0, len(seqs), 500):
                chunk = list(seqs[start : start + 500])
                marks = ",".join("?" for _ in chunk)
                freed += self.db.execute(f"SELECT COALESCE(SUM(bytes), 0) FROM outbox WHERE seq IN ({marks})",
                                         chunk).fetchone()[0]
                self.db.execute(f"DELETE FROM outbox WHERE seq IN ({marks})", chunk)
            self.allocate("", "outbox_bytes", -freed)
            if dropped:
                self.allocate("", "outbox_dropped", dropped)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def outbox_stats(self) -> dict[str, int]:
        self.db.execute(self._OUTBOX_DDL)
        queued, size = self.db.execute("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM outbox").fetchone()
        return {"queued": int(queued), "bytes": int(size), "dropped": self.counter("", "outbox_dropped")}

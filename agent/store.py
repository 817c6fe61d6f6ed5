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
from agent.extract.versioninfo import VersionInfo
from agent.schema import COLUMN_NAMES, COLUMN_TYPES
from agent.textenc import from_db, to_db

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


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """A store made before a column joined the schema (the VersionInfo* columns of issue 11.1) gets it
    added, empty: otherwise every insert fails on an upgraded agent."""
    present = {row[1] for row in db.execute('PRAGMA table_info("cert_rows")')}
    for name in COLUMN_NAMES:
        if name not in present:
            try:
                db.execute(f'ALTER TABLE cert_rows ADD COLUMN "{name}" {_SQL_TYPES[COLUMN_TYPES[name]]}')
            except sqlite3.OperationalError as exc:  # a read-only store: reads of old columns still work
                log.warning("store: cannot add column %s: %s", name, exc)
                return


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
    raw["version_info"] = VersionInfo(**(raw.get("version_info") or {}))  # absent in caches before 11.1
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
    if isinstance(value, str):  # a path may hold undecodable bytes: stored exactly (agent.textenc)
        return to_db(value)
    return value


def _from_sql(name: str, value: Any) -> Any:
    if value is None:
        return None
    kind = COLUMN_TYPES[name]
    if kind == "datetime":
        return dt.datetime.fromisoformat(value)
    if kind == "bool":
        return bool(value)
    if isinstance(value, bytes):
        return from_db(value)
    return value


class Store:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_ddl())
        _add_missing_columns(self.db)
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
        return {from_db(row[0]): CacheEntry._make(row[1:]) for row in cur}

    def put_cache(self, device_id: str, entries: Iterable[tuple[str, CacheEntry]]) -> None:
        self.db.executemany(
            "INSERT OR REPLACE INTO file_cache (device_id, path, st_dev, st_ino, size, mtime_ns, status, kind, facts, "
            "last_emitted) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    device_id,
                    to_db(path),
                    e.st_dev,
                    e.st_ino,
                    e.size,
                    e.mtime_ns,
                    e.status,
                    e.kind,
                    e.facts,
                    e.last_emitted,
                )
                for path, e in entries
            ],
        )

    # --- file presence: which signed files are on disk now, and when one went
    _GONE_DDL = (
        "CREATE TABLE IF NOT EXISTS gone_files (device_id TEXT NOT NULL, path NOT NULL, sha256 TEXT NOT NULL, "
        "gone_at TEXT NOT NULL, PRIMARY KEY (device_id, path, sha256))"
    )

    def drop_cache(self, device_id: str, paths: Iterable[str]) -> None:
        """Forget files in the cache, so that they are examined as new when seen again."""
        self.db.executemany(
            "DELETE FROM file_cache WHERE device_id=? AND path=?", [(device_id, to_db(p)) for p in paths]
        )

    def record_gone(self, device_id: str, gone: Iterable[tuple[str, str, dt.datetime]]) -> None:
        """(path, SHA256, when): a signed file seen before is gone or holds other content now.
        Its rows stay; this only says since when it is not on disk."""
        self.db.execute(self._GONE_DDL)
        self.db.executemany(
            "INSERT OR REPLACE INTO gone_files (device_id, path, sha256, gone_at) VALUES (?, ?, ?, ?)",
            [(device_id, to_db(p), sha, when.astimezone(dt.UTC).isoformat()) for p, sha, when in gone],
        )

    def clear_gone(self, device_id: str, present: Iterable[tuple[str, str]]) -> None:
        """(path, SHA256) seen on disk again: no longer gone."""
        if not self._has_table("gone_files"):
            return
        self.db.executemany(
            "DELETE FROM gone_files WHERE device_id=? AND path=? AND sha256=?",
            [(device_id, to_db(p), sha) for p, sha in present],
        )

    def gone_map(self, device_id: str) -> dict[tuple[str, str], dt.datetime]:
        """(FolderPath, SHA256) -> when the file was found gone, for files not back since (no
        row of it at or after that time). Works on a read-only store (no table: nothing gone)."""
        if not self._has_table("gone_files"):
            return {}
        cur = self.db.execute(
            "SELECT g.path, g.sha256, g.gone_at FROM gone_files g WHERE g.device_id=? AND NOT EXISTS ("
            'SELECT 1 FROM cert_rows r WHERE r."DeviceId"=g.device_id AND r."FolderPath"=g.path '
            'AND r."SHA256"=g.sha256 AND r."Timestamp">=g.gone_at)',  # seen again since (e.g. by watch)
            (device_id,),
        )
        return {(from_db(p), sha): dt.datetime.fromisoformat(at) for p, sha, at in cur}

    def _has_table(self, name: str) -> bool:
        row = self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone()
        return row is not None

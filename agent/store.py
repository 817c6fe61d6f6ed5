"""The embedded SQLite store: certificate rows, rule hits, the file cache and counters.

One database per state directory. ReportId is a per-device counter kept in the database,
so it survives restarts and never repeats.

Faults: every sqlite3 or OS failure of the store becomes one ``StoreError`` whose message
names the database file and says what to do. After the first failure a ``Store`` refuses
every further statement (the open transaction is rolled back), so nothing half-written is
ever committed after it: work committed before the fault is kept. Writers commit at least
every ``commit_interval`` seconds (default ``COMMIT_INTERVAL_SECONDS``) so a kill or a full disk loses
well under a second of work.

Readers open the database read-only (``Store(path, readonly=True)``): they never create,
migrate or lock it, and work on a read-only state directory. One writer at a time per
state directory holds ``StoreLock`` (see docs/store.md).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from agent.schema import COLUMN_NAMES, COLUMN_TYPES
from agent.textenc import from_db, to_db

if TYPE_CHECKING:  # imported lazily: the CLI imports StoreError without loading the extractor
    from agent.extract.facts import FileFacts

log = logging.getLogger(__name__)

#: 1: the first layout; 2: the unique observation key ``cert_rows_observation`` (idempotent inserts)
SCHEMA_VERSION = 2
#: a writer inside ``begin()`` commits at least this often (between two files), so a kill loses seconds of work
COMMIT_INTERVAL_SECONDS = 0.5
#: the lock file every writing command holds in the state directory
LOCK_FILE = "rmmhunt.lock"
#: who holds the lock (pid and command), written after the lock is taken; read by a waiting writer
LOCK_OWNER_FILE = "rmmhunt.lock.owner"
_SQL_TYPES = {"datetime": "TEXT", "string": "TEXT", "bool": "INTEGER", "long": "INTEGER", "int": "INTEGER"}


# One observation of one signature of one file: a retried batch never stores it twice (schema 2).
# SignerHash tells two contents apart when SHA256 is empty (--no-verify); NULLs never collide in an
# index, hence ifnull.
OBSERVATION_EXPRS = (
    '"DeviceId", "FolderPath", ifnull("SHA256", \'\'), ifnull("SignatureIndex", -1), ifnull("SignerHash", \'\'), '
    '"Timestamp"'
)
OBSERVATION_INDEX = f"CREATE UNIQUE INDEX IF NOT EXISTS cert_rows_observation ON cert_rows ({OBSERVATION_EXPRS})"
OBSERVATION_WHERE = (
    '"DeviceId" = ? AND "FolderPath" = ? AND ifnull("SHA256", \'\') = ifnull(?, \'\') '
    "AND ifnull(\"SignatureIndex\", -1) = ifnull(?, -1) AND ifnull(\"SignerHash\", '') = ifnull(?, '') "
    'AND "Timestamp" = ?'
)
OBSERVATION_COLUMNS = ("DeviceId", "FolderPath", "SHA256", "SignatureIndex", "SignerHash", "Timestamp")
_OBSERVATION_AT = [COLUMN_NAMES.index(c) for c in OBSERVATION_COLUMNS]
_REPORT_ID_AT = COLUMN_NAMES.index("ReportId")
_COLUMNS_SQL = ", ".join(f'"{c}"' for c in COLUMN_NAMES)
_MARKS_SQL = ", ".join("?" for _ in COLUMN_NAMES)
# A new observation is stored; one already stored is left (DO NOTHING on that index alone: any other
# conflict, such as a ReportId taken, is a fault, never a silent drop).
_INSERT_NEW_ROW = (
    f"INSERT INTO cert_rows ({_COLUMNS_SQL}) VALUES ({_MARKS_SQL}) ON CONFLICT ({OBSERVATION_EXPRS}) DO NOTHING"
)
_INSERT_OR_IGNORE_ROW = f"INSERT OR IGNORE INTO cert_rows ({_COLUMNS_SQL}) VALUES ({_MARKS_SQL})"
_LOOKUP_ROW = f'SELECT "ReportId" FROM cert_rows WHERE {OBSERVATION_WHERE}'


def _ddl() -> list[str]:
    """The current schema, one statement each (all idempotent)."""
    cols = ",\n  ".join(f'"{name}" {_SQL_TYPES[COLUMN_TYPES[name]]}' for name in COLUMN_NAMES)
    return [
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE IF NOT EXISTS counters (device_id TEXT NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL,
  PRIMARY KEY (device_id, name))""",
        f"""CREATE TABLE IF NOT EXISTS cert_rows (
  {cols},
  PRIMARY KEY ("DeviceId", "ReportId"))""",
        'CREATE INDEX IF NOT EXISTS cert_rows_ts ON cert_rows ("Timestamp")',
        'CREATE INDEX IF NOT EXISTS cert_rows_path ON cert_rows ("FolderPath")',
        OBSERVATION_INDEX,
        """CREATE TABLE IF NOT EXISTS hits (device_id TEXT NOT NULL, report_id INTEGER NOT NULL, rule_id TEXT NOT NULL,
  rule_name TEXT NOT NULL, evidence TEXT NOT NULL, excluded_by TEXT, PRIMARY KEY (device_id, report_id, rule_id))""",
        """CREATE TABLE IF NOT EXISTS file_cache (
  device_id TEXT NOT NULL, path TEXT NOT NULL, st_dev INTEGER NOT NULL, st_ino INTEGER NOT NULL,
  size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, status TEXT NOT NULL, kind TEXT NOT NULL, facts TEXT,
  last_emitted TEXT, PRIMARY KEY (device_id, path))""",
        # perf (re-scan): one row per walked batch whose files all ended NOT_PE, NOT_SIGNED or OK: a digest
        # of their names and identities and what a re-scan records for them (agent.filecache.batch_digest)
        """CREATE TABLE IF NOT EXISTS dir_cache (
  device_id TEXT NOT NULL, batch TEXT NOT NULL, digest BLOB NOT NULL, summary TEXT NOT NULL,
  PRIMARY KEY (device_id, batch))""",
    ]


# --- faults: one StoreError naming the file and what to do


class StoreError(Exception):
    """A failure of the store itself (disk full, damaged, read-only, locked): one line naming the file."""


_REPAIR_HINT = "run `rmmhunt store check --repair` to move it aside and rebuild a fresh store from what can be read"
_WRITABLE_HINT = "this command writes: use a writable state directory (--state-dir or RMMHUNT_STATE_DIR)"


def explain_sqlite_error(exc: BaseException) -> str:
    """What went wrong and what to do, for a sqlite3 or OS error of the store. Never raises."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and not isinstance(exc, sqlite3.Error):
        text = exc.strerror or text
        if exc.errno == errno.ENOSPC:
            return f"disk full ({text}): free space and run again; work committed before this point is kept"
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return f"{text}: {_WRITABLE_HINT}"
        return f"{text}"
    if name == "SQLITE_FULL":
        return f"disk full ({text}): free space and run again; work committed before this point is kept"
    if name.startswith("SQLITE_IOERR"):
        return (
            f"I/O error ({text}, {name}): the disk is failing, full or over a size limit; "
            "work committed before this point is kept"
        )
    if name in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or name.startswith("SQLITE_CORRUPT"):
        return f"the database is damaged ({text}): {_REPAIR_HINT}"
    if name.startswith("SQLITE_READONLY"):
        return f"the store is read-only ({text}): {_WRITABLE_HINT}"
    if name.startswith("SQLITE_CANTOPEN") or name.startswith("SQLITE_PERM") or name.startswith("SQLITE_AUTH"):
        return f"cannot open the database ({text}): check that the state directory exists and is writable"
    if name.startswith("SQLITE_CONSTRAINT"):
        return f"the database is inconsistent ({text}): run `rmmhunt store check` and, if it says so, --repair"
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return f"the database stayed locked by another process ({text}): try again when it has finished"
    return f"{text}" + (f" ({name})" if name else "")


class _Cursor(sqlite3.Cursor):
    """Maps every sqlite3 error while stepping through results to the connection's StoreError."""

    connection: _Connection

    def __next__(self) -> Any:
        try:
            return super().__next__()
        except sqlite3.Error as exc:
            raise self.connection.failed_with(exc) from exc

    def fetchone(self) -> Any:
        try:
            return super().fetchone()
        except sqlite3.Error as exc:
            raise self.connection.failed_with(exc) from exc

    def fetchall(self) -> list[Any]:
        try:
            return super().fetchall()
        except sqlite3.Error as exc:
            raise self.connection.failed_with(exc) from exc


class _Connection(sqlite3.Connection):
    """A connection whose every failure is one StoreError naming the database, and which refuses
    every statement after its first failure (the open transaction is rolled back first)."""

    store_path: Path = Path()
    failure: StoreError | None = None

    def failed_with(self, exc: BaseException) -> StoreError:
        if self.failure is None:
            self.failure = StoreError(f"{self.store_path}: {explain_sqlite_error(exc)}")
            log.info("store failure on %s", self.store_path, exc_info=exc)  # the traceback, with -v
            try:
                if self.in_transaction:
                    super().rollback()
            except sqlite3.Error:
                log.debug("rollback after a failure failed too", exc_info=True)
        return StoreError(str(self.failure))

    def refuse_after_failure(self) -> None:
        if self.failure is not None:
            raise StoreError(str(self.failure))

    def cursor(self, factory: Any = None) -> Any:  # noqa: ARG002 - always the mapping cursor
        return super().cursor(_Cursor)

    def execute(self, sql: str, parameters: Any = (), /) -> Any:
        self.refuse_after_failure()
        try:
            return self.cursor().execute(sql, parameters)
        except sqlite3.Error as exc:
            raise self.failed_with(exc) from exc

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> Any:
        self.refuse_after_failure()
        try:
            return self.cursor().executemany(sql, parameters)
        except sqlite3.Error as exc:
            raise self.failed_with(exc) from exc

    def executescript(self, sql_script: str, /) -> Any:
        self.refuse_after_failure()
        try:
            return self.cursor().executescript(sql_script)
        except sqlite3.Error as exc:
            raise self.failed_with(exc) from exc


def _connect(database: str, store_path: Path, **kwargs: Any) -> _Connection:
    try:
        db = sqlite3.connect(database, timeout=30, isolation_level=None, factory=_Connection, **kwargs)
    except sqlite3.Error as exc:
        raise StoreError(f"{store_path}: {explain_sqlite_error(exc)}") from exc
    assert isinstance(db, _Connection)
    db.store_path = store_path
    return db


# --- one writer per state directory


class StoreLock:
    """The writer lock of a state directory (filelock on ``rmmhunt.lock``). A second writer waits up
    to ``timeout`` seconds, telling ``on_wait`` once who it waits for, then raises StoreError."""

    def __init__(
        self, state_dir: Path, *, timeout: float, command: str = "", on_wait: Callable[[str], None] | None = None
    ) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LOCK_FILE
        self.owner_path = self.state_dir / LOCK_OWNER_FILE
        self.timeout = timeout
        self.command = command or "command"
        self.on_wait = on_wait
        self._lock: Any = None

    def owner(self) -> str:
        """'the scan by pid N' from the owner file, or a neutral phrase. Never raises."""
        try:
            info = json.loads(self.owner_path.read_text(encoding="utf-8"))
            return f"the {info['command']} by pid {int(info['pid'])}"
        except (OSError, ValueError, KeyError, TypeError):
            return "another rmmhunt writer"

    def acquire(self) -> None:
        from filelock import FileLock, Timeout

        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            lock = FileLock(self.path, timeout=self.timeout)
            try:
                lock.acquire(blocking=False)
            except Timeout:
                if self.on_wait is not None:
                    self.on_wait(
                        f"waiting for {self.owner()} to finish (up to {self.timeout:g} s, setting lock_timeout)..."
                    )
                try:
                    lock.acquire(timeout=self.timeout)
                except Timeout:
                    raise StoreError(
                        f"{self.path}: still held by {self.owner()} after {self.timeout:g} s: one writer at a time "
                        "per state directory; try again later or raise lock_timeout in the config"
                    ) from None
            self._lock = lock
        except OSError as exc:
            self.release()
            raise StoreError(f"{self.path}: {explain_sqlite_error(exc)}") from exc

        tmp = self.owner_path.with_name(f"{LOCK_OWNER_FILE}.{os.getpid()}")
        try:  # only for the waiting message: a full disk must not stop the lock here
            tmp.write_text(json.dumps({"pid": os.getpid(), "command": self.command}), encoding="utf-8")
            os.replace(tmp, self.owner_path)
        except OSError:
            log.debug("cannot write %s", self.owner_path, exc_info=True)
            tmp.unlink(missing_ok=True)

    def release(self) -> None:
        if self._lock is not None:
            lock, self._lock = self._lock, None
            try:
                self.owner_path.unlink(missing_ok=True)
            except OSError:
                log.debug("cannot remove %s", self.owner_path, exc_info=True)
            lock.release()

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _add_missing_columns(db: Any) -> None:
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
    from agent.extract.facts import CertIdentity, FileFacts, SignatureFacts, VersionInfo  # not signify

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


def _datetime_to_sql(value: Any) -> str:
    return str(value.astimezone(dt.UTC).isoformat())


def _bool_to_sql(value: Any) -> int:
    return int(bool(value))


def _value_to_sql(value: Any) -> Any:
    # a path may hold undecodable bytes: stored exactly (agent.textenc); ASCII needs no check
    return (value if value.isascii() else to_db(value)) if isinstance(value, str) else value


_TO_SQL: dict[str, Callable[[Any], Any]] = {"datetime": _datetime_to_sql, "bool": _bool_to_sql}
_TO_SQL.update({kind: _value_to_sql for kind in set(COLUMN_TYPES.values()) - set(_TO_SQL)})
# perf (ingest, issue 12): one converter per column in COLUMN_NAMES order, looked up once
# json.dumps(ev, ensure_ascii=False, default=str) without building an encoder for every hit
_evidence_json = json.JSONEncoder(ensure_ascii=False, default=str).encode
_ROW_TO_SQL = tuple((name, _TO_SQL[COLUMN_TYPES[name]]) for name in COLUMN_NAMES)


def _row_values(row: Mapping[str, Any]) -> list[Any]:
    """The row's values in COLUMN_NAMES order, as SQLite stores them (None stays NULL)."""
    get = row.get
    return [None if (v := get(name)) is None else convert(v) for name, convert in _ROW_TO_SQL]


_FROM_SQL: dict[str, Callable[[Any], Any]] = {"datetime": dt.datetime.fromisoformat, "bool": bool}
# perf (hunt, issue 12): the row built by dict(zip()) at C speed, then only the columns that need
# it converted; any other column may hold the raw bytes of a path with undecodable bytes (textenc)
_CONVERTED_COLUMNS = tuple((n, _FROM_SQL[COLUMN_TYPES[n]]) for n in COLUMN_NAMES if COLUMN_TYPES[n] in _FROM_SQL)
_PLAIN_COLUMNS = tuple(n for n in COLUMN_NAMES if COLUMN_TYPES[n] not in _FROM_SQL)


def _row_from_sql(values: Sequence[Any]) -> dict[str, Any]:
    row = dict(zip(COLUMN_NAMES, values, strict=True))
    for name, convert in _CONVERTED_COLUMNS:
        value = row[name]
        if value is not None:
            row[name] = convert(value)
    for name in _PLAIN_COLUMNS:
        if row[name].__class__ is bytes:
            row[name] = from_db(row[name])
    return row


def _schema_version(db: _Connection, path: Path) -> int | None:
    """The stored schema version; None for a database with no schema yet. Refuses a newer one."""
    if db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone() is None:
        return None
    row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    version = int(row[0]) if row else 1
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path}: written by a newer rmmhunt (schema {version}, this one knows {SCHEMA_VERSION}): "
            "upgrade rmmhunt or use another state directory"
        )
    return version


def _migrate_1_to_2(db: _Connection, path: Path) -> None:
    """Schema 1 -> 2: drop repeated observations (two writers at once stored each row twice), then the
    unique observation key makes every later insert idempotent. The first row of each observation stays."""
    repeated = db.execute(
        'SELECT "DeviceId", "ReportId" FROM cert_rows WHERE rowid NOT IN (SELECT min(rowid) FROM cert_rows '
        f"GROUP BY {OBSERVATION_EXPRS})"
    ).fetchall()
    if repeated:
        db.executemany("DELETE FROM hits WHERE device_id=? AND report_id=?", repeated)
        db.executemany('DELETE FROM cert_rows WHERE "DeviceId"=? AND "ReportId"=?', repeated)
    log.info("%s: schema 1 -> 2, %d repeated observation(s) removed", path, len(repeated))


def _empty_memory_store(path: Path) -> _Connection:
    db = _connect(":memory:", path)
    for statement in _ddl():
        db.execute(statement)
    return db


class Store:
    """The store of one state directory. ``Store(path)`` opens it for writing (creating and migrating
    it); pass ``lock`` to hold the state directory's writer lock for the store's lifetime.
    ``Store(path, readonly=True)`` only reads: no file is created, nothing is locked or migrated."""

    def __init__(
        self,
        path: Path,
        *,
        readonly: bool = False,
        lock: StoreLock | None = None,
        commit_interval: float = COMMIT_INTERVAL_SECONDS,
    ) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.lock = lock
        self.commit_interval = commit_interval
        self._tx_started: float | None = None
        self._report_id_floor = 0
        try:
            self.db: _Connection = self._open_readonly() if readonly else self._open_writer()
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    def _open_writer(self) -> _Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"{self.path.parent}: cannot create the state directory: {explain_sqlite_error(exc)}"
            ) from exc
        db = _connect(str(self.path), self.path)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("BEGIN IMMEDIATE")
            version = _schema_version(db, self.path)
            for statement in _ddl():
                if statement is not OBSERVATION_INDEX:
                    db.execute(statement)
            if version is not None and version < 2:
                _migrate_1_to_2(db, self.path)
            _add_missing_columns(db)  # columns that joined the row schema later (VersionInfo*)
            db.execute(OBSERVATION_INDEX)
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            floor = db.execute("SELECT value FROM meta WHERE key='report_id_floor'").fetchone()
            self._report_id_floor = int(floor[0]) if floor else 0
            db.execute("COMMIT")
        except BaseException:
            db.close()
            raise
        return db

    def _open_readonly(self) -> _Connection:
        parent = self.path.parent
        if parent.exists() and not parent.is_dir():
            raise StoreError(f"{parent}: the state directory is not a directory")
        if not self.path.exists():  # nothing stored yet: an empty store that exists nowhere
            return _empty_memory_store(self.path)
        uri = self.path.resolve().as_uri()
        db = _connect(uri + "?mode=ro", self.path, uri=True)
        try:
            version = _schema_version(db, self.path)
        except StoreError as exc:
            db.close()
            parent = self.path.parent
            if os.access(parent, os.W_OK):
                raise
            log.debug("%s: read-only directory (%s): reading the file as immutable", self.path, exc)
            # A read-only directory cannot hold the WAL index (-shm) a plain read-only open needs.
            # Nobody can write here, so reading the file as immutable is exact, except for a
            # write-ahead log left behind, which cannot be read without that index.
            if os.path.exists(f"{self.path}-wal") and os.path.getsize(f"{self.path}-wal") > 0:
                log.warning(
                    "%s: read-only directory with a write-ahead log that cannot be read here: "
                    "rows written since the last checkpoint are not shown",
                    self.path,
                )
            db = _connect(uri + "?mode=ro&immutable=1", self.path, uri=True)
            try:
                version = _schema_version(db, self.path)
            except BaseException:
                db.close()
                raise
        if version is None:  # an empty file (or no schema yet): nothing to read
            db.close()
            return _empty_memory_store(self.path)
        return db

    def close(self) -> None:
        try:
            self.db.close()
        except sqlite3.Error:
            log.debug("closing %s failed", self.path, exc_info=True)
        finally:
            if self.lock is not None:
                self.lock.release()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # transactions: the scan groups many files into one transaction for speed; the store
    # commits it at least every ``commit_interval`` seconds (between two files' rows)
    def begin(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        self._tx_started = time.monotonic()

    def commit(self) -> None:
        self.db.refuse_after_failure()  # the failed transaction was rolled back: never report it as committed
        if self.db.in_transaction:
            self.db.execute("COMMIT")
        self._tx_started = None

    def _commit_if_due(self) -> None:
        started = self._tx_started
        if started is not None and self.db.in_transaction and time.monotonic() - started >= self.commit_interval:
            self.db.execute("COMMIT")
            self.db.execute("BEGIN IMMEDIATE")
            self._tx_started = time.monotonic()

    # --- counters
    def counter(self, device_id: str, name: str) -> int:
        row = self.db.execute("SELECT value FROM counters WHERE device_id=? AND name=?", (device_id, name)).fetchone()
        return int(row[0]) if row else 0

    def _raise_counter(self, device_id: str, name: str, value: int) -> None:
        self.db.execute(
            "INSERT INTO counters (device_id, name, value) VALUES (?, ?, ?) "
            "ON CONFLICT (device_id, name) DO UPDATE SET value = max(value, excluded.value)",
            (device_id, name, value),
        )

    def raise_report_ids(self, device_id: str, floor: int) -> None:
        """The next ReportId of ``device_id`` is above ``floor`` (a sweep numbers its rows from a base of its
        own, so they never collide with the swept machine's agent counter). Never lowers the counter."""
        self._raise_counter(device_id, "ReportId", floor)

    def _add_counter(self, device_id: str, name: str, delta: int) -> None:
        """Add ``delta`` (may be negative) to a bookkeeping counter (the outbox's bytes and drops)."""
        self.db.execute(
            "INSERT INTO counters (device_id, name, value) VALUES (?, ?, ?) "
            "ON CONFLICT (device_id, name) DO UPDATE SET value = value + excluded.value",
            (device_id, name, delta),
        )

    def _next_report_id(self, device_id: str) -> int:
        """Above the counter, above every stored ReportId (a counter found behind heals here) and above
        the floor a repair sets when it could not read the counters (``report_id_floor`` in meta)."""
        stored = self.db.execute('SELECT max("ReportId") FROM cert_rows WHERE "DeviceId"=?', (device_id,)).fetchone()
        return max(self.counter(device_id, "ReportId"), int(stored[0] or 0), self._report_id_floor) + 1

    # --- rows
    def insert_rows(self, rows: Sequence[dict[str, Any]]) -> None:
        """Store each observation once and give it its ReportId (per device, persisted, never reused).
        Only rows actually inserted take a new ReportId; a row whose observation (DeviceId, FolderPath,
        SHA256, SignatureIndex, SignerHash, Timestamp) is already stored, as in a retried batch, takes the stored
        row's ReportId and is not stored again. Mutates rows in place."""
        self._commit_if_due()
        next_id: dict[str, int] = {}
        execute = self.db.execute
        for row in rows:
            values = _row_values(row)
            if row.get("ReportId") is not None:  # carries its own (an import): stored as it is, once
                execute(_INSERT_OR_IGNORE_ROW, values)
                continue
            device_id = row["DeviceId"]
            if device_id not in next_id:
                next_id[device_id] = self._next_report_id(device_id)
            values[_REPORT_ID_AT] = next_id[device_id]
            # perf: one statement for a new row; only a stored observation (a retried batch) is looked up
            if execute(_INSERT_NEW_ROW, values).rowcount == 1:
                row["ReportId"] = next_id[device_id]
                next_id[device_id] += 1
                continue
            existing = execute(_LOOKUP_ROW, [values[i] for i in _OBSERVATION_AT]).fetchone()
            row["ReportId"] = existing[0]
        for device_id, following in next_id.items():
            self._raise_counter(device_id, "ReportId", following - 1)

    def iter_rows(self, *, where: str = "", params: Sequence[Any] = ()) -> Iterator[dict[str, Any]]:
        cols = ", ".join(f'"{c}"' for c in COLUMN_NAMES)
        sql = f'SELECT {cols} FROM cert_rows {("WHERE " + where) if where else ""} ORDER BY "DeviceId", "ReportId"'
        for values in self.db.execute(sql, tuple(params)):
            yield _row_from_sql(values)

    # --- hits
    def insert_hits(self, hits: Iterable[tuple[str, int, str, str, list[dict[str, Any]], str | None]]) -> None:
        """(DeviceId, ReportId, RuleId, RuleName, evidence, excluded_by exclusion id or None)."""
        self.db.executemany(
            "INSERT OR IGNORE INTO hits (device_id, report_id, rule_id, rule_name, evidence, excluded_by) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(d, r, rid, name, _evidence_json(ev), excl) for d, r, rid, name, ev, excl in hits],
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

    def put_dirs(self, device_id: str, records: Iterable[tuple[str, bytes, str]]) -> None:
        """(batch key, digest, summary) of walked batches a re-scan may count whole (agent.filecache)."""
        self.db.executemany(
            "INSERT OR REPLACE INTO dir_cache (device_id, batch, digest, summary) VALUES (?, ?, ?, ?)",
            [(device_id, to_db(key), digest, summary) for key, digest, summary in records],
        )

    def drop_dirs(self, device_id: str, keys: Iterable[str]) -> None:
        self.db.executemany(
            "DELETE FROM dir_cache WHERE device_id=? AND batch=?", [(device_id, to_db(k)) for k in keys]
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

    def queue_outbox(
        self,
        rows: Sequence[dict[str, Any]],
        hit_keys: set[tuple[str, int]],
        excluded: Mapping[tuple[str, int], dict[str, str]] | None = None,
    ) -> None:
        """Queue new rows for the collector: those in ``hit_keys`` ((DeviceId, ReportId) with a rule
        hit not excluded) or with an excluded hit, or every row when the policy is ``all``. Each
        carries its excluded hits (RuleExclusions): the collector keeps them out of fleet hunts
        unless asked, as ``hunt --include-excluded`` here. ``excluded`` ((DeviceId, ReportId) -> {rule
        id: exclusion id}) is what the caller just stored; without it the hits table is read."""
        policy = self.outbox_policy()
        if policy is None or not rows:
            return
        from agent.transport.outbox import encode_entry

        forward, max_bytes = policy
        if excluded is None:  # forwarded, so the collector excludes the same hits
            excluded = self._excluded_pairs(rows)
        entries = []
        for row in rows:
            key = (row["DeviceId"], row["ReportId"])
            if forward == "all" or key in hit_keys or key in excluded:
                payload = encode_entry(row, excluded.get(key))
                entries.append((row["DeviceId"], row["ReportId"], payload, len(payload.encode("utf-8"))))
        if not entries:
            return
        self.db.executemany("INSERT INTO outbox (device_id, report_id, payload, bytes) VALUES (?, ?, ?, ?)", entries)
        self._add_counter("", "outbox_bytes", sum(e[3] for e in entries))
        if max_bytes > 0 and self.counter("", "outbox_bytes") > max_bytes:
            self._outbox_trim(max_bytes)

    def _excluded_pairs(self, rows: Sequence[dict[str, Any]]) -> dict[tuple[str, int], dict[str, str]]:
        """(DeviceId, ReportId) -> {rule id: exclusion id} of the rows' excluded hits (one range
        query per device: a batch of rows is consecutive)."""
        out: dict[tuple[str, int], dict[str, str]] = {}
        by_device: dict[str, list[int]] = {}
        for row in rows:
            by_device.setdefault(row["DeviceId"], []).append(row["ReportId"])
        sql = (
            "SELECT report_id, rule_id, excluded_by FROM hits WHERE device_id=? AND report_id BETWEEN ? AND ? "
            "AND excluded_by IS NOT NULL"
        )
        for device_id, ids in by_device.items():
            for report_id, rule_id, excluded_by in self.db.execute(sql, (device_id, min(ids), max(ids))):
                out.setdefault((device_id, report_id), {})[rule_id] = excluded_by
        return out

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
        self._add_counter("", "outbox_bytes", -freed)
        self._add_counter("", "outbox_dropped", dropped)
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
                freed += self.db.execute(
                    f"SELECT COALESCE(SUM(bytes), 0) FROM outbox WHERE seq IN ({marks})", chunk
                ).fetchone()[0]
                self.db.execute(f"DELETE FROM outbox WHERE seq IN ({marks})", chunk)
            self._add_counter("", "outbox_bytes", -freed)
            if dropped:
                self._add_counter("", "outbox_dropped", dropped)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def outbox_stats(self) -> dict[str, int]:
        self.db.execute(self._OUTBOX_DDL)
        queued, size = self.db.execute("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM outbox").fetchone()
        return {"queued": int(queued), "bytes": int(size), "dropped": self.counter("", "outbox_dropped")}

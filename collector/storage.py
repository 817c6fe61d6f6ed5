"""The collector's database: SQLite by default, PostgreSQL through a DSN, with SQLAlchemy Core.

The rows table is derived from ``agent.schema`` (never a second copy of the column list).
Migrations are versioned in a ``schema_version`` table and run on start. A column added to
``agent.schema`` later is a new migration: list it in ``ADDED_ROW_COLUMNS`` under the next
version; ``check_schema`` refuses to start when a schema column has no migration.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import operator
import os
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from agent.rules.kql_parser import (
    Ago,
    And,
    Arith,
    Call,
    Column,
    Compare,
    Const,
    EmptyTest,
    Expr,
    Neg,
    Not,
    Now,
    Or,
    WhereStage,
)
from agent.rules.loader import Rule
from agent.schema import COLUMN_NAMES, COLUMN_TYPES
from agent.transport.outbox import RULE_EXCLUSIONS
from collector.fleetplan import FleetPlan, RuleIndex, SqlSummarize, apply_post, parse_fleet_plan, window_range

log = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # Windows: SQLite collectors there run alone
    fcntl = None  # type: ignore[assignment]

#: version -> row columns that version adds (ALTER TABLE ADD COLUMN). Version 1 creates the
#: table with every agent.schema column not listed here.
ADDED_ROW_COLUMNS: dict[int, tuple[str, ...]] = {}

_SA_TYPES: dict[str, Callable[[], Any]] = {
    "datetime": sa.DateTime,
    "string": sa.Text,
    "bool": sa.Boolean,
    "long": sa.BigInteger,
    "int": sa.Integer,
}

_STRING_COLUMNS = tuple(n for n in COLUMN_NAMES if COLUMN_TYPES[n] == "string")
_DATETIME_COLUMNS = tuple(n for n in COLUMN_NAMES if COLUMN_TYPES[n] == "datetime")

metadata = sa.MetaData()

schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied_at", sa.DateTime, nullable=False),
)
meta = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)
devices = sa.Table(
    "devices",
    metadata,
    sa.Column("device_id", sa.String(128), primary_key=True),
    sa.Column("device_name", sa.Text, nullable=False),
    sa.Column("node_key_hash", sa.String(64), nullable=False, index=True),
    sa.Column("enrolled_at", sa.DateTime, nullable=False),
    sa.Column("last_seen", sa.DateTime),
    sa.Column("revoked", sa.Boolean, nullable=False, default=False),
    sa.Column("rows_received", sa.BigInteger, nullable=False, default=0),
    sa.Column("dropped_rows", sa.BigInteger, nullable=False, default=0),
)
cert_rows = sa.Table(
    "cert_rows",
    metadata,
    *(
        sa.Column(
            name, _SA_TYPES[COLUMN_TYPES[name]](), primary_key=name in ("DeviceId", "ReportId"), autoincrement=False
        )
        for name in COLUMN_NAMES
    ),
    sa.Index("cert_rows_ts", "Timestamp"),
)
hits = sa.Table(
    "hits",
    metadata,
    sa.Column("ruleset", sa.String(64), primary_key=True),
    sa.Column("rule_id", sa.String(128), primary_key=True),
    sa.Column("device_id", sa.String(128), primary_key=True),
    sa.Column("report_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("evidence", sa.Text, nullable=False),
    sa.Index("hits_device", "device_id", "report_id"),
)
# Migration 2: the agent's exclusions, forwarded per row (rule id -> exclusion id), and the hits
# they exclude. Excluded hits live apart from ``hits`` so that every default view (hunts, the
# dashboard) leaves them out with no extra condition; hunts add them on request.
row_exclusions = sa.Table(
    "row_exclusions",
    metadata,
    sa.Column("device_id", sa.String(128), primary_key=True),
    sa.Column("report_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("rule_id", sa.String(128), primary_key=True),
    sa.Column("exclusion_id", sa.Text, nullable=False),
)
excluded_hits = sa.Table(
    "excluded_hits",
    metadata,
    sa.Column("ruleset", sa.String(64), primary_key=True),
    sa.Column("rule_id", sa.String(128), primary_key=True),
    sa.Column("device_id", sa.String(128), primary_key=True),
    sa.Column("report_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("evidence", sa.Text, nullable=False),
    sa.Column("exclusion_id", sa.Text, nullable=False),
    sa.Index("excluded_hits_device", "device_id", "report_id"),
)


def _naive_utc(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None:
        return value
    return value.astimezone(dt.UTC).replace(tzinfo=None)


def _aware(value: Any) -> Any:
    if isinstance(value, dt.datetime) and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value


def make_engine(url: str) -> Engine:
    """An engine for ``sqlite:///path`` or ``postgresql[+psycopg]://...``."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 30})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(conn: Any, _record: Any) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True)


# --- migrations


def _migration_1(conn: Connection) -> None:
    later = {c for cols in ADDED_ROW_COLUMNS.values() for c in cols}
    for table in (meta, devices, hits):
        table.create(conn, checkfirst=True)
    base = sa.Table(
        "cert_rows",
        sa.MetaData(),
        *(c._copy() for c in cert_rows.columns if c.name not in later),
        sa.Index("cert_rows_ts", "Timestamp"),
    )
    base.create(conn, checkfirst=True)


def _add_columns(names: Sequence[str]) -> Callable[[Connection], None]:
    def run(conn: Connection) -> None:
        present = {c["name"] for c in sa.inspect(conn).get_columns("cert_rows")}
        for name in names:
            if name in present:
                continue
            sql_type = cert_rows.c[name].type.compile(dialect=conn.dialect)
            conn.execute(sa.text(f'ALTER TABLE cert_rows ADD COLUMN "{name}" {sql_type}'))

    return run


def _migration_2(conn: Connection) -> None:
    for table in (row_exclusions, excluded_hits):
        table.create(conn, checkfirst=True)


#: the columns fleet hunts and the dashboard matrix read from a hit's row, after the join key:
#: with them in one index the join never reads the wide table rows (SQLite: hunt over 200,000
#: rows 0.9 -> 0.6 CPU-s, the 500 x 60 matrix join 0.30 -> 0.08 CPU-s; ingest ~6% more CPU)
HIT_ROW_COLUMNS = ("Timestamp", "DeviceName", "Excluded", "IsTrusted", "ProcessId", "ProcessName")


def _migration_hit_rows_index(conn: Connection) -> None:
    cols = ", ".join(f'"{c}"' for c in ("DeviceId", "ReportId", *HIT_ROW_COLUMNS))
    conn.execute(sa.text(f"CREATE INDEX IF NOT EXISTS cert_rows_hit_rows ON cert_rows ({cols})"))


#: version -> a step other than adding row columns. Versions are shared with ADDED_ROW_COLUMNS:
#: the next row column goes under version 4.
TABLE_MIGRATIONS: dict[int, Callable[[Connection], None]] = {
    1: _migration_1,
    2: _migration_2,
    3: _migration_hit_rows_index,
}


def migrations() -> list[tuple[int, Callable[[Connection], None]]]:
    clash = set(TABLE_MIGRATIONS) & set(ADDED_ROW_COLUMNS)
    if clash:
        raise SchemaError(f"migration version(s) {sorted(clash)} used twice")
    steps: list[tuple[int, Callable[[Connection], None]]] = list(TABLE_MIGRATIONS.items())
    steps.extend((version, _add_columns(cols)) for version, cols in ADDED_ROW_COLUMNS.items())
    return sorted(steps, key=lambda step: step[0])


class SchemaError(Exception):
    """The database does not match agent.schema: a migration is missing."""


def migrate(engine: Engine) -> int:
    """Apply every pending migration; returns the schema version."""
    with engine.begin() as conn:
        schema_version.create(conn, checkfirst=True)
        done = {v for (v,) in conn.execute(sa.select(schema_version.c.version))}
    current = max(done, default=0)
    for version, step in migrations():
        if version in done:
            continue
        with engine.begin() as conn:
            log.info("collector database: migration %d", version)
            step(conn)
            conn.execute(sa.insert(schema_version).values(version=version, applied_at=_naive_utc(_utcnow())))
        current = version
    check_schema(engine)
    return current


def check_schema(engine: Engine) -> None:
    present = {c["name"] for c in sa.inspect(engine).get_columns("cert_rows")}
    missing = [c for c in COLUMN_NAMES if c not in present]
    if missing:
        raise SchemaError(f"rows table lacks {missing}: add a migration in collector.storage.ADDED_ROW_COLUMNS")


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def hash_node_key(node_key: str) -> str:
    # node keys are 256 random bits: a plain SHA-256 is enough to make a stolen database useless
    return hashlib.sha256(node_key.encode("utf-8")).hexdigest()


def load_ruleset_version(rules: Sequence[Rule]) -> str:
    """A hash of the rule files (their bytes), the version that hunts report."""
    digest = hashlib.sha256()
    for rule in sorted(rules, key=lambda r: r.id):
        try:
            data = Path(rule.path).read_bytes()
        except OSError:
            data = rule.query.text.encode("utf-8")
        digest.update(rule.id.encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()[:16]


#: the PostgreSQL advisory lock of re-evaluation (any fixed 64-bit number; this one names it)
REEVAL_LOCK_KEY = int.from_bytes(hashlib.sha256(b"rmmhunt-collector-reevaluate").digest()[:8], "big", signed=True)


_MISSING = object()
_PURE_NODES = (Const, Column, Arith, Neg, Not, And, Or, Compare, Call, EmptyTest)
#: columns whose values rarely repeat: a filter reading one of them is not worth memoising
_UNIQUE_COLUMNS = frozenset({"FolderPath", "SHA1", "SHA256", "ReportId", "Timestamp", "FileSize", "SignerHash"})


def memo_columns(plan: FleetPlan) -> tuple[str, ...] | None:
    """The row columns a plan's ingest filter reads, when its result is a function of those values
    alone: only ``where`` stages, no now()/ago(), only base columns, none that is nearly unique
    per row. None: evaluate every row."""
    parsed = getattr(plan.ingest, "_parsed", None)
    if parsed is None or not parsed.stages:
        return None
    columns: set[str] = set()

    def pure(node: Any) -> bool:
        if isinstance(node, Column):
            columns.add(node.name)
            return True
        if isinstance(node, (Now, Ago)) or not isinstance(node, _PURE_NODES):
            return False
        for field in dataclasses.fields(node):
            value = getattr(node, field.name)
            items = value if isinstance(value, tuple) else (value,)
            if not all(pure(v) for v in items if isinstance(v, Expr)):
                return False
        return True

    for stage in parsed.stages:
        if not isinstance(stage, WhereStage) or not pure(stage.predicate):
            return None
    if not columns or not columns <= set(COLUMN_NAMES) or columns & _UNIQUE_COLUMNS:
        return None
    return tuple(sorted(columns))


def _evidence_text(plan: FleetPlan, row: Mapping[str, Any], now: dt.datetime) -> str | None:
    """The hit's evidence as stored (JSON), or None when the row does not pass the ingest filter."""
    evidence = plan.ingest.filter_row(row, now=now)
    if evidence is None:
        return None
    return json.dumps(
        [{"column": e.column, "value": e.value, "operator": e.operator, "pattern": e.pattern} for e in evidence],
        ensure_ascii=False,
        default=str,
    )


class ReevalLock:
    """Only one collector re-evaluates a database at a time (several stateless collectors share one
    PostgreSQL). PostgreSQL: a session advisory lock (pg_try_advisory_lock) on a connection held
    for the re-evaluation, released by the server if that collector dies. SQLite: an exclusive
    flock on ``<database>.reeval-lock`` beside the file, released by the kernel likewise."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._conn: Connection | None = None
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        if self.engine.dialect.name == "postgresql":
            conn = self.engine.connect()
            got = bool(conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": REEVAL_LOCK_KEY}).scalar())
            conn.commit()  # the lock is the session's: it outlives this transaction
            if got:
                self._conn = conn
            else:
                conn.close()
            return got
        database = self.engine.url.database
        if not database or database == ":memory:" or fcntl is None:  # nobody else can share it
            return True
        fd = os.open(database + ".reeval-lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._conn is not None:
            try:
                self._conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": REEVAL_LOCK_KEY})
                self._conn.commit()
            finally:
                self._conn.close()
                self._conn = None
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


@dataclass(frozen=True)
class FleetResult:
    rule: Rule
    result: dict[str, Any]


@dataclass(frozen=True)
class IngestResult:
    accepted: int
    duplicates: int
    hits: int


class Collector:
    """Storage plus the rule plans: ingest, devices, fleet hunts."""

    def __init__(self, url: str, rules: Sequence[Rule]) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.schema_version = migrate(self.engine)
        self.rules = list(rules)
        self.plans: list[FleetPlan] = [parse_fleet_plan(r) for r in self.rules]
        self.index = RuleIndex(self.plans)
        self.ruleset = load_ruleset_version(self.rules)
        self._reeval: threading.Thread | None = None
        # ingest filters whose result depends only on a few row values (signers repeat across a
        # fleet): their evidence text is memoised by those values. Measured on SQLite, 100% RMM rows:
        # filters and evidence 29 -> 9 us/row, the whole ingest 94 -> 66 us of CPU per row
        self._memo_columns = {id(p): cols for p in self.plans if (cols := memo_columns(p)) is not None}
        self._memo: dict[tuple[Any, ...], Any] = {}
        self.reevaluated = False  # True once this collector (not another one) re-evaluated the stored rows
        self._stop = threading.Event()
        for plan in self.plans:
            if plan.sql is None:
                log.warning("rule %s is evaluated in Python at hunt time: %s", plan.rule.id, plan.reason)

    def close(self) -> None:
        self._stop.set()
        if self._reeval is not None:
            self._reeval.join()
        self.engine.dispose()

    # --- meta
    def _get_meta(self, conn: Connection, key: str) -> str | None:
        return conn.execute(sa.select(meta.c.value).where(meta.c.key == key)).scalar_one_or_none()

    def _set_meta(self, conn: Connection, key: str, value: str) -> None:
        if conn.execute(sa.update(meta).where(meta.c.key == key).values(value=value)).rowcount == 0:
            conn.execute(sa.insert(meta).values(key=key, value=value))

    def hits_ruleset(self) -> str | None:
        with self.engine.connect() as conn:
            return self._get_meta(conn, "hits_ruleset")

    @property
    def reevaluating(self) -> bool:
        return self._reeval is not None and self._reeval.is_alive()

    # --- rule-set changes
    def start(self, *, background: bool = True) -> None:
        """Bring the stored hits to the current rule set (in a thread when ``background``)."""
        with self.engine.begin() as conn:
            stored = self._get_meta(conn, "hits_ruleset")
            has_rows = conn.execute(sa.select(cert_rows.c.DeviceId).limit(1)).first() is not None
            if stored == self.ruleset:
                return
            if stored is None and not has_rows:
                self._set_meta(conn, "hits_ruleset", self.ruleset)
                return
        if background:
            self._reeval = threading.Thread(target=self._reevaluate_once, name="rmmhunt-reevaluate", daemon=True)
            self._reeval.start()
        else:
            self._reevaluate_once()

    def _reevaluate_once(self, poll: float = 2.0) -> None:
        """Re-evaluate unless another collector on the same database does it: wait for the
        re-evaluation lock, then re-check (the holder may have brought the hits to this rule set)."""
        lock = ReevalLock(self.engine)
        waiting = False
        while not self._stop.is_set():
            if lock.try_acquire():
                try:
                    if self.hits_ruleset() == self.ruleset:
                        log.info("rule set %s already in force (another collector re-evaluated)", self.ruleset)
                    else:
                        self.reevaluated = True
                        self.reevaluate()
                finally:
                    lock.release()
                return
            if not waiting:
                log.info("another collector is re-evaluating the stored rows; waiting for it")
                waiting = True
            self._stop.wait(poll)

    def reevaluate(self, page: int = 5000) -> None:
        """Re-run the ingest filters of the current rules over every stored row, then switch."""
        log.info("re-evaluating stored rows for rule set %s", self.ruleset)
        after: tuple[str, int] | None = None
        cols = [cert_rows.c[n] for n in COLUMN_NAMES]
        while not self._stop.is_set():
            query = sa.select(*cols).order_by(cert_rows.c.DeviceId, cert_rows.c.ReportId).limit(page)
            if after is not None:
                query = query.where(sa.tuple_(cert_rows.c.DeviceId, cert_rows.c.ReportId) > sa.tuple_(*after))
            with self.engine.connect() as conn:
                rows = [self._row_out(r) for r in conn.execute(query)]
                if rows:
                    self._attach_exclusions(conn, rows, after)
            if not rows:
                break
            with self.engine.begin() as conn:
                self._insert_hits(conn, rows, _utcnow())
            after = (rows[-1]["DeviceId"], rows[-1]["ReportId"])
        if self._stop.is_set():
            return
        with self.engine.begin() as conn:
            conn.execute(sa.delete(hits).where(hits.c.ruleset != self.ruleset))
            conn.execute(sa.delete(excluded_hits).where(excluded_hits.c.ruleset != self.ruleset))
            self._set_meta(conn, "hits_ruleset", self.ruleset)
        log.info("rule set %s in force", self.ruleset)

    @staticmethod
    def _attach_exclusions(conn: Connection, rows: list[dict[str, Any]], after: tuple[str, int] | None) -> None:
        """Give a page of stored rows (ordered by key, after ``after``) their forwarded exclusions."""
        key = sa.tuple_(row_exclusions.c.device_id, row_exclusions.c.report_id)
        last = (rows[-1]["DeviceId"], rows[-1]["ReportId"])
        query = sa.select(row_exclusions).where(key <= sa.tuple_(*last))
        if after is not None:
            query = query.where(key > sa.tuple_(*after))
        pairs: dict[tuple[str, int], dict[str, str]] = {}
        for device_id, report_id, rule_id, exclusion_id in conn.execute(query):
            pairs.setdefault((device_id, report_id), {})[rule_id] = exclusion_id
        if pairs:
            for row in rows:
                found = pairs.get((row["DeviceId"], row["ReportId"]))
                if found:
                    row[RULE_EXCLUSIONS] = found

    # --- devices
    def enroll(self, device_id: str, device_name: str) -> str | None:
        """A new node key for the device (replacing any earlier one); None if it was revoked."""
        node_key = secrets.token_urlsafe(32)
        now = _naive_utc(_utcnow())
        with self.engine.begin() as conn:
            existing = conn.execute(sa.select(devices.c.revoked).where(devices.c.device_id == device_id)).first()
            if existing is not None and existing[0]:
                return None
            values = {"device_name": device_name, "node_key_hash": hash_node_key(node_key), "enrolled_at": now}
            if existing is None:
                conn.execute(
                    sa.insert(devices).values(
                        device_id=device_id, revoked=False, rows_received=0, dropped_rows=0, **values
                    )
                )
            else:
                conn.execute(sa.update(devices).where(devices.c.device_id == device_id).values(**values))
        return node_key

    def device_for_key(self, node_key: str) -> str | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(devices.c.device_id, devices.c.revoked).where(
                    devices.c.node_key_hash == hash_node_key(node_key)
                )
            ).first()
        if row is None or row[1]:
            return None
        return str(row[0])

    def revoke(self, device_id: str) -> bool:
        with self.engine.begin() as conn:
            return bool(
                conn.execute(sa.update(devices).where(devices.c.device_id == device_id).values(revoked=True)).rowcount
            )

    def list_devices(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            result = conn.execute(sa.select(devices).order_by(devices.c.device_id))
            return [
                {
                    "DeviceId": r.device_id,
                    "DeviceName": r.device_name,
                    "EnrolledAt": _aware(r.enrolled_at),
                    "LastSeen": _aware(r.last_seen),
                    "Revoked": bool(r.revoked),
                    "RowsReceived": int(r.rows_received),
                    "DroppedRows": int(r.dropped_rows),
                }
                for r in result
            ]

    # --- ingest
    def _row_out(self, values: Any) -> dict[str, Any]:
        out = {}
        for name, value in zip(COLUMN_NAMES, values, strict=True):
            kind = COLUMN_TYPES[name]
            if kind == "datetime":
                value = _aware(value)
            elif kind == "bool" and value is not None:
                value = bool(value)
            out[name] = value
        return out

    def _insert_hits(self, conn: Connection, rows: Sequence[dict[str, Any]], now: dt.datetime) -> int:
        """Evaluate the rules the index names for each row and store the hits. A hit the agent
        excluded (the row's forwarded RuleExclusions, or every hit of a row it marked Excluded)
        goes to ``excluded_hits``: kept and visible on request, out of hunts by default.
        Returns the hits stored, excluded or not."""
        found: list[tuple[Any, ...]] = []
        excluded: list[tuple[Any, ...]] = []
        ruleset = self.ruleset
        memo_columns, memo = self._memo_columns, self._memo
        for row in rows:
            plans = self.index.candidates(row)
            if not plans:
                continue
            forwarded = row.get(RULE_EXCLUSIONS) or {}
            whole_row = (row.get("ExclusionId") or "agent") if row.get("Excluded") else None
            for plan in plans:
                columns = memo_columns.get(id(plan))
                if columns is None:
                    text = _evidence_text(plan, row, now)
                else:
                    key = (id(plan), *[row.get(c) for c in columns])
                    text = memo.get(key, _MISSING)
                    if text is _MISSING:
                        text = _evidence_text(plan, row, now)
                        if len(memo) >= 65_536:
                            memo.clear()
                        memo[key] = text
                if text is None:
                    continue
                rule_id = plan.rule.id
                exclusion = forwarded.get(rule_id) or whole_row
                if exclusion is None:
                    found.append((ruleset, rule_id, row["DeviceId"], row["ReportId"], text))
                else:
                    excluded.append((ruleset, rule_id, row["DeviceId"], row["ReportId"], text, exclusion))
        _insert_tuples(conn, _plan(conn, hits), found)
        _insert_tuples(conn, _plan(conn, excluded_hits), excluded)
        return len(found) + len(excluded)

    def _insert_row_exclusions(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
        """Keep the agent's (rule, exclusion) pairs of new rows, for re-evaluation under a new rule set."""
        pairs = [
            (row["DeviceId"], row["ReportId"], rule_id, exclusion_id)
            for row in rows
            for rule_id, exclusion_id in (row.get(RULE_EXCLUSIONS) or {}).items()
        ]
        _insert_tuples(conn, _plan(conn, row_exclusions), pairs)

    def ingest(
        self, rows: Sequence[dict[str, Any]], *, device_id: str | None = None, dropped_total: int | None = None
    ) -> IngestResult:
        """Store rows idempotently on (DeviceId, ReportId) and their rule hits, in one transaction.
        Rows already stored are left as they are (a retry never double-counts)."""
        now = _utcnow()
        unique: dict[tuple[str, int], dict[str, Any]] = {}
        for r in rows:
            unique.setdefault((r["DeviceId"], r["ReportId"]), r)
        hit_count = 0
        with self.engine.begin() as conn:
            fresh = _insert_rows_new(conn, unique)
            if fresh:
                hit_count = self._insert_hits(conn, fresh, now)
                self._insert_row_exclusions(conn, fresh)
            if device_id is not None:
                values: dict[str, Any] = {
                    "last_seen": _naive_utc(now),
                    "rows_received": devices.c.rows_received + len(fresh),
                }
                if dropped_total is not None:
                    values["dropped_rows"] = sa.case(
                        (devices.c.dropped_rows < dropped_total, dropped_total), else_=devices.c.dropped_rows
                    )
                conn.execute(sa.update(devices).where(devices.c.device_id == device_id).values(**values))
        return IngestResult(len(fresh), len(rows) - len(fresh), hit_count)

    # --- reading rows
    def iter_rows(
        self,
        *,
        device_id: str | None = None,
        since: dt.datetime | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> Iterator[dict[str, Any]]:
        query = sa.select(*[cert_rows.c[n] for n in COLUMN_NAMES])
        if device_id is not None:
            query = query.where(cert_rows.c.DeviceId == device_id)
        if since is not None:
            query = query.where(cert_rows.c.Timestamp >= _naive_utc(since))
        query = query.order_by(cert_rows.c.Timestamp, cert_rows.c.DeviceId, cert_rows.c.ReportId)
        if limit is not None:
            query = query.limit(limit).offset(offset)
        with self.engine.connect() as conn:
            for values in conn.execution_options(yield_per=2000).execute(query):
                yield self._row_out(values)

    def count_rows(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(cert_rows)).scalar_one())

    # --- fleet hunts
    def hunt(
        self,
        *,
        now: dt.datetime | None = None,
        rule_ids: Iterable[str] | None = None,
        include_excluded: bool = False,
    ) -> list[FleetResult]:
        """Every rule's summarize over the stored hits, computed by the database. Hits the agent
        excluded count only with ``include_excluded`` (as the agent's ``hunt --include-excluded``)."""
        now = now or _utcnow()
        wanted = set(rule_ids) if rule_ids is not None else None
        version = self.hits_ruleset() or self.ruleset
        plans = [p for p in self.plans if wanted is None or p.rule.id in wanted]
        groups: dict[Any, list[FleetPlan]] = {}
        python_plans = []
        for plan in plans:
            if plan.sql is None:
                python_plans.append(plan)
            else:
                groups.setdefault(plan.sql.signature(), []).append(plan)
        out: list[FleetResult] = []
        with self.engine.connect() as conn:
            if wanted is None:
                _whole_store_join(conn)
            for group in groups.values():
                out.extend(self._hunt_sql(conn, group, version, now, include_excluded))
            for plan in python_plans:
                out.extend(self._hunt_python(conn, plan, version, now, include_excluded))
        order = {p.rule.id: i for i, p in enumerate(self.plans)}
        out.sort(key=lambda r: (order[r.rule.id], str(r.result.get("DeviceId", "")), str(r.result.get("DeviceName"))))
        return out

    def _window_clause(self, sql: SqlSummarize, now: dt.datetime) -> list[Any]:
        ts = cert_rows.c.Timestamp
        clauses: list[Any] = []
        for op, values in window_range(sql.window, now):
            vals = [_naive_utc(v) if isinstance(v, dt.datetime) else v for v in values]
            if op == "between":
                clauses.append(sa.and_(ts >= vals[0], ts <= vals[1]))
            elif op == "!between":
                clauses.append(sa.or_(ts < vals[0], ts > vals[1]))
            elif op == "<":
                clauses.append(ts < vals[0])
            elif op == "<=":
                clauses.append(ts <= vals[0])
            elif op == ">":
                clauses.append(ts > vals[0])
            else:
                clauses.append(ts >= vals[0])
        return clauses

    @staticmethod
    def _hits_source(include_excluded: bool) -> Any:
        """``hits``, or with ``include_excluded`` the union of hits and excluded hits (same columns,
        plus exclusion_id: null for a hit nobody excluded)."""
        if not include_excluded:
            return hits
        keep = ("ruleset", "rule_id", "device_id", "report_id", "evidence")
        return sa.union_all(
            sa.select(*[hits.c[n] for n in keep], sa.cast(sa.null(), sa.Text).label("exclusion_id")),
            sa.select(*[excluded_hits.c[n] for n in keep], excluded_hits.c.exclusion_id),
        ).subquery("all_hits")

    def _joined(self, source: Any = None) -> Any:
        h = hits if source is None else source
        return h.join(cert_rows, sa.and_(h.c.device_id == cert_rows.c.DeviceId, h.c.report_id == cert_rows.c.ReportId))

    def _hunt_sql(
        self, conn: Connection, group: list[FleetPlan], version: str, now: dt.datetime, include_excluded: bool = False
    ) -> list[FleetResult]:
        sql = group[0].sql
        assert sql is not None
        pg = conn.dialect.name == "postgresql"
        h = self._hits_source(include_excluded)
        # values come back untyped (NullType): SQLAlchemy's SQLite DateTime parser (a regex per
        # value) cost more than the query; _value converts them with datetime.fromisoformat
        untyped = sa.types.NullType()
        selects: list[Any] = [h.c.rule_id]
        selects.extend(sa.type_coerce(cert_rows.c[col], untyped).label(f"b{i}") for i, (_n, col) in enumerate(sql.by))
        arg_names = [_arg_name(agg) for agg in sql.aggregates]
        for i, agg in enumerate(sql.aggregates):
            col: Any = cert_rows.c[arg_names[i]] if arg_names[i] else None
            expr: Any
            if agg.func == "count":
                expr = sa.func.count()
            elif agg.func == "dcount":
                expr = sa.func.count(sa.distinct(col))
            elif agg.func == "min":
                expr = sa.func.min(col)
            elif agg.func == "max":
                expr = sa.func.max(col)
            elif pg:
                expr = sa.func.array_agg(sa.distinct(col))
            else:
                expr = sa.func.json_group_array(sa.distinct(col))
            selects.append(sa.type_coerce(expr, untyped).label(f"a{i}"))
        wanted = [p.rule.id for p in group]
        where = [h.c.ruleset == version, *self._window_clause(sql, now)]
        if set(wanted) != {p.rule.id for p in self.plans}:  # the stored hits are of these rules only
            where.append(h.c.rule_id.in_(wanted))
        query = (
            sa.select(*selects)
            .select_from(self._joined(h))
            .where(*where)
            .group_by(h.c.rule_id, *[cert_rows.c[col] for _n, col in sql.by])
        )
        by_rule = {p.rule.id: p for p in group}
        convert = [_converter(col) for _n, col in sql.by]
        for i, agg in enumerate(sql.aggregates):
            if agg.func in ("count", "dcount"):
                convert.append(int)
            elif agg.func == "make_set":
                convert.append(_set_converter(arg_names[i]))
            else:
                convert.append(_converter(arg_names[i]))
        names = [name for name, _col in sql.by] + [agg.name for agg in sql.aggregates]
        out = []
        for rule_id, *values in conn.execute(query):
            plan = by_rule.get(rule_id)
            if plan is None:
                continue
            result = {name: fn(v) for name, fn, v in zip(names, convert, values, strict=True)}
            assert plan.sql is not None
            out.append(FleetResult(plan.rule, apply_post(plan.sql, result)))  # the rule's own extend/project
        return out

    @staticmethod
    def _value(col: str, value: Any) -> Any:
        kind = COLUMN_TYPES[col]
        if value is None:
            return None
        if kind == "datetime":
            if isinstance(value, str):
                value = dt.datetime.fromisoformat(value)
            return _aware(value)
        if kind == "bool":
            return bool(value)
        return value

    def _hunt_python(
        self, conn: Connection, plan: FleetPlan, version: str, now: dt.datetime, include_excluded: bool = False
    ) -> list[FleetResult]:
        rows = self.rule_rows(plan.rule.id, version=version, conn=conn, include_excluded=include_excluded)
        return [FleetResult(plan.rule, result) for result in plan.rule.query.run(rows, now=now)]

    def rule_rows(
        self,
        rule_id: str,
        *,
        version: str | None = None,
        now: dt.datetime | None = None,
        conn: Connection | None = None,
        limit: int | None = None,
        include_excluded: bool = False,
    ) -> list[dict[str, Any]]:
        """The stored rows that hit a rule (inside its time window when the rule has one in SQL),
        with their evidence; with ``include_excluded`` also those the agent excluded, each with
        ``ExcludedBy`` (the exclusion id, or null)."""
        version = version or self.hits_ruleset() or self.ruleset
        plan = next(p for p in self.plans if p.rule.id == rule_id)
        h = self._hits_source(include_excluded)
        extra = [h.c.exclusion_id] if include_excluded else []
        query = (
            sa.select(*[cert_rows.c[n] for n in COLUMN_NAMES], h.c.evidence, *extra)
            .select_from(self._joined(h))
            .where(h.c.ruleset == version, h.c.rule_id == rule_id)
            .order_by(cert_rows.c.DeviceId, cert_rows.c.ReportId)
        )
        if plan.sql is not None and now is not None:
            query = query.where(*self._window_clause(plan.sql, now))
        if limit is not None:
            query = query.limit(limit)

        def run(c: Connection) -> list[dict[str, Any]]:
            out = []
            width = len(COLUMN_NAMES)
            for rec in c.execute(query):
                row = self._row_out(rec[:width])
                row["Evidence"] = json.loads(rec[width])
                if include_excluded:
                    row["ExcludedBy"] = rec[width + 1]
                out.append(row)
            return out

        if conn is not None:
            return run(conn)
        with self.engine.connect() as own:
            return run(own)


def _converter(col: str) -> Callable[[Any], Any]:
    """Database value -> the agent's value for one column (None stays None)."""
    kind = COLUMN_TYPES[col]
    if kind == "datetime":
        return _datetime_value
    if kind == "bool":
        return lambda v: None if v is None else bool(v)
    return lambda v: v


def _datetime_value(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value


def _set_converter(col: str) -> Callable[[Any], Any]:
    """A make_set: a JSON array (SQLite json_group_array) or a list (PostgreSQL array_agg)."""
    kind = COLUMN_TYPES[col]
    one = _converter(col)

    def run(value: Any) -> list[Any]:
        items = json.loads(value) if isinstance(value, str) else list(value or ())
        if kind in ("datetime", "bool"):
            return sorted(one(v) for v in items if v is not None)
        return sorted(v for v in items if v is not None)

    return run


def _whole_store_join(conn: Connection) -> None:
    """PostgreSQL, for a statement that joins every hit of the rule set to its row: a hash join
    and an in-memory sort. The planner chose a nested loop of index lookups, 2.5x slower (200,000
    rows: fleet hunt 2.9-3.6 s -> 1.2-1.3 s, EXPLAIN ANALYZE in docs/scaling.md). For this
    transaction only (SET LOCAL); nothing to do on SQLite."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET LOCAL enable_nestloop = off")
        conn.exec_driver_sql("SET LOCAL work_mem = '64MB'")


def _arg_name(agg: Any) -> str:
    """The table column an aggregate reads ('' for count())."""
    return str(getattr(agg.arg, "name", "")) if agg.arg is not None else ""


class _TablePlan:
    """How records of one table become driver parameters, worked out once per (table, dialect).

    The hot path of ingest: rows become tuples through one itemgetter, only the datetime
    columns are touched per row (SQLite stores them as SQLAlchemy's DateTime does, text
    'YYYY-MM-DD HH:MM:SS.ffffff'; PostgreSQL takes naive UTC), and text columns get their
    '' for null in SQL (string columns are never null, as in Kusto). Measured on 10,000 rows
    (100% RMM), the per-row dict comprehension and SQLAlchemy's IN-list compilation it
    replaces were about a third of the collector's CPU."""

    def __init__(self, table: sa.Table, sqlite: bool) -> None:
        self.table = table
        self.sqlite = sqlite
        self.names = [c.name for c in table.columns]
        self.get = operator.itemgetter(*self.names)
        self.dates = [i for i, c in enumerate(table.columns) if isinstance(c.type, sa.DateTime)]
        texts = {c.name for c in table.columns if table is cert_rows and isinstance(c.type, sa.Text)}
        self.cols = ", ".join(f'"{n}"' for n in self.names)
        mark = "?" if sqlite else "%s"
        self.values = ", ".join(f"COALESCE({mark}, '')" if n in texts else mark for n in self.names)
        self.select = ", ".join(f"COALESCE(\"{n}\", '')" if n in texts else f'"{n}"' for n in self.names)

    def tuples(self, records: Iterable[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
        get, dates, names = self.get, self.dates, self.names
        out = []
        for rec in records:
            try:
                values = get(rec)
            except KeyError:  # a partial record (bench, tests): missing columns are null
                values = tuple(rec.get(n) for n in names)
            converted = None
            for i in dates:
                value = values[i]
                if value is not None:
                    if converted is None:
                        converted = list(values)
                    if value.tzinfo is not dt.UTC:  # the wire's own datetimes are UTC already
                        value = _naive_utc(value).replace(tzinfo=dt.UTC)
                    if self.sqlite:  # "+00:00" dropped
                        converted[i] = value.isoformat(" ", "microseconds")[:26]
                    else:
                        converted[i] = value.replace(tzinfo=None)
            out.append(values if converted is None else tuple(converted))
        return out


_PLANS: dict[tuple[str, bool], _TablePlan] = {}


def _plan(conn: Connection, table: sa.Table) -> _TablePlan:
    sqlite = conn.dialect.name == "sqlite"
    plan = _PLANS.get((table.name, sqlite))
    if plan is None:
        plan = _PLANS[(table.name, sqlite)] = _TablePlan(table, sqlite)
    return plan


def _insert_tuples(
    conn: Connection, plan: _TablePlan, rows: Sequence[tuple[Any, ...]], returning: Sequence[str] = ()
) -> list[tuple[Any, ...]]:
    """INSERT ... ON CONFLICT DO NOTHING of driver-ready tuples; with ``returning``, the given
    columns of the rows actually inserted (PostgreSQL only; SQLite callers find conflicts first).

    SQLite: one executemany of a prepared statement. PostgreSQL: COPY into a temporary table
    (kept per connection, emptied at commit) and one INSERT ... SELECT ... ON CONFLICT DO NOTHING,
    which is exact under concurrent collectors (a racing duplicate waits, then is skipped)."""
    if not rows:
        return []
    name = plan.table.name
    if plan.sqlite:
        conn.exec_driver_sql(f'INSERT OR IGNORE INTO "{name}" ({plan.cols}) VALUES ({plan.values})', rows)
        return []
    import psycopg

    raw = conn.connection.driver_connection
    assert raw is not None
    temp = f"_in_{name}"
    sql = f'COPY "{temp}" ({plan.cols}) FROM STDIN'
    try:
        with raw.cursor() as cur:
            cur.execute(f'CREATE TEMP TABLE IF NOT EXISTS "{temp}" (LIKE "{name}") ON COMMIT DELETE ROWS')
            with cur.copy(sql) as copy:
                for row in rows:
                    copy.write_row(row)
            sql = f'INSERT INTO "{name}" ({plan.cols}) SELECT {plan.select} FROM "{temp}" ON CONFLICT DO NOTHING'
            if returning:
                sql += " RETURNING " + ", ".join(f'"{c}"' for c in returning)
            cur.execute(sql)
            out = cur.fetchall() if returning else []
            cur.execute(f'DELETE FROM "{temp}"')  # the same transaction may use it again
    except psycopg.Error as exc:  # as SQLAlchemy raises it for its own statements
        raise sa.exc.DBAPIError.instance(sql, None, exc, psycopg.Error) from exc
    return out


def _existing_keys_sqlite(conn: Connection, keys: Iterable[tuple[str, int]]) -> set[tuple[str, int]]:
    """The (DeviceId, ReportId) among ``keys`` already stored: per device, one range scan of the
    primary key when the ids are dense (an agent's batch is consecutive), else IN lists."""
    by_device: dict[str, list[int]] = {}
    for device, report in keys:
        by_device.setdefault(device, []).append(report)
    found: set[tuple[str, int]] = set()
    base = 'SELECT "ReportId" FROM cert_rows WHERE "DeviceId" = ? AND '
    # the sqlite3 connection itself, inside the same transaction: an import file spreads a batch
    # over many devices, and SQLAlchemy's per-statement cost (~0.25 ms) was 30% of ingest there
    raw = conn.connection.driver_connection
    assert raw is not None
    for device, ids in by_device.items():
        wanted = set(ids)
        low, high = min(ids), max(ids)
        if high - low <= 4 * len(ids) + 64:
            result = raw.execute(base + '"ReportId" BETWEEN ? AND ?', (device, low, high))
            found.update((device, r) for (r,) in result if r in wanted)
            continue
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ", ".join("?" for _ in chunk)
            result = raw.execute(base + f'"ReportId" IN ({marks})', (device, *chunk))
            found.update((device, r) for (r,) in result)
    return found


def _insert_rows_new(conn: Connection, unique: Mapping[tuple[str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    """Insert the rows not stored yet; returns them (in order). Must be the transaction's first
    statement: on SQLite it takes the write lock first (BEGIN IMMEDIATE), so the check for rows
    already there and the insert see the same database."""
    if not unique:
        return []
    plan = _plan(conn, cert_rows)
    if plan.sqlite:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        existing = _existing_keys_sqlite(conn, unique)
        fresh = [r for k, r in unique.items() if k not in existing]
        _insert_tuples(conn, plan, plan.tuples(fresh))
        return fresh
    inserted = {(d, r) for d, r in _insert_tuples(conn, plan, plan.tuples(unique.values()), ("DeviceId", "ReportId"))}
    return [r for k, r in unique.items() if k in inserted]


def _bulk_insert_ignore(conn: Connection, table: sa.Table, records: Sequence[Mapping[str, Any]]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING of records (dicts by column name), the bulk path."""
    plan = _plan(conn, table)
    _insert_tuples(conn, plan, plan.tuples(records))


# --- dashboard matrix (devices x tools), computed in SQL


class MatrixCell(NamedTuple):
    """One (device, tool) cell; a NamedTuple because a 500 x 60 matrix makes 30,000 of them."""

    device_id: str
    device_name: str
    tool: str
    first_seen: int  # epoch seconds (UTC), truncated
    last_seen: int
    row_count: int  # distinct rows, however many rules of the tool they hit
    running: int
    untrusted: int


def _running() -> Any:
    return sa.case((sa.or_(cert_rows.c.ProcessId.is_not(None), cert_rows.c.ProcessName != ""), 1), else_=0)


def _untrusted() -> Any:
    return sa.case((cert_rows.c.IsTrusted.is_(True), 0), else_=1)


def _epoch(dialect: str, value: Any) -> Any:
    """Whole epoch seconds of a naive-UTC timestamp, computed by the database: converting 60,000
    datetimes in Python took ~0.5 s of a 1 s matrix request (500 x 60 cells)."""
    if dialect == "postgresql":
        return sa.cast(sa.func.floor(sa.extract("epoch", value)), sa.BigInteger)
    return sa.cast(sa.func.strftime("%s", value), sa.BigInteger)


def ingest_marker(collector: Collector) -> tuple[Any, ...]:
    """Changes whenever the API ingests rows (it counts them per device): cheap, the devices
    table has one row per device."""
    query = sa.select(sa.func.count(), sa.func.sum(devices.c.rows_received), sa.func.max(devices.c.last_seen))
    with collector.engine.connect() as conn:
        return tuple(conn.execute(query).one())


def matrix_cells(collector: Collector, since: dt.datetime) -> list[MatrixCell]:
    """One cell per (device, tool): the rules of a tool merged, each row counted once.
    One aggregated statement; the join walks the hits of the rule set through its primary key
    and reads each hit row by cert_rows' primary key."""
    version = collector.hits_ruleset() or collector.ruleset
    tools = sorted({r.tool for r in collector.rules})
    tool_index = {t: i for i, t in enumerate(tools)}
    tool = sa.case({r.id: tool_index[r.tool] for r in collector.rules}, value=hits.c.rule_id, else_=-1)
    dialect = collector.engine.dialect.name
    query = (
        sa.select(
            hits.c.device_id,
            sa.func.min(cert_rows.c.DeviceName),
            tool,
            _epoch(dialect, sa.func.min(cert_rows.c.Timestamp)),
            _epoch(dialect, sa.func.max(cert_rows.c.Timestamp)),
            sa.func.count(sa.distinct(hits.c.report_id)),
            sa.func.max(_running()),
            sa.func.max(_untrusted()),
        )
        .select_from(collector._joined())
        .where(
            hits.c.ruleset == version,
            cert_rows.c.Timestamp >= _naive_utc(since),
            sa.not_(sa.func.coalesce(cert_rows.c.Excluded, False)),
        )
        .group_by(hits.c.device_id, tool)
    )
    with collector.engine.connect() as conn:
        _whole_store_join(conn)
        return [
            MatrixCell(d, n, tools[t], int(first), int(last), int(count), int(run or 0), int(bad or 0))
            for d, n, t, first, last, count, run, bad in conn.execute(query)
            if t >= 0
        ]


def cell_files(
    collector: Collector, device_id: str, rule_ids: Sequence[str], since: dt.datetime
) -> list[dict[str, Any]]:
    """The files behind one matrix cell: path, SHA-256, signer, trust, first/last seen, running."""
    version = collector.hits_ruleset() or collector.ruleset
    query = (
        sa.select(
            cert_rows.c.FolderPath,
            cert_rows.c.SHA256,
            cert_rows.c.Signer,
            sa.func.min(_untrusted()),
            sa.func.max(_untrusted()),
            sa.func.min(cert_rows.c.Timestamp),
            sa.func.max(cert_rows.c.Timestamp),
            sa.func.max(_running()),
            sa.func.count(),
        )
        .select_from(collector._joined())
        .where(
            hits.c.ruleset == version,
            hits.c.rule_id.in_(list(rule_ids)),
            cert_rows.c.DeviceId == device_id,
            cert_rows.c.Timestamp >= _naive_utc(since),
            sa.not_(sa.func.coalesce(cert_rows.c.Excluded, False)),
        )
        .group_by(cert_rows.c.FolderPath, cert_rows.c.SHA256, cert_rows.c.Signer)
        .order_by(cert_rows.c.FolderPath)
        .limit(1000)
    )
    with collector.engine.connect() as conn:
        return [
            {
                "FolderPath": r[0],
                "SHA256": r[1],
                "Signer": r[2],
                "Trust": "trusted" if r[4] == 0 else ("untrusted" if r[3] == 1 else "mixed"),
                "FirstSeen": Collector._value("Timestamp", r[5]),
                "LastSeen": Collector._value("Timestamp", r[6]),
                "Running": bool(r[7]),
                "Count": int(r[8]),
            }
            for r in conn.execute(query)
        ]

"""The collector's database: SQLite by default, PostgreSQL through a DSN, with SQLAlchemy Core.

The rows table is derived from ``agent.schema`` (never a second copy of the column list).
Migrations are versioned in a ``schema_version`` table and run on start. A column added to
``agent.schema`` later is a new migration: list it in ``ADDED_ROW_COLUMNS`` under the next
version; ``check_schema`` refuses to start when a schema column has no migration.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from agent.rules.loader import Rule
from agent.schema import COLUMN_NAMES, COLUMN_TYPES
from collector.fleetplan import FleetPlan, RuleIndex, SqlSummarize, apply_post, parse_fleet_plan, window_range

log = logging.getLogger(__name__)

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


#: the columns fleet hunts and the dashboard matrix read from a hit's row, after the join key:
#: with them in one index the join never reads the wide table rows (SQLite: hunt over 200,000
#: rows 0.9 -> 0.6 CPU-s, the 500 x 60 matrix join 0.30 -> 0.08 CPU-s; ingest ~6% more CPU)
HIT_ROW_COLUMNS = ("Timestamp", "DeviceName", "Excluded", "IsTrusted", "ProcessId", "ProcessName")


def _migration_hit_rows_index(conn: Connection) -> None:
    cols = ", ".join(f'"{c}"' for c in ("DeviceId", "ReportId", *HIT_ROW_COLUMNS))
    conn.execute(sa.text(f"CREATE INDEX IF NOT EXISTS cert_rows_hit_rows ON cert_rows ({cols})"))


def migrations() -> list[tuple[int, Callable[[Connection], None]]]:
    steps: list[tuple[int, Callable[[Connection], None]]] = [(1, _migration_1)]
    steps.extend((version, _add_columns(cols)) for version, cols in sorted(ADDED_ROW_COLUMNS.items()))
    steps.append((2, _migration_hit_rows_index))
    steps.sort(key=lambda s: s[0])
    assert len({v for v, _ in steps}) == len(steps), "two migrations share a version"
    return steps


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
            self._reeval = threading.Thread(target=self.reevaluate, name="rmmhunt-reevaluate", daemon=True)
            self._reeval.start()
        else:
            self.reevaluate()

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
            if not rows:
                break
            with self.engine.begin() as conn:
                self._insert_hits(conn, rows, _utcnow())
            after = (rows[-1]["DeviceId"], rows[-1]["ReportId"])
        if self._stop.is_set():
            return
        with self.engine.begin() as conn:
            conn.execute(sa.delete(hits).where(hits.c.ruleset != self.ruleset))
            self._set_meta(conn, "hits_ruleset", self.ruleset)
        log.info("rule set %s in force", self.ruleset)

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
        records = []
        for row in rows:
            if row.get("Excluded"):
                continue
            for plan in self.index.candidates(row):
                evidence = plan.ingest.filter_row(row, now=now)
                if evidence is None:
                    continue
                records.append(
                    {
                        "ruleset": self.ruleset,
                        "rule_id": plan.rule.id,
                        "device_id": row["DeviceId"],
                        "report_id": row["ReportId"],
                        "evidence": json.dumps(
                            [
                                {"column": e.column, "value": e.value, "operator": e.operator, "pattern": e.pattern}
                                for e in evidence
                            ],
                            ensure_ascii=False,
                            default=str,
                        ),
                    }
                )
        _bulk_insert_ignore(conn, hits, records)
        return len(records)

    def ingest(
        self, rows: Sequence[dict[str, Any]], *, device_id: str | None = None, dropped_total: int | None = None
    ) -> IngestResult:
        """Store rows idempotently on (DeviceId, ReportId) and their rule hits, in one transaction.
        Rows already stored are left as they are (a retry never double-counts)."""
        now = _utcnow()
        accepted = duplicates = hit_count = 0
        keys = list(dict.fromkeys((r["DeviceId"], r["ReportId"]) for r in rows))
        with self.engine.begin() as conn:
            existing: set[tuple[str, int]] = set()
            key_cols = sa.tuple_(cert_rows.c.DeviceId, cert_rows.c.ReportId)
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                existing.update(
                    (d, r)
                    for d, r in conn.execute(
                        sa.select(cert_rows.c.DeviceId, cert_rows.c.ReportId).where(key_cols.in_(chunk))
                    )
                )
            fresh: dict[tuple[str, int], dict[str, Any]] = {}
            for r in rows:
                key = (r["DeviceId"], r["ReportId"])
                if key not in existing and key not in fresh:
                    fresh[key] = r
            duplicates = len(rows) - len(fresh)
            if fresh:
                _bulk_insert_ignore(conn, cert_rows, list(fresh.values()))
                hit_count = self._insert_hits(conn, list(fresh.values()), now)
            accepted = len(fresh)
            if device_id is not None:
                values: dict[str, Any] = {
                    "last_seen": _naive_utc(now),
                    "rows_received": devices.c.rows_received + accepted,
                }
                if dropped_total is not None:
                    values["dropped_rows"] = sa.case(
                        (devices.c.dropped_rows < dropped_total, dropped_total), else_=devices.c.dropped_rows
                    )
                conn.execute(sa.update(devices).where(devices.c.device_id == device_id).values(**values))
        return IngestResult(accepted, duplicates, hit_count)

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
    def hunt(self, *, now: dt.datetime | None = None, rule_ids: Iterable[str] | None = None) -> list[FleetResult]:
        """Every rule's summarize over the stored hits, computed by the database."""
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
                out.extend(self._hunt_sql(conn, group, version, now))
            for plan in python_plans:
                out.extend(self._hunt_python(conn, plan, version, now))
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

    def _joined(self) -> Any:
        return hits.join(
            cert_rows, sa.and_(hits.c.device_id == cert_rows.c.DeviceId, hits.c.report_id == cert_rows.c.ReportId)
        )

    def _hunt_sql(self, conn: Connection, group: list[FleetPlan], version: str, now: dt.datetime) -> list[FleetResult]:
        sql = group[0].sql
        assert sql is not None
        pg = conn.dialect.name == "postgresql"
        # values come back untyped (NullType): SQLAlchemy's SQLite DateTime parser (a regex per
        # value) cost more than the query; _value converts them with datetime.fromisoformat
        untyped = sa.types.NullType()
        selects: list[Any] = [hits.c.rule_id]
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
        where = [hits.c.ruleset == version, *self._window_clause(sql, now)]
        if set(wanted) != {p.rule.id for p in self.plans}:  # the stored hits are of these rules only
            where.append(hits.c.rule_id.in_(wanted))
        query = (
            sa.select(*selects)
            .select_from(self._joined())
            .where(*where)
            .group_by(hits.c.rule_id, *[cert_rows.c[col] for _n, col in sql.by])
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

    def _hunt_python(self, conn: Connection, plan: FleetPlan, version: str, now: dt.datetime) -> list[FleetResult]:
        rows = [r for r in self.rule_rows(plan.rule.id, version=version, conn=conn)]
        return [FleetResult(plan.rule, result) for result in plan.rule.query.run(rows, now=now)]

    def rule_rows(
        self,
        rule_id: str,
        *,
        version: str | None = None,
        now: dt.datetime | None = None,
        conn: Connection | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """The stored rows that hit a rule (inside its time window when the rule has one in SQL),
        with their evidence."""
        version = version or self.hits_ruleset() or self.ruleset
        plan = next(p for p in self.plans if p.rule.id == rule_id)
        query = (
            sa.select(*[cert_rows.c[n] for n in COLUMN_NAMES], hits.c.evidence)
            .select_from(self._joined())
            .where(hits.c.ruleset == version, hits.c.rule_id == rule_id)
            .order_by(cert_rows.c.DeviceId, cert_rows.c.ReportId)
        )
        if plan.sql is not None and now is not None:
            query = query.where(*self._window_clause(plan.sql, now))
        if limit is not None:
            query = query.limit(limit)

        def run(c: Connection) -> list[dict[str, Any]]:
            out = []
            for rec in c.execute(query):
                row = self._row_out(rec[: len(COLUMN_NAMES)])
                row["Evidence"] = json.loads(rec[-1])
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


def _bulk_insert_ignore(conn: Connection, table: sa.Table, records: Sequence[Mapping[str, Any]]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING through the driver's executemany: the ingest hot path.
    Values are converted here as SQLAlchemy's types store them (SQLite: datetimes as
    'YYYY-MM-DD HH:MM:SS.ffffff' text, bools as 0/1), so Core reads them back unchanged."""
    if not records:
        return
    names = [c.name for c in table.columns]
    cols = ", ".join(f'"{n}"' for n in names)
    sqlite = conn.dialect.name == "sqlite"
    dates = [i for i, c in enumerate(table.columns) if isinstance(c.type, sa.DateTime)]
    bools = [i for i, c in enumerate(table.columns) if isinstance(c.type, sa.Boolean)]
    texts = [i for i, c in enumerate(table.columns) if table is cert_rows and isinstance(c.type, sa.Text)]
    rows = []
    for rec in records:
        values: list[Any] = [rec.get(n) for n in names]
        for i in texts:  # string columns are never null, as in Kusto
            if values[i] is None:
                values[i] = ""
        for i in dates:
            value = values[i]
            if value is not None:
                value = _naive_utc(value)
                values[i] = value.isoformat(sep=" ", timespec="microseconds") if sqlite else value
        if sqlite:
            for i in bools:
                if values[i] is not None:
                    values[i] = int(values[i])
        rows.append(tuple(values))
    if sqlite:
        marks = ", ".join("?" for _ in names)
        conn.exec_driver_sql(f'INSERT OR IGNORE INTO "{table.name}" ({cols}) VALUES ({marks})', rows)
    else:
        marks = ", ".join("%s" for _ in names)
        conn.exec_driver_sql(f'INSERT INTO "{table.name}" ({cols}) VALUES ({marks}) ON CONFLICT DO NOTHING', rows)


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

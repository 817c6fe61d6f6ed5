"""The ingest path (collector.storage.Collector.ingest) on SQLite and PostgreSQL: idempotency
within and across batches and under concurrent ingest of the same rows, and the memoised rule
filters giving exactly the hits of evaluating every row."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from agent.rules.loader import load_rules
from collector.fleetplan import parse_fleet_plan
from collector.storage import Collector, cert_rows, hits, memo_columns
from tests.collector.fleetdata import fleet_rows, make_row

RULE = """id: 00000000-0000-4000-8000-00000000000{n}
name: test rule {n}
relevantTechniques: T1219
query: |
  DeviceFileCertificateInfo
  | where Timestamp > ago(5d)
  | where {predicate}
  | summarize Count=count() by DeviceId
"""


def _url(backend: str, tmp_path, request) -> str:
    return f"sqlite:///{tmp_path}/c.db" if backend == "sqlite" else request.getfixturevalue("fresh_pg")


def _stored_hits(collector: Collector) -> list[tuple]:
    with collector.engine.connect() as conn:
        query = sa.select(hits.c.rule_id, hits.c.device_id, hits.c.report_id, hits.c.evidence)
        return sorted(tuple(r) for r in conn.execute(query))


def _count(collector: Collector, table: sa.Table) -> int:
    with collector.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def test_memo_columns_only_for_pure_filters_of_repeating_values(tmp_path, shipped_rules):
    predicates = [
        "Signer has 'Acme'",
        "Signer has 'Acme' and CertificateExpirationTime < now()",  # depends on when it runs
        "FolderPath startswith 'C:'",  # nearly unique per row
        "tolower(FileName) == 'x.exe' or Signer =~ 'acme'",
    ]
    for n, predicate in enumerate(predicates):
        (tmp_path / f"r{n}.yaml").write_text(RULE.format(n=n, predicate=predicate), encoding="utf-8")
    rules = sorted(load_rules([tmp_path]).rules, key=lambda r: r.id)
    got = [memo_columns(parse_fleet_plan(r)) for r in rules]
    assert got == [("Signer",), None, None, ("FileName", "Signer")]
    shipped = [memo_columns(parse_fleet_plan(r)) for r in shipped_rules]
    assert shipped.count(("Signer",)) >= 100  # the catalog's rules are mostly signer tests


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_memoised_filters_store_exactly_the_hits_of_full_evaluation(tmp_path, request, shipped_rules, now, backend):
    rows = fleet_rows(shipped_rules, now, devices=4, per_device=150)
    memoised = Collector(_url(backend, tmp_path, request), shipped_rules)
    plain_url = f"sqlite:///{tmp_path}/plain.db"
    plain = Collector(plain_url, shipped_rules)
    plain._memo_columns = {}  # every row through every candidate filter
    try:
        for c in (memoised, plain):
            c.start(background=False)
            for start in range(0, len(rows), 100):
                c.ingest(rows[start : start + 100])
        assert memoised._memo  # the memo was used
        assert _stored_hits(memoised) == _stored_hits(plain) and _stored_hits(plain)
    finally:
        memoised.close()
        plain.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_idempotent_within_across_and_between_concurrent_batches(tmp_path, request, now, shipped_rules, backend):
    collector = Collector(_url(backend, tmp_path, request), shipped_rules)
    try:
        collector.start(background=False)
        rows = [make_row(1, i, "MMSoft Design Ltd.", now) for i in range(1, 201)]
        first = collector.ingest(rows[:120] + rows[:10])  # a batch repeating its own rows
        assert (first.accepted, first.duplicates, first.hits) == (120, 10, 120)
        again = collector.ingest(rows[100:])  # overlapping the stored rows
        assert (again.accepted, again.duplicates) == (80, 20)
        # the same new rows from several threads at once: each stored once, hits once
        more = [make_row(2, i, "MMSoft Design Ltd.", now) for i in range(1, 301)]
        results = []
        errors = []

        def send() -> None:
            try:
                results.append(collector.ingest(more))
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=send) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors
        assert sum(r.accepted for r in results) == 300 and sum(r.duplicates for r in results) == 900
        assert _count(collector, cert_rows) == 500 and _count(collector, hits) == 500
    finally:
        collector.close()


def test_rows_and_hits_are_one_transaction(fresh_pg, now, shipped_rules):
    """PostgreSQL: the rows go in, then a hit cannot (hits.device_id is at most 128 characters;
    the wire refuses such a DeviceId, ingest here is called directly): nothing is stored."""
    collector = Collector(fresh_pg, shipped_rules)
    try:
        collector.start(background=False)
        good = make_row(1, 1, "MMSoft Design Ltd.", now)
        long_device = make_row(1, 2, "MMSoft Design Ltd.", now, DeviceId="d" * 129)
        with pytest.raises(sa.exc.DBAPIError):
            collector.ingest([good, long_device])
        assert _count(collector, cert_rows) == 0 and _count(collector, hits) == 0
        assert collector.ingest([good]).accepted == 1  # the connection is usable again
    finally:
        collector.close()

"""Fleet hunts in SQL equal the agent's Python evaluator, for every shipped rule, on both backends."""

from __future__ import annotations

import datetime as dt

import pytest

from agent.hunt import run_hunt
from collector.fleetplan import parse_fleet_plan
from collector.storage import Collector
from tests.collector.fleetdata import fleet_rows


def _canon(results):
    return sorted((r.rule.id, repr(sorted(r.result.items()))) for r in results)


def test_every_shipped_rule_is_computed_in_sql(shipped_rules):
    plans = [parse_fleet_plan(r) for r in shipped_rules]
    assert len(plans) >= 100
    assert [(p.rule.id, p.reason) for p in plans if p.sql is None] == []


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_sql_hunt_equals_python_evaluator(backend, request, tmp_path, shipped_rules, now):
    url = f"sqlite:///{tmp_path}/c.db" if backend == "sqlite" else request.getfixturevalue("fresh_pg")
    rows = fleet_rows(shipped_rules, now, devices=5, per_device=200)
    collector = Collector(url, shipped_rules)
    try:
        collector.start(background=False)
        first = collector.ingest(rows)
        again = collector.ingest(rows)  # a retry never double-counts
        assert (first.accepted, again.accepted, again.duplicates) == (len(rows), 0, len(rows))
        fleet = collector.hunt(now=now)
        expected = run_hunt([dict(r) for r in rows], shipped_rules, now=now)
        assert len(expected) > 50
        assert {r.rule.id for r in expected} == {r.rule.id for r in fleet}
        assert _canon(fleet) == _canon(expected)
        # later: the window moves with `now`, in SQL as in Python
        later = now + dt.timedelta(days=3)
        assert _canon(collector.hunt(now=later)) == _canon(run_hunt([dict(r) for r in rows], shipped_rules, now=later))
    finally:
        collector.close()


def test_identical_fleet_hunts_and_matrix_on_sqlite_and_postgresql(tmp_path, fresh_pg, shipped_rules, now):
    from collector.storage import matrix_cells

    rows = fleet_rows(shipped_rules, now, devices=3, per_device=80, seed=11)
    out = []
    for url in (f"sqlite:///{tmp_path}/c.db", fresh_pg):
        collector = Collector(url, shipped_rules)
        try:
            collector.start(background=False)
            collector.ingest(rows)
            cells = sorted(matrix_cells(collector, now - dt.timedelta(days=5)), key=lambda c: (c.device_id, c.tool))
            out.append((_canon(collector.hunt(now=now)), cells))
        finally:
            collector.close()
    assert out[0] == out[1]
    assert out[0][0] and out[0][1]

"""Several collectors on one database: only one re-evaluates the stored rows when the rule set
changes; the others wait for it and then find the work done (SQLite and PostgreSQL)."""

from __future__ import annotations

import time

import pytest

from agent.hunt import run_hunt
from collector.storage import Collector, ReevalLock, make_engine
from tests.collector.fleetdata import fleet_rows


def _canon(results):
    return sorted((r.rule.id, repr(sorted(r.result.items()))) for r in results)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_one_collector_reevaluates_the_others_wait(tmp_path, request, shipped_rules, now, backend):
    url = f"sqlite:///{tmp_path}/c.db" if backend == "sqlite" else request.getfixturevalue("fresh_pg")
    rows = fleet_rows(shipped_rules, now, devices=2, per_device=60)
    old_rules = [r for r in shipped_rules if r.tool != "Pulseway"]
    first = Collector(url, old_rules)
    first.start(background=False)
    first.ingest(rows)
    old_version = first.ruleset
    first.close()

    # a collector in the middle of a re-evaluation holds the lock
    elsewhere = make_engine(url)
    busy = ReevalLock(elsewhere)
    assert busy.try_acquire()
    a, b = Collector(url, shipped_rules), Collector(url, shipped_rules)
    try:
        a.start(background=True)
        b.start(background=True)
        time.sleep(1.0)
        assert a.reevaluating and b.reevaluating  # both waiting, neither started
        assert a.hits_ruleset() == old_version and not a.reevaluated and not b.reevaluated
        third = ReevalLock(elsewhere)
        assert not third.try_acquire()  # the lock is exclusive
        busy.release()
        deadline = time.monotonic() + 60
        while (a.reevaluating or b.reevaluating) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not a.reevaluating and not b.reevaluating
        assert a.hits_ruleset() == a.ruleset != old_version
        assert a.reevaluated != b.reevaluated  # exactly one of them did the work
        assert _canon(a.hunt(now=now)) == _canon(run_hunt([dict(r) for r in rows], shipped_rules, now=now))
        assert third.try_acquire()  # released by whoever held it
        third.release()
    finally:
        a.close()
        b.close()
        elsewhere.dispose()

"""A seeded subset of ``make fuzz`` (tests/fuzz/harness.py) on every test run: 2,000 mutated
PE/MSI inputs aimed at the certificate table and the PKCS#7 DER, each in a worker process
with a per-case timeout. Every case must end in a status: no crash, no hang."""

from __future__ import annotations

from agent.schema import FILE_STATUSES
from tests.fuzz.harness import load_seeds, make_case, run_pool


def test_cases_are_deterministic():
    seeds = load_seeds()
    assert make_case(seeds, 7, 123) == make_case(seeds, 7, 123)
    assert make_case(seeds, 7, 123) != make_case(seeds, 7, 124)


def test_seeded_subset_has_no_crash_and_no_hang():
    report = run_pool(2000, seed_value=20261202, workers=2, budget=5.0, timeout=60.0)
    details = "\n".join(report.lines())
    assert report.cases == 2000, details
    assert not report.crashes and not report.hangs, details
    assert set(report.statuses) <= set(FILE_STATUSES), details
    # the mutations reach every outcome that matters, not only the header checks
    assert {"OK", "PARSE_ERROR", "NOT_PE", "NOT_SIGNED"} <= set(report.statuses), details

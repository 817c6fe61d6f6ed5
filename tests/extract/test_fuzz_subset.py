"""A seeded subset of ``make fuzz`` (tests/fuzz/harness.py) on every test run: 2,000 mutated
PE/MSI inputs aimed at the certificate table and the PKCS#7 DER, each in a worker process
with a per-case timeout. Every case must end in a status: no crash, no hang."""

from __future__ import annotations

import os
import time

from agent.schema import FILE_STATUSES
from tests.fuzz.harness import CaseRunner, Outcome, load_seeds, make_case, run_pool


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


class _Misbehaving(CaseRunner):
    """A stand-in case runner: case 3 hangs, case 5 kills its worker, the rest pass at once."""

    def __init__(self, seed_value: int, budget: float) -> None:  # no seeds, no verifier: fast
        pass

    def run(self, index: int) -> Outcome:
        if index == 3:
            time.sleep(600)
        if index == 5:
            os._exit(3)
        return Outcome(index, "OK", 0.0, f"case {index}")


def test_the_pool_kills_a_hanging_worker_and_counts_a_dead_one():
    report = run_pool(12, workers=2, timeout=1.0, runner_class=_Misbehaving)
    assert report.cases == 12
    assert [o.index for o in report.hangs] == [3]
    assert [o.index for o in report.crashes] == [5] and report.crashes[0].error == "worker died"
    assert report.statuses["OK"] == 10


def test_known_hang_msi_summary_vector_count_ends_in_a_status():
    """Seed 1, case 3979 (signed.msi, 9 bit flips): a SummaryInformation vector claiming ~2**32
    elements made olefile's get_metadata loop with no deadline check. Run in the pool so a
    regression shows as a hang report, not a stuck test run."""
    report = run_pool(1, seed_value=1, workers=1, budget=5.0, timeout=30.0, first_index=3979)
    assert not report.hangs and not report.crashes, "\n".join(report.lines())
    assert report.cases == 1

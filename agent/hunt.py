"""Run the rules over stored rows: the per-device result shape of the published queries."""

from __future__ import annotations

import datetime as dt
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.rules.index import RuleIndex
from agent.rules.loader import Rule
from agent.scanner import evidence_dict


@dataclass(frozen=True)
class HuntResult:
    rule: Rule
    result: dict[str, Any]  # exactly what the rule's summarize yields
    rows: tuple[dict[str, Any], ...]  # the rows behind it (drill-down)


def _rows_behind(result: Mapping[str, Any], matched: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], ...]:
    """Rows that fed one summarize group: same values in the result's grouping columns and,
    where the result lists ReportIds, one of those."""
    report_ids = result.get("Report")
    wanted: Container[Any] | None = None
    if isinstance(report_ids, list):
        try:  # perf (hunt, issue 12): a list here made this quadratic in the rows of a result
            wanted = set(report_ids)
        except TypeError:  # an unhashable value: compared as the list holds it
            wanted = report_ids
    keys = [k for k in ("DeviceId", "DeviceName") if k in result]
    out = []
    for row in matched:
        if any(row.get(k) != result[k] for k in keys):
            continue
        if wanted is not None and row.get("ReportId") not in wanted:
            continue
        out.append(row)
    return tuple(out)


def _excluded(
    row: Mapping[str, Any],
    rule_id: str,
    excluded_for: Mapping[tuple[str, int], set[str]] | None,
    exclusions: Sequence[Any],
) -> bool:
    if excluded_for and rule_id in excluded_for.get((row["DeviceId"], row["ReportId"]), set()):
        return True
    return any(e.applies(row, rule_id) for e in exclusions)


def run_hunt(
    rows: Iterable[dict[str, Any]],
    rules: Sequence[Rule],
    *,
    now: dt.datetime,
    include_excluded: bool = False,
    excluded_for: Mapping[tuple[str, int], set[str]] | None = None,
    exclusions: Sequence[Any] = (),
) -> list[HuntResult]:
    """Evaluate every rule over the rows. Excluded rows are left out unless asked for.

    A row is out for a rule when it was flagged Excluded when stored, when ``excluded_for``
    (DeviceId, ReportId) -> rule ids records a per-rule exclusion made when it was stored,
    or when one of the ``exclusions`` in force now applies to it for that rule.
    """
    pool = [r for r in rows if include_excluded or not r.get("Excluded")]
    # Each row goes only to the rules whose terms occur in it (RuleIndex: exactly the same results
    # as evaluating every rule on every row, tests/rules/test_rule_index.py), in the pool's order.
    index = RuleIndex(rules)
    candidates_of: dict[int, list[dict[str, Any]]] = {}
    for row in pool:
        for rule in index.candidates(row):
            candidates_of.setdefault(id(rule), []).append(row)
    results: list[HuntResult] = []
    for rule in rules:
        matched = []
        evidence_of: dict[int, list[dict[str, Any]]] = {}
        for row in candidates_of.get(id(rule), ()):
            evidence = rule.query.filter_row(row, now=now)
            if evidence is None or (not include_excluded and _excluded(row, rule.id, excluded_for, exclusions)):
                continue
            matched.append(row)
            evidence_of[id(row)] = [evidence_dict(e) for e in evidence]
        if not matched:
            continue
        for result in rule.query.run(matched, now=now):
            behind = tuple({**row, "Evidence": evidence_of[id(row)]} for row in _rows_behind(result, matched))
            results.append(HuntResult(rule, result, behind))
    return results

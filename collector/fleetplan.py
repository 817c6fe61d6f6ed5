"""A rule split for the fleet: row filters evaluated once at ingest, the rest in SQL. Pure.

A shipped rule reads ``where Timestamp between (now(-5d)..now()) | where Signer has ... |
summarize ... by DeviceId, DeviceName [| extend ...]``. The time window depends on *when*
the hunt runs, so it cannot be decided at ingest. The plan therefore:

- removes the top-level ``and`` conjuncts that compare ``Timestamp`` with a value built only
  from ``now()``, ``ago()`` and constants (the *window*), and keeps the rest as an ingest
  filter: a ``Query`` over the same parsed stages, run by the agent's own evaluator
  (``Query.filter_row``), so the hit decision is the agent's;
- turns the window into bounds computed from ``now`` when the hunt runs (in SQL);
- turns the ``summarize`` (count, min, max, dcount, make_set, ``by`` columns) into SQL;
- applies what follows the summarize (``extend``/``project`` of constants and columns) to the
  few aggregated rows.

A rule with any other shape has ``plan.sql is None``: the collector evaluates it in Python
(``run_hunt``) over its hit rows, and says so.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from typing import Any

from agent.rules.kql import Query
from agent.rules.kql_parser import (
    Aggregate,
    Ago,
    And,
    Arith,
    Column,
    Compare,
    Const,
    Expr,
    ExtendStage,
    Neg,
    Now,
    Or,
    ParsedQuery,
    ProjectStage,
    SummarizeStage,
    WhereStage,
    parse_kql,
)
from agent.rules.loader import Rule
from agent.rules.terms import split_terms
from agent.schema import COLUMN_TYPES

WINDOW_OPS = ("between", "!between", "<", "<=", ">", ">=")
AGG_FUNCS = ("count", "min", "max", "dcount", "make_set")


@dataclass(frozen=True)
class WindowTerm:
    op: str
    bounds: tuple[Expr, ...]  # built from now()/ago()/constants only


@dataclass(frozen=True)
class ColumnRef:
    name: str


@dataclass(frozen=True)
class SqlSummarize:
    window: tuple[WindowTerm, ...]
    aggregates: tuple[Aggregate, ...]  # arg is None (count) or a table Column
    by: tuple[tuple[str, str], ...]  # (output name, table column)
    post: tuple[tuple[str, str, Any], ...]  # (kind extend|project, name, constant or ColumnRef)
    post_kinds: tuple[str, ...]  # one entry per post stage, with its assignment count

    def signature(self) -> tuple[Any, ...]:
        """Rules with the same signature are computed by one SQL statement."""
        return (
            tuple((t.op, tuple(b.text for b in t.bounds)) for t in self.window),
            tuple((a.name, a.func, a.arg.name if isinstance(a.arg, Column) else None) for a in self.aggregates),
            self.by,
        )


@dataclass(frozen=True)
class FleetPlan:
    rule: Rule
    ingest: Query  # the row filter without the time window
    sql: SqlSummarize | None  # None: this rule is evaluated in Python
    reason: str = ""  # why sql is None
    # a necessary condition of the ingest filter: (column, first terms) such that a row can only
    # pass when one of these terms is among the column's terms (from a top-level `has`/`has_any`)
    needs: tuple[str, tuple[str, ...]] | None = None


def _row_independent(expr: Expr) -> bool:
    if isinstance(expr, Const):
        return isinstance(expr.value, dt.datetime | dt.timedelta | int | float) and not isinstance(expr.value, bool)
    if isinstance(expr, Now):
        return expr.offset is None or _row_independent(expr.offset)
    if isinstance(expr, Ago):
        return _row_independent(expr.span)
    if isinstance(expr, Arith):
        return _row_independent(expr.left) and _row_independent(expr.right)
    if isinstance(expr, Neg):
        return _row_independent(expr.operand)
    return False


def evaluate_bound(expr: Expr, now: dt.datetime) -> Any:
    """The value of a window bound at ``now`` (datetime or timedelta)."""
    if isinstance(expr, Const):
        return expr.value
    if isinstance(expr, Now):
        return now + (evaluate_bound(expr.offset, now) if expr.offset is not None else dt.timedelta(0))
    if isinstance(expr, Ago):
        return now - evaluate_bound(expr.span, now)
    if isinstance(expr, Arith):
        left, right = evaluate_bound(expr.left, now), evaluate_bound(expr.right, now)
        return left + right if expr.op == "+" else left - right
    if isinstance(expr, Neg):
        return -evaluate_bound(expr.operand, now)
    raise ValueError(f"not a window bound: {expr.text}")


def window_range(window: tuple[WindowTerm, ...], now: dt.datetime) -> list[tuple[str, tuple[Any, ...]]]:
    """(op, bound values) of each window term at ``now``; a timespan upper bound of ``between``
    is relative to the lower one, as in Kusto."""
    out = []
    for term in window:
        values = tuple(evaluate_bound(b, now) for b in term.bounds)
        if term.op in ("between", "!between") and isinstance(values[1], dt.timedelta):
            values = (values[0], values[0] + values[1])
        out.append((term.op, values))
    return out


def _split_window(predicate: Expr) -> tuple[list[WindowTerm], list[Expr]]:
    items = predicate.items if isinstance(predicate, And) else (predicate,)
    window: list[WindowTerm] = []
    rest: list[Expr] = []
    for item in items:
        if (
            isinstance(item, Compare)
            and isinstance(item.left, Column)
            and item.left.name == "Timestamp"
            and item.op in WINDOW_OPS
            and all(_row_independent(a) for a in item.args)
        ):
            window.append(WindowTerm(item.op, tuple(item.args)))
        else:
            rest.append(item)
    return window, rest


def _and(items: list[Expr], like: Expr) -> Expr:
    if len(items) == 1:
        return items[0]
    return And(
        type="bool", text=" and ".join(i.text for i in items), line=like.line, column=like.column, items=tuple(items)
    )


def parse_fleet_plan(rule: Rule) -> FleetPlan:
    parsed: ParsedQuery = parse_kql(rule.query.text)
    stages = list(parsed.stages)
    first_summarize = next((i for i, s in enumerate(stages) if isinstance(s, SummarizeStage)), None)
    row_stages = stages if first_summarize is None else stages[:first_summarize]
    window: list[WindowTerm] = []
    ingest_stages: list[Any] = []
    reason = ""
    for stage in row_stages:
        if isinstance(stage, WhereStage):
            found, rest = _split_window(stage.predicate)
            if found and ingest_stages and not all(isinstance(s, WhereStage) for s in ingest_stages):
                reason = "time window after an extend/project"
                found, rest = [], [stage.predicate]
            window.extend(found)
            if rest:
                ingest_stages.append(WhereStage(_and(rest, stage.predicate)))
        else:
            ingest_stages.append(stage)
            reason = reason or "extend/project before the summarize"
    ingest = Query(replace(parsed, stages=tuple(ingest_stages)))
    plan = _plan(rule, parsed, stages, first_summarize, ingest, window, reason)
    return replace(plan, needs=_needs(ingest_stages))


def _need(expr: Expr) -> tuple[str, tuple[str, ...]] | None:
    """A necessary condition of ``expr``: (column, first terms), one of which the column must have."""
    if isinstance(expr, And):
        for item in expr.items:
            found = _need(item)
            if found is not None:
                return found
        return None
    if isinstance(expr, Or):
        parts = [_need(item) for item in expr.items]
        if not parts or any(p is None for p in parts) or len({p[0] for p in parts if p}) != 1:
            return None
        return parts[0][0], tuple(dict.fromkeys(t for p in parts if p for t in p[1]))  # type: ignore[index]
    if not (
        isinstance(expr, Compare)
        and expr.op in ("has", "has_any", "has_all")
        and isinstance(expr.left, Column)
        and COLUMN_TYPES.get(expr.left.name) == "string"
        and expr.args
        and all(isinstance(a, Const) and isinstance(a.value, str) for a in expr.args)
    ):
        return None
    patterns = [a.value for a in expr.args]  # type: ignore[attr-defined]
    if expr.op == "has_all":
        patterns = patterns[:1]  # every pattern must be there: asking for the first one is enough
    firsts = []
    for pattern in patterns:
        terms = split_terms(pattern)
        if terms:  # a pattern without terms never matches
            firsts.append(terms[0])
    return expr.left.name, tuple(firsts)


def _needs(ingest_stages: list[Any]) -> tuple[str, tuple[str, ...]] | None:
    if not all(isinstance(s, WhereStage) for s in ingest_stages):
        return None
    for stage in ingest_stages:
        found = _need(stage.predicate)
        if found is not None:
            return found
    return None


def _plan(
    rule: Rule,
    parsed: ParsedQuery,
    stages: list[Any],
    first_summarize: int | None,
    ingest: Query,
    window: list[WindowTerm],
    reason: str,
) -> FleetPlan:
    row_stages = stages if first_summarize is None else stages[:first_summarize]
    if first_summarize is None:
        return FleetPlan(rule, ingest, None, "no summarize")
    if reason:
        return FleetPlan(rule, Query(replace(parsed, stages=tuple(row_stages))), None, reason)
    summarize = stages[first_summarize]
    assert isinstance(summarize, SummarizeStage)
    for agg in summarize.aggregates:
        if agg.func not in AGG_FUNCS or agg.max_size is not None:
            return FleetPlan(rule, ingest, None, f"aggregate {agg.func} with a limit")
        if agg.arg is not None and not (isinstance(agg.arg, Column) and agg.arg.name in COLUMN_TYPES):
            return FleetPlan(rule, ingest, None, f"aggregate over an expression: {agg.arg.text}")
    by: list[tuple[str, str]] = []
    for name, expr in summarize.by:
        if not (isinstance(expr, Column) and expr.name in COLUMN_TYPES):
            return FleetPlan(rule, ingest, None, f"summarize by an expression: {expr.text}")
        by.append((name, expr.name))
    post: list[tuple[str, str, Any]] = []
    kinds: list[str] = []
    for stage in stages[first_summarize + 1 :]:
        if not isinstance(stage, ExtendStage | ProjectStage):
            return FleetPlan(rule, ingest, None, "more than one summarize")
        kind = "extend" if isinstance(stage, ExtendStage) else "project"
        kinds.append(f"{kind}:{len(stage.assignments)}")
        for name, expr in stage.assignments:
            if isinstance(expr, Const):
                post.append((kind, name, expr.value))
            elif isinstance(expr, Column):
                post.append((kind, name, ColumnRef(expr.name)))
            else:
                return FleetPlan(rule, ingest, None, f"{kind} of an expression: {expr.text}")
    sql = SqlSummarize(tuple(window), tuple(summarize.aggregates), tuple(by), tuple(post), tuple(kinds))
    return FleetPlan(rule, ingest, sql)


def apply_post(sql: SqlSummarize, result: dict[str, Any]) -> dict[str, Any]:
    """The extend/project stages after the summarize, on one aggregated row."""
    out = dict(result)
    index = 0
    for spec in sql.post_kinds:
        kind, count = spec.split(":")
        assignments = sql.post[index : index + int(count)]
        index += int(count)
        base = out
        values = {}
        for _kind, name, value in assignments:
            if isinstance(value, ColumnRef):
                values[name] = base.get(value.name)
            else:
                values[name] = value
        out = {**base, **values} if kind == "extend" else values
    return out


class RuleIndex:
    """Which plans can match a row: those whose necessary terms occur in the row, plus those with
    no indexable condition. The final decision stays with each plan's ``filter_row``."""

    def __init__(self, plans: list[FleetPlan]) -> None:
        self.always: list[FleetPlan] = []
        self.by_term: dict[tuple[str, str], list[FleetPlan]] = {}
        for plan in plans:
            if plan.needs is None:
                self.always.append(plan)
                continue
            column, firsts = plan.needs
            for term in set(firsts):
                self.by_term.setdefault((column, term), []).append(plan)
        self.columns = sorted({column for column, _ in self.by_term})
        self.order = {id(p): i for i, p in enumerate(plans)}
        self._memo: dict[tuple[Any, ...], list[FleetPlan]] = {}  # signers repeat across a fleet

    def candidates(self, row: Any) -> list[FleetPlan]:
        key = tuple(row.get(column) for column in self.columns)
        cached = self._memo.get(key)
        if cached is not None:
            return cached
        found: dict[int, FleetPlan] = {id(p): p for p in self.always}
        for column, value in zip(self.columns, key, strict=True):
            if not isinstance(value, str) or not value:
                continue
            for term in set(split_terms(value)):
                for plan in self.by_term.get((column, term), ()):
                    found[id(plan)] = plan
        out = sorted(found.values(), key=lambda p: self.order[id(p)])
        if len(self._memo) >= 65536:
            self._memo.clear()
        self._memo[key] = out
        return out

"""The KQL subset that rmmhunt's rules are written in (SPEC section 2; user docs: docs/kql.md). Pure: no I/O.

Supported, over the single table `DeviceFileCertificateInfo` (columns from agent.schema):

- `let NAME = <scalar>;` with `now()`, `now(-5d)`, `ago(5d)`, `datetime(2025-01-01[T10:00:00Z])`,
  strings ('..', "..", @'..', h'..'), numbers, bools, timespans (`5d`, `12h`, `30m`, `10s`, `1ms`,
  `10microsecond`, `1tick`, `timespan(1d)`), `dynamic([...])` arrays of constants, a one-column
  `datatable(Name: type)[...]` (a list), `+`/`-` on these; and `let NAME = DeviceFileCertificateInfo
  | ...;` followed by `NAME | ...` (the markdown queries).
- Stages `where` (alias `filter`), `extend`, `project`, `project-away`, `project-rename`,
  `project-reorder`, `summarize` (`count()`, `min`, `max`, `dcount`, `make_set`, `arg_max`,
  `arg_min`, named or unnamed as Kusto names them; optional `by`, with `bin()`), `order by` /
  `sort by` (asc/desc, nulls first/last), `take` / `limit`, `top N by`, `distinct`, `count`.
  `TimeGenerated` reads `Timestamp`.
- Predicates: `and`, `or`, `not(...)`, parentheses; `has`, `!has`, `has_any`, `has_all`,
  `contains`, `!contains`, `startswith`, `!startswith`, `endswith`, `!endswith`, `==`, `!=`, `=~`,
  `!~`, `in`, `!in`, `in~`, `!in~`, `between`, `!between`, `<`, `<=`, `>`, `>=`, `isempty()`,
  `isnotempty()`, `isnull()`, `isnotnull()`, bare bool columns, bool == 0/1.
- Scalar functions `tolower`, `toupper`, `tostring`, `strlen`, `strcat`, `iff`/`iif`, `bin`.
- `//` comments anywhere; any line layout.

String semantics are in agent.rules.terms (Unicode-wide case folding, unlike Kusto's ASCII-only).
`==`, `!=`, `in`, `!in` are case-sensitive; the others are case-insensitive. `dcount` is exact.
A literal `has`/`has_any`/`has_all` pattern without letters or digits is rejected at parse time.
Strings are never null, as in Kusto: a missing string column reads as "", so `Signer !has 'x'`
keeps a row without Signer. Other nulls (None or a missing key) use Kusto's three-valued logic: a
row is kept only when the predicate is true. Column values are coerced to the agent.schema type
(0/1 -> bool, ISO text -> UTC datetime). Nesting is limited (kql_parser.MAX_NESTING). Everything
else raises KqlError at parse time with the line and column of the offending token.

Besides the agreed API, Query exposes `output_columns` (names after the last stage),
`has_summarize`, `row_level` (every stage looks at one row) and `anchors` (agent.rules.index).
Queries compare equal when their text is equal. A Query pickles as its parsed form and anchors and
is compiled again on its first use after unpickling (agent.rules.cache keeps parsed rules between runs).
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from agent.rules.index import Anchors, anchor_terms
from agent.rules.kql_eval import (
    Env,
    Evidence,
    RowStep,
    ValueFn,
    compile_stages,
    filter_one,
    negate_op,
    plan_row_stages,
    run_stages,
)
from agent.rules.kql_lexer import KqlError
from agent.rules.kql_parser import (
    ROW_STAGES,
    And,
    Call,
    Column,
    Compare,
    Const,
    Expr,
    ExtendStage,
    Not,
    Or,
    ParsedQuery,
    ProjectStage,
    SummarizeStage,
    WhereStage,
    parse_kql,
)
from agent.schema import COLUMN_TYPES

__all__ = ["KqlError", "Evidence", "Query", "parse_query"]

_BASE_COLUMNS = frozenset(COLUMN_TYPES)


class Query:
    """A parsed, type-checked query, ready to run. Immutable apart from a one-entry `now` cache."""

    __slots__ = (
        "text",
        "columns_used",
        "string_patterns",
        "output_columns",
        "has_summarize",
        "row_level",
        "anchors",
        "_stages",
        "_row_stages",
        "_slot_fns",
        "_env_cache",
        "_parsed",
    )

    text: str
    columns_used: frozenset[str]
    string_patterns: tuple[tuple[str, str, str], ...]
    output_columns: tuple[str, ...]
    has_summarize: bool
    row_level: bool
    anchors: Anchors | None

    def __init__(self, parsed: ParsedQuery) -> None:
        self._derive(parsed)
        self.anchors = anchor_terms(parsed, _BASE_COLUMNS)  # see agent.rules.index
        self._compile()  # a new query is compiled at once: what cannot compile fails here

    def _derive(self, parsed: ParsedQuery, string_patterns: tuple[tuple[str, str, str], ...] | None = None) -> None:
        self._parsed = parsed
        self.text = parsed.text
        self.columns_used = parsed.columns_used
        self.string_patterns = _string_patterns(parsed) if string_patterns is None else string_patterns
        self.output_columns = tuple(name for name, _ in parsed.output_columns)
        self.has_summarize = any(isinstance(stage, SummarizeStage) for stage in parsed.stages)
        self.row_level = _row_level(parsed)
        self._stages: tuple[Any, ...] | None = None
        self._env_cache: Env | None = None

    def _compile(self) -> None:
        stages, slot_fns = compile_stages(self._parsed.stages)
        self._row_stages: tuple[RowStep, ...] = plan_row_stages(stages)
        self._slot_fns: tuple[ValueFn, ...] = slot_fns
        self._stages = stages  # last: another thread that sees it sees the rest

    def __repr__(self) -> str:
        return f"Query({self.text!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # The parse, its anchors and patterns; the compiled closures are rebuilt on first use, so a
        # run that loads cached rules and evaluates no row never compiles them (start-up, issue 12).
        return (_unpickle_query, (self._parsed, self.anchors, self.string_patterns))

    def __eq__(self, other: object) -> bool:  # the same text is the same query
        return isinstance(other, Query) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def _env(self, now: datetime) -> Env:
        if now.tzinfo is None:
            now = now.replace(tzinfo=UTC)
        cached = self._env_cache
        if cached is not None and cached.now == now:
            return cached
        if self._stages is None:
            self._compile()
        slots: list[Any] = []
        env = Env(now, slots)
        for fn in self._slot_fns:  # in dependency order: a slot only reads earlier slots
            slots.append(fn({}, env))
        self._env_cache = env
        return env

    def filter_row(self, row: Mapping[str, Any], *, now: datetime) -> tuple[Evidence, ...] | None:
        """Run the row-level stages (those before the first summarize) on one row.

        None if the row is filtered out; otherwise the evidence of the leaf predicates that made it
        pass (empty if the query has no where before its summarize).
        """
        env = self._env(now)  # compiles a query restored from the cache
        return filter_one(self._row_stages, row, env)

    def run(self, rows: Iterable[Mapping[str, Any]], *, now: datetime) -> list[dict[str, Any]]:
        """Run the whole pipeline. make_set values are sorted lists."""
        env = self._env(now)
        assert self._stages is not None
        return run_stages(self._stages, rows, env)


def _unpickle_query(
    parsed: ParsedQuery, anchors: Anchors | None, string_patterns: tuple[tuple[str, str, str], ...]
) -> Query:
    query = Query.__new__(Query)
    query._derive(parsed, string_patterns)
    query.anchors = anchors
    return query


def parse_query(text: str) -> Query:
    """Parse KQL text into a Query. Raises KqlError (with line and column) for anything unsupported.

    The cyclic garbage collector is paused meanwhile: a large query allocates many objects that
    all stay alive, and the collector's repeated full passes over them doubled the load time.
    """
    paused = gc.isenabled()
    gc.disable()
    try:
        return Query(parse_kql(text))
    finally:
        if paused:
            gc.enable()


def _row_level(parsed: ParsedQuery) -> bool:
    """True when every stage looks at one row at a time (where, extend, project and its variants)."""
    return all(isinstance(stage, ROW_STAGES) for stage in parsed.stages)


def _label(expr: Expr) -> str:
    return expr.name if isinstance(expr, Column) else expr.text


def _string_patterns(parsed: ParsedQuery) -> tuple[tuple[str, str, str], ...]:
    found: dict[tuple[str, str, str], None] = {}

    def visit(expr: Expr, negated: bool) -> None:
        if isinstance(expr, Not):
            visit(expr.operand, not negated)
        elif isinstance(expr, And | Or):
            for item in expr.items:
                visit(item, negated)
        elif isinstance(expr, Compare):
            op = negate_op(expr.op) if negated else expr.op
            for arg in expr.args:
                if isinstance(arg, Const) and isinstance(arg.value, str):
                    found[(_label(expr.left), op, arg.value)] = None
        elif isinstance(expr, Call):
            for arg in expr.args:
                visit(arg, negated)

    for stage in parsed.stages:
        if isinstance(stage, WhereStage):
            visit(stage.predicate, False)
        elif isinstance(stage, ExtendStage | ProjectStage):
            for _, expr in stage.assignments:
                visit(expr, False)
        elif isinstance(stage, SummarizeStage):
            for _, expr in stage.by:
                visit(expr, False)
    return tuple(found)

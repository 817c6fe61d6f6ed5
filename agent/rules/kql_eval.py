"""Evaluation of a parsed KQL query over rows. Pure: rows in, rows and evidence out.

Strings are never null, as in Kusto: a missing (or non-text) string column reads as "", so
`Signer !has 'x'` and `not(Signer has 'x')` both keep a row without Signer. Other types follow
Kusto's three-valued logic: a leaf predicate with a null (None or missing) operand is null,
`not(null)` is null, `and`/`or` are Kleene, and `where` keeps a row only when the predicate is true.

Column values are coerced to the schema type on read, so rows straight from SQLite work too:
0/1 for bool, ISO 8601 text for datetime (naive means UTC); a value that cannot be coerced is null.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import Any

from agent.rules.kql_parser import (
    Ago,
    And,
    Arith,
    Call,
    Column,
    Compare,
    Const,
    CountStage,
    DistinctStage,
    EmptyTest,
    Expr,
    ExtendStage,
    Neg,
    Not,
    Now,
    Or,
    ProjectStage,
    SortKey,
    SortStage,
    Stage,
    SummarizeStage,
    TakeStage,
    TopStage,
    WhereStage,
    is_row_independent,
)
from agent.rules.terms import contains_folded, fold, has_terms, term_key

__all__ = [
    "Evidence",
    "Env",
    "CompiledStage",
    "RowStep",
    "compile_stages",
    "plan_row_stages",
    "filter_one",
    "run_stages",
    "negate_op",
]

Row = Mapping[str, Any]


@dataclass(frozen=True)
class Evidence:
    """One leaf predicate that held: `column operator pattern` was true for `value`.

    `column` is the column name, or the expression text when the left side is not a column.
    `operator` is the operator that held, negated when the leaf sat under a not() that made it
    pass (`!has` for `not(Signer has 'x')`). `pattern` is the pattern that matched: for has_any and
    in, the list element that matched; for between, the (low, high) bounds; for a bare bool, True.
    """

    column: str
    value: Any
    operator: str
    pattern: Any


class Env:
    """Per-evaluation context: the reference time and the values of time-dependent constants."""

    __slots__ = ("now", "slots")

    def __init__(self, now: datetime, slots: list[Any]) -> None:
        self.now = now
        self.slots = slots


ValueFn = Callable[[Row, Env], Any]

_NEGATED = {
    "==": "!=",
    "=~": "!~",
    "<": ">=",
    ">": "<=",
    "isempty": "isnotempty",
    "isnull": "isnotnull",
}
_NEGATED.update({value: key for key, value in list(_NEGATED.items())})


def negate_op(op: str) -> str:
    if op in _NEGATED:
        return _NEGATED[op]
    return op[1:] if op.startswith("!") else "!" + op


# --- value coercion ----------------------------------------------------------------------------------


def _as_datetime(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    if isinstance(value, str):
        text = value.strip()
        if text[-1:] in ("Z", "z"):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            return None
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    return None


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    return None


def _as_int(value: Any) -> int | None:
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def _as_real(value: Any) -> float | int | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    return None


def _as_string(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _as_timespan(value: Any) -> timedelta | None:
    return value if isinstance(value, timedelta) else None


_COERCE: dict[str, Callable[[Any], Any]] = {
    "string": _as_string,
    "bool": _as_bool,
    "long": _as_int,
    "int": _as_int,
    "real": _as_real,
    "datetime": _as_datetime,
    "timespan": _as_timespan,
}
_PYTHON_TYPES: dict[str, type | tuple[type, ...]] = {
    "string": str,
    "bool": bool,
    "long": int,
    "int": int,
    "real": (int, float),
    "datetime": datetime,
    "timespan": timedelta,
}


def _column_reader(name: str, kql_type: str) -> ValueFn:
    coerce = _COERCE.get(kql_type)
    if coerce is None:  # dynamic: as stored
        return lambda row, env: row.get(name)
    if kql_type == "string":  # Kusto strings are never null: a missing or non-text value reads as ""

        def read_string(row: Row, env: Env) -> Any:
            value = row.get(name)
            return value if value.__class__ is str or isinstance(value, str) else ""

        return read_string
    expected = _PYTHON_TYPES[kql_type]
    is_datetime = kql_type == "datetime"
    is_bool = kql_type == "bool"

    exact = datetime if is_datetime else expected

    def read(row: Row, env: Env) -> Any:
        value = row.get(name)
        if value is None:
            return None
        if value.__class__ is exact and (not is_datetime or getattr(value, "tzinfo", None) is not None):
            return value  # fast path: already the schema type
        if isinstance(value, expected):
            if is_datetime:
                return coerce(value)  # also makes a naive datetime UTC
            return int(value) if isinstance(value, bool) and not is_bool else value
        return coerce(value)

    return read


# --- compiling expressions ---------------------------------------------------------------------------


class _Compiler:
    def __init__(self) -> None:
        self.slot_exprs: list[ValueFn] = []  # time-dependent, row-independent values, computed once per `now`

    def value(self, expr: Expr) -> ValueFn:
        if isinstance(expr, Const):
            constant = expr.value
            return lambda row, env: constant
        if is_row_independent(expr):
            raw = self._raw_value(expr)
            slot = len(self.slot_exprs)
            self.slot_exprs.append(raw)
            return lambda row, env: env.slots[slot]
        return self._raw_value(expr)

    def constant(self, expr: Expr) -> Any:
        assert isinstance(expr, Const)
        return expr.value

    def _raw_value(self, expr: Expr) -> ValueFn:
        if isinstance(expr, Const):
            constant = expr.value
            return lambda row, env: constant
        if isinstance(expr, Column):
            return _column_reader(expr.name, expr.type)
        if isinstance(expr, Now):
            if expr.offset is None:
                return lambda row, env: env.now
            offset = self.value(expr.offset)

            def now_plus(row: Row, env: Env) -> Any:
                span = offset(row, env)
                return None if span is None else env.now + span

            return now_plus
        if isinstance(expr, Ago):
            span_fn = self.value(expr.span)

            def ago(row: Row, env: Env) -> Any:
                span = span_fn(row, env)
                return None if span is None else env.now - span

            return ago
        if isinstance(expr, Neg):
            operand = self.value(expr.operand)

            def negate(row: Row, env: Env) -> Any:
                value = operand(row, env)
                return None if value is None else -value

            return negate
        if isinstance(expr, Call):
            return _call(expr.func, tuple(self.value(arg) for arg in expr.args), expr.args)
        if isinstance(expr, Arith):
            left, right = self.value(expr.left), self.value(expr.right)
            subtract = expr.op == "-"

            def arith(row: Row, env: Env) -> Any:
                a, b = left(row, env), right(row, env)
                if a is None or b is None:
                    return None
                return a - b if subtract else a + b

            return arith
        return self.predicate(expr).test

    def predicate(self, expr: Expr) -> Pred:
        if isinstance(expr, And):
            return AndPred(tuple(self.predicate(item) for item in expr.items))
        if isinstance(expr, Or):
            return OrPred(tuple(self.predicate(item) for item in expr.items))
        if isinstance(expr, Not):
            return NotPred(self.predicate(expr.operand))
        if isinstance(expr, Compare):
            return self.compare(expr)
        if isinstance(expr, EmptyTest):
            return EmptyPred(_label(expr.operand), self.value(expr.operand), expr.func)
        return BoolPred(_label(expr), self.value(expr))

    def compare(self, expr: Compare) -> Pred:
        label = _label(expr.left)
        left = self.value(expr.left)
        op = expr.op
        if op in ("in", "!in", "in~", "!in~", "has_any", "has_all"):
            return ListPred(label, left, op, tuple(self.constant(arg) for arg in expr.args))
        if op in ("between", "!between"):
            low, high = self.value(expr.args[0]), self.value(expr.args[1])
            return RangePred(
                label, left, op, low, high, expr.args[1].type == "timespan" and expr.left.type == "datetime"
            )
        right_expr = expr.args[0]
        right = self.value(right_expr)
        pattern = right_expr.value if isinstance(right_expr, Const) else None
        return BinaryPred(label, left, op, right, pattern if isinstance(pattern, str) else None)


def _label(expr: Expr) -> str:
    return expr.name if isinstance(expr, Column) else expr.text


# --- scalar functions --------------------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_kusto_string(value: Any) -> str:
    """tostring(): Kusto's text of a value; null is ""."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        value = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ").replace(".000000Z", "Z")
    if isinstance(value, timedelta):
        sign = "-" if value < timedelta(0) else ""
        value = abs(value)
        hours, rest = divmod(value.seconds, 3600)
        minutes, seconds = divmod(rest, 60)
        days = f"{value.days}." if value.days else ""
        fraction = f".{value.microseconds:06d}0" if value.microseconds else ""
        return f"{sign}{days}{hours:02d}:{minutes:02d}:{seconds:02d}{fraction}"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _bin(value: Any, size: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return _EPOCH + ((value - _EPOCH) // size) * size
    if isinstance(value, timedelta):
        return (value // size) * size
    return (value // size) * size


def _call(func: str, args: tuple[ValueFn, ...], exprs: tuple[Expr, ...]) -> ValueFn:
    if func == "tolower":
        (arg,) = args
        return lambda row, env: (arg(row, env) or "").lower()
    if func == "toupper":
        (arg,) = args
        return lambda row, env: (arg(row, env) or "").upper()
    if func == "strlen":
        (arg,) = args
        return lambda row, env: len(arg(row, env) or "")
    if func == "tostring":
        (arg,) = args
        return lambda row, env: to_kusto_string(arg(row, env))
    if func == "strcat":
        return lambda row, env: "".join(to_kusto_string(arg(row, env)) for arg in args)
    if func == "iff":
        condition, then, otherwise = args
        return lambda row, env: then(row, env) if condition(row, env) is True else otherwise(row, env)
    if func == "bin":
        value_fn = args[0]
        size_expr = exprs[1]
        assert isinstance(size_expr, Const)
        size = size_expr.value
        return lambda row, env: _bin(value_fn(row, env), size)
    raise AssertionError(func)  # pragma: no cover - the parser admits only CALL_FUNCTIONS


# --- predicates --------------------------------------------------------------------------------------
# test() is the hot path (streaming: every row against every rule) and returns True/False/None.
# evidence() runs only for rows that passed, to say which leaves made them pass.


class Pred:
    def test(self, row: Row, env: Env) -> bool | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def evidence(self, row: Row, env: Env, want: bool) -> tuple[Evidence, ...]:  # pragma: no cover - abstract
        raise NotImplementedError


class AndPred(Pred):
    def __init__(self, items: tuple[Pred, ...]) -> None:
        self.items = items

    def test(self, row: Row, env: Env) -> bool | None:
        result: bool | None = True
        for item in self.items:
            value = item.test(row, env)
            if value is False:
                return False
            if value is None:
                result = None
        return result

    def evidence(self, row: Row, env: Env, want: bool) -> tuple[Evidence, ...]:
        if want:
            return tuple(ev for item in self.items for ev in item.evidence(row, env, True))
        for item in self.items:
            if item.test(row, env) is False:
                return item.evidence(row, env, False)
        return ()  # pragma: no cover - callers only ask for evidence of the actual truth value


class OrPred(Pred):
    def __init__(self, items: tuple[Pred, ...]) -> None:
        self.items = items

    def test(self, row: Row, env: Env) -> bool | None:
        result: bool | None = False
        for item in self.items:
            value = item.test(row, env)
            if value is True:
                return True
            if value is None:
                result = None
        return result

    def evidence(self, row: Row, env: Env, want: bool) -> tuple[Evidence, ...]:
        if not want:
            return tuple(ev for item in self.items for ev in item.evidence(row, env, False))
        for item in self.items:
            if item.test(row, env) is True:
                return item.evidence(row, env, True)
        return ()  # pragma: no cover


class NotPred(Pred):
    def __init__(self, operand: Pred) -> None:
        self.operand = operand

    def test(self, row: Row, env: Env) -> bool | None:
        value = self.operand.test(row, env)
        return None if value is None else not value

    def evidence(self, row: Row, env: Env, want: bool) -> tuple[Evidence, ...]:
        return self.operand.evidence(row, env, not want)


class BoolPred(Pred):
    """A bool-valued expression used as a predicate, e.g. a bare `IsTrusted`."""

    def __init__(self, label: str, value: ValueFn) -> None:
        self.label = label
        self.value = value

    def test(self, row: Row, env: Env) -> bool | None:
        value = self.value(row, env)
        return None if value is None else bool(value)

    def evidence(self, row: Row, env: Env, want: bool) -> tuple[Evidence, ...]:
        return (Evidence(self.label, self.value(row, env), "==", want),)


class EmptyPred(Pred):
    def __init__(self, label: str, value: ValueFn, func: str) -> None:
        self.label = label
        self.value = value
        self.func = func

    def test(self, row: Row, env: Env) -> bool | None:
        value = self.value(row, env)
        if self.func in ("isempty", "isnotempty"):
            empty = value is None or value == ""
            return empty if self.func == "isempty" else not empty
        return (value is None) if self.func == "isnull" else (value is not None)

    def evidence(self, row: Row, env: Env, want: bool) -> tuple[Evidence, ...]:
        return (Evidence(self.label, self.value(row, env), self.func if want else negate_op(self.func), None),)


def _string_test(op: str) -> Callable[[str, str], bool]:
    positive = op.lstrip("!")
    if op in ("=~", "!~"):
        return lambda a, b: fold(a) == fold(b)
    if positive == "has":
        return has_terms
    if positive == "contains":
        return contains_folded
    if positive == "startswith":
        return lambda a, b: fold(a).startswith(fold(b))
    if positive == "endswith":
        return lambda a, b: fold(a).endswith(fold(b))
    raise AssertionError(op)  # pragma: no cover


_ORDER: dict[str, Callable[[Any, Any], bool]] = {
    "==": lambda a, b: bool(a == b),
    "!=": lambda a, b: bool(a != b),
    "<": lambda a, b: bool(a < b),
    "<=": lambda a, b: bool(a <= b),
    ">": lambda a, b: bool(a > b),
    ">=": lambda a, b: bool(a >= b),
}


class BinaryPred(Pred):
    def __init__(self, label: str, left: ValueFn, op: str, right: ValueFn, pattern: str | None) -> None:
        self.label = label
        self.left = left
        self.op = op
        self.right = right
        self.pattern = pattern
        if op in _ORDER:
            self.negated = False
            self.check = _ORDER[op]
        else:
            self.negated = op.startswith("!")
            self.check = _string_test(op)
        if pattern is not None and op.lstrip("!") == "has":
            needle_key = term_key(pattern)
            # fast path for the common `Signer has 'literal'`: one cached key lookup per row
            self.check = lambda a, b: needle_key in term_key(a)

    def test(self, row: Row, env: Env) -> bool | None:
        a = self.left(row, env)
        if a is None:
            return None
        b = self.right(row, env)
        if b is None:
            return None
        try:
            result = self.check(a, b)
        except TypeError:  # values of unexpected types behave as null
            return None
        return not result if self.negated else result

    def evidence(self, row: Row, env: Env, want: bool) -> tuple[Evidence, ...]:
        pattern = self.pattern if self.pattern is not None else self.right(row, env)
        return (Evidence(self.label, self.left(row, env), self.op if want else negate_op(self.op), pattern),)


class ListPred(Pred):
    def __init__(self, label: str, left: ValueFn, op: str, items: tuple[Any, ...]) -> None:
        self.label = label
        self.left = left
        self.op = op
        self.items = items
        self.negated = op.startswith("!")
        positive = op.lstrip("!")
        self.caseless = positive == "in~"
        if positive == "in":
            self.members: frozenset[Any] = frozenset(items)
        elif self.caseless:
            self.members = frozenset(fold(item) for item in items)
        elif positive == "has_any":
            self._index_has_any(items)
        self.positive = positive

    def _index_has_any(self, items: tuple[Any, ...]) -> None:
        """Needles indexed by their first term, so a row costs O(its terms), not O(items)."""
        self.by_first_term: dict[str, list[tuple[int, str]]] = {}  # term -> [(index, needle key)]
        for index, item in enumerate(items):
            key = term_key(item)
            if key:
                self.by_first_term.setdefault(key[1:].split(" ", 1)[0], []).append((index, key))

    def _match_has_any(self, value: str) -> Any:
        hay = term_key(value)
        best: int | None = None
        for term in set(hay.split()):
            for index, key in self.by_first_term.get(term, ()):
                if (best is None or index < best) and key in hay:
                    best = index
                    break  # later needles with this first term have larger indexes
        return None if best is None else self.items[best]

    def match(self, value: Any) -> Any:
        """The first item that `value` matched, or None (`has_all` returns all items when all match)."""
        if self.positive == "has_any":
            return self._match_has_any(value)
        if self.positive == "has_all":
            return self.items if all(has_terms(value, item) for item in self.items) else None
        if self.caseless:
            folded = fold(value)
            return next((item for item in self.items if fold(item) == folded), None) if folded in self.members else None
        try:
            if value not in self.members:
                return None
        except TypeError:
            return None
        return next(item for item in self.items if item == value)

    def test(self, row: Row, env: Env) -> bool | None:
        value = self.left(row, env)
        if value is None:
            return None
        matched = self.match(value) is not None
        return not matched if self.negated else matched

    def evidence(self, row: Row, env: Env, want: bool) -> tuple[Evidence, ...]:
        value = self.left(row, env)
        op = self.op if want else negate_op(self.op)
        matched = self.match(value) if value is not None else None
        pattern = matched if matched is not None else self.items
        return (Evidence(self.label, value, op, pattern),)


class RangePred(Pred):
    def __init__(self, label: str, left: ValueFn, op: str, low: ValueFn, high: ValueFn, high_is_span: bool) -> None:
        self.label = label
        self.left = left
        self.op = op
        self.low = low
        self.high = high
        self.high_is_span = high_is_span
        self.negated = op.startswith("!")

    def bounds(self, row: Row, env: Env) -> tuple[Any, Any]:
        low, high = self.low(row, env), self.high(row, env)
        if self.high_is_span and low is not None and high is not None:
            high = low + high  # `between (start .. 1d)` means start .. start+1d
        return low, high

    def test(self, row: Row, env: Env) -> bool | None:
        value = self.left(row, env)
        if value is None:
            return None
        low, high = self.bounds(row, env)
        if low is None or high is None:
            return None
        try:
            inside = bool(low <= value <= high)
        except TypeError:
            return None
        return not inside if self.negated else inside

    def evidence(self, row: Row, env: Env, want: bool) -> tuple[Evidence, ...]:
        op = self.op if want else negate_op(self.op)
        return (Evidence(self.label, self.left(row, env), op, self.bounds(row, env)),)


# --- stages ------------------------------------------------------------------------------------------


# name, func, arg, max_size, extras (arg_max/arg_min: the columns read from the extreme row)
CompiledAggregate = tuple[str, str, ValueFn | None, int | None, tuple[tuple[str, ValueFn], ...]]
_ROW_KINDS = frozenset({"where", "extend", "project"})


@dataclass(frozen=True)
class CompiledStage:
    kind: str  # where, extend, project, summarize, sort, take, top, distinct, count
    predicate: Pred | None = None
    assignments: tuple[tuple[str, ValueFn], ...] = ()
    by: tuple[tuple[str, ValueFn], ...] = ()
    aggregates: tuple[CompiledAggregate, ...] = ()
    keys: tuple[tuple[ValueFn, bool, bool], ...] = ()  # sort keys: value, descending, nulls first
    count: int = 0  # take / top


def compile_stages(stages: tuple[Stage, ...]) -> tuple[tuple[CompiledStage, ...], tuple[ValueFn, ...]]:
    """Compile stages; also returns the slot functions that Env.slots must hold for a given `now`."""
    compiler = _Compiler()
    compiled: list[CompiledStage] = []
    for stage in stages:
        if isinstance(stage, WhereStage):
            compiled.append(CompiledStage("where", predicate=compiler.predicate(stage.predicate)))
        elif isinstance(stage, ExtendStage | ProjectStage | DistinctStage):
            kind = {ExtendStage: "extend", ProjectStage: "project", DistinctStage: "distinct"}[type(stage)]
            assignments = tuple((name, compiler.value(expr)) for name, expr in stage.assignments)
            compiled.append(CompiledStage(kind, assignments=assignments))
        elif isinstance(stage, SortStage | TopStage):
            keys = _compile_keys(compiler, stage.keys)
            if isinstance(stage, TopStage):
                compiled.append(CompiledStage("top", keys=keys, count=stage.count))
            else:
                compiled.append(CompiledStage("sort", keys=keys))
        elif isinstance(stage, TakeStage):
            compiled.append(CompiledStage("take", count=stage.count))
        elif isinstance(stage, CountStage):
            compiled.append(CompiledStage("count"))
        else:
            assert isinstance(stage, SummarizeStage)
            compiled.append(
                CompiledStage(
                    "summarize",
                    by=tuple((name, compiler.value(expr)) for name, expr in stage.by),
                    aggregates=tuple(
                        (
                            agg.name,
                            agg.func,
                            compiler.value(agg.arg) if agg.arg is not None else None,
                            agg.max_size,
                            tuple((name, compiler.value(expr)) for name, expr in agg.extras),
                        )
                        for agg in stage.aggregates
                    ),
                )
            )
    return tuple(compiled), tuple(compiler.slot_exprs)


def _compile_keys(compiler: _Compiler, keys: tuple[SortKey, ...]) -> tuple[tuple[ValueFn, bool, bool], ...]:
    return tuple((compiler.value(key.expr), key.descending, key.nulls_first) for key in keys)


def _extend(row: Row, env: Env, assignments: tuple[tuple[str, ValueFn], ...]) -> dict[str, Any]:
    out = dict(row)
    for name, fn in assignments:
        out[name] = fn(out, env)
    return out


def _project(row: Row, env: Env, assignments: tuple[tuple[str, ValueFn], ...]) -> dict[str, Any]:
    return {name: fn(row, env) for name, fn in assignments}


@dataclass(frozen=True)
class RowStep:
    """One step of the row-level plan: a run of adjacent where stages, or an extend/project."""

    kind: str  # where, extend, project
    predicates: tuple[Pred, ...] = ()  # in query order, for the evidence
    test_order: tuple[Pred, ...] = ()  # string predicates first: they reject most rows
    assignments: tuple[tuple[str, ValueFn], ...] = ()


def _selective(pred: Pred) -> bool:
    if isinstance(pred, BinaryPred | ListPred):
        return pred.op not in _ORDER
    if isinstance(pred, AndPred | OrPred):
        return any(_selective(item) for item in pred.items)
    if isinstance(pred, NotPred):
        return _selective(pred.operand)
    return False


def plan_row_stages(stages: tuple[CompiledStage, ...]) -> tuple[RowStep, ...]:
    """The stages before the first summarize, with adjacent where stages merged (they commute)."""
    steps: list[RowStep] = []
    for stage in stages:
        if stage.kind not in _ROW_KINDS:
            break
        if stage.kind == "where":
            assert stage.predicate is not None
            predicates: tuple[Pred, ...] = (stage.predicate,)
            if steps and steps[-1].kind == "where":
                predicates = steps.pop().predicates + predicates
            order = tuple(sorted(predicates, key=lambda pred: not _selective(pred)))
            steps.append(RowStep("where", predicates=predicates, test_order=order))
        else:
            steps.append(RowStep(stage.kind, assignments=stage.assignments))
    return tuple(steps)


def filter_one(steps: tuple[RowStep, ...], row: Row, env: Env) -> tuple[Evidence, ...] | None:
    """Run the row-level plan on one row; evidence is gathered only once every where has passed."""
    passed: list[tuple[Pred, Row]] = []
    current: Row = row
    for step in steps:
        if step.kind == "where":
            for pred in step.test_order:
                if pred.test(current, env) is not True:
                    return None
            passed.extend((pred, current) for pred in step.predicates)
        elif step.kind == "extend":
            current = _extend(current, env, step.assignments)
        else:
            current = _project(current, env, step.assignments)
    return tuple(ev for pred, seen in passed for ev in pred.evidence(seen, env, True))


def _sorted_set(values: Iterable[Any]) -> list[Any]:
    items = list(values)
    try:
        return sorted(items)
    except TypeError:
        return sorted(items, key=lambda item: (type(item).__name__, repr(item)))


def _summarize(rows: Iterable[Row], env: Env, stage: CompiledStage) -> Iterator[dict[str, Any]]:
    groups: dict[tuple[Any, ...], list[Any]] = {}
    aggregates = stage.aggregates
    by = stage.by

    def fresh() -> list[Any]:
        states: list[Any] = []
        for _, func, _, _, _ in aggregates:
            if func in ("count",):
                states.append(0)
            elif func in ("dcount", "make_set"):
                states.append({})  # dict as an insertion-ordered set
            else:
                states.append(None)
        return states

    for row in rows:
        key = tuple(fn(row, env) for _, fn in by)
        try:
            states = groups.get(key)
        except TypeError:  # unhashable group key: group by its repr
            key = tuple(repr(part) for part in key)
            states = groups.get(key)
        if states is None:
            states = groups[key] = fresh()
        for index, (_, func, arg, max_size, extras) in enumerate(aggregates):
            if func == "count":
                states[index] += 1
                continue
            assert arg is not None
            value = arg(row, env)
            if value is None:
                continue  # aggregates ignore nulls
            if extras:  # arg_max / arg_min: keep the first row with the extreme value
                current = states[index]
                try:
                    better = current is None or (value > current[0] if func == "arg_max" else value < current[0])
                except TypeError:
                    continue
                if better:
                    states[index] = (value, tuple(fn(row, env) for _, fn in extras))
                continue
            if func in ("dcount", "make_set"):
                seen = states[index]
                if max_size is None or len(seen) < max_size:
                    try:
                        seen[value] = None
                    except TypeError:
                        seen[repr(value)] = None
            else:
                current = states[index]
                try:
                    if current is None or (value < current if func == "min" else value > current):
                        states[index] = value
                except TypeError:
                    continue
    if not groups and not by:
        groups[()] = fresh()  # no group keys: one row even for empty input
    for key, states in groups.items():
        out: dict[str, Any] = {name: part for (name, _), part in zip(by, key, strict=True)}
        for (name, func, _, _, extras), state in zip(aggregates, states, strict=True):
            if extras:
                out[name] = state[0] if state is not None else None
                values = state[1] if state is not None else (None,) * len(extras)
                for (extra, _), value in zip(extras, values, strict=True):
                    out[extra] = value
            elif func == "dcount":
                out[name] = len(state)
            elif func == "make_set":
                out[name] = _sorted_set(state)
            else:
                out[name] = state
        yield out


def _pass_one(steps: tuple[RowStep, ...], row: Row, env: Env) -> Row | None:
    """The row after the row-level plan, or None if a where drops it."""
    current = row
    for step in steps:
        if step.kind == "where":
            for pred in step.test_order:
                if pred.test(current, env) is not True:
                    return None
        elif step.kind == "extend":
            current = _extend(current, env, step.assignments)
        else:
            current = _project(current, env, step.assignments)
    return current


def run_stages(stages: tuple[CompiledStage, ...], rows: Iterable[Row], env: Env) -> list[dict[str, Any]]:
    """Run the whole pipeline. Rows that pass through untouched are returned as dict copies."""
    steps = plan_row_stages(stages)
    first_summarize = next((i for i, stage in enumerate(stages) if stage.kind not in _ROW_KINDS), len(stages))
    current: Iterable[Row] = (passed for passed in (_pass_one(steps, row, env) for row in rows) if passed is not None)
    for stage in stages[first_summarize:]:
        current = _apply(stage, current, env)
    return [dict(row) for row in current]


def _apply(stage: CompiledStage, rows: Iterable[Row], env: Env) -> Iterable[Row]:
    if stage.kind == "where":
        predicate = stage.predicate
        assert predicate is not None
        return (row for row in rows if predicate.test(row, env) is True)
    if stage.kind == "extend":
        return (_extend(row, env, stage.assignments) for row in rows)
    if stage.kind == "project":
        return (_project(row, env, stage.assignments) for row in rows)
    if stage.kind == "take":
        return islice(rows, stage.count)
    if stage.kind == "sort":
        return _sort(rows, env, stage.keys)
    if stage.kind == "top":
        return _sort(rows, env, stage.keys)[: stage.count]
    if stage.kind == "distinct":
        return _distinct(rows, env, stage.assignments)
    if stage.kind == "count":
        return iter([{"Count": sum(1 for _ in rows)}])
    return _summarize(rows, env, stage)


def _sort(rows: Iterable[Row], env: Env, keys: tuple[tuple[ValueFn, bool, bool], ...]) -> list[Row]:
    """order by: a stable sort on each key from the last to the first, nulls placed as asked."""
    items = [(row, tuple(fn(row, env) for fn, _, _ in keys)) for row in rows]
    for index in range(len(keys) - 1, -1, -1):
        _, descending, nulls_first = keys[index]
        nulls = [item for item in items if item[1][index] is None]
        present = [item for item in items if item[1][index] is not None]
        try:
            present.sort(key=lambda item: item[1][index], reverse=descending)
        except TypeError:  # mixed types in one column: order by type name, then text
            present.sort(key=lambda item: (type(item[1][index]).__name__, repr(item[1][index])), reverse=descending)
        items = nulls + present if nulls_first else present + nulls
    return [row for row, _ in items]


def _distinct(rows: Iterable[Row], env: Env, assignments: tuple[tuple[str, ValueFn], ...]) -> Iterator[Row]:
    seen: set[Any] = set()
    for row in rows:
        out = _project(row, env, assignments)
        key = tuple(out.values())
        try:
            marker: Any = key
            if marker in seen:
                continue
        except TypeError:  # unhashable values: compare their repr
            marker = repr(key)
            if marker in seen:
                continue
        seen.add(marker)
        yield out

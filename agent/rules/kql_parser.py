"""Parser and type checker for the KQL subset: query text -> a typed AST. Pure.

Every construct outside the subset raises KqlError at the token that starts it, so a rule never
loads with a part of its query silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from agent.rules.kql_lexer import DATETIME, EOF, IDENT, NUMBER, PUNCT, STRING, TIMESPAN, KqlError, Token, tokenize
from agent.rules.terms import term_key
from agent.schema import COLUMN_TYPES, TABLE

__all__ = [
    "Expr",
    "Const",
    "Column",
    "Now",
    "Ago",
    "Arith",
    "Neg",
    "Not",
    "And",
    "Or",
    "Compare",
    "EmptyTest",
    "Call",
    "SortKey",
    "SortStage",
    "TakeStage",
    "TopStage",
    "DistinctStage",
    "CountStage",
    "ROW_STAGES",
    "MAX_NESTING",
    "WhereStage",
    "ExtendStage",
    "ProjectStage",
    "Aggregate",
    "SummarizeStage",
    "Stage",
    "ParsedQuery",
    "parse_kql",
    "NUMERIC",
    "STRING_OPS",
    "LIST_OPS",
    "EQUALITY_OPS",
    "ORDER_OPS",
    "RANGE_OPS",
]

# Deepest nesting of parentheses, function calls, not(), unary minus and arithmetic chains. Real
# queries nest a handful of levels; the limit keeps parsing and evaluation far from Python's
# recursion limit, so a hostile query is a load error with its position, never a RecursionError.
MAX_NESTING = 64

NUMERIC = frozenset({"long", "int", "real"})
ORDERED = NUMERIC | {"datetime", "timespan", "string"}

# word operators whose right side is one string
STRING_OPS = frozenset(
    {"has", "!has", "contains", "!contains", "startswith", "!startswith", "endswith", "!endswith", "=~", "!~"}
)
LIST_OPS = frozenset({"in", "!in", "in~", "!in~", "has_any", "has_all"})
EQUALITY_OPS = frozenset({"==", "!="})
ORDER_OPS = frozenset({"<", "<=", ">", ">="})
RANGE_OPS = frozenset({"between", "!between"})
_TERM_OPS = frozenset({"has", "!has", "has_any", "has_all"})
_CASELESS_LIST_OPS = frozenset({"in~", "!in~", "has_any", "has_all"})

AGGREGATES: dict[str, str] = {
    "count": "count_",
    "min": "min_",
    "max": "max_",
    "dcount": "dcount_",
    "make_set": "set_",
    "arg_max": "max_",
    "arg_min": "min_",
}
# scalar functions evaluated per row (Call nodes); see kql_eval for their semantics
CALL_FUNCTIONS = frozenset({"tolower", "toupper", "tostring", "strlen", "strcat", "iff", "iif", "bin"})
_SCALAR_FUNCTIONS = (
    frozenset({"now", "ago", "not", "isempty", "isnotempty", "isnull", "isnotnull", "dynamic", "datatable"})
    | CALL_FUNCTIONS
)
MAX_CALL_ARGS = 64
MAX_LIST_ITEMS = 1_000_000
_BOOL_WORDS = {"true": True, "false": False, "True": True, "False": False, "TRUE": True, "FALSE": False}
_KEYWORDS = frozenset({"and", "or", "by", "let", "not"})
# words that may follow a complete operand: the statement parser or a sort key handles them
_FOLLOW_WORDS = frozenset({"and", "or", "by", "let", TABLE, "asc", "desc", "nulls"})
_STAGES = frozenset(
    {
        "where",
        "filter",
        "extend",
        "project",
        "summarize",
        "order",
        "sort",
        "take",
        "limit",
        "top",
        "project-away",
        "project-rename",
        "project-reorder",
        "distinct",
        "count",
    }
)
# Sentinel's name for the time column; it reads Timestamp unless the query defines its own.
TIME_ALIASES = {"TimeGenerated": "Timestamp"}


# --- AST -------------------------------------------------------------------------------------------------
# Every expression node carries its KQL type, its source text and the position of its first token.


@dataclass(frozen=True)
class Expr:
    type: str
    text: str
    line: int
    column: int


@dataclass(frozen=True)
class Const(Expr):
    value: Any  # str, int, float, bool, datetime, timedelta, None, or a tuple for `dynamic([...])`


@dataclass(frozen=True)
class Column(Expr):
    name: str


@dataclass(frozen=True)
class Now(Expr):
    offset: Expr | None


@dataclass(frozen=True)
class Ago(Expr):
    span: Expr


@dataclass(frozen=True)
class Arith(Expr):
    op: str  # "+" or "-"
    left: Expr
    right: Expr


@dataclass(frozen=True)
class Neg(Expr):
    operand: Expr


@dataclass(frozen=True)
class Not(Expr):
    operand: Expr


@dataclass(frozen=True)
class And(Expr):
    items: tuple[Expr, ...]


@dataclass(frozen=True)
class Or(Expr):
    items: tuple[Expr, ...]


@dataclass(frozen=True)
class Compare(Expr):
    op: str
    left: Expr
    args: tuple[Expr, ...]  # (rhs,) ; the constant list for in/has_any/... ; (low, high) for between


@dataclass(frozen=True)
class Call(Expr):
    func: str  # one of CALL_FUNCTIONS (iif is stored as iff)
    args: tuple[Expr, ...]


@dataclass(frozen=True)
class EmptyTest(Expr):
    func: str  # isempty, isnotempty, isnull, isnotnull
    operand: Expr


@dataclass(frozen=True)
class WhereStage:
    predicate: Expr


@dataclass(frozen=True)
class ExtendStage:
    assignments: tuple[tuple[str, Expr], ...]


@dataclass(frozen=True)
class ProjectStage:
    assignments: tuple[tuple[str, Expr], ...]


@dataclass(frozen=True)
class Aggregate:
    name: str
    func: str  # count, min, max, dcount, make_set, arg_max, arg_min
    arg: Expr | None
    max_size: int | None  # make_set's optional limit
    extras: tuple[tuple[str, Expr], ...] = ()  # arg_max/arg_min: the columns taken from the extreme row


@dataclass(frozen=True)
class SummarizeStage:
    aggregates: tuple[Aggregate, ...]
    by: tuple[tuple[str, Expr], ...]


@dataclass(frozen=True)
class SortKey:
    expr: Expr
    descending: bool  # Kusto's default is desc
    nulls_first: bool  # default: nulls last for desc, nulls first for asc


@dataclass(frozen=True)
class SortStage:
    keys: tuple[SortKey, ...]


@dataclass(frozen=True)
class TakeStage:
    count: int


@dataclass(frozen=True)
class TopStage:
    count: int
    keys: tuple[SortKey, ...]


@dataclass(frozen=True)
class DistinctStage:
    assignments: tuple[tuple[str, Expr], ...]


@dataclass(frozen=True)
class CountStage:
    pass


Stage = (
    WhereStage
    | ExtendStage
    | ProjectStage
    | SummarizeStage
    | SortStage
    | TakeStage
    | TopStage
    | DistinctStage
    | CountStage
)
# stages that look at one row at a time; the row-level plan (filter_row) stops at the first other one
ROW_STAGES = (WhereStage, ExtendStage, ProjectStage)


@dataclass(frozen=True)
class ParsedQuery:
    text: str
    stages: tuple[Stage, ...]
    output_columns: tuple[tuple[str, str], ...]  # (name, type) after the last stage
    columns_used: frozenset[str]  # table columns the query reads


# --- helpers ---------------------------------------------------------------------------------------------


def walk(expr: Expr) -> list[Expr]:
    """`expr` and all its sub-expressions, depth first."""
    out: list[Expr] = [expr]
    children: tuple[Expr, ...] = ()
    if isinstance(expr, Now):
        children = (expr.offset,) if expr.offset is not None else ()
    elif isinstance(expr, Ago):
        children = (expr.span,)
    elif isinstance(expr, Arith):
        children = (expr.left, expr.right)
    elif isinstance(expr, Neg | Not | EmptyTest):
        children = (expr.operand,)
    elif isinstance(expr, And | Or):
        children = expr.items
    elif isinstance(expr, Compare):
        children = (expr.left, *expr.args)
    elif isinstance(expr, Call):
        children = expr.args
    for child in children:
        out.extend(walk(child))
    return out


def is_row_independent(expr: Expr) -> bool:
    return not any(isinstance(node, Column) for node in walk(expr))


def _family(kql_type: str) -> str:
    return "number" if kql_type in NUMERIC else kql_type


def _comparable(left: str, right: str) -> bool:
    if _family(left) == _family(right):
        return True
    # Sentinel writes `IsTrusted == 1`: a bool compares with a number as 0/1.
    return {_family(left), _family(right)} == {"bool", "number"}


@dataclass
class _ColumnInfo:
    type: str
    base: bool  # True while the name still reads the table column directly


_NO_COLUMN = _ColumnInfo("", False)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.index = 0
        self.scalar_lets: dict[str, Expr] = {}
        self.tabular_lets: dict[str, tuple[tuple[Stage, ...], dict[str, _ColumnInfo]]] = {}
        self.columns_used: set[str] = set()
        self.auto_names = 0
        self.depth = 0

    # token access
    def peek(self, ahead: int = 0) -> Token:
        return self.tokens[min(self.index + ahead, len(self.tokens) - 1)]

    def advance(self) -> Token:
        token = self.tokens[self.index]
        if token.kind != EOF:
            self.index += 1
        return token

    def prev_end(self) -> int:
        return self.tokens[self.index - 1].end if self.index else 0

    def error(self, token: Token, message: str) -> KqlError:
        return KqlError(token.line, token.column, message)

    def at_punct(self, value: str) -> bool:
        token = self.peek()
        return token.kind == PUNCT and token.value == value

    def at_word(self, value: str) -> bool:
        token = self.peek()
        return token.kind == IDENT and token.value == value

    def expect_punct(self, value: str, context: str) -> Token:
        token = self.peek()
        if token.kind == PUNCT and token.value == value:
            return self.advance()
        raise self.error(token, f"expected '{value}' {context}, found {describe(token)}")

    def expect_ident(self, context: str) -> Token:
        token = self.peek()
        if token.kind == IDENT and not token.value.startswith("!") and token.value not in _KEYWORDS:
            return self.advance()
        raise self.error(token, f"expected a name {context}, found {describe(token)}")

    def source(self, start: Token) -> str:
        return self.text[start.offset : self.prev_end()]

    # --- statements ---------------------------------------------------------------------------------

    def parse(self) -> ParsedQuery:
        final: tuple[tuple[Stage, ...], dict[str, _ColumnInfo]] | None = None
        while self.peek().kind != EOF:
            if self.at_punct(";"):
                self.advance()
                continue
            token = self.peek()
            if final is not None:
                raise self.error(token, f"only one tabular expression is supported; unexpected {describe(token)}")
            if self.at_word("let"):
                self.parse_let()
                if self.peek().kind != EOF:
                    self.expect_punct(";", "after a let statement")
                continue
            final = self.parse_tabular()
            token = self.peek()
            if token.kind != EOF and not self.at_punct(";"):
                raise self.error(token, f"unexpected {describe(token)}")
        if final is None:
            raise self.error(self.peek(), f"query has no tabular expression (expected '{TABLE} | ...')")
        stages, schema = final
        return ParsedQuery(
            text=self.text,
            stages=stages,
            output_columns=tuple((name, info.type) for name, info in schema.items()),
            columns_used=frozenset(self.columns_used),
        )

    def parse_let(self) -> None:
        self.advance()  # let
        name_token = self.expect_ident("after 'let'")
        name = name_token.value
        if name == TABLE or name in COLUMN_TYPES:
            raise self.error(name_token, f"let name '{name}' hides a table or column")
        self.expect_punct("=", f"after 'let {name}'")
        token = self.peek()
        if token.kind == IDENT and (token.value == TABLE or token.value in self.tabular_lets):
            self.tabular_lets[name] = self.parse_tabular()
            self.scalar_lets.pop(name, None)
            return
        if self.at_punct("(") and (
            self.peek(1).kind == PUNCT
            and self.peek(1).value == ")"
            or self.peek(2).kind == PUNCT
            and self.peek(2).value == ":"
        ):
            raise self.error(token, "unsupported construct: user-defined function in let")
        if token.kind == IDENT and token.value not in self.scalar_lets and token.value not in _SCALAR_FUNCTIONS:
            following = self.peek(1)
            if not (following.kind == PUNCT and following.value == "(") and token.value not in _BOOL_WORDS:
                raise self.error(token, f"unknown table '{token.value}'; only {TABLE} is supported")
        expr = self.parse_expr({})
        if not is_row_independent(expr):  # pragma: no cover - an empty scope has no columns
            raise self.error(token, "a let value cannot read columns")
        self.scalar_lets[name] = expr
        self.tabular_lets.pop(name, None)

    # --- tabular expressions --------------------------------------------------------------------------

    def parse_tabular(self) -> tuple[tuple[Stage, ...], dict[str, _ColumnInfo]]:
        token = self.peek()
        stages: list[Stage] = []
        if token.kind == IDENT and token.value == TABLE:
            self.advance()
            schema = {name: _ColumnInfo(kql_type, True) for name, kql_type in COLUMN_TYPES.items()}
        elif token.kind == IDENT and token.value in self.tabular_lets:
            self.advance()
            let_stages, let_schema = self.tabular_lets[token.value]
            stages.extend(let_stages)
            schema = {name: _ColumnInfo(info.type, info.base) for name, info in let_schema.items()}
        elif token.kind == IDENT and token.value in self.scalar_lets:
            raise self.error(token, f"'{token.value}' is a scalar, not a table")
        elif token.kind == IDENT and not token.value.startswith("!") and token.value not in _KEYWORDS:
            following = self.peek(1)
            if following.kind == PUNCT and following.value == "(":  # datatable(...), range(...), view(...)
                raise self.error(token, f"unsupported tabular expression '{token.value}(...)'")
            raise self.error(token, f"unknown table '{token.value}'; only {TABLE} is supported")
        else:
            raise self.error(token, f"expected the table {TABLE}, found {describe(token)}")
        while self.at_punct("|"):
            self.advance()
            stages.append(self.parse_stage(schema))
        return tuple(stages), schema

    def operator_name(self) -> tuple[Token, str]:
        token = self.peek()
        if token.kind != IDENT:
            raise self.error(token, f"expected an operator after '|', found {describe(token)}")
        self.advance()
        name = token.value
        # hyphenated operator names: project-away, mv-expand, make-series ...
        while (
            self.at_punct("-")
            and self.peek().offset == self.prev_end()
            and self.peek(1).kind == IDENT
            and self.peek(1).offset == self.peek().end
        ):
            self.advance()
            name += "-" + self.advance().value
        return token, name

    def parse_stage(self, schema: dict[str, _ColumnInfo]) -> Stage:
        token, name = self.operator_name()
        if name not in _STAGES:
            raise self.error(token, f"unsupported operator '{name}'")
        if name in ("where", "filter"):
            predicate = self.parse_expr(schema)
            if predicate.type != "bool":
                raise KqlError(predicate.line, predicate.column, f"where needs a bool predicate, got {predicate.type}")
            return WhereStage(predicate)
        if name == "extend":
            assignments = self.parse_assignments(schema, "extend", sequential=True)
            for column, expr in assignments:
                schema[column] = _ColumnInfo(expr.type, False)
            return ExtendStage(assignments)
        if name == "project":
            assignments = self.parse_assignments(schema, "project", sequential=False)
            schema.clear()
            for column, expr in assignments:
                schema[column] = _ColumnInfo(expr.type, False)
            return ProjectStage(assignments)
        if name == "summarize":
            return self.parse_summarize(schema)
        if name in ("order", "sort"):
            if not self.at_word("by"):
                raise self.error(self.peek(), f"expected 'by' after '{name}', found {describe(self.peek())}")
            self.advance()
            return SortStage(self.parse_sort_keys(schema))
        if name in ("take", "limit"):
            return TakeStage(self.parse_count(name))
        if name == "top":
            count = self.parse_count(name)
            if not self.at_word("by"):
                raise self.error(self.peek(), f"expected 'by' after 'top {count}', found {describe(self.peek())}")
            self.advance()
            return TopStage(count, self.parse_sort_keys(schema, single=True))
        if name == "count":
            schema.clear()
            schema["Count"] = _ColumnInfo("long", False)
            return CountStage()
        if name == "distinct":
            if self.at_punct("*"):
                star = self.advance()
                assignments = self.columns_as_assignments(schema, list(schema), star)
            else:
                assignments = self.parse_assignments(schema, "distinct", sequential=False)
            schema.clear()
            for column, expr in assignments:
                schema[column] = _ColumnInfo(expr.type, False)
            return DistinctStage(assignments)
        return self.parse_project_variant(name, token, schema)

    def parse_count(self, operator: str) -> int:
        token = self.peek()
        if token.kind != NUMBER or not isinstance(token.value, int):
            raise self.error(token, f"'{operator}' needs a constant row count, found {describe(token)}")
        self.advance()
        return int(token.value)

    def parse_sort_keys(self, schema: Mapping[str, _ColumnInfo], *, single: bool = False) -> tuple[SortKey, ...]:
        keys: list[SortKey] = []
        while True:
            expr = self.parse_expr(schema)
            if expr.type == "dynamic":
                raise KqlError(expr.line, expr.column, "cannot sort by a dynamic value")
            descending = True
            if self.at_word("asc") or self.at_word("desc"):
                descending = self.advance().value == "desc"
            nulls_first = not descending
            if self.at_word("nulls"):
                self.advance()
                if not (self.at_word("first") or self.at_word("last")):
                    raise self.error(
                        self.peek(), f"expected 'first' or 'last' after 'nulls', found {describe(self.peek())}"
                    )
                nulls_first = self.advance().value == "first"
            keys.append(SortKey(expr, descending, nulls_first))
            if single or not self.at_punct(","):
                return tuple(keys)
            self.advance()

    def column_name_list(self, schema: Mapping[str, _ColumnInfo], operator: str) -> list[Token]:
        tokens: list[Token] = []
        while True:
            token = self.expect_ident(f"in {operator}")
            if token.value not in schema:
                raise self.error(token, f"unknown column '{token.value}'")
            if any(seen.value == token.value for seen in tokens):
                raise self.error(token, f"duplicate column name '{token.value}' in {operator}")
            tokens.append(token)
            if not self.at_punct(","):
                return tokens
            self.advance()

    def columns_as_assignments(
        self, schema: Mapping[str, _ColumnInfo], names: list[str], token: Token
    ) -> tuple[tuple[str, Expr], ...]:
        out: list[tuple[str, Expr]] = []
        for name in names:
            info = schema[name]
            if info.base:
                self.columns_used.add(name)
            out.append((name, Column(info.type, name, token.line, token.column, name)))
        return tuple(out)

    def parse_project_variant(self, name: str, token: Token, schema: dict[str, _ColumnInfo]) -> Stage:
        """project-away, project-rename and project-reorder, as a project over the known columns."""
        if name == "project-rename":
            renames: dict[str, str] = {}  # old -> new
            while True:
                new = self.expect_ident("in project-rename")
                self.expect_punct("=", "in project-rename (new = old)")
                old = self.expect_ident("in project-rename")
                if old.value not in schema:
                    raise self.error(old, f"unknown column '{old.value}'")
                if old.value in renames:
                    raise self.error(old, f"column '{old.value}' is renamed twice")
                renames[old.value] = new.value
                if not self.at_punct(","):
                    break
                self.advance()
            kept = self.columns_as_assignments(schema, list(schema), token)
            assignments = tuple((renames.get(column, column), expr) for column, expr in kept)
            names = [column for column, _ in assignments]
            duplicate = next((column for column in names if names.count(column) > 1), None)
            if duplicate is not None:
                raise self.error(token, f"duplicate column name '{duplicate}' in project-rename")
        else:
            listed = [item.value for item in self.column_name_list(schema, name)]
            if name == "project-away":
                order = [column for column in schema if column not in listed]
            else:  # project-reorder: the listed columns first, the others after them in their order
                order = listed + [column for column in schema if column not in listed]
            assignments = self.columns_as_assignments(schema, order, token)
        schema.clear()
        for column, expr in assignments:
            schema[column] = _ColumnInfo(expr.type, False)
        return ProjectStage(assignments)

    def parse_assignments(
        self, schema: dict[str, _ColumnInfo], operator: str, *, sequential: bool
    ) -> tuple[tuple[str, Expr], ...]:
        scope = dict(schema)
        assignments: list[tuple[str, Expr]] = []
        seen: set[str] = set()
        while True:
            start = self.peek()
            name = self.assignment_name()
            expr = self.parse_expr(scope)
            if name is None:
                name = _default_name(expr) or self.auto_name()
            if name in seen:
                raise self.error(start, f"duplicate column name '{name}' in {operator}")
            seen.add(name)
            assignments.append((name, expr))
            if sequential:  # `extend a = 1, b = a` sees `a`
                scope[name] = _ColumnInfo(expr.type, False)
            if not self.at_punct(","):
                break
            self.advance()
        return tuple(assignments)

    def assignment_name(self) -> str | None:
        token = self.peek()
        following = self.peek(1)
        if token.kind == IDENT and following.kind == PUNCT and following.value == "=":
            if token.value.startswith("!") or token.value in _KEYWORDS:
                raise self.error(token, f"invalid column name '{token.value}'")
            self.advance()
            self.advance()
            return str(token.value)
        return None

    def auto_name(self) -> str:
        self.auto_names += 1
        return f"Column{self.auto_names}"

    def parse_summarize(self, schema: dict[str, _ColumnInfo]) -> SummarizeStage:
        aggregates: list[Aggregate] = []
        names: list[tuple[str, Token]] = []
        token = self.peek()
        if token.kind == EOF or token.kind == PUNCT and token.value in ("|", ";"):
            raise self.error(token, "summarize needs an aggregate or a by clause")
        stars: list[int] = []  # aggregates written arg_max(X, *): their columns are known after `by`
        if not self.at_word("by"):
            while True:
                start = self.peek()
                aggregate, star = self.parse_aggregate(schema)
                if star:
                    stars.append(len(aggregates))
                aggregates.append(aggregate)
                names.append((aggregate.name, start))
                names.extend((extra, start) for extra, _ in aggregate.extras)
                if not self.at_punct(","):
                    break
                self.advance()
        by: list[tuple[str, Expr]] = []
        by_names: list[tuple[str, Token]] = []
        if self.at_word("by"):
            self.advance()
            while True:
                start = self.peek()
                name = self.assignment_name()
                expr = self.parse_expr(schema)
                if expr.type == "dynamic":
                    raise KqlError(expr.line, expr.column, "cannot group by a dynamic value")
                if name is None:
                    name = _default_name(expr) or self.auto_name()
                by.append((name, expr))
                by_names.append((name, start))
                if not self.at_punct(","):
                    break
                self.advance()
        taken = {name for name, _ in by_names} | {name for name, _ in names}
        for index in stars:  # `*`: every input column not already in the output, in input order
            aggregate = aggregates[index]
            star_token = next(token for name, token in names if name == aggregate.name)
            extras = aggregate.extras + self.columns_as_assignments(
                schema, [column for column in schema if column not in taken], star_token
            )
            taken.update(name for name, _ in extras)
            aggregates[index] = replace(aggregate, extras=extras)
        seen: set[str] = set()
        for name, token in by_names + names:
            if name in seen:
                raise self.error(token, f"duplicate column name '{name}' in summarize")
            seen.add(name)
        schema.clear()
        for name, expr in by:
            schema[name] = _ColumnInfo(expr.type, False)
        for aggregate in aggregates:
            schema[aggregate.name] = _ColumnInfo(_aggregate_type(aggregate), False)
            for extra, expr in aggregate.extras:
                schema[extra] = _ColumnInfo(expr.type, False)
        return SummarizeStage(tuple(aggregates), tuple(by))

    def parse_arg_extreme(
        self, schema: dict[str, _ColumnInfo], name: str | None, token: Token
    ) -> tuple[Aggregate, bool]:
        """arg_max(Expr, *) / arg_min(Expr, Col, Name = Expr, ...): the row with the extreme Expr."""
        func = token.value
        arg = self.parse_expr(schema)
        if arg.type == "dynamic" or arg.type not in ORDERED | {"bool"}:
            raise KqlError(arg.line, arg.column, f"{func}() cannot order {arg.type} values")
        extras: list[tuple[str, Expr]] = []
        star = False
        while self.at_punct(","):
            self.advance()
            if self.at_punct("*"):
                self.advance()
                star = True
                continue
            extra_name = self.assignment_name()
            expr = self.parse_expr(schema)
            extras.append((extra_name or _default_name(expr) or self.auto_name(), expr))
        self.expect_punct(")", f"to close {func}(")
        if not extras and not star:
            raise self.error(token, f"{func}() needs the columns to return, e.g. {func}({arg.text}, *)")
        if name is None:
            name = _default_name(arg) or AGGREGATES[func] + self.auto_name()
        return Aggregate(name, func, arg, None, tuple(extras)), star

    def parse_aggregate(self, schema: dict[str, _ColumnInfo]) -> tuple[Aggregate, bool]:
        name = self.assignment_name()
        token = self.peek()
        following = self.peek(1)
        if token.kind != IDENT or not (following.kind == PUNCT and following.value == "("):
            raise self.error(token, f"expected an aggregate function such as count(), found {describe(token)}")
        func = token.value
        if func not in AGGREGATES:
            raise self.error(token, f"unsupported aggregate function '{func}'")
        self.advance()
        self.advance()  # (
        if func in ("arg_max", "arg_min"):
            return self.parse_arg_extreme(schema, name, token)
        args: list[Expr] = []
        if not self.at_punct(")"):
            while True:
                args.append(self.parse_expr(schema))
                if not self.at_punct(","):
                    break
                self.advance()
        self.expect_punct(")", f"to close {func}(")
        arg: Expr | None = None
        max_size: int | None = None
        if func == "count":
            if args:
                raise KqlError(args[0].line, args[0].column, "count() takes no arguments")
        else:
            limit = 2 if func in ("dcount", "make_set") else 1
            if not args or len(args) > limit:
                raise self.error(token, f"{func}() takes {'1 or 2 arguments' if limit == 2 else '1 argument'}")
            arg = args[0]
            if arg.type == "dynamic":
                raise KqlError(arg.line, arg.column, f"{func}() of a dynamic value is not supported")
            if len(args) == 2:
                extra = args[1]
                if not (isinstance(extra, Const) and isinstance(extra.value, int) and extra.type in NUMERIC):
                    raise KqlError(extra.line, extra.column, f"the second argument of {func}() must be an integer")
                if func == "make_set":
                    if extra.value < 1:
                        raise KqlError(extra.line, extra.column, "make_set() size limit must be positive")
                    max_size = extra.value
        if name is None:
            suffix = arg.name if isinstance(arg, Column) else ""
            name = AGGREGATES[func] + suffix
        return Aggregate(name, func, arg, max_size), False

    # --- scalar expressions ---------------------------------------------------------------------------

    def nest(self, token: Token) -> None:
        """Enter one level of nesting; past MAX_NESTING it is a load error, never a RecursionError."""
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise self.error(token, f"expression nested deeper than {MAX_NESTING} levels")

    def parse_expr(self, scope: Mapping[str, _ColumnInfo]) -> Expr:
        self.nest(self.peek())
        try:
            return self.parse_or(scope)
        finally:
            self.depth -= 1

    def logical(
        self, scope: Mapping[str, _ColumnInfo], word: str, sub: Callable[[Mapping[str, _ColumnInfo]], Expr]
    ) -> Expr:
        start = self.peek()
        items = [sub(scope)]
        while self.at_word(word):
            operator = self.advance()
            items.append(sub(scope))
            if len(items) == 2:
                self.check_bool(items[0], operator)
            self.check_bool(items[-1], operator)
        if len(items) == 1:
            return items[0]
        node_type = And if word == "and" else Or
        return node_type("bool", self.source(start), start.line, start.column, tuple(items))

    @staticmethod
    def check_bool(item: Expr, operator: Token) -> None:
        if item.type != "bool":
            raise KqlError(item.line, item.column, f"'{operator.value}' needs bool operands, got {item.type}")

    def parse_or(self, scope: Mapping[str, _ColumnInfo]) -> Expr:
        return self.logical(scope, "or", self.parse_and)

    def parse_and(self, scope: Mapping[str, _ColumnInfo]) -> Expr:
        return self.logical(scope, "and", self.parse_predicate)

    def parse_predicate(self, scope: Mapping[str, _ColumnInfo]) -> Expr:
        start = self.peek()
        left = self.parse_additive(scope)
        token = self.peek()
        op: str | None = None
        if token.kind == PUNCT and token.value in ("==", "!=", "=~", "!~", "<", "<=", ">", ">="):
            op = token.value
        elif token.kind == PUNCT and token.value == "<>":
            raise self.error(token, "unsupported operator '<>' (use '!=')")
        elif token.kind == PUNCT and token.value == "=":
            raise self.error(token, "unexpected '=' (use '==' to compare)")
        elif token.kind == IDENT:
            if token.value in STRING_OPS | LIST_OPS | RANGE_OPS:
                op = token.value
            else:
                self.reject_word_operator()
        if op is None:
            return left
        self.advance()
        if op in LIST_OPS:
            args = self.parse_list(scope, op, token)
        elif op in RANGE_OPS:
            args = self.parse_range(scope, op)
        else:
            args = (self.parse_additive(scope),)
        self.check_compare(op, left, args, token)
        self.reject_word_operator()
        return Compare("bool", self.source(start), start.line, start.column, op, left, args)

    def reject_word_operator(self) -> None:
        """A word right after an operand is an operator we do not support (`matches`, `has_cs`, `AND`)."""
        token = self.peek()
        if token.kind != IDENT or token.value in _FOLLOW_WORDS or token.value in self.tabular_lets:
            return  # a table or `let` here means a missing ';', which the statement parser reports
        raise self.error(token, f"unsupported operator '{token.value}'")

    def parse_list(self, scope: Mapping[str, _ColumnInfo], op: str, op_token: Token) -> tuple[Expr, ...]:
        self.expect_punct("(", f"after '{op}'")
        items: list[Expr] = []
        if not self.at_punct(")"):
            while True:
                item = self.parse_additive(scope)
                if not isinstance(item, Const):
                    raise KqlError(item.line, item.column, f"the list of '{op}' must hold constants")
                if item.type == "dynamic":
                    for value in item.value:
                        items.append(Const(_type_of(value), repr(value), item.line, item.column, value))
                else:
                    items.append(item)
                if not self.at_punct(","):
                    break
                self.advance()
        self.expect_punct(")", f"to close the list of '{op}'")
        if not items:
            raise self.error(op_token, f"empty list after '{op}'")
        return tuple(items)

    def parse_range(self, scope: Mapping[str, _ColumnInfo], op: str) -> tuple[Expr, ...]:
        self.expect_punct("(", f"after '{op}'")
        low = self.parse_additive(scope)
        self.expect_punct("..", f"between the bounds of '{op}'")
        high = self.parse_additive(scope)
        self.expect_punct(")", f"to close '{op}'")
        return (low, high)

    def check_compare(self, op: str, left: Expr, args: tuple[Expr, ...], token: Token) -> None:
        def fail(node: Expr | Token, message: str) -> KqlError:
            return KqlError(node.line, node.column, message)

        if left.type == "dynamic":
            raise fail(left, f"operator '{op}' on a dynamic value is not supported")
        if op in STRING_OPS or op in _CASELESS_LIST_OPS:
            if left.type != "string":
                raise fail(left, f"operator '{op}' needs a string on the left, got {left.type}")
            for arg in args:
                if arg.type != "string":
                    raise fail(arg, f"operator '{op}' needs string patterns, got {arg.type}")
        elif op in RANGE_OPS:
            if _family(left.type) not in ("number", "datetime", "timespan"):
                raise fail(left, f"operator '{op}' needs a number, datetime or timespan, got {left.type}")
            low, high = args
            if not _comparable(left.type, low.type) or _family(low.type) == "bool":
                raise fail(low, f"cannot compare {left.type} with {low.type} in '{op}'")
            if not (_family(high.type) == _family(left.type) or (left.type == "datetime" and high.type == "timespan")):
                raise fail(high, f"cannot compare {left.type} with {high.type} in '{op}'")
        elif op in ORDER_OPS:
            if left.type not in ORDERED:
                raise fail(left, f"operator '{op}' cannot order {left.type} values")
            if _family(args[0].type) != _family(left.type):
                raise fail(args[0], f"cannot compare {left.type} with {args[0].type}")
        else:  # == != in !in
            for arg in args:
                if not _comparable(left.type, arg.type):
                    raise fail(arg, f"cannot compare {left.type} with {arg.type}")
        if op in _TERM_OPS:
            for arg in args:
                if isinstance(arg, Const) and isinstance(arg.value, str) and not term_key(arg.value):
                    raise fail(arg, f"pattern {arg.value!r} has no letters or digits, so '{op}' can never match it")

    def parse_additive(self, scope: Mapping[str, _ColumnInfo]) -> Expr:
        start = self.peek()
        left = self.parse_unary(scope)
        chain = 0
        while self.at_punct("+") or self.at_punct("-"):
            operator = self.advance()
            chain += 1  # `a + b + c ...` builds a left-deep tree: each operator is one level
            if self.depth + chain > MAX_NESTING:
                raise self.error(operator, f"expression nested deeper than {MAX_NESTING} levels")
            right = self.parse_unary(scope)
            result_type = _arith_type(operator.value, left.type, right.type)
            if result_type is None:
                raise self.error(operator, f"cannot apply '{operator.value}' to {left.type} and {right.type}")
            node: Expr = Arith(result_type, self.source(start), start.line, start.column, operator.value, left, right)
            left = _fold(node)
        return left

    def parse_unary(self, scope: Mapping[str, _ColumnInfo]) -> Expr:
        token = self.peek()
        if token.kind == PUNCT and token.value == "-":
            self.advance()
            self.nest(token)
            try:
                operand = self.parse_unary(scope)
            finally:
                self.depth -= 1
            if _family(operand.type) not in ("number", "timespan"):
                raise self.error(token, f"cannot negate a {operand.type}")
            return _fold(Neg(operand.type, self.source(token), token.line, token.column, operand))
        return self.parse_primary(scope)

    def parse_primary(self, scope: Mapping[str, _ColumnInfo]) -> Expr:
        token = self.peek()
        if token.kind in (STRING, NUMBER, TIMESPAN, DATETIME):
            self.advance()
            kql_type = {STRING: "string", TIMESPAN: "timespan", DATETIME: "datetime"}.get(token.kind)
            if kql_type is None:
                kql_type = "real" if isinstance(token.value, float) else "long"
            return Const(kql_type, token.text, token.line, token.column, token.value)
        if token.kind == PUNCT and token.value == "(":
            self.advance()
            inner = self.parse_expr(scope)
            self.expect_punct(")", "to close '('")
            return inner
        if token.kind == IDENT:
            following = self.peek(1)
            if following.kind == PUNCT and following.value == "(":
                return self.parse_call(scope)
            name = token.value
            if name in _BOOL_WORDS:
                self.advance()
                return Const("bool", token.text, token.line, token.column, _BOOL_WORDS[name])
            if name not in scope and name in TIME_ALIASES and scope.get(TIME_ALIASES[name], _NO_COLUMN).base:
                name = TIME_ALIASES[name]  # TimeGenerated reads Timestamp; its text keeps the alias
            if name in scope:
                self.advance()
                info = scope[name]
                if info.base:
                    self.columns_used.add(name)
                return Column(info.type, token.text, token.line, token.column, name)
            if name in self.scalar_lets:
                self.advance()
                return self.scalar_lets[name]
            if name in self.tabular_lets or name == TABLE:
                raise self.error(token, f"'{name}' is a table, not a scalar")
            if name.startswith("!") or name in _KEYWORDS:
                raise self.error(token, f"unexpected '{name}'")
            raise self.error(token, f"unknown column '{name}'")
        raise self.error(token, f"unexpected {describe(token)}")

    def parse_call(self, scope: Mapping[str, _ColumnInfo]) -> Expr:
        name_token = self.advance()
        name = name_token.value
        if name in AGGREGATES:
            raise self.error(name_token, f"aggregate function '{name}' is only allowed in summarize")
        if name not in _SCALAR_FUNCTIONS:
            raise self.error(name_token, f"unsupported function '{name}'")
        self.advance()  # (
        if name == "dynamic":
            return self.parse_dynamic(name_token)
        if name == "datatable":
            return self.parse_datatable(name_token)
        args: list[Expr] = []
        if not self.at_punct(")"):
            while True:
                if len(args) == MAX_CALL_ARGS:
                    raise self.error(self.peek(), f"{name}() takes at most {MAX_CALL_ARGS} arguments")
                args.append(self.parse_expr(scope))
                if not self.at_punct(","):
                    break
                self.advance()
        self.expect_punct(")", f"to close {name}(")
        text = self.source(name_token)
        line, column = name_token.line, name_token.column

        def arity(low: int, high: int) -> None:
            if not low <= len(args) <= high:
                count = str(low) if low == high else f"{low} to {high}"
                raise self.error(name_token, f"{name}() takes {count} argument{'s' if high != 1 else ''}")

        if name == "now":
            arity(0, 1)
            offset = args[0] if args else None
            if offset is not None and (offset.type != "timespan" or not is_row_independent(offset)):
                raise KqlError(offset.line, offset.column, "now() takes a constant timespan offset")
            return Now("datetime", text, line, column, offset)
        if name == "ago":
            arity(1, 1)
            if args[0].type != "timespan" or not is_row_independent(args[0]):
                raise KqlError(args[0].line, args[0].column, "ago() takes a constant timespan")
            return Ago("datetime", text, line, column, args[0])
        if name in CALL_FUNCTIONS:
            return self.check_call("iff" if name == "iif" else name, name_token, tuple(args), text, arity)
        if name == "not":
            arity(1, 1)
            if args[0].type != "bool":
                raise KqlError(args[0].line, args[0].column, f"not() needs a bool, got {args[0].type}")
            return Not("bool", text, line, column, args[0])
        arity(1, 1)  # isempty, isnotempty, isnull, isnotnull
        return EmptyTest("bool", text, line, column, name, args[0])

    def check_call(
        self, func: str, token: Token, args: tuple[Expr, ...], text: str, arity: Callable[[int, int], None]
    ) -> Expr:
        def fail(node: Expr, message: str) -> KqlError:
            return KqlError(node.line, node.column, message)

        for arg in args:
            if arg.type == "dynamic":
                raise fail(arg, f"{token.value}() of a dynamic value is not supported")
        if func in ("tolower", "toupper", "strlen"):
            arity(1, 1)
            if args[0].type != "string":
                raise fail(args[0], f"{func}() needs a string, got {args[0].type}")
            result = "long" if func == "strlen" else "string"
        elif func == "tostring":
            arity(1, 1)
            result = "string"
        elif func == "strcat":
            arity(1, MAX_CALL_ARGS)
            result = "string"
        elif func == "iff":
            arity(3, 3)
            condition, then, otherwise = args
            if condition.type != "bool":
                raise fail(condition, f"{token.value}() needs a bool condition, got {condition.type}")
            if _family(then.type) != _family(otherwise.type):
                raise fail(otherwise, f"{token.value}() branches differ in type: {then.type} and {otherwise.type}")
            mixed_numbers = then.type != otherwise.type and "real" in (then.type, otherwise.type)
            result = "real" if mixed_numbers else then.type
        else:  # bin
            arity(2, 2)
            value, size = args
            if _family(value.type) not in ("number", "datetime", "timespan"):
                raise fail(value, f"bin() needs a number, datetime or timespan, got {value.type}")
            wanted = "number" if _family(value.type) == "number" else "timespan"
            if not isinstance(size, Const) or _family(size.type) != wanted:
                raise fail(size, f"bin() of a {value.type} needs a constant {wanted} bin size")
            if size.value is None or size.value <= (0 if wanted == "number" else timedelta(0)):
                raise fail(size, "bin() size must be positive")
            result = value.type
        return Call(result, text, token.line, token.column, func, args)

    def parse_datatable(self, name_token: Token) -> Expr:
        """`datatable(Name: type)[v1, v2, ...]`: a one-column table, usable as a list (`in`, `has_any`)."""
        columns: list[Token] = []
        while True:
            columns.append(self.expect_ident("in datatable(...)"))
            self.expect_punct(":", "after a datatable column name")
            self.expect_ident("for a datatable column type")
            if not self.at_punct(","):
                break
            self.advance()
        self.expect_punct(")", "to close datatable(")
        if len(columns) != 1:
            raise self.error(columns[1], "only a one-column datatable is supported (as a list for in / has_any)")
        self.expect_punct("[", "after datatable(...)")
        values = self.parse_constants("]", "datatable")
        return Const("dynamic", self.source(name_token), name_token.line, name_token.column, tuple(values))

    def parse_constants(self, closing: str, context: str) -> list[Any]:
        values: list[Any] = []
        if not self.at_punct(closing):
            while True:
                if len(values) == MAX_LIST_ITEMS:
                    raise self.error(self.peek(), f"more than {MAX_LIST_ITEMS} items in {context}")
                item = self.parse_unary({})
                if not isinstance(item, Const) or item.type == "dynamic":
                    raise KqlError(item.line, item.column, f"{context} may only hold scalar constants")
                values.append(item.value)
                if not self.at_punct(","):
                    break
                self.advance()
        self.expect_punct(closing, f"to close the {context} values")
        return values

    def parse_dynamic(self, name_token: Token) -> Expr:
        self.expect_punct("[", "in dynamic(...): only arrays of constants are supported")
        values: list[Any] = []
        if not self.at_punct("]"):
            while True:
                item = self.parse_unary({})
                if not isinstance(item, Const) or item.type == "dynamic":
                    raise KqlError(item.line, item.column, "dynamic([...]) may only hold scalar constants")
                values.append(item.value)
                if not self.at_punct(","):
                    break
                self.advance()
        self.expect_punct("]", "to close the dynamic array")
        self.expect_punct(")", "to close dynamic(")
        return Const("dynamic", self.source(name_token), name_token.line, name_token.column, tuple(values))


def _default_name(expr: Expr) -> str | None:
    """The column name Kusto gives an unnamed expression: a column's own, `bin(Col, ..)` -> Col."""
    if isinstance(expr, Column):
        return expr.text
    if isinstance(expr, Call) and expr.func == "bin" and isinstance(expr.args[0], Column):
        return expr.args[0].text
    return None


def _type_of(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "long"
    if isinstance(value, float):
        return "real"
    if isinstance(value, str):
        return "string"
    if isinstance(value, datetime):
        return "datetime"
    if isinstance(value, timedelta):
        return "timespan"
    return "dynamic"


def _arith_type(op: str, left: str, right: str) -> str | None:
    lf, rf = _family(left), _family(right)
    if lf == "number" and rf == "number":
        return "real" if "real" in (left, right) else "long"
    if lf == "timespan" and rf == "timespan":
        return "timespan"
    if lf == "datetime" and rf == "timespan":
        return "datetime"
    if op == "+" and lf == "timespan" and rf == "datetime":
        return "datetime"
    if op == "-" and lf == "datetime" and rf == "datetime":
        return "timespan"
    return None


def _fold(node: Expr) -> Expr:
    """Evaluate arithmetic on constants at parse time."""
    if isinstance(node, Neg) and isinstance(node.operand, Const):
        value = node.operand.value
        return Const(node.type, node.text, node.line, node.column, None if value is None else -value)
    if isinstance(node, Arith) and isinstance(node.left, Const) and isinstance(node.right, Const):
        left, right = node.left.value, node.right.value
        if left is None or right is None:
            return Const(node.type, node.text, node.line, node.column, None)
        return Const(node.type, node.text, node.line, node.column, left + right if node.op == "+" else left - right)
    return node


def _aggregate_type(aggregate: Aggregate) -> str:
    if aggregate.func in ("count", "dcount"):
        return "long"
    if aggregate.func == "make_set":
        return "dynamic"
    assert aggregate.arg is not None
    return aggregate.arg.type


def describe(token: Token) -> str:
    if token.kind == EOF:
        return "end of query"
    if token.kind == STRING:
        return f"string {token.text}"
    return f"'{token.text}'"


def parse_kql(text: str) -> ParsedQuery:
    """Parse and type-check query text. Raises KqlError."""
    return _Parser(text).parse()

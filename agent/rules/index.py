"""An index of the rules' terms, so that a row is evaluated only against the rules it can match.

For each rule, `anchor_terms` derives from the query a set of (column, term) pairs of which at
least one must occur in a row that passes the rule's row filter: a necessary condition, never a
sufficient one. `RuleIndex.candidates(row)` returns the rules whose anchors occur among the row's
terms (split and folded exactly as `has` splits them, agent.rules.terms), plus every rule that has
no anchor. Evaluating only the candidates gives exactly the results of evaluating every rule;
tests/rules/test_rule_index.py checks that on every shipped rule, every fixture and random rows.

Anchors come from the `where` stages that read the table directly (those before the first
extend, project or other operator), from the positive operators whose match implies a whole term:

- `has 'A B'`, `has_all (...)`: any one of the pattern's terms (the longest is taken);
- `has_any (...)`, `in (...)`, `in~ (...)`: one term of each item (all items must have terms);
- `==`, `=~` with a constant: one of the constant's terms (none if it has no terms);
- `contains`, `startswith`, `endswith`: a term strictly inside the pattern (bounded by
  separators on both sides within the pattern), if there is one;
- `and`: the smallest anchor set of its operands; `or`: the union, if every operand has one.

Anything else (negations, `!has`, comparisons of numbers or dates, functions) gives no anchor,
and a rule without an anchor is a candidate for every row. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar

from agent.rules.kql_parser import And, Column, Compare, Const, Expr, Or, ParsedQuery, WhereStage
from agent.rules.terms import term_key

__all__ = ["Anchors", "anchor_terms", "RuleIndex"]

Anchors = frozenset[tuple[str, str]]  # (table column, folded term)

_WHOLE_VALUE_OPS = frozenset({"==", "=~", "in", "in~"})
_LIST_ANY_OPS = frozenset({"has_any", "in", "in~"})
_SUBSTRING_OPS = frozenset({"contains", "startswith", "endswith"})


def _terms(text: str) -> list[str]:
    return term_key(text).split()


def _best(terms: list[str]) -> str | None:
    """The longest term (long terms are rare in other rows), first on ties."""
    return max(terms, key=len) if terms else None


def _inner_term(pattern: str) -> str | None:
    """A term of `pattern` that is bounded by separators inside the pattern itself.

    Such a term is a whole term of any value that contains the pattern. The terms at the ends of
    the pattern may be parts of longer terms of the value (`'Desk Soft'` is in `AnyDesk Software`).
    """
    key_terms = _terms(pattern)
    if len(key_terms) < 3:
        return None
    return _best(key_terms[1:-1])


def _compare_anchors(expr: Compare, base: frozenset[str]) -> Anchors | None:
    left = expr.left
    if not isinstance(left, Column) or left.name not in base or left.type != "string":
        return None
    if not all(isinstance(arg, Const) and isinstance(arg.value, str) for arg in expr.args):
        return None
    patterns = [arg.value for arg in expr.args if isinstance(arg, Const)]
    column = left.name
    op = expr.op
    if op == "has" or op == "has_all":
        term = _best([term for pattern in patterns for term in _terms(pattern)])
        return frozenset({(column, term)}) if term else None
    if op in _LIST_ANY_OPS or op in _WHOLE_VALUE_OPS:
        chosen: set[tuple[str, str]] = set()
        for pattern in patterns:
            term = _best(_terms(pattern))
            if term is None:  # '' or '--': a row with no terms can match it
                return None
            chosen.add((column, term))
        return frozenset(chosen)
    if op in _SUBSTRING_OPS:
        term = _inner_term(patterns[0])
        return frozenset({(column, term)}) if term else None
    return None  # negated operators, between, ordering


def _anchors(expr: Expr, base: frozenset[str]) -> Anchors | None:
    if isinstance(expr, Compare):
        return _compare_anchors(expr, base)
    if isinstance(expr, And):
        found = [anchors for item in expr.items if (anchors := _anchors(item, base)) is not None]
        return min(found, key=len) if found else None
    if isinstance(expr, Or):
        union: set[tuple[str, str]] = set()
        for item in expr.items:
            anchors = _anchors(item, base)
            if anchors is None:
                return None
            union |= anchors
        return frozenset(union)
    return None


def anchor_terms(parsed: ParsedQuery, base_columns: frozenset[str]) -> Anchors | None:
    """(column, term) pairs one of which occurs in every row the row filter keeps; None: no such set."""
    found: list[Anchors] = []
    for stage in parsed.stages:
        if not isinstance(stage, WhereStage):
            break  # after an extend or project a name may no longer read the table column
        anchors = _anchors(stage.predicate, base_columns)
        if anchors is not None:
            found.append(anchors)
    return min(found, key=len) if found else None


class _HasQuery(Protocol):
    @property
    def query(self) -> Any: ...


R = TypeVar("R", bound=_HasQuery)


class RuleIndex(Generic[R]):
    """Rules by the terms they need; `candidates(row)` keeps rule order.

    Each rule needs a `query` with an `anchors` attribute (agent.rules.loader.Rule has one).
    """

    def __init__(self, rules: Sequence[R]) -> None:
        self.rules: tuple[R, ...] = tuple(rules)
        self.always: tuple[int, ...] = ()
        self.by_column: dict[str, dict[str, list[int]]] = {}
        always: list[int] = []
        for position, rule in enumerate(self.rules):
            anchors: Anchors | None = rule.query.anchors
            if anchors is None:
                always.append(position)
                continue
            for column, term in sorted(anchors):
                self.by_column.setdefault(column, {}).setdefault(term, []).append(position)
        self.always = tuple(always)

    @property
    def indexed(self) -> int:
        """How many rules have anchors (the others are evaluated for every row)."""
        return len(self.rules) - len(self.always)

    def candidates(self, row: Mapping[str, Any]) -> list[R]:
        """The rules whose row filter may keep `row`: every rule that would keep it is among them."""
        hits: set[int] = set(self.always)
        for column, terms in self.by_column.items():
            value = row.get(column)
            if not isinstance(value, str) or not value:
                continue
            for term in term_key(value).split():
                positions = terms.get(term)
                if positions:
                    hits.update(positions)
        return [self.rules[position] for position in sorted(hits)]

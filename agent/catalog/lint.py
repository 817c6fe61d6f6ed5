"""Catalog lint: rules that an attacker defeats by renaming the file.

A rule that narrows a broad vendor signer by ``FileName`` (or ``FolderPath``) alone misses the
same signed binary renamed to ``update.exe``. The signed version info (``VersionInfo*`` columns)
and the signature's ``ProgramName`` sit inside the Authenticode digest and survive a rename.

The check works on the rule's ``where`` predicates in disjunctive normal form: a conjunction that
holds an attacker-controlled condition is fine only if the same conjunction, with that condition
swapped for a signed qualifier, is also a way for the rule to fire. So
``Signer has 'X' and (FileName =~ 'a.exe' or VersionInfoOriginalFileName =~ 'a.exe')`` passes,
and ``Signer has 'X' and FileName =~ 'a.exe'`` is flagged. A rule on the signer alone is not
flagged: it has no qualifier to defeat.

``explain_attacker_controlled(query_text)`` is the entry point for ``rules check`` (a warning) and
``make catalog-report`` (the count; the goal is 0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from agent.rules import kql_parser
from agent.rules.loader import Rule

ATTACKER_CONTROLLED = frozenset({"FileName", "FolderPath"})
# Columns that neither qualify nor weaken: the time window and the device.
_NEUTRAL = frozenset({"Timestamp", "TimeGenerated", "DeviceId", "DeviceName", "ReportId"})
_SIGNER = frozenset({"Signer", "SignerHash", "SignerSubject"})
MAX_CLAUSES = 4096


def _columns(node: Any) -> frozenset[str]:
    """Table columns an expression reads (any node type: walks dataclass fields)."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, kql_parser.Column):
            found.add(value.name)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for item in dataclasses.fields(value):
                walk(getattr(value, item.name))
        elif isinstance(value, (tuple, list)):
            for item in value:
                walk(item)

    walk(node)
    return frozenset(found)


def _dnf(expr: Any) -> list[frozenset[Any]]:
    """Clauses (sets of atoms) whose disjunction is ``expr``; And/Or are expanded, anything else is an atom."""
    name = type(expr).__name__
    if name == "Or":
        out: list[frozenset[Any]] = []
        for item in expr.items:
            out.extend(_dnf(item))
        return out
    if name == "And":
        clauses: list[frozenset[Any]] = [frozenset()]
        for item in expr.items:
            clauses = [a | b for a in clauses for b in _dnf(item)]
            if len(clauses) > MAX_CLAUSES:
                raise ValueError("predicate too complex to check")
        return clauses
    return [frozenset({expr})]


def _where_predicates(parsed: Any) -> Iterator[Any]:
    for stage in parsed.stages:
        if type(stage).__name__ == "WhereStage":
            yield stage.predicate


def parse_attacker_controlled(parsed: Any) -> str | None:
    """Why a parsed query's firing depends on an attacker-controlled column alone, or None (pure)."""
    clauses: list[frozenset[Any]] = [frozenset()]
    for predicate in _where_predicates(parsed):
        clauses = [a | b for a in clauses for b in _dnf(predicate)]
        if len(clauses) > MAX_CLAUSES:
            raise ValueError("predicate too complex to check")
    columns = {atom: _columns(atom) for clause in clauses for atom in clause}
    for clause in clauses:
        weak = [atom for atom in clause if columns[atom] and columns[atom] <= ATTACKER_CONTROLLED]
        if not weak:
            continue
        rest = clause - set(weak)
        if not _columns_of(rest, columns) & _SIGNER:
            continue  # not narrowing a signer: the lint is about signer qualifiers
        if any(
            rest <= other and _qualifies(other - rest, columns) for other in clauses if not _weak_in(other, columns)
        ):
            continue
        texts = ", ".join(sorted(getattr(atom, "text", str(atom)) for atom in weak))
        return f"the only qualifier besides the signer is attacker-controlled ({texts}); add a signed attribute"
    return None


def _columns_of(atoms: Iterable[Any], columns: dict[Any, frozenset[str]]) -> frozenset[str]:
    out: set[str] = set()
    for atom in atoms:
        out |= columns[atom]
    return frozenset(out)


def _weak_in(clause: frozenset[Any], columns: dict[Any, frozenset[str]]) -> bool:
    return any(columns[atom] and columns[atom] <= ATTACKER_CONTROLLED for atom in clause)


def _qualifies(extra: frozenset[Any], columns: dict[Any, frozenset[str]]) -> bool:
    """The extra atoms of a clause hold a signed qualifier (a column other than signer, time, device)."""
    cols = _columns_of(extra, columns) - _NEUTRAL - ATTACKER_CONTROLLED
    return bool(cols)


def explain_attacker_controlled(query_text: str) -> str | None:
    """For ``rules check``: a warning text if the query depends only on FileName/FolderPath to narrow
    its signer, else None. Never raises (a query that does not parse is the loader's error)."""
    try:
        return parse_attacker_controlled(kql_parser.parse_kql(query_text))
    except Exception as exc:  # the loader reports parse errors; here only the status matters
        return f"not checked: {exc}"


def attacker_controlled_rules(rules: Sequence[Rule]) -> list[tuple[Rule, str]]:
    """(rule, reason) for every rule flagged by the lint (the goal is none)."""
    out = []
    for rule in rules:
        reason = explain_attacker_controlled(rule.query.text)
        if reason is not None:
            out.append((rule, reason))
    return out

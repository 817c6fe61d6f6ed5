"""RuleIndex never changes a result: every rule that keeps a row is among the row's candidates
(issue 12, Rules). Checked on every shipped rule with every fixture's rows, the real vendor
signers and random rows, and on random queries."""

from __future__ import annotations

import io
import random
from datetime import UTC, datetime
from typing import Any

import pytest

from agent.extract.authenticode import extract_stream
from agent.resources import shipped_rules_dir
from agent.rows import Device, build_rows
from agent.rules.index import RuleIndex, anchor_terms
from agent.rules.kql import parse_query
from agent.rules.kql_parser import parse_kql
from agent.rules.loader import load_rules
from agent.schema import COLUMN_TYPES
from tests.conftest import FIXTURES
from tests.rules.rules_refdata import signer_rows

NOW = datetime(2026, 1, 1, tzinfo=UTC)
T = "DeviceFileCertificateInfo"
PUNCTUATION = [" ", ", ", ". ", "-", "_", "(", ")", "/", " & "]


def firing(rules: Any, row: dict[str, Any]) -> list[str]:
    return [rule.id for rule in rules if rule.query.filter_row(row, now=NOW) is not None]


def assert_same_results(index: RuleIndex[Any], rows: list[dict[str, Any]]) -> int:
    """Every row gets the same firing rules from its candidates as from all rules; returns the candidates seen."""
    seen = 0
    for row in rows:
        candidates = index.candidates(row)
        seen += len(candidates)
        assert firing(candidates, row) == firing(index.rules, row), row
    return seen


@pytest.fixture(scope="module")
def shipped() -> RuleIndex[Any]:
    ruleset = load_rules([shipped_rules_dir()])
    assert not ruleset.problems
    return RuleIndex(ruleset.rules)


def fixture_rows() -> list[dict[str, Any]]:
    device = Device("0" * 40, "ws01.example.org")
    rows: list[dict[str, Any]] = []
    for path in sorted(p for p in (FIXTURES / "files").rglob("*") if p.is_file()):
        data = path.read_bytes()
        facts = extract_stream(io.BytesIO(data), len(data), verifier=None)
        rows.extend(build_rows(facts, str(path), device, NOW, "scan"))
    return rows


def pattern_words(index: RuleIndex[Any]) -> list[str]:
    words = sorted({str(pattern) for rule in index.rules for _, _, pattern in rule.query.string_patterns})
    return words + ["Microsoft Corporation", "Simon Tatham", "win.rar GmbH", "DWSNET OÜ", "TEKNOPARS BİLİŞİM"]


def mutate(rng: random.Random, text: str) -> str:
    """Change case, punctuation and spacing, cut or glue words: the ways a signer name varies."""
    words = text.replace(",", " ").replace(".", " ").split()
    choice = rng.randrange(6)
    if choice == 0:
        words = [word.upper() if rng.random() < 0.5 else word.lower() for word in words]
    elif choice == 1 and words:
        words = words[: rng.randint(1, len(words))]
    elif choice == 2 and len(words) > 1:
        cut = rng.randrange(1, len(words))
        words = words[: cut - 1] + [words[cut - 1] + words[cut]] + words[cut + 1 :]
    elif choice == 3 and words:
        word = rng.randrange(len(words))
        words[word] = words[word][: max(1, len(words[word]) - 2)]
    elif choice == 4:
        words = ["X" + rng.choice(words)] + words if words else words
    return "".join(word + rng.choice(PUNCTUATION) for word in words).strip()


def test_the_shipped_catalog_is_indexed(shipped: RuleIndex[Any]) -> None:
    assert shipped.indexed == len(shipped.rules) >= 100
    assert len(shipped.candidates({"Signer": "Microsoft Corporation"})) <= 5
    anydesk = shipped.candidates({"Signer": "AnyDesk Software GmbH", "Issuer": "x"})
    assert 1 <= len(anydesk) <= 20 and any("AnyDesk" in rule.name for rule in anydesk)


def test_index_keeps_every_result_on_fixture_rows(shipped: RuleIndex[Any]) -> None:
    rows = fixture_rows()
    assert len(rows) >= 15 and any(firing(shipped.rules, row) for row in rows)
    assert_same_results(shipped, rows)


def test_index_keeps_every_result_on_real_vendor_signers(shipped: RuleIndex[Any]) -> None:
    base = fixture_rows()[0]
    rows = [base | {"Signer": entry["signer"], "Issuer": entry.get("issuer", "")} for entry in signer_rows()]
    assert len(rows) >= 50 and sum(bool(firing(shipped.rules, row)) for row in rows) >= 20
    assert_same_results(shipped, rows)


def test_index_keeps_every_result_on_random_rows(shipped: RuleIndex[Any]) -> None:
    rng = random.Random(12)
    words = pattern_words(shipped)
    base = fixture_rows()[0]
    rows: list[dict[str, Any]] = []
    for _ in range(1200):
        row = dict(base)
        for column in ("Signer", "Issuer", "FileName", "ProgramName", "VersionInfoProductName"):
            if rng.random() < 0.7:
                row[column] = mutate(rng, " ".join(rng.sample(words, rng.randint(1, 2))))
            elif rng.random() < 0.5:
                row.pop(column, None)
        rows.append(row)
    rows += [{}, {"Signer": None}, {"Signer": 5}, {"Signer": ""}, {"Signer": "\udcff AnyDesk \ud800"}]
    candidates = assert_same_results(shipped, rows)
    assert candidates < len(rows) * len(shipped.rules) / 4  # the index prunes most evaluations


# --- random queries ---------------------------------------------------------------------------------------

VOCABULARY = ["Any", "Desk", "AnyDesk", "Soft", "Software", "GmbH", "OÜ", "Krämer", "İ", "x1", "Inc"]
POSITIVE = ["has", "contains", "startswith", "endswith", "==", "=~"]
NEGATIVE = ["!has", "!contains", "!startswith", "!endswith", "!=", "!~"]
LISTS = ["in", "in~", "!in", "!in~", "has_any", "has_all"]


def random_text(rng: random.Random) -> str:
    # "" glues words, so that a pattern's end terms can be parts of a value's longer terms
    joiners = PUNCTUATION + ["", ""]
    return "".join(rng.choice(VOCABULARY) + rng.choice(joiners) for _ in range(rng.randint(1, 4))).strip()


def quoted(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def random_predicate(rng: random.Random, depth: int = 0) -> str:
    column = rng.choice(["Signer", "Issuer"])
    kind = rng.randrange(7 if depth < 3 else 3)
    if kind == 0:
        return f"{column} {rng.choice(POSITIVE + NEGATIVE)} {quoted(random_text(rng))}"
    if kind == 1:
        items = ", ".join(quoted(random_text(rng)) for _ in range(rng.randint(1, 3)))
        return f"{column} {rng.choice(LISTS)} ({items})"
    if kind == 2:
        return f"isnotempty({column})" if rng.random() < 0.5 else f"{column} == ''"
    if kind == 3:
        return f"not({random_predicate(rng, depth + 1)})"
    if kind == 4:
        return f"tolower({column}) has {quoted(random_text(rng))}"
    joiner = " and " if kind == 5 else " or "
    return "(" + joiner.join(random_predicate(rng, depth + 1) for _ in range(rng.randint(2, 3))) + ")"


class _Rule:
    def __init__(self, number: int, text: str) -> None:
        self.id = str(number)
        self.query = parse_query(text)


def test_index_keeps_every_result_for_random_queries() -> None:
    rng = random.Random(5)
    rules: list[_Rule] = []
    while len(rules) < 160:
        text = f"{T} | where {random_predicate(rng)}"
        if rng.random() < 0.2:
            text += f" | extend Signer = Issuer | where Signer has {quoted(rng.choice(VOCABULARY))}"
        try:
            rules.append(_Rule(len(rules), text))
        except Exception:  # e.g. a has pattern without letters: not a rule
            continue
    index = RuleIndex(rules)
    assert 0 < index.indexed < len(rules)
    rows = [{"Signer": random_text(rng), "Issuer": random_text(rng)} for _ in range(200)]
    rows += [{"Signer": "", "Issuer": ""}, {}, {"Signer": "AnyDesk", "Issuer": None}]
    assert_same_results(index, rows)
    assert sum(len(firing(index.rules, row)) for row in rows) > len(rows)  # the rules do fire


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("Signer has 'AnyDesk Software'", {("Signer", "software")}),
        ("Signer has_any ('AnyDesk', 'Splashtop Inc')", {("Signer", "anydesk"), ("Signer", "splashtop")}),
        ("Signer in~ ('a b', 'DWSNET OÜ')", {("Signer", "a"), ("Signer", "dwsnet")}),
        ("Signer contains 'x AnyDesk y'", {("Signer", "anydesk")}),
        ("Signer contains 'AnyDesk Soft'", None),  # both terms may be parts of longer terms
        ("Signer has 'a' and Issuer has 'DigiCert'", {("Signer", "a")}),
        ("Signer has 'AnyDesk' or Signer has 'Splashtop'", {("Signer", "anydesk"), ("Signer", "splashtop")}),
        ("Signer has 'AnyDesk' or IsTrusted", None),
        ("Signer in ('', 'x')", None),  # an empty Signer has no terms and can match
        ("Signer !has 'AnyDesk'", None),
        ("not(Signer has 'AnyDesk')", None),
        ("FileSize > 5", None),
    ],
)
def test_anchor_terms(where: str, expected: set[tuple[str, str]] | None) -> None:
    anchors = anchor_terms(parse_kql(f"{T} | where {where}"), frozenset(COLUMN_TYPES))
    assert anchors == (frozenset(expected) if expected is not None else None)


def test_no_anchor_after_an_extend_that_may_rebind_a_column() -> None:
    parsed = parse_kql(f"{T} | extend Signer = Issuer | where Signer has 'AnyDesk'")
    assert anchor_terms(parsed, frozenset(COLUMN_TYPES)) is None
    parsed = parse_kql(f"{T} | where Issuer has 'DigiCert' | extend Signer = Issuer | where Signer has 'AnyDesk'")
    assert anchor_terms(parsed, frozenset(COLUMN_TYPES)) == {("Issuer", "digicert")}


def test_index_keeps_substring_matches_whose_end_terms_are_parts_of_longer_terms() -> None:
    rng = random.Random(9)
    rules: list[_Rule] = []
    rows: list[dict[str, Any]] = []
    for number in range(120):
        op = rng.choice(["contains", "startswith", "endswith"])
        pattern = " ".join(rng.choice(VOCABULARY) for _ in range(rng.randint(1, 4)))
        rules.append(_Rule(number, f"{T} | where Signer {op} {quoted(pattern)}"))
        # glue letters to the pattern's ends, so its first and last terms are parts of longer terms
        rows.append({"Signer": "Zz" + pattern + "Qq"})
        rows.append({"Signer": pattern + "Qq"})
        rows.append({"Signer": "Zz" + pattern})
    index = RuleIndex(rules)
    assert index.indexed > 30
    assert_same_results(index, rows)
    assert sum(bool(firing(index.rules, row)) for row in rows) > len(rows) // 3  # each row fits its own rule

"""Hostile rules and exclusions: deep nesting is a load error with its position, never a RecursionError,
and loading grows linearly with the query (issue 6 items 5 and 6)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from agent.exclusions import ExclusionError, parse_exclusions, parse_expression
from agent.rules.kql import KqlError, Query, parse_query
from agent.rules.kql_parser import MAX_NESTING
from agent.rules.loader import load_rules

T = "DeviceFileCertificateInfo"
NOW = datetime(2026, 1, 1, tzinfo=UTC)
ROW = {"Signer": "x", "FileSize": 10, "Timestamp": NOW}


def kql_shapes(depth: int) -> dict[str, str]:
    """Queries nested `depth` levels deep in each way a query can nest."""
    return {
        "parentheses": f"{T} | where " + "(" * depth + "Signer has 'x'" + ")" * depth,
        "not()": f"{T} | where " + "not(" * depth + "Signer has 'x'" + ")" * depth,
        "not() and parentheses": f"{T} | where " + "not((" * (depth // 2) + "Signer has 'x'" + "))" * (depth // 2),
        "unary minus": f"{T} | where FileSize > " + "-" * depth + "1",
        "arithmetic chain": f"{T} | where FileSize + " + " + ".join(["1"] * depth) + " > 0",
        "nested calls": f"{T} | where " + "tolower(" * depth + "Signer" + ")" * depth + " == 'x'",
        "nested strcat": f"{T} | where " + "strcat('a', " * depth + "Signer" + ")" * depth + " has 'x'",
        "extend": f"{T} | extend X = " + "(" * depth + "FileSize" + ")" * depth,
        "summarize by": f"{T} | summarize count() by " + "tostring(" * depth + "Signer" + ")" * depth,
    }


@pytest.mark.parametrize("shape", sorted(kql_shapes(1)))
@pytest.mark.parametrize("depth", [MAX_NESTING + 1, 10_000])
def test_deep_kql_is_a_load_error_with_position(shape: str, depth: int) -> None:
    with pytest.raises(KqlError) as caught:
        parse_query(kql_shapes(depth)[shape])
    assert f"nested deeper than {MAX_NESTING} levels" in caught.value.message
    assert caught.value.line == 1 and caught.value.column > 1


@pytest.mark.parametrize("shape", sorted(kql_shapes(1)))
def test_kql_just_under_the_limit_parses_and_evaluates(shape: str) -> None:
    query = parse_query(kql_shapes(MAX_NESTING - 2)[shape])
    query.filter_row(ROW, now=NOW)
    query.run([ROW, {}], now=NOW)


def test_deep_kql_in_a_rule_file_names_file_line_and_column(tmp_path) -> None:
    rule = tmp_path / "deep.yaml"
    body = "(" * 10_000 + "Signer has 'x'" + ")" * 10_000
    rule.write_text(f"id: deep\nname: deep\nquery: |\n  {T}\n  | where {body}\n", encoding="utf-8")
    ruleset = load_rules([tmp_path])
    assert ruleset.rules == ()
    (problem,) = ruleset.problems
    column = len("  | where ") + MAX_NESTING + 1  # the first '(' past the limit
    assert (problem.line, problem.column) == (5, column), str(problem)
    assert str(problem).startswith(f"{rule}:5:{column}: expression nested deeper than {MAX_NESTING} levels")


def exclusion_shapes(depth: int) -> dict[str, str]:
    return {
        "parentheses": "(" * depth + 'file.name == "a"' + ")" * depth,
        "!": "!" * depth + 'file.name == "a"',
        "not": "not " * depth + 'file.name == "a"',
        "!(": "!(" * (depth // 2) + 'file.name == "a"' + ")" * (depth // 2),
        "not(": "not(" * (depth // 2) + 'file.name == "a"' + ")" * (depth // 2),
    }


@pytest.mark.parametrize("shape", sorted(exclusion_shapes(1)))
@pytest.mark.parametrize("depth", [102, 10_000])
def test_deep_exclusion_is_a_load_error_with_column(shape: str, depth: int) -> None:
    with pytest.raises(ExclusionError) as caught:
        parse_expression(exclusion_shapes(depth)[shape])
    assert "nested deeper than 100 levels" in caught.value.message
    assert caught.value.column > 1


@pytest.mark.parametrize("shape", sorted(exclusion_shapes(1)))
def test_exclusion_at_the_limit_parses_and_evaluates(shape: str) -> None:
    expression = parse_expression(exclusion_shapes(100)[shape])  # an even number of negations
    assert expression.matches({"FileName": "A"}) is True
    assert expression.matches({"FileName": "b"}) is False


def test_deep_exclusion_in_a_config_names_file_line_and_column() -> None:
    text = "[[exclusions]]\nid = 'deep'\nexpression = '" + "(" * 5000 + 'signer has "x"' + ")" * 5000 + "'\n"
    exclusions, problems = parse_exclusions(
        {"exclusions": [{"id": "deep", "expression": text.split("'")[3]}]}, path="agent.toml", source_text=text
    )
    assert exclusions == ()
    assert str(problems[0]).startswith("agent.toml:3:101: exclusion 'deep': expression nested deeper than 100")


# --- loading grows linearly ---------------------------------------------------------------------------


def _best_time(text: str, repeat: int) -> tuple[float, Query]:
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()  # CPU time: less disturbed than wall time on a shared machine
        query = parse_query(text)
        best = min(best, time.process_time() - start)
    return best, query


def _or_query(n: int) -> str:
    return f"{T}\n| where " + "\n    or ".join(f"Signer has 'Vendor {i} Ltd'" for i in range(n))


def _has_any_query(n: int) -> str:
    return f"{T}\n| where Signer has_any (" + ",\n    ".join(f"'Vendor {i} Ltd'" for i in range(n)) + ")"


@pytest.mark.parametrize("build", [_or_query, _has_any_query], ids=["or-terms", "has_any-items"])
def test_rule_loading_is_linear_in_the_query_size(build: Callable[[int], str]) -> None:
    # 8x the terms must cost about 8x: the quadratic loader took 26-39x here. Ratio of CPU times in one run.
    small, large = build(1_000), build(8_000)
    small_time, _ = _best_time(small, 3)
    large_time, query = _best_time(large, 2)
    ratio = large_time / small_time
    assert ratio < 20, f"8x the terms took {ratio:.1f}x the time ({small_time:.3f}s -> {large_time:.3f}s)"
    assert query.filter_row({"Signer": "VENDOR 7999 LTD."}, now=NOW) is not None
    assert query.filter_row({"Signer": "Vendor 8000 Ltd"}, now=NOW) is None


def test_has_any_over_a_large_list_is_indexed_and_keeps_first_match_semantics() -> None:
    import random

    from agent.rules.terms import has_any_terms

    rng = random.Random(7)
    words = ["Kaseya", "Holdings", "Inc", "AnyDesk", "Software", "GmbH", "DWSNET", "OÜ", "Krämer", "İ", "x1", "Ltd"]
    needles = tuple(" ".join(rng.choices(words, k=rng.randint(1, 3))) for _ in range(300)) + ("Ltd.",)
    items = ", ".join("'" + needle + "'" for needle in needles)
    query = parse_query(f"{T} | where Signer has_any ({items})")
    for _ in range(500):
        signer = " ".join(rng.choices(words + [",", "."], k=rng.randint(0, 6)))
        expected = has_any_terms(signer, needles)
        evidence = query.filter_row({"Signer": signer}, now=NOW)
        if expected is None:
            assert evidence is None, signer
        else:
            assert evidence is not None and evidence[0].pattern == expected, signer

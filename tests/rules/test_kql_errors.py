"""Anything outside the subset fails at parse time with line, column and the construct named."""

from __future__ import annotations

import pickle

import pytest

from agent.rules.kql import KqlError, parse_query

T = "DeviceFileCertificateInfo"

# (query, line, column, message fragment)
BAD_QUERIES = [
    # unsupported tabular operators
    (f"{T}\n| join (Other) on DeviceId", 2, 3, "unsupported operator 'join'"),
    (f"{T}\n| sample 10", 2, 3, "unsupported operator 'sample'"),
    (f"{T} | top-nested 3 of Signer by count()", 1, 29, "unsupported operator 'top-nested'"),
    (f"{T} | serialize", 1, 29, "unsupported operator 'serialize'"),
    (f"{T} | project-keep Signer", 1, 29, "unsupported operator 'project-keep'"),
    (f"{T} | mv-expand Signer", 1, 29, "unsupported operator 'mv-expand'"),
    (f"{T} | make-series count() on Timestamp step 1d", 1, 29, "unsupported operator 'make-series'"),
    # the supported extras, misused
    (f"{T} | take Signer", 1, 34, "'take' needs a constant row count"),
    (f"{T} | order Timestamp", 1, 35, "expected 'by' after 'order'"),
    (f"{T} | top 3 Timestamp", 1, 35, "expected 'by' after 'top 3'"),
    (f"{T} | sort by Timestamp nulls middle", 1, 53, "expected 'first' or 'last'"),
    (f"{T} | project-away Nope", 1, 42, "unknown column 'Nope'"),
    (f"{T} | project-rename A = Nope", 1, 48, "unknown column 'Nope'"),
    (f"{T} | project-rename Signer = Issuer", 1, 29, "duplicate column name 'Signer'"),
    (f"{T} | count | where Signer has 'x'", 1, 43, "unknown column 'Signer'"),
    (f"{T} | where tolower(ReportId) == 'x'", 1, 43, "tolower() needs a string, got long"),
    (f"{T} | where strlen(Signer, 1) > 1", 1, 35, "strlen() takes 1 argument"),
    (f"{T} | where iff(Signer, 1, 2) > 1", 1, 39, "needs a bool condition"),
    (f"{T} | where iif(IsTrusted, 1, 'x') > 1", 1, 53, "branches differ in type"),
    (f"{T} | summarize count() by bin(Timestamp, 5)", 1, 65, "needs a constant timespan bin size"),
    (f"{T} | summarize count() by bin(ReportId, 0)", 1, 64, "bin() size must be positive"),
    (f"{T} | summarize arg_max(Timestamp)", 1, 39, "arg_max() needs the columns to return"),
    (f"{T} | where Signer in (datatable(a:string, b:string)['x', 'y'])", 1, 66, "one-column datatable"),
    (f"{T} | where Signer in (datatable(a:string)[Issuer])", 1, 66, "unknown column 'Issuer'"),
    (f"{T} | where replace_string(Signer, 'a', 'b') == 'x'", 1, 35, "unsupported function 'replace_string'"),
    (f"{T} | union Other", 1, 29, "unsupported operator 'union'"),
    (f"{T} | ", 1, 29, "expected an operator after '|'"),
    # unsupported functions and scalar operators
    (f"{T}\n| where foo(Signer)", 2, 9, "unsupported function 'foo'"),
    (f"{T} | where trim(' ', Signer) == 'x'", 1, 35, "unsupported function 'trim'"),
    (f"{T} | where Signer matches regex 'x'", 1, 42, "unsupported operator 'matches'"),
    (f"{T} | where Signer has_cs 'x'", 1, 42, "unsupported operator 'has_cs'"),
    (f"{T} | where Signer <> 'x'", 1, 42, "unsupported operator '<>'"),
    (f"{T} | where Signer = 'x'", 1, 42, "use '=='"),
    (f"{T} | where Signer has 'a' AND Signer has 'b'", 1, 50, "unsupported operator 'AND'"),
    (f"{T} | where count() > 1", 1, 35, "aggregate function 'count' is only allowed in summarize"),
    (f"{T} | extend X = Signer * 2", 1, 47, "unexpected '*'"),
    # unknown names
    (f"{T}\n| where Foo == 1", 2, 9, "unknown column 'Foo'"),
    (f"{T} | summarize count() by Nope", 1, 50, "unknown column 'Nope'"),
    (f"{T} | project Signer | where ReportId > 1", 1, 52, "unknown column 'ReportId'"),
    (f"{T} | summarize C=count() by DeviceId | where Signer has 'x'", 1, 69, "unknown column 'Signer'"),
    ("DeviceProcessEvents | where X", 1, 1, "unknown table 'DeviceProcessEvents'"),
    ("let x = DeviceProcessEvents | where A;\nx", 1, 9, "unknown table 'DeviceProcessEvents'"),
    ("let x = 1;\nx | where Signer", 2, 1, "'x' is a scalar, not a table"),
    (f"let t = {T};\n{T} | where Signer has t", 2, 46, "'t' is a table, not a scalar"),
    (f"let Signer = 'x';\n{T}", 1, 5, "hides a table or column"),
    # lexical errors
    (f"{T}\n| where Signer has 'abc", 2, 20, "unterminated string literal"),
    (f'{T} | where Signer has "abc', 1, 46, "unterminated string literal"),
    (f"{T} | where Signer has 'a\nb'", 1, 46, "unterminated string literal"),
    (f"{T} | where Signer has 'a\\qb'", 1, 48, "unsupported escape sequence"),
    (f"{T} | where Timestamp > ago(5x)", 1, 51, "invalid number or timespan literal '5x'"),
    (f"{T} | where Timestamp > datetime(yesterday)", 1, 47, "invalid datetime literal"),
    (f"{T} | where Timestamp > datetime(2025-01-01", 1, 47, "unterminated datetime(...) literal"),
    (f"{T} | where Timestamp > timespan(5 fortnights)", 1, 47, "invalid timespan literal"),
    (f"{T} | where Signer has ```x```", 1, 46, "multi-line string"),
    (f"{T} | where Signer has 'x' #", 1, 50, "unexpected character '#'"),
    (f"{T} | where Signer has 'x'\u00a0", 1, 49, "unexpected character U+00A0"),
    # summarize
    (f"{T} | summarize avg(FileSize)", 1, 39, "unsupported aggregate function 'avg'"),
    (f"{T}\n| summarize A=percentile(FileSize, 50) by DeviceId", 2, 15, "unsupported aggregate function 'percentile'"),
    (f"{T} | summarize make_list(Signer)", 1, 39, "unsupported aggregate function 'make_list'"),
    (f"{T} | summarize Signer", 1, 39, "expected an aggregate function"),
    (f"{T} | summarize", 1, 38, "summarize needs an aggregate or a by clause"),
    (f"{T} | summarize count(Signer)", 1, 45, "count() takes no arguments"),
    (f"{T} | summarize min()", 1, 39, "min() takes 1 argument"),
    (f"{T} | summarize make_set(ReportId, 'x')", 1, 58, "must be an integer"),
    (f"{T} | summarize C=count(), C=min(Timestamp)", 1, 50, "duplicate column name 'C'"),
    (f"{T} | summarize count() by bin_at(Timestamp, 1d, now())", 1, 50, "unsupported function 'bin_at'"),
    (f"{T} | project A = Signer, A = Issuer", 1, 49, "duplicate column name 'A'"),
    # type errors
    (f"{T} | where Signer", 1, 35, "where needs a bool predicate, got string"),
    (f"{T} | where Signer == 5", 1, 45, "cannot compare string with long"),
    (f"{T} | where Timestamp > 'yesterday'", 1, 47, "cannot compare datetime with string"),
    (f"{T} | where ReportId has 'x'", 1, 35, "needs a string on the left, got long"),
    (f"{T} | where Signer has 5", 1, 46, "needs string patterns, got long"),
    (f"{T} | where Signer has_any ('a', 5)", 1, 56, "needs string patterns, got long"),
    (f"{T} | where Signer between (1 .. 2)", 1, 35, "needs a number, datetime or timespan"),
    (f"{T} | where Timestamp between (1 .. 2)", 1, 54, "cannot compare datetime with long"),
    (f"{T} | where Timestamp > ago('5d')", 1, 51, "ago() takes a constant timespan"),
    (f"{T} | where Timestamp > now(5)", 1, 51, "now() takes a constant timespan offset"),
    (f"{T} | where not(Signer)", 1, 39, "not() needs a bool, got string"),
    (f"{T} | where Signer has 'x' and ReportId", 1, 54, "'and' needs bool operands, got long"),
    (f"{T} | where IsTrusted == 'yes'", 1, 48, "cannot compare bool with string"),
    (f"{T} | where -Signer == 'x'", 1, 35, "cannot negate a string"),
    (f"{T} | where Signer + 1 == 'x'", 1, 42, "cannot apply '+' to string and long"),
    (f"{T} | where Signer has ''", 1, 46, "has no letters or digits"),
    (f"{T} | where Signer has_any ('ok', '..')", 1, 57, "has no letters or digits"),
    (f"{T} | where Signer in ()", 1, 42, "empty list after 'in'"),
    (f"{T} | where Signer in (Issuer)", 1, 46, "must hold constants"),
    (f"{T} | where Signer in (dynamic({{'a': 1}}))", 1, 54, "only arrays of constants"),
    # structure
    ("let x = 1;", 1, 11, "query has no tabular expression"),
    ("", 1, 1, "query has no tabular expression"),
    (f"{T}; {T}", 1, 28, "only one tabular expression is supported"),
    (f"let x = 1\n{T}", 2, 1, "expected ';' after a let statement"),
    (f"let f = (s: string) {{ s }};\n{T}", 1, 9, "user-defined function"),
    (f"{T} | where (Signer has 'x'", 1, 50, "expected ')' to close '('"),
    (f"{T} | where Signer has 'x' 'y'", 1, 50, "unexpected string 'y'"),
    (f"{T} | where Timestamp between (ago(1d), now())", 1, 61, "expected '..'"),
    (f"{T} | where", 1, 34, "unexpected end of query"),
    ("print 1", 1, 1, "unknown table 'print'"),
]


@pytest.mark.parametrize(("text", "line", "column", "fragment"), BAD_QUERIES, ids=[case[3] for case in BAD_QUERIES])
def test_bad_query_fails_at_parse_time(text: str, line: int, column: int, fragment: str) -> None:
    with pytest.raises(KqlError) as caught:
        parse_query(text)
    error = caught.value
    assert fragment in error.message
    assert (error.line, error.column) == (line, column), str(error)
    assert str(error) == f"line {line}, column {column}: {error.message}"


def test_kql_error_survives_pickling() -> None:
    error = KqlError(3, 7, "unsupported operator 'join'")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.line, copy.column, copy.message) == (3, 7, "unsupported operator 'join'")

"""Every `where` operator of the subset, true and false, plus bools, nulls, let, now/ago and between."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agent.rules.kql import Evidence, parse_query

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)

ROW: dict[str, Any] = {
    "Timestamp": NOW - timedelta(hours=2),
    "DeviceId": "0123456789abcdef0123456789abcdef01234567",
    "DeviceName": "host.example.org",
    "SHA1": "da39a3ee5e6b4b0d3255bfef95601890afd80709",
    "IsSigned": True,
    "SignatureType": "Embedded",
    "Signer": "MMSoft Design Ltd.",
    "SignerHash": "",
    "Issuer": "DigiCert Trusted G4 Code Signing RSA4096 SHA384 2021 CA1",
    "IsTrusted": False,
    "IsRootSignerMicrosoft": False,
    "ReportId": 42,
    "FileSize": 1000,
    "FileName": "PCMonitorSrv.exe",
    "CertificateExpirationTime": datetime(2026, 1, 1, tzinfo=UTC),
    "CertificateCountersignatureTime": None,
}


def passes(predicate: str, row: dict[str, Any] | None = None, *, now: datetime = NOW) -> bool:
    query = parse_query(f"DeviceFileCertificateInfo\n| where {predicate}")
    return query.filter_row(ROW if row is None else row, now=now) is not None


OPERATOR_CASES = [
    # has family
    ("Signer has 'mmsoft design'", True),
    ("Signer has 'MMSoft Des'", False),
    ("Signer !has 'MMSoft Des'", True),
    ("Signer !has 'design'", False),
    ("Signer has_any ('Kaseya', 'mmsoft')", True),
    ("Signer has_any ('Kaseya', 'Pulseway')", False),
    ("Signer has_all ('MMSoft', 'Ltd')", True),
    ("Signer has_all ('MMSoft', 'Inc')", False),
    # contains / startswith / endswith (case-insensitive, substring)
    ("Signer contains 'soft des'", True),
    ("Signer contains 'hard'", False),
    ("Signer !contains 'hard'", True),
    ("Signer !contains 'SOFT'", False),
    ("Signer startswith 'mms'", True),
    ("Signer startswith 'Design'", False),
    ("Signer !startswith 'Design'", True),
    ("Signer endswith 'LTD.'", True),
    ("Signer endswith 'Ltd'", False),
    ("Signer !endswith 'Ltd'", True),
    # equality: == and != are case-sensitive, =~ and !~ are not
    ("Signer == 'MMSoft Design Ltd.'", True),
    ("Signer == 'mmsoft design ltd.'", False),
    ("Signer != 'mmsoft design ltd.'", True),
    ("Signer != 'MMSoft Design Ltd.'", False),
    ("Signer =~ 'mmsoft design ltd.'", True),
    ("Signer =~ 'mmsoft design'", False),
    ("Signer !~ 'mmsoft design'", True),
    ("Signer !~ 'MMSOFT DESIGN LTD.'", False),
    ('SignatureType == "Embedded"', True),
    # in family
    ("Signer in ('x', 'MMSoft Design Ltd.')", True),
    ("Signer in ('mmsoft design ltd.')", False),
    ("Signer !in ('mmsoft design ltd.')", True),
    ("Signer !in ('MMSoft Design Ltd.', 'y')", False),
    ("Signer in~ ('MMSOFT DESIGN LTD.')", True),
    ("Signer in~ ('MMSOFT DESIGN')", False),
    ("Signer !in~ ('MMSOFT DESIGN')", True),
    ("Signer !in~ ('mmsoft design ltd.')", False),
    ("ReportId in (1, 42)", True),
    ("ReportId in (1, 2)", False),
    ("ReportId !in (1, 2)", True),
    # numeric comparisons
    ("ReportId == 42", True),
    ("ReportId != 42", False),
    ("ReportId < 43", True),
    ("ReportId < 42", False),
    ("ReportId <= 42", True),
    ("ReportId <= 41", False),
    ("ReportId > 41", True),
    ("ReportId > 42", False),
    ("ReportId >= 42", True),
    ("ReportId >= 43", False),
    ("FileSize > 999.5", True),
    ("ReportId between (40 .. 42)", True),
    ("ReportId between (43 .. 50)", False),
    ("ReportId !between (43 .. 50)", True),
    ("ReportId !between (42 .. 50)", False),
    # datetime comparisons
    ("Timestamp > ago(3h)", True),
    ("Timestamp > ago(1h)", False),
    ("Timestamp >= now(-2h)", True),
    ("Timestamp < now()", True),
    ("Timestamp > now() - 1d", True),
    ("Timestamp between (ago(1d) .. now())", True),
    ("Timestamp between (ago(1h) .. now())", False),
    ("Timestamp between (datetime(2025-06-01) .. 1d)", True),  # a timespan upper bound is start + span
    ("Timestamp between (datetime(2025-06-01) .. 10h)", True),
    ("Timestamp between (datetime(2025-06-01) .. 9h)", False),
    ("Timestamp > datetime(2025-06-01T09:59:59Z)", True),
    ("Timestamp > datetime(2025-06-01 10:00:01)", False),
    ("Timestamp == datetime(2025-06-01T10:00:00Z)", True),
    ("Timestamp == datetime(2025-06-01T12:00:00+02:00)", True),
    ("CertificateExpirationTime > now()", True),
    ("CertificateExpirationTime - Timestamp > 180d", True),
    # bools, as Sentinel writes them
    ("IsSigned", True),
    ("IsTrusted", False),
    ("not(IsTrusted)", True),
    ("IsSigned == true", True),
    ("IsTrusted == true", False),
    ("IsTrusted == false", True),
    ("IsSigned == 1", True),
    ("IsTrusted == 1", False),
    ("IsTrusted == 0", True),
    ("IsTrusted != 1", True),
    ("IsSigned in (1)", True),
    ("IsSigned == True", True),
    # emptiness
    ("isempty(SignerHash)", True),
    ("isnotempty(SignerHash)", False),
    ("isnotempty(Signer)", True),
    ("isempty(Signer)", False),
    ("isempty(IssuerHash)", True),  # missing column
    ("isnull(CertificateCountersignatureTime)", True),
    ("isnotnull(CertificateCountersignatureTime)", False),
    ("isnotnull(Timestamp)", True),
    # logic, precedence and parentheses
    ("Signer has 'mmsoft' and ReportId == 42", True),
    ("Signer has 'mmsoft' and ReportId == 41", False),
    ("Signer has 'kaseya' or ReportId == 42", True),
    ("Signer has 'kaseya' or ReportId == 41", False),
    ("Signer has 'kaseya' and ReportId == 41 or IsSigned", True),  # and binds tighter than or
    ("Signer has 'kaseya' and (ReportId == 41 or IsSigned)", False),
    ("not(Signer has 'kaseya')", True),
    ("not(Signer has 'mmsoft' and IsSigned)", False),
    ("not(not(IsSigned))", True),
    ("((Signer has 'mmsoft'))", True),
    ("true", True),
    ("false", False),
]


@pytest.mark.parametrize(("predicate", "expected"), OPERATOR_CASES, ids=[case[0] for case in OPERATOR_CASES])
def test_operator(predicate: str, expected: bool) -> None:
    assert passes(predicate) is expected


NULL_ROW: dict[str, Any] = {"Timestamp": None, "ReportId": None}

# With Timestamp, ReportId and IsTrusted missing, every leaf on them is null, and so is not(null):
# the row is never kept. A missing *string* column is "" (Kusto strings are never null), so the
# positive string tests fail and the negated ones pass.
NULL_CASES = [
    "Signer has 'x'",
    "Signer == 'x'",
    "Signer has_any ('x')",
    "Timestamp between (ago(1d) .. now())",
    "Timestamp !between (ago(1d) .. now())",
    "ReportId > 1",
    "IsTrusted",
    "not(IsTrusted)",
    "IsTrusted == false",
    "Signer has 'x' or ReportId > 1",
    "not(Signer has 'x' or ReportId > 1)",
    "isnull(Signer)",
]
EMPTY_STRING_CASES = [
    "Signer !has 'x'",
    "not(Signer has 'x')",
    "Signer != 'x'",
    "Signer !in ('x')",
    "Signer !in~ ('x')",
    "Signer !contains 'x'",
    "Signer !startswith 'x'",
    "Signer !endswith 'x'",
    "Signer !~ 'x'",
    "Signer == ''",
    "isempty(Signer)",
    "isnotnull(Signer)",
    "strlen(Signer) == 0",
    "tolower(Signer) == ''",
]


@pytest.mark.parametrize("predicate", NULL_CASES)
def test_nulls_never_pass(predicate: str) -> None:
    assert passes(predicate, NULL_ROW) is False


@pytest.mark.parametrize("predicate", EMPTY_STRING_CASES)
def test_a_missing_string_column_is_the_empty_string(predicate: str) -> None:
    assert passes(predicate, NULL_ROW) is True
    assert passes(predicate, NULL_ROW | {"Signer": None}) is True
    assert passes(predicate, NULL_ROW | {"Signer": ""}) is True


@pytest.mark.parametrize(
    ("predicate", "expected"),
    [
        ("isempty(Signer)", True),
        ("isnotempty(Signer)", False),
        ("isnull(Timestamp)", True),
        ("true or Signer has 'x'", True),  # Kleene: true or null is true
        ("false and Signer has 'x'", False),
        ("not(false and Signer has 'x')", True),  # false and null is false, so not() is true
    ],
)
def test_null_aware_functions_and_kleene_logic(predicate: str, expected: bool) -> None:
    assert passes(predicate, NULL_ROW) is expected


@pytest.mark.parametrize(
    ("row", "predicate", "expected"),
    [
        # rows as SQLite returns them: bools as 0/1, datetimes as ISO text
        ({"IsTrusted": 1}, "IsTrusted", True),
        ({"IsTrusted": 0}, "IsTrusted == false", True),
        ({"IsTrusted": 0}, "IsTrusted", False),
        ({"IsTrusted": 7}, "IsTrusted", False),  # not a bool: null
        ({"Timestamp": "2025-06-01T11:00:00Z"}, "Timestamp > ago(2h)", True),
        ({"Timestamp": "2025-06-01T11:00:00+00:00"}, "Timestamp > ago(30m)", False),
        ({"Timestamp": "2025-06-01 11:00:00"}, "Timestamp > ago(2h)", True),  # naive means UTC
        ({"Timestamp": datetime(2025, 6, 1, 11, 0)}, "Timestamp > ago(2h)", True),
        ({"Timestamp": "garbage"}, "isnull(Timestamp)", True),
        ({"ReportId": "42"}, "ReportId == 42", True),
        ({"Signer": 42}, "isempty(Signer)", True),  # wrong type reads as null
    ],
)
def test_values_are_coerced_to_the_schema_type(row: dict[str, Any], predicate: str, expected: bool) -> None:
    assert passes(predicate, row) is expected


def test_let_scalars_and_time_window_follow_now() -> None:
    query = parse_query(
        "let start = ago(2d);\n"
        "let span = 1d;\n"
        "let end = start + span;\n"
        'let name = "MMSoft";\n'
        "let limit = 40;\n"
        "DeviceFileCertificateInfo | where Timestamp between (start .. end) and Signer has name and ReportId > limit"
    )
    assert query.filter_row(dict(ROW, Timestamp=NOW - timedelta(days=1, hours=12)), now=NOW) is not None
    assert query.filter_row(dict(ROW, Timestamp=NOW - timedelta(hours=12)), now=NOW) is None
    # the same query later: the window moves with `now`
    assert query.filter_row(dict(ROW, Timestamp=NOW - timedelta(hours=12)), now=NOW + timedelta(days=1)) is not None
    assert query.string_patterns == (("Signer", "has", "MMSoft"),)


def test_naive_now_means_utc() -> None:
    naive = NOW.replace(tzinfo=None)
    assert passes("Timestamp > ago(3h)", now=naive)
    assert not passes("Timestamp > ago(1h)", now=naive)


@pytest.mark.parametrize(
    ("literal", "expected"),
    [
        ("5d", timedelta(days=5)),
        ("12h", timedelta(hours=12)),
        ("30m", timedelta(minutes=30)),
        ("10s", timedelta(seconds=10)),
        ("1ms", timedelta(milliseconds=1)),
        ("1.5h", timedelta(minutes=90)),
        ("10microsecond", timedelta(microseconds=10)),
        ("10tick", timedelta(microseconds=1)),
        ("timespan(1d)", timedelta(days=1)),
        ("timespan(2)", timedelta(days=2)),
        ("timespan(15 seconds)", timedelta(seconds=15)),
        ("timespan(0.12:34:56.5)", timedelta(hours=12, minutes=34, seconds=56.5)),
        ("timespan(00:10:00)", timedelta(minutes=10)),
        ("-5d", timedelta(days=-5)),
        ("1d + 2h", timedelta(hours=26)),
        ("1d - 2h", timedelta(hours=22)),
    ],
)
def test_timespan_literals(literal: str, expected: timedelta) -> None:
    query = parse_query(f"let span = {literal};\nDeviceFileCertificateInfo | extend X = span | project X")
    assert query.run([{}], now=NOW) == [{"X": expected}]


@pytest.mark.parametrize(
    ("literal", "expected"),
    [
        ("datetime(2025-01-01)", datetime(2025, 1, 1, tzinfo=UTC)),
        ("datetime(2025-01-01T10:00:00Z)", datetime(2025, 1, 1, 10, tzinfo=UTC)),
        ("datetime(2025-01-01 10:00:00.1234567)", datetime(2025, 1, 1, 10, 0, 0, 123456, tzinfo=UTC)),
        ("datetime('2025-01-01T10:00:00+01:00')", datetime(2025, 1, 1, 9, tzinfo=UTC)),
        ("now()", NOW),
        ("now(-5d)", NOW - timedelta(days=5)),
        ("ago(5d)", NOW - timedelta(days=5)),
        ("now() + 1h", NOW + timedelta(hours=1)),
    ],
)
def test_datetime_values(literal: str, expected: datetime) -> None:
    query = parse_query(f"let t = {literal};\nDeviceFileCertificateInfo | project T = t")
    [row] = query.run([{}], now=NOW)
    assert row["T"] == expected
    assert row["T"].tzinfo is not None


@pytest.mark.parametrize(
    ("literal", "expected"),
    [
        ("'it\\'s'", "it's"),
        ('"say \\"hi\\""', 'say "hi"'),
        ("'a\\\\b'", "a\\b"),
        ("'tab\\there'", "tab\there"),
        ("'line\\nbreak'", "line\nbreak"),
        ("@'C:\\temp\\x'", "C:\\temp\\x"),
        ("@'it''s'", "it's"),
        ('@"a""b"', 'a"b'),
        ("h'hidden'", "hidden"),
        ("'// not a comment'", "// not a comment"),
        ("'Krämer'", "Krämer"),
        ("42", 42),
        ("4.5", 4.5),
        ("true", True),
        ("false", False),
    ],
)
def test_scalar_literals(literal: str, expected: Any) -> None:
    query = parse_query(f"DeviceFileCertificateInfo | project V = {literal}")
    assert query.run([{}], now=NOW) == [{"V": expected}]


def test_dynamic_list_let_in_has_any_and_in() -> None:
    query = parse_query(
        "let signers = dynamic(['Kaseya', 'MMSoft Design']);\n"
        "let ids = dynamic([41, 42]);\n"
        "DeviceFileCertificateInfo | where Signer has_any (signers) and ReportId in (ids)"
    )
    hit = query.filter_row(ROW, now=NOW)
    assert hit == (
        Evidence("Signer", "MMSoft Design Ltd.", "has_any", "MMSoft Design"),
        Evidence("ReportId", 42, "in", 42),
    )
    assert ("Signer", "has_any", "Kaseya") in query.string_patterns


def test_comments_and_layout_anywhere() -> None:
    query = parse_query(
        "// leading comment\n"
        "let a = 1; // trailing comment\n"
        "DeviceFileCertificateInfo // table\n"
        "    | where // the filter\n"
        "        Signer has 'mmsoft' // pattern\n"
        "    | summarize\n"
        "        C = count() // aggregate\n"
        "        by DeviceId\n"
        "// done\n"
    )
    assert query.run([ROW], now=NOW) == [{"DeviceId": ROW["DeviceId"], "C": 1}]

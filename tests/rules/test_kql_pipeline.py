"""summarize, extend, project, tabular lets, filter_row evidence and query metadata."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agent.rules.kql import Evidence, parse_query

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
T = "DeviceFileCertificateInfo"


def row(device: str, signer: str | None, report: int, hours_ago: float, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "DeviceId": device,
        "DeviceName": f"{device}.example.org",
        "Signer": signer,
        "ReportId": report,
        "Timestamp": NOW - timedelta(hours=hours_ago),
    }
    out.update(extra)
    return out


ROWS = [
    row("d1", "Kaseya Holdings Inc.", 5, 10),
    row("d1", "Kaseya Holdings Inc.", 3, 30),
    row("d1", "Kaseya Corp", 5, 20),
    row("d2", "Kaseya Holdings Inc.", 9, 1),
    row("d2", None, 10, 2),
    row("d3", "Splashtop Inc.", 1, 3),
]


def test_summarize_named_aggregates_by_two_columns() -> None:
    query = parse_query(
        f"{T} | where Signer has 'kaseya'\n"
        "| summarize FirstSeen=min(Timestamp), LastSeen=max(Timestamp),\n"
        "    Report=make_set(ReportId), Count=count(), Signers=dcount(Signer) by DeviceId, DeviceName"
    )
    assert query.output_columns == ("DeviceId", "DeviceName", "FirstSeen", "LastSeen", "Report", "Count", "Signers")
    assert query.run(ROWS, now=NOW) == [
        {
            "DeviceId": "d1",
            "DeviceName": "d1.example.org",
            "FirstSeen": NOW - timedelta(hours=30),
            "LastSeen": NOW - timedelta(hours=10),
            "Report": [3, 5],
            "Count": 3,
            "Signers": 2,
        },
        {
            "DeviceId": "d2",
            "DeviceName": "d2.example.org",
            "FirstSeen": NOW - timedelta(hours=1),
            "LastSeen": NOW - timedelta(hours=1),
            "Report": [9],
            "Count": 1,
            "Signers": 1,
        },
    ]


def test_summarize_unnamed_aggregates_use_kusto_default_names() -> None:
    query = parse_query(f"{T} | summarize min(Timestamp), max(ReportId), count(), dcount(DeviceId), make_set(Signer)")
    assert query.output_columns == ("min_Timestamp", "max_ReportId", "count_", "dcount_DeviceId", "set_Signer")
    assert query.run(ROWS, now=NOW) == [
        {
            "min_Timestamp": NOW - timedelta(hours=30),
            "max_ReportId": 10,
            "count_": 6,
            "dcount_DeviceId": 3,
            # sorted; the missing Signer is "" (Kusto strings are never null)
            "set_Signer": ["", "Kaseya Corp", "Kaseya Holdings Inc.", "Splashtop Inc."],
        }
    ]


def test_summarize_of_no_rows() -> None:
    without_by = parse_query(f"{T} | summarize count(), min(Timestamp), make_set(ReportId), dcount(Signer)")
    assert without_by.run([], now=NOW) == [{"count_": 0, "min_Timestamp": None, "set_ReportId": [], "dcount_Signer": 0}]
    with_by = parse_query(f"{T} | summarize count() by DeviceId")
    assert with_by.run([], now=NOW) == []


def test_summarize_by_only_and_renamed_group_and_null_keys() -> None:
    query = parse_query(f"{T} | summarize by Device=DeviceId, Signer")
    results = query.run(ROWS, now=NOW)
    assert {"Device": "d2", "Signer": ""} in results  # a missing string groups as ""
    assert len(results) == 5


def test_make_set_size_limit_and_min_max_ignore_nulls() -> None:
    query = parse_query(f"{T} | summarize S=make_set(ReportId, 2), Lo=min(Signer), Hi=max(Signer)")
    [result] = query.run(ROWS, now=NOW)
    assert len(result["S"]) == 2
    assert result["Lo"] == ""  # the missing Signer is "", not null
    assert result["Hi"] == "Splashtop Inc."


def test_stages_after_summarize() -> None:
    query = parse_query(
        f"{T} | summarize Count=count() by DeviceId\n"
        "| where Count > 1\n| extend Tool = 'Kaseya'\n| project DeviceId, Tool"
    )
    assert query.run(ROWS, now=NOW) == [{"DeviceId": "d1", "Tool": "Kaseya"}, {"DeviceId": "d2", "Tool": "Kaseya"}]


def test_extend_and_project_with_literals_and_columns() -> None:
    query = parse_query(
        f"{T} | where Signer has 'splashtop'\n"
        "| extend rmmFileSigName = 'Splashtop', Days = 2d, Flag = true, N = ReportId, Copy = rmmFileSigName\n"
        "| project DeviceId, Who = Signer, rmmFileSigName, Days, Flag, N, Copy, Answer = 42"
    )
    assert query.output_columns == ("DeviceId", "Who", "rmmFileSigName", "Days", "Flag", "N", "Copy", "Answer")
    assert query.run(ROWS, now=NOW) == [
        {
            "DeviceId": "d3",
            "Who": "Splashtop Inc.",
            "rmmFileSigName": "Splashtop",
            "Days": timedelta(days=2),
            "Flag": True,
            "N": 1,
            "Copy": "Splashtop",
            "Answer": 42,
        }
    ]


def test_extend_before_where_is_row_level() -> None:
    query = parse_query(f"{T} | extend Vendor = Signer | where Vendor has 'splashtop' | summarize count()")
    assert query.filter_row(ROWS[5], now=NOW) == (Evidence("Vendor", "Splashtop Inc.", "has", "splashtop"),)
    assert query.filter_row(ROWS[0], now=NOW) is None
    assert query.run(ROWS, now=NOW) == [{"count_": 1}]


def test_extend_with_a_predicate_value_and_unnamed_expression() -> None:
    query = parse_query(f"{T} | extend IsKaseya = Signer has 'kaseya', ReportId + 1 | project IsKaseya, Column1")
    results = query.run(ROWS[3:5], now=NOW)
    assert results == [{"IsKaseya": True, "Column1": 10}, {"IsKaseya": False, "Column1": 11}]


def test_run_without_summarize_returns_the_rows() -> None:
    query = parse_query(f"{T} | where ReportId == 1")
    assert query.run(ROWS, now=NOW) == [ROWS[5]]
    assert query.has_summarize is False


def test_tabular_let_as_in_the_markdown_queries() -> None:
    query = parse_query(
        "let Time_start = now(-5d);\nlet Time_end = now();\n//\n"
        f"let rmmFileSig =\n{T}\n| where Timestamp between (Time_start..Time_end)\n"
        "    | where Signer has 'Xeox' or Signer has 'hs2n Informationstechnologie GmbH'\n"
        "    | summarize FirstSeen=min(Timestamp), LastSeen=max(Timestamp),\n"
        "    Report=make_set(ReportId), Count=count() by DeviceId, DeviceName\n"
        "| extend rmmFileSigName = 'Xeox'\n;\nrmmFileSig"
    )
    signer = "hs2n Informationstechnologie GmbH"
    [result] = query.run([row("d9", signer, 4, 5), row("d9", "Other", 5, 5)], now=NOW)
    assert result["rmmFileSigName"] == "Xeox"
    assert result["Count"] == 1
    hit = query.filter_row(row("d9", signer, 4, 5), now=NOW)
    assert hit is not None and hit[-1] == Evidence("Signer", signer, "has", signer)


def test_tabular_let_can_be_extended_later() -> None:
    query = parse_query(f"let base = {T} | where ReportId > 4;\nbase | where Signer has 'kaseya' | project ReportId")
    assert query.run(ROWS, now=NOW) == [{"ReportId": 5}, {"ReportId": 5}, {"ReportId": 9}]


def test_filter_row_evidence_for_seed_rule_names_the_matching_pattern() -> None:
    query = parse_query(
        "let Time_start = now(-5d);\nlet Time_end = now();\n"
        f"{T}\n| where Timestamp between (Time_start..Time_end)\n"
        "| where Signer has_any ('Enter Srl', 'Enter S.R.L.')\n"
        "| summarize Count=count() by DeviceId"
    )
    signed = row("d1", "ENTER S.R.L.", 1, 1)
    assert query.filter_row(signed, now=NOW) == (
        Evidence("Timestamp", signed["Timestamp"], "between", (NOW - timedelta(days=5), NOW)),
        Evidence("Signer", "ENTER S.R.L.", "has_any", "Enter S.R.L."),
    )
    assert query.filter_row(row("d1", "ENTER S.R.L.", 1, 24 * 6), now=NOW) is None


@pytest.mark.parametrize(
    ("predicate", "signer", "expected"),
    [
        ("Signer has 'a' or Signer has 'b'", "b", (Evidence("Signer", "b", "has", "b"),)),
        ("Signer has 'a' or Signer has 'b'", "a b", (Evidence("Signer", "a b", "has", "a"),)),
        ("not(Signer has 'a')", "b", (Evidence("Signer", "b", "!has", "a"),)),
        (
            "not(Signer has 'a' or Signer == 'c')",
            "b",
            (Evidence("Signer", "b", "!has", "a"), Evidence("Signer", "b", "!=", "c")),
        ),
        ("not(Signer has 'a' and Signer has 'b')", "b", (Evidence("Signer", "b", "!has", "a"),)),
        ("Signer in ('x', 'b')", "b", (Evidence("Signer", "b", "in", "b"),)),
        ("Signer !in ('x', 'y')", "b", (Evidence("Signer", "b", "!in", ("x", "y")),)),
        ("Signer has_all ('b', 'c')", "b c", (Evidence("Signer", "b c", "has_all", ("b", "c")),)),
        ("not(Signer has_any ('x', 'y'))", "b", (Evidence("Signer", "b", "!has_any", ("x", "y")),)),
        ("not(ReportId > 5)", "b", (Evidence("ReportId", 1, "<=", 5),)),
        ("isnotempty(Signer)", "b", (Evidence("Signer", "b", "isnotempty", None),)),
        ("not(isempty(Signer))", "b", (Evidence("Signer", "b", "isnotempty", None),)),
        ("IsTrusted", "b", (Evidence("IsTrusted", True, "==", True),)),
        ("not(IsTrusted == false)", "b", (Evidence("IsTrusted", True, "!=", False),)),
    ],
)
def test_evidence(predicate: str, signer: str, expected: tuple[Evidence, ...]) -> None:
    query = parse_query(f"{T} | where {predicate}")
    assert query.filter_row(row("d", signer, 1, 1, IsTrusted=True), now=NOW) == expected


def test_filter_row_without_where_passes_with_no_evidence() -> None:
    query = parse_query(f"{T} | summarize count()")
    assert query.filter_row({}, now=NOW) == ()


def test_columns_used_and_string_patterns() -> None:
    query = parse_query(
        f"{T} | extend S = Signer | where S has 'a' and not(Issuer startswith 'Microsoft')\n"
        "| where Signer in~ ('x', 'y') and ReportId > 0 and IsTrusted\n"
        "| summarize make_set(SHA1) by DeviceId | extend Z = 'lit'"
    )
    assert query.columns_used == {"Signer", "Issuer", "ReportId", "IsTrusted", "SHA1", "DeviceId"}
    assert query.string_patterns == (
        ("S", "has", "a"),
        ("Issuer", "!startswith", "Microsoft"),
        ("Signer", "in~", "x"),
        ("Signer", "in~", "y"),
    )


def test_query_text_is_kept() -> None:
    text = f"{T} | where Signer has 'x'"
    assert parse_query(text).text == text


def test_query_equality_is_by_text_and_metadata() -> None:
    text = f"{T} | where Signer has 'x' | summarize count() by DeviceId"
    first, second = parse_query(text), parse_query(text)
    assert first == second and hash(first) == hash(second)
    assert first != parse_query(text + " ")
    assert first.has_summarize is True
    assert first.output_columns == ("DeviceId", "count_")

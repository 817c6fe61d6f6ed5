"""The KQL that real hunters write beyond the seed rules (issue 11 item 4): one test per construct."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agent.rules.kql import Evidence, parse_query

T = "DeviceFileCertificateInfo"
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def row(device: str, signer: str | None, report: int, hours_ago: float, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "DeviceId": device,
        "DeviceName": f"{device}.example.org",
        "Signer": signer,
        "ReportId": report,
        "Timestamp": NOW - timedelta(hours=hours_ago),
        "FileSize": 100 * report,
    }
    out.update(extra)
    return out


ROWS = [
    row("d1", "AnyDesk Software GmbH", 1, 50),
    row("d1", "AnyDesk Software GmbH", 2, 10),
    row("d2", "Splashtop Inc.", 3, 30),
    row("d2", None, 4, 5),
    row("d3", "Kaseya Holdings Inc.", 5, 1),
]


def run(query: str, rows: list[dict[str, Any]] = ROWS) -> list[dict[str, Any]]:
    return parse_query(query).run(rows, now=NOW)


def reports(results: list[dict[str, Any]]) -> list[Any]:
    return [result["ReportId"] for result in results]


# --- order by / sort by ----------------------------------------------------------------------------------


def test_order_by_defaults_to_descending() -> None:
    assert reports(run(f"{T} | order by ReportId")) == [5, 4, 3, 2, 1]
    assert reports(run(f"{T} | sort by ReportId asc")) == [1, 2, 3, 4, 5]


def test_sort_by_several_keys() -> None:
    assert reports(run(f"{T} | sort by DeviceId asc, Timestamp desc")) == [2, 1, 4, 3, 5]


def test_sort_nulls_first_and_last() -> None:
    rows = [row("a", "x", 1, 1), row("b", "y", 2, 2, FileSize=None), row("c", "z", 3, 3)]
    assert reports(run(f"{T} | sort by FileSize desc", rows)) == [3, 1, 2]  # desc: nulls last
    assert reports(run(f"{T} | sort by FileSize asc", rows)) == [2, 1, 3]  # asc: nulls first
    assert reports(run(f"{T} | sort by FileSize desc nulls first", rows)) == [2, 3, 1]
    assert reports(run(f"{T} | sort by FileSize asc nulls last", rows)) == [1, 3, 2]


# --- take / limit / top ----------------------------------------------------------------------------------


def test_take_and_limit() -> None:
    assert reports(run(f"{T} | take 2")) == [1, 2]
    assert reports(run(f"{T} | limit 0")) == []
    assert reports(run(f"{T} | sort by ReportId asc | limit 10")) == [1, 2, 3, 4, 5]


def test_top_n_by() -> None:
    assert reports(run(f"{T} | top 2 by Timestamp")) == [5, 4]
    assert reports(run(f"{T} | top 2 by FileSize asc")) == [1, 2]


# --- project variants, distinct, count --------------------------------------------------------------------


def test_project_away() -> None:
    query = parse_query(f"{T} | project DeviceId, Signer, ReportId | project-away Signer")
    assert query.output_columns == ("DeviceId", "ReportId")
    assert query.run(ROWS[:1], now=NOW) == [{"DeviceId": "d1", "ReportId": 1}]


def test_project_rename() -> None:
    query = parse_query(f"{T} | project DeviceId, Signer | project-rename Publisher = Signer, Device = DeviceId")
    assert query.output_columns == ("Device", "Publisher")
    assert query.run(ROWS[:1], now=NOW) == [{"Device": "d1", "Publisher": "AnyDesk Software GmbH"}]


def test_project_reorder() -> None:
    query = parse_query(f"{T} | project DeviceId, Signer, ReportId | project-reorder ReportId, Signer")
    assert query.output_columns == ("ReportId", "Signer", "DeviceId")
    assert list(query.run(ROWS[:1], now=NOW)[0]) == ["ReportId", "Signer", "DeviceId"]


def test_distinct() -> None:
    assert run(f"{T} | distinct DeviceId") == [{"DeviceId": "d1"}, {"DeviceId": "d2"}, {"DeviceId": "d3"}]
    assert len(run(f"{T} | distinct DeviceId, Signer")) == 4
    assert len(run(f"{T} | project DeviceId | distinct *")) == 3


def test_count_operator() -> None:
    query = parse_query(f"{T} | where Signer has 'AnyDesk' | count")
    assert query.output_columns == ("Count",)
    assert query.run(ROWS, now=NOW) == [{"Count": 2}]
    assert run(f"{T} | where Signer has 'nobody' | count") == [{"Count": 0}]


def test_row_level_filter_stops_at_the_first_non_row_stage() -> None:
    query = parse_query(f"{T} | where Signer has 'AnyDesk' | project-away FileSize | take 1 | where ReportId > 1")
    assert query.filter_row(ROWS[1], now=NOW) == (Evidence("Signer", "AnyDesk Software GmbH", "has", "AnyDesk"),)
    assert query.filter_row(ROWS[2], now=NOW) is None
    assert query.run(ROWS, now=NOW) == []  # take 1 keeps report 1, which the later where drops
    assert not query.row_level and parse_query(f"{T} | where Signer has 'x' | project Signer").row_level


# --- TimeGenerated ------------------------------------------------------------------------------------------


def test_time_generated_is_timestamp() -> None:
    query = parse_query(f"{T} | where TimeGenerated > ago(12h) | project TimeGenerated, ReportId")
    assert query.output_columns == ("TimeGenerated", "ReportId")
    assert query.run(ROWS, now=NOW) == [
        {"TimeGenerated": NOW - timedelta(hours=10), "ReportId": 2},
        {"TimeGenerated": NOW - timedelta(hours=5), "ReportId": 4},
        {"TimeGenerated": NOW - timedelta(hours=1), "ReportId": 5},
    ]
    assert "Timestamp" in query.columns_used
    summarized = parse_query(f"{T} | summarize FirstSeen = min(TimeGenerated) by DeviceId")
    assert summarized.run(ROWS, now=NOW)[0] == {"DeviceId": "d1", "FirstSeen": NOW - timedelta(hours=50)}


def test_a_query_defined_time_generated_wins() -> None:
    query = parse_query(f"{T} | extend TimeGenerated = 'mine' | project TimeGenerated")
    assert query.run(ROWS[:1], now=NOW) == [{"TimeGenerated": "mine"}]


# --- scalar functions ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("tolower(Signer)", "anydesk software gmbh"),
        ("toupper(Signer)", "ANYDESK SOFTWARE GMBH"),
        ("toupper('straße')", "STRASSE"),
        ("tostring(ReportId)", "1"),
        ("tostring(true)", "true"),
        ("tostring(datetime(2026-01-02 03:04:05))", "2026-01-02T03:04:05Z"),
        ("tostring(1d + 2h)", "1.02:00:00"),
        ("tostring(Nope)", ""),
        ("strlen(Signer)", 21),
        ("strlen('Krämer')", 6),
        ("strcat(DeviceId, '/', ReportId, '/', Signer)", "d1/1/AnyDesk Software GmbH"),
        ("iff(ReportId > 0, 'pos', 'neg')", "pos"),
        ("iif(ReportId > 5, 'big', 'small')", "small"),
        ("iff(isnull(FileSize), 0, FileSize)", 100),
        ("bin(FileSize, 64)", 64),
        ("bin(2.5, 1)", 2.0),
        ("bin(Timestamp, 1d)", datetime(2026, 2, 27, tzinfo=UTC)),
        ("bin(90m, 1h)", timedelta(hours=1)),
    ],
)
def test_scalar_functions(expression: str, expected: Any) -> None:
    text = f"{T} | extend Nope = '' | project Value = {expression}"
    assert run(text, ROWS[:1]) == [{"Value": expected}]


def test_scalar_functions_in_where() -> None:
    assert reports(run(f"{T} | where tolower(Signer) == 'splashtop inc.'")) == [3]
    assert reports(run(f"{T} | where toupper(Signer) startswith 'KASEYA'")) == [5]
    assert reports(run(f"{T} | where strlen(Signer) > 20")) == [1, 2]
    assert reports(run(f"{T} | where isnotnull(FileSize) and isnull(ProcessId)")) == [1, 2, 3, 4, 5]
    assert reports(run(f"{T} | where iff(DeviceId == 'd2', true, false)")) == [3, 4]
    assert reports(run(f"{T} | where strcat(DeviceId, ':', Signer) has 'd3 Kaseya'")) == [5]


def test_bin_in_summarize_by_keeps_the_column_name() -> None:
    query = parse_query(f"{T} | summarize Count = count() by bin(Timestamp, 1d)")
    assert query.output_columns == ("Timestamp", "Count")
    assert query.run(ROWS, now=NOW) == [
        {"Timestamp": datetime(2026, 2, 27, tzinfo=UTC), "Count": 1},
        {"Timestamp": datetime(2026, 3, 1, tzinfo=UTC), "Count": 3},
        {"Timestamp": datetime(2026, 2, 28, tzinfo=UTC), "Count": 1},
    ]


def test_arg_max_with_star() -> None:
    query = parse_query(f"{T} | summarize arg_max(Timestamp, *) by DeviceId")
    columns = query.output_columns
    assert columns[:2] == ("DeviceId", "Timestamp") and "Signer" in columns and "ReportId" in columns
    results = {result["DeviceId"]: result for result in query.run(ROWS, now=NOW)}
    assert results["d1"]["ReportId"] == 2 and results["d1"]["Timestamp"] == NOW - timedelta(hours=10)
    assert results["d2"]["ReportId"] == 4 and results["d2"]["Signer"] == ""


def test_arg_min_with_columns() -> None:
    query = parse_query(f"{T} | summarize First = arg_min(Timestamp, ReportId, Who = Signer) by DeviceId")
    assert query.output_columns == ("DeviceId", "First", "ReportId", "Who")
    assert query.run(ROWS, now=NOW)[0] == {
        "DeviceId": "d1",
        "First": NOW - timedelta(hours=50),
        "ReportId": 1,
        "Who": "AnyDesk Software GmbH",
    }


# --- lists: dynamic([...]) and datatable --------------------------------------------------------------------


def test_dynamic_list_on_the_right_of_in_and_has_any() -> None:
    assert reports(run(f"{T} | where Signer in (dynamic(['Splashtop Inc.', 'x']))")) == [3]
    let = f"let vendors = dynamic(['anydesk', 'kaseya']);\n{T} | where Signer has_any (vendors)"
    assert reports(run(let)) == [1, 2, 5]


def test_datatable_as_a_list() -> None:
    inline = f"{T} | where Signer in~ (datatable(Name: string)['splashtop inc.', 'KASEYA HOLDINGS INC.'])"
    assert reports(run(inline)) == [3, 5]
    let = (
        "let Signers = datatable(Signer: string)\n  ['AnyDesk Software', 'Splashtop'];\n"
        f"{T} | where Signer has_any (Signers)"
    )
    assert reports(run(let)) == [1, 2, 3]


# --- whole queries as hunters write them ---------------------------------------------------------------------


def test_a_sentinel_style_hunting_query() -> None:
    query = parse_query(
        "let lookback = 14d;\n"
        "let RMMSigners = dynamic(['AnyDesk Software GmbH', 'splashtop inc.']);\n"
        f"{T}\n"
        "| where TimeGenerated > ago(lookback)\n"
        "| where Signer in~ (RMMSigners)\n"
        "| summarize arg_max(TimeGenerated, *) by DeviceId\n"
        "| project TimeGenerated, DeviceName, Signer, ReportId\n"
        "| sort by TimeGenerated desc\n"
        "| take 100"
    )
    assert query.output_columns == ("TimeGenerated", "DeviceName", "Signer", "ReportId")
    assert query.run(ROWS, now=NOW) == [
        {
            "TimeGenerated": NOW - timedelta(hours=10),
            "DeviceName": "d1.example.org",
            "Signer": ROWS[1]["Signer"],
            "ReportId": 2,
        },
        {
            "TimeGenerated": NOW - timedelta(hours=30),
            "DeviceName": "d2.example.org",
            "Signer": "Splashtop Inc.",
            "ReportId": 3,
        },
    ]
    assert query.filter_row(ROWS[0], now=NOW) is not None  # row level: both wheres


def test_a_daily_count_per_signer_with_top() -> None:
    query = parse_query(
        f"{T} | where isnotempty(Signer)\n"
        "| extend Vendor = toupper(Signer)\n"
        "| summarize Files = dcount(ReportId), LastSeen = max(Timestamp) by Vendor, Day = bin(Timestamp, 1d)\n"
        "| top 2 by Files desc\n"
        "| project-away Day\n"
        "| project-rename Publisher = Vendor"
    )
    assert query.output_columns == ("Publisher", "Files", "LastSeen")
    anydesk = "ANYDESK SOFTWARE GMBH"
    assert query.run(ROWS, now=NOW) == [  # every group has one file: top keeps the first two, stably
        {"Publisher": anydesk, "Files": 1, "LastSeen": NOW - timedelta(hours=50)},
        {"Publisher": anydesk, "Files": 1, "LastSeen": NOW - timedelta(hours=10)},
    ]

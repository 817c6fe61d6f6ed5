"""The published queries parse, and their patterns match the real signer strings they are meant for."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from rules_refdata import (
    NOW,
    SENTINEL_DIR,
    cert_row,
    crossmatch_rows,
    jischell_queries,
    markdown_queries,
    require_reference,
    signer_rows,
)

from agent.rules.kql import Evidence, Query, parse_query
from agent.rules.loader import load_rules
from agent.rules.terms import fold, has_terms

SEED_OUTPUT = ("DeviceId", "DeviceName", "FirstSeen", "LastSeen", "Report", "Count")


@pytest.fixture(scope="module")
def sentinel_by_tool() -> dict[str, Query]:
    require_reference()
    ruleset = load_rules([SENTINEL_DIR])
    assert ruleset.problems == ()
    return {rule.tool: rule.query for rule in ruleset.rules}


@pytest.fixture(scope="module")
def sentinel_by_id() -> dict[str, Query]:
    require_reference()
    return {rule.id: rule.query for rule in load_rules([SENTINEL_DIR]).rules}


@pytest.fixture(scope="module")
def markdown_by_tool() -> dict[str, Query]:
    return {tool: parse_query(text) for tool, text in markdown_queries().items()}


@pytest.fixture(scope="module")
def queries_by_tool(sentinel_by_tool: dict[str, Query], markdown_by_tool: dict[str, Query]) -> dict[str, list[Query]]:
    out: dict[str, list[Query]] = {}
    for tool, query in [*sentinel_by_tool.items(), *markdown_by_tool.items()]:
        out.setdefault(tool, []).append(query)
    out.setdefault("RAdmin", []).append(parse_query(jischell_queries()["RAdmin"]))  # only in jischell
    return out


def test_all_51_sentinel_rules_parse_with_the_seed_shape() -> None:
    require_reference()
    paths = sorted(SENTINEL_DIR.glob("*.yaml"))
    assert len(paths) == 51
    for path in paths:
        query = parse_query(yaml.safe_load(path.read_text(encoding="utf-8"))["query"])
        assert query.output_columns == SEED_OUTPUT, path.name
        assert query.columns_used == {"Timestamp", "Signer", "ReportId", "DeviceId", "DeviceName"}, path.name
        assert query.string_patterns, path.name
        assert all(column == "Signer" and op in ("has", "has_any") for column, op, _ in query.string_patterns)


def test_all_10_markdown_queries_parse_and_add_the_tool_name() -> None:
    queries = markdown_queries()
    assert len(queries) == 10
    for tool, text in queries.items():
        query = parse_query(text)
        assert query.output_columns == (*SEED_OUTPUT, "rmmFileSigName"), tool
        [result] = query.run([cert_row(query.string_patterns[0][2])], now=NOW)
        assert result["rmmFileSigName"] == tool
        assert result["Count"] == 1


def test_all_52_jischell_queries_parse() -> None:
    queries = jischell_queries()
    assert len(queries) == 52
    for tool, text in queries.items():
        assert parse_query(text).output_columns == SEED_OUTPUT, tool


def _published_pattern_rows() -> Iterator[dict[str, str]]:
    for row in signer_rows():
        if row["source"] in ("sentinel", "jischell") and row["origin_kind"] in ("rule_yaml", "ahq_markdown"):
            yield row


def test_every_published_pattern_matches_itself_through_its_rule(
    sentinel_by_id: dict[str, Query], queries_by_tool: dict[str, list[Query]]
) -> None:
    checked = 0
    for row in _published_pattern_rows():
        if row["origin_kind"] == "rule_yaml" and row["rule_id"] in sentinel_by_id:
            queries = [sentinel_by_id[row["rule_id"]]]
        else:
            queries = queries_by_tool[row["tool_name"]]
        signer = row["signer"]
        for candidate in (signer, signer.upper(), signer.lower(), f"{signer} Ltd.", f"Copyright {signer}"):
            hits = [q.filter_row(cert_row(candidate), now=NOW) for q in queries]
            evidence = [ev for hit in hits if hit is not None for ev in hit if ev.column == "Signer"]
            assert evidence, (row["tool_name"], candidate)
            # the evidence names the pattern that matched, which has the same terms as the signer
            assert any(has_terms(candidate, ev.pattern) and has_terms(ev.pattern, signer) for ev in evidence)
        checked += 1
    assert checked >= 140  # 64 sentinel + 65 jischell YAML + 19 markdown rows


# Where our term semantics legitimately differ from the CSV's regex approximation of `has`.
# Each key is (rule pattern, LOLRMM signer string) matched by us but absent from the CSV.
CROSSMATCH_DIFFERENCES = {
    # SPEC: punctuation only separates terms, so the comma in the pattern does not matter.
    ("Servably, Inc.", "Servably Inc."),
    # A full subject DN from LOLRMM's Artifacts.Other: its CN terms are all there. A real Signer
    # column never holds a DN (it is the simple display name), so this cannot cause a false hit.
    (
        "Point B Ltd",
        "CN=POINT B LTD, O=POINT B LTD, L=Limassol, ST=Limassol, C=CY "
        "(jurisdictionC=CY, serialNumber=HE 430957, businessCategory=Private Organization)",
    ),
}


def _lolrmm_signers() -> set[str]:
    out: set[str] = set()
    for row in signer_rows():
        if row["source"] == "lolrmm":
            out.add(row["signer"])
            out.update(cn for cn in row["cert_subject_cn"].split(";") if cn)
    return out


def test_crossmatch_pairs_match_through_the_rules(queries_by_tool: dict[str, list[Query]]) -> None:
    checked = 0
    for row in crossmatch_rows():
        if not row["lolrmm_signer"]:
            continue
        pattern, signer = row["rule_signer_pattern"], row["lolrmm_signer"]
        for tool in row["rule_tools"].split(";"):
            queries = [q for q in queries_by_tool[tool] if any(p == pattern for _, _, p in q.string_patterns)]
            assert queries, (tool, pattern)
            for query in queries:
                hit = query.filter_row(cert_row(signer), now=NOW)
                assert hit is not None, (tool, pattern, signer)
                [op] = {op for column, op, p in query.string_patterns if p == pattern and column == "Signer"}
                assert Evidence("Signer", signer, op, pattern) in hit
                checked += 1
    assert checked >= 50


def test_has_agrees_with_the_crossmatch_csv_except_where_documented() -> None:
    rows = crossmatch_rows()
    patterns = {row["rule_signer_pattern"] for row in rows}
    csv_pairs = {(row["rule_signer_pattern"], row["lolrmm_signer"]) for row in rows if row["lolrmm_signer"]}
    signers = {row["signer"] for row in signer_rows() if row["source"] == "lolrmm"}
    ours = {(pattern, signer) for pattern in patterns for signer in signers if has_terms(signer, pattern)}
    assert csv_pairs - ours == set()
    assert ours - csv_pairs == CROSSMATCH_DIFFERENCES


# Known disagreements between rule patterns and the vendors' current certificates (reference README).
@pytest.mark.parametrize(
    ("tool", "signer", "expected"),
    [
        ("DWService", "DWSNET OÜ", True),
        ("DWService", "DWSNET srl", False),
        ("Pulseway", "MMSOFT Design Ltd.", True),
        ("Pulseway", "Kaseya Holdings Inc.", False),
        ("Kaseya", "Kaseya Holdings Inc.", True),  # so the Kaseya rule fires on Pulseway
        ("NinjaRMM", "NinjaOne LLC", False),
        ("TightVNC", "GlavSoft OOO", True),
        ("ServerEye", "Krämer IT Solutions GmbH", True),
        ("ServerEye", "Kramer IT Solutions GmbH", False),
        ("Alpemix", "TEKNOPARS BİLİŞİM TEKNOLOJİLERİ SANAYİ VE TİCARET LTD.ŞTİ.", True),
        ("Alpemix", "Teknopars Bilisim Ltd", True),  # via the markdown's ASCII alternative
        ("DattoRMM", "Datto, LLC", False),
        ("DattoRMM", "Datto Inc", True),
        ("SyncroMSP", "Servably Inc.", True),
        ("ZohoAssist", "ZOHO Corporation Private Limited", True),
        ("ConnectWise", "ConnectWise, LLC", True),
        ("Xeox", "hs2n Informationstechnologie GmbH", True),
        ("Xeox", "Xeox GmbH", True),
        ("DameWare", "Dameware", False),  # summary-only value; the rule needs 'DameWare Development'
        ("AnyDesk", "philandro Software GmbH", True),
        ("ISLOnline", "ISL Online Ltd", True),
        ("BarracudaRMM", "AVG Technologies", False),  # summary-only value, in no query
        ("RAdmin", "Famatech Corp.", True),
    ],
)
def test_documented_rule_vs_certificate_cases(
    queries_by_tool: dict[str, list[Query]], tool: str, signer: str, expected: bool
) -> None:
    hits = [q.filter_row(cert_row(signer), now=NOW) for q in queries_by_tool[tool]]
    assert any(hit is not None for hit in hits) is expected


def test_generic_signers_hit_no_published_rule(queries_by_tool: dict[str, list[Query]]) -> None:
    generic = [
        "Microsoft Corporation",
        "Microsoft Windows",
        "Simon Tatham",
        "win.rar GmbH",
        "Google LLC",
        "Martin Prikryl",
    ]
    for tool, queries in queries_by_tool.items():
        for query in queries:
            for signer in generic:
                assert query.filter_row(cert_row(signer), now=NOW) is None, (tool, signer)


def test_seed_window_is_five_days(sentinel_by_tool: dict[str, Query]) -> None:
    query = sentinel_by_tool["Action1"]
    assert query.filter_row(cert_row("Action1 Corporation", age=timedelta(days=5)), now=NOW) is not None
    assert query.filter_row(cert_row("Action1 Corporation", age=timedelta(days=5, seconds=1)), now=NOW) is None
    assert query.filter_row(cert_row("Action1 Corporation", age=timedelta(seconds=-1)), now=NOW) is None


def test_seed_rule_result_shape(sentinel_by_tool: dict[str, Query]) -> None:
    query = sentinel_by_tool["TeamViewer"]
    other = "b" * 40
    rows = [
        cert_row("TeamViewer Germany GmbH", age=timedelta(days=3), ReportId=7),
        cert_row("TeamViewer GmbH", age=timedelta(days=1), ReportId=3),
        cert_row("TeamViewer GmbH", age=timedelta(days=2), ReportId=3),
        cert_row("TeamViewer GmbH", age=timedelta(days=2), ReportId=9, DeviceId=other, DeviceName="other"),
        cert_row("AnyDesk Software GmbH", age=timedelta(days=1), ReportId=4),
        cert_row("TeamViewer GmbH", age=timedelta(days=9), ReportId=1),
    ]
    results = query.run(rows, now=NOW)
    assert results == [
        {
            "DeviceId": "a" * 40,
            "DeviceName": "host.example.org",
            "FirstSeen": NOW - timedelta(days=3),
            "LastSeen": NOW - timedelta(days=1),
            "Report": [3, 7],
            "Count": 3,
        },
        {
            "DeviceId": other,
            "DeviceName": "other",
            "FirstSeen": NOW - timedelta(days=2),
            "LastSeen": NOW - timedelta(days=2),
            "Report": [9],
            "Count": 1,
        },
    ]
    assert fold(results[0]["DeviceName"]) == "host.example.org"


def test_reference_dirs_exist() -> None:
    require_reference()
    assert Path(SENTINEL_DIR).is_dir()

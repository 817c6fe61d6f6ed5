"""Signed version info (issue 11.1 and 11.2): VS_VERSIONINFO / MSI facts in every row, malformed
resources as warnings, exclusion fields, and the renamed-binary fixtures firing the right rules."""

from __future__ import annotations

import datetime as dt
import io
import random
from pathlib import Path

import pytest

from agent.exclusions import parse_expression
from agent.extract.authenticode import TrustVerifier, extract_stream, load_roots
from agent.extract.versioninfo import (
    EMPTY,
    VersionInfo,
    parse_msi_version_info,
    parse_pe_version_info,
    read_pe_version_info,
)
from agent.resources import shipped_rules_dir
from agent.rows import Device, build_rows
from agent.rules.loader import Rule, load_rules
from agent.schema import COLUMN_NAMES, FILE_STATUSES
from agent.store import facts_from_json, facts_to_json
from tests.conftest import FIXTURES, TEST_ROOT_CA, manifest

NOW = dt.datetime(2026, 1, 15, 12, 0, tzinfo=dt.UTC)
DEVICE = Device("0" * 40, "test.invalid")
COLUMNS = (
    "VersionInfoCompanyName",
    "VersionInfoProductName",
    "VersionInfoProductVersion",
    "VersionInfoOriginalFileName",
    "VersionInfoInternalFileName",
    "VersionInfoFileDescription",
)
RENAMED = [entry for entry in manifest() if entry["path"].startswith("files/renamed/")]


@pytest.fixture(scope="module")
def verifier() -> TrustVerifier:
    return TrustVerifier(load_roots([TEST_ROOT_CA]))


@pytest.fixture(scope="module")
def rules() -> tuple[Rule, ...]:
    ruleset = load_rules([shipped_rules_dir()], attribution=None)
    assert ruleset.problems == ()
    return ruleset.rules


def _rows(path: str, verifier: TrustVerifier) -> list[dict]:
    data = (FIXTURES / path).read_bytes()
    facts = extract_stream(io.BytesIO(data), len(data), verifier=verifier)
    assert facts.status == "OK", facts.detail
    return build_rows(facts, str(FIXTURES / path), DEVICE, NOW, "scan")


def test_schema_has_the_version_columns() -> None:
    assert set(COLUMNS) <= set(COLUMN_NAMES)


@pytest.mark.parametrize("entry", RENAMED, ids=lambda e: e["path"])
def test_renamed_binary_rows_carry_signed_version_info(entry: dict, verifier: TrustVerifier) -> None:
    (row,) = _rows(entry["path"], verifier)
    info = entry["version_info"]
    assert row["FileName"] == "update.exe" and row["ProgramName"] == ""
    assert row["DigestValid"] is True  # the version strings are covered by the digest
    assert row["VersionInfoProductName"] == info["ProductName"]
    assert row["VersionInfoOriginalFileName"] == info["OriginalFilename"]
    assert row["VersionInfoFileDescription"] == info["FileDescription"]
    assert row["VersionInfoCompanyName"] == info.get("CompanyName", "")
    assert row["VersionInfoProductVersion"] == "1.0"
    assert row["VersionInfoInternalFileName"] == Path(entry["path"]).parent.name


@pytest.mark.parametrize("entry", RENAMED, ids=lambda e: e["path"])
def test_renamed_remote_access_fires_and_other_products_do_not(
    entry: dict, verifier: TrustVerifier, rules: tuple[Rule, ...]
) -> None:
    (row,) = _rows(entry["path"], verifier)
    fired = sorted(Path(rule.path).name for rule in rules if rule.query.filter_row(row, now=NOW) is not None)
    if entry["expected_rule"] is None:
        assert fired == []
    else:
        assert entry["expected_rule"] in fired
        # the same file without its version info: renaming alone defeats nothing else
        bare = dict(row, **dict.fromkeys(COLUMNS, ""))
        assert entry["expected_rule"] not in [
            Path(rule.path).name for rule in rules if rule.query.filter_row(bare, now=NOW) is not None
        ]


def test_renamed_fixtures_cover_the_issue_vendors() -> None:
    expected = {e["expected_rule"] for e in RENAMED if e["expected_rule"]}
    assert {
        "rmmhunt_GoToAssist_filesig.yaml",
        "rmmhunt_Goverlan_filesig.yaml",
        "rmmhunt_IvantiRemoteControl_filesig.yaml",
        "rmmhunt_RemoteCall_filesig.yaml",
        "rmmhunt_Veyon_filesig.yaml",
        "rmmhunt_MeshCentral_filesig.yaml",
        "rmmhunt_RuDesktop_filesig.yaml",
    } <= expected
    signers = {e["signers"][0] for e in RENAMED}
    for signer in signers:  # each vendor has a remote-access product and another one
        kinds = {e["expected_rule"] is None for e in RENAMED if e["signers"][0] == signer}
        assert kinds == {True, False}, signer


def test_msi_summary_and_property_table(verifier: TrustVerifier) -> None:
    (row,) = _rows("files/signed.msi", verifier)
    assert row["VersionInfoCompanyName"] == "rmmhunt tests"  # Property Manufacturer
    assert row["VersionInfoProductName"] == "rmmhunt fixture signed.msi"  # Property ProductName
    assert row["VersionInfoProductVersion"] == "1.0.0"  # Property ProductVersion
    assert row["VersionInfoFileDescription"] == "Installation Database"  # summary Title
    assert parse_msi_version_info({"author": "A", "subject": "S", "title": "T"}, {}) == VersionInfo(
        company_name="A", product_name="S", file_description="T"
    )


def test_pe_without_resources_has_empty_version_info(verifier: TrustVerifier) -> None:
    (row,) = _rows("files/pulseway.exe", verifier)
    assert all(row[column] == "" for column in COLUMNS)  # never null: Kusto strings


def test_facts_round_trip_through_the_cache(verifier: TrustVerifier) -> None:
    data = (FIXTURES / "files/renamed/goverlan/update.exe").read_bytes()
    facts = extract_stream(io.BytesIO(data), len(data), verifier=verifier)
    assert facts_from_json(facts_to_json(facts)) == facts
    old = facts_to_json(facts).replace('"version_info"', '"ignored_version_info"')  # a pre-11.1 cache entry
    import json

    raw = json.loads(old)
    raw.pop("ignored_version_info")
    assert facts_from_json(json.dumps(raw)).version_info == EMPTY


def test_version_info_reads_only_headers_and_the_resource_section() -> None:
    data = (FIXTURES / "files/renamed/veyon/update.exe").read_bytes()

    class Counting(io.BytesIO):
        total = 0

        def read(self, n: int | None = -1) -> bytes:
            chunk = super().read(n)
            Counting.total += len(chunk)
            return chunk

    info, warnings = read_pe_version_info(Counting(data), len(data))
    assert info.product_name == "Veyon" and warnings == ()
    assert Counting.total < len(data)  # the code section and the certificate table are not read


@pytest.mark.parametrize("seed", range(4))
def test_malformed_resources_are_a_warning_never_a_failure(seed: int, verifier: TrustVerifier) -> None:
    """Flip bytes inside the resource section (and truncate): the file keeps its status and signer."""
    rng = random.Random(seed)
    source = sorted(RENAMED, key=lambda e: e["path"])[seed]
    original = (FIXTURES / source["path"]).read_bytes()
    rsrc = original.find(b"V\x00S\x00_\x00V\x00E\x00R")  # the VS_VERSIONINFO key, inside .rsrc
    assert rsrc > 0
    warned = 0
    for _ in range(25):
        data = bytearray(original)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(max(0, rsrc - 256), rsrc + 512)] = rng.randrange(256)
        info, warnings = parse_pe_version_info(bytes(data))
        assert isinstance(info, VersionInfo)
        warned += bool(warnings)
        facts = extract_stream(io.BytesIO(bytes(data)), len(data), verifier=verifier)
        assert facts.status == "OK"  # the signature still parses; only the digest breaks
        assert facts.signatures[0].signer.display_name == source["signers"][0]
        assert facts.signatures[0].digest_valid is False
    for cut in (rsrc - 64, rsrc + 16):  # truncated inside the resource section
        info, warnings = read_pe_version_info(io.BytesIO(original[:cut]), cut)
        assert isinstance(info, VersionInfo)
        facts = extract_stream(io.BytesIO(original[:cut]), cut, verifier=verifier)
        assert facts.status in FILE_STATUSES


def test_garbage_is_a_warning() -> None:
    info, warnings = parse_pe_version_info(b"MZ" + b"\xff" * 200)
    assert info == EMPTY and warnings and warnings[0].startswith("version info not read")
    info, warnings = read_pe_version_info(io.BytesIO(b"MZ\x00"), 3)
    assert info == EMPTY and warnings


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ('file.original_name == "govreachclient.exe"', True),
        ('file.product has "Goverlan"', True),
        ('file.company == "EasyVista"', True),
        ('file.description contains "remote control"', True),
        ('file.product == "EV Service Manager"', False),
    ],
)
def test_exclusion_fields(expression: str, expected: bool, verifier: TrustVerifier) -> None:
    (row,) = _rows("files/renamed/goverlan/update.exe", verifier)
    assert parse_expression(expression).matches(row) is expected


def test_a_store_from_before_the_version_columns_gets_them(tmp_path: Path, verifier: TrustVerifier) -> None:
    import sqlite3

    from agent.store import Store

    path = tmp_path / "rmmhunt.db"
    Store(path).close()
    db = sqlite3.connect(path)
    for column in COLUMNS:  # the pre-11.1 table
        db.execute(f'ALTER TABLE cert_rows DROP COLUMN "{column}"')
    db.commit()
    db.close()
    with Store(path) as store:
        rows = _rows("files/renamed/veyon/update.exe", verifier)
        store.insert_rows(rows)
        (stored,) = list(store.iter_rows())
    assert stored["VersionInfoProductName"] == "Veyon"


def test_msi_summary_reader_equals_olefile_on_the_fixtures() -> None:
    """The bounded SummaryInformation reader gives what olefile's get_metadata gives, where
    olefile parses (it is not used because it loops on hostile vector counts)."""
    import olefile

    from agent.extract.versioninfo import _msi_summary, _text

    for name in ("signed.msi", "unsigned.msi"):
        ole = olefile.OleFileIO(str(FIXTURES / "files" / name))
        try:
            meta = ole.get_metadata()
            expected = {k: _text(getattr(meta, k) or b"") for k in ("author", "subject", "title")}
            got = _msi_summary(ole)
        finally:
            ole.close()
        assert expected["title"], name  # the fixtures carry a summary: the comparison is not empty
        assert {k: got.get(k, "") for k in expected} == expected, name

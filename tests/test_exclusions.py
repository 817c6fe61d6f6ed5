"""The exclusion language (SPEC section 3): table-driven, no binaries, no I/O beyond the example config."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from agent.exclusions import (
    VALID_FIELDS,
    Exclusion,
    ExclusionError,
    ExclusionProblem,
    Expression,
    first_exclusion,
    parse_exclusions,
    parse_expression,
)
from agent.schema import COLUMN_NAMES

REPO = Path(__file__).resolve().parents[1]
PULSEWAY_RULE = "6192b741-4540-4416-8dbb-ce0405166d0a"

# A file found by a disk scan: no process facts.
SCAN_ROW: dict[str, Any] = {
    "DeviceName": "ws01.corp.example.com",
    "SHA1": "3f786850e387550fdab836ed7e6dc881de23001b",
    "Signer": "MMSoft Design Ltd.",
    "SignerHash": "89f8a5f1c8a1b0e6d1d1f3a1c0c8b5d0e9e6a3f2",
    "Issuer": "DigiCert Trusted G4 Code Signing RSA4096 SHA384 2021 CA1",
    "IsTrusted": True,
    "FolderPath": r"C:\Program Files\Pulseway\PCMonitorManager.exe",
    "FileName": "PCMonitorManager.exe",
    "FileSize": 2_097_152,
    "SHA256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "Source": "scan",
    "ProcessId": None,
    "ProcessName": None,
    "ProcessUser": "",
    "ParentProcessName": None,
}
# The same file as the image of a running process.
PROCESS_ROW: dict[str, Any] = SCAN_ROW | {
    "Source": "process",
    "ProcessId": 4242,
    "ProcessName": "PCMonitorManager.exe",
    "ProcessUser": r"CORP\alice",
    "ParentProcessName": "services.exe",
}


def row(**changes: Any) -> dict[str, Any]:
    return PROCESS_ROW | changes


def matches(text: str, data: dict[str, Any]) -> bool:
    return parse_expression(text).matches(data)


def error_of(text: str) -> ExclusionError:
    with pytest.raises(ExclusionError) as caught:
        parse_expression(text)
    return caught.value


# --------------------------------------------------------------------------------------------
# Operators


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('file.name == "PCMonitorManager.exe"', True),
        ('file.name == "PCMonitorManager"', False),
        ('file.name != "PCMonitorManager.exe"', False),
        ('file.name != "pulseway.exe"', True),
        ('file.name contains "monitor"', True),
        ('file.name contains "pulseway"', False),
        ('file.path startswith "C:\\Program Files\\Pulseway"', True),
        ('file.path startswith "Program Files"', False),
        ('file.name endswith ".exe"', True),
        ('file.name endswith ".msi"', False),
        ('signer has "MMSoft Design"', True),
        ('signer has "MMSoft"', True),
        ('signer has "Soft Design"', False),  # terms are whole: "Soft" is not the term "MMSoft"
        ('signer has "Design MMSoft"', False),  # contiguous and in order
        ('file.name matches "^pcmonitor.*\\.exe$"', True),
        ('file.name matches "manager"', True),  # search, not full match
        ('file.name matches "^manager"', False),
        ('file.name in ["a.exe", "pcmonitormanager.exe"]', True),
        ('file.name in ["a.exe", "b.exe",]', False),
        ("file.size == 2097152", True),
        ("file.size == 2097153", False),
        ("file.size != 1", True),
        ("file.size in [1, 2097152]", True),
        ("file.size in [1, 2]", False),
        ("process.pid == 4242", True),
        ("process.pid in [1, 4]", False),
        ("is_trusted == true", True),
        ("is_trusted == false", False),
        ("is_trusted != false", True),
        ("is_trusted", True),
        ("!is_trusted", False),
        ("file.size == 2097152.0", True),
    ],
)
def test_operator(text: str, expected: bool) -> None:
    assert matches(text, PROCESS_ROW) is expected


def test_single_quoted_strings_and_escapes() -> None:
    assert matches("file.name == 'PCMonitorManager.exe'", PROCESS_ROW)
    assert matches(r"file.name == 'it\'s.exe'", row(FileName="it's.exe"))
    assert matches(r'file.name == "say \"hi\".exe"', row(FileName='say "hi".exe'))
    # Backslashes other than \\ \" \' are kept, so Windows paths and regexes read naturally.
    assert matches(r'file.path == "C:\Program Files\Pulseway\PCMonitorManager.exe"', PROCESS_ROW)
    assert matches(r'file.path == "C:\\Program Files\\Pulseway\\PCMonitorManager.exe"', PROCESS_ROW)
    assert matches(r'file.path startswith "C:\Program Files\Pulseway\\"', PROCESS_ROW)  # doubled trailing backslash
    assert not matches(r'file.path startswith "C:\Program Files\Pulse\\"', PROCESS_ROW)
    assert matches(r'file.name matches "\d{4}\.exe$"', row(FileName="setup2024.exe"))
    assert not matches(r'file.name matches "\d{4}\.exe$"', row(FileName="setup.exe"))


# --------------------------------------------------------------------------------------------
# Precedence, negation, parentheses, keyword forms

TRUE, FALSE = 'file.name == "PCMonitorManager.exe"', 'file.name == "nope.exe"'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"{TRUE} || {FALSE} && {FALSE}", True),  # a || (b && c); (a || b) && c would be False
        (f"{FALSE} && {FALSE} || {TRUE}", True),  # (a && b) || c
        (f"({TRUE} || {FALSE}) && {FALSE}", False),
        (f"{FALSE} && ({FALSE} || {TRUE})", False),
        (f"!{TRUE}", False),
        (f"!{FALSE}", True),
        (f"!!{TRUE}", True),
        (f"!({TRUE} && {FALSE})", True),
        (f"!{FALSE} && {TRUE}", True),  # ! binds tighter than &&
        (f"!{TRUE} || {TRUE}", True),
        (f"(({TRUE}))", True),
        (f"{TRUE} and {FALSE}", False),
        (f"{TRUE} AND {TRUE}", True),
        (f"{FALSE} Or {TRUE}", True),
        (f"NOT {TRUE}", False),
        (f"not ({FALSE} or {FALSE})", True),
        (f"{TRUE} or {FALSE} and {FALSE}", True),  # keyword forms keep the precedence
        ('file.name CONTAINS "monitor" and signer HAS "mmsoft" and file.name In ["pcmonitormanager.exe"]', True),
        ("IS_TRUSTED == TRUE", True),
        ('Process.Parent_Process_Name == "services.exe"', True),  # field names are case-insensitive too
    ],
)
def test_boolean_structure(text: str, expected: bool) -> None:
    assert matches(text, PROCESS_ROW) is expected


# --------------------------------------------------------------------------------------------
# Case-insensitivity, Unicode, `has` terms


@pytest.mark.parametrize(
    ("text", "data", "expected"),
    [
        ('file.name == "PCMONITORMANAGER.EXE"', {"FileName": "pcmonitormanager.exe"}, True),
        ('signer has "krämer"', {"Signer": "Krämer IT Solutions GmbH"}, True),
        ('signer has "KRÄMER IT"', {"Signer": "Krämer IT Solutions GmbH"}, True),
        ('signer has "krämer"', {"Signer": "Kra\u0308mer IT Solutions GmbH"}, True),  # NFD row value
        ('signer has "kramer"', {"Signer": "Krämer IT Solutions GmbH"}, False),  # no transliteration
        ('signer == "dwsnet oü"', {"Signer": "DWSNET OÜ"}, True),
        ('signer has "BİLİŞİM"', {"Signer": "TEKNOPARS BİLİŞİM"}, True),
        ('signer contains "straße"', {"Signer": "STRASSE Software AG"}, True),  # full casefold: ß -> ss
        ('signer startswith "ÄRZTE"', {"Signer": "ärztekammer IT"}, True),
        ('signer in ["krämer it solutions gmbh"]', {"Signer": "KRÄMER IT SOLUTIONS GMBH"}, True),
        ('signer matches "^krämer"', {"Signer": "KRÄMER IT Solutions GmbH"}, True),
        ('signer has "MMSoft Design"', {"Signer": "MMSoft Design Ltd."}, True),
        ('signer has "Datto Inc"', {"Signer": "Datto, LLC"}, False),
        ('signer has "Servably, Inc."', {"Signer": "Servably Inc."}, True),
        ('signer has "Dell"', {"Signer": "Dell Inc"}, True),
        ('signer has "Dell"', {"Signer": "Dell Technologies Software"}, True),
        ('signer has "Dell"', {"Signer": "Dellware Ltd."}, False),
        ('signer has "Dell"', {"Signer": "Quest (formerly DELL) Software"}, True),
    ],
)
def test_case_and_unicode(text: str, data: dict[str, Any], expected: bool) -> None:
    assert matches(text, data) is expected


# --------------------------------------------------------------------------------------------
# Null semantics: every comparison with a missing/empty field is false, except != (true)


@pytest.mark.parametrize(
    "text",
    [
        'process.name == "Pulseway.exe"',
        'process.name contains "a"',
        'process.name startswith "p"',
        'process.name endswith "e"',
        'process.name has "Pulseway"',
        'process.name matches ".*"',
        'process.name in ["pulseway.exe"]',
        'process.user == "Administrator"',  # ProcessUser is "" in SCAN_ROW: empty counts as null
        'process.user matches "^$"',  # ... so even a pattern that matches "" is false
        'process.user matches ".*"',
        'process.parent.name == "services.exe"',
        'process.executable contains "pulseway"',
        "process.pid == 0",
        "process.pid in [0, 4242]",
    ],
)
def test_null_field_fails_every_comparison(text: str) -> None:
    assert not matches(text, SCAN_ROW)
    assert not matches(text, {})  # a missing column is null too


@pytest.mark.parametrize(
    "text",
    ['process.name != "Pulseway.exe"', 'process.user != "Administrator"', "process.pid != 4242", "is_trusted != true"],
)
def test_null_field_is_unequal_to_everything(text: str) -> None:
    assert matches(text, SCAN_ROW | {"IsTrusted": None})


def test_null_bool_field_is_not_true_and_negation_negates_the_result() -> None:
    assert not matches("is_trusted", {"IsTrusted": None})
    assert not matches("is_trusted == false", {"IsTrusted": None})
    assert matches("!is_trusted", {"IsTrusted": None})
    assert matches('!(process.name == "x")', SCAN_ROW)


def test_comparing_with_an_empty_string_is_rejected() -> None:
    err = error_of('process.name == ""')
    assert err.column == 17
    assert "null" in err.message
    assert error_of('file.name in ["a", ""]').column == 20


def test_row_values_from_storage_are_coerced() -> None:
    # SQLite hands bools back as 0/1 and some paths carry numbers as text.
    assert matches("is_trusted", {"IsTrusted": 1})
    assert not matches("is_trusted", {"IsTrusted": 0})
    assert matches("file.size == 10", {"FileSize": "10"})
    assert not matches("file.size == 10", {"FileSize": "ten"})


# --------------------------------------------------------------------------------------------
# Derived fields


@pytest.mark.parametrize(
    ("text", "data", "expected"),
    [
        # file.directory ends with the path's separator (docs/exclusions.md)
        (r'file.directory == "C:\Program Files\Pulseway\\"', PROCESS_ROW, True),
        (r'file.directory == "C:\Program Files\Pulseway"', PROCESS_ROW, False),
        ('file.directory == "/opt/pulseway/bin/"', {"FolderPath": "/opt/pulseway/bin/pcmonitor.exe"}, True),
        ('file.directory == "/"', {"FolderPath": "/pcmonitor.exe"}, True),
        ('file.directory == "/tmp/"', {"FolderPath": "/tmp/a\\b.exe"}, True),  # POSIX: \ is part of the name
        (r'file.directory == "C:\Deploy/sub\\"', {"FolderPath": "C:\\Deploy/sub\\x.exe"}, True),
        (r'file.directory == "C:\\"', {"FolderPath": "C:\\setup.exe"}, True),
        (r'file.directory startswith "D:\Deploy\\"', {"FolderPath": r"D:\Deploy\setup.exe"}, True),
        (r'file.directory startswith "D:\Deploy\\"', {"FolderPath": r"D:\Deploy\sub\setup.exe"}, True),
        (r'file.directory startswith "D:\Deploy\\"', {"FolderPath": r"D:\DeployOld\setup.exe"}, False),
        (r'file.directory startswith "D:\Deploy\\"', {"FolderPath": r"D:\Deploy.exe"}, False),
        ('file.directory startswith "\\\\\\\\fs01\\\\deploy"', {"FolderPath": r"\\fs01\deploy\rmm\a.exe"}, True),
        ('file.directory contains "a"', {"FolderPath": "setup.exe"}, False),  # no directory part: null
        ('file.extension == "exe"', {"FileName": "Setup.EXE"}, True),
        ('file.extension == "gz"', {"FileName": "agent.tar.gz"}, True),
        ('file.extension == "exe"', {"FileName": "README"}, False),
        ('file.extension != "exe"', {"FileName": "README"}, True),
        ('file.extension == "bashrc"', {"FileName": ".bashrc"}, False),
        ('file.extension in ["exe", "msi"]', {"FileName": "Pulseway.msi"}, True),
        ('process.executable == "C:\\Program Files\\Pulseway\\PCMonitorManager.exe"', PROCESS_ROW, True),
        ('process.executable endswith ".exe"', SCAN_ROW, False),  # not a running process: null
        ('file.hash.sha1 == "3F786850E387550FDAB836ED7E6DC881DE23001B"', PROCESS_ROW, True),
        ('file.hash.sha256 startswith "9f86d081"', PROCESS_ROW, True),
        ('signer_hash == "89f8a5f1c8a1b0e6d1d1f3a1c0c8b5d0e9e6a3f2"', PROCESS_ROW, True),
        ('issuer has "DigiCert"', PROCESS_ROW, True),
        ('device.name endswith ".corp.example.com"', PROCESS_ROW, True),
        ('process.user == "corp\\alice"', PROCESS_ROW, True),
        ('process.parent.name == "SERVICES.EXE"', PROCESS_ROW, True),
        ('process.parent_process_name == "SERVICES.EXE"', PROCESS_ROW, True),
    ],
)
def test_field_mapping(text: str, data: dict[str, Any], expected: bool) -> None:
    assert matches(text, data) is expected


def test_fields_are_reported_canonically() -> None:
    expression = parse_expression('process.parent_process_name == "a" && (file.size == 1 || is_trusted)')
    assert expression.fields == frozenset({"process.parent.name", "file.size", "is_trusted"})


def test_valid_fields_read_real_columns() -> None:
    assert len(VALID_FIELDS) == len(set(VALID_FIELDS)) == 22  # 18 + the four version-info fields (11.1)
    for name in ("FileName", "FolderPath", "FileSize", "SHA1", "SHA256", "Signer", "Issuer", "SignerHash"):
        assert name in COLUMN_NAMES
    for name in ("IsTrusted", "ProcessName", "ProcessUser", "ProcessId", "ParentProcessName", "DeviceName"):
        assert name in COLUMN_NAMES


def test_expression_is_frozen_and_compares_by_text() -> None:
    first, second = parse_expression('signer has "Dell"'), parse_expression('signer has "Dell"')
    assert first == second and hash(first) == hash(second)
    assert first != parse_expression('signer has "Dell Inc"')
    with pytest.raises(AttributeError):
        first.text = "x"  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# The hunting guides' expressions

GUIDE_EXPRESSIONS = [
    'process.parent_process_name == "Pulseway.exe" && file.name contains "update"',
    'process.user == "Administrator" && process.name == "Pulseway.exe"',
    'process.name == "msiexec.exe" && file.name contains "Pulseway.msi"',
    'process.name == "Tripwire.exe" && process.parent_process_name == "Pulseway.exe"',
]


@pytest.mark.parametrize(
    ("text", "hit", "miss"),
    [
        (
            GUIDE_EXPRESSIONS[0],
            row(FileName="PulsewayUpdater.exe", ProcessName="PulsewayUpdater.exe", ParentProcessName="Pulseway.exe"),
            row(FileName="PulsewayUpdater.exe", ProcessName="PulsewayUpdater.exe", ParentProcessName="explorer.exe"),
        ),
        (
            GUIDE_EXPRESSIONS[1],
            row(ProcessUser="administrator", ProcessName="PULSEWAY.EXE"),
            row(ProcessUser=r"CORP\Administrator", ProcessName="Pulseway.exe"),  # == is exact, not contains
        ),
        (
            GUIDE_EXPRESSIONS[2],
            row(ProcessName="msiexec.exe", FileName="Pulseway.msi", FolderPath=r"C:\Windows\Installer\Pulseway.msi"),
            row(ProcessName="msiexec.exe", FileName="Other.msi"),
        ),
        (
            GUIDE_EXPRESSIONS[3],
            row(ProcessName="Tripwire.exe", ParentProcessName="Pulseway.exe"),
            row(ProcessName="Tripwire.exe", ParentProcessName="services.exe"),
        ),
    ],
)
def test_guide_expression(text: str, hit: dict[str, Any], miss: dict[str, Any]) -> None:
    expression = parse_expression(text)
    assert expression.matches(hit)
    assert not expression.matches(miss)
    # A file found by a disk scan has no process, so a process condition never excludes it.
    disk_scan = SCAN_ROW | {key: hit[key] for key in ("FileName", "FolderPath")}
    assert not expression.matches(disk_scan)


def test_guide_prose_signed_by_dell_software() -> None:
    expression = parse_expression('signer has "Dell"')
    assert expression.matches({"Signer": "Dell Inc"})
    assert not expression.matches({"Signer": "Kaseya Holdings Inc."})


def test_event_id_cannot_be_observed() -> None:
    text = 'process.name == "Pulseway.exe" && event_id == "BackupJobTriggered"'
    err = error_of(text)
    assert err.column == text.index("event_id") + 1 == 35
    assert "'event_id'" in err.message
    assert "cannot be observed" in err.message
    assert "event-log" in err.message
    for name in VALID_FIELDS:
        assert name in err.message
    assert str(err).startswith("column 35: ")


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ('winlog.event_id == "7045"', ["cannot be observed", "event-log"]),
        ('destination.ip == "10.0.0.1"', ["cannot be observed", "network"]),
        ('registry.path contains "Run"', ["cannot be observed", "registry"]),
        ('process.command_line contains "-install"', ["cannot be observed", "command lines"]),
        ('file.nmae == "x"', ["unknown field 'file.nmae'", "did you mean 'file.name'"]),
        ('FileName == "x"', ["unknown field 'FileName'", "write it as 'file.name'"]),
        ('user.name == "x"', ["write it as 'process.user'"]),
        ('colour == "red"', ["unknown field 'colour'"]),
    ],
)
def test_unknown_field_messages_list_the_valid_fields(text: str, fragments: list[str]) -> None:
    err = error_of(text)
    assert err.column == 1
    for fragment in fragments:
        assert fragment in err.message
    assert "Valid fields: file.name, file.path," in err.message
    assert "process.name" in err.message and "device.name" in err.message


# --------------------------------------------------------------------------------------------
# Syntax and type errors: the column is 1-based within the expression


@pytest.mark.parametrize(
    ("text", "column", "fragment"),
    [
        ("", 1, "empty expression"),
        ("  \n ", 1, "empty expression"),
        ('file.name = "a"', 11, "use '=='"),
        ('file.name =~ "a"', 11, "case-insensitive"),
        ("file.size > 10", 11, "not supported"),
        ('file.name == "a" & signer has "b"', 18, "'&&'"),
        ('file.name == "a" | signer has "b"', 18, "'||'"),
        ('file.name == "abc', 14, "unterminated string"),
        ('file.name == "C:\\"', 14, "trailing backslash"),
        ('(file.name == "a"', 18, "expected ')' to close the '(' at column 1"),
        ('file.name == "a")', 17, "unexpected ')'"),
        ('file.name == "a" signer has "b"', 18, "missing '&&' or '||'"),
        ('file.name == "a" &&', 20, "expected a field name"),
        ('&& file.name == "a"', 1, "expected a field name"),
        ('"a" == file.name', 1, "expected a field name"),
        ('file.name "a"', 11, "expected an operator after 'file.name'"),
        ("file.name", 10, "expected an operator"),  # a text field is not a condition on its own
        ('file.name !contains "a"', 11, "write !(file.name contains ...)"),
        ('file.name not in ["a"]', 11, "write not(file.name in ...)"),
        ("file.name == msiexec.exe", 14, 'strings must be quoted: write "msiexec.exe"'),
        ("file.name == process.name", 14, "comparing two fields is not supported"),
        ("file.name == 5", 14, "compare it with a quoted string"),
        ("file.name contains 5", 20, "compare it with a quoted string"),
        ('file.size == "10"', 14, "file.size is a number"),
        ('file.size contains "1"', 11, "file.size is a number"),
        ("is_trusted == 1", 15, "true or false"),
        ('is_trusted in ["yes"]', 12, "'in' takes a list"),
        ('file.name in ("a")', 14, "square brackets"),
        ('file.name in ["a" "b"]', 19, "expected ',' or ']'"),
        ("file.name in []", 15, "empty list"),
        ('file.name in ["a", 1]', 20, "compare it with a quoted string"),
        ('signer has "--"', 12, "at least one letter or digit"),
        ("file.size == 12ab", 14, "malformed number"),
        ('file.name == "a" @', 18, "unexpected character '@'"),
        ('file.name == "a" &&\n  bogus == "b"', 23, "unknown field 'bogus'"),
    ],
)
def test_syntax_errors_name_the_column(text: str, column: int, fragment: str) -> None:
    err = error_of(text)
    assert (err.column, fragment in err.message) == (column, True), str(err)
    assert str(err) == f"column {column}: {err.message}"


def test_the_leftmost_error_is_reported() -> None:
    err = error_of('bogus == "a" =~ "b"')
    assert err.column == 1 and "bogus" in err.message


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("([", "missing"),
        ("a{2,1}", "invalid repetition size"),
        ("*", "no argument for repetition"),
        ("(a)\\1", "invalid escape"),  # a backreference: RE2 has none
        ("(?=a)b", "invalid perl operator"),  # lookahead
        ("(?<!a)b", "invalid perl operator"),  # lookbehind
    ],
)
def test_bad_regex_is_a_load_error_with_the_reason(pattern: str, reason: str) -> None:
    err = error_of(f'file.name matches "{pattern}"')
    assert err.column == 19
    assert f'bad regular expression "{pattern}": ' in err.message
    assert reason in err.message and "RE2" in err.message, err.message


def test_regex_matching_is_linear_on_hostile_names() -> None:
    # Python's re never finishes `^(a+)+$` against 30 a's and a b; RE2 answers at once.
    expression = parse_expression('file.name matches "^(a+)+$"')
    assert not expression.matches(row(FileName="a" * 30 + "b"))
    assert not expression.matches(row(FileName="a" * 100_000 + "!"))
    assert expression.matches(row(FileName="A" * 30))
    nested = parse_expression('file.name matches "(x+x+)+y"')
    assert not nested.matches(row(FileName="x" * 50_000))


def test_regex_on_undecodable_path_bytes() -> None:
    # A surrogateescape path (raw byte 0xff) matches; the byte stands for U+FFFD.
    name = b"setup\xff.exe".decode("utf-8", "surrogateescape")
    assert matches('file.name matches "^setup.\\.exe$"', row(FileName=name))
    assert matches('file.name contains "setup"', row(FileName=name))


def test_oversized_regex_and_expression_are_load_errors() -> None:
    err = error_of('file.name matches "' + "a" * 5000 + '"')
    assert "longer than 4096" in err.message
    err = error_of('file.name == "' + "a" * 70_000 + '"')
    assert "longer than 65536" in err.message


def test_regex_is_a_case_insensitive_search() -> None:
    # In the expression a regex's literal backslash is written \\\\ (\\ decodes to one backslash).
    expression = parse_expression(r'file.path matches "\\\\pulseway\\\\[^\\\\]+\.exe$"')
    assert expression.matches({"FolderPath": r"C:\Program Files\PULSEWAY\pcmonitorsrv.exe"})
    assert not expression.matches({"FolderPath": r"C:\Program Files\Pulseway\sub\dir"})


def test_exclusion_error_is_an_exception_with_column_and_message() -> None:
    err = ExclusionError(7, "boom")
    assert isinstance(err, Exception)
    assert (err.column, err.message, str(err)) == (7, "boom", "column 7: boom")


# --------------------------------------------------------------------------------------------
# Exclusion, first_exclusion


def test_global_and_per_rule_exclusions() -> None:
    dell = Exclusion("dell", parse_expression('signer has "Dell"'))
    msiexec = Exclusion("msiexec", parse_expression(GUIDE_EXPRESSIONS[2]), rules=(PULSEWAY_RULE,))
    dell_row = row(Signer="Dell Inc")
    msi_row = row(ProcessName="msiexec.exe", FileName="Pulseway.msi")

    assert dell.applies(dell_row) and dell.applies(dell_row, PULSEWAY_RULE) and dell.applies(dell_row, "other")
    assert msiexec.applies(msi_row, PULSEWAY_RULE)
    assert msiexec.applies(msi_row, PULSEWAY_RULE.upper())  # GUIDs compare case-insensitively
    assert not msiexec.applies(msi_row, "0f1e2d3c-0000-0000-0000-000000000000")
    assert not msiexec.applies(msi_row)  # no rule context: only global exclusions apply
    assert not msiexec.applies(SCAN_ROW | {"FileName": "Pulseway.msi"}, PULSEWAY_RULE)

    ordered = (msiexec, dell)
    assert first_exclusion(ordered, msi_row, PULSEWAY_RULE) is msiexec
    assert first_exclusion(ordered, msi_row | {"Signer": "Dell Inc"}, PULSEWAY_RULE) is msiexec
    assert first_exclusion(ordered, msi_row | {"Signer": "Dell Inc"}, "other") is dell
    assert first_exclusion(ordered, PROCESS_ROW, PULSEWAY_RULE) is None
    assert first_exclusion((), PROCESS_ROW) is None


# --------------------------------------------------------------------------------------------
# parse_exclusions

CONFIG = """\
# exclusions under test
[agent]
device_name = "ws01"

[[exclusions]]
id = "dell-signed"
expression = 'signer has "Dell"'
reason = "signed by Dell Software"

[[exclusions]]
id = "broken-field"
rules = ["6192b741-4540-4416-8dbb-ce0405166d0a"]
expression = 'process.name == "Pulseway.exe" && event_id == "BackupJobTriggered"'

[[exclusions]]
id = "dell-signed"
expression = 'signer has "Dell Inc"'

[[exclusions]]
expression = 'file.name == "a.exe"'

[[exclusions]]
id = "no-expression"
reason = "forgot it"

[[exclusions]]
id = "typo-key"
expresion = 'file.name == "a.exe"'
expression = 'file.name == "a.exe"'

[[exclusions]]
id = "bad-types"
rules = "6192b741-4540-4416-8dbb-ce0405166d0a"
expression = 'file.name == "a.exe"'
reason = 5

[[exclusions]]
id = "empty-rules"
rules = []
expression = 'file.name == "a.exe"'

[[exclusions]]
id = "bad-regex"
expression = 'file.name matches "(["'

[[exclusions]]
id = 7
expression = 42

[[exclusions]]
id = "pulseway-msiexec"
rules = ["6192b741-4540-4416-8dbb-ce0405166d0a", "6192b741-4540-4416-8dbb-ce0405166d0a"]
expression = 'process.name == "msiexec.exe" && file.name contains "Pulseway.msi"'

[collector]
url = "https://collector.example.com"
"""


def test_parse_exclusions_reports_problems_with_lines() -> None:
    exclusions, problems = parse_exclusions(tomllib.loads(CONFIG), path="agent.toml", source_text=CONFIG)

    assert [exclusion.id for exclusion in exclusions] == ["dell-signed", "pulseway-msiexec"]
    assert exclusions[0].rules == () and exclusions[0].reason == "signed by Dell Software"
    assert exclusions[0].expression.text == 'signer has "Dell"'  # the first of two duplicates is kept
    assert exclusions[1].rules == (PULSEWAY_RULE,)

    found = [(problem.line, problem.column, problem.message) for problem in problems]
    expected = [
        (13, 35, "exclusion 'broken-field': field 'event_id' cannot be observed by the agent"),
        (16, 0, "duplicate exclusion id 'dell-signed' (first defined at line 6)"),
        (19, 0, "exclusions entry 4: missing 'id'"),
        (22, 0, "exclusion 'no-expression': missing 'expression'"),
        (28, 0, "exclusion 'typo-key': unknown key 'expresion' (allowed: id, expression, rules, reason)"),
        (33, 0, "exclusion 'bad-types': 'rules' must be an array of rule id strings"),
        (35, 0, "exclusion 'bad-types': 'reason' must be a string, not a number"),
        (39, 0, "exclusion 'empty-rules': 'rules' is empty; leave it out for a global exclusion"),
        (44, 19, "exclusion 'bad-regex': bad regular expression"),
        (47, 0, "exclusions entry 10: 'id' must be a non-empty string, not a number"),
        (48, 0, "exclusions entry 10: 'expression' must be a string, not a number"),
    ]
    assert len(found) == len(expected), found
    for (line, column, message), (want_line, want_column, want_message) in zip(found, expected, strict=True):
        assert (line, column) == (want_line, want_column), message
        assert message.startswith(want_message), message
    assert CONFIG.splitlines()[12].startswith("expression = 'process.name")
    assert str(problems[0]).startswith("agent.toml:13:35: exclusion 'broken-field': field 'event_id'")
    assert "Valid fields:" in problems[0].message


def test_parse_exclusions_without_source_text_reports_line_zero() -> None:
    _, problems = parse_exclusions({"exclusions": [{"id": "x", "expression": "bogus == 1"}]})
    assert problems == (ExclusionProblem("<config>", 0, 1, problems[0].message),)
    assert str(problems[0]).startswith("<config>:0:1: exclusion 'x': unknown field 'bogus'")


def test_parse_exclusions_inline_tables_fall_back_to_searching_the_text() -> None:
    text = """exclusions = [
  { id = "a", expression = 'signer has "Dell"' },
  { id = "b", expression = 'signer hass "Dell"' },
]
"""
    exclusions, problems = parse_exclusions(tomllib.loads(text), path="p.toml", source_text=text)
    assert [exclusion.id for exclusion in exclusions] == ["a"]
    assert [(problem.line, problem.column) for problem in problems] == [(3, 8)]


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        ({"exclusions": {"id": "x"}}, "must be an array of tables"),
        ({"exclusions": ["signer has 'x'"]}, "exclusions entry 1 must be a table, not a string"),
    ],
)
def test_parse_exclusions_rejects_bad_shapes(document: dict[str, Any], fragment: str) -> None:
    exclusions, problems = parse_exclusions(document)
    assert exclusions == ()
    assert len(problems) == 1 and fragment in problems[0].message


def test_parse_exclusions_with_no_exclusions() -> None:
    assert parse_exclusions({}) == ((), ())
    assert parse_exclusions({"exclusions": []}) == ((), ())


def test_example_config_loads_cleanly_and_carries_the_guide_expressions() -> None:
    path = REPO / "config" / "agent.example.toml"
    text = path.read_text(encoding="utf-8")
    exclusions, problems = parse_exclusions(tomllib.loads(text), path=str(path), source_text=text)
    assert problems == ()

    by_text = {exclusion.expression.text: exclusion for exclusion in exclusions}
    for expression in GUIDE_EXPRESSIONS[:1] + GUIDE_EXPRESSIONS[2:]:  # the admin one also takes DOMAIN\user
        assert by_text[expression].rules == (PULSEWAY_RULE,)
    dell = by_text['signer has "Dell"']
    assert dell.rules == () and "Dell" in dell.reason
    assert any("file.directory" in exclusion.expression.fields for exclusion in exclusions)

    # The Pulseway exclusions work on realistic rows, and only for the Pulseway rule.
    installer = row(ProcessName="msiexec.exe", FileName="Pulseway.msi", Signer="Kaseya Holdings Inc.")
    hit = first_exclusion(exclusions, installer, PULSEWAY_RULE)
    assert hit is not None and hit.id == "pulseway-msiexec"
    assert first_exclusion(exclusions, installer, "other-rule") is None
    assert first_exclusion(exclusions, SCAN_ROW | {"FileName": "Pulseway.msi"}, PULSEWAY_RULE) is None
    staged = SCAN_ROW | {"FolderPath": r"D:\SoftwareDeployment\RMM\PCMonitorSetup.exe"}
    assert first_exclusion(exclusions, staged, PULSEWAY_RULE).id == "it-deployment-share"  # type: ignore[union-attr]
    assert first_exclusion(exclusions, staged | {"IsTrusted": False}, PULSEWAY_RULE) is None
    assert first_exclusion(exclusions, SCAN_ROW | {"FolderPath": r"D:\SoftwareDeploymentOld\a.exe"}) is None


def test_expression_type_is_exported() -> None:
    assert isinstance(parse_expression("is_trusted"), Expression)


# --------------------------------------------------------------------------------------------
# The shipped example: each exclusion excludes what its comment says, and nothing else

EXAMPLE = REPO / "config" / "agent.example.toml"
STAGED = SCAN_ROW | {"FolderPath": r"D:\SoftwareDeployment\PCMonitorSetup.exe", "FileName": "PCMonitorSetup.exe"}
CCM = SCAN_ROW | {"FolderPath": r"C:\Windows\ccmcache\3f\PCMonitorSetup.exe", "FileName": "PCMonitorSetup.exe"}
PULSEWAY_PROCESS = PROCESS_ROW | {"ProcessName": "Pulseway.exe", "ProcessUser": r"WS01\Administrator"}

# id -> (rule the row is tested for, rows it must exclude, rows it must not exclude)
EXAMPLE_CASES: dict[str, tuple[str, list[dict[str, Any]], list[dict[str, Any]]]] = {
    "dell-signed": (
        "any-rule",
        [SCAN_ROW | {"Signer": "Dell Inc."}, SCAN_ROW | {"Signer": "DELL TECHNOLOGIES INC."}],
        [SCAN_ROW | {"Signer": "Dellware Ltd"}, SCAN_ROW],
    ),
    "it-deployment-share": (
        "any-rule",
        [
            STAGED,  # directly in the folder: the trap of issue 7 item 7
            STAGED | {"FolderPath": r"D:\SoftwareDeployment\RMM\2026\PCMonitorSetup.exe"},  # below it
            STAGED | {"FolderPath": r"d:\softwaredeployment\PCMonitorSetup.exe"},  # case-insensitive
        ],
        [
            STAGED | {"IsTrusted": False},  # untrusted signatures are not excluded
            STAGED | {"FolderPath": r"D:\SoftwareDeploymentOld\PCMonitorSetup.exe"},  # a sibling folder
            STAGED | {"FolderPath": r"D:\SoftwareDeployment.exe"},
            STAGED | {"FolderPath": r"E:\SoftwareDeployment\PCMonitorSetup.exe"},
            STAGED | {"FolderPath": r"D:\Temp\SoftwareDeployment\PCMonitorSetup.exe"},
        ],
    ),
    "sccm-client-cache": (
        "any-rule",
        [CCM, CCM | {"FolderPath": r"C:\Windows\ccmcache\PCMonitorSetup.exe"}],
        [CCM | {"IsTrusted": False}, CCM | {"FolderPath": r"C:\Windows\ccmcache2\PCMonitorSetup.exe"}],
    ),
    "pulseway-self-update": (
        PULSEWAY_RULE,
        [PROCESS_ROW | {"FileName": "PulsewayUpdate.exe", "ParentProcessName": "Pulseway.exe"}],
        [
            SCAN_ROW | {"FileName": "PulsewayUpdate.exe"},  # no process facts on a disk scan row
            PROCESS_ROW | {"FileName": "PulsewayUpdate.exe", "ParentProcessName": "explorer.exe"},
        ],
    ),
    "pulseway-admin-session": (
        PULSEWAY_RULE,
        [PULSEWAY_PROCESS, PULSEWAY_PROCESS | {"ProcessUser": "Administrator"}],
        [
            PULSEWAY_PROCESS | {"ProcessUser": r"WS01\alice"},
            PULSEWAY_PROCESS | {"ProcessUser": r"WS01\NotAdministrator"},
            PULSEWAY_PROCESS | {"ProcessName": "other.exe"},
        ],
    ),
    "pulseway-msiexec": (
        PULSEWAY_RULE,
        [PROCESS_ROW | {"ProcessName": "msiexec.exe", "FileName": "Pulseway.msi"}],
        [PROCESS_ROW | {"ProcessName": "cmd.exe", "FileName": "Pulseway.msi"}, SCAN_ROW | {"FileName": "Pulseway.msi"}],
    ),
    "pulseway-tripwire": (
        PULSEWAY_RULE,
        [PROCESS_ROW | {"ProcessName": "Tripwire.exe", "ParentProcessName": "Pulseway.exe"}],
        [PROCESS_ROW | {"ProcessName": "Tripwire.exe", "ParentProcessName": "services.exe"}],
    ),
    "pulseway-it-jump-hosts": (
        PULSEWAY_RULE,
        [
            SCAN_ROW | {"DeviceName": "it-jump01.corp.example.com"},
            SCAN_ROW | {"DeviceName": "IT-JUMP02.corp.example.com", "Signer": "Kaseya Holdings Inc."},
        ],
        [SCAN_ROW, SCAN_ROW | {"DeviceName": "it-jump01.corp.example.com", "Signer": "AnyDesk Software GmbH"}],
    ),
}


def _example_exclusions() -> tuple[Exclusion, ...]:
    text = EXAMPLE.read_text(encoding="utf-8")
    warnings: list[ExclusionProblem] = []
    exclusions, problems = parse_exclusions(
        tomllib.loads(text), path=str(EXAMPLE), source_text=text, rule_ids=[PULSEWAY_RULE], warnings=warnings
    )
    assert problems == () and warnings == []
    return exclusions


def test_every_example_exclusion_has_a_case() -> None:
    assert [exclusion.id for exclusion in _example_exclusions()] == list(EXAMPLE_CASES)


@pytest.mark.parametrize("exclusion_id", list(EXAMPLE_CASES))
def test_example_exclusion_excludes_what_its_comment_says(exclusion_id: str) -> None:
    exclusions = _example_exclusions()
    rule, inside, outside = EXAMPLE_CASES[exclusion_id]
    (exclusion,) = [item for item in exclusions if item.id == exclusion_id]
    for data in inside:
        assert exclusion.applies(data, rule), data
        hit = first_exclusion(exclusions, data, rule)
        assert hit is not None and hit.id == exclusion_id
    for data in outside:
        assert not exclusion.applies(data, rule), data
    if exclusion.rules:  # a per-rule exclusion never applies to other rules
        assert not any(exclusion.applies(data, "another-rule") for data in inside)


def test_the_example_points_only_at_documents_in_the_repo() -> None:
    import re

    text = EXAMPLE.read_text(encoding="utf-8")
    named = set(re.findall(r"\b((?:docs|agent|config)/[\w./-]+\.(?:md|py|toml|yaml))", text))
    assert "docs/exclusions.md" in named
    assert all((REPO / name).is_file() for name in named), named
    assert "agent/exclusions.py" not in named


# --------------------------------------------------------------------------------------------
# Warnings: comparisons that can never match a real path, and unknown rule ids


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (r'file.directory startswith "D:\SoftwareDeployment" && is_trusted', "also matches sibling folders"),
        (r'file.directory == "C:\Tools"', "always ends with a path separator"),
        (r'file.directory endswith "\Pulseway"', "always ends with a path separator"),
        (r'file.directory in ["C:\Tools\\", "C:\Other"]', "always ends with a path separator"),
        (r'file.path endswith "\\"', "never ends with a path separator"),
        (r'file.path startswith "Program Files\Pulseway"', "is an absolute path"),
        (r'file.directory == "Windows\Temp\\"', "is an absolute path"),
        (r'file.name == "C:\Tools\x.exe"', "bare name without path separators"),
        (r'process.name endswith "/pulseway"', "bare name without path separators"),
        ('file.extension == ".exe"', "no leading dot"),
        ('file.extension in ["exe", ".msi"]', "no leading dot"),
    ],
)
def test_comparisons_that_can_never_match_are_warned_about(text: str, fragment: str) -> None:
    expression = parse_expression(text)  # it loads ...
    assert len(expression.warnings) == 1 and fragment in expression.warnings[0][1], expression.warnings
    document = {"exclusions": [{"id": "x", "expression": text}]}
    source = "[[exclusions]]\nid = 'x'\nexpression = '" + text + "'\n"
    warnings: list[ExclusionProblem] = []
    exclusions, problems = parse_exclusions(document, path="a.toml", source_text=source, warnings=warnings)
    assert len(exclusions) == 1 and problems == ()  # ... and is only warned about
    (warning,) = warnings
    assert warning.severity == "warning" and str(warning).startswith("a.toml:3:")
    assert ": warning: exclusion 'x': " in str(warning)


@pytest.mark.parametrize(
    "text",
    [
        r'file.directory startswith "D:\SoftwareDeployment\\"',
        r'file.directory == "/opt/pulseway/"',
        r'file.directory startswith "\\\\fs01\\deploy\\"',
        r'file.path endswith "\Pulseway\PCMonitorManager.exe"',
        r'file.path contains "\Temp\\"',
        'file.name endswith ".exe" && file.extension == "exe"',
        r'file.directory matches "^[a-z]:\\\\deploy$"',
    ],
)
def test_sound_path_comparisons_are_not_warned_about(text: str) -> None:
    assert parse_expression(text).warnings == ()


def test_unknown_rule_id_is_a_warning_with_its_line() -> None:
    source = "[[exclusions]]\nid = 'x'\nrules = ['nope', 'Pulse']\nexpression = 'signer has \"x\"'\n"
    warnings: list[ExclusionProblem] = []
    exclusions, problems = parse_exclusions(
        tomllib.loads(source), path="a.toml", source_text=source, rule_ids=["PULSE", "other"], warnings=warnings
    )
    assert len(exclusions) == 1 and problems == ()
    assert [str(warning) for warning in warnings] == [
        "a.toml:3:0: warning: exclusion 'x': no loaded rule has the id 'nope', so this exclusion never applies to it"
    ]
    # without the loaded rule ids (or without a warnings list) nothing is reported
    assert parse_exclusions(tomllib.loads(source))[1] == ()


def test_the_documented_examples_load_without_warnings() -> None:
    doc = (REPO / "docs" / "exclusions.md").read_text(encoding="utf-8")
    blocks = [block.split("```", 1)[0] for block in doc.split("```toml\n")[1:]]
    expressions = [text for block in blocks for text in _toml_expressions(block)]
    assert len(expressions) >= 6
    for text in expressions:
        assert parse_expression(text).warnings == (), text


def _toml_expressions(block: str) -> list[str]:
    out: list[str] = []
    for paragraph in block.split("\n\n"):
        start = paragraph.find("expression = ")
        if start >= 0:
            out.append(tomllib.loads(paragraph[start:].split("\nreason")[0])["expression"])
    return out


@pytest.mark.parametrize(
    ("text", "column", "value"),
    [
        ('file.original_name == "PCMonitorManager.exe"', "VersionInfoOriginalFileName", "PCMonitorManager.exe"),
        ('file.product has "Pulseway"', "VersionInfoProductName", "Pulseway Remote Management"),
        ('file.company startswith "MMSoft"', "VersionInfoCompanyName", "MMSoft Design Ltd."),
        ('file.description contains "monitor"', "VersionInfoFileDescription", "Pulseway PC Monitor"),
    ],
)
def test_signed_version_info_fields(text: str, column: str, value: str) -> None:
    # a renamed binary keeps its signed version info
    renamed = SCAN_ROW | {"FileName": "update.exe", column: value}
    assert matches(text, renamed)
    assert not matches(text, SCAN_ROW)  # no version info: null
    assert "write it as" in error_of(text.replace(text.split()[0], column)).message

"""Every case-insensitive KQL operator folds all of Unicode (NFC + casefold), unlike Kusto's ASCII-only
folding (issue 11 item 5; documented per operator in docs/kql.md). One table per operator."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from agent.rules.kql import parse_query

NOW = datetime(2026, 1, 1, tzinfo=UTC)
DWSNET = "DWSNET OÜ"
KRAMER = "Krämer IT GmbH"
TURKISH = "TEKNOPARS BİLİŞİM"  # capital dotted İ (U+0130)
TURKISH_LOWER = TURKISH.lower()  # 'teknopars bi̇li̇şi̇m': i + U+0307 COMBINING DOT ABOVE
NFD_DWSNET = "dwsnet ou\u0308"  # the same name in decomposed form


def holds(signer: str, predicate: str) -> bool:
    query = parse_query(f"DeviceFileCertificateInfo | where {predicate}")
    return query.filter_row({"Signer": signer}, now=NOW) is not None


def literal(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


# (operator, pattern, signer, expected)
CASES: dict[str, list[tuple[str, str, bool]]] = {
    "=~": [
        ("dwsnet oü", DWSNET, True),
        (NFD_DWSNET, DWSNET, True),
        ("KRÄMER IT GMBH", KRAMER, True),
        ("KRAMER IT GMBH", KRAMER, False),  # no transliteration
        (TURKISH_LOWER, TURKISH, True),
        ("teknopars bilisim", TURKISH, False),
        ("TEKNOPARS BILIŞIM", TURKISH, False),  # dotless/dotted I stay distinct
    ],
    "!~": [
        ("dwsnet oü", DWSNET, False),
        ("KRÄMER IT GMBH", KRAMER, False),
        ("teknopars bilisim", TURKISH, True),
    ],
    "contains": [
        ("SNET O", DWSNET, True),
        ("ämer it", KRAMER, True),
        ("ÄMER", KRAMER, True),
        ("bi̇li̇şi̇m", TURKISH, True),
        ("amer", KRAMER, False),
    ],
    "!contains": [
        ("ämer", KRAMER, False),
        ("amer", KRAMER, True),
    ],
    "startswith": [
        ("dwsnet o", DWSNET, True),
        ("KRÄ", KRAMER, True),
        ("kra", KRAMER, False),
        ("teknopars bİ", TURKISH, True),
    ],
    "!startswith": [
        ("krä", KRAMER, False),
        ("kra", KRAMER, True),
    ],
    "endswith": [
        ("OÜ", DWSNET, True),
        ("ou\u0308", DWSNET, True),
        ("lİşİm", TURKISH, True),
        ("ou", DWSNET, False),
    ],
    "!endswith": [
        ("oü", DWSNET, False),
        ("ou", DWSNET, True),
    ],
    "has": [
        ("oü", DWSNET, True),
        ("KRÄMER", KRAMER, True),
        ("Kräm", KRAMER, False),  # terms are whole
        ("bi̇li̇şi̇m", TURKISH, True),
        ("bilisim", TURKISH, False),
    ],
    "!has": [
        ("oü", DWSNET, False),
        ("bilisim", TURKISH, True),
    ],
}
LIST_CASES: dict[str, list[tuple[tuple[str, ...], str, bool]]] = {
    "in~": [
        (("x", "dwsnet oü"), DWSNET, True),
        (("krämer it gmbh",), KRAMER, True),
        ((TURKISH_LOWER,), TURKISH, True),
        (("kramer it gmbh", "dwsnet ou"), KRAMER, False),
    ],
    "!in~": [
        (("dwsnet oü",), DWSNET, False),
        (("teknopars bilisim",), TURKISH, True),
    ],
    "has_any": [
        (("nothing", "OÜ"), DWSNET, True),
        (("KRÄMER",), KRAMER, True),
        (("bi̇li̇şi̇m",), TURKISH, True),
        (("kramer", "bilisim"), KRAMER, False),
    ],
    "has_all": [
        (("dwsnet", "oü"), DWSNET, True),
        (("KRÄMER", "gmbh"), KRAMER, True),
        (("teknopars", "bilisim"), TURKISH, False),
    ],
}


@pytest.mark.parametrize(
    ("op", "pattern", "signer", "expected"),
    [(op, *case) for op, cases in CASES.items() for case in cases],
)
def test_string_operator_folds_all_of_unicode(op: str, pattern: str, signer: str, expected: bool) -> None:
    assert holds(signer, f"Signer {op} {literal(pattern)}") is expected


@pytest.mark.parametrize(
    ("op", "patterns", "signer", "expected"),
    [(op, *case) for op, cases in LIST_CASES.items() for case in cases],
)
def test_list_operator_folds_all_of_unicode(op: str, patterns: tuple[str, ...], signer: str, expected: bool) -> None:
    items = ", ".join(literal(pattern) for pattern in patterns)
    assert holds(signer, f"Signer {op} ({items})") is expected


@pytest.mark.parametrize(
    ("predicate", "expected"),
    [
        ("Signer == 'dwsnet oü'", False),  # == and in are case-sensitive, as in Kusto
        (f"Signer == {literal(DWSNET)}", True),
        (f"Signer == {literal(NFD_DWSNET.upper())}", False),
        ("Signer in ('dwsnet oü')", False),
        ("Signer !in ('dwsnet oü')", True),
        ("Signer != 'dwsnet oü'", True),
    ],
)
def test_case_sensitive_operators_do_not_fold(predicate: str, expected: bool) -> None:
    assert holds(DWSNET, predicate) is expected


def test_every_case_insensitive_operator_has_a_table() -> None:
    from agent.rules.kql_parser import LIST_OPS, STRING_OPS

    caseless = (STRING_OPS | LIST_OPS) - {"in", "!in"}
    assert caseless == set(CASES) | set(LIST_CASES)

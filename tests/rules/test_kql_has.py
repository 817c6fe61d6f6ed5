"""`has` term semantics (SPEC section 2) and the Unicode folding shared with the exclusions."""

from __future__ import annotations

import unicodedata

import pytest

from agent.rules.kql import parse_query
from agent.rules.terms import contains_folded, fold, has_any_terms, has_terms, split_terms

NFD = "NFD"


def nfd(text: str) -> str:
    return unicodedata.normalize(NFD, text)


HAS_CASES = [
    # (haystack, needle, expected, why)
    ("MMSoft Design Ltd.", "MMSoft Design", True, "needle terms at the start of the haystack"),
    ("mmsoft design ltd", "MMSoft Design", True, "case-insensitive"),
    ("XMMSoft Designer Ltd.", "MMSoft Design", False, "terms must be whole: XMMSoft and Designer are other terms"),
    ("MMSoft, Design", "MMSoft Design", True, "punctuation only separates terms"),
    ("MMSoft Ltd Design", "MMSoft Design", False, "terms must be contiguous"),
    ("Design MMSoft", "MMSoft Design", False, "terms must be in order"),
    ("Datto, LLC", "Datto Inc", False, "Inc is not a term of 'Datto, LLC'"),
    ("Datto Inc", "Datto Inc", True, "exact"),
    ("Datto Inc.", "Datto Inc", True, "trailing punctuation"),
    ("Servably Inc.", "Servably, Inc.", True, "punctuation in the needle is a separator too"),
    ("Servably, Inc.", "Servably Inc.", True, "and in the haystack"),
    ("Kaseya Holdings Inc.", "Kaseya", True, "single term"),
    ("KaseyaX Holdings", "Kaseya", False, "single term must be whole"),
    ("PDQ.com Corporation", "PDQ.com", True, "dot splits PDQ and com on both sides"),
    ("O&O Software GmbH", "O&O Software GmbH", True, "ampersand splits O and O"),
    ("Projector.is, Inc.", "Projector.is, Inc.", True, "pattern with punctuation matches itself"),
    ("N-ABLE TECHNOLOGIES LTD", "N-Able Technologies", True, "hyphen splits"),
    ("ISL Online Ltd.", "ISL Online", True, "prefix run of terms"),
    ("Remote Utilities Pte. Ltd.", "Remote Utilities", True, ""),
    ("RemoteUtilities", "Remote Utilities", False, "one term is not two"),
    ("ConnectWise, LLC", "ConnectWise", True, ""),
    ("ConnectWise\\", "ConnectWise", True, "LOLRMM's DN-escape leftover still matches"),
    ("AnyDesk Software GmbH", "anydesk software", True, ""),
    ("Signer_With_Underscore", "Signer", True, "underscore is not a letter or digit, so it separates"),
    ("Panorama9 Inc", "Panorama9", True, "digits belong to terms"),
    ("Panorama 9 Inc", "Panorama9", False, "Panorama9 is one term"),
    ("Action1 Corporation", "Action1", True, ""),
    ("Action11 Corporation", "Action1", False, ""),
    # Unicode
    ("DWSNET OÜ", "DWSNET OÜ", True, "NFC exact"),
    ("dwsnet oü", "DWSNET OÜ", True, "Unicode case folding (Kusto folds only ASCII)"),
    (nfd("DWSNET OÜ"), "DWSNET OÜ", True, "NFD haystack: U+0308 is a mark and stays in the term"),
    ("DWSNET OÜ", nfd("DWSNET OÜ"), True, "NFD needle"),
    ("DWSNET OU", "DWSNET OÜ", False, "no accent stripping"),
    ("DWSNET srl", "DWSNET OÜ", False, "DWService's current certificate is a different company"),
    ("Krämer IT Solutions GmbH", "Krämer IT Solutions GmbH", True, ""),
    ("KRÄMER IT Solutions GmbH", "Krämer", True, "Ä folds to ä"),
    (nfd("Krämer IT Solutions GmbH"), "Krämer IT Solutions GmbH", True, "NFD"),
    ("Kramer IT Solutions GmbH", "Krämer IT Solutions GmbH", False, "the umlaut is needed for the lookup"),
    ("TEKNOPARS BİLİŞİM TEKNOLOJİLERİ SANAYİ VE TİCARET LTD.ŞTİ.", "TEKNOPARS BİLİŞİM", True, "real certificate CN"),
    ("Teknopars Bi̇li̇şi̇m", "TEKNOPARS BİLİŞİM", True, "the Python casefold of İ is i + U+0307"),
    ("teknopars bi̇li̇şi̇m", "TEKNOPARS BİLİŞİM", True, ""),
    ("Teknopars Bilisim", "TEKNOPARS BİLİŞİM", False, "no transliteration: Bilisim is another word"),
    ("TEKNOPARS BİLİŞİM", "Teknopars Bilisim", False, "either way round"),
    ("TEKNOPARS BİLİŞİM", "teknopars", True, "the ASCII first term still matches"),
    ("TEKNOPARS BILIŞIM", "TEKNOPARS BİLİŞİM", False, "dotless and dotted capital I differ after folding"),
    ("上海贝锐信息科技股份有限公司", "上海贝锐信息科技股份有限公司", True, "CJK letters form terms"),
    ("NoMachine S.à r.l", "NoMachine S.à r.l", True, ""),
    ("Straße GmbH", "STRASSE", True, "full casefold: ß folds to ss"),
    # empty and degenerate needles (decision: no terms, no match)
    ("anything", "", False, "empty needle has no terms"),
    ("", "", False, ""),
    ("a, b", ", ", False, "punctuation-only needle has no terms"),
    ("", "Kaseya", False, "empty haystack"),
]


@pytest.mark.parametrize(("haystack", "needle", "expected", "why"), HAS_CASES, ids=[c[1] or "empty" for c in HAS_CASES])
def test_has_terms(haystack: str, needle: str, expected: bool, why: str) -> None:
    assert has_terms(haystack, needle) is expected, why


def test_fold_is_nfc_casefold_nfc() -> None:
    assert fold("DWSNET OÜ") == "dwsnet oü"
    assert fold(nfd("DWSNET OÜ")) == "dwsnet oü"
    assert fold("BİLİŞİM") == "bi\u0307li\u0307şi\u0307m"
    assert fold("Straße") == "strasse"
    assert unicodedata.is_normalized("NFC", fold(nfd("Ǖ")))


def test_split_terms_keeps_combining_marks_inside_terms() -> None:
    assert split_terms("TEKNOPARS BİLİŞİM") == ("teknopars", "bi\u0307li\u0307şi\u0307m")
    assert split_terms(nfd("Oü, Krämer")) == ("oü", "krämer")
    assert split_terms("PDQ.com Corporation") == ("pdq", "com", "corporation")
    assert split_terms(" ,;") == ()


def test_has_any_terms_returns_the_needle_that_matched() -> None:
    assert has_any_terms("Enter S.R.L.", ("Enter Srl", "Enter S.R.L.")) == "Enter S.R.L."
    assert has_any_terms("ENTER SRL", ("Enter Srl", "Enter S.R.L.")) == "Enter Srl"
    assert has_any_terms("Other", ("Enter Srl", "Enter S.R.L.")) is None


@pytest.mark.parametrize(
    ("haystack", "needle", "expected"),
    [
        ("XMMSoft Designer", "mmsoft design", True),  # substring, not terms
        ("KRÄMER", "krä", True),
        (nfd("DWSNET OÜ"), "oü", True),
        ("abc", "abd", False),
        ("abc", "", True),
    ],
)
def test_contains_folded(haystack: str, needle: str, expected: bool) -> None:
    assert contains_folded(haystack, needle) is expected


@pytest.mark.parametrize(("haystack", "needle", "expected", "why"), HAS_CASES[:-4], ids=[c[1] for c in HAS_CASES[:-4]])
def test_kql_has_uses_the_same_semantics(haystack: str, needle: str, expected: bool, why: str) -> None:
    from datetime import UTC, datetime

    quoted = needle.replace("\\", "\\\\").replace("'", "\\'")
    query = parse_query(f"DeviceFileCertificateInfo | where Signer has '{quoted}'")
    now = datetime(2025, 1, 1, tzinfo=UTC)
    assert (query.filter_row({"Signer": haystack}, now=now) is not None) is expected, why
    negated = parse_query(f"DeviceFileCertificateInfo | where Signer !has '{quoted}'")
    assert (negated.filter_row({"Signer": haystack}, now=now) is not None) is (not expected)

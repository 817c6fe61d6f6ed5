"""Term matching for KQL's `has` family and case-insensitive string operators.

A *term* is a maximal run of Unicode letters, digits and combining marks (categories L*, N* and M*);
every other character separates terms. Marks count as term characters so that a casefolded `İ`
(`i` + U+0307 COMBINING DOT ABOVE) does not split `BİLİŞİM` into pieces.

Text is folded with NFC, then `str.casefold`, then NFC again, on both sides. `haystack has needle`
holds when the needle's terms appear as a contiguous run of whole terms in the haystack's terms:
`'MMSoft Design'` matches `MMSoft Design Ltd.` but not `XMMSoft Designer Ltd.`, and punctuation is
only a separator, so `'Servably, Inc.'` matches `Servably Inc.`.

Deliberate difference from Kusto: Kusto's case-insensitive comparisons fold only ASCII letters;
rmmhunt folds all of Unicode, so `DWSNET OÜ` matches `dwsnet oü` (and its NFD spelling),
`Krämer` matches `KRÄMER` and `TEKNOPARS BİLİŞİM` matches its full-Unicode lowercase. No
transliteration or locale rules apply: ASCII `Bilisim` never matches `BİLİŞİM`, and Turkish
dotless `ı` stays distinct from `i`.

Decision on needles without terms (`''`, `'.'`, `', '`): `has_terms` returns False. Such a pattern
names no signer; matching everything (or nothing) silently would hide a rule-authoring mistake, so
the KQL parser also rejects a literal `has` pattern without terms at load time.
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache

__all__ = ["fold", "split_terms", "has_terms", "has_any_terms", "contains_folded", "term_key"]

_CACHE_SIZE = 1 << 16


@lru_cache(maxsize=_CACHE_SIZE)
def fold(text: str) -> str:
    """Case-fold `text` for comparison: NFC, Unicode casefold, NFC."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", text).casefold())


def _is_term_char(char: str) -> bool:
    return unicodedata.category(char)[0] in "LNM"


def split_terms(text: str) -> tuple[str, ...]:
    """The folded terms of `text`, in order."""
    terms: list[str] = []
    current: list[str] = []
    for char in fold(text):
        if _is_term_char(char):
            current.append(char)
        elif current:
            terms.append("".join(current))
            current = []
    if current:
        terms.append("".join(current))
    return tuple(terms)


@lru_cache(maxsize=_CACHE_SIZE)
def term_key(text: str) -> str:
    """The folded terms of `text` joined and wrapped by single spaces (`' a b '`), or `''` if none.

    Terms never contain a space, so a contiguous run of needle terms is exactly a substring
    match of the needle's key in the haystack's key.
    """
    terms = split_terms(text)
    if not terms:
        return ""
    return " " + " ".join(terms) + " "


def has_terms(haystack: str, needle: str) -> bool:
    """True if the terms of `needle` appear as a contiguous run of whole terms in `haystack`."""
    needle_key = term_key(needle)
    if not needle_key:
        return False
    return needle_key in term_key(haystack)


def has_any_terms(haystack: str, needles: tuple[str, ...]) -> str | None:
    """The first needle that `haystack` has (see `has_terms`), or None."""
    hay_key = term_key(haystack)
    for needle in needles:
        needle_key = term_key(needle)
        if needle_key and needle_key in hay_key:
            return needle
    return None


def contains_folded(haystack: str, needle: str) -> bool:
    """Case-insensitive substring test with the same folding as `has`."""
    return fold(needle) in fold(haystack)

"""Tokenizer for the KQL subset (see kql.py). Pure; positions are 1-based line and column."""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

__all__ = ["KqlError", "Token", "tokenize", "parse_timespan_text", "parse_datetime_text"]


class KqlError(Exception):
    """A query that is not in the supported subset, with its 1-based position in the query text."""

    def __init__(self, line: int, column: int, message: str) -> None:
        super().__init__(f"line {line}, column {column}: {message}")
        self.line = line
        self.column = column
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return (KqlError, (self.line, self.column, self.message))


# Token kinds
IDENT = "ident"  # identifiers and word operators, including `!has`, `in~`, `!in~`
STRING = "string"
NUMBER = "number"  # value: int or float
TIMESPAN = "timespan"  # value: timedelta
DATETIME = "datetime"  # value: datetime or None (datetime(null))
PUNCT = "punct"
EOF = "eof"


@dataclass(frozen=True)
class Token:
    kind: str
    text: str  # the source text of the token
    value: Any
    line: int
    column: int
    offset: int  # character offset of the token's first character
    end: int  # character offset just past the token


# seconds per unit of a timespan literal (`5d`, `1.5h`, `100ms`, `10microsecond`, `1tick`)
_UNITS: dict[str, float] = {
    **dict.fromkeys(("d", "day", "days"), 86400.0),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600.0),
    **dict.fromkeys(("m", "min", "minute", "minutes"), 60.0),
    **dict.fromkeys(("s", "sec", "second", "seconds"), 1.0),
    **dict.fromkeys(("ms", "milli", "millis", "millisecond", "milliseconds"), 1e-3),
    **dict.fromkeys(("microsecond", "microseconds"), 1e-6),
    **dict.fromkeys(("tick", "ticks"), 1e-7),
}

_TWO_CHAR_PUNCT = ("==", "!=", "=~", "!~", "<=", ">=", "..", "<>")
_ONE_CHAR_PUNCT = "|(),;=<>+-*/.[]:{}%"
_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "n": "\n", "t": "\t", "r": "\r"}
_SPAN_CLOCK = re.compile(r"^(?:(?P<days>\d+)\.)?(?P<h>\d{1,2}):(?P<m>\d{1,2})(?::(?P<s>\d{1,2}(?:\.\d+)?))?$")
_SPAN_UNIT = re.compile(r"^(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>[A-Za-z]*)$")


def parse_timespan_text(raw: str) -> timedelta | None:
    """Parse the inside of `timespan(...)` or a literal like `5d`; None if it is not a timespan."""
    raw = raw.strip()
    negative = raw.startswith("-")
    if negative:
        raw = raw[1:].strip()
    clock = _SPAN_CLOCK.match(raw)
    if clock:
        span = timedelta(
            days=int(clock["days"] or 0),
            hours=int(clock["h"]),
            minutes=int(clock["m"]),
            seconds=float(clock["s"] or 0),
        )
    else:
        unit_match = _SPAN_UNIT.match(raw)
        if not unit_match:
            return None
        unit = unit_match["unit"] or "d"  # timespan(2) is two days
        if unit not in _UNITS:
            return None
        span = timedelta(seconds=_UNITS[unit] * float(unit_match["num"]))
    return -span if negative else span


def parse_datetime_text(raw: str) -> datetime | None:
    """Parse the inside of `datetime(...)`: ISO 8601, naive meaning UTC. None if not a datetime."""
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        raw = raw[1:-1].strip()
    if not raw or not raw[0].isdigit():
        return None
    candidate = raw[:-1] + "+00:00" if raw[-1] in "Zz" else raw
    try:
        value = datetime.fromisoformat(candidate)
    except ValueError:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


class _Lexer:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.tokens: list[Token] = []
        # offsets where each line starts, so a token's position costs O(log lines), not O(offset)
        self.line_starts = [0] + [match.end() for match in re.finditer("\n", text)]

    def error(self, offset: int, message: str) -> KqlError:
        return KqlError(*self._position(offset), message)

    def add(self, kind: str, start: int, value: Any) -> None:
        line, column = self._position(start)
        self.tokens.append(Token(kind, self.text[start : self.pos], value, line, column, start, self.pos))

    def peek(self, ahead: int = 0) -> str:
        index = self.pos + ahead
        return self.text[index] if index < len(self.text) else ""

    def run(self) -> list[Token]:
        text = self.text
        while self.pos < len(text):
            char = text[self.pos]
            if char in " \t\r\n\f\v":
                self.pos += 1
            elif text.startswith("//", self.pos):
                end = text.find("\n", self.pos)
                self.pos = len(text) if end < 0 else end
            elif char in "'\"":
                self.string(self.pos, self.pos, verbatim=False)
            elif char == "@" and self.peek(1) in ("'", '"'):
                self.string(self.pos, self.pos + 1, verbatim=True)
            elif char.isdigit():
                self.number()
            elif char == "!" and (self.peek(1).isalpha() or self.peek(1) == "_"):
                start = self.pos
                self.pos += 1
                self.word(start)
            elif char.isalpha() or char == "_":
                self.word(self.pos)
            elif text.startswith(_TWO_CHAR_PUNCT, self.pos):
                start = self.pos
                self.pos += 2
                self.add(PUNCT, start, text[start : self.pos])
            elif char in _ONE_CHAR_PUNCT:
                start = self.pos
                self.pos += 1
                self.add(PUNCT, start, char)
            elif char == "`":
                raise self.error(self.pos, "unsupported multi-line string literal (```)")
            else:
                name = f"U+{ord(char):04X}" if not char.isprintable() or char.isspace() else repr(char)
                raise self.error(self.pos, f"unexpected character {name}")
        self.tokens.append(Token(EOF, "", None, *self._position(len(text)), len(text), len(text)))
        return self.tokens

    def _position(self, offset: int) -> tuple[int, int]:
        line = bisect_right(self.line_starts, offset)
        return line, offset - self.line_starts[line - 1] + 1

    def string(self, start: int, quote_at: int, *, verbatim: bool) -> None:
        text = self.text
        quote = text[quote_at]
        self.pos = quote_at + 1
        parts: list[str] = []
        while True:
            if self.pos >= len(text) or text[self.pos] == "\n":
                raise self.error(start, "unterminated string literal")
            char = text[self.pos]
            if char == quote:
                if verbatim and self.peek(1) == quote:  # @'it''s'
                    parts.append(quote)
                    self.pos += 2
                    continue
                self.pos += 1
                break
            if char == "\\" and not verbatim:
                escaped = self.peek(1)
                if escaped not in _ESCAPES:
                    shown = repr(escaped) if escaped else "end of text"
                    raise self.error(self.pos, f"unsupported escape sequence '\\' followed by {shown} in string")
                parts.append(_ESCAPES[escaped])
                self.pos += 2
                continue
            parts.append(char)
            self.pos += 1
        self.add(STRING, start, "".join(parts))

    def number(self) -> None:
        text = self.text
        start = self.pos
        while self.peek().isdigit():
            self.pos += 1
        is_real = False
        if self.peek() == "." and self.peek(1).isdigit():  # not the `..` of between
            is_real = True
            self.pos += 1
            while self.peek().isdigit():
                self.pos += 1
        digits = text[start : self.pos]
        unit_start = self.pos
        while self.peek().isalpha() or self.peek() == "_":
            self.pos += 1
        unit = text[unit_start : self.pos]
        if unit:
            if unit not in _UNITS:
                raise self.error(start, f"invalid number or timespan literal '{text[start : self.pos]}'")
            self.add(TIMESPAN, start, timedelta(seconds=_UNITS[unit] * float(digits)))
            return
        self.add(NUMBER, start, float(digits) if is_real else int(digits))

    def word(self, start: int) -> None:
        text = self.text
        while self.peek().isalnum() or self.peek() == "_":
            self.pos += 1
        word = text[start : self.pos]
        if word in ("h", "H") and self.peek() in ("'", '"'):  # obfuscated string h'...': same value
            self.string(start, self.pos, verbatim=False)
            return
        if word in ("h", "H") and self.peek() == "@" and self.peek(1) in ("'", '"'):
            self.string(start, self.pos + 1, verbatim=True)
            return
        if word in ("in", "!in") and self.peek() == "~":
            self.pos += 1
            word += "~"
        lowered = word.lower()
        if lowered in ("datetime", "timespan", "time") and self._next_nonspace() == "(":
            self.typed_literal(start, lowered)
            return
        self.add(IDENT, start, word)

    def _next_nonspace(self) -> str:
        index = self.pos
        while index < len(self.text) and self.text[index] in " \t":
            index += 1
        return self.text[index] if index < len(self.text) else ""

    def typed_literal(self, start: int, kind: str) -> None:
        text = self.text
        open_at = text.index("(", self.pos)
        close_at = text.find(")", open_at)
        newline_at = text.find("\n", open_at)
        if close_at < 0 or (0 <= newline_at < close_at):
            raise self.error(start, f"unterminated {kind}(...) literal")
        raw = text[open_at + 1 : close_at]
        self.pos = close_at + 1
        if raw.strip().lower() == "null":
            self.add(DATETIME if kind == "datetime" else TIMESPAN, start, None)
            return
        if kind == "datetime":
            value = parse_datetime_text(raw)
            if value is None:
                raise self.error(start, f"invalid datetime literal 'datetime({raw})'")
            self.add(DATETIME, start, value)
            return
        span = parse_timespan_text(raw)
        if span is None:
            raise self.error(start, f"invalid timespan literal '{kind}({raw})'")
        self.add(TIMESPAN, start, span)


def tokenize(text: str) -> list[Token]:
    """Split query text into tokens; comments and whitespace are dropped. Raises KqlError."""
    return _Lexer(text).run()

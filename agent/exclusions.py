"""Exclusions: known-good activity, written the way hunting guides write it (SPEC section 3).

An exclusion is a boolean expression over the facts of one certificate row, for example::

    process.name == "msiexec.exe" && file.name contains "Pulseway.msi"

Everything here is pure: expressions are parsed (by a small recursive-descent parser) and
checked once, at load time, and then evaluated against row mappings.

Grammar
-------
::

    expression := or
    or         := and (("||" | "or") and)*
    and        := unary (("&&" | "and") unary)*
    unary      := ("!" | "not") unary | primary
    primary    := "(" expression ")" | comparison | BOOL_FIELD
    comparison := FIELD ("==" | "!=") literal
                | FIELD ("contains" | "startswith" | "endswith" | "has" | "matches") STRING
                | FIELD "in" "[" literal ("," literal)* [","] "]"
    literal    := STRING | NUMBER | "true" | "false"

``&&`` binds tighter than ``||``, so ``a || b && c`` is ``a || (b && c)``. The keywords
(``and``, ``or``, ``not``, ``in``, the word operators, ``true``, ``false``) and the field names are
case-insensitive. Strings are quoted with ``"`` or ``'``; inside them ``\\\\``, ``\\"`` and ``\\'``
are escapes and every other backslash is kept as written, so Windows paths and regexes read
naturally (``"C:\\Deploy"``, ``"\\d+"``). A trailing backslash must be doubled (``"C:\\Deploy\\\\"``),
since ``\\"`` would escape the closing quote. Numbers are decimal (``-12``, ``1.5``). A boolean field
on its own is a condition: ``is_trusted`` means ``is_trusted == true``.

Fields
------
===============================================  ================================================
field                                            row column
===============================================  ================================================
``file.name``                                    FileName
``file.path``                                    FolderPath (the full path, as Defender's)
``file.directory``                               directory part of FolderPath (``/`` or ``\\``)
``file.extension``                               extension of FileName, no dot, lowercase (``exe``)
``file.size`` (number)                           FileSize
``file.hash.sha1`` / ``file.hash.sha256``        SHA1 / SHA256
``signer`` / ``issuer`` / ``signer_hash``        Signer / Issuer / SignerHash
``is_trusted`` (bool)                            IsTrusted
``process.name``                                 ProcessName
``process.executable``                           FolderPath when ProcessName is set, else null
``process.user``                                 ProcessUser
``process.pid`` (number)                         ProcessId
``process.parent.name`` (alias                   ParentProcessName
``process.parent_process_name``)
``device.name``                                  DeviceName
``file.original_name``                           VersionInfoOriginalFileName (signed version info)
``file.product``                                 VersionInfoProductName
``file.company``                                 VersionInfoCompanyName
``file.description``                             VersionInfoFileDescription
===============================================  ================================================

Fields that a hunting guide may use but the agent cannot observe (``event_id``, network or
registry fields, command lines) are rejected with a message that says so.

Semantics
---------
* Text comparisons are case-insensitive: both sides are folded with
  ``agent.rules.terms.fold`` (NFC, Unicode casefold, NFC), so ``"STRASSE" == "Straße"`` and
  ``"krämer"`` matches ``Krämer`` whatever its normal form. (Kusto folds only ASCII; this folds
  all of Unicode, exactly as the rule engine does.)
* ``has`` is KQL's term match: both sides are split into maximal runs of Unicode letters and
  digits (combining marks belong to their term) and folded; the right side's terms must appear
  as a contiguous run of the left side's terms. ``signer has "Dell"`` matches ``Dell Inc.`` but
  not ``Dellware``; ``"Datto Inc"`` does not match ``Datto, LLC``.
* ``matches`` is a Python ``re`` search (not a full match), case-insensitive, compiled at load
  time; a bad pattern is a load error.
* ``in [...]`` takes strings for text fields and numbers for numeric fields.
* **Null.** A field whose value is missing, ``None`` or an empty string is null. Every
  comparison with a null field is false except ``!=``, which is true (``!=`` is always exactly
  ``!(... == ...)``). This is why ``process.name == "Pulseway.exe"`` never excludes a row found
  by a disk scan, where no process is known. Comparisons with an empty string are rejected at
  load time because they could never be true.

Configuration
-------------
The caller parses TOML with ``tomllib`` and passes the document; :func:`parse_exclusions` reads
its ``exclusions`` array of tables::

    [[exclusions]]            # global: applies to every rule
    id = "dell-signed"
    expression = 'signer has "Dell"'
    reason = "signed by Dell Software (hunting guide)"

    [[exclusions]]            # per rule
    id = "pulseway-msiexec"
    rules = ["6192b741-4540-4416-8dbb-ce0405166d0a"]
    expression = 'process.name == "msiexec.exe" && file.name contains "Pulseway.msi"'

Keys: ``id`` (required, unique), ``expression`` (required), ``rules`` (optional, a non-empty
array of rule ids; omitted means global) and ``reason`` (optional text). TOML literal strings
(``'...'``) keep the expression's quotes and backslashes as written. Problems are reported as
``path:line:column: message`` where the line is that of the offending key in the TOML file
(best effort, 0 when unknown) and, for expression errors, the column is the 1-based position
within the expression.
"""

from __future__ import annotations

import difflib
import ntpath
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.rules.terms import fold, has_terms

# --------------------------------------------------------------------------------------------
# Errors


class ExclusionError(Exception):
    """An expression that cannot be loaded; ``column`` is 1-based within the expression."""

    def __init__(self, column: int, message: str) -> None:
        super().__init__(column, message)
        self.column = column
        self.message = message

    def __str__(self) -> str:
        return f"column {self.column}: {self.message}"


@dataclass(frozen=True)
class ExclusionProblem:
    """One problem in an exclusions config; line 0 means the line is not known."""

    path: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}: {self.message}"


# --------------------------------------------------------------------------------------------
# Text folding and KQL `has` terms come from the rule engine, so both engines agree exactly.


def _has_a_term(text: str) -> bool:
    # A term is a run of letters, digits and combining marks (L*, N*, M*), as in agent.rules.terms.
    return any(unicodedata.category(char)[0] in "LNM" for char in fold(text))


# --------------------------------------------------------------------------------------------
# Fields

_TEXT, _NUMBER, _BOOL = "text", "number", "bool"


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        return value or None
    return str(value)


def _number(value: Any) -> int | float | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        for convert in (int, float):
            try:
                return convert(value.strip())
            except ValueError:
                continue
    return None


def _boolean(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        return {"true": True, "1": True, "false": False, "0": False}.get(value.strip().lower())
    return None


def _column(name: str, kind: str) -> Callable[[Mapping[str, Any]], Any]:
    convert = {_TEXT: _text, _NUMBER: _number, _BOOL: _boolean}[kind]
    return lambda row: convert(row.get(name))


def _file_directory(row: Mapping[str, Any]) -> str | None:
    path = _text(row.get("FolderPath"))
    # ntpath splits on both "\\" and "/" and keeps drive and UNC roots ("C:\\", "\\\\srv\\share\\").
    return (ntpath.dirname(path) or None) if path else None


def _file_extension(row: Mapping[str, Any]) -> str | None:
    name = _text(row.get("FileName"))
    if not name:
        return None
    return ntpath.splitext(name)[1][1:].lower() or None


def _process_executable(row: Mapping[str, Any]) -> str | None:
    # ProcessName is filled only when the file is the image of a running process.
    return _text(row.get("FolderPath")) if _text(row.get("ProcessName")) else None


@dataclass(frozen=True)
class _Field:
    name: str
    kind: str
    source: str  # the row column(s) it reads, for messages
    get: Callable[[Mapping[str, Any]], Any] = field(repr=False, compare=False)


def _fields() -> dict[str, _Field]:
    plain = (
        ("file.name", _TEXT, "FileName"),
        ("file.path", _TEXT, "FolderPath"),
        ("file.size", _NUMBER, "FileSize"),
        ("file.hash.sha1", _TEXT, "SHA1"),
        ("file.hash.sha256", _TEXT, "SHA256"),
        ("signer", _TEXT, "Signer"),
        ("issuer", _TEXT, "Issuer"),
        ("signer_hash", _TEXT, "SignerHash"),
        ("is_trusted", _BOOL, "IsTrusted"),
        ("process.name", _TEXT, "ProcessName"),
        ("process.user", _TEXT, "ProcessUser"),
        ("process.pid", _NUMBER, "ProcessId"),
        ("process.parent.name", _TEXT, "ParentProcessName"),
        ("device.name", _TEXT, "DeviceName"),
        ("file.original_name", _TEXT, "VersionInfoOriginalFileName"),
        ("file.product", _TEXT, "VersionInfoProductName"),
        ("file.company", _TEXT, "VersionInfoCompanyName"),
        ("file.description", _TEXT, "VersionInfoFileDescription"),
    )
    table = {name: _Field(name, kind, column, _column(column, kind)) for name, kind, column in plain}
    table["file.directory"] = _Field("file.directory", _TEXT, "FolderPath", _file_directory)
    table["file.extension"] = _Field("file.extension", _TEXT, "FileName", _file_extension)
    table["process.executable"] = _Field("process.executable", _TEXT, "FolderPath", _process_executable)
    return table


_FIELDS = _fields()
_ALIASES = {"process.parent_process_name": "process.parent.name"}

VALID_FIELDS: tuple[str, ...] = (
    "file.name",
    "file.path",
    "file.directory",
    "file.extension",
    "file.size",
    "file.hash.sha1",
    "file.hash.sha256",
    "signer",
    "issuer",
    "signer_hash",
    "is_trusted",
    "process.name",
    "process.executable",
    "process.user",
    "process.pid",
    "process.parent.name",
    "process.parent_process_name",
    "device.name",
    "file.original_name",
    "file.product",
    "file.company",
    "file.description",
)

# Row column name -> field, so `FileName == "x"` gets a pointed hint.
_COLUMN_HINTS = {
    "filename": "file.name",
    "folderpath": "file.path",
    "filesize": "file.size",
    "sha1": "file.hash.sha1",
    "sha256": "file.hash.sha256",
    "signerhash": "signer_hash",
    "istrusted": "is_trusted",
    "processname": "process.name",
    "processuser": "process.user",
    "processid": "process.pid",
    "parentprocessname": "process.parent.name",
    "devicename": "device.name",
    # Other schemas' spellings for facts the agent has.
    "user.name": "process.user",
    "host.name": "device.name",
    "hostname": "device.name",
    "process.parent.process_name": "process.parent.name",
    "file.hash": "file.hash.sha256",
    "sha": "file.hash.sha1",
}

_NOT_OBSERVABLE_PREFIXES = (
    (("event.", "winlog.", "log.", "eventlog."), "it is an event-log field, not a file or process fact"),
    (
        ("network.", "destination.", "source.", "dns.", "url.", "http."),
        "it is a network field, not a file or process fact",
    ),
    (("registry.",), "it is a registry field, not a file or process fact"),
)
_NOT_OBSERVABLE = {
    "event_id": "it is an event-log field, not a file or process fact",
    "eventid": "it is an event-log field, not a file or process fact",
    "event_code": "it is an event-log field, not a file or process fact",
    "event_type": "it is an event-log field, not a file or process fact",
    "message": "it is an event-log field, not a file or process fact",
    "process.command_line": "the agent does not record command lines",
    "process.args": "the agent does not record command lines",
    "process.parent.command_line": "the agent does not record command lines",
    "process.parent.executable": "the agent records only the parent's name (process.parent.name)",
    "process.parent.pid": "the agent records only the parent's name (process.parent.name)",
    "file.hash.md5": "rows carry SHA1 and SHA256 (file.hash.sha1, file.hash.sha256), not MD5",
    "md5": "rows carry SHA1 and SHA256 (file.hash.sha1, file.hash.sha256), not MD5",
}


def _valid_fields_text() -> str:
    return "Valid fields: " + ", ".join(VALID_FIELDS)


def _unknown_field_message(name: str) -> str:
    lowered = name.lower()
    reason = _NOT_OBSERVABLE.get(lowered)
    if reason is None:
        for prefixes, prefix_reason in _NOT_OBSERVABLE_PREFIXES:
            if lowered.startswith(prefixes):
                reason = prefix_reason
                break
    if reason is not None:
        return f"field '{name}' cannot be observed by the agent: {reason}. {_valid_fields_text()}"
    hint = _COLUMN_HINTS.get(lowered)
    if hint is not None:
        return f"unknown field '{name}': write it as '{hint}'. {_valid_fields_text()}"
    close = difflib.get_close_matches(lowered, VALID_FIELDS, n=1, cutoff=0.75)
    suggestion = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown field '{name}'{suggestion}. {_valid_fields_text()}"


# --------------------------------------------------------------------------------------------
# Tokens

_KEYWORDS = frozenset(
    {"and", "or", "not", "in", "contains", "startswith", "endswith", "has", "matches", "true", "false"}
)
_WORD_OPERATORS = ("contains", "startswith", "endswith", "has", "matches")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_NUMBER_RE = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_TWO_CHAR = ("==", "!=", "&&", "||")
_UNSUPPORTED_OPERATORS = {
    "=~": "'=~' is not needed: every comparison is case-insensitive; use '=='",
    "!~": "'!~' is not needed: every comparison is case-insensitive; use '!='",
    "<=": "'<=' is not supported; the operators are ==, !=, contains, startswith, endswith, has, matches and in",
    ">=": "'>=' is not supported; the operators are ==, !=, contains, startswith, endswith, has, matches and in",
    "<": "'<' is not supported; the operators are ==, !=, contains, startswith, endswith, has, matches and in",
    ">": "'>' is not supported; the operators are ==, !=, contains, startswith, endswith, has, matches and in",
    "=": "'=' is not an operator; use '==' to compare",
    "&": "'&' is not an operator; use '&&' or 'and'",
    "|": "'|' is not an operator; use '||' or 'or'",
}


@dataclass(frozen=True)
class _Token:
    kind: str  # ident, string, number, op, end, bad
    text: str
    column: int  # 1-based
    value: Any = None  # decoded string, number, or the message of a bad token

    def is_word(self, *words: str) -> bool:
        return self.kind == "ident" and self.text.lower() in words

    def describe(self) -> str:
        if self.kind == "end":
            return "the end of the expression"
        if self.kind == "string":
            return f"string {self.text}"
        if self.kind == "number":
            return f"number {self.text}"
        return f"'{self.text}'"


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, length = 0, len(text)
    while i < length:
        char = text[i]
        if char.isspace():
            i += 1
            continue
        column = i + 1
        pair = text[i : i + 2]
        if char in "\"'":
            token, i = _read_string(text, i)
            tokens.append(token)
            if token.kind == "bad":
                return tokens
            continue
        if pair in _TWO_CHAR:
            tokens.append(_Token("op", pair, column))
            i += 2
            continue
        if pair in _UNSUPPORTED_OPERATORS or char in _UNSUPPORTED_OPERATORS:
            key = pair if pair in _UNSUPPORTED_OPERATORS else char
            tokens.append(_Token("bad", key, column, _UNSUPPORTED_OPERATORS[key]))
            return tokens
        if char in "!()[],":
            tokens.append(_Token("op", char, column))
            i += 1
            continue
        match = _NUMBER_RE.match(text, i)
        if match:
            end = match.end()
            if end < length and (text[end].isalnum() or text[end] in "_."):
                tokens.append(_Token("bad", text[i:end], column, f"malformed number starting '{match.group()}'"))
                return tokens
            literal = match.group()
            number: int | float = float(literal) if "." in literal else int(literal)
            tokens.append(_Token("number", literal, column, number))
            i = end
            continue
        match = _IDENT.match(text, i)
        if match:
            tokens.append(_Token("ident", match.group(), column))
            i = match.end()
            continue
        tokens.append(_Token("bad", char, column, f"unexpected character {char!r}"))
        return tokens
    tokens.append(_Token("end", "", length + 1))
    return tokens


def _read_string(text: str, start: int) -> tuple[_Token, int]:
    quote = text[start]
    out: list[str] = []
    i = start + 1
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text) and text[i + 1] in "\\\"'":
            out.append(text[i + 1])
            i += 2
            continue
        if char == quote:
            return _Token("string", text[start : i + 1], start + 1, "".join(out)), i + 1
        out.append(char)
        i += 1
    message = f"unterminated string: the {quote} at column {start + 1} is never closed"
    if f"\\{quote}" in text[start + 1 :]:
        message += f" (a backslash before {quote} escapes it; write a trailing backslash as \\\\)"
    return _Token("bad", text[start:], start + 1, message), len(text)


# --------------------------------------------------------------------------------------------
# Syntax tree (frozen; operands are folded and compiled at load time)


@dataclass(frozen=True)
class _Compare:
    field: str
    op: str
    operand: Any
    column: int

    def evaluate(self, row: Mapping[str, Any]) -> bool:
        spec = _FIELDS[self.field]
        value = spec.get(row)
        if value is None:
            return self.op == "!="
        if spec.kind != _TEXT:
            if self.op == "==":
                return bool(value == self.operand)
            if self.op == "!=":
                return bool(value != self.operand)
            return value in self.operand  # "in"
        op, operand = self.op, self.operand
        if op == "has":
            return has_terms(value, operand)
        if op == "matches":
            return operand.search(unicodedata.normalize("NFC", value)) is not None
        folded = fold(value)
        if op == "==":
            return folded == operand
        if op == "!=":
            return folded != operand
        if op == "contains":
            return operand in folded
        if op == "startswith":
            return folded.startswith(operand)
        if op == "endswith":
            return folded.endswith(operand)
        return folded in operand  # "in"


@dataclass(frozen=True)
class _BoolField:
    field: str

    def evaluate(self, row: Mapping[str, Any]) -> bool:
        return _FIELDS[self.field].get(row) is True


@dataclass(frozen=True)
class _Not:
    operand: _Node

    def evaluate(self, row: Mapping[str, Any]) -> bool:
        return not self.operand.evaluate(row)


@dataclass(frozen=True)
class _All:
    operands: tuple[_Node, ...]

    def evaluate(self, row: Mapping[str, Any]) -> bool:
        return all(operand.evaluate(row) for operand in self.operands)


@dataclass(frozen=True)
class _Any:
    operands: tuple[_Node, ...]

    def evaluate(self, row: Mapping[str, Any]) -> bool:
        return any(operand.evaluate(row) for operand in self.operands)


_Node = _Compare | _BoolField | _Not | _All | _Any


# --------------------------------------------------------------------------------------------
# Parser


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.index = 0
        self.fields: set[str] = set()

    def peek(self) -> _Token:
        token = self.tokens[self.index]
        if token.kind == "bad":
            raise ExclusionError(token.column, token.value)
        return token

    def advance(self) -> _Token:
        token = self.peek()
        if token.kind != "end":
            self.index += 1
        return token

    def is_op(self, *ops: str) -> bool:
        token = self.peek()
        return token.kind == "op" and token.text in ops

    def parse(self) -> _Node:
        if self.peek().kind == "end":
            raise ExclusionError(1, "empty expression")
        node = self.parse_or()
        token = self.peek()
        if token.kind != "end":
            if token.is_word("and", "or") or token.kind == "op":
                problem = f"unexpected {token.describe()}"
            else:
                problem = f"unexpected {token.describe()} after a complete condition (missing '&&' or '||'?)"
            raise ExclusionError(token.column, problem)
        return node

    def parse_or(self) -> _Node:
        operands = [self.parse_and()]
        while self.is_op("||") or self.peek().is_word("or"):
            self.advance()
            operands.append(self.parse_and())
        return operands[0] if len(operands) == 1 else _Any(tuple(operands))

    def parse_and(self) -> _Node:
        operands = [self.parse_unary()]
        while self.is_op("&&") or self.peek().is_word("and"):
            self.advance()
            operands.append(self.parse_unary())
        return operands[0] if len(operands) == 1 else _All(tuple(operands))

    def parse_unary(self) -> _Node:
        if self.is_op("!") or self.peek().is_word("not"):
            self.advance()
            return _Not(self.parse_unary())
        return self.parse_primary()

    def parse_primary(self) -> _Node:
        token = self.peek()
        if token.kind == "op" and token.text == "(":
            self.advance()
            node = self.parse_or()
            closing = self.peek()
            if not (closing.kind == "op" and closing.text == ")"):
                raise ExclusionError(
                    closing.column,
                    f"expected ')' to close the '(' at column {token.column}, found {closing.describe()}",
                )
            self.advance()
            return node
        if token.kind == "ident" and token.text.lower() not in _KEYWORDS:
            self.advance()
            return self.parse_comparison(token, self.resolve_field(token))
        raise ExclusionError(token.column, f"expected a field name, '!' or '(', found {token.describe()}")

    def resolve_field(self, token: _Token) -> _Field:
        name = token.text.lower()
        name = _ALIASES.get(name, name)
        spec = _FIELDS.get(name)
        if spec is None:
            raise ExclusionError(token.column, _unknown_field_message(token.text))
        self.fields.add(spec.name)
        return spec

    def parse_comparison(self, field_token: _Token, spec: _Field) -> _Node:
        token = self.peek()
        if token.kind == "op" and token.text in ("==", "!="):
            op = token.text
        elif token.is_word("in", *_WORD_OPERATORS):
            op = token.text.lower()
        elif spec.kind == _BOOL and (token.kind == "end" or token.is_word("and", "or") or self.is_op(")", "&&", "||")):
            return _BoolField(spec.name)
        elif (token.kind == "op" and token.text == "!") or token.is_word("not"):
            following = self.tokens[self.index + 1]
            operator = following.text if following.kind in ("ident", "op") else "<operator>"
            raise ExclusionError(
                token.column,
                f"'{token.text}' negates a whole condition; write {token.text}({field_token.text} {operator} ...)",
            )
        else:
            raise ExclusionError(
                token.column,
                f"expected an operator after '{field_token.text}' (==, !=, contains, startswith, endswith, has, "
                f"matches or in), found {token.describe()}",
            )
        self.advance()
        if spec.kind != _TEXT and op not in ("==", "!=", "in"):
            kind = "a number" if spec.kind == _NUMBER else "true or false"
            allowed = "==, != or in" if spec.kind == _NUMBER else "== or !="
            raise ExclusionError(token.column, f"'{op}' compares text, but {spec.name} is {kind}; use {allowed}")
        if spec.kind == _BOOL and op == "in":
            raise ExclusionError(token.column, f"'in' takes a list of strings or numbers; {spec.name} is true or false")
        if op == "in":
            operand: Any = self.parse_list(spec, token)
        else:
            operand = self.parse_operand(spec, op, token)
        return _Compare(spec.name, op, operand, field_token.column)

    def parse_literal(self, spec: _Field, op_token: _Token) -> tuple[_Token, Any]:
        token = self.peek()
        if token.kind == "string":
            value: Any = token.value
        elif token.kind == "number":
            value = token.value
        elif token.is_word("true", "false"):
            value = token.text.lower() == "true"
        elif token.kind == "ident" and token.text.lower() not in _KEYWORDS:
            name = _ALIASES.get(token.text.lower(), token.text.lower())
            if name in _FIELDS:
                problem = "comparing two fields is not supported; the right side must be a literal"
            else:
                problem = f'strings must be quoted: write "{token.text}"'
            raise ExclusionError(token.column, problem)
        else:
            raise ExclusionError(
                token.column,
                f"expected a quoted string, a number, true or false after '{op_token.text}', found {token.describe()}",
            )
        if spec.kind == _TEXT:
            fits = isinstance(value, str)
        elif spec.kind == _NUMBER:
            fits = isinstance(value, int | float) and not isinstance(value, bool)
        else:
            fits = isinstance(value, bool)
        if not fits:
            kind = {_TEXT: "text", _NUMBER: "a number", _BOOL: "true or false"}[spec.kind]
            literal = {_TEXT: "a quoted string", _NUMBER: "a number", _BOOL: "true or false"}[spec.kind]
            raise ExclusionError(
                token.column, f"{spec.name} is {kind}; compare it with {literal}, not {token.describe()}"
            )
        if isinstance(value, str) and not value:
            raise ExclusionError(
                token.column,
                "an empty string can never match: an empty or missing field is null, and every comparison with "
                'null is false except != (to require a value, use: <field> matches ".")',
            )
        self.advance()
        return token, value

    def parse_operand(self, spec: _Field, op: str, op_token: _Token) -> Any:
        if op in _WORD_OPERATORS and self.peek().kind != "string":
            token = self.peek()
            self.parse_literal(spec, op_token)  # raises: only a quoted string fits a text field
            raise ExclusionError(token.column, f"'{op}' takes a quoted string, found {token.describe()}")
        token, value = self.parse_literal(spec, op_token)
        if spec.kind != _TEXT:
            return value
        if op == "has":
            if not _has_a_term(value):
                raise ExclusionError(token.column, f"'has' needs at least one letter or digit in {token.text}")
            return value
        if op == "matches":
            try:
                return re.compile(unicodedata.normalize("NFC", value), re.IGNORECASE)
            except re.error as error:
                raise ExclusionError(token.column, f"bad regular expression {token.text}: {error}") from None
        return fold(value)

    def parse_list(self, spec: _Field, op_token: _Token) -> frozenset[Any]:
        opening = self.peek()
        if not (opening.kind == "op" and opening.text == "["):
            hint = " (lists are written in square brackets)" if opening.kind == "op" and opening.text == "(" else ""
            raise ExclusionError(opening.column, f"expected '[' after 'in', found {opening.describe()}{hint}")
        self.advance()
        items: list[Any] = []
        while True:
            if self.is_op("]"):
                if not items:
                    raise ExclusionError(self.peek().column, "empty list: 'in []' can never match")
                self.advance()
                break
            _, value = self.parse_literal(spec, op_token)
            items.append(fold(value) if isinstance(value, str) else value)
            if self.is_op(","):
                self.advance()
                continue
            if not self.is_op("]"):
                token = self.peek()
                raise ExclusionError(
                    token.column,
                    f"expected ',' or ']' in the list opened at column {opening.column}, found {token.describe()}",
                )
        return frozenset(items)


# --------------------------------------------------------------------------------------------
# Public API


@dataclass(frozen=True)
class Expression:
    """A parsed, checked exclusion expression. Build it with :func:`parse_expression`.

    ``fields`` holds the canonical names of the fields it reads (the alias
    ``process.parent_process_name`` is reported as ``process.parent.name``).
    """

    text: str
    fields: frozenset[str]
    _root: _Node = field(repr=False, compare=False)

    def matches(self, row: Mapping[str, Any]) -> bool:
        return self._root.evaluate(row)


def parse_expression(text: str) -> Expression:
    """Parse and check one expression; raise :class:`ExclusionError` naming the column."""
    if not isinstance(text, str):
        raise ExclusionError(1, f"an expression must be a string, not {type(text).__name__}")
    parser = _Parser(text)
    root = parser.parse()
    return Expression(text=text, fields=frozenset(parser.fields), _root=root)


def _rule_key(rule_id: str) -> str:
    return rule_id.strip().casefold()


@dataclass(frozen=True)
class Exclusion:
    """A named expression; ``rules`` are the rule ids it applies to, ``()`` means every rule."""

    id: str
    expression: Expression
    rules: tuple[str, ...] = ()
    reason: str = ""

    def applies(self, row: Mapping[str, Any], rule_id: str | None = None) -> bool:
        """True if this exclusion covers ``row`` for ``rule_id``.

        A per-rule exclusion applies only when it is asked about one of its rules (rule ids are
        compared case-insensitively, as GUIDs); with ``rule_id=None`` only global ones apply.
        """
        if self.rules:
            if rule_id is None or _rule_key(rule_id) not in {_rule_key(rule) for rule in self.rules}:
                return False
        return self.expression.matches(row)


def first_exclusion(
    exclusions: Sequence[Exclusion], row: Mapping[str, Any], rule_id: str | None = None
) -> Exclusion | None:
    """The first exclusion, in config order, that applies to ``row`` for ``rule_id``."""
    for exclusion in exclusions:
        if exclusion.applies(row, rule_id):
            return exclusion
    return None


# --------------------------------------------------------------------------------------------
# Config

_ENTRY_KEYS = ("id", "expression", "rules", "reason")
_ARRAY_HEADER = re.compile(r"^\s*\[\[\s*exclusions\s*\]\]\s*(?:#.*)?$")
_TABLE_HEADER = re.compile(r"^\s*\[")


class _Locator:
    """Best-effort TOML line numbers for `[[exclusions]]` entries, from the source text."""

    def __init__(self, source_text: str | None) -> None:
        self.lines = source_text.splitlines() if source_text else []
        self.blocks: list[tuple[int, int]] | None = None

    def bind(self, count: int) -> None:
        headers = [i for i, line in enumerate(self.lines) if _ARRAY_HEADER.match(line)]
        if len(headers) != count:
            return  # inline tables or an unusual layout: fall back to searching for values
        blocks = []
        for header in headers:
            end = header + 1
            while end < len(self.lines) and not _TABLE_HEADER.match(self.lines[end]):
                end += 1
            blocks.append((header, end))
        self.blocks = blocks

    def entry(self, index: int) -> int:
        return self.blocks[index][0] + 1 if self.blocks else 0

    def key(self, index: int, key: str, value: Any = None) -> int:
        if self.blocks:
            start, end = self.blocks[index]
            pattern = re.compile(rf"""^\s*["']?{re.escape(key)}["']?\s*=""")
            for number in range(start, end):
                if pattern.match(self.lines[number]):
                    return number + 1
            return start + 1
        if isinstance(value, str) and value:
            for number, line in enumerate(self.lines):
                if value in line:
                    return number + 1
        return 0

    def top_key(self, key: str) -> int:
        pattern = re.compile(rf"""^\s*(?:\[\s*)?["']?{re.escape(key)}["']?\s*(?:=|\])""")
        for number, line in enumerate(self.lines):
            if pattern.match(line):
                return number + 1
        return 0


def parse_exclusions(
    config: Mapping[str, Any], *, path: str = "<config>", source_text: str | None = None
) -> tuple[tuple[Exclusion, ...], tuple[ExclusionProblem, ...]]:
    """Read ``config["exclusions"]`` (see the module docstring); pure.

    Returns the valid exclusions, in config order, and every problem found. An entry with a
    problem is left out; for a duplicate id the first entry is kept.
    """
    locator = _Locator(source_text)
    problems: list[ExclusionProblem] = []
    raw = config.get("exclusions")
    if raw is None:
        return (), ()
    if not isinstance(raw, list):
        message = f"'exclusions' must be an array of tables ([[exclusions]]), not {_toml_type(raw)}"
        return (), (ExclusionProblem(path, locator.top_key("exclusions"), 0, message),)
    locator.bind(len(raw))
    exclusions: list[Exclusion] = []
    first_line: dict[str, int] = {}
    for index, entry in enumerate(raw):
        entry_problems: list[ExclusionProblem] = []

        def problem(line: int, message: str, column: int = 0, *, sink: list[ExclusionProblem] = entry_problems) -> None:
            sink.append(ExclusionProblem(path, line, column, message))

        where = f"exclusions entry {index + 1}"
        if not isinstance(entry, Mapping):
            problem(locator.entry(index), f"{where} must be a table, not {_toml_type(entry)}")
            problems.extend(entry_problems)
            continue
        exclusion_id = entry.get("id")
        if isinstance(exclusion_id, str) and exclusion_id.strip():
            where = f"exclusion '{exclusion_id}'"
        for key in sorted(set(entry) - set(_ENTRY_KEYS), key=str):
            problem(
                locator.key(index, str(key)),
                f"{where}: unknown key '{key}' (allowed: {', '.join(_ENTRY_KEYS)})",
            )
        if exclusion_id is None:
            problem(locator.entry(index), f"{where}: missing 'id'")
        elif not isinstance(exclusion_id, str) or not exclusion_id.strip():
            problem(
                locator.key(index, "id"), f"{where}: 'id' must be a non-empty string, not {_toml_type(exclusion_id)}"
            )
        elif exclusion_id in first_line:
            line = first_line[exclusion_id]
            first = f" (first defined at line {line})" if line else ""
            problem(locator.key(index, "id", exclusion_id), f"duplicate exclusion id '{exclusion_id}'{first}")
        else:
            first_line[exclusion_id] = locator.key(index, "id", exclusion_id)

        text = entry.get("expression")
        expression: Expression | None = None
        if text is None:
            problem(locator.entry(index), f"{where}: missing 'expression'")
        elif not isinstance(text, str):
            problem(locator.key(index, "expression"), f"{where}: 'expression' must be a string, not {_toml_type(text)}")
        else:
            try:
                expression = parse_expression(text)
            except ExclusionError as error:
                problem(locator.key(index, "expression", text), f"{where}: {error.message}", error.column)

        rules = entry.get("rules", ())
        if "rules" in entry:
            if not isinstance(rules, list) or not all(isinstance(rule, str) and rule.strip() for rule in rules):
                problem(locator.key(index, "rules"), f"{where}: 'rules' must be an array of rule id strings")
            elif not rules:
                problem(locator.key(index, "rules"), f"{where}: 'rules' is empty; leave it out for a global exclusion")

        reason = entry.get("reason", "")
        if not isinstance(reason, str):
            problem(locator.key(index, "reason"), f"{where}: 'reason' must be a string, not {_toml_type(reason)}")

        if entry_problems:
            problems.extend(entry_problems)
            continue
        assert expression is not None and isinstance(exclusion_id, str)
        exclusions.append(Exclusion(exclusion_id, expression, tuple(dict.fromkeys(rules)), reason))
    return tuple(exclusions), tuple(problems)


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "an empty string" if not value.strip() else "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, Mapping):
        return "a table"
    return type(value).__name__

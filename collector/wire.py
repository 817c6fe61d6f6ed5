"""The wire format of forwarded rows, and its validation. Pure.

A batch is a JSON object ``{"node_key", "batch_id", "dropped_total", "rows": [...]}``, sent
gzip-compressed (``Content-Encoding: gzip``). Each row is an object keyed by the
DeviceFileCertificateInfo columns of ``agent.schema``: datetimes as ISO 8601 strings, path
fields (FolderPath, FileName) with the reversible percent escape of ``agent.textenc``.
A string may not hold NUL or lone surrogates (the agent escapes those with the same escape),
so every value the collector stores is valid text on both SQLite and PostgreSQL.

A row may also carry ``RuleExclusions``: {rule id: exclusion id} for the hits the agent
excluded (agent.transport.outbox). The collector stores those hits apart and leaves them out of
fleet hunts unless asked (``include_excluded``).
"""

from __future__ import annotations

import datetime as dt
import zlib
from dataclasses import dataclass
from typing import Any

from agent.schema import COLUMN_NAMES, COLUMN_TYPES
from agent.transport.outbox import RULE_EXCLUSIONS

INT64 = 2**63 - 1


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 8 * 1024 * 1024  # on the wire (compressed)
    max_decompressed_bytes: int = 64 * 1024 * 1024
    max_rows_per_batch: int = 5000
    max_field_chars: int = 32768
    max_exclusions_per_row: int = 512  # (rule, exclusion) pairs; the shipped catalog has 140 rules
    max_rule_id_chars: int = 128  # the collector's rule_id columns
    max_exclusion_id_chars: int = 256


class WireError(Exception):
    """A request the collector refuses; ``status`` is the HTTP status (always 4xx)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class BoundedInflater:
    """Incremental gzip/zlib decompression that stops at ``cap`` output bytes (a gzip bomb costs
    at most ``cap`` bytes of memory)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.size = 0
        self.parts: list[bytes] = []
        self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def feed(self, data: bytes) -> None:
        while data:
            try:
                out = self._z.decompress(data, self.cap - self.size + 1)
            except zlib.error as exc:
                raise WireError(400, f"bad gzip data: {exc}") from exc
            self.size += len(out)
            if self.size > self.cap:
                raise WireError(413, f"decompressed body larger than {self.cap} bytes")
            self.parts.append(out)
            data = self._z.unconsumed_tail
            if self._z.eof:
                if self._z.unused_data.strip(b"\0"):
                    raise WireError(400, "trailing data after the gzip stream")
                return

    def finish(self) -> bytes:
        if not self._z.eof:
            raise WireError(400, "truncated gzip data")
        return b"".join(self.parts)


def _bad_text(value: str) -> bool:
    if "\x00" in value:
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def parse_datetime(value: Any, name: str) -> dt.datetime:
    if not isinstance(value, str) or len(value) > 64:
        raise WireError(422, f"{name}: expected an ISO 8601 datetime string")
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
    except ValueError as exc:
        raise WireError(422, f"{name}: {exc}") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    try:
        return parsed.astimezone(dt.UTC)
    except (OverflowError, ValueError) as exc:
        raise WireError(422, f"{name}: {exc}") from exc


def parse_row(raw: Any, limits: Limits) -> dict[str, Any]:
    """One wire row as typed values (datetimes aware UTC); WireError(422) on anything else."""
    if not isinstance(raw, dict):
        raise WireError(422, "a row must be a JSON object")
    unknown = [k for k in raw if k not in COLUMN_TYPES and k != RULE_EXCLUSIONS]
    if unknown:
        raise WireError(422, f"unknown column(s): {sorted(str(k)[:64] for k in unknown)[:5]}")
    row: dict[str, Any] = {}
    for name in COLUMN_NAMES:
        kind = COLUMN_TYPES[name]
        value = raw.get(name)
        if kind == "string":
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise WireError(422, f"{name}: expected a string")
            if len(value) > limits.max_field_chars:
                raise WireError(422, f"{name}: longer than {limits.max_field_chars} characters")
            if _bad_text(value):
                raise WireError(422, f"{name}: NUL or lone surrogate (escape it with the path escape)")
        elif kind == "bool":
            if value is None:
                value = None
            elif isinstance(value, bool):
                pass
            elif value in (0, 1) and isinstance(value, int):
                value = bool(value)
            else:
                raise WireError(422, f"{name}: expected a bool")
        elif kind in ("long", "int"):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or abs(value) > INT64):
                raise WireError(422, f"{name}: expected a 64-bit integer")
        elif kind == "datetime":
            if value is not None:
                value = parse_datetime(value, name)
        row[name] = value
    if not row["DeviceId"] or len(row["DeviceId"]) > 128:
        raise WireError(422, "DeviceId: required, at most 128 characters")
    if row["ReportId"] is None or row["ReportId"] < 0:
        raise WireError(422, "ReportId: required, a non-negative integer")
    if row["Timestamp"] is None:
        raise WireError(422, "Timestamp: required")
    exclusions = raw.get(RULE_EXCLUSIONS)
    if exclusions is not None:
        row[RULE_EXCLUSIONS] = parse_exclusions(exclusions, limits)
    return row


def parse_exclusions(raw: Any, limits: Limits) -> dict[str, str]:
    """A row's RuleExclusions: a JSON object of rule id -> exclusion id, both non-empty text."""
    name = RULE_EXCLUSIONS
    if not isinstance(raw, dict):
        raise WireError(422, f"{name}: expected an object of rule id -> exclusion id")
    if len(raw) > limits.max_exclusions_per_row:
        raise WireError(422, f"{name}: more than {limits.max_exclusions_per_row} entries")
    out: dict[str, str] = {}
    for rule_id, exclusion_id in raw.items():
        if not rule_id or len(rule_id) > limits.max_rule_id_chars or _bad_text(rule_id):
            raise WireError(422, f"{name}: a rule id must be 1 to {limits.max_rule_id_chars} characters of text")
        if (
            not isinstance(exclusion_id, str)
            or not exclusion_id
            or len(exclusion_id) > limits.max_exclusion_id_chars
            or _bad_text(exclusion_id)
        ):
            raise WireError(
                422, f"{name}: an exclusion id must be 1 to {limits.max_exclusion_id_chars} characters of text"
            )
        out[rule_id] = exclusion_id
    return out


def parse_batch(payload: Any, limits: Limits) -> tuple[str, str, int | None, list[dict[str, Any]]]:
    """(node_key, batch_id, dropped_total or None, rows) of a decoded batch."""
    if not isinstance(payload, dict):
        raise WireError(422, "the batch must be a JSON object")
    node_key, batch_id = payload.get("node_key"), payload.get("batch_id")
    if not isinstance(node_key, str) or not node_key or len(node_key) > 256:
        raise WireError(401, "node_key missing")
    if not isinstance(batch_id, str) or not batch_id or len(batch_id) > 256:
        raise WireError(422, "batch_id: required, a string of at most 256 characters")
    dropped = payload.get("dropped_total")
    if dropped is not None and (isinstance(dropped, bool) or not isinstance(dropped, int) or not 0 <= dropped <= INT64):
        raise WireError(422, "dropped_total: a non-negative integer")
    rows = payload.get("rows")
    if not isinstance(rows, list):
        raise WireError(422, "rows: expected a list")
    if len(rows) > limits.max_rows_per_batch:
        raise WireError(413, f"more than {limits.max_rows_per_batch} rows in one batch")
    return node_key, batch_id, dropped, [parse_row(r, limits) for r in rows]


def row_to_wire(row: dict[str, Any]) -> dict[str, Any]:
    """A stored row as JSON-ready wire data (datetimes ISO 8601 UTC with Z)."""
    out: dict[str, Any] = {}
    for name in COLUMN_NAMES:
        value = row.get(name)
        if isinstance(value, dt.datetime):
            value = value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
        out[name] = value
    return out

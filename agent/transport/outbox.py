"""The outbox's wire form of a row. Pure.

Rows wait in the store's ``outbox`` table (``agent.store.Store``, section "outbox (fleet)"),
written in the same transaction as the rows themselves, until the collector acknowledges
them. Each entry holds the row as the collector's wire JSON: datetimes in ISO 8601 UTC with Z;
path fields (FolderPath, FileName) with the reversible percent escape of ``agent.textenc``;
any other string that holds NUL or bytes that are not valid UTF-8 gets the same escape (such
text cannot be stored in PostgreSQL as it is).

A row whose rule hits the agent excluded carries ``RuleExclusions``, an object rule id ->
exclusion id (the agent's ``hits.excluded_by``), so that the collector leaves those hits out of
fleet hunts as the agent's ``hunt`` does; it is not a DeviceFileCertificateInfo column.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

from agent.schema import COLUMN_NAMES
from agent.textenc import encodable, escape_path

PATH_COLUMNS = frozenset({"FolderPath", "FileName"})
FORWARD_MODES = ("hits", "all")
RULE_EXCLUSIONS = "RuleExclusions"  # the wire row's key for {rule id: exclusion id}


def wire_row(row: Mapping[str, Any], exclusions: Mapping[str, str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in COLUMN_NAMES:
        value = row.get(name)
        if isinstance(value, dt.datetime):
            value = value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
        elif isinstance(value, str) and (name in PATH_COLUMNS or "\x00" in value or not encodable(value)):
            value = escape_path(value)
        out[name] = value
    if exclusions:
        out[RULE_EXCLUSIONS] = {str(rule): str(exclusion) for rule, exclusion in sorted(exclusions.items())}
    return out


def encode_entry(row: Mapping[str, Any], exclusions: Mapping[str, str] | None = None) -> str:
    """The outbox payload of a row; ``exclusions`` are its excluded hits, rule id -> exclusion id."""
    return json.dumps(wire_row(row, exclusions), ensure_ascii=False, separators=(",", ":"))

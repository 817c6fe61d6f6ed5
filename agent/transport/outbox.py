"""The outbox's wire form of a row. Pure.

Rows wait in the store's ``outbox`` table (``agent.store.Store``, section "outbox (fleet)"),
written in the same transaction as the rows themselves, until the collector acknowledges
them. Each entry holds the row as the collector's wire JSON: datetimes in ISO 8601 UTC with Z;
path fields (FolderPath, FileName) with the reversible percent escape of ``agent.textenc``;
any other string that holds NUL or bytes that are not valid UTF-8 gets the same escape (such
text cannot be stored in PostgreSQL as it is).
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


def wire_row(row: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in COLUMN_NAMES:
        value = row.get(name)
        if isinstance(value, dt.datetime):
            value = value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
        elif isinstance(value, str) and (name in PATH_COLUMNS or "\x00" in value or not encodable(value)):
            value = escape_path(value)
        out[name] = value
    return out


def encode_entry(row: Mapping[str, Any]) -> str:
    return json.dumps(wire_row(row), ensure_ascii=False, separators=(",", ":"))

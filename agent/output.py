"""Machine output for every listing command, and the --out file.

- ``json``: one object ``{"summary": {...}, "results": [...], "errors": [...]}``;
- ``jsonl``: one record per line;
- ``csv``: a header and one record per line, every cell neutralised against formula injection.

The records come from ``agent.views.records`` (PascalCase keys, the same keys on every record).
docs/output.md documents the shapes.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from agent.textenc import encodable, escape_path

FORMATS = ("table", "json", "jsonl", "csv")
EXTENSION_FORMATS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
# A spreadsheet treats a cell starting with one of these as a formula (OWASP "CSV Injection").
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


class OutputError(Exception):
    """--out cannot be written: one line naming the file."""


def plain(value: Any) -> Any:
    """JSON-ready value: datetimes as ISO 8601 UTC with Z, tuples and sets as lists, and a str
    holding undecodable bytes in the path escape (records already escape their path fields)."""
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in (sorted(value) if isinstance(value, (set, frozenset)) else value)]
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, str) and not encodable(value):
        return escape_path(value)  # raw bytes (surrogateescape) that no UTF-8 output can carry
    return value


def neutralise_formula(text: str) -> str:
    """OWASP's advice for CSV: a cell that a spreadsheet would run as a formula gets a leading '."""
    return "'" + text if text.startswith(FORMULA_START) else text


def csv_cell(value: Any) -> str:
    value = plain(value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, dict)):
        return neutralise_formula(json.dumps(value, ensure_ascii=False))
    return neutralise_formula(str(value))


def render_json(summary: Mapping[str, Any], results: Sequence[Any], errors: Sequence[Any]) -> str:
    document = {"summary": plain(summary), "results": plain(list(results)), "errors": plain(list(errors))}
    return json.dumps(document, ensure_ascii=False, indent=2) + "\n"


def render_jsonl(records: Sequence[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(plain(dict(r)), ensure_ascii=False) + "\n" for r in records)


def render_csv(records: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(keys)
    for rec in records:
        writer.writerow([csv_cell(rec.get(k)) for k in keys])
    return buf.getvalue()


def format_for(out: str | None, fmt: str | None) -> str:
    """The output format: --format when given, else from --out's extension, else the table."""
    if fmt:
        return fmt
    if out:
        return EXTENSION_FORMATS.get(Path(out).suffix.lower(), "table")
    return "table"


def check_out(out: str | None) -> None:
    """Validate --out before any work: its directory exists and is writable, and it is not a directory."""
    if not out:
        return
    path = Path(out)
    if path.is_dir():
        raise OutputError(f"--out {out}: is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"--out {out}: directory {parent} does not exist")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"--out {out}: not writable")
    if not path.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"--out {out}: directory {parent} is not writable")


def write_output(text: str, out: str | None, stream: Any) -> None:
    """Write to --out (atomically: a temporary file renamed over it) or to the stream."""
    if not out:
        stream.write(text)
        stream.flush()
        return
    path = Path(out)
    if path.exists() and not path.is_file():  # /dev/stdout, a FIFO: write in place
        with path.open("w", encoding="utf-8") as handle:
            handle.write(text)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"--out {out}: {exc.strerror or exc}") from exc


def render(
    records: Sequence[Mapping[str, Any]],
    fmt: str,
    *,
    columns: Sequence[str] | None = None,
    max_width: int = 60,
) -> str:
    """Records in one format, for callers that build their own records (``agent.rules_cli``).
    The CLI's listing commands use ``render_json`` (one object) and ``agent.views`` instead."""
    keys = list(columns) if columns else list(dict.fromkeys(k for rec in records for k in rec))
    if fmt == "json":
        return json.dumps([plain(dict(r)) for r in records], ensure_ascii=False, indent=2) + "\n"
    if fmt == "jsonl":
        return render_jsonl(records)
    if fmt == "csv":
        return render_csv(records, keys)
    if fmt != "table":
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    from agent.views.table import make_console, print_records

    buf = io.StringIO()
    print_records(records, keys, make_console(buf))
    return buf.getvalue()

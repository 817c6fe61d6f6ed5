"""Terminal rendering of the shared records with rich: the findings table, the end summary and
plain record tables. Colour only on a terminal (rich honours NO_COLOR); untrusted text goes
through ``agent.textenc.display`` and paths through ``escape_path`` before they are shown."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from rich import box
from rich.cells import cell_len, get_character_cell_size
from rich.console import Console
from rich.table import Table
from rich.text import Text

from agent.textenc import display, escape_path
from agent.views.records import BROKEN, NOT_VERIFIED, TRUSTED, UNTRUSTED, Finding, Tally

ELLIPSIS = "…"
UNBOUNDED_WIDTH = 100_000  # not a terminal: never fit, never shorten
VERDICT_STYLE = {TRUSTED: "green", BROKEN: "bold red", UNTRUSTED: "yellow", NOT_VERIFIED: "dim"}
MIN_PATH = 16
MIN_SIGNER = 12
MIN_TOOL = 8
FIRST_PROBLEMS = 10


def make_console(stream: TextIO, *, width: int | None = None) -> Console:
    """A console on ``stream``: the terminal's width and colour on a TTY; otherwise $COLUMNS if set,
    else no width limit (a file gets whole lines), and no colour."""
    tty = stream.isatty()
    if width is None and not tty:
        columns = os.environ.get("COLUMNS", "")
        width = int(columns) if columns.isdigit() and int(columns) > 0 else UNBOUNDED_WIDTH
    return Console(
        file=stream,
        width=width,
        force_terminal=tty,
        no_color=not tty or None,
        highlight=False,
        markup=False,
        emoji=False,
        soft_wrap=False,
    )


def _head(text: str, cells: int) -> str:
    """The longest start of ``text`` that takes at most ``cells`` terminal cells."""
    used = 0
    for i, char in enumerate(text):
        used += get_character_cell_size(char)
        if used > cells:
            return text[:i]
    return text


def _tail(text: str, cells: int) -> str:
    return _head(text[::-1], cells)[::-1]


def shorten_middle(text: str, width: int) -> str:
    """``text`` in at most ``width`` terminal cells, cut in its middle so both ends (the root and
    the file name) stay readable."""
    if cell_len(text) <= width:
        return text
    if width <= 1:
        return ELLIPSIS[:width]
    keep = width - 1
    tail = _tail(text, (keep + 1) // 2)
    return _head(text, keep - cell_len(tail)) + ELLIPSIS + tail


def shorten_path(path: str, width: int) -> str:
    """A path in at most ``width`` cells, cut in its middle: the file name is kept whole when it
    leaves room for the start of the path, so the end is never the part that is lost."""
    if cell_len(path) <= width:
        return path
    cut = max(path.rfind("/"), path.rfind("\\"))
    tail = path[cut:] if cut > 0 else ""
    if tail and cell_len(tail) <= width - 5:
        return _head(path, width - 1 - cell_len(tail)) + ELLIPSIS + tail
    return shorten_middle(path, width)


def _when(value: Any, *, with_time: bool) -> str:
    if not isinstance(value, dt.datetime):
        return "-"
    value = value.astimezone(dt.UTC)
    return value.strftime("%Y-%m-%d %H:%M") if with_time else value.strftime("%Y-%m-%d")


def _fit(natural: dict[str, int], width: int, shrinkable: Sequence[tuple[str, int]]) -> dict[str, int]:
    """Column widths that fit ``width`` (one cell between columns): shrink the given columns in
    order down to their minimum; the path column (always last in ``shrinkable``) takes the rest."""
    widths = dict(natural)
    over = sum(widths.values()) + len(widths) - 1 - width  # one space between columns
    for name, minimum in shrinkable:
        if over <= 0:
            break
        if name not in widths:
            continue
        cut = min(over, max(0, widths[name] - minimum))
        widths[name] -= cut
        over -= cut
    return widths


MIN_PATH_ONE_LINE = 40  # below this the tool moves to a line of its own above its files


def _rule_numbers(findings: Sequence[Finding]) -> dict[str, tuple[int, Any]]:
    legend: dict[str, tuple[int, Any]] = {}
    for f in findings:
        for rule in f.rules:
            if rule.id not in legend:
                legend[rule.id] = (len(legend) + 1, rule)
    return legend


def _new_table() -> Table:
    # SIMPLE_HEAD draws one space between columns and a rule under the header; no edges.
    return Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=0, header_style="bold")


def findings_table(findings: Sequence[Finding], width: int) -> tuple[list[Table], list[Any]]:
    """The default view, fitted to ``width``: one line per file and tool with the tool, its
    ATT&CK technique, Signer, trust verdict, signing time, the rules that fired (numbers into
    the legend) and the path, shortened in its middle. When that leaves the path too little
    room (an 80-column terminal), the tool and technique become a title above their files'
    lines. Returns the tables (one, or one per tool) and the numbered rules for the legend."""
    legend = _rule_numbers(findings)
    wide = width >= 150
    devices = {f.device_id for f in findings}
    show_gone = any(f.gone_at for f in findings)
    show_running = any(f.running for f in findings)
    rows = []
    for f in findings:
        row = {}
        if len(devices) > 1:
            row["Device"] = display(f.device_name)
        row.update(
            {
                "Tool": display(f.tool),
                "ATT&CK": ",".join(f.techniques) or "-",
                "Signer": display(f.signer) or "-",
                "Trust": f.verdict,
                "Signed": _when(f.signing_time, with_time=wide),
            }
        )
        if show_running:
            row["Running"] = "running" if f.running else "-"
        if show_gone:
            row["Gone"] = _when(f.gone_at, with_time=wide) if f.gone_at else "-"
        row["Rules"] = ",".join(str(legend[r.id][0]) for r in f.rules)
        row["Path"] = escape_path(f.path)
        rows.append(row)
    columns = list(rows[0])
    natural = {c: max([len(c)] + [cell_len(r[c]) for r in rows]) for c in columns}
    widths = _fit(
        natural,
        width,
        [
            ("Path", MIN_PATH_ONE_LINE),
            ("Signer", MIN_SIGNER),
            ("Tool", MIN_TOOL),
            ("Device", MIN_TOOL),
            ("Path", MIN_PATH),
        ],
    )
    grouped = widths["Path"] < min(natural["Path"], MIN_PATH_ONE_LINE)
    if grouped:
        columns = [c for c in columns if c not in ("Tool", "ATT&CK")]
        widths = _fit(
            {c: natural[c] for c in columns},
            width,
            [("Path", 30), ("Signer", 18), ("Device", MIN_TOOL), ("Path", MIN_PATH), ("Signer", MIN_SIGNER)],
        )
    tables: list[Table] = []
    heading: tuple[str, tuple[str, ...]] | None = None
    table = None
    for f, row in zip(findings, rows, strict=True):
        if table is None or (grouped and (f.tool, f.techniques) != heading):
            heading = (f.tool, f.techniques)
            table = _new_table()
            table.show_header = not tables
            if grouped:
                table.title = Text(f"{row['Tool']}  {row['ATT&CK']}", style="bold")
                table.title_justify = "left"
            for c in columns:
                table.add_column(c, width=widths[c], no_wrap=c == "Path", overflow="ignore" if c == "Path" else "fold")
            tables.append(table)
        cells = []
        for c in columns:
            value = row[c]
            if c == "Path":
                cells.append(Text(shorten_path(value, widths[c])))
            elif c == "Trust":
                cells.append(Text(value, style=VERDICT_STYLE.get(f.verdict, "")))
            elif c == "Tool":
                cells.append(Text(value, style="bold"))
            else:
                cells.append(Text(value))
        table.add_row(*cells)
    return tables, [rule for _n, rule in sorted(legend.values(), key=lambda nr: nr[0])]


def print_findings(findings: Sequence[Finding], console: Console, *, empty: str = "no RMM tool found") -> None:
    if not findings:
        console.print(Text(f"({empty})"))
        return
    tables, rules = findings_table(findings, console.width)
    for table in tables:
        console.print(table)
    legend = _new_table()
    legend.title, legend.title_justify = Text("Rules that fired"), "left"
    for c in ("#", "RuleId", "Source", "Tool"):
        legend.add_column(c, overflow="fold", justify="right" if c == "#" else "left")
    for n, rule in enumerate(rules, start=1):
        legend.add_row(Text(str(n)), Text(rule.id), Text(rule.source), Text(display(rule.tool)))
    console.print(legend)


# Values that are read whole or not at all (ids, hashes, times, counts): a table never wraps them.
WHOLE_KEYS = frozenset(
    {
        "RuleId",
        "DeviceId",
        "SHA1",
        "SHA256",
        "SignerHash",
        "IssuerHash",
        "Timestamp",
        "FirstSeen",
        "LastSeen",
        "ReportId",
        "Count",
        "Source",
        "Techniques",
        "Trust",
    }
)
MIN_FOLD = 10


def print_records(
    records: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    console: Console,
    *,
    empty: str = "(none)",
) -> None:
    """A table of records. Ids, hashes and times stay whole on one line; text columns wrap in
    their column. When even that does not fit the width, each record becomes a block of
    ``Key  value`` lines. Nothing is truncated."""
    if not records:
        console.print(Text(empty))
        return
    cells = [{c: _cell(rec.get(c)) for c in columns} for rec in records]
    natural = {c: max([cell_len(c)] + [cell_len(r[c]) for r in cells]) for c in columns}
    needed = sum(natural[c] if c in WHOLE_KEYS else min(natural[c], MIN_FOLD) for c in columns) + len(columns) - 1
    if needed > console.width:
        key_width = max(cell_len(c) for c in columns)
        for n, row in enumerate(cells):
            if n:
                console.print()
            for c in columns:
                console.print(Text(f"{c:<{key_width}}  {row[c]}"), overflow="fold")
        return
    table = _new_table()
    for c in columns:
        whole = c in WHOLE_KEYS
        table.add_column(
            c, no_wrap=whole, overflow="ignore" if whole else "fold", min_width=natural[c] if whole else None
        )
    for row in cells:
        table.add_row(*(Text(row[c]) for c in columns))
    console.print(table)


def print_row_records(records: Sequence[Mapping[str, Any]], lead: Sequence[str], console: Console) -> None:
    """Certificate rows for people: ``lead`` columns, then SHA256 and FolderPath. On one line each
    when that fits; otherwise a block per row with the hash whole on a line of its own and the
    path shortened in its middle, so a hash can always be copied."""
    if not records:
        console.print(Text("(none)"))
        return
    columns = [*lead, "SHA256", "FolderPath"]
    cells = [{c: _cell(rec.get(c)) for c in columns} for rec in records]
    natural = sum(max([len(c)] + [cell_len(r[c]) for r in cells]) for c in columns) + len(columns) - 1
    if natural <= console.width:
        print_records(records, columns, console)
        return
    for n, row in enumerate(cells):
        if n:
            console.print()
        console.print(Text("  ".join(f"{c} {row[c]}" for c in lead)), overflow="fold")
        console.print(Text(f"  SHA256 {row['SHA256']}"), overflow="fold")
        console.print(Text(f"  Path   {shorten_path(row['FolderPath'], max(MIN_PATH, console.width - 9))}"))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, (list, tuple, set, frozenset)):
        return ", ".join(_cell(v) for v in (sorted(value) if isinstance(value, (set, frozenset)) else value))
    return display(str(value))


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + ELLIPSIS


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{display(k)} {v}" for k, v in counts.items() if v) or "none"


def scan_summary_lines(
    summary: Mapping[str, Any],
    tally: Tally,
    errors: Sequence[Mapping[str, Any]],
    *,
    width: int = UNBOUNDED_WIDTH,
    first: int = FIRST_PROBLEMS,
) -> list[str]:
    """The end summary of a scan (stderr): files and speed, findings by tool and by trust verdict,
    files by status, then the files that could not be read and why, the first ``first`` by name
    (a path shortened in its middle to ``width``, its reason on the next line)."""
    lines = [
        f"scanned {summary['files']} files ({summary['pe_files']} PE, {summary['msi_files']} MSI, "
        f"{summary['signed_files']} signed) in {summary['elapsed_seconds']:.2f} s, "
        f"{summary['files_per_second']:.0f} files/s; parsed {summary['parsed']}, unchanged {summary['unchanged']}",
        f"found {summary['findings']} file(s) with an RMM signer: {_counts(tally.by_tool)}",
    ]
    if tally.by_verdict:
        lines.append(f"trust: {_counts(tally.by_verdict)}")
    lines.append(f"status: {_counts(summary['statuses'])}")
    if summary.get("gone"):
        lines.append(f"gone since the last scan: {summary['gone']} file(s)")
    if errors:
        total = max(int(summary.get("errors_total", len(errors))), len(errors))
        lines.append(f"not read or not parsed: {total}")
        for err in errors[:first]:
            status = str(err["Status"])
            lines.append(f"  {status:<13} {shorten_path(str(err['Path']), max(MIN_PATH, width - 16))}")
            if err.get("Detail"):
                lines.append(f"      {_clip(display(str(err['Detail'])), max(MIN_PATH, min(width, 120) - 6))}")
        if total > first:
            lines.append(f"  ... and {total - first} more (all of them: --format json, or --log-file)")
    if summary.get("incomplete"):
        lines.append("INCOMPLETE: " + "; ".join(summary.get("incomplete_reasons", ())))
    return lines

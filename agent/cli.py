"""Command line: wiring only. Parses options into one frozen Settings, calls the pieces,
renders the shared views (agent/views) and maps outcomes to exit codes:
0 no findings, 1 findings, 2 error (any failure: one line, a traceback only with -v)."""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from io import StringIO
from typing import Any, TextIO

from agent import __version__
from agent.output import (
    FORMATS,
    OutputError,
    check_out,
    format_for,
    render_csv,
    render_json,
    render_jsonl,
    write_output,
)
from agent.settings import ConfigError, Settings, load_settings
from agent.store import StoreError

log = logging.getLogger("rmmhunt")

EXIT_CLEAN, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2
MAX_DETAIL_LOOKUPS = 100

SCAN_HELP = """\
scan answers for the disk as it is now: its results cover only the files seen in this scan
(unchanged files recognised from the cache included). A file reported by an earlier scan
and now gone is not a finding any more (its rows stay in the store). `hunt` is the history:
the published rules over every stored row inside each rule's own time window, as in Defender.

exit codes: 0 clean, 1 findings, 2 error. A scan that could not read part of what it was
asked to scan says "INCOMPLETE" in its summary and "incomplete": true in JSON; it still
exits 1 when it found something, and 0 otherwise unless --strict is given (then 2)."""

HUNT_HELP = """\
hunt is the history: every stored row inside each rule's own time window (the published
semantics, as in Defender), including files that are gone since (shown in a Gone column).
For what is on disk now, run scan."""


class UsageError(Exception):
    pass


# --------------------------------------------------------------------------- parser


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--state-dir", default=default, help="state directory (env RMMHUNT_STATE_DIR)")
    parser.add_argument(
        "--rules",
        action="append",
        default=default,
        metavar="DIR",
        help="rule directory; repeatable; replaces the shipped catalog",
    )
    parser.add_argument("--config", default=default, metavar="FILE", help="TOML config file")
    parser.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS if suppress else 0)
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="no progress and no summary on stderr (errors still print)",
    )
    parser.add_argument(
        "--log-file", default=default, metavar="FILE", help="write the log (every file problem) to FILE"
    )


def _format_options(parser: argparse.ArgumentParser, *, views: bool = False) -> None:
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="output format (default: from --out's extension .json/.jsonl/.csv, else table)",
    )
    parser.add_argument("--out", metavar="FILE", help="write the output to FILE instead of stdout")
    if views:
        parser.add_argument(
            "--view",
            choices=("files", "summary"),
            default="files",
            help="table view: one line per file found (default) or the published result columns",
        )
        parser.add_argument("--rows", action="store_true", help="list the rows behind each result")


_TECHNIQUE_HELP = "only rules with this ATT&CK technique, e.g. T1219 (repeatable; T1021 includes T1021.004)"


def _by_technique(rules: list[Any], techniques: list[str] | None) -> list[Any]:
    """Rules whose relevantTechniques hold one of ``techniques`` or a sub-technique of one (--technique)."""
    if not techniques:
        return rules
    wanted = {t.strip().upper() for t in techniques}
    return [r for r in rules if any(t.upper() in wanted or t.upper().split(".")[0] in wanted for t in r.techniques)]


# Commands that other modules define (``add_parser``) and run (``run``), imported only when one of
# them is the command being run: start-up (issue 12). Each module registers the names listed here.
MODULE_COMMANDS: dict[str, tuple[str, ...]] = {
    "agent.config_cli": ("config",),
    "agent.store_cli": ("store",),
    "agent.service.cli": ("watch", "run", "status", "service"),
    "agent.sweep.cli": ("sweep",),
    "agent.forward_cli": ("forward",),
    "collector.cli": ("collector",),  # the collector's commands (its CLI imports the agent lazily)
}
MODULE_OF_COMMAND = {name: module for module, names in MODULE_COMMANDS.items() for name in names}


def _add_module_commands(module: str, sub: Any) -> None:
    mod = importlib.import_module(module)
    if module in ("agent.config_cli", "agent.service.cli"):
        mod.add_parser(sub, _global_options)
    else:
        mod.add_parser(sub)


class _NoCommand(Exception):
    pass


class _GlobalOnlyParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # type: ignore[override]
        raise _NoCommand(message)


def command_of(argv: Sequence[str]) -> str | None:
    """The command word of ``argv`` (after any global options), or None when there is none
    (--help, --version, a bad global option): read the way the full parser reads it."""
    pre = _GlobalOnlyParser(add_help=False, allow_abbrev=True)
    _global_options(pre, suppress=False)
    try:
        _known, rest = pre.parse_known_args(list(argv))
    except _NoCommand:
        return None
    return rest[0] if rest and not rest[0].startswith("-") else None


def _add_scan_commands(sub: Any, add: Callable[..., argparse.ArgumentParser], only: str | None) -> None:
    """scan, hunt, rows, explain and rules: each in full when ``only`` is None or names it."""
    if only in (None, "scan"):
        p = add("scan", "scan paths (default: all local fixed filesystems): what is on disk now", SCAN_HELP)
        p.add_argument("paths", nargs="*", metavar="PATH")
        p.add_argument("--no-progress", action="store_true", help="no progress line even on a terminal")
        p.add_argument("--no-verify", action="store_true", help="read signers only: no hashing, no trust check")
        p.add_argument("--follow-symlinks", action="store_true", help="follow directory symlinks (loops detected)")
        p.add_argument("--strict", action="store_true", help="exit 2 when the scan is incomplete and found nothing")
        p.add_argument("--processes", action="store_true", help="the images and mapped files of running processes")
        p.add_argument("--technique", action="append", metavar="T", help=_TECHNIQUE_HELP)
        _format_options(p, views=True)

    if only in (None, "hunt"):
        p = add("hunt", "run the rules over the local store: the history inside each rule's time window", HUNT_HELP)
        p.add_argument("--rule", action="append", metavar="ID", help="only this rule id (repeatable)")
        p.add_argument("--technique", action="append", metavar="T", help=_TECHNIQUE_HELP)
        p.add_argument("--include-excluded", action="store_true", help="also count rows that exclusions removed")
        _format_options(p, views=True)

    if only in (None, "rows"):
        p = add("rows", "list the stored certificate rows with all columns")
        p.add_argument("--excluded", action="store_true", help="only rows flagged by an exclusion")
        _format_options(p)

    if only in (None, "explain"):
        p = add("explain", "every fact about one file and why each rule fires")
        p.add_argument("file")
        p.add_argument("--all", action="store_true", help="also list every rule that does not fire, and why")
        p.add_argument("--format", choices=("table", "json"), default="table")

    if only in (None, "rules"):
        p = add("rules", "list or check rules and exclusions")
        rsub = p.add_subparsers(dest="rules_command", metavar="ACTION")
        rsub.required = True
        rl = rsub.add_parser("list", help="id, name, tool, source and patterns of every rule")
        _global_options(rl, suppress=True)
        _format_options(rl)
        rc = rsub.add_parser("check", help="validate rule files (and the config's exclusions)")
        _global_options(rc, suppress=True)
        rc.add_argument("paths", nargs="*", metavar="PATH", help="rule files/dirs or .toml configs (default: in use)")


SCAN_COMMANDS = ("scan", "hunt", "rows", "explain", "rules")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``only`` (a known command) that command in full and the others
    by name alone, so a run builds (and imports) only what it uses: start-up (issue 12). --help and
    an unknown command get the whole parser."""
    if only is not None and only not in SCAN_COMMANDS and only not in MODULE_OF_COMMAND:
        only = None
    parser = argparse.ArgumentParser(prog="rmmhunt", description="Find RMM tools by their Authenticode signers.")
    parser.add_argument("--version", action="version", version=f"rmmhunt {__version__}")
    _global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, help_text: str, epilog: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _global_options(p, suppress=True)
        return p

    for name in SCAN_COMMANDS:
        if only in (None, name):
            _add_scan_commands(sub, add, name)
        else:
            sub.add_parser(name, add_help=False)  # never parsed: argv names another command
    for module, names in MODULE_COMMANDS.items():
        if only is None or only in names:
            _add_module_commands(module, sub)
        else:
            for name in names:
                sub.add_parser(name, add_help=False)
    return parser


# --------------------------------------------------------------------------- wiring helpers


def _settings(args: argparse.Namespace, **overrides: Any) -> Settings:
    return load_settings(
        state_dir=getattr(args, "state_dir", None),
        rules_dirs=getattr(args, "rules", None),
        config_file=getattr(args, "config", None),
        **overrides,
    )


def _device(settings: Settings) -> Any:
    from agent import platform
    from agent.rows import Device

    device_id = settings.device_id or platform.device_id_from(platform.machine_identity())
    return Device(
        device_id=device_id.lower(), device_name=(settings.device_name or platform.default_device_name()).lower()
    )


def _load_rules(settings: Settings, err: TextIO) -> tuple[list[Any], list[Any]]:
    """(rules, problems). Problems are printed as warnings; no usable rule at all is an error."""
    from agent.resources import rule_attribution_file
    from agent.rules.loader import load_rules

    attribution = rule_attribution_file() if not settings.rules_dirs else None
    if attribution is not None and not attribution.exists():
        attribution = None
    for d in settings.rule_dirs_effective:
        if not d.is_dir():
            raise UsageError(f"rules directory not found: {d}")
    ruleset = load_rules(list(settings.rule_dirs_effective), attribution=attribution)
    for problem in ruleset.problems:
        print(f"warning: rule skipped: {problem}", file=err)
    if not ruleset.rules:
        raise UsageError("no usable rules: " + ", ".join(str(d) for d in settings.rule_dirs_effective))
    return list(ruleset.rules), list(ruleset.problems)


def _load_exclusions(settings: Settings, rules: Sequence[Any] = ()) -> list[Any]:
    from agent.rules_cli import load_exclusions

    return load_exclusions(settings, rules, sys.stderr)


def _open_store(settings: Settings, *, write: bool = True) -> Any:
    """The writer (with the state directory's lock) or a read-only reader (never locks)."""
    from agent import store_cli

    return store_cli.open_store(settings, write=write)


def _hunt(
    store: Any,
    rules: Sequence[Any],
    *,
    current: set[tuple[str, str]] | None,
    include_excluded: bool,
    exclusions: Sequence[Any],
) -> list[Any]:
    """The rules over the stored rows; ``current`` limits them to the (FolderPath, SHA256) seen now."""
    from agent.hunt import run_hunt

    rows = store.iter_rows()
    if current is not None:
        rows = (row for row in rows if (row["FolderPath"], row["SHA256"]) in current)
    return run_hunt(
        rows,
        rules,
        now=dt.datetime.now(dt.UTC),
        include_excluded=include_excluded,
        excluded_for=None if include_excluded else store.excluded_hits(),
        exclusions=exclusions,
    )


def _gone_map(store: Any, device_id: str) -> dict[tuple[str, str], dt.datetime]:
    return dict(store.gone_map(device_id))


def _table_text(draw: Callable[[Any], None], out: str | None) -> str | None:
    """Draw on the terminal; for --out or a pipe, draw into a string (no width limit unless
    $COLUMNS says one) without the cells' trailing padding."""
    from agent.views.table import make_console

    if not out and sys.stdout.isatty():
        draw(make_console(sys.stdout))
        return None
    buf = StringIO()
    draw(make_console(buf))
    text = "".join(line.rstrip() + "\n" for line in buf.getvalue().splitlines())
    if out:
        return text
    sys.stdout.write(text)
    return None


def _emit(
    fmt: str,
    out: str | None,
    *,
    summary: Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    errors: Sequence[Mapping[str, Any]],
    keys: Sequence[str],
    flat: Sequence[Mapping[str, Any]] | None = None,
    table: Callable[[Any], None],
) -> None:
    """One listing in the chosen format: json is the whole object; jsonl and csv give ``flat``
    (one record per result, or per row) or the results."""
    records = results if flat is None else flat
    if fmt == "json":
        write_output(render_json(summary, results, errors), out, sys.stdout)
    elif fmt == "jsonl":
        write_output(render_jsonl(records), out, sys.stdout)
    elif fmt == "csv":
        write_output(render_csv(records, keys), out, sys.stdout)
    else:
        text = _table_text(table, out)
        if text is not None:
            write_output(text, out, sys.stdout)


def _results_output(
    results: Sequence[Any], with_rows: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(result records, each with its Rows when asked for; the flat row records or None)."""
    from agent.views.records import drill_records, result_record

    records = []
    flat: list[dict[str, Any]] = []
    for r in results:
        rec = result_record(r)
        if with_rows:
            rows = drill_records(r)
            rec["Rows"] = rows
            flat.extend(rows)
        records.append(rec)
    return records, (flat if with_rows else None)


def _draw_results(
    findings: Sequence[Any], records: Sequence[Mapping[str, Any]], drill: Sequence[Any] | None, view: str
) -> Callable[[Any], None]:
    """The table: the findings (or the published columns with --view summary), then with --rows the
    rows behind each result. Drawn from the raw rows: the table escapes each value once itself."""
    from agent.views.records import SUMMARY_VIEW_COLUMNS, trust_verdict

    def draw(console: Any) -> None:
        from agent.views.table import print_findings, print_records, print_row_records  # rich: only to draw

        if view == "summary":
            print_records(records, SUMMARY_VIEW_COLUMNS, console)
        else:
            print_findings(findings, console)
        if drill:
            console.print()
            shown = [{**row, "Tool": r.rule.tool, "Trust": trust_verdict(row)} for r in drill for row in r.rows]
            print_row_records(shown, ("Tool", "ReportId", "Timestamp", "Signer", "Trust"), console)

    return draw


def _fill_cached_details(errors: list[dict[str, str]], settings: Settings) -> None:
    """A file recognised from the cache keeps its status but not the reason: look the reason up
    again for the first few (a problem file is rare; its reason helps more than its status)."""
    from agent.scanner import examine_path

    looked = 0
    for err in errors:
        if err.get("detail") or err.get("status") == "DIRECTORY_ERROR":
            continue
        if looked >= MAX_DETAIL_LOOKUPS:
            err["detail"] = "unchanged since an earlier scan"
            continue
        looked += 1
        _status, _facts, detail, _ident = examine_path(
            err["path"],
            (0, 0, 0, 0),
            verifier=None,
            max_file_size=settings.max_file_size,
            time_budget=settings.file_time_budget,
        )
        err["detail"] = detail or "unchanged since an earlier scan"


def emit_results(
    results: Sequence[Any],
    *,
    fmt: str,
    out: str | None,
    summary: Mapping[str, Any],
    errors: Sequence[Mapping[str, Any]] = (),
    with_rows: bool = False,
    view: str = "files",
    findings: Sequence[Any] | None = None,
) -> None:
    """Hunt results in any format, the one way every command shows them (scan, hunt, and the
    commands of other modules such as a process sweep). ``errors`` are error records."""
    from agent.views.records import findings_of

    if findings is None:
        findings = findings_of(results)
    records, flat = _results_output(results, with_rows)
    _emit(
        fmt,
        out,
        summary=summary,
        results=records,
        errors=errors,
        keys=_keys(with_rows),
        flat=flat,
        table=_draw_results(findings, records, results if with_rows else None, view),
    )


# Older helper names that command modules written against the previous cli.py call; they
# return the new shapes (docs/output.md).


def _result_records(results: Sequence[Any]) -> list[dict[str, Any]]:
    return _results_output(results, False)[0]


def _drill_records(results: Sequence[Any]) -> list[dict[str, Any]]:
    return _results_output(results, True)[1] or []


def _write(text: str, out: str | None) -> None:
    write_output(text, out, sys.stdout)


def _render_results(results: Sequence[Any], fmt: str, with_rows: bool) -> str:
    buf = StringIO()
    saved, sys.stdout = sys.stdout, buf
    try:
        emit_results(results, fmt=fmt, out=None, summary={"results": len(results)}, with_rows=with_rows)
    finally:
        sys.stdout = saved
    return buf.getvalue()


def summary_text(stats: Mapping[str, Any], results: int) -> str:
    """The end summary from a ScanStats dict alone (no findings): for other command modules."""
    from agent.views.records import Tally, error_record
    from agent.views.table import scan_summary_lines

    summary = {**stats, "findings": results}
    errors = [error_record(e) for e in stats.get("errors", ())]
    return "\n".join(scan_summary_lines(summary, Tally({}, {}), errors)) + "\n"


# --------------------------------------------------------------------------- commands


def cmd_scan(args: argparse.Namespace) -> int:
    from rich.text import Text

    from agent import platform
    from agent.extract.verifier import LazyVerifier
    from agent.scanner import Matcher, scanner_for
    from agent.service import cli as runtime_cli
    from agent.views.records import error_record, findings_of, incomplete_reasons, tally
    from agent.views.table import make_console, scan_summary_lines

    fmt = format_for(args.out, args.format)
    check_out(args.out)  # before any work: a typo must not cost a scan
    if args.processes:
        return runtime_cli.scan_processes(args)
    settings = _settings(args, follow_symlinks=args.follow_symlinks or None, verify=False if args.no_verify else None)
    rules, _problems = _load_rules(settings, sys.stderr)
    exclusions = _load_exclusions(settings, rules)
    device = _device(settings)
    if args.paths:
        roots, skip = list(args.paths), frozenset[str]()
        for p in roots:
            if not os.path.lexists(p):
                raise UsageError(f"no such file or directory: {p}")
        mounts: list[str] = []
    else:
        roots, skip = platform.default_roots()
        mounts = [point for point, _fstype in platform.linux_mounts()] if not platform.IS_WINDOWS else []
        platform.lower_priority()
    # built with the first PE/MSI: a scan that meets none never imports signify (start-up, issue 12)
    verifier = LazyVerifier(settings.trusted_roots) if settings.verify else None
    progress = None
    if not args.quiet and not args.no_progress and sys.stderr.isatty():
        from agent.views.progress import ScanProgress, estimate_file_count

        total = estimate_file_count(roots, skip, mounts)
        progress = ScanProgress(make_console(sys.stderr), total)
        if total is None:
            progress.count_in_background(roots, skip)
    with _open_store(settings) as store:
        scanner = scanner_for(settings, store, device, Matcher(rules, exclusions), verifier)
        try:
            per_file = runtime_cli.with_cpu_cap(progress, settings.max_cpu_percent)
            stats = scanner.scan(roots, skip_dirs=skip, follow_symlinks=settings.follow_symlinks, progress=per_file)
        finally:
            if progress is not None:
                progress.close()
        results = _hunt(
            store,
            _by_technique(rules, args.technique),
            current=stats.current,
            include_excluded=False,
            exclusions=exclusions,
        )
    findings = findings_of(results)
    counts = tally(findings)
    _fill_cached_details(stats.errors, settings)
    for err in stats.errors:
        log.info("%s %s %s", err["status"], err["path"], err["detail"])
    errors = [error_record(e) for e in stats.errors]
    summary = stats.as_dict()
    reasons = incomplete_reasons(summary["statuses"], summary.get("directory_errors", 0))
    summary.update(
        {
            "rule_hits": summary["findings"],  # rule hits stored by this scan (new rows only)
            "findings": len(findings),  # files found with an RMM signer (the table's lines), now on disk
            "results": len(results),
            "by_tool": counts.by_tool,
            "by_verdict": counts.by_verdict,
            "gone": len(getattr(stats, "gone", ()) or ()),
            "incomplete": bool(reasons),
            "incomplete_reasons": reasons,
        }
    )
    emit_results(
        results,
        fmt=fmt,
        out=args.out,
        summary=summary,
        errors=errors,
        with_rows=args.rows,
        view=args.view,
        findings=findings,
    )
    if not args.quiet:
        err_console = make_console(sys.stderr)
        for line in scan_summary_lines(summary, counts, errors, width=err_console.width):
            err_console.print(Text(line))
    if results:
        return EXIT_FINDINGS
    if reasons and args.strict:
        print("rmmhunt: error: incomplete scan (--strict): " + "; ".join(reasons), file=sys.stderr)
        return EXIT_ERROR
    return EXIT_CLEAN


def _keys(with_rows: bool) -> tuple[str, ...]:
    from agent.views.records import DRILL_KEYS, RESULT_KEYS

    return DRILL_KEYS if with_rows else RESULT_KEYS


def cmd_hunt(args: argparse.Namespace) -> int:
    from agent.views.records import findings_of, tally

    fmt = format_for(args.out, args.format)
    check_out(args.out)
    settings = _settings(args)
    rules, _problems = _load_rules(settings, sys.stderr)
    if args.rule:
        wanted = set(args.rule)
        unknown = wanted - {r.id for r in rules}
        if unknown:
            raise UsageError(f"unknown rule id(s): {', '.join(sorted(unknown))}")
        rules = [r for r in rules if r.id in wanted]
    rules = _by_technique(rules, args.technique)
    exclusions = _load_exclusions(settings, rules)
    with _open_store(settings, write=False) as store:
        results = _hunt(store, rules, current=None, include_excluded=args.include_excluded, exclusions=exclusions)
        gone = _gone_map(store, _device(settings).device_id)
    findings = findings_of(results, gone)
    counts = tally(findings)
    summary = {
        "rules": len(rules),
        "results": len(results),
        "findings": len(findings),
        "by_tool": counts.by_tool,
        "by_verdict": counts.by_verdict,
        "gone": sum(1 for f in findings if f.gone_at),
        "include_excluded": bool(args.include_excluded),
    }
    emit_results(
        results,
        fmt=fmt,
        out=args.out,
        summary=summary,
        errors=[],
        with_rows=args.rows,
        view=args.view,
        findings=findings,
    )
    if not args.quiet and fmt == "table" and findings:
        by_tool = ", ".join(f"{k} {v}" for k, v in counts.by_tool.items())
        print(f"{len(findings)} file(s) with an RMM signer in the rules' time windows: {by_tool}", file=sys.stderr)
    return EXIT_FINDINGS if results else EXIT_CLEAN


def cmd_rows(args: argparse.Namespace) -> int:
    from agent.views.records import ROW_KEYS, row_record, trust_verdict

    fmt = format_for(args.out, args.format)
    check_out(args.out)
    settings = _settings(args)
    with _open_store(settings, write=False) as store:
        rows = list(store.iter_rows(where='"Excluded" = 1' if args.excluded else ""))
    records = [row_record(r) for r in rows]

    def draw(console: Any) -> None:
        from agent.views.table import print_row_records  # rich: only to draw

        shown = [{**raw, "Trust": trust_verdict(raw)} for raw in rows]
        print_row_records(shown, ("ReportId", "Timestamp", "Signer", "Trust"), console)

    summary = {"rows": len(records), "devices": len({r["DeviceId"] for r in rows}), "excluded_only": args.excluded}
    _emit(fmt, args.out, summary=summary, results=records, errors=[], keys=ROW_KEYS, table=draw)
    return EXIT_CLEAN


def cmd_explain(args: argparse.Namespace) -> int:
    from agent.explain import explain_file
    from agent.output import plain

    settings = _settings(args)
    if not os.path.lexists(args.file):
        raise UsageError(f"{args.file}: no such file")
    if os.path.isdir(args.file):
        raise UsageError(f"{args.file}: is a directory (explain takes one file; scan takes directories)")
    rules, _problems = _load_rules(settings, sys.stderr)
    exclusions = _load_exclusions(settings, rules)
    report = explain_file(args.file, settings, rules, exclusions, _device(settings))
    if report.facts.status in ("ACCESS_DENIED", "VANISHED"):
        raise UsageError(f"{args.file}: cannot be read: {report.facts.detail or report.facts.status}")
    if args.format == "json":
        import json

        sys.stdout.write(json.dumps(plain(report.as_dict()), ensure_ascii=False, indent=2) + "\n")
    else:
        sys.stdout.write(report.text(all_rules=args.all))
    return EXIT_FINDINGS if report.fires else EXIT_CLEAN


def cmd_rules(args: argparse.Namespace) -> int:
    from agent.rules_cli import run_check

    settings = _settings(args)
    if args.rules_command == "list":
        from agent.views.records import RULE_KEYS, rule_record

        fmt = format_for(args.out, args.format)
        check_out(args.out)
        rules, problems = _load_rules(settings, sys.stderr)
        records = [rule_record(r) for r in rules]
        summary = {
            "rules": len(records),
            "published": sum(1 for r in rules if r.source == "published"),
            "rmmhunt": sum(1 for r in rules if r.source != "published"),
            "tools": len({r.tool for r in rules}),
        }
        errors = [{"Path": p.path, "Line": p.line, "Column": p.column, "Message": p.message} for p in problems]

        def draw(console: Any) -> None:
            from agent.views.table import print_records  # rich: only to draw

            print_records(records, ("RuleId", "Tool", "Source", "Techniques", "Patterns"), console)

        _emit(fmt, args.out, summary=summary, results=records, errors=errors, keys=RULE_KEYS, table=draw)
        return EXIT_CLEAN
    return run_check(args.paths, settings)


def _run_module_command(args: argparse.Namespace) -> int:
    run: Callable[[argparse.Namespace], int] = importlib.import_module(MODULE_OF_COMMAND[args.command]).run
    return run(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "scan": cmd_scan,
    "hunt": cmd_hunt,
    "rows": cmd_rows,
    "explain": cmd_explain,
    "rules": cmd_rules,
    **dict.fromkeys(MODULE_OF_COMMAND, _run_module_command),  # each imports its module when run
}


def _one_line(exc: BaseException) -> str:
    """An exception as one line that names the file or setting when it knows one."""
    if isinstance(exc, OSError) and exc.filename:
        return f"{os.fsdecode(exc.filename)}: {exc.strerror or exc}"
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (UsageError, ConfigError, OutputError, StoreError)):
        return str(exc)
    return f"internal error: {type(exc).__name__}: {text} (run with -v for the traceback)"


def _setup_logging(args: argparse.Namespace) -> None:
    verbose = getattr(args, "verbose", 0) or 0
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING - 10 * min(verbose, 2))
    handlers: list[logging.Handler] = [handler]
    log_file = getattr(args, "log_file", None)
    if log_file:
        file_handler = logging.FileHandler(log_file, encoding="utf-8", errors="backslashreplace")
        file_handler.setLevel(logging.DEBUG if verbose >= 2 else logging.INFO)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(file_handler)
    logging.basicConfig(
        level=min(h.level for h in handlers),
        format="%(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(command_of(argv))
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", 0) or 0
    try:
        _setup_logging(args)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("rmmhunt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_CLEAN
    except Exception as exc:  # any failure: one line and exit 2; the traceback only with -v
        if isinstance(exc, ConfigError):
            message = str(exc)
        else:
            message = _one_line(exc)
        print(f"rmmhunt: error: {message}", file=sys.stderr)
        if verbose:
            traceback.print_exc(file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())

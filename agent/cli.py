"""Command line: wiring only. Parses options into one frozen Settings, calls the pieces,
formats output and maps outcomes to exit codes (0 no findings, 1 findings, 2 error)."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from agent import __version__, config_cli
from agent.output import FORMATS, plain, render
from agent.settings import ConfigError, Settings, load_settings

log = logging.getLogger("rmmhunt")

EXIT_CLEAN, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2
RESULT_COLUMNS = (
    "RuleId",
    "RuleName",
    "Tool",
    "SharedWith",
    "DeviceId",
    "DeviceName",
    "FirstSeen",
    "LastSeen",
    "Report",
    "Count",
)
DRILL_COLUMNS = (
    "RuleId",
    "RuleName",
    "Tool",
    "Timestamp",
    "ReportId",
    "FolderPath",
    "SHA256",
    "Signer",
    "IsTrusted",
    "Evidence",
)


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


def _format_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=FORMATS, default="table")
    parser.add_argument("--out", metavar="FILE", help="write the output to FILE instead of stdout")


_TECHNIQUE_HELP = "only rules with this ATT&CK technique, e.g. T1219 (repeatable; T1021 includes T1021.004)"


def _by_technique(rules: list[Any], techniques: list[str] | None) -> list[Any]:
    """Rules whose relevantTechniques hold one of ``techniques`` or a sub-technique of one (--technique)."""
    if not techniques:
        return rules
    wanted = {t.strip().upper() for t in techniques}
    return [r for r in rules if any(t.upper() in wanted or t.upper().split(".")[0] in wanted for t in r.techniques)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rmmhunt", description="Find RMM tools by their Authenticode signers.")
    parser.add_argument("--version", action="version", version=f"rmmhunt {__version__}")
    _global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _global_options(p, suppress=True)
        return p

    p = add("scan", "scan paths (default: all local fixed filesystems) and print the hunt report")
    p.add_argument("paths", nargs="*", metavar="PATH")
    p.add_argument("--no-progress", action="store_true", help="no progress line even on a terminal")
    p.add_argument("--no-verify", action="store_true", help="read signers only: no hashing, no trust check")
    p.add_argument("--follow-symlinks", action="store_true", help="follow directory symlinks (loops detected)")
    p.add_argument("--rows", action="store_true", help="list the rows behind each result")
    p.add_argument("--technique", action="append", metavar="T", help=_TECHNIQUE_HELP)
    _format_options(p)

    p = add("hunt", "run the rules over the local store")
    p.add_argument("--rule", action="append", metavar="ID", help="only this rule id (repeatable)")
    p.add_argument("--technique", action="append", metavar="T", help=_TECHNIQUE_HELP)
    p.add_argument("--rows", action="store_true", help="list the rows behind each result")
    p.add_argument("--include-excluded", action="store_true", help="also count rows that exclusions removed")
    _format_options(p)

    p = add("rows", "list the stored certificate rows with all columns")
    p.add_argument("--excluded", action="store_true", help="only rows flagged by an exclusion")
    _format_options(p)

    p = add("explain", "every fact about one file and why each rule fires or not")
    p.add_argument("file")
    p.add_argument("--format", choices=("table", "json"), default="table")

    p = add("rules", "list or check rules and exclusions")
    rsub = p.add_subparsers(dest="rules_command", metavar="ACTION")
    rsub.required = True
    rl = rsub.add_parser("list", help="id, name, tool, source and patterns of every rule")
    _global_options(rl, suppress=True)
    _format_options(rl)
    rc = rsub.add_parser("check", help="validate rule files (and the config's exclusions)")
    _global_options(rc, suppress=True)
    rc.add_argument("paths", nargs="*", metavar="PATH", help="rule files/dirs or .toml configs (default: in use)")
    config_cli.add_parser(sub, _global_options)
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


def _load_rules(settings: Settings, err: TextIO) -> list[Any]:
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
    return list(ruleset.rules)


def _load_exclusions(settings: Settings) -> list[Any]:
    if not settings.exclusions:
        return []
    from agent.exclusions import parse_exclusions

    text = settings.config_file.read_text(encoding="utf-8") if settings.config_file else None
    exclusions, problems = parse_exclusions(
        {"exclusions": list(settings.exclusions)}, path=str(settings.config_file), source_text=text
    )
    if problems:
        raise ConfigError("\n".join(str(p) for p in problems))
    return list(exclusions)


def _open_store(settings: Settings) -> Any:
    from agent.store import Store

    return Store(settings.database)


def _write(text: str, out: str | None) -> None:
    if out:
        Path(out).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


def _result_records(results: Sequence[Any]) -> list[dict[str, Any]]:
    return [
        {
            "RuleId": r.rule.id,
            "RuleName": r.rule.name,
            "Tool": r.rule.tool,
            "SharedWith": list(r.rule.shared_with),
            **r.result,
        }
        for r in results
    ]


def _drill_records(results: Sequence[Any]) -> list[dict[str, Any]]:
    out = []
    for r in results:
        for row in r.rows:
            out.append({"RuleId": r.rule.id, "RuleName": r.rule.name, "Tool": r.rule.tool, **row})
    return out


def _render_results(results: Sequence[Any], fmt: str, with_rows: bool) -> str:
    records = _result_records(results)
    if fmt == "json":
        if with_rows:
            for rec, r in zip(records, results, strict=True):
                rec["Rows"] = [dict(row) for row in r.rows]
        return render(records, "json")
    if with_rows:
        drill = _drill_records(results)
        if fmt == "table":
            return (
                render(records, "table", columns=RESULT_COLUMNS) + "\n" + render(drill, "table", columns=DRILL_COLUMNS)
            )
        return render(drill, fmt)
    return render(records, fmt, columns=RESULT_COLUMNS)


def _hunt(
    store: Any,
    rules: Sequence[Any],
    *,
    roots: Sequence[str] | None,
    include_excluded: bool,
    exclusions: Sequence[Any],
    current: set[tuple[str, str]] | None = None,
) -> list[Any]:
    from agent.hunt import run_hunt

    rows = store.iter_rows()
    if current is not None:  # a scan answers for the disk as it is now: only files seen in it
        rows = (row for row in rows if (row["FolderPath"], row["SHA256"]) in current)
    if roots is not None:
        prefixes = [os.path.join(os.path.abspath(r), "") for r in roots]
        exact = {os.path.abspath(r) for r in roots}
        rows = (row for row in rows if row["FolderPath"] in exact or row["FolderPath"].startswith(tuple(prefixes)))
    return run_hunt(
        rows,
        rules,
        now=dt.datetime.now(dt.UTC),
        include_excluded=include_excluded,
        excluded_for=None if include_excluded else store.excluded_hits(),
        exclusions=exclusions,
    )


class Progress:
    """One status line on a terminal, redrawn at most five times a second."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.last = 0.0

    def __call__(self, stats: Any, path: str) -> None:
        now = time.monotonic()
        if now - self.last < 0.2:
            return
        self.last = now
        rate = stats.files / max(time.time() - stats.started, 1e-6)
        line = f"{stats.files} files  {stats.signed_files} signed  {stats.findings} hits  {rate:.0f}/s  {path}"
        width = 110
        self.stream.write("\r" + (line if len(line) <= width else line[: width - 1] + "…").ljust(width))
        self.stream.flush()

    def done(self) -> None:
        if self.last:
            self.stream.write("\r" + " " * 110 + "\r")
            self.stream.flush()


def summary_text(stats: dict[str, Any], results: int) -> str:
    statuses = ", ".join(f"{k}={v}" for k, v in stats["statuses"].items() if v)
    return (
        f"scanned {stats['files']} files ({stats['pe_files']} PE, {stats['msi_files']} MSI, "
        f"{stats['signed_files']} signed) in {stats['elapsed_seconds']:.2f}s, "
        f"{stats['files_per_second']:.0f} files/s\n"
        f"parsed {stats['parsed']}, unchanged {stats['unchanged']} (not re-parsed), rows {stats['rows']}, "
        f"rule hits {stats['findings']} (+{stats['excluded_hits']} excluded), results {results}\n"
        f"statuses: {statuses or 'none'}; directory errors {stats['directory_errors']}, "
        f"symlinks skipped {stats['symlinks_skipped']}, mounts skipped {stats['mounts_skipped']}\n"
    )


# --------------------------------------------------------------------------- commands


def cmd_scan(args: argparse.Namespace) -> int:
    from agent import platform
    from agent.extract.authenticode import TrustVerifier, load_roots
    from agent.scanner import Matcher, Scanner

    settings = _settings(args, follow_symlinks=args.follow_symlinks or None, verify=False if args.no_verify else None)
    rules = _load_rules(settings, sys.stderr)
    exclusions = _load_exclusions(settings)
    device = _device(settings)
    if args.paths:
        roots, skip = list(args.paths), frozenset[str]()
        for p in roots:
            if not os.path.lexists(p):
                raise UsageError(f"no such file or directory: {p}")
    else:
        roots, skip = platform.default_roots()
        platform.lower_priority()
    verifier = TrustVerifier(load_roots(settings.trusted_roots)) if settings.verify else None
    store = _open_store(settings)
    with store:
        scanner = Scanner(
            store,
            device,
            Matcher(rules, exclusions),
            verifier,
            max_file_size=settings.max_file_size,
            file_time_budget=settings.file_time_budget,
            reobserve_interval=settings.reobserve_interval,
        )
        progress = None if args.no_progress or not sys.stderr.isatty() else Progress(sys.stderr)
        try:
            stats = scanner.scan(roots, skip_dirs=skip, follow_symlinks=settings.follow_symlinks, progress=progress)
        finally:
            if progress:
                progress.done()
        results = _hunt(
            store,
            _by_technique(rules, args.technique),
            roots=None if not args.paths else roots,
            include_excluded=False,
            exclusions=exclusions,
            current=stats.current,
        )
    summary = stats.as_dict()
    sys.stderr.write(summary_text(summary, len(results)))
    for err in stats.errors[:20]:
        log.info("%s %s %s", err["status"], err["path"], err["detail"])
    if args.format == "json":
        payload = {
            "summary": summary,
            "results": plain(_result_records(results)),
            "errors": stats.errors,
        }
        if args.rows:
            payload["rows"] = plain(_drill_records(results))
        import json

        _write(json.dumps(payload, ensure_ascii=False, indent=2) + "\n", args.out)
    else:
        _write(_render_results(results, args.format, args.rows), args.out)
    return EXIT_FINDINGS if results else EXIT_CLEAN


def cmd_hunt(args: argparse.Namespace) -> int:
    settings = _settings(args)
    rules = _load_rules(settings, sys.stderr)
    if args.rule:
        wanted = set(args.rule)
        unknown = wanted - {r.id for r in rules}
        if unknown:
            raise UsageError(f"unknown rule id(s): {', '.join(sorted(unknown))}")
        rules = [r for r in rules if r.id in wanted]
    rules = _by_technique(rules, args.technique)
    exclusions = _load_exclusions(settings)
    with _open_store(settings) as store:
        results = _hunt(store, rules, roots=None, include_excluded=args.include_excluded, exclusions=exclusions)
    _write(_render_results(results, args.format, args.rows), args.out)
    return EXIT_FINDINGS if results else EXIT_CLEAN


def cmd_rows(args: argparse.Namespace) -> int:
    from agent.schema import COLUMN_NAMES

    settings = _settings(args)
    with _open_store(settings) as store:
        rows = list(store.iter_rows(where='"Excluded" = 1' if args.excluded else ""))
    _write(render(rows, args.format, columns=COLUMN_NAMES, max_width=40), args.out)
    return EXIT_CLEAN


def cmd_explain(args: argparse.Namespace) -> int:
    from agent.explain import explain_file

    settings = _settings(args)
    rules = _load_rules(settings, sys.stderr)
    exclusions = _load_exclusions(settings)
    report = explain_file(args.file, settings, rules, exclusions, _device(settings))
    if args.format == "json":
        import json

        sys.stdout.write(json.dumps(plain(report.as_dict()), ensure_ascii=False, indent=2) + "\n")
    else:
        sys.stdout.write(report.text())
    return EXIT_FINDINGS if report.fires else EXIT_CLEAN


def cmd_rules(args: argparse.Namespace) -> int:
    from agent.rules_cli import rules_check, rules_list

    settings = _settings(args)
    if args.rules_command == "list":
        rules = _load_rules(settings, sys.stderr)
        _write(rules_list(rules, args.format), args.out)
        return EXIT_CLEAN
    problems = rules_check(args.paths, settings)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s)", file=sys.stderr)
        return EXIT_ERROR
    print("ok", file=sys.stderr)
    return EXIT_CLEAN


COMMANDS = {"scan": cmd_scan, "hunt": cmd_hunt, "rows": cmd_rows, "explain": cmd_explain, "rules": cmd_rules}
COMMANDS["config"] = config_cli.run


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(getattr(args, "verbose", 0) or 0, 2),
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return COMMANDS[args.command](args)
    except (UsageError, ConfigError) as exc:
        print(f"rmmhunt: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("rmmhunt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_CLEAN


if __name__ == "__main__":
    sys.exit(main())

"""`rmmhunt config show|check`: the effective settings and where each came from; validation
of a config file without running anything."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import textwrap
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import platform
from agent.settings import (
    CONFIG_ENV,
    ConfigError,
    Option,
    Settings,
    iter_effective,
    load_settings,
    locate_config_file,
    validate_config_file,
)
from agent.textenc import display, escape_path

EXIT_CLEAN, EXIT_ERROR = 0, 2
SECRET_MASK = "********"


def add_parser(subparsers: Any, global_options: Callable[..., None]) -> None:
    """Register `config show|check`; ``global_options(parser, suppress=True)`` adds the common options."""
    text = "show the effective settings and where each came from, or check a config file"
    p = subparsers.add_parser("config", help=text, description=text)
    global_options(p, suppress=True)
    sub = p.add_subparsers(dest="config_command", metavar="ACTION")
    sub.required = True
    show = sub.add_parser(
        "show",
        help="every setting: effective value, source (default, file:PATH:LINE, env:NAME, flag), type and help",
    )
    global_options(show, suppress=True)
    show.add_argument("--format", choices=("table", "json"), default="table")
    check = sub.add_parser("check", help="validate a config file without running: FILE:LINE: key: message")
    global_options(check, suppress=True)
    check.add_argument("file", nargs="?", metavar="FILE", help="config file (default: the one in effect)")


def run(args: argparse.Namespace) -> int:
    if args.config_command == "show":
        return _show(args)
    return _check(args)


# --------------------------------------------------------------------------- show


def _plain(opt: Option, value: Any) -> Any:
    """The value as JSON: paths escaped (textenc), lists as arrays, None as the empty string."""
    if opt.secret:
        return SECRET_MASK if value else ""
    if value is None:
        return ""
    if isinstance(value, Path):
        return escape_path(str(value))
    if isinstance(value, tuple):
        return [_plain(opt, v) for v in value]
    return value


def _toml_text(value: Any) -> str:
    """A JSON-ready value in TOML syntax, safe for a terminal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_text(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(display(value), ensure_ascii=False)
    return str(value)


def show_records(settings: Settings) -> list[dict[str, Any]]:
    """One record per declared setting: Setting (the config key), Name (the Settings attribute),
    Value, Source, Default, Type, Env, Help."""
    return [
        {
            "Setting": opt.dotted,
            "Name": opt.name,
            "Value": _plain(opt, value),
            "Source": origin,
            "Default": _plain(opt, platform.default_state_dir() if opt.name == "state_dir" else opt.default),
            "Type": opt.describe(),
            "Env": opt.env,
            "Help": opt.help,
        }
        for opt, value, origin in iter_effective(settings)
    ]


def _config_summary(settings: Settings) -> dict[str, Any]:
    path = settings.config_file
    return {
        "ConfigFile": escape_path(str(path)) if path else "",
        "ConfigSource": settings.origin("config_file") if path else "",
        "DefaultConfigFile": escape_path(str(platform.default_config_file())),
        "Exclusions": len(settings.exclusions),
        "ExclusionsSource": settings.origin("exclusions") if settings.exclusions else "",
    }


def _show(args: argparse.Namespace) -> int:
    settings = load_settings(
        state_dir=getattr(args, "state_dir", None),
        rules_dirs=getattr(args, "rules", None),
        config_file=getattr(args, "config", None),
    )
    records = show_records(settings)
    summary = _config_summary(settings)
    if args.format == "json":
        payload = {"summary": summary, "results": records, "errors": []}
        sys.stdout.write(json.dumps(payload, ensure_ascii=False, indent=2) + "\n")
        return EXIT_CLEAN
    sys.stdout.write(_table(summary, records))
    return EXIT_CLEAN


def _table(summary: dict[str, Any], records: list[dict[str, Any]]) -> str:
    width = max(60, shutil.get_terminal_size((100, 24)).columns)
    if summary["ConfigFile"]:
        head = f"config file: {display(summary['ConfigFile'])} ({summary['ConfigSource']})"
    else:
        head = (
            f"config file: none (no --config, no {CONFIG_ENV}, no {display(summary['DefaultConfigFile'])}); "
            "every value below is a default, the environment or a flag"
        )
    lines = [head]
    if summary["Exclusions"]:
        lines.append(f"exclusions: {summary['Exclusions']} [[exclusions]] entries ({summary['ExclusionsSource']})")
    lines.append("")
    cells = [(r["Setting"], _toml_text(r["Value"]), r["Source"]) for r in records]
    w_key = max(len("SETTING"), *(len(c[0]) for c in cells))
    w_value = max(len("VALUE"), *(len(c[1]) for c in cells))
    w_value = min(w_value, max(20, width - w_key - 30))
    lines.append(f"{'SETTING'.ljust(w_key)}  {'VALUE'.ljust(w_value)}  SOURCE")
    wrap = textwrap.TextWrapper(width=width, initial_indent="    ", subsequent_indent="    ")
    for (key, value, source), record in zip(cells, records, strict=True):
        if len(value) > w_value:  # a long value gets its own line instead of pushing SOURCE away
            lines.append(f"{key.ljust(w_key)}  {' ' * w_value}  {source}")
            lines.append(f"    = {value}")
        else:
            lines.append(f"{key.ljust(w_key)}  {value.ljust(w_value)}  {source}")
        text = f"{record['Help']}. [{record['Type']}; default {_toml_text(record['Default'])}; env {record['Env']}]"
        lines.extend(wrap.wrap(text))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- check


def check_config_file(path: Path) -> list[str]:
    """Every problem of a config file: its settings (``validate_config_file``) and its
    [[exclusions]] (``agent.exclusions.parse_exclusions``)."""
    problems = validate_config_file(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError):
        return problems  # already reported by validate_config_file
    from agent.exclusions import parse_exclusions

    _exclusions, exclusion_problems = parse_exclusions(data, path=str(path), source_text=text)
    return problems + [str(p) for p in exclusion_problems]


def _effective_config_path(args: argparse.Namespace) -> Path:
    path, _origin, _explicit = locate_config_file(getattr(args, "config", None))
    if path is None:
        raise ConfigError(
            f"no config file to check: pass FILE, --config or {CONFIG_ENV} (no {platform.default_config_file()})"
        )
    return path


def _check(args: argparse.Namespace) -> int:
    path = Path(args.file) if args.file else _effective_config_path(args)
    problems = check_config_file(path)
    for problem in problems:
        print(display(problem))
    if problems:
        print(f"{display(str(path))}: {len(problems)} problem(s)", file=sys.stderr)
        return EXIT_ERROR
    print(f"{display(str(path))}: ok", file=sys.stderr)
    return EXIT_CLEAN

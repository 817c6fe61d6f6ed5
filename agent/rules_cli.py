"""`rmmhunt rules list|check`: listing and linting of rule and exclusion files."""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.output import render
from agent.settings import Settings


def rules_list(rules: Sequence[Any], fmt: str) -> str:
    records = [
        {
            "id": r.id,
            "name": r.name,
            "tool": r.tool,
            "source": r.source,
            "shared_with": list(r.shared_with),
            "patterns": [f"{col} {op} {pat}" for col, op, pat in r.query.string_patterns],
        }
        for r in rules
    ]
    return render(records, fmt, max_width=70)


def _check_toml(path: Path) -> list[str]:
    from agent.exclusions import parse_exclusions

    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return [f"{path}:{getattr(exc, 'lineno', 0)}:{getattr(exc, 'colno', 0)}: TOML error: {exc}"]
    _exclusions, problems = parse_exclusions(data, path=str(path), source_text=text)
    return [str(p) for p in problems]


def rules_check(paths: Sequence[str], settings: Settings) -> list[str]:
    """One 'file:line:col: message' string per problem in the given files/dirs (default: in use)."""
    from agent.rules.loader import check_rule_file, load_rules

    targets = [Path(p) for p in paths] or list(settings.rule_dirs_effective)
    if not paths and settings.config_file:
        targets.append(settings.config_file)
    problems: list[str] = []
    for target in targets:
        if target.is_dir():
            # the loader checks the directory as a whole (duplicate ids across files)
            problems.extend(str(p) for p in load_rules([target]).problems)
            files = sorted(p for p in target.iterdir() if p.suffix == ".toml")
        elif target.exists():
            files = [target]
        else:
            problems.append(f"{target}:0:0: no such file or directory")
            continue
        for file in files:
            if file.suffix == ".toml":
                problems.extend(_check_toml(file))
            else:
                problems.extend(str(p) for p in check_rule_file(file))
    return problems

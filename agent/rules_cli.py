"""`rmmhunt rules list|check`: listing and linting of rule and exclusion files.

`rules check` prints one `file:line:col: message` line per problem on stdout. Errors (a rule or
an exclusion that does not load) make it exit 2; warnings (`file:line:col: warning: ...`: an
exclusion comparison that can never match a real path, an exclusion naming a rule id that no
loaded rule has) are printed too but leave the exit code at 0.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from agent.output import render
from agent.settings import ConfigError, Settings

EXIT_CLEAN, EXIT_ERROR = 0, 2


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


@dataclass
class CheckReport:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _settings_problems(path: Path) -> list[str]:
    """The config validation of `rmmhunt config check` (agent.settings.validate_config_file), so that
    `rules check` on a config checks its settings too; none where that validation is not available."""
    try:
        from agent.settings import validate_config_file  # type: ignore[attr-defined]
    except ImportError:
        return []
    try:
        return [str(problem) for problem in validate_config_file(path)]
    except RecursionError:  # tomllib recurses on nested arrays and inline tables
        return [f"{path}:0:0: TOML error: arrays or tables nested too deeply"]


def _check_toml(path: Path, rule_ids: Collection[str] | None, report: CheckReport) -> None:
    import tomllib  # here, not at start-up: only `rules check` of a config reads TOML here

    from agent.exclusions import ExclusionProblem, parse_exclusions

    settings_problems = _settings_problems(path)
    report.errors.extend(settings_problems)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        if not settings_problems:  # the settings validation reports an unreadable file itself
            report.errors.append(f"{path}:0:0: cannot read the file as UTF-8 text: {exc}")
        return
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        if not settings_problems:
            report.errors.append(f"{path}:{getattr(exc, 'lineno', 0)}:{getattr(exc, 'colno', 0)}: TOML error: {exc}")
        return
    except RecursionError:  # tomllib recurses on nested arrays and inline tables
        if not settings_problems:
            report.errors.append(f"{path}:0:0: TOML error: arrays or tables nested too deeply")
        return
    warnings: list[ExclusionProblem] = []
    _exclusions, problems = parse_exclusions(
        data, path=str(path), source_text=text, rule_ids=rule_ids, warnings=warnings
    )
    report.errors.extend(str(p) for p in problems)
    report.warnings.extend(str(w) for w in warnings)


def _attacker_controlled_warnings(rules: Sequence[Any]) -> list[str]:
    """A rule that narrows a broad signer only by FileName or FolderPath is renamed away by an attacker:
    a warning (SPEC section 2; agent.catalog.lint holds the check)."""
    from agent.catalog.lint import attacker_controlled_rules

    return [f"{rule.path}:1:1: warning: rule {rule.id}: {reason}" for rule, reason in attacker_controlled_rules(rules)]


def check_paths(paths: Sequence[str], settings: Settings) -> CheckReport:
    """Every error and warning in the given rule files/dirs and .toml configs (default: those in use).

    Exclusions are checked against the ids of the rules in the rule directories among `paths`,
    or, when none is given, of the rules in use (`settings.rule_dirs_effective`).
    """
    from agent.rules.loader import check_rule_file, load_rules

    targets = [Path(p) for p in paths] or list(settings.rule_dirs_effective)
    if not paths and settings.config_file:
        targets.append(settings.config_file)
    report = CheckReport()
    rule_dirs = [target for target in targets if target.is_dir()]
    tomls: list[Path] = []
    rule_ids: set[str] = set()
    for target in targets:
        if target.is_dir():
            # the loader checks the directory as a whole (duplicate ids across files)
            ruleset = load_rules([target])
            report.errors.extend(str(p) for p in ruleset.problems)
            rule_ids.update(rule.id for rule in ruleset.rules)
            report.warnings.extend(_attacker_controlled_warnings(ruleset.rules))
            tomls.extend(sorted(p for p in target.iterdir() if p.suffix == ".toml"))
        elif not target.exists():
            report.errors.append(f"{target}:0:0: no such file or directory")
        elif target.suffix == ".toml":
            tomls.append(target)
        else:
            problems = check_rule_file(target)
            report.errors.extend(str(p) for p in problems)
    if tomls:
        if not rule_dirs:
            in_use = [d for d in settings.rule_dirs_effective if d.is_dir()]
            rule_ids.update(rule.id for rule in load_rules(in_use).rules)
        for toml in tomls:
            _check_toml(toml, rule_ids, report)
    return report


def rules_check(paths: Sequence[str], settings: Settings) -> list[str]:
    """One 'file:line:col: message' string per error (warnings are left out; see check_paths)."""
    return check_paths(paths, settings).errors


def run_check(paths: Sequence[str], settings: Settings, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """`rmmhunt rules check`: print errors and warnings; exit 2 on errors, else 0."""
    out = out or sys.stdout
    err = err or sys.stderr
    report = check_paths(paths, settings)
    for line in report.errors + report.warnings:
        print(line, file=out)
    summary = f"{len(report.errors)} problem(s)" if report.errors else "ok"
    if report.warnings:
        summary += f", {len(report.warnings)} warning(s)"
    print(summary, file=err)
    return EXIT_ERROR if report.errors else EXIT_CLEAN


def load_exclusions(settings: Settings, rules: Sequence[Any] = (), err: TextIO | None = None) -> list[Any]:
    """The config's exclusions, checked against the loaded `rules`.

    An error raises ConfigError (one line per problem). Warnings (a comparison that can never match
    a real path, a rule id no loaded rule has) are printed on `err` as `warning: file:line:col: ...`
    and the exclusion is kept.
    """
    if not settings.exclusions:
        return []
    from agent.exclusions import ExclusionProblem, parse_exclusions

    text = settings.config_file.read_text(encoding="utf-8") if settings.config_file else None
    warnings: list[ExclusionProblem] = []
    exclusions, problems = parse_exclusions(
        {"exclusions": list(settings.exclusions)},
        path=str(settings.config_file),
        source_text=text,
        rule_ids=[rule.id for rule in rules] if rules else None,
        warnings=warnings,
    )
    if problems:
        raise ConfigError("\n".join(str(p) for p in problems))
    for warning in warnings:
        print(f"rmmhunt: {warning}", file=err or sys.stderr)
    return list(exclusions)

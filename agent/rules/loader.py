"""Load Sentinel hunting-query YAML files into Rules. The only module in agent.rules that does I/O.

A rule file is read as published: `id`, `name`, `description`, `tactics`, `relevantTechniques` and
`query`; other Sentinel keys are ignored. An optional `rmmhunt:` mapping carries our own metadata
(`source: rmmhunt`, `tool`, `shared_with`, anything else is kept in `Rule.meta`).

Every problem names the file, the line and the column in the file: YAML errors at the YAML error's
position, KQL errors mapped from the query text into the file through the `query` node's marks.
A bad file becomes a RuleProblem and the other files still load.

Tool attribution, strongest first: the attribution file (`config/rule_attribution.yaml`: rule id ->
{tool, shared_with}), the rule's `rmmhunt:` block, the rule name ("Remote Management and
Monitoring tool - <Tool> - File Signature", also with Action1's "Montioring" typo), the name itself.
Attribution entries for ids that are not loaded are ignored (a `--rules` directory may hold fewer rules).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.rules.kql import KqlError, Query, parse_query

if TYPE_CHECKING:
    import yaml

__all__ = ["Rule", "RuleProblem", "RuleSet", "load_rules", "check_rule_file", "parse_rule", "parse_attribution"]

log = logging.getLogger(__name__)

MAX_RULE_FILE_BYTES = 1 << 20
RULE_SUFFIXES = (".yaml", ".yml")
_TOOL_FROM_NAME = re.compile(r"^\s*Remote Management and Mon(?:it|ti)oring tool - (?P<tool>.+?) - File Signature\s*$")


@dataclass(frozen=True)
class Rule:
    id: str
    name: str
    description: str
    tactics: tuple[str, ...]
    techniques: tuple[str, ...]
    query: Query
    path: str
    source: str  # "published", or "rmmhunt" for our own rules
    tool: str
    shared_with: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class RuleProblem:
    path: str
    line: int  # 1-based; 0 when the problem has no position (e.g. a missing directory)
    column: int
    message: str

    def __str__(self) -> str:
        if self.line <= 0:
            return f"{self.path}: {self.message}"
        return f"{self.path}:{self.line}:{self.column}: {self.message}"


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...]
    problems: tuple[RuleProblem, ...]


@dataclass(frozen=True)
class _Attribution:
    tool: str | None
    shared_with: tuple[str, ...] | None  # None: keep the rule's own


class _Problem(Exception):
    def __init__(self, line: int, column: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.column = column
        self.message = message


# --- reading -----------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    """The file's text; raises _Problem for unreadable, oversized or non-UTF-8 files."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_RULE_FILE_BYTES + 1)
    except OSError as exc:
        raise _Problem(0, 0, f"cannot read file: {exc.strerror or exc}") from None
    if len(data) > MAX_RULE_FILE_BYTES:
        raise _Problem(0, 0, f"file is larger than {MAX_RULE_FILE_BYTES} bytes")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise _Problem(line, column, f"file is not valid UTF-8 (byte 0x{data[exc.start]:02x})") from None


def _compose(text: str) -> tuple[yaml.Node | None, Any]:
    """The YAML node tree and the constructed data; raises _Problem for YAML errors."""
    # yaml is imported here, not at start-up: a scan whose rules come from the compiled-rules
    # cache reads no YAML at all (issue 12)
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
        return node, data
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        parts = [part for part in (exc.context, exc.problem) if part]
        message = "invalid YAML: " + ", ".join(parts)
        if mark is None:
            raise _Problem(1, 1, message) from None
        raise _Problem(mark.line + 1, mark.column + 1, message) from None
    except yaml.reader.ReaderError as exc:
        position = exc.position
        line = text.count("\n", 0, position) + 1
        column = position - (text.rfind("\n", 0, position) + 1) + 1
        character = exc.character if isinstance(exc.character, str) else chr(exc.character)
        raise _Problem(
            line, column, f"invalid YAML: unacceptable character U+{ord(character):04X}: {exc.reason}"
        ) from None
    except yaml.YAMLError as exc:
        raise _Problem(1, 1, f"invalid YAML: {exc}") from None
    finally:
        loader.dispose()


def _position(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _top_level(node: yaml.Node | None) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    import yaml

    if not isinstance(node, yaml.MappingNode):
        line, column = _position(node) if node is not None else (1, 1)
        raise _Problem(line, column, "a rule file must be a YAML mapping")
    keys: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for key_node, value_node in node.value:
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        if not isinstance(key, str):
            continue
        if key in keys:
            raise _Problem(*_position(key_node), f"duplicate key '{key}'")
        keys[key] = (key_node, value_node)
    return keys


def _map_query_position(text: str, query_node: yaml.Node, error: KqlError) -> tuple[int, int, str]:
    """Map a position in the query text to (file line, file column, message)."""
    start = query_node.start_mark
    style = getattr(query_node, "style", None)
    query_lines = str(query_node.value).split("\n")
    file_lines = text.split("\n")
    if style == "|":
        # literal block: query line 1 is the line after the `|` header; lines lose only their indentation
        file_line = start.line + 1 + error.line
        query_line = query_lines[error.line - 1] if error.line - 1 < len(query_lines) else ""
        raw = file_lines[file_line - 1].rstrip("\r") if file_line - 1 < len(file_lines) else ""
        if query_line and raw.endswith(query_line):
            indent = len(raw) - len(query_line)
        else:
            indent = len(raw) - len(raw.lstrip(" "))
        return file_line, indent + error.column, error.message
    if start.line == query_node.end_mark.line and error.line == 1:
        quoted = 1 if style in ("'", '"') else 0
        return start.line + 1, start.column + 1 + quoted + error.column - 1, error.message
    # folded or multi-line flow scalars lose the line layout: point at the query, say where inside it
    return start.line + 1, start.column + 1, f"{error.message} (query line {error.line}, column {error.column})"


def _string_list(key: str, node: yaml.Node, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise _Problem(*_position(node), f"'{key}' must be a string or a list of strings")


def _required_string(keys: dict[str, tuple[yaml.Node, yaml.Node]], data: Mapping[str, Any], key: str) -> str:
    if key not in keys:
        raise _Problem(1, 1, f"missing required key '{key}'")
    value = data.get(key)
    if not isinstance(value, str) or not value.strip():
        raise _Problem(*_position(keys[key][1]), f"'{key}' must be a non-empty string")
    return value


def tool_from_name(name: str) -> str:
    """The tool named in a published rule name, else the name itself."""
    match = _TOOL_FROM_NAME.match(name)
    return match["tool"].strip() if match else name.strip()


def _parse_rule(text: str, path: str) -> tuple[Rule, tuple[int, int]]:
    import yaml

    node, data = _compose(text)
    keys = _top_level(node)
    assert isinstance(data, dict)
    rule_id = _required_string(keys, data, "id").strip()
    name = _required_string(keys, data, "name").strip()
    query_text = _required_string(keys, data, "query")
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise _Problem(*_position(keys["description"][1]), "'description' must be a string")
    tactics = _string_list("tactics", keys["tactics"][1], data["tactics"]) if "tactics" in keys else ()
    techniques = (
        _string_list("relevantTechniques", keys["relevantTechniques"][1], data["relevantTechniques"])
        if "relevantTechniques" in keys
        else ()
    )
    meta: dict[str, Any] = {}
    source = "published"
    tool = tool_from_name(name)
    shared_with: tuple[str, ...] = ()
    if "rmmhunt" in keys:
        meta_node = keys["rmmhunt"][1]
        raw_meta = data["rmmhunt"]
        if not isinstance(raw_meta, dict):
            raise _Problem(*_position(meta_node), "'rmmhunt' must be a mapping")
        meta = dict(raw_meta)
        sub = {k.value: v for k, v in meta_node.value} if isinstance(meta_node, yaml.MappingNode) else {}
        if "source" in meta:
            if meta["source"] not in ("rmmhunt", "published"):
                raise _Problem(*_position(sub["source"]), "'rmmhunt.source' must be 'rmmhunt' or 'published'")
            source = meta["source"]
        if "tool" in meta:
            if not isinstance(meta["tool"], str) or not meta["tool"].strip():
                raise _Problem(*_position(sub["tool"]), "'rmmhunt.tool' must be a non-empty string")
            tool = meta["tool"].strip()
        if "shared_with" in meta:
            shared_with = _string_list("rmmhunt.shared_with", sub["shared_with"], meta["shared_with"])
    query_node = keys["query"][1]
    try:
        query = parse_query(query_text)
    except KqlError as exc:
        raise _Problem(*_map_query_position(text, query_node, exc)) from None
    except RecursionError:  # a safety net: the parser's own nesting limit should come first
        raise _Problem(*_position(query_node), "query nested too deeply") from None
    rule = Rule(
        id=rule_id,
        name=name,
        description=description,
        tactics=tactics,
        techniques=techniques,
        query=query,
        path=path,
        source=source,
        tool=tool,
        shared_with=shared_with,
        meta=meta,
    )
    return rule, _position(keys["id"][1])


def parse_rule(text: str, path: str) -> tuple[Rule | None, list[RuleProblem]]:
    """Parse one rule file's text (pure). Returns the rule, or None and the problems."""
    try:
        rule, _ = _parse_rule(text, path)
    except _Problem as problem:
        return None, [RuleProblem(path, problem.line, problem.column, problem.message)]
    return rule, []


def _load_file(path: Path) -> tuple[Rule | None, tuple[int, int], list[RuleProblem]]:
    try:
        text = _read_text(path)
        rule, id_position = _parse_rule(text, str(path))
    except _Problem as problem:
        return None, (0, 0), [RuleProblem(str(path), problem.line, problem.column, problem.message)]
    return rule, id_position, []


def check_rule_file(path: Path) -> list[RuleProblem]:
    """Every problem in one rule file (an empty list means it loads)."""
    return _load_file(Path(path))[2]


def parse_attribution(text: str, path: str) -> tuple[dict[str, _Attribution], list[RuleProblem]]:
    """Parse an attribution file: a mapping of rule id -> {tool: str, shared_with: [str, ...]}."""
    import yaml

    try:
        node, data = _compose(text)
    except _Problem as problem:
        return {}, [RuleProblem(path, problem.line, problem.column, problem.message)]
    if data is None:
        return {}, []
    if not isinstance(node, yaml.MappingNode) or not isinstance(data, dict):
        line, column = _position(node) if node is not None else (1, 1)
        return {}, [RuleProblem(path, line, column, "an attribution file must map rule ids to {tool, shared_with}")]
    entries: dict[str, _Attribution] = {}
    problems: list[RuleProblem] = []
    for key_node, value_node in node.value:
        rule_id = str(key_node.value)
        value = data.get(key_node.value)
        line, column = _position(value_node)
        if not isinstance(value, dict):
            problems.append(RuleProblem(path, line, column, f"attribution for '{rule_id}' must be a mapping"))
            continue
        unknown = sorted(set(value) - {"tool", "shared_with"})
        if unknown:
            problems.append(RuleProblem(path, line, column, f"unknown attribution key(s) for '{rule_id}': {unknown}"))
            continue
        tool = value.get("tool")
        if tool is not None and (not isinstance(tool, str) or not tool.strip()):
            problems.append(RuleProblem(path, line, column, f"'tool' for '{rule_id}' must be a non-empty string"))
            continue
        shared = value.get("shared_with")
        if isinstance(shared, str):
            shared = [shared]
        if shared is not None and (not isinstance(shared, list) or not all(isinstance(item, str) for item in shared)):
            problems.append(RuleProblem(path, line, column, f"'shared_with' for '{rule_id}' must be a list of strings"))
            continue
        entries[rule_id] = _Attribution(
            tool.strip() if isinstance(tool, str) else None, tuple(shared) if shared is not None else None
        )
    return entries, problems


def _rule_files(dirs: Sequence[Path]) -> tuple[list[Path], list[RuleProblem]]:
    files: list[Path] = []
    problems: list[RuleProblem] = []
    for directory in dirs:
        directory = Path(directory)
        if not directory.is_dir():
            problems.append(RuleProblem(str(directory), 0, 0, "rules directory not found"))
            continue
        files.extend(sorted(p for p in directory.iterdir() if p.suffix.lower() in RULE_SUFFIXES and p.is_file()))
    return files, problems


_DEFAULT_CACHE: Any = object()


def load_rules(
    dirs: Sequence[Path], *, attribution: Path | None = None, cache_dir: Path | None = _DEFAULT_CACHE
) -> RuleSet:
    """Load every *.yaml / *.yml file directly in `dirs` (each directory sorted by name).

    A bad file becomes a RuleProblem and the others still load. A rule whose id was already loaded
    from an earlier file is a problem on the later file, which is skipped.

    The result is kept in a compiled-rules cache (agent.rules.cache) keyed by the hash of the
    files' bytes: ``cache_dir`` (default ``rules.cache.default_cache_dir()``; None: no cache).
    """
    from agent.rules import cache

    files, problems = _rule_files(dirs)
    directory = cache.default_cache_dir() if cache_dir is _DEFAULT_CACHE else cache_dir
    key = _cache_key(dirs, files, problems, attribution) if directory is not None else None
    if key is not None:
        cached = cache.load_cached(directory, key)
        if isinstance(cached, RuleSet):
            return cached
    ruleset = _load_rules(files, problems, attribution)
    if key is not None:
        cache.store_cached(directory, key, ruleset)
    return ruleset


def _cache_key(
    dirs: Sequence[Path], files: list[Path], problems: list[RuleProblem], attribution: Path | None
) -> str | None:
    """The cache key over every input of the result; None (no cache) when a file cannot be read."""
    from agent.rules import cache

    parts = [repr([str(d) for d in dirs]).encode("utf-8", "surrogateescape"), repr(problems).encode()]
    try:
        for path in files + ([Path(attribution)] if attribution is not None else []):
            parts.append(str(path).encode("utf-8", "surrogateescape"))
            if path.stat().st_size > MAX_RULE_FILE_BYTES:
                return None
            parts.append(path.read_bytes())
    except OSError:
        return None  # the loader reports it; nothing to cache against
    return cache.cache_key(parts)


def _load_rules(files: list[Path], problems: list[RuleProblem], attribution: Path | None) -> RuleSet:
    attributions: dict[str, _Attribution] = {}
    if attribution is not None:
        try:
            attribution_text = _read_text(Path(attribution))
        except _Problem as problem:
            problems.append(RuleProblem(str(attribution), problem.line, problem.column, problem.message))
        else:
            attributions, attribution_problems = parse_attribution(attribution_text, str(attribution))
            problems.extend(attribution_problems)
    rules: list[Rule] = []
    first_path: dict[str, str] = {}
    for path in files:
        rule, id_position, file_problems = _load_file(path)
        problems.extend(file_problems)
        if rule is None:
            continue
        if rule.id in first_path:
            problems.append(
                RuleProblem(
                    str(path), *id_position, f"duplicate rule id '{rule.id}' (already in {first_path[rule.id]})"
                )
            )
            continue
        first_path[rule.id] = str(path)
        entry = attributions.get(rule.id)
        if entry is not None:
            rule = replace(
                rule,
                tool=entry.tool or rule.tool,
                shared_with=entry.shared_with if entry.shared_with is not None else rule.shared_with,
            )
        rules.append(rule)
    for found in problems:
        log.debug("rule problem: %s", found)
    return RuleSet(tuple(rules), tuple(problems))

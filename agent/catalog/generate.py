"""`make catalog`: rebuild the `rmmhunt_*` supplementary rules from config/catalog_curated.yaml
plus the LOLRMM reference data, deterministically, then the attribution file.

The curated file says, per tool, which signers to match, which signed attributes qualify a broad
signer, and what the tool is (its ATT&CK technique). The reference data gives the evidence: the
LOLRMM certificates each generated rule fires on, written into the rule's `rmmhunt:` block. The
same inputs always give the same bytes, so a change in LOLRMM or in the curated file is one
command and a reviewable diff; `--check` (and tests/test_catalog.py) fail when the committed
files differ from what this generates.

Usage: python -m agent.catalog.generate [--check] [--reference DIR] [--curated FILE] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from agent.catalog.attribution import (
    DEFAULT_REFERENCE_DIR,
    REFERENCE_ENV,
    GenericSigners,
    LolrmmCatalog,
    certificate_row,
    generate_attribution,
    load_generic_signers,
    load_lolrmm,
    reference_dir,
    signer_row,
)
from agent.resources import config_dir, rule_attribution_file, shipped_rules_dir
from agent.rules.kql import Query, parse_query

CURATED_FILE = "catalog_curated.yaml"
_THUMBPRINT = re.compile(r"[0-9a-f]{40}")
ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://rmmhunt.invalid/config/rules")
LOLRMM_COMMIT = "3c75cf09"
# A fixed moment for evaluating the rules' time window: the evidence must not depend on the clock.
EVAL_NOW = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)

# What each technique is, and the tactic it sits under (MITRE ATT&CK Enterprise).
TECHNIQUES: Mapping[str, tuple[str, str]] = {
    "T1219": ("CommandAndControl", "Remote Access Tools"),
    "T1567.002": ("Exfiltration", "Exfiltration Over Web Service: Exfiltration to Cloud Storage"),
    "T1048": ("Exfiltration", "Exfiltration Over Alternative Protocol"),
    "T1572": ("CommandAndControl", "Protocol Tunneling"),
    "T1090": ("CommandAndControl", "Proxy"),
    "T1021": ("LateralMovement", "Remote Services"),
    "T1021.001": ("LateralMovement", "Remote Services: Remote Desktop Protocol"),
    "T1021.002": ("LateralMovement", "Remote Services: SMB/Windows Admin Shares"),
    "T1021.004": ("LateralMovement", "Remote Services: SSH"),
    "T1569.002": ("Execution", "System Services: Service Execution"),
    "T1072": ("Execution", "Software Deployment Tools"),
}
# The opening sentence of each generated description, by primary technique.
_PURPOSE: Mapping[str, str] = {
    "T1219": "Remote Monitoring and Management (RMM) and remote access programs are IT tools to manage remote "
    "endpoints. Attackers abuse them to persist or provide C2 channels.",
    "T1567.002": "Cloud storage and file sync clients move data to a vendor's cloud. Attackers use them to "
    "exfiltrate data.",
    "T1048": "File transfer clients move data over SFTP, SCP or FTP. Attackers use them to exfiltrate data.",
    "T1572": "Tunnelling and overlay-network agents expose hosts and services through the vendor's network. "
    "Attackers use them to reach a host from outside or to hide C2 traffic.",
    "T1021": "Remote connection managers open RDP, SSH and VNC sessions to other hosts. Attackers use them to "
    "move laterally.",
    "T1021.001": "Tools that change or extend Windows Remote Desktop. Attackers use them to move laterally.",
    "T1021.004": "SSH clients and servers. Attackers use them to move laterally and to tunnel.",
    "T1569.002": "Remote execution tools run commands on other hosts as a service. Attackers use them to move "
    "laterally.",
    "T1072": "Software deployment and inventory agents run what a central console sends. Attackers abuse them "
    "to execute code across a fleet.",
}

# Qualifier kinds: curated key -> (row column, KQL operator). Signed ones first; the order is the
# order in the generated query. FileName / FolderPath are attacker-controlled: extra alternatives only.
QUALIFIERS: tuple[tuple[str, str, str], ...] = (
    ("products", "VersionInfoProductName", "has_any"),
    ("products_exact", "VersionInfoProductName", "in~"),
    ("descriptions", "VersionInfoFileDescription", "has_any"),
    ("original_names", "VersionInfoOriginalFileName", "in~"),
    ("original_prefixes", "VersionInfoOriginalFileName", "startswith"),
    ("internal_names", "VersionInfoInternalFileName", "in~"),
    ("programs", "ProgramName", "has_any"),
    ("file_names", "FileName", "in~"),
    ("file_prefixes", "FileName", "startswith"),
    ("folder_paths", "FolderPath", "has"),
)
ATTACKER_CONTROLLED = frozenset({"FileName", "FolderPath"})
_QUALIFIER_KEYS = frozenset(key for key, _, _ in QUALIFIERS)
_TOOL_KEYS = frozenset(
    {"name", "tool", "technique", "techniques", "based_on", "signers", "branches", "note", "sources"}
)


@dataclass(frozen=True)
class Branch:
    signers: tuple[str, ...]
    qualifiers: tuple[tuple[str, tuple[str, ...]], ...]  # (curated key, values), in QUALIFIERS order


@dataclass(frozen=True)
class CuratedRule:
    name: str  # file name part: rmmhunt_<name>_filesig.yaml
    tool: str
    techniques: tuple[str, ...]
    based_on: str | None
    branches: tuple[Branch, ...]
    note: str
    sources: str  # where the qualifiers come from

    @property
    def id(self) -> str:
        return str(uuid.uuid5(ID_NAMESPACE, f"rmmhunt-supplementary/{self.name}"))

    @property
    def tactics(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(TECHNIQUES[t][0] for t in self.techniques))

    @property
    def file_name(self) -> str:
        return f"rmmhunt_{self.name}_filesig.yaml"


def _strings(where: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"{where}: expected a non-empty string or list of strings")
    for item in value:
        if "'" in item and '"' in item:
            raise ValueError(f"{where}: {item!r} holds both quote characters")
    return tuple(value)


def _branch(where: str, data: Any) -> Branch:
    if not isinstance(data, dict) or "signers" not in data:
        raise ValueError(f"{where}: a branch needs 'signers'")
    unknown = sorted(set(data) - _QUALIFIER_KEYS - {"signers"})
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; qualifiers are {sorted(_QUALIFIER_KEYS)}")
    quals = tuple((key, _strings(f"{where}.{key}", data[key])) for key, _, _ in QUALIFIERS if key in data)
    return Branch(_strings(f"{where}.signers", data["signers"]), quals)


def parse_curated(data: Any) -> tuple[CuratedRule, ...]:
    """Validate the parsed curated file (pure). Raises ValueError naming the entry."""
    if not isinstance(data, dict) or not isinstance(data.get("tools"), list):
        raise ValueError("curated catalog must be a mapping with a 'tools' list")
    out: list[CuratedRule] = []
    seen: set[str] = set()
    for index, item in enumerate(data["tools"]):
        where = f"tools[{index}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected a mapping")
        where = f"tools[{index}] ({item.get('name')})"
        unknown = sorted(set(item) - _TOOL_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}")
        for key in ("name", "tool", "note", "sources"):
            if not isinstance(item.get(key), str) or not item[key].strip():
                raise ValueError(f"{where}: needs a non-empty '{key}'")
        if item["name"] in seen:
            raise ValueError(f"{where}: duplicate name")
        seen.add(item["name"])
        techniques = _strings(f"{where}.technique", item.get("techniques", item.get("technique")))
        for technique in techniques:
            if technique not in TECHNIQUES:
                raise ValueError(f"{where}: unknown technique {technique!r}; known: {sorted(TECHNIQUES)}")
        if ("signers" in item) == ("branches" in item):
            raise ValueError(f"{where}: give either 'signers' (no qualifier) or 'branches'")
        if "signers" in item:
            branches: tuple[Branch, ...] = (Branch(_strings(f"{where}.signers", item["signers"]), ()),)
        else:
            if not isinstance(item["branches"], list) or not item["branches"]:
                raise ValueError(f"{where}: 'branches' must be a non-empty list")
            branches = tuple(_branch(f"{where}.branches[{i}]", b) for i, b in enumerate(item["branches"]))
        for i, branch in enumerate(branches):
            kinds = {key for key, _ in branch.qualifiers}
            columns = {column for key, column, _ in QUALIFIERS if key in kinds}
            if columns and columns <= ATTACKER_CONTROLLED:
                raise ValueError(f"{where}.branches[{i}]: FileName/FolderPath may only be an extra alternative")
        based_on = item.get("based_on")
        out.append(
            CuratedRule(
                name=item["name"],
                tool=item["tool"],
                techniques=techniques,
                based_on=str(based_on) if based_on else None,
                branches=branches,
                note=item["note"].strip(),
                sources=item["sources"].strip(),
            )
        )
    return tuple(sorted(out, key=lambda r: r.name.lower()))


def curated_file() -> Path:
    return config_dir() / CURATED_FILE


def load_curated(path: Path | None = None) -> tuple[CuratedRule, ...]:
    path = Path(path) if path is not None else curated_file()
    try:
        return parse_curated(yaml.safe_load(path.read_text(encoding="utf-8")))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


# --- rendering ---------------------------------------------------------------------------------------


def _quote(value: str) -> str:
    return f'"{value}"' if "'" in value else f"'{value}'"


def _list(values: Sequence[str]) -> str:
    return "(" + ", ".join(_quote(v) for v in values) + ")"


def _condition(column: str, op: str, values: Sequence[str]) -> str:
    if op == "has_any":
        return f"{column} has {_quote(values[0])}" if len(values) == 1 else f"{column} has_any {_list(values)}"
    if op == "in~":
        return f"{column} =~ {_quote(values[0])}" if len(values) == 1 else f"{column} in~ {_list(values)}"
    if op == "has":
        return " or ".join(f"{column} has {_quote(v)}" for v in values)
    return " or ".join(f"{column} {op} {_quote(v)}" for v in values)  # startswith


def render_where(branches: Sequence[Branch]) -> str:
    """The rule's signer filter, as the lines after `| where `."""
    parts = []
    for branch in branches:
        signer = _condition("Signer", "has_any", branch.signers)
        if not branch.qualifiers:
            parts.append((signer, ""))
            continue
        by_key = dict(branch.qualifiers)
        alternatives = [_condition(col, op, by_key[key]) for key, col, op in QUALIFIERS if key in by_key]
        parts.append((signer, "(" + " or ".join(alternatives) + ")"))
    if len(parts) == 1:
        signer, qualifier = parts[0]
        return signer + (f"\n    and {qualifier}" if qualifier else "")
    lines = []
    for index, (signer, qualifier) in enumerate(parts):
        text = f"({signer} and {qualifier})" if qualifier else signer
        lines.append(text if index == 0 else f"    or {text}")
    return "\n".join(lines)


def render_query(rule: CuratedRule) -> str:
    return (
        "let Time_start = now(-5d);\n"
        "let Time_end = now();\n"
        "//\n"
        "DeviceFileCertificateInfo\n"
        "| where Timestamp between (Time_start..Time_end)\n"
        f"| where {render_where(rule.branches)}\n"
        "| summarize FirstSeen=min(Timestamp), LastSeen=max(Timestamp),\n"
        "    Report=make_set(ReportId), Count=count() by DeviceId, DeviceName\n"
    )


def _scalar_or_list(key: str, values: Sequence[str]) -> str:
    if len(values) == 1:
        return f"{key}: {values[0]}"
    return f"{key}:\n" + "".join(f"- {v}\n" for v in values).rstrip("\n")


def render_rule(rule: CuratedRule, evidence: Sequence[tuple[str, str]]) -> str:
    """The rule file's text. ``evidence``: (thumbprint, comment) pairs."""
    primary = rule.techniques[0]
    query = "".join(f"  {line}\n" if line else "\n" for line in render_query(rule).splitlines())
    technique_words = "; ".join(f"{t} {TECHNIQUES[t][1]}" for t in rule.techniques)
    lines = [
        "# rmmhunt supplementary rule: written by rmmhunt, not published by Microsoft or jischell.",
        "# Generated by `make catalog` (python -m agent.catalog.generate) from config/catalog_curated.yaml",
        f"# and the LOLRMM certificates (magicsword-io/LOLRMM @ {LOLRMM_COMMIT}): edit the curated file, not this one.",
        "# id: uuid5(uuid5(NAMESPACE_URL, 'https://rmmhunt.invalid/config/rules'), "
        f"'rmmhunt-supplementary/{rule.name}')",
        f"id: {rule.id}",
        f"name: rmmhunt supplementary - {rule.tool} - File Signature",
        "description: |",
        f"    {_PURPOSE[primary]}",
        f"    rmmhunt supplementary rule for {rule.tool} ({technique_words}): code-signing certificates of the",
        "    tool's vendor that the published File Signature rules do not match (see rmmhunt.note).",
        "requiredDataConnectors:",
        "- connectorId: MicrosoftThreatProtection",
        "  dataTypes:",
        "  - DeviceFileCertificateInfo",
        _scalar_or_list("tactics", rule.tactics),
        _scalar_or_list("relevantTechniques", rule.techniques),
        "query: |",
        query.rstrip("\n"),
        "rmmhunt:",
        "  source: rmmhunt",
        f"  tool: {json.dumps(rule.tool, ensure_ascii=False)}",
        f"  based_on: {rule.based_on or 'null'}",
        "  evidence:" + ("" if evidence else " []"),
    ]
    lines += [f'  - "{thumb}"  # {comment}' for thumb, comment in evidence]
    lines += [
        f"  qualifiers_from: {json.dumps(rule.sources, ensure_ascii=False)}",
        f"  note: {json.dumps(rule.note, ensure_ascii=False)}",
    ]
    return "\n".join(lines) + "\n"


# --- evidence ----------------------------------------------------------------------------------------


def rule_evidence(
    query: Query,
    rule: CuratedRule,
    catalog: LolrmmCatalog,
    generic: GenericSigners,
    rows: dict[tuple[str, str, str], dict[str, Any]] | None = None,
) -> tuple[tuple[str, str], ...]:
    """The LOLRMM certificates the rule fires on (signer alone, or with one of the file names LOLRMM
    gives for the certificate's tool). A generic signer counts only under this rule's own tool (Google
    LLC for Chrome Remote Desktop); a certificate misfiled under this tool does not. For certificates LOLRMM
    lists without DER, the signer name (with those file names) must fire."""
    found: dict[str, str] = {}
    rows = {} if rows is None else rows  # (tool, sha1, file name) -> row, shared across rules

    def fires(row: Mapping[str, Any]) -> bool:
        return query.filter_row(row, now=EVAL_NOW) is not None

    def cert_row(cert: Any, file_name: str = "") -> dict[str, Any]:
        key = (cert.tool, cert.sha1, file_name)
        if key not in rows:
            rows[key] = certificate_row(cert, now=EVAL_NOW, file_name=file_name)
        return rows[key]

    for cert in catalog.certificates:
        if cert.tool != rule.tool and generic.generic_reason(cert.signer) is not None:
            continue  # a generic signer is evidence only for the tool LOLRMM lists it under
        if cert.tool == rule.tool and generic.not_vendor_reason(cert.tool, cert.signer) is not None:
            continue  # misfiled under this tool: another vendor's certificate
        listed = ", ".join(cert.listed_as)
        if fires(cert_row(cert)):
            found.setdefault(cert.sha1, f"{cert.signer}; LOLRMM {listed}")
            continue
        for name in catalog.file_names.get(cert.tool, ()):
            if fires(cert_row(cert, name)):
                found.setdefault(cert.sha1, f"{cert.signer}; LOLRMM {listed}; with FileName {name}")
                break
    for listing in catalog.without_der:
        thumb = listing.thumbprint.lower()
        if not _THUMBPRINT.fullmatch(thumb) or thumb in found:
            continue
        if listing.tool != rule.tool and generic.generic_reason(listing.signer_name):
            continue
        for name in ("", *catalog.file_names.get(listing.tool, ())):
            if fires(signer_row(listing.signer_name, now=EVAL_NOW, file_name=name)):
                found[thumb] = (
                    f"{listing.signer_name}; LOLRMM {listing.listed_as}; signer name and thumbprint only, no DER"
                )
                break
    return tuple(sorted(found.items()))


def generate_rules(curated: Sequence[CuratedRule], catalog: LolrmmCatalog, generic: GenericSigners) -> dict[str, str]:
    """file name -> text for every supplementary rule (pure)."""
    out = {}
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for rule in curated:
        query = parse_query(render_query(rule))
        out[rule.file_name] = render_rule(rule, rule_evidence(query, rule, catalog, generic, rows))
    return out


def diff_rules(generated: Mapping[str, str], rules_dir: Path) -> list[str]:
    """Names of rmmhunt_* files that differ, are missing or are not generated (stale)."""
    present = {p.name for p in rules_dir.glob("rmmhunt_*_filesig.yaml")}
    problems = []
    for name, text in sorted(generated.items()):
        path = rules_dir / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"{name}: differs from the generated text")
    problems += [f"{name}: not generated by the curated file (stale)" for name in sorted(present - set(generated))]
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.catalog.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed files differ; write nothing")
    parser.add_argument(
        "--reference", type=Path, help=f"reference folder (default: ${REFERENCE_ENV} or {DEFAULT_REFERENCE_DIR})"
    )
    parser.add_argument("--curated", type=Path, default=None, help="curated catalog file")
    parser.add_argument("--out", type=Path, default=shipped_rules_dir(), help="rules directory to write")
    args = parser.parse_args(argv)
    try:
        curated = load_curated(args.curated)
        reference = reference_dir(args.reference)
        generated = generate_rules(curated, load_lolrmm(reference), load_generic_signers())
    except (OSError, ValueError) as exc:
        print(f"rmmhunt: error: {exc}", file=sys.stderr)
        return 2
    problems = diff_rules(generated, args.out)
    if args.check:
        attribution_path = rule_attribution_file()
        if not problems and args.out == shipped_rules_dir():
            current = attribution_path.read_text(encoding="utf-8") if attribution_path.exists() else ""
            if current != generate_attribution([args.out], reference):
                problems.append(f"{attribution_path.name}: out of date")
        for problem in problems:
            print(f"catalog: {problem}", file=sys.stderr)
        if problems:
            print("catalog is out of date: run make catalog", file=sys.stderr)
        return 1 if problems else 0
    for path in args.out.glob("rmmhunt_*_filesig.yaml"):
        if path.name not in generated:
            path.unlink()
    for name, text in generated.items():
        (args.out / name).write_text(text, encoding="utf-8")
    print(f"wrote {len(generated)} rules to {args.out} ({len(problems)} changed)")
    if args.out == shipped_rules_dir():
        rule_attribution_file().write_text(generate_attribution([args.out], reference), encoding="utf-8")
        print(f"wrote {rule_attribution_file()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Catalog quality report (`make catalog-report`): how well the shipped rules find LOLRMM's real
vendor certificates, and proof that no rule fires on a generic signer.

Every DER certificate in LOLRMM is turned into the row the extractor would emit (see
agent.catalog.attribution) and run through every rule's row filter. A certificate of tool T is
*caught* when a rule attributed to T (its `tool`, or T in its `shared_with`) fires on it, either on
the signer alone or together with one of the file names LOLRMM gives for T.

Two recall figures are printed: over all certificates, and over vendor certificates only (leaving
out generic signers such as Microsoft Corporation and certificates LOLRMM files under the wrong
tool, both listed in config/generic_signers.yaml with their reason).

Usage: python -m agent.catalog.report [--json] [--reference DIR] [--rules DIR] [--attribution FILE]
It also gives the ATT&CK technique per tool and per technique, and the rules whose only qualifier
of a broad signer is attacker-controlled (FileName/FolderPath; agent.catalog.lint, the goal is 0).

Exit status: 0, or 1 if a rule fires on a generic signer, depends on an attacker-controlled column
alone, or the catalog has load problems.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.catalog.attribution import (
    DEFAULT_REFERENCE_DIR,
    REFERENCE_ENV,
    CertificateHits,
    GenericSigners,
    LolrmmCatalog,
    evaluate_certificates,
    generic_signer_hits,
    generic_signers_file,
    load_generic_signers,
    load_lolrmm,
    reference_dir,
)
from agent.catalog.generate import TECHNIQUES
from agent.catalog.lint import attacker_controlled_rules
from agent.resources import rule_attribution_file, shipped_rules_dir
from agent.rules.loader import Rule, load_rules


@dataclass(frozen=True)
class CertificateResult:
    hits: CertificateHits
    attributed: tuple[str, ...]  # ids of firing rules attributed to the certificate's tool
    excluded: str | None  # why it is not a vendor certificate, or None

    @property
    def caught(self) -> bool:
        return bool(self.attributed)


def _attributed(rule: Rule, tool: str) -> bool:
    return rule.tool == tool or tool in rule.shared_with


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def classify(
    rules: Sequence[Rule], hits: Iterable[CertificateHits], generic: GenericSigners
) -> tuple[CertificateResult, ...]:
    by_id = {rule.id: rule for rule in rules}
    out = []
    for hit in hits:
        attributed = tuple(rid for rid in hit.rule_ids if _attributed(by_id[rid], hit.cert.tool))
        out.append(CertificateResult(hit, attributed, generic.exclusion_reason(hit.cert)))
    return tuple(out)


def _miss_reason(result: CertificateResult, by_id: Mapping[str, Rule]) -> str:
    if result.excluded:
        return result.excluded
    if result.hits.rule_ids:
        tools = sorted({by_id[rid].tool for rid in result.hits.rule_ids})
        return f"fires only rules attributed to other tools: {', '.join(tools)}"
    return "no rule matches this signer"


def build_report(
    rules: Sequence[Rule],
    catalog: LolrmmCatalog,
    generic: GenericSigners,
    *,
    now: datetime | None = None,
    problems: Sequence[str] = (),
) -> dict[str, Any]:
    """The report as plain data (pure apart from the clock)."""
    now = now or datetime.now(UTC)
    by_id = {rule.id: rule for rule in rules}
    results = classify(rules, evaluate_certificates(rules, catalog, now=now), generic)

    tools: dict[str, dict[str, Any]] = {}
    for result in results:
        cert = result.hits.cert
        entry = tools.setdefault(
            cert.tool,
            {
                "certificates": 0,
                "caught": 0,
                "vendor_certificates": 0,
                "vendor_caught": 0,
                "by_signer": 0,
                "missed": [],
            },
        )
        entry["certificates"] += 1
        entry["caught"] += result.caught
        if result.excluded is None:
            entry["vendor_certificates"] += 1
            entry["vendor_caught"] += result.caught
        if any(rid in result.attributed for rid in result.hits.by_signer):
            entry["by_signer"] += 1
        if not result.caught:
            entry["missed"].append(
                {
                    "signer": cert.signer,
                    "signer_hash": cert.sha1,
                    "listed_as": list(cert.listed_as),
                    "vendor": result.excluded is None,
                    "reason": _miss_reason(result, by_id),
                }
            )
    for entry in tools.values():
        entry["recall"] = _ratio(entry["caught"], entry["certificates"])
        entry["vendor_recall"] = _ratio(entry["vendor_caught"], entry["vendor_certificates"])

    total = len(results)
    caught = sum(r.caught for r in results)
    vendor = [r for r in results if r.excluded is None]
    vendor_caught = sum(r.caught for r in vendor)

    signer_hits = generic_signer_hits(rules, generic.signers, now=now)
    for result in results:  # LOLRMM's own generic-signer certificates, signer alone
        if generic.generic_reason(result.hits.cert.signer) and result.hits.by_signer:
            signer_hits.setdefault(result.hits.cert.signer, result.hits.by_signer)
    generic_hits = [
        {"signer": signer, "rules": [f"{rid} ({by_id[rid].name})" for rid in ids]}
        for signer, ids in sorted(signer_hits.items())
    ]

    fired = {rid for r in results for rid in r.hits.rule_ids}
    silent_rules = [
        {"id": rule.id, "tool": rule.tool, "path": Path(rule.path).name}
        for rule in sorted(rules, key=lambda r: Path(r.path).name.lower())
        if rule.id not in fired
    ]
    no_der: dict[str, list[str]] = {}
    for listing in catalog.without_der:
        no_der.setdefault(listing.tool, [])
        if listing.signer_name and listing.signer_name not in no_der[listing.tool]:
            no_der[listing.tool].append(listing.signer_name)
    rule_tools = {rule.tool for rule in rules}

    # What each tool is: the techniques of the rules written for it (not of rules merely shared with it).
    tool_techniques: dict[str, set[str]] = {}
    for rule in rules:
        tool_techniques.setdefault(rule.tool, set()).update(rule.techniques)
    for tool, entry in tools.items():
        entry["techniques"] = sorted(tool_techniques.get(tool, ()))
    techniques: dict[str, dict[str, Any]] = {}
    for rule in rules:
        for technique in rule.techniques or ("(none)",):
            slot = techniques.setdefault(technique, {"rules": 0, "tools": set(), "tactics": set()})
            slot["rules"] += 1
            slot["tools"].add(rule.tool)
            known = TECHNIQUES.get(technique)
            slot["tactics"].update([known[0]] if known else rule.tactics)
    by_technique = {
        t: {"rules": v["rules"], "tools": sorted(v["tools"], key=str.lower), "tactics": sorted(v["tactics"])}
        for t, v in sorted(techniques.items())
    }
    flagged = [
        {"id": rule.id, "path": Path(rule.path).name, "reason": reason}
        for rule, reason in sorted(attacker_controlled_rules(rules), key=lambda item: Path(item[0].path).name)
    ]

    return {
        "generated": now.isoformat(),
        "rules": len(rules),
        "rules_by_source": {s: sum(r.source == s for r in rules) for s in sorted({r.source for r in rules})},
        "load_problems": list(problems),
        "certificates": total,
        "caught": caught,
        "recall": _ratio(caught, total),
        "vendor_certificates": len(vendor),
        "vendor_caught": vendor_caught,
        "vendor_recall": _ratio(vendor_caught, len(vendor)),
        "tools": dict(sorted(tools.items(), key=lambda item: item[0].lower())),
        "tools_missed": sorted((t for t, e in tools.items() if e["missed"]), key=str.lower),
        "tools_not_found": sorted((t for t, e in tools.items() if not e["caught"]), key=str.lower),
        "generic_signer_hits": generic_hits,
        "rules_without_lolrmm_certificate": silent_rules,
        "tools_with_rule_but_no_der": sorted((t for t in rule_tools if t not in tools), key=str.lower),
        "without_der": {t: no_der[t] for t in sorted(no_der, key=str.lower)},
        "invalid_der": list(catalog.invalid_der),
        "techniques": by_technique,
        "attacker_controlled_rules": flagged,
    }


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f}%"


def format_report(report: Mapping[str, Any]) -> str:
    lines = [
        f"rmmhunt catalog report ({report['generated']})",
        f"rules: {report['rules']} " + "(" + ", ".join(f"{k} {v}" for k, v in report["rules_by_source"].items()) + ")",
    ]
    if report["load_problems"]:
        lines.append("LOAD PROBLEMS:")
        lines.extend(f"  {p}" for p in report["load_problems"])
    lines += [
        f"LOLRMM DER certificates (per tool): {report['certificates']}",
        f"recall, all certificates:    {report['caught']}/{report['certificates']} = {_percent(report['recall'])}",
        f"recall, vendor certificates: {report['vendor_caught']}/{report['vendor_certificates']} = "
        f"{_percent(report['vendor_recall'])}  (generic / misfiled certificates left out)",
        "",
        f"{'tool':<36} {'caught':>7} {'vendor':>7} {'signer':>6}  technique",
    ]
    for tool, entry in report["tools"].items():
        lines.append(
            f"{tool[:36]:<36} {entry['caught']:>3}/{entry['certificates']:<3} "
            f"{entry['vendor_caught']:>3}/{entry['vendor_certificates']:<3} {entry['by_signer']:>6}  "
            + (", ".join(entry["techniques"]) or "-")
        )
    lines += [
        "",
        "(signer: certificates caught on the signer alone; the rest need a qualifier: signed version info,"
        " program name or file name)",
        "",
    ]
    lines.append(f"missed certificates ({len(report['tools_missed'])} tools):")
    for tool in report["tools_missed"]:
        for miss in report["tools"][tool]["missed"]:
            lines.append(f"  {tool}: {miss['signer']} [{miss['signer_hash'][:12]}] - {miss['reason']}")
    lines.append("")
    lines.append("rules per technique (what the tool is):")
    for technique, entry in report["techniques"].items():
        tactics = ", ".join(entry["tactics"])
        lines.append(f"  {technique:<10} {tactics:<18} {entry['rules']:>3} rules, {len(entry['tools'])} tools")
        if technique != "T1219":
            lines.append(f"             {', '.join(entry['tools'])}")
    flagged = report["attacker_controlled_rules"]
    lines.append(f"rules whose only signer qualifier is attacker-controlled (FileName/FolderPath): {len(flagged)}")
    lines.extend(f"  {item['path']}: {item['reason']}" for item in flagged)
    lines.append("")
    lines.append("tools none of whose certificates is caught: " + (", ".join(report["tools_not_found"]) or "none"))
    lines.append("")
    hits = report["generic_signer_hits"]
    lines.append(f"generic signers that fire a rule: {len(hits)}" + (" (must be 0)" if hits else ""))
    for hit in hits:
        lines.append(f"  {hit['signer']}: {', '.join(hit['rules'])}")
    lines.append("")
    silent = report["rules_without_lolrmm_certificate"]
    lines.append(f"rules that no LOLRMM DER certificate fires: {len(silent)}")
    lines.extend(f"  {r['path']} ({r['tool']})" for r in silent)
    lines.append("")
    lines.append("tools with a rule but no LOLRMM DER certificate: " + ", ".join(report["tools_with_rule_but_no_der"]))
    lines.append("certificates LOLRMM lists without DER (not evaluated):")
    lines.extend(f"  {tool}: {', '.join(names) or '(no signer name)'}" for tool, names in report["without_der"].items())
    if report["invalid_der"]:
        lines.append("DER that did not parse:")
        lines.extend(f"  {item}" for item in report["invalid_der"])
    return "\n".join(lines) + "\n"


def run(
    rule_dirs: Sequence[Path],
    reference: Path,
    attribution: Path | None,
    generic_path: Path | None = None,
    *,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Load everything (I/O) and build the report."""
    ruleset = load_rules(list(rule_dirs), attribution=attribution)
    return build_report(
        ruleset.rules,
        load_lolrmm(reference),
        load_generic_signers(generic_path),
        now=now,
        problems=[str(p) for p in ruleset.problems],
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.catalog.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--rules", type=Path, action="append", help="rules directory (default: the shipped one)")
    parser.add_argument(
        "--reference", type=Path, help=f"reference folder (default: ${REFERENCE_ENV} or {DEFAULT_REFERENCE_DIR})"
    )
    parser.add_argument("--attribution", type=Path, default=rule_attribution_file(), help="rule attribution file")
    parser.add_argument("--generic", type=Path, default=generic_signers_file(), help="generic signer list")
    args = parser.parse_args(argv)
    report = run(args.rules or [shipped_rules_dir()], reference_dir(args.reference), args.attribution, args.generic)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print(format_report(report), end="")
    return 1 if report["generic_signer_hits"] or report["load_problems"] or report["attacker_controlled_rules"] else 0


if __name__ == "__main__":
    sys.exit(main())

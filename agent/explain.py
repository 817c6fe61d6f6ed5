"""`rmmhunt explain FILE`: every fact about one file and, per rule, why it fires or not.
Never raises for a bad file: the facts carry the status."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.extract.authenticode import FileFacts, TrustVerifier, load_roots
from agent.rows import Device, build_rows
from agent.scanner import evidence_dict, examine_path
from agent.settings import Settings


@dataclass
class RuleVerdict:
    rule_id: str
    rule_name: str
    tool: str
    signature_index: int
    fires: bool
    why: str
    evidence: list[dict[str, Any]] = field(default_factory=list)
    excluded_by: str | None = None


@dataclass
class Explanation:
    path: str
    facts: FileFacts
    rows: list[dict[str, Any]]
    verdicts: list[RuleVerdict]

    @property
    def fires(self) -> bool:
        return any(v.fires and not v.excluded_by for v in self.verdicts)

    def as_dict(self) -> dict[str, Any]:
        f = self.facts
        return {
            "path": self.path,
            "status": f.status,
            "kind": f.kind,
            "size": f.size,
            "detail": f.detail,
            "warnings": list(f.warnings),
            "sha1": f.sha1,
            "sha256": f.sha256,
            "rows": self.rows,
            "rules": [v.__dict__ for v in self.verdicts],
        }

    def text(self) -> str:
        f = self.facts
        out = [f"file      {self.path}", f"status    {f.status}" + (f" ({f.detail})" if f.detail else "")]
        out += [f"kind      {f.kind or '-'}", f"size      {f.size}"]
        if f.sha256:
            out += [f"sha1      {f.sha1}", f"sha256    {f.sha256}"]
        for w in f.warnings:
            out.append(f"warning   {w}")
        for sig in f.signatures:
            c = sig.signer
            out += [
                "",
                f"signature #{sig.index} ({sig.signature_type}, {sig.digest_algorithm})",
                f"  Signer            {c.display_name}",
                f"  SignerSubject     {c.subject}",
                f"  SignerHash        {c.sha1}",
                f"  Issuer            {c.issuer_display_name}",
                f"  IssuerSubject     {c.issuer}",
                f"  IssuerHash        {sig.issuer_hash or '-'}",
                f"  Serial            {c.serial_number}",
                f"  Valid             {c.not_before.isoformat()} .. {c.not_after.isoformat()}",
                f"  CRL               {', '.join(c.crl_urls) or '-'}",
                f"  ProgramName       {sig.program_name or '-'}",
                f"  Countersignature  {sig.countersignature_time.isoformat() if sig.countersignature_time else '-'}",
                f"  DigestValid       {sig.digest_valid}",
                f"  Verification      {sig.verification_status}"
                + (f": {sig.verification_error}" if sig.verification_error else ""),
                f"  IsTrusted         {sig.is_trusted}",
                f"  RootIsMicrosoft   {sig.is_root_microsoft}",
            ]
        firing = [v for v in self.verdicts if v.fires]
        out += ["", f"rules: {len(firing)} fire, {len(self.verdicts) - len(firing)} do not"]
        for v in firing:
            ev = "; ".join(f"{e['column']} {e['operator']} {e['pattern']!r} (value {e['value']!r})" for e in v.evidence)
            state = f"EXCLUDED by {v.excluded_by}" if v.excluded_by else "FIRES"
            out.append(f"  {state}  {v.rule_name} [{v.rule_id}] sig #{v.signature_index}: {ev}")
        quiet = [v for v in self.verdicts if not v.fires]
        if quiet and f.signatures:
            out.append("  not firing:")
            for v in quiet:
                out.append(f"    {v.tool}: {v.why}")
        elif not f.signatures:
            out.append(f"  no rule can fire: the file has no signer rows ({f.status})")
        return "\n".join(out) + "\n"


def _why_not(rule: Any, row: dict[str, Any]) -> str:
    patterns = getattr(rule.query, "string_patterns", ())
    if not patterns:
        return "row filter is false"
    shown = ", ".join(f"{col} {op} {pat!r}" for col, op, pat in patterns[:6])
    values = {col for col, _op, _pat in patterns}
    current = ", ".join(f"{col}={row.get(col)!r}" for col in sorted(values))
    return f"{current} does not satisfy {shown}"


def explain_file(
    path: str, settings: Settings, rules: Sequence[Any], exclusions: Sequence[Any], device: Device
) -> Explanation:
    verifier = TrustVerifier(load_roots(settings.trusted_roots)) if settings.verify else None
    status, examined, detail, ident = examine_path(
        path,
        (0, 0, 0, 0),
        verifier=verifier,
        max_file_size=settings.max_file_size,
        time_budget=settings.file_time_budget,
    )
    facts = examined if examined is not None else FileFacts(status, "", ident[2], detail=detail)
    now = dt.datetime.now(dt.UTC)
    rows = build_rows(facts, os.path.abspath(path), device, now, "scan")
    verdicts = []
    for row in rows:
        for rule in rules:
            evidence = rule.query.filter_row(row, now=now)
            if evidence is None:
                verdicts.append(
                    RuleVerdict(rule.id, rule.name, rule.tool, row["SignatureIndex"], False, _why_not(rule, row))
                )
                continue
            excluded = next((e.id for e in exclusions if e.applies(row, rule.id)), None)
            verdicts.append(
                RuleVerdict(
                    rule.id,
                    rule.name,
                    rule.tool,
                    row["SignatureIndex"],
                    True,
                    "row filter holds",
                    [evidence_dict(e) for e in evidence],
                    excluded,
                )
            )
    return Explanation(os.path.abspath(path), facts, rows, verdicts)

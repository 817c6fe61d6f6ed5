"""`rmmhunt explain FILE`: every fact about one file on one screen.

The file's facts and hashes; each signature with its chain (subject, issuer, validity, root)
and the verification result in words; the rules that fire with their evidence as text; a
one-line count of the rules that do not (``--all`` lists them). Never raises for a bad file:
the facts carry the status.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.extract.authenticode import FileFacts, SignatureFacts, TrustVerifier, load_roots
from agent.rows import Device, build_rows
from agent.scanner import evidence_dict, examine_path
from agent.settings import Settings
from agent.textenc import display, escape_path
from agent.views.records import BROKEN, NOT_VERIFIED, TRUSTED, UNTRUSTED, row_record, trust_verdict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChainLink:
    subject: str  # simple display name
    issuer: str
    not_before: dt.datetime
    not_after: dt.datetime
    sha1: str


@dataclass(frozen=True)
class Chain:
    """The certificate path of one signature, leaf first, and what its root is."""

    links: tuple[ChainLink, ...]
    root: str  # words: "trusted root X", "X (self-signed, not a trusted root)", "issuer X not found"
    validated: bool  # the path was validated by signify against the trusted roots


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


def evidence_text(evidence: dict[str, Any]) -> str:
    """One piece of evidence as text: ``Signer has "MMSoft Design" (value "MMSoft Design Ltd.")``."""
    pattern, value = _value_text(evidence["pattern"]), _value_text(evidence["value"])
    return f"{evidence['column']} {evidence['operator']} {pattern} (value {value})"


def _value_text(value: Any) -> str:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    if isinstance(value, (list, tuple)):
        if len(value) == 2 and all(isinstance(v, dt.datetime) for v in value):
            return f"{_value_text(value[0])} .. {_value_text(value[1])}"
        return "(" + ", ".join(_value_text(v) for v in value) + ")"
    if isinstance(value, str):
        return '"' + display(value) + '"'
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


VERDICT_WORDS = {
    TRUSTED: "trusted: the file digest matches and the chain reaches a trusted root",
    BROKEN: "signature broken: the file was changed after it was signed (digest mismatch)",
    UNTRUSTED: "untrusted chain: the digest matches but the chain does not reach a trusted root",
    NOT_VERIFIED: "not verified (verification switched off)",
}


@dataclass
class Explanation:
    path: str
    facts: FileFacts
    rows: list[dict[str, Any]]
    verdicts: list[RuleVerdict]
    chains: dict[int, Chain] = field(default_factory=dict)

    @property
    def fires(self) -> bool:
        return any(v.fires and not v.excluded_by for v in self.verdicts)

    def as_dict(self) -> dict[str, Any]:
        f = self.facts
        return {
            "path": escape_path(self.path),
            "status": f.status,
            "kind": f.kind,
            "size": f.size,
            "detail": f.detail,
            "warnings": list(f.warnings),
            "sha1": f.sha1,
            "sha256": f.sha256,
            "signatures": [
                {
                    "index": row["SignatureIndex"],
                    "signer": row["Signer"],
                    "trust": trust_verdict(row),
                    "verification_status": row["VerificationStatus"],
                    "verification_error": next(
                        (s.verification_error for s in f.signatures if s.index == row["SignatureIndex"]), ""
                    ),
                    "chain": [link.__dict__ for link in self.chains[row["SignatureIndex"]].links]
                    if row["SignatureIndex"] in self.chains
                    else [],
                    "root": self.chains[row["SignatureIndex"]].root if row["SignatureIndex"] in self.chains else "",
                }
                for row in self.rows
            ],
            "rows": [row_record(r) for r in self.rows],
            "rules": [v.__dict__ for v in self.verdicts],
        }

    def text(self, *, all_rules: bool = False) -> str:
        f = self.facts
        out = [f"file     {escape_path(self.path)}"]
        status = f"{f.status}" + (f" ({display(f.detail)})" if f.detail else "")
        out.append(f"status   {status}; {f.kind or 'not PE/MSI'}, {f.size} bytes")
        if f.sha256:
            out += [f"sha256   {f.sha256}", f"sha1     {f.sha1}"]
        for w in f.warnings:
            out.append(f"warning  {display(w)}")
        sigs = {s.index: s for s in f.signatures}
        for row in self.rows:
            out += self._signature_lines(row, sigs.get(row["SignatureIndex"]))
        firing = [v for v in self.verdicts if v.fires]
        quiet = [v for v in self.verdicts if not v.fires]
        out.append("")
        if not f.signatures:
            out.append(f"rules: none can fire: the file has no signer rows ({f.status})")
            return "\n".join(out) + "\n"
        rule_count = len({v.rule_id for v in self.verdicts})
        fired_ids = {v.rule_id for v in firing}
        out.append(
            f"rules: {len(fired_ids)} of {rule_count} fire"
            + ("" if all_rules else f"; {rule_count - len(fired_ids)} do not (--all lists them)")
        )
        for v in firing:
            state = f"EXCLUDED by {v.excluded_by}" if v.excluded_by else "FIRES"
            out.append(
                f"  {state}  {display(v.tool)}: {display(v.rule_name)} [{v.rule_id}] (signature {v.signature_index})"
            )
            for e in v.evidence:
                out.append(f"      {evidence_text(e)}")
        if all_rules:
            for v in quiet:
                out.append(
                    f"  no     {display(v.tool)} [{v.rule_id}] (signature {v.signature_index}): {display(v.why)}"
                )
        return "\n".join(out) + "\n"

    def _signature_lines(self, row: dict[str, Any], sig: SignatureFacts | None) -> list[str]:
        verdict = trust_verdict(row)
        signed = row.get("CertificateCountersignatureTime")
        out = [
            "",
            f"signature {row['SignatureIndex']}  {row['SignatureType']}"
            + (f", {sig.digest_algorithm}" if sig else "")
            + (f", signed {_value_text(signed)} (countersignature)" if signed else ", no countersignature time"),
            f"  Signer    {display(row['Signer'])}   (SignerHash {row['SignerHash']})",
            f"  Subject   {display(row['SignerSubject'])}",
            f"  Program   {display(row['ProgramName']) or '-'}",
            f"  Trust     {VERDICT_WORDS[verdict]}",
        ]
        if sig is not None and sig.verification_status not in ("OK", "NOT_VERIFIED"):
            error = f": {_clip(display(sig.verification_error), 240)}" if sig.verification_error else ""
            out.append(f"            signify: {sig.verification_status}{error}")
        if verdict != TRUSTED:
            out.append(
                f'  WARNING   not a trusted signature: the signer name "{display(row["Signer"])}" cannot be taken at '
                "face value (anyone can issue a certificate with any name)"
            )
        chain = self.chains.get(row["SignatureIndex"])
        if chain is not None:
            out.append("  chain     (leaf first)" + ("" if chain.validated else ", as carried in the signature"))
            for link in chain.links:
                out.append(
                    f"    {display(link.subject)}  <- {display(link.issuer)}  "
                    f"{link.not_before:%Y-%m-%d} .. {link.not_after:%Y-%m-%d}"
                )
            out.append(f"    root: {display(chain.root)}")
        return out


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _why_not(rule: Any, row: dict[str, Any]) -> str:
    patterns = getattr(rule.query, "string_patterns", ())
    if not patterns:
        return "row filter is false"
    shown = ", ".join(f"{col} {op} {_value_text(pat)}" for col, op, pat in patterns[:6])
    values = {col for col, _op, _pat in patterns}
    current = ", ".join(f"{col}={_value_text(row.get(col))}" for col in sorted(values))
    return f"{current} does not satisfy {shown}"


def _link(cert: Any) -> ChainLink:
    from agent.extract.certinfo import parse_certificate

    ident = parse_certificate(cert.to_der)
    return ChainLink(ident.display_name, ident.issuer_display_name, ident.not_before, ident.not_after, ident.sha1)


def explain_chains(path: str, verifier: TrustVerifier | None) -> dict[int, Chain]:
    """The certificate chain of each signature of one file, from signify: the path signify
    validates to a trusted root when there is one, else the path the signature's own
    certificates form. Never raises: an unreadable or unparsable file has no chains."""
    try:
        return _chains(path, verifier)
    except Exception:  # explain_* returns what it can
        log.debug("no chain for %s", path, exc_info=True)
        return {}


def _chains(path: str, verifier: TrustVerifier | None) -> dict[int, Chain]:
    from signify.authenticode.signed_file.msi import SignedMsiFile
    from signify.authenticode.signed_file.pe import SignedPEFile
    from signify.x509 import VerificationContext

    chains: dict[int, Chain] = {}
    with open(path, "rb") as stream:
        head = stream.read(8)
        stream.seek(0)
        signed: Any = SignedMsiFile(stream) if head.startswith(b"\xd0\xcf\x11\xe0") else SignedPEFile(stream)
        for index, sig in enumerate(signed.iter_embedded_signatures(include_nested=True, ignore_parse_errors=True)):
            si = sig.signer_info
            leaf = sig.certificates.find_certificate(issuer=si.issuer, serial_number=si.serial_number)
            validated: list[Any] = []
            if verifier is not None:
                ctx = VerificationContext(verifier.store, sig.certificates, extended_key_usages=["code_signing"])
                try:
                    validated = list(ctx.verify(leaf))  # root first
                except Exception:
                    validated = []
            if validated:
                links = tuple(_link(c) for c in reversed(validated))
                chains[index] = Chain(links, f"trusted root {links[-1].subject}", True)
                continue
            carried = [leaf]
            while len(carried) < 10:
                top = carried[-1]
                if top.subject == top.issuer:
                    break
                issuer = next(
                    (c for c in sig.certificates if c.subject == top.issuer and c not in carried),
                    None,
                )
                if issuer is None:
                    break
                carried.append(issuer)
            links = tuple(_link(c) for c in carried)
            top = carried[-1]
            if top.subject == top.issuer:
                root = f"{links[-1].subject} (self-signed, not a trusted root)"
            else:
                root = f"issuer {links[-1].issuer} not in the signature" + (
                    "" if verifier is None else " nor among the trusted roots"
                )
            chains[index] = Chain(links, root, False)
    return chains


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
        follow_symlinks=True,
        caps=settings.extract_caps,
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
    chains = explain_chains(path, verifier) if facts.signatures else {}
    return Explanation(os.path.abspath(path), facts, rows, verdicts, chains)

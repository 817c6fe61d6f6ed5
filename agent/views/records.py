"""Records for every view, built once from certificate rows and hunt results. Pure: no I/O.

Two families:

- machine records (``result_record``, ``row_record``, ``rule_record``, ``error_record``):
  Defender's PascalCase keys, the same keys on every record of a kind, paths in the
  reversible percent escape of ``agent.textenc``, booleans as booleans and "not checked"
  as None;
- ``Finding``: the people view, one per (device, file, tool), with every rule that fired
  on it, the trust verdict in words and the signing time.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.schema import COLUMN_NAMES
from agent.textenc import encodable, escape_path

# The trust verdicts of the people view, from the row's IsTrusted, DigestValid and VerificationStatus.
TRUSTED = "trusted"
BROKEN = "signature broken"
UNTRUSTED = "untrusted chain"
NOT_VERIFIED = "not verified"
VERDICTS = (TRUSTED, BROKEN, UNTRUSTED, NOT_VERIFIED)

# The published result shape of the seed rules, tagged with the rule: the keys of every result record.
RESULT_KEYS = (
    "RuleId",
    "RuleName",
    "Tool",
    "Techniques",
    "SharedWith",
    "DeviceId",
    "DeviceName",
    "FirstSeen",
    "LastSeen",
    "Report",
    "Count",
)
SUMMARY_VIEW_COLUMNS = (
    "RuleId",
    "RuleName",
    "Tool",
    "DeviceId",
    "DeviceName",
    "FirstSeen",
    "LastSeen",
    "Report",
    "Count",
)
RULE_TAG_KEYS = ("RuleId", "RuleName", "Tool", "Techniques")
ROW_KEYS = COLUMN_NAMES
DRILL_KEYS = RULE_TAG_KEYS + COLUMN_NAMES + ("Running", "Evidence")
RULE_KEYS = ("RuleId", "RuleName", "Tool", "Source", "SharedWith", "Tactics", "Techniques", "Patterns", "Path")
ERROR_KEYS = ("Path", "Status", "Detail")
PATH_KEYS = frozenset({"FolderPath", "FileName", "Path", "ProcessName"})
# Statuses that mean part of what was asked for was not examined (the scan is incomplete).
INCOMPLETE_STATUSES = ("ACCESS_DENIED", "TIMEOUT", "TOO_LARGE", "DIRECTORY_ERROR")


def is_running(row: Mapping[str, Any]) -> bool:
    """The row was observed as the image or a mapped file of a running process."""
    return row.get("ProcessId") is not None


def trust_verdict(row: Mapping[str, Any]) -> str:
    """trusted / signature broken / untrusted chain / not verified, in that order of precedence:
    a digest that does not match is broken whatever the chain; no check at all is "not verified"."""
    if row.get("IsTrusted") is True:
        return TRUSTED
    if row.get("DigestValid") is False:
        return BROKEN
    if row.get("DigestValid") is None or row.get("VerificationStatus") in ("NOT_VERIFIED", "", None):
        return NOT_VERIFIED
    return UNTRUSTED


def _text(value: Any) -> Any:
    """A str that can be written as UTF-8: lone surrogates (raw bytes) in the path escape."""
    if isinstance(value, str) and not encodable(value):
        return escape_path(value)
    return value


def row_record(row: Mapping[str, Any]) -> dict[str, Any]:
    """One certificate row for machine output: every column, in schema order.

    Paths are percent-escaped; CrlDistributionPointUrls is a list (the row table keeps it as
    a JSON string, as Defender does); IsTrusted, DigestValid and IsRootSignerMicrosoft are
    None when the signature was not verified."""
    rec: dict[str, Any] = {}
    not_checked = row.get("VerificationStatus") == "NOT_VERIFIED" or row.get("DigestValid") is None
    for key in ROW_KEYS:
        value = row.get(key)
        if key in PATH_KEYS and isinstance(value, str):
            value = escape_path(value)
        elif key == "CrlDistributionPointUrls":
            value = parse_url_list(value)
        elif key in ("IsTrusted", "IsRootSignerMicrosoft", "DigestValid") and not_checked:
            value = None
        rec[key] = _text(value)
    return rec


def parse_url_list(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    if not value:
        return []
    try:
        parsed = json.loads(value)
    except (TypeError, ValueError):
        return [str(value)]
    return [str(v) for v in parsed] if isinstance(parsed, list) else [str(parsed)]


def evidence_record(evidence: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "Column": evidence.get("column"),
        "Operator": evidence.get("operator"),
        "Pattern": evidence.get("pattern"),
        "Value": _text(evidence.get("value")),
    }


def rule_tag(rule: Any) -> dict[str, Any]:
    return {"RuleId": rule.id, "RuleName": rule.name, "Tool": rule.tool, "Techniques": list(rule.techniques)}


def result_record(result: Any) -> dict[str, Any]:
    """One hunt result in the published shape. Other columns a rule's own `extend` adds (such as
    ``rmmFileSigName``) are not kept: every record has exactly ``RESULT_KEYS``."""
    rule = result.rule
    values = result.result
    return {
        **rule_tag(rule),
        "SharedWith": list(rule.shared_with),
        **{k: values.get(k) for k in RESULT_KEYS[5:]},
    }


def drill_records(result: Any) -> list[dict[str, Any]]:
    """The rows behind one result, each carrying its rule, tool and evidence."""
    out = []
    for row in result.rows:
        rec = {**rule_tag(result.rule), **row_record(row)}
        rec["Running"] = is_running(row)
        rec["Evidence"] = [evidence_record(e) for e in row.get("Evidence", ())]
        out.append(rec)
    return out


def rule_record(rule: Any) -> dict[str, Any]:
    return {
        "RuleId": rule.id,
        "RuleName": rule.name,
        "Tool": rule.tool,
        "Source": rule.source,
        "SharedWith": list(rule.shared_with),
        "Tactics": list(rule.tactics),
        "Techniques": list(rule.techniques),
        "Patterns": [f"{col} {op} {pat}" for col, op, pat in getattr(rule.query, "string_patterns", ())],
        "Path": escape_path(str(rule.path)),
    }


def error_record(error: Mapping[str, Any]) -> dict[str, Any]:
    """A per-file or per-directory problem: {Path, Status, Detail}."""
    return {
        "Path": escape_path(str(error.get("path", error.get("Path", "")))),
        "Status": str(error.get("status", error.get("Status", ""))),
        "Detail": _text(str(error.get("detail", error.get("Detail", "")))),
    }


# --------------------------------------------------------------------------- the people view


@dataclass(frozen=True)
class RuleRef:
    id: str
    name: str
    tool: str
    source: str


@dataclass(frozen=True)
class Finding:
    """One file found with one tool's signer: what it is, where, and whether it is genuine."""

    tool: str
    techniques: tuple[str, ...]
    rules: tuple[RuleRef, ...]  # every rule that fired on this file for this tool
    signer: str
    verdict: str
    signing_time: dt.datetime | None
    path: str  # as the filesystem has it (surrogateescape str)
    sha256: str
    device_id: str
    device_name: str
    first_seen: dt.datetime
    last_seen: dt.datetime
    gone_at: dt.datetime | None = None
    running: bool = False  # seen as the image or a mapped file of a running process (Source "process")


def _latest_first(row: Mapping[str, Any]) -> tuple[Any, ...]:
    ts = row.get("Timestamp")
    stamp = ts.timestamp() if isinstance(ts, dt.datetime) else 0.0
    return (-stamp, row.get("SignatureIndex") or 0)


def findings_of(results: Iterable[Any], gone: Mapping[tuple[str, str], dt.datetime] | None = None) -> list[Finding]:
    """One Finding per (device, file, tool) over the rows behind the results: a published and a
    supplementary rule firing on one file make one Finding that lists both rules."""
    groups: dict[tuple[str, str, str, str], list[tuple[Any, Mapping[str, Any]]]] = {}
    for result in results:
        for row in result.rows:
            key = (row.get("DeviceId", ""), row.get("FolderPath", ""), row.get("SHA256", ""), result.rule.tool)
            groups.setdefault(key, []).append((result.rule, row))
    findings = []
    for (device_id, path, sha256, tool), members in groups.items():
        rules: dict[str, RuleRef] = {}
        techniques: dict[str, None] = {}
        for rule, _row in members:
            rules.setdefault(rule.id, RuleRef(rule.id, rule.name, rule.tool, rule.source))
            for technique in rule.techniques:
                techniques.setdefault(technique, None)
        rows = sorted((row for _rule, row in members), key=_latest_first)
        head = rows[0]
        stamps = [r["Timestamp"] for r in rows if isinstance(r.get("Timestamp"), dt.datetime)]
        findings.append(
            Finding(
                tool=tool,
                techniques=tuple(techniques),
                rules=tuple(sorted(rules.values(), key=lambda r: (r.source != "published", r.name, r.id))),
                signer=str(head.get("Signer", "")),
                verdict=trust_verdict(head),
                signing_time=head.get("CertificateCountersignatureTime"),
                path=path,
                sha256=sha256,
                device_id=device_id,
                device_name=str(head.get("DeviceName", "")),
                first_seen=min(stamps) if stamps else dt.datetime.min.replace(tzinfo=dt.UTC),
                last_seen=max(stamps) if stamps else dt.datetime.min.replace(tzinfo=dt.UTC),
                gone_at=(gone or {}).get((path, sha256)),
                running=any(is_running(r) for r in rows),
            )
        )
    return sorted(findings, key=lambda f: (f.tool.casefold(), f.path, f.device_name))


def finding_record(finding: Finding) -> dict[str, Any]:
    """A Finding as a machine record (for the sweep report and the dashboard)."""
    return {
        "Tool": finding.tool,
        "Techniques": list(finding.techniques),
        "RuleIds": [r.id for r in finding.rules],
        "RuleNames": [r.name for r in finding.rules],
        "Signer": _text(finding.signer),
        "TrustVerdict": finding.verdict,
        "CertificateCountersignatureTime": finding.signing_time,
        "FolderPath": escape_path(finding.path),
        "SHA256": finding.sha256,
        "DeviceId": finding.device_id,
        "DeviceName": finding.device_name,
        "FirstSeen": finding.first_seen,
        "LastSeen": finding.last_seen,
        "GoneAt": finding.gone_at,
        "Running": finding.running,
    }


@dataclass(frozen=True)
class Tally:
    by_tool: dict[str, int]
    by_verdict: dict[str, int]


def tally(findings: Sequence[Finding]) -> Tally:
    tools = Counter(f.tool for f in findings)
    verdicts = Counter(f.verdict for f in findings)
    return Tally(
        by_tool=dict(sorted(tools.items(), key=lambda kv: (-kv[1], kv[0].casefold()))),
        by_verdict={v: verdicts[v] for v in VERDICTS if verdicts[v]},
    )


def incomplete_reasons(statuses: Mapping[str, int], directory_errors: int) -> list[str]:
    """Why a scan did not cover everything it was asked to, one reason per kind (empty: complete)."""
    reasons = []
    counts = dict(statuses)
    counts["DIRECTORY_ERROR"] = directory_errors
    words = {
        "ACCESS_DENIED": "files could not be read (ACCESS_DENIED)",
        "TIMEOUT": "files exceeded the time budget (TIMEOUT)",
        "TOO_LARGE": "files were over the size cap and not examined (TOO_LARGE)",
        "DIRECTORY_ERROR": "directories could not be listed (DIRECTORY_ERROR)",
    }
    for status in INCOMPLETE_STATUSES:
        if counts.get(status):
            reasons.append(f"{counts[status]} {words[status]}")
    return reasons

"""Plain records for the bundle and its report, built from rows and hunt results (pure).

These are the sweep's own for now; the shared views (agent/views) should later provide the
per-file finding record, the trust verdict in words and the published result record, and
this module should then call them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from agent.output import plain
from agent.textenc import escape_path

PATH_FIELDS = ("FolderPath", "FileName")


def escaped_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row as JSON-ready data, path fields in the documented percent escape (agent/textenc)."""
    out = plain(dict(row))
    for key in PATH_FIELDS:
        if isinstance(out.get(key), str):
            out[key] = escape_path(out[key])
    return out


def escaped_error(err: Mapping[str, str]) -> dict[str, str]:
    return {**err, "path": escape_path(err.get("path", ""))}


def trust_words(row: Mapping[str, Any]) -> str:
    if row.get("IsTrusted"):
        return "trusted"
    if row.get("DigestValid") is False:
        return "tampered: file digest does not match the signature"
    status = row.get("VerificationStatus") or "NOT_VERIFIED"
    if status == "NOT_VERIFIED":
        return "not verified"
    return f"untrusted ({status})"


def result_records(results: Sequence[Any]) -> list[dict[str, Any]]:
    """Every rule's results in the published summarize shape, tagged with the rule."""
    return [
        plain(
            {
                "RuleId": r.rule.id,
                "RuleName": r.rule.name,
                "Tool": r.rule.tool,
                "Techniques": list(r.rule.techniques),
                "SharedWith": list(r.rule.shared_with),
                **r.result,
            }
        )
        for r in results
    ]


def file_records(results: Sequence[Any]) -> list[dict[str, Any]]:
    """The per-file view: one record per file found (path and SHA-256), with every tool and
    rule that fires on it, its signer, the trust verdict in words and the signing time.
    A sweep is offline: nothing on the swept disk is running (Running is always False)."""
    files: dict[tuple[str, str], dict[str, Any]] = {}
    for r in results:
        for row in r.rows:
            key = (row["FolderPath"], row.get("SHA256", ""))
            rec = files.get(key)
            if rec is None:
                rec = files[key] = {
                    "FolderPath": escape_path(row["FolderPath"]),
                    "FileName": escape_path(row.get("FileName", "")),
                    "SHA256": row.get("SHA256", ""),
                    "SHA1": row.get("SHA1", ""),
                    "FileSize": row.get("FileSize"),
                    "Signer": row.get("Signer", ""),
                    "SignerHash": row.get("SignerHash", ""),
                    "Issuer": row.get("Issuer", ""),
                    "IsTrusted": bool(row.get("IsTrusted")),
                    "Trust": trust_words(row),
                    "SigningTime": plain(row.get("CertificateCountersignatureTime")),
                    "Running": False,
                    "DeviceName": row.get("DeviceName", ""),
                    "DeviceId": row.get("DeviceId", ""),
                    "Tools": [],
                    "Techniques": [],
                    "RuleIds": [],
                    "RuleNames": [],
                    "ReportIds": [],
                }
            for key_name, value in (("Tools", r.rule.tool), ("RuleIds", r.rule.id), ("RuleNames", r.rule.name)):
                if value and value not in rec[key_name]:
                    rec[key_name].append(value)
            for tech in r.rule.techniques:
                if tech not in rec["Techniques"]:
                    rec["Techniques"].append(tech)
            if row.get("ReportId") not in rec["ReportIds"]:
                rec["ReportIds"].append(row.get("ReportId"))
            if row.get("IsTrusted"):  # a file is trusted when any of its signatures is
                rec["IsTrusted"], rec["Trust"] = True, "trusted"
    return sorted(files.values(), key=lambda f: (f["Tools"], f["FolderPath"]))


def tool_summary(files: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Findings by tool: technique, files, trusted/untrusted counts, running or not."""
    tools: dict[str, dict[str, Any]] = {}
    for f in files:
        for tool in f["Tools"] or ["(unattributed)"]:
            t = tools.setdefault(
                tool,
                {"Tool": tool, "Techniques": [], "Files": 0, "Trusted": 0, "Untrusted": 0, "Running": 0, "Signers": []},
            )
            t["Files"] += 1
            t["Trusted" if f["IsTrusted"] else "Untrusted"] += 1
            t["Running"] += 1 if f["Running"] else 0
            for tech in f["Techniques"]:
                if tech not in t["Techniques"]:
                    t["Techniques"].append(tech)
            if f["Signer"] not in t["Signers"]:
                t["Signers"].append(f["Signer"])
    return sorted(tools.values(), key=lambda t: t["Tool"].lower())

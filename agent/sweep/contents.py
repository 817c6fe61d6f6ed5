"""The bundle's members and manifest from a sweep outcome (pure)."""

from __future__ import annotations

import json
from typing import Any

from agent.output import plain
from agent.sweep.driver import SweepOutcome
from agent.sweep.records import escaped_error, escaped_row, file_records, result_records, tool_summary
from agent.sweep.report import render_report
from agent.textenc import escape_path


def _jsonl(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def _json(value: Any) -> bytes:
    return (json.dumps(value, ensure_ascii=False, indent=2) + "\n").encode("utf-8")


def build_manifest(outcome: SweepOutcome, *, version: str, operator_host: str, operator_user: str) -> dict[str, Any]:
    """Everything but the member hashes (bundle.seal_manifest adds those and its own hash)."""
    src = outcome.source
    return {
        "Tool": {"Name": "rmmhunt", "Version": version},
        "Source": {
            "Path": escape_path(src["path"]),
            "Kind": src["kind"],
            "ImageType": src.get("image_type", ""),
            "Size": src.get("size"),
            "SHA256": src.get("sha256", ""),
            "Volumes": src.get("volumes", []),
        },
        "Device": outcome.device.as_dict(),
        "Started": plain(outcome.started),
        "Ended": plain(outcome.ended),
        "Operator": {"Host": operator_host, "User": operator_user},
        "Rules": [{"Id": r.id, "Name": r.name, "File": r.file, "SHA256": r.sha256} for r in outcome.rules],
    }


def build_members(outcome: SweepOutcome, manifest: dict[str, Any]) -> dict[str, bytes]:
    rows = [escaped_row(r) for r in outcome.rows]
    results = result_records(outcome.results)
    files = file_records(outcome.results)
    tools = tool_summary(files)
    errors = [escaped_error(e) for e in outcome.errors]
    findings = {
        "Device": outcome.device.as_dict(),
        "Results": results,
        "Files": files,
        "Tools": tools,
        "Rows": [
            escaped_row({"RuleId": r.rule.id, "RuleName": r.rule.name, "Tool": r.rule.tool, **row})
            for r in outcome.results
            for row in r.rows
        ],
    }
    stats = {
        **outcome.stats,
        "started": plain(outcome.started),
        "ended": plain(outcome.ended),
        "wall_seconds": round((outcome.ended - outcome.started).total_seconds(), 3),
        "rules": [
            {
                "id": r.id,
                "name": r.name,
                "tool": r.tool,
                "techniques": list(r.techniques),
                "file": r.file,
                "sha256": r.sha256,
            }
            for r in outcome.rules
        ],
        "warnings": outcome.extra.get("warnings", []),
    }
    report = render_report(
        tools=tools, files=files, results=results, errors=errors, stats=outcome.stats, manifest=manifest
    )
    return {
        "rows.jsonl": _jsonl(rows),
        "findings.json": _json(findings),
        "stats.json": _json(stats),
        "errors.jsonl": _jsonl(errors),
        "report.html": report.encode("utf-8"),
    }

"""Shared helpers for the rules tests: where the reference data is and how to read it."""

from __future__ import annotations

import csv
import re
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT.parent / "shared" / "reference"
SENTINEL_DIR = REFERENCE / "sentinel_rules" / "azure-sentinel"
JISCHELL_DIR = REFERENCE / "sentinel_rules" / "jischell-msft"
MARKDOWN_DIR = JISCHELL_DIR / "ahq_markdown"

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)

_FILE_SIGNATURE_BLOCK = re.compile(r"###\s*File Signature\s*\n```[^\n]*\n(.*?)```", re.DOTALL)


def require_reference() -> None:
    if not SENTINEL_DIR.is_dir():
        pytest.fail(f"reference data not found at {REFERENCE}: shared/ must sit beside the checkout")


def markdown_queries() -> dict[str, str]:
    """Tool -> the KQL under '### File Signature' in RMM_AHQ_<Tool>.md."""
    require_reference()
    out: dict[str, str] = {}
    for path in sorted(MARKDOWN_DIR.glob("RMM_AHQ_*.md")):
        match = _FILE_SIGNATURE_BLOCK.search(path.read_text(encoding="utf-8"))
        assert match, f"no File Signature block in {path.name}"
        out[path.stem.removeprefix("RMM_AHQ_")] = match.group(1)
    return out


def jischell_queries() -> dict[str, str]:
    """Tool -> query text of the jischell YAMLs, cut out by hand because those files are not valid YAML."""
    require_reference()
    out: dict[str, str] = {}
    for path in sorted(JISCHELL_DIR.glob("rmm_*_filesig.yaml")):
        lines = path.read_text(encoding="utf-8").split("\n")
        start = next(i for i, line in enumerate(lines) if line.startswith("query: |"))
        body: list[str] = []
        for line in lines[start + 1 :]:
            if line and not line.startswith(" "):
                break
            body.append(line)
        tool = path.name.removeprefix("rmm_").removesuffix("_filesig.yaml")
        out[tool] = textwrap.dedent("\n".join(body))
    return out


def signer_rows() -> list[dict[str, str]]:
    require_reference()
    with (REFERENCE / "rmm_signers.csv").open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def crossmatch_rows() -> list[dict[str, str]]:
    require_reference()
    with (REFERENCE / "kql_has_crossmatch.csv").open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def cert_row(signer: Any, *, age: timedelta = timedelta(days=1), **extra: Any) -> dict[str, Any]:
    """A DeviceFileCertificateInfo row observed `age` before NOW."""
    row: dict[str, Any] = {
        "Timestamp": NOW - age,
        "DeviceId": "a" * 40,
        "DeviceName": "host.example.org",
        "Signer": signer,
        "ReportId": 1,
    }
    row.update(extra)
    return row

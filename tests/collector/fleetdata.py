"""Synthetic certificate rows for collector tests: signers taken from the rules' own patterns,
spread over devices and time (inside and outside the 5-day windows), some excluded."""

from __future__ import annotations

import datetime as dt
import hashlib
import random
from collections.abc import Sequence
from typing import Any

from agent.rules.loader import Rule
from agent.schema import COLUMN_NAMES, COLUMN_TYPES


def device_id(n: int) -> str:
    return hashlib.sha1(f"device-{n}".encode()).hexdigest()


def blank_row() -> dict[str, Any]:
    row: dict[str, Any] = {}
    for name in COLUMN_NAMES:
        kind = COLUMN_TYPES[name]
        row[name] = "" if kind == "string" else (False if kind == "bool" else None)
    return row


def make_row(device: int, report_id: int, signer: str, ts: dt.datetime, **extra: Any) -> dict[str, Any]:
    row = blank_row()
    digest = hashlib.sha256(f"{device}/{report_id}/{signer}".encode()).hexdigest()
    row.update(
        Timestamp=ts,
        DeviceId=device_id(device),
        DeviceName=f"host-{device}.example.org",
        SHA1=digest[:40],
        SHA256=digest,
        IsSigned=True,
        SignatureType="Embedded",
        Signer=signer,
        SignerHash=digest[-40:],
        Issuer="Test CA",
        IsTrusted=report_id % 3 != 0,
        ReportId=report_id,
        FolderPath=f"C:\\Program Files\\{signer[:20]}\\agent{report_id}.exe",
        FileName=f"agent{report_id}.exe",
        FileSize=1000 + report_id,
        Source="scan",
        Excluded=False,
    )
    row.update(extra)
    return row


def signers_of(rules: Sequence[Rule]) -> list[str]:
    out: dict[str, None] = {}
    for rule in rules:
        for label, op, pattern in rule.query.string_patterns:
            if label == "Signer" and not op.startswith("!"):
                out[pattern] = None
    return list(out)


def fleet_rows(
    rules: Sequence[Rule], now: dt.datetime, *, devices: int = 6, per_device: int = 60, seed: int = 7
) -> list[dict[str, Any]]:
    rnd = random.Random(seed)
    signers = signers_of(rules) + ["Microsoft Corporation", "Simon Tatham", "<img src=x onerror=alert(1)>"]
    rows = []
    for d in range(devices):
        for r in range(1, per_device + 1):
            ts = now - dt.timedelta(hours=rnd.uniform(-2, 24 * 8))  # some in the future, some too old
            ts = ts.replace(microsecond=rnd.randrange(1_000_000))
            extra: dict[str, Any] = {}
            if rnd.random() < 0.05:
                extra = {"Excluded": True, "ExclusionId": "known-good"}
            rows.append(make_row(d, r, rnd.choice(signers), ts, **extra))
    return rows

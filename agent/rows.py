"""Certificate rows from file facts: pure, one row per distinct signer certificate."""

from __future__ import annotations

import datetime as dt
import json
import ntpath
import posixpath
from dataclasses import dataclass
from typing import Any

from agent.extract.facts import NOT_VERIFIED, FileFacts


@dataclass(frozen=True)
class Device:
    device_id: str  # 40 lowercase hex
    device_name: str  # lowercase FQDN


@dataclass(frozen=True)
class ProcessContext:
    pid: int
    name: str
    user: str
    parent_name: str


def file_name_of(path: str) -> str:
    """Basename for POSIX and Windows paths alike (a sweep of a Windows disk runs on Linux)."""
    return ntpath.basename(path) if "\\" in path and "/" not in path else posixpath.basename(path)


def build_rows(
    facts: FileFacts,
    path: str,
    device: Device,
    timestamp: dt.datetime,
    source: str,
    process: ProcessContext | None = None,
) -> list[dict[str, Any]]:
    """Rows for one observation. ReportId is left None: the store allocates it.

    ``path`` is a surrogateescape ``str`` (agent.textenc): FolderPath and FileName keep any
    bytes exactly. IsTrusted and DigestValid are None ("not checked") when the signature was
    not verified (--no-verify), never False."""
    rows = []
    version = facts.version_info
    for sig in facts.signatures:
        cert = sig.signer
        not_verified = sig.verification_status == NOT_VERIFIED
        row: dict[str, Any] = {
            "Timestamp": timestamp,
            "DeviceId": device.device_id,
            "DeviceName": device.device_name,
            "SHA1": facts.sha1,
            "IsSigned": True,
            "SignatureType": sig.signature_type,
            "Signer": cert.display_name,
            "SignerHash": cert.sha1,
            "Issuer": cert.issuer_display_name,
            "IssuerHash": sig.issuer_hash,
            "CertificateSerialNumber": cert.serial_number,
            "CrlDistributionPointUrls": json.dumps(list(cert.crl_urls)),
            "CertificateCreationTime": cert.not_before,
            "CertificateExpirationTime": cert.not_after,
            "CertificateCountersignatureTime": sig.countersignature_time,
            "IsTrusted": None if not_verified else sig.is_trusted,  # None: "not checked", never False
            "IsRootSignerMicrosoft": sig.is_root_microsoft,
            "ReportId": None,
            "FolderPath": path,
            "FileName": file_name_of(path),
            "FileSize": facts.size,
            "SHA256": facts.sha256,
            "SignerSubject": cert.subject,
            "IssuerSubject": cert.issuer,
            "ProgramName": sig.program_name,
            "DigestValid": None if not_verified else sig.digest_valid,
            "VerificationStatus": sig.verification_status,
            "SignatureIndex": sig.index,
            "Source": source,
            "ProcessId": process.pid if process else None,
            "ProcessName": process.name if process else None,
            "ProcessUser": process.user if process else None,
            "ParentProcessName": process.parent_name if process else None,
            "Excluded": False,
            "ExclusionId": None,
            "VersionInfoCompanyName": version.company_name,
            "VersionInfoProductName": version.product_name,
            "VersionInfoProductVersion": version.product_version,
            "VersionInfoOriginalFileName": version.original_file_name,
            "VersionInfoInternalFileName": version.internal_file_name,
            "VersionInfoFileDescription": version.file_description,
        }
        rows.append(row)
    return rows

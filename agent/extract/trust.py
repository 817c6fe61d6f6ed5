"""The reusable parts of chain validation, built once per TrustVerifier (issue 12).

signify's ``VerificationContext.verify`` builds a certvalidator ``ValidationContext`` per
validation, and its ``CertificateRegistry`` indexes every trusted root again (subject names
normalised per RFC 4518, key identifiers): ~0.18 s per validation with the Microsoft bundle.
Its trusted stores answer ``cert in store`` by comparing DER with every root (~20 ms).
Here the root index is built once (:class:`RootIndex`) and every validation gets a shallow
copy of it inside a fresh context, so per-validation state (moment, usages, revocation
results, the certificates offered by the file) never outlives one validation.

:class:`CertMemo` keeps what the chain cache key needs of a certificate (digests, validity)
by its exact DER bytes, bounded by entries and bytes, so a cache hit does not re-parse the
validity of every offered certificate.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from certvalidator import ValidationContext
from certvalidator.registry import CertificateRegistry
from signify.authenticode.trust_list import CertificateTrustList
from signify.x509 import Certificate, CertificateStore
from signify.x509.context import CombinedCertificateStore

log = logging.getLogger(__name__)

CERT_MEMO_ENTRIES = 4096  # distinct certificates (a fleet sees a few hundred)
CERT_MEMO_BYTES = 8 << 20  # of DER kept as keys; a certificate over MAX_MEMO_DER is not kept
MAX_MEMO_DER = 16 * 1024


@dataclass(frozen=True, slots=True)
class CertFacts:
    """What the chain cache needs of one certificate, read once per distinct DER."""

    sha256: bytes  # digest of the DER: the identity used in cache keys
    valid_from: dt.datetime
    valid_to: dt.datetime

    def valid_at(self, moment: dt.datetime) -> bool:
        return self.valid_from <= moment <= self.valid_to

    def period(self, moment: dt.datetime) -> int:
        """-1 before the validity period, 0 within, 1 after (errors differ: "not valid
        until" / "expired")."""
        return -1 if moment < self.valid_from else (1 if moment > self.valid_to else 0)


class CertMemo:
    """An LRU of :class:`CertFacts` keyed by the certificate's exact DER bytes (never by a
    digest alone: a different certificate can never be given another's facts)."""

    def __init__(self, entries: int = CERT_MEMO_ENTRIES, max_bytes: int = CERT_MEMO_BYTES) -> None:
        self.entries = entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._memo: OrderedDict[bytes, CertFacts] = OrderedDict()

    def __len__(self) -> int:
        return len(self._memo)

    def facts(self, cert: Certificate) -> CertFacts:
        der = cert.to_der
        hit = self._memo.get(der)
        if hit is not None:
            self._memo.move_to_end(der)
            return hit
        facts = CertFacts(hashlib.sha256(der).digest(), cert.valid_from, cert.valid_to)
        if len(der) <= MAX_MEMO_DER:
            self._memo[der] = facts
            self.bytes += len(der)
            while len(self._memo) > self.entries or self.bytes > self.max_bytes:
                old, _ = self._memo.popitem(last=False)
                self.bytes -= len(old)
        return facts


class IndexedStore(CertificateStore):
    """A trusted store answering ``cert in store`` with a set of DER bytes: the same test as
    signify's (``Certificate.__eq__`` compares DER) without a scan of every root."""

    def __init__(self, certificates: Iterable[Certificate], *, trusted: bool, ctl: Any) -> None:
        super().__init__(list(certificates), trusted=trusted, ctl=ctl)
        self._ders = frozenset(c.to_der for c in self.data)

    def __contains__(self, item: object) -> bool:
        return isinstance(item, Certificate) and item.to_der in self._ders


def flatten_stores(stores: Iterable[CertificateStore]) -> Iterator[CertificateStore]:
    for store in stores:
        if isinstance(store, CombinedCertificateStore):
            yield from flatten_stores(store.stores)
        else:
            yield store


class IndexedTrustList(CertificateTrustList):
    """signify's CertificateTrustList rebuilds its dict of ~500 subjects on every
    ``find_subject`` (~8 ms, twice per validated chain to a Microsoft root): here the dict
    is built once. The trust list is immutable, the subjects are the same objects."""

    @functools.cached_property
    def _subjects(self) -> dict[str, Any]:  # type: ignore[override]
        return {subject.identifier_str: subject for subject in self.subjects}


def _indexed_ctl(ctl: Any) -> Any:
    if type(ctl) is not CertificateTrustList:
        return ctl  # a dict (legacy roots), None, or something signify added: as it is
    copy = IndexedTrustList.__new__(IndexedTrustList)
    copy.__dict__.update(ctl.__dict__)
    copy.__dict__.pop("_subjects", None)
    return copy


def indexed(store: CertificateStore) -> IndexedStore:
    """The same certificates, trust flag and trust list (CTL), indexed."""
    return IndexedStore(store, trusted=store.trusted, ctl=_indexed_ctl(store.ctl))


def _tlv(der: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER element at ``pos``; ValueError if it
    does not fit (definite lengths only: DER has no other)."""
    if pos + 2 > end:
        raise ValueError("truncated")
    tag, first = der[pos], der[pos + 1]
    if tag & 0x1F == 0x1F:
        raise ValueError("multi-byte tag")
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or pos + count > end:
            raise ValueError("bad length")
        length = int.from_bytes(der[pos : pos + count], "big")
        pos += count
    if pos + length > end:
        raise ValueError("overlong")
    return tag, pos, pos + length


def issuer_and_subject(der: bytes) -> tuple[bytes, bytes] | None:
    """The exact DER of a certificate's issuer and subject names, read without parsing the
    rest (asn1crypto parses the whole TBS: ~40 ms for the 567 Microsoft roots); None when
    the layout is not the plain X.509 one."""
    try:
        _t, pos, end = _tlv(der, 0, len(der))  # Certificate
        tag, pos, end = _tlv(der, pos, end)  # TBSCertificate
        if tag != 0x30:
            return None
        fields: list[tuple[int, int, int]] = []
        while pos < end and len(fields) < 6:
            tag, start, stop = _tlv(der, pos, end)
            fields.append((tag, pos, stop))
            pos = stop
        if fields and fields[0][0] == 0xA0:  # [0] version
            fields = fields[1:]
        if len(fields) < 5 or fields[2][0] != 0x30 or fields[4][0] != 0x30:
            return None
        (_, i0, i1), (_, s0, s1) = fields[2], fields[4]
        return der[i0:i1], der[s0:s1]
    except ValueError:
        return None


class RootIndex:
    """The trusted roots as certvalidator needs them, indexed once: every validation gets
    a registry of its own (certvalidator adds the file's certificates to it) and maps
    certvalidator's asn1 objects back to signify's certificates through ``by_asn1``.

    Two registries. The full one indexes every root by its RFC 4518 prepared subject, as
    signify's does; preparing ~570 names costs ~0.2 s, paid once per process (asn1crypto
    keeps the prepared values) and only when needed. The quick one holds the roots whose
    subject is byte-for-byte the issuer of an offered certificate (found from the raw
    DER), with every root still ending a path (``_ca_lookup``). A chain that validates
    with the quick registry validates with the full one too (it only adds paths); a
    failure is always decided on the full registry."""

    def __init__(self, roots: Iterable[Certificate]) -> None:
        self.by_asn1: dict[Any, Certificate] = {}
        for cert in roots:
            self.by_asn1.setdefault(cert.asn1, cert)
        self._base: CertificateRegistry | None = None
        self._by_subject: dict[bytes, list[Any]] | None = None
        self._odd: list[Any] = []  # roots whose DER we could not walk: always offered
        self._ca_lookup: dict[bytes, bool] = {}
        self._order: dict[int, int] = {}

    def registry(self) -> CertificateRegistry:
        """A full registry of the roots for one validation: the base is built on first use,
        then copied (a few hundred dict entries)."""
        if self._base is None:
            self._base = CertificateRegistry(trust_roots=list(self.by_asn1))
        return _copy(self._base)

    def quick_registry(self, offered: Iterable[Certificate]) -> CertificateRegistry:
        """A registry holding only the roots whose subject DER equals an offered issuer."""
        if self._by_subject is None:
            by_subject: dict[bytes, list[Any]] = {}
            for i, asn1 in enumerate(self.by_asn1):
                self._order[id(asn1)] = i
                names = issuer_and_subject(self.by_asn1[asn1].to_der)
                if names is None:
                    self._odd.append(asn1)
                else:
                    by_subject.setdefault(names[1], []).append(asn1)
                self._ca_lookup[asn1.signature] = True
            self._by_subject = by_subject
        found: dict[int, Any] = {id(a): a for a in self._odd}
        for cert in offered:
            names = issuer_and_subject(cert.to_der)
            for asn1 in self._by_subject.get(names[0], ()) if names else ():
                found[id(asn1)] = asn1
        candidates = sorted(found.values(), key=lambda a: self._order[id(a)])  # the bundle's order
        registry = CertificateRegistry(trust_roots=candidates)
        registry._ca_lookup = dict(self._ca_lookup)  # every root still ends a path, as in the full one
        return registry


def _copy(base: CertificateRegistry) -> CertificateRegistry:
    copy = CertificateRegistry.__new__(CertificateRegistry)
    copy._subject_map = {name: list(certs) for name, certs in base._subject_map.items()}
    copy._key_identifier_map = dict(base._key_identifier_map)
    copy._ca_lookup = dict(base._ca_lookup)
    return copy


class SharedRootsValidationContext(ValidationContext):
    """certvalidator's ValidationContext on a registry built from a :class:`RootIndex`.
    Everything else (moment, revocation state, the validated-path memo) is per instance,
    and an instance serves exactly one validation."""

    def __init__(self, registry: CertificateRegistry, **kwargs: Any) -> None:
        super().__init__(trust_roots=[], **kwargs)  # an empty registry costs nothing
        self.certificate_registry = registry

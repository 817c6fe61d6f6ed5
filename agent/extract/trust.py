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
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from certvalidator import ValidationContext
from certvalidator.registry import CertificateRegistry
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


def indexed(store: CertificateStore) -> IndexedStore:
    """The same certificates, trust flag and trust list (CTL), indexed."""
    return IndexedStore(store, trusted=store.trusted, ctl=store.ctl)


class RootIndex:
    """The trusted roots as certvalidator needs them, indexed once: every validation gets
    a copy of the registry (certvalidator adds the file's certificates to it) and maps
    certvalidator's asn1 objects back to signify's certificates through ``by_asn1``."""

    def __init__(self, roots: Iterable[Certificate]) -> None:
        self.by_asn1: dict[Any, Certificate] = {}
        for cert in roots:
            self.by_asn1.setdefault(cert.asn1, cert)
        self._base: CertificateRegistry | None = None

    def registry(self) -> CertificateRegistry:
        """A registry of the roots for one validation: the base is built on first use (the
        RFC 4518 name preparation of every root), then copied (a few hundred dict entries)."""
        if self._base is None:
            self._base = CertificateRegistry(trust_roots=list(self.by_asn1))
        base = self._base
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

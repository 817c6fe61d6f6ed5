"""Measured speed-ups for signify, applied in one visible place. None changes a result.

1. ``SignedData.signer_infos`` is a plain property: every access re-parses and re-validates
   every SignerInfo, and a single ``AuthenticodeSignature.verify()`` reads ``signer_info``
   about ten times (more than a third of the per-file verification time). Memoised per
   object with ``functools.cached_property``.
2. ``SignerInfo.authenticated_attributes`` / ``unauthenticated_attributes`` rebuild a dict
   from the ASN.1 on every access: ~27 rebuilds per file (~18 % of a warm verification,
   issue 12 profile). Memoised per object the same way; the ASN.1 never changes.
3. ``CertificateName.__eq__`` compares RFC 4514 strings built from every RDN (~10 %): equal
   DER encodings are equal names, so that is tested first; only unequal encodings fall
   back to signify's comparison (the result is the same either way).
4. ``Certificate.verify_signature`` loads the public key into OpenSSL on every call (~7 %):
   signify's module sees an ``oscrypto.asymmetric`` whose ``load_public_key`` is memoised
   by the key's exact DER (bounded: entries, and keys over 16 KiB are not kept).
5. ``Certificate.extensions`` decodes every extension for one EKU test per file (~11 %):
   memoised by the certificate's exact DER (bounded the same way); callers get a copy.
"""

from __future__ import annotations

import functools
import threading
import types
from collections import OrderedDict
from typing import Any

import signify.x509.certificates as signify_certificates
from oscrypto import asymmetric
from signify.pkcs7.signed_data import SignedData
from signify.pkcs7.signer_info import SignerInfo
from signify.x509.certificates import Certificate, CertificateName

MEMO_ENTRIES = 256  # distinct keys / certificates (a fleet sees a few dozen signers)
MEMO_MAX_DER = 16 * 1024  # larger inputs are computed, never kept: at most 256 x 16 KiB each

_original = SignedData.__dict__["signer_infos"]
_original_name_eq = CertificateName.__dict__["__eq__"]
_original_extensions = Certificate.__dict__["extensions"]


class _Memo:
    """A small thread-safe LRU keyed by bytes."""

    def __init__(self, entries: int = MEMO_ENTRIES) -> None:
        self.entries = entries
        self._data: OrderedDict[bytes, Any] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: bytes, compute: Any) -> Any:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        value = compute()
        if len(key) <= MEMO_MAX_DER:
            with self._lock:
                self._data[key] = value
                while len(self._data) > self.entries:
                    self._data.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


public_keys = _Memo()
extensions = _Memo()


def _load_public_key(source: Any, *args: Any, **kwargs: Any) -> Any:
    if args or kwargs or not hasattr(source, "dump"):
        return asymmetric.load_public_key(source, *args, **kwargs)
    der = source.dump()
    return public_keys.get(der, lambda: asymmetric.load_public_key(source))


class _Asymmetric(types.ModuleType):
    """``oscrypto.asymmetric`` as signify's certificates module sees it: every attribute
    is the real one except ``load_public_key``."""

    def __getattr__(self, name: str) -> Any:
        return getattr(asymmetric, name)


_asymmetric = _Asymmetric("oscrypto.asymmetric")
_asymmetric.load_public_key = _load_public_key  # type: ignore[attr-defined]


def _name_eq(self: CertificateName, other: object) -> bool:
    if isinstance(other, CertificateName) and self.asn1.dump() == other.asn1.dump():
        return True
    return bool(_original_name_eq(self, other))


def _extensions(self: Certificate) -> dict[str, Any]:
    cached = extensions.get(self.to_der, lambda: _original_extensions.fget(self))
    return dict(cached)


def _memoise(cls: type, name: str) -> bool:
    current = cls.__dict__[name]
    if isinstance(current, functools.cached_property):
        return True
    if not isinstance(current, property) or current.fget is None:
        return False  # signify changed: leave it alone
    cached = functools.cached_property(current.fget)
    cached.__set_name__(cls, name)
    setattr(cls, name, cached)
    return True


def install() -> bool:
    """Apply the speed-ups. Idempotent; returns True when all are installed."""
    ok = _memoise(SignedData, "signer_infos")
    ok = _memoise(SignerInfo, "authenticated_attributes") and ok
    ok = _memoise(SignerInfo, "unauthenticated_attributes") and ok
    CertificateName.__eq__ = _name_eq  # type: ignore[method-assign,assignment]
    if isinstance(_original_extensions, property):
        Certificate.extensions = property(_extensions)  # type: ignore[assignment,method-assign]
    else:
        ok = False
    if getattr(signify_certificates, "asymmetric", None) in (asymmetric, _asymmetric):
        signify_certificates.asymmetric = _asymmetric  # type: ignore[attr-defined]
    else:
        ok = False
    return ok


def release(signed_data: SignedData) -> None:
    """Drop one object's memoised list. Each SignerInfo refers back to its SignedData, so
    the list makes a reference cycle that only the cyclic garbage collector would free;
    releasing it when a file is done frees the file's objects at once, keeping memory
    per file bounded (the memo lives exactly as long as the file is being examined)."""
    signed_data.__dict__.pop("signer_infos", None)

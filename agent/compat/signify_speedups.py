"""One measured speed-up for signify, applied in one visible place.

signify's ``SignedData.signer_infos`` is a plain property: every access re-parses and
re-validates every SignerInfo (authenticated attributes included), and a single
``AuthenticodeSignature.verify()`` reads ``signer_info`` about ten times. Profiling put
that at more than a third of the per-file verification time. A parsed SignedData never
changes, so the list is memoised per object with ``functools.cached_property``. The
values are the same objects signify would build; only the repetition goes.
"""

from __future__ import annotations

import functools

from signify.pkcs7.signed_data import SignedData

_original = SignedData.__dict__["signer_infos"]


def install() -> bool:
    """Memoise SignedData.signer_infos. Idempotent; returns True when installed."""
    current = SignedData.__dict__["signer_infos"]
    if isinstance(current, functools.cached_property):
        return True
    if not isinstance(current, property) or current.fget is None:
        return False  # signify changed: leave it alone
    cached = functools.cached_property(current.fget)
    cached.__set_name__(SignedData, "signer_infos")
    SignedData.signer_infos = cached  # type: ignore[assignment,method-assign]
    return True


def release(signed_data: SignedData) -> None:
    """Drop one object's memoised list. Each SignerInfo refers back to its SignedData, so
    the list makes a reference cycle that only the cyclic garbage collector would free;
    releasing it when a file is done frees the file's objects at once, keeping memory
    per file bounded (the memo lives exactly as long as the file is being examined)."""
    signed_data.__dict__.pop("signer_infos", None)

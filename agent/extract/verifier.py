"""The scan's TrustVerifier, built when the first signed file needs it.

Building it means importing signify, oscrypto and asn1crypto (~140 ms, most of a scan's start-up;
issue 12), which a scan that meets no PE or MSI file never needs. One holder serves the whole scan,
so every file shares the verifier's chain cache. The configured extra roots are read when the holder
is made (a missing file is still an error at start); settings validation has already parsed them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from agent.extract.authenticode import TrustVerifier


class LazyVerifier:
    """Holds what a TrustVerifier needs and builds it once, on the first :meth:`get`."""

    def __init__(self, trusted_roots: Iterable[Path] = ()) -> None:
        self._root_files = [Path(p).read_bytes() for p in trusted_roots]
        self._verifier: TrustVerifier | None = None

    @property
    def built(self) -> bool:
        return self._verifier is not None

    def get(self) -> TrustVerifier:
        if self._verifier is None:
            from signify.x509 import Certificate

            from agent.extract.authenticode import TrustVerifier

            roots: list[Certificate] = []
            for data in self._root_files:  # as authenticode.load_roots, from the bytes read at start
                roots.extend(Certificate.from_pems(data) if b"-----BEGIN" in data else [Certificate.from_der(data)])
            self._verifier = TrustVerifier(roots)
        return self._verifier


AnyVerifier = Union["TrustVerifier", LazyVerifier, None]


def resolve_verifier(verifier: AnyVerifier) -> TrustVerifier | None:
    """The TrustVerifier itself (built now if it is still lazy), or None for no verification."""
    return verifier.get() if isinstance(verifier, LazyVerifier) else verifier

"""Caps on the certificate table, checked on the raw bytes BEFORE any parser sees them.

Real Authenticode tables are a few kilobytes to a few hundred, with a handful of
certificates and one or two signatures. A hostile but valid table (199 MB, 230,000
certificates) made the parsers take 16 s and 1.8 GB. Here the table size is compared with
its cap from the header alone, and the WIN_CERTIFICATE entries and the PKCS#7 DER are
walked tag by tag (nothing materialised) to count signatures (nested ones included) and
certificates (the timestamp tokens' included), stopping at the first count over its cap.

The walk decides only about caps. Anything malformed simply ends the count; signify then
parses the bytes and reports the real error.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

MAX_CERT_TABLE_SIZE = 8 * 1024 * 1024
MAX_CERTIFICATES = 500
MAX_SIGNATURES = 32

# DER of the attribute OIDs whose values hold further ContentInfo structures.
_OID_NESTED_SIGNATURE = bytes.fromhex("060a2b060104018237020401")  # 1.3.6.1.4.1.311.2.4.1
_OID_RFC3161_TIMESTAMP = bytes.fromhex("060a2b060104018237030301")  # 1.3.6.1.4.1.311.3.3.1
_MAX_DEPTH = 48  # DER nesting the walk follows; real signatures stay under 15
_CHECK_EVERY = 4096  # TLVs between two calls of the time-budget check


class CapExceeded(ValueError):
    """The certificate table is larger or holds more than its cap allows."""


@dataclass(frozen=True)
class Caps:
    max_cert_table_size: int = MAX_CERT_TABLE_SIZE
    max_certificates: int = MAX_CERTIFICATES
    max_signatures: int = MAX_SIGNATURES


def human_size(n: int) -> str:
    """Bytes as the caps are written: 199 MB, 8 MB, 512 KB, 900 bytes."""
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if value >= 10 or value == int(value) else f"{value:.1f} {unit}"
    return f"{n} bytes"


def check_table_size(size: int, caps: Caps, what: str = "certificate table") -> None:
    if size > caps.max_cert_table_size:
        raise CapExceeded(
            f"{what} {human_size(size)} > cap {human_size(caps.max_cert_table_size)} "
            f"({size} > {caps.max_cert_table_size} bytes)"
        )


class _Malformed(Exception):
    """The walk cannot go on; the count so far stands and signify judges the bytes."""


class _Tally:
    def __init__(self, caps: Caps, tick: Callable[[], None] | None) -> None:
        self.caps = caps
        self.signatures = 0
        self.certificates = 0
        self._tick = tick
        self._steps = 0

    def step(self) -> None:
        self._steps += 1
        if self._tick is not None and self._steps % _CHECK_EVERY == 0:
            self._tick()

    def add_signature(self) -> None:
        self.signatures += 1
        if self.signatures > self.caps.max_signatures:
            raise CapExceeded(f"certificate table holds more than {self.caps.max_signatures} signatures (cap)")

    def add_certificates(self, n: int) -> None:
        self.certificates += n
        if self.certificates > self.caps.max_certificates:
            raise CapExceeded(f"certificate table holds more than {self.caps.max_certificates} certificates (cap)")


class _TLV(NamedTuple):  # a tuple: a frozen dataclass cost ~12 us of the walk per file (issue 12)
    tag: int  # first identifier octet (class, constructed bit, low tag number)
    start: int  # offset of the identifier octet
    body: int  # offset of the contents
    end: int  # offset just past the contents (and the end-of-contents octets, if any)
    indefinite: bool


def _read_tlv(buf: bytes, pos: int, limit: int, tally: _Tally, depth: int) -> _TLV:
    tally.step()
    start = pos
    if pos + 2 > limit:
        raise _Malformed
    tag = buf[pos]
    pos += 1
    if tag & 0x1F == 0x1F:  # high tag number form
        while pos < limit and buf[pos] & 0x80:
            pos += 1
        pos += 1
    if pos >= limit:
        raise _Malformed
    first = buf[pos]
    pos += 1
    if first < 0x80:
        end = pos + first
    elif first == 0x80:
        if not tag & 0x20 or depth >= _MAX_DEPTH:
            raise _Malformed
        inner = pos
        while True:  # children up to the end-of-contents octets
            if inner + 2 <= limit and buf[inner] == 0 and buf[inner + 1] == 0:
                return _TLV(tag, start, pos, inner + 2, True)
            inner = _read_tlv(buf, inner, limit, tally, depth + 1).end
    else:
        n = first & 0x7F
        if n > 8 or pos + n > limit:
            raise _Malformed
        end = pos + n + int.from_bytes(buf[pos : pos + n], "big")
        pos += n
    if end > limit:
        raise _Malformed
    return _TLV(tag, start, pos, end, False)


def _children(buf: bytes, tlv: _TLV, tally: _Tally, depth: int) -> Iterator[_TLV]:
    if depth >= _MAX_DEPTH:
        raise _Malformed
    pos = tlv.body
    stop = tlv.end - 2 if tlv.indefinite else tlv.end
    while pos < stop:
        child = _read_tlv(buf, pos, stop, tally, depth + 1)
        yield child
        pos = child.end


def _count_content_info(buf: bytes, ci: _TLV, tally: _Tally, depth: int, *, is_signature: bool) -> None:
    """ContentInfo { contentType, [0] EXPLICIT SignedData }."""
    if is_signature:
        tally.add_signature()
    explicit = [c for c in _children(buf, ci, tally, depth) if c.tag == 0xA0]
    if not explicit:
        return
    signed_data = next(_children(buf, explicit[0], tally, depth + 1), None)
    if signed_data is None or signed_data.tag != 0x30:
        return
    seen_encap = False
    for part in _children(buf, signed_data, tally, depth + 2):
        if part.tag == 0x30:
            seen_encap = True
        elif part.tag == 0xA0:  # certificates [0] IMPLICIT SET OF
            tally.add_certificates(sum(1 for _ in _children(buf, part, tally, depth + 3)))
        elif part.tag == 0x31 and seen_encap:  # signerInfos
            for signer_info in _children(buf, part, tally, depth + 3):
                _count_signer_info(buf, signer_info, tally, depth + 4)


def _count_signer_info(buf: bytes, signer_info: _TLV, tally: _Tally, depth: int) -> None:
    """SignerInfo: only the unsignedAttrs [1] can hold further signatures or certificates."""
    for part in _children(buf, signer_info, tally, depth):
        if part.tag != 0xA1:
            continue
        for attribute in _children(buf, part, tally, depth + 1):
            oid_and_values = list(_children(buf, attribute, tally, depth + 2))
            if len(oid_and_values) < 2:
                continue
            oid = buf[oid_and_values[0].start : oid_and_values[0].end]
            if oid not in (_OID_NESTED_SIGNATURE, _OID_RFC3161_TIMESTAMP):
                continue
            for value in _children(buf, oid_and_values[1], tally, depth + 3):
                if value.tag == 0x30:
                    _count_content_info(buf, value, tally, depth + 4, is_signature=oid == _OID_NESTED_SIGNATURE)


def check_pkcs7(der: bytes, caps: Caps, tally: _Tally | None = None, tick: Callable[[], None] | None = None) -> _Tally:
    """Count the signatures and certificates of one PKCS#7 ContentInfo (nested included).
    Raises CapExceeded over a cap; malformed DER just ends the count."""
    tally = tally or _Tally(caps, tick)
    try:
        top = _read_tlv(der, 0, len(der), tally, 0)
        if top.tag == 0x30:
            _count_content_info(der, top, tally, 1, is_signature=True)
    except _Malformed:
        pass
    return tally


@dataclass(frozen=True)
class WinCertificate:
    revision: int
    type: int
    certificate: bytes


def parse_win_certificates(
    table: bytes, caps: Caps, tick: Callable[[], None] | None = None
) -> tuple[list[WinCertificate], str]:
    """The WIN_CERTIFICATE entries of a PE certificate table, checked against the caps.
    Returns (entries, error): error is signify's wording for a broken entry header, after
    which signify would stop too. Raises CapExceeded."""
    check_table_size(len(table), caps)
    tally = _Tally(caps, tick)
    entries: list[WinCertificate] = []
    position = 0
    while position < len(table):
        if position + 8 > len(table):
            return entries, "Position of certificate table is beyond length of file"
        length, revision, cert_type = struct.unpack_from("<IHH", table, position)
        if length <= 8 or position + length > len(table):
            return entries, "Invalid length in certificate table header"
        if len(entries) >= caps.max_signatures:
            raise CapExceeded(f"certificate table holds more than {caps.max_signatures} entries (cap)")
        body = table[position + 8 : position + length]
        if cert_type == 2:
            check_pkcs7(body, caps, tally)
        entries.append(WinCertificate(revision, cert_type, body))
        position += length + (8 - length % 8) % 8
    return entries, ""

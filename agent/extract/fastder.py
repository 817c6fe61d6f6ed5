"""Signer facts of a signed PE from its certificate table with a small, bounds-checked DER reader.

Reads only what a row needs: the certificates' DER slices, the SignerInfo issuer and serial
(and from them the leaf certificate and the issuing CA's thumbprint), the program name, the
countersignature time, the digest algorithm, and the nested signatures. signify then runs
only to verify.

Conservative by design: anything this reader does not handle exactly as signify does
(indefinite lengths, multi-byte tags, several signers, a name that only matches after
normalisation, an unusual time form, ...) raises :class:`ParseError`, and the caller falls
back to signify for that file. Every error is a ParseError: out-of-bounds reads, bad
lengths and unknown encodings included. ``tests/extract/test_fastder.py`` checks, on every
fixture and on seeded mutations of them, that the facts equal signify's wherever signify
parses the file.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from agent.extract import sniff

if TYPE_CHECKING:
    from agent.extract.authenticode import FileFacts

__all__ = ["ParseError", "RawSignature", "parse_cert_table", "parse_content_info", "pe_facts"]

MAX_DEPTH = 4  # nested signatures within nested signatures


class ParseError(ValueError):
    """The bytes are not something this reader handles exactly; signify decides instead."""


def _oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    out = bytearray([parts[0] * 40 + parts[1]])
    for value in parts[2:]:
        chunk = [value & 0x7F]
        value >>= 7
        while value:
            chunk.append(0x80 | (value & 0x7F))
            value >>= 7
        out.extend(reversed(chunk))
    return bytes(out)


OID_SIGNED_DATA = _oid("1.2.840.113549.1.7.2")
OID_SPC_INDIRECT_DATA = _oid("1.3.6.1.4.1.311.2.1.4")
OID_TST_INFO = _oid("1.2.840.113549.1.9.16.1.4")
OID_CONTENT_TYPE = _oid("1.2.840.113549.1.9.3")
OID_MESSAGE_DIGEST = _oid("1.2.840.113549.1.9.4")
OID_SIGNING_TIME = _oid("1.2.840.113549.1.9.5")
OID_COUNTER_SIGNATURE = _oid("1.2.840.113549.1.9.6")
OID_OPUS_INFO = _oid("1.3.6.1.4.1.311.2.1.12")
OID_STATEMENT_TYPE = _oid("1.3.6.1.4.1.311.2.1.11")
OID_NESTED = _oid("1.3.6.1.4.1.311.2.4.1")
OID_TIMESTAMP_TOKEN = _oid("1.3.6.1.4.1.311.3.3.1")
DIGESTS = {
    _oid("1.3.14.3.2.26"): "sha1",
    _oid("2.16.840.1.101.3.4.2.1"): "sha256",
    _oid("2.16.840.1.101.3.4.2.2"): "sha384",
    _oid("2.16.840.1.101.3.4.2.3"): "sha512",
    _oid("1.2.840.113549.2.5"): "md5",
}
_SINGULAR_SIGNED = (OID_CONTENT_TYPE, OID_MESSAGE_DIGEST, OID_SIGNING_TIME, OID_OPUS_INFO, OID_STATEMENT_TYPE)
_SINGULAR_UNSIGNED = (OID_COUNTER_SIGNATURE, OID_TIMESTAMP_TOKEN)

SEQ, SET, INT, OID, OCTETS, NULL = 0x30, 0x31, 0x02, 0x06, 0x04, 0x05
UTCTIME, GENTIME = 0x17, 0x18
CTX0, CTX1 = 0xA0, 0xA1  # constructed [0], [1]


@dataclass(frozen=True)
class RawSignature:
    """One Authenticode signature as raw facts (nested ones are separate items, in signify's order)."""

    certificates: tuple[bytes, ...]  # DER of every certificate in the SignedData, in order
    leaf: bytes  # DER of the signer's certificate
    issuer_hash: str  # SHA-1 of the issuing CA certificate carried alongside, lowercase hex, or ""
    program_name: str
    countersignature_time: dt.datetime | None
    digest_algorithm: str  # hashlib name of the SpcIndirectDataContent digest


# --- the reader: (tag, content start, content end) triples over one bytes object
def _tlv(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    if pos + 2 > end:
        raise ParseError(f"truncated DER header at {pos}")
    tag = buf[pos]
    if tag & 0x1F == 0x1F:
        raise ParseError("multi-byte tag")
    n = buf[pos + 1]
    pos += 2
    if n & 0x80:
        k = n & 0x7F
        if k == 0:
            raise ParseError("indefinite length")
        if k > 4 or pos + k > end:
            raise ParseError("bad length")
        n = int.from_bytes(buf[pos : pos + k], "big")
        pos += k
    if pos + n > end:
        raise ParseError(f"DER value ({n} bytes at {pos}) runs past its container")
    return tag, pos, pos + n


def _items(buf: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """(tag, header start, content start, content end) of every element in [start, end)."""
    out = []
    pos = start
    while pos < end:
        tag, s, e = _tlv(buf, pos, end)
        out.append((tag, pos, s, e))
        pos = e
    return out


def _expect(item: tuple[int, int, int, int], tag: int, what: str) -> tuple[int, int]:
    if item[0] != tag:
        raise ParseError(f"{what}: tag 0x{item[0]:02x}, expected 0x{tag:02x}")
    return item[2], item[3]


def _one(buf: bytes, start: int, end: int, tag: int, what: str) -> tuple[int, int]:
    """The content of the single element filling [start, end) with that tag."""
    t, s, e = _tlv(buf, start, end)
    if e != end:
        raise ParseError(f"{what}: trailing bytes")
    if t != tag:
        raise ParseError(f"{what}: tag 0x{t:02x}, expected 0x{tag:02x}")
    return s, e


def _attributes(
    buf: bytes, start: int, end: int, singular: tuple[bytes, ...]
) -> dict[bytes, list[tuple[int, int, int, int]]]:
    out: dict[bytes, list[tuple[int, int, int, int]]] = {}
    for item in _items(buf, start, end):
        s, e = _expect(item, SEQ, "Attribute")
        parts = _items(buf, s, e)
        if len(parts) != 2:
            raise ParseError("Attribute: not (type, values)")
        oid = bytes(buf[parts[0][2] : parts[0][3]]) if parts[0][0] == OID else b""
        if not oid:
            raise ParseError("Attribute: no type")
        vs, ve = _expect(parts[1], SET, "Attribute values")
        if oid in out:
            raise ParseError("Attribute repeated")  # signify merges by name; leave it to signify
        out[oid] = _items(buf, vs, ve)
    for oid in singular:
        if oid in out and len(out[oid]) != 1:
            raise ParseError("singular attribute with several values")
    return out


def _time(buf: bytes, item: tuple[int, int, int, int]) -> dt.datetime:
    tag, _h, s, e = item
    try:
        text = bytes(buf[s:e]).decode("ascii")
    except UnicodeDecodeError as exc:
        raise ParseError("time: not ASCII") from exc
    if not text.endswith("Z") or not text[:-1].replace(".", "", 1).isdigit() or not text.isascii():
        raise ParseError("time: unusual form")
    body = text[:-1]
    try:
        if tag == UTCTIME:
            if len(body) != 12:
                raise ParseError("UTCTime: unusual form")
            year = int(body[:2])
            year += 2000 if year < 50 else 1900
            rest = body[2:]
            frac = ""
        elif tag == GENTIME:
            main, _, frac = body.partition(".")
            if len(main) != 14 or (_ and not frac):
                raise ParseError("GeneralizedTime: unusual form")
            year, rest = int(main[:4]), main[4:]
        else:
            raise ParseError("time: not a time")
        value = dt.datetime(
            year, int(rest[0:2]), int(rest[2:4]), int(rest[4:6]), int(rest[6:8]), int(rest[8:10]), tzinfo=dt.UTC
        )
    except ValueError as exc:
        raise ParseError(f"time: {exc}") from exc
    if frac:
        if len(frac) > 6:
            raise ParseError("GeneralizedTime: fraction beyond microseconds")
        value = value.replace(microsecond=int(frac.ljust(6, "0")))
    return value


@dataclass(frozen=True)
class _SignedData:
    certificates: tuple[tuple[bytes, bytes, bytes, bytes], ...]  # (der, serial content, issuer DER, subject DER)
    content_type: bytes
    content: tuple[int, int]  # the [0] EXPLICIT content's inner span
    signer: tuple[int, int]  # the SignerInfo content span


def _certificate(buf: bytes, item: tuple[int, int, int, int]) -> tuple[bytes, bytes, bytes, bytes]:
    s, e = _expect(item, SEQ, "Certificate")
    der = bytes(buf[item[1] : e])
    parts = _items(buf, s, e)
    if len(parts) != 3:
        raise ParseError("Certificate: not (tbs, algorithm, signature)")
    ts, te = _expect(parts[0], SEQ, "TBSCertificate")
    tbs = _items(buf, ts, te)
    i = 1 if tbs and tbs[0][0] == CTX0 else 0
    if len(tbs) < i + 6:
        raise ParseError("TBSCertificate: too few fields")
    serial = _expect(tbs[i], INT, "serialNumber")
    issuer = tbs[i + 2]
    subject = tbs[i + 4]
    _expect(issuer, SEQ, "issuer")
    _expect(subject, SEQ, "subject")
    return (
        der,
        bytes(buf[serial[0] : serial[1]]),
        bytes(buf[issuer[1] : issuer[3]]),
        bytes(buf[subject[1] : subject[3]]),
    )


def _signed_data(buf: bytes, start: int, end: int) -> _SignedData:
    """The SignedData inside the ContentInfo at ``start`` (bytes after it up to ``end`` are
    ignored, as asn1crypto's load does: a certificate table entry is padded)."""
    tag, s, e = _tlv(buf, start, end)
    if tag != SEQ:
        raise ParseError("ContentInfo: not a SEQUENCE")
    parts = _items(buf, s, e)
    if len(parts) != 2 or parts[0][0] != OID or bytes(buf[parts[0][2] : parts[0][3]]) != OID_SIGNED_DATA:
        raise ParseError("ContentInfo does not hold SignedData")
    cs, ce = _expect(parts[1], CTX0, "ContentInfo content")
    ss, se = _one(buf, cs, ce, SEQ, "SignedData")
    fields = _items(buf, ss, se)
    if len(fields) < 4:
        raise ParseError("SignedData: too few fields")
    _expect(fields[0], INT, "SignedData version")
    ds, de = _expect(fields[1], SET, "digestAlgorithms")
    if len(_items(buf, ds, de)) != 1:
        raise ParseError("SignedData: not exactly one digest algorithm")
    es, ee = _expect(fields[2], SEQ, "encapContentInfo")
    encap = _items(buf, es, ee)
    if len(encap) != 2 or encap[0][0] != OID:
        raise ParseError("encapContentInfo: not (type, content)")
    content_type = bytes(buf[encap[0][2] : encap[0][3]])
    xs, xe = _expect(encap[1], CTX0, "encapContentInfo content")
    certificates: list[tuple[bytes, bytes, bytes, bytes]] = []
    rest = fields[3:]
    if rest and rest[0][0] == CTX0:
        certificates = [_certificate(buf, item) for item in _items(buf, rest[0][2], rest[0][3])]
        rest = rest[1:]
    if rest and rest[0][0] == CTX1:
        raise ParseError("SignedData: crls present")
    if len(rest) != 1:
        raise ParseError("SignedData: unexpected fields")
    is_, ie = _expect(rest[0], SET, "signerInfos")
    signers = _items(buf, is_, ie)
    if len(signers) != 1:
        raise ParseError("SignedData: not exactly one signer")
    return _SignedData(tuple(certificates), content_type, (xs, xe), _expect(signers[0], SEQ, "SignerInfo"))


def _signer_info(
    buf: bytes, span: tuple[int, int], singular_signed: tuple[bytes, ...] = _SINGULAR_SIGNED
) -> tuple[bytes, bytes, dict[bytes, list[tuple[int, int, int, int]]], dict[bytes, list[tuple[int, int, int, int]]]]:
    """(issuer DER, serial content, signed attributes, unsigned attributes)."""
    fields = _items(buf, *span)
    if len(fields) < 5:
        raise ParseError("SignerInfo: too few fields")
    _expect(fields[0], INT, "SignerInfo version")
    sid = _items(buf, *_expect(fields[1], SEQ, "SignerInfo sid (only issuerAndSerialNumber is handled)"))
    if len(sid) != 2:
        raise ParseError("IssuerAndSerialNumber: not (issuer, serial)")
    _expect(sid[0], SEQ, "issuer")
    serial = _expect(sid[1], INT, "serialNumber")
    _expect(fields[2], SEQ, "digestAlgorithm")
    i = 3
    signed: dict[bytes, list[tuple[int, int, int, int]]] = {}
    unsigned: dict[bytes, list[tuple[int, int, int, int]]] = {}
    if fields[i][0] == CTX0:
        signed = _attributes(buf, fields[i][2], fields[i][3], singular_signed)
        i += 1
    if len(fields) < i + 2:
        raise ParseError("SignerInfo: too few fields")
    _expect(fields[i], SEQ, "signatureAlgorithm")
    _expect(fields[i + 1], OCTETS, "signature")
    i += 2
    if i < len(fields):
        if fields[i][0] != CTX1 or i + 1 != len(fields):
            raise ParseError("SignerInfo: unexpected fields")
        unsigned = _attributes(buf, fields[i][2], fields[i][3], _SINGULAR_UNSIGNED)
    if OID_CONTENT_TYPE not in signed or OID_MESSAGE_DIGEST not in signed:
        raise ParseError("SignerInfo: contentType or messageDigest missing")
    return (
        bytes(buf[sid[0][1] : sid[0][3]]),
        bytes(buf[serial[0] : serial[1]]),
        signed,
        unsigned,
    )


def _content_type_attr(buf: bytes, attrs: dict[bytes, list[tuple[int, int, int, int]]]) -> bytes:
    item = attrs[OID_CONTENT_TYPE][0]
    return bytes(buf[item[2] : item[3]]) if item[0] == OID else b""


def _digest_algorithm(buf: bytes, span: tuple[int, int]) -> str:
    """The digest algorithm of the SpcIndirectDataContent in the [0] content span."""
    s, e = _one(buf, *span, SEQ, "SpcIndirectDataContent")
    parts = _items(buf, s, e)
    if len(parts) != 2:
        raise ParseError("SpcIndirectDataContent: not (data, messageDigest)")
    digest = _items(buf, *_expect(parts[1], SEQ, "DigestInfo"))
    if len(digest) != 2:
        raise ParseError("DigestInfo: not (algorithm, digest)")
    _expect(digest[1], OCTETS, "digest")
    alg = _items(buf, *_expect(digest[0], SEQ, "AlgorithmIdentifier"))
    if not alg or alg[0][0] != OID or len(alg) > 2 or (len(alg) == 2 and alg[1][0] != NULL):
        raise ParseError("AlgorithmIdentifier: unusual")
    name = DIGESTS.get(bytes(buf[alg[0][2] : alg[0][3]]))
    if name is None:
        raise ParseError("unknown digest algorithm")
    return name


def _program_name(buf: bytes, attrs: dict[bytes, list[tuple[int, int, int, int]]]) -> str:
    if OID_OPUS_INFO not in attrs:
        return ""
    item = attrs[OID_OPUS_INFO][0]
    fields = _items(buf, *_expect(item, SEQ, "SpcSpOpusInfo"))
    if len(fields) > 2 or any(f[0] not in (CTX0, CTX1) for f in fields):
        raise ParseError("SpcSpOpusInfo: unusual")
    if len(fields) == 2 and fields[0][0] != CTX0:
        raise ParseError("SpcSpOpusInfo: fields out of order")
    if not fields or fields[0][0] != CTX0:
        return ""
    tag, s, e = _tlv(buf, fields[0][2], fields[0][3])
    if e != fields[0][3]:
        raise ParseError("SpcString: trailing bytes")
    raw = bytes(buf[s:e])
    try:
        if tag == 0x80:  # [0] IMPLICIT BMPString
            if len(raw) % 2:
                raise ParseError("BMPString: odd length")
            return raw.decode("utf-16-be")
        if tag == 0x81:  # [1] IMPLICIT IA5String
            return raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ParseError(f"SpcString: {exc}") from exc
    raise ParseError("SpcString: unusual choice")


def _countersignature_time(buf: bytes, unsigned: dict[bytes, list[tuple[int, int, int, int]]]) -> dt.datetime | None:
    """signify's order: an RFC 3161 token first, else a PKCS#9 countersignature's signingTime."""
    if OID_TIMESTAMP_TOKEN in unsigned:
        item = unsigned[OID_TIMESTAMP_TOKEN][0]
        sd = _signed_data(buf, item[1], item[3])
        if sd.content_type != OID_TST_INFO:
            raise ParseError("timestamp token does not hold TSTInfo")
        _issuer, _serial, signed, _unsigned = _signer_info(buf, sd.signer)
        if _content_type_attr(buf, signed) != OID_TST_INFO:
            raise ParseError("timestamp signer: unexpected content type")
        os_, oe = _one(buf, *sd.content, OCTETS, "TSTInfo wrapper")
        ts, te = _one(buf, os_, oe, SEQ, "TSTInfo")
        fields = _items(buf, ts, te)
        if len(fields) < 5 or fields[0][0] != INT or bytes(buf[fields[0][2] : fields[0][3]]) != b"\x01":
            raise ParseError("TSTInfo: unusual")
        if fields[1][0] != OID or fields[2][0] != SEQ or fields[3][0] != INT or fields[4][0] != GENTIME:
            raise ParseError("TSTInfo: unusual fields")
        return _time(buf, fields[4])
    if OID_COUNTER_SIGNATURE in unsigned:
        item = unsigned[OID_COUNTER_SIGNATURE][0]
        span = _expect(item, SEQ, "countersignature SignerInfo")
        _issuer, _serial, signed, unsigned_cs = _signer_info(buf, span)
        if OID_COUNTER_SIGNATURE in unsigned_cs or OID_TIMESTAMP_TOKEN in unsigned_cs:
            raise ParseError("countersignature of a countersignature")
        if OID_SIGNING_TIME not in signed:
            return None
        return _time(buf, signed[OID_SIGNING_TIME][0])
    return None


def _find_leaf(certs: tuple[tuple[bytes, bytes, bytes, bytes], ...], issuer: bytes, serial: bytes) -> bytes:
    found = {c[0] for c in certs if c[2] == issuer and c[1] == serial}
    if len(found) != 1:
        raise ParseError("signer certificate not found byte for byte (or ambiguous)")
    return found.pop()


def _issuer_hash(certs: tuple[tuple[bytes, bytes, bytes, bytes], ...], leaf: bytes) -> str:
    leaf_issuer = next(c[2] for c in certs if c[0] == leaf)
    others = [c for c in certs if c[0] != leaf]
    for der, _serial, _issuer, subject in others:
        if subject == leaf_issuer:
            return hashlib.sha1(der).hexdigest()
    if others:
        raise ParseError("issuing CA not found byte for byte")  # a normalised name match is signify's call
    return ""


def parse_content_info(buf: bytes, start: int = 0, end: int | None = None, depth: int = 0) -> list[RawSignature]:
    """The Authenticode signature in one ContentInfo, then its nested ones (pre-order, as signify)."""
    if depth > MAX_DEPTH:
        raise ParseError("nested signatures too deep")
    end = len(buf) if end is None else end
    sd = _signed_data(buf, start, end)
    if sd.content_type != OID_SPC_INDIRECT_DATA:
        raise ParseError("SignedData does not hold SpcIndirectDataContent")
    issuer, serial, signed, unsigned = _signer_info(buf, sd.signer)
    if _content_type_attr(buf, signed) != OID_SPC_INDIRECT_DATA:
        raise ParseError("SignerInfo: unexpected content type")
    leaf = _find_leaf(sd.certificates, issuer, serial)
    out = [
        RawSignature(
            certificates=tuple(c[0] for c in sd.certificates),
            leaf=leaf,
            issuer_hash=_issuer_hash(sd.certificates, leaf),
            program_name=_program_name(buf, signed),
            countersignature_time=_countersignature_time(buf, unsigned),
            digest_algorithm=_digest_algorithm(buf, sd.content),
        )
    ]
    for item in unsigned.get(OID_NESTED, ()):
        out.extend(parse_content_info(buf, item[1], item[3], depth + 1))
    return out


def parse_cert_table(table: bytes) -> list[RawSignature]:
    """Every signature in a PE certificate table (WIN_CERTIFICATE entries), nested ones included."""
    out: list[RawSignature] = []
    pos, end = 0, len(table)
    while pos < end:
        if pos + 8 > end:
            raise ParseError("WIN_CERTIFICATE header past the table")
        length, revision, cert_type = struct.unpack_from("<IHH", table, pos)
        if length <= 8 or pos + length > end:
            raise ParseError("invalid WIN_CERTIFICATE length")
        if revision != 0x200:
            raise ParseError(f"unknown WIN_CERTIFICATE revision {revision:#x}")
        if cert_type == 2:
            out.extend(parse_content_info(table, pos + 8, pos + length))
        pos += length + (8 - length % 8) % 8
    if not out:
        raise ParseError("no SignedData in the certificate table")
    return out


def pe_facts(stream: BinaryIO, size: int, header: bytes) -> FileFacts | None:
    """FileFacts of a signed PE without verification (no hashes), or None when signify must
    decide (anything this reader does not handle exactly, or any error)."""
    from agent.extract.authenticode import NOT_VERIFIED, FileFacts, SignatureFacts
    from agent.extract.certinfo import parse_certificate

    try:
        pe = sniff.read_pe_header(stream, size, header)
        if pe is None or pe.cert_table_size == 0 or pe.cert_table_offset + pe.cert_table_size > size:
            return None
        stream.seek(pe.cert_table_offset)
        table = stream.read(pe.cert_table_size)
        if len(table) != pe.cert_table_size:
            return None
        raws = parse_cert_table(table)
        facts: list[SignatureFacts] = []
        seen: set[str] = set()
        for index, raw in enumerate(raws):
            identity = parse_certificate(raw.leaf)
            if identity.sha1 in seen:
                continue
            seen.add(identity.sha1)
            facts.append(
                SignatureFacts(
                    index=index,
                    signer=identity,
                    issuer_hash=raw.issuer_hash,
                    program_name=raw.program_name,
                    countersignature_time=raw.countersignature_time,
                    digest_algorithm=raw.digest_algorithm,
                    digest_valid=None,
                    verification_status=NOT_VERIFIED,
                    verification_error="",
                    is_trusted=False,
                    is_root_microsoft=False,
                    signature_type="Embedded",
                )
            )
    except (ValueError, struct.error):  # ParseError, MalformedPE, a certificate asn1crypto refuses
        return None
    return FileFacts("OK", "PE", size, signatures=tuple(facts))

"""Byte surgery on the signed fixtures, for tests and the fuzz harness: locate the
certificate table, rebuild it, point the data directory at it. Pure functions over bytes."""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

from asn1crypto import cms

from agent.extract import sniff


@dataclass(frozen=True)
class TableLocation:
    datadir_at: int  # file offset of the security data directory entry (VirtualAddress, Size)
    offset: int
    size: int


def locate_table(data: bytes) -> TableLocation:
    pe = sniff.read_pe_header(io.BytesIO(data), len(data), data[:64])
    assert pe is not None and pe.cert_table_size
    security_at = 144 if pe.is_pe32_plus else 128
    return TableLocation(pe.pe_offset + 24 + security_at, pe.cert_table_offset, pe.cert_table_size)


def win_certificate(body: bytes, revision: int = 0x200, cert_type: int = 2) -> bytes:
    """One WIN_CERTIFICATE entry, padded to 8 bytes as the PE format wants."""
    entry = struct.pack("<IHH", 8 + len(body), revision, cert_type) + body
    return entry + b"\0" * ((8 - len(entry) % 8) % 8)


def with_table(data: bytes, table: bytes) -> bytes:
    """The fixture with its certificate table (at the end of the file) replaced."""
    loc = locate_table(data)
    assert loc.offset + loc.size == len(data), "the fixture's table is not at the end"
    out = bytearray(data[: loc.offset] + table)
    struct.pack_into("<II", out, loc.datadir_at, loc.offset, len(table))
    return bytes(out)


def first_pkcs7(data: bytes) -> bytes:
    loc = locate_table(data)
    (length,) = struct.unpack_from("<I", data, loc.offset)
    return data[loc.offset + 8 : loc.offset + length]


def der_tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def with_extra_certificates(pkcs7: bytes, copies: int, *, indefinite: bool = False) -> bytes:
    """The same signature with its certificates repeated ``copies`` more times: valid, huge.
    Built from the raw DER (asn1crypto would re-encode every copy: seconds per megabyte)."""
    info = cms.ContentInfo.load(pkcs7)
    signed = info["content"]
    parts = []
    for name in ("version", "digest_algorithms", "encap_content_info", "certificates", "signer_infos"):
        value = signed[name]
        if name == "certificates" and indefinite:  # BER: no length, end-of-contents octets
            parts.append(b"\xa0\x80" + value.contents * (copies + 1) + b"\0\0")
        elif name == "certificates":
            parts.append(der_tlv(0xA0, value.contents * (copies + 1)))
        else:
            parts.append(value.dump())
    signed_der = der_tlv(0x30, b"".join(parts))
    return der_tlv(0x30, info["content_type"].dump() + der_tlv(0xA0, signed_der))

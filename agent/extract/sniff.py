"""Recognise PE and MSI files by content, from the first bytes and the PE headers only."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

HEADER_BYTES = 64
OLE_MAGIC = bytes.fromhex("D0CF11E0A1B11AE1")
# Root-storage CLSIDs of Windows Installer packages, patches and transforms.
MSI_CLSIDS = frozenset(
    {
        "000C1084-0000-0000-C000-000000000046",  # installer package (.msi)
        "000C1086-0000-0000-C000-000000000046",  # patch (.msp)
        "000C1082-0000-0000-C000-000000000046",  # transform (.mst)
    }
)


class MalformedPE(ValueError):
    """The bytes start like a PE but the headers are inconsistent."""


@dataclass(frozen=True)
class PEHeader:
    pe_offset: int
    machine: int
    is_pe32_plus: bool
    cert_table_offset: int  # file offset of the Certificate Table (security directory), 0 if none
    cert_table_size: int


def classify(header: bytes) -> str | None:
    """'MZ' for a candidate PE, 'OLE' for a compound file, None otherwise (not PE)."""
    if header[:2] == b"MZ" and len(header) >= HEADER_BYTES:
        return "MZ"
    if header[:8] == OLE_MAGIC:
        return "OLE"
    return None


def read_pe_header(stream: BinaryIO, file_size: int, header: bytes) -> PEHeader | None:
    """Parse DOS + PE + optional header up to the data directory. None if not a PE image."""
    (pe_offset,) = struct.unpack_from("<I", header, 0x3C)
    if pe_offset < 0x40 or pe_offset + 24 > file_size:
        return None
    stream.seek(pe_offset)
    nt = stream.read(24)
    if len(nt) < 24 or nt[:4] != b"PE\0\0":
        return None
    machine, _sections, _ts, _sym, _nsym, opt_size, _chars = struct.unpack_from("<HHIIIHH", nt, 4)
    opt_offset = pe_offset + 24
    if opt_size < 2 or opt_offset + opt_size > file_size:
        raise MalformedPE(f"optional header ({opt_size} bytes at {opt_offset}) exceeds the file ({file_size} bytes)")
    opt = stream.read(min(opt_size, 240))
    (magic,) = struct.unpack_from("<H", opt, 0)
    if magic == 0x10B:
        rva_count_at, security_at = 92, 128
    elif magic == 0x20B:
        rva_count_at, security_at = 108, 144
    else:
        raise MalformedPE(f"unknown optional header magic 0x{magic:x}")
    cert_offset = cert_size = 0
    if len(opt) >= security_at + 8 and struct.unpack_from("<I", opt, rva_count_at)[0] >= 5:
        cert_offset, cert_size = struct.unpack_from("<II", opt, security_at)
    return PEHeader(pe_offset, machine, magic == 0x20B, cert_offset if cert_size else 0, cert_size)


def is_msi(stream: BinaryIO) -> bool:
    """True if the OLE compound file's root storage carries an installer CLSID."""
    import olefile  # signify[msi] dependency; imported lazily, only for OLE files

    stream.seek(0)
    try:
        ole = olefile.OleFileIO(stream)
    except Exception:  # not a well-formed compound file: not an MSI
        return False
    try:
        return (ole.root.clsid or "").upper() in MSI_CLSIDS
    finally:
        ole.close()

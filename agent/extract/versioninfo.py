"""Signed version information: the PE ``VS_VERSIONINFO`` resource and the MSI summary information.

These strings sit inside the bytes the Authenticode digest covers (a PE's resource section; an
MSI's streams), so when ``DigestValid`` is true they are as trustworthy as the Signer: renaming the
file does not change them. That is what makes them good rule qualifiers where a vendor signs more
than its remote-access product.

Only the resource directory is parsed (``pefile`` with ``fast_load`` then the RESOURCE directory
alone), and only the headers and the one section that holds it are read, at most
:data:`MAX_RESOURCE_BYTES`. A malformed resource is a warning, never a failure: the functions here
return empty facts and the reason instead of raising.
"""

from __future__ import annotations

import logging
import struct
from typing import Any, BinaryIO

import pefile

from agent.extract.facts import VersionInfo

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024
MAX_RESOURCE_BYTES = 16 * 1024 * 1024
MAX_STRING_CHARS = 1024  # a version string longer than this is cut (and warned about)
_RESOURCE = pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_RESOURCE"]


def _memoise_pefile_flags() -> None:
    """pefile rebuilds its flag lists from module constants for every header and section
    (``retrieve_flags``: 60 % of a parse here). They never change, so memoise them per
    (dict, prefix): measured 4.7 ms -> 2.0 ms per file on a 10-section MinGW image."""
    original = pefile.retrieve_flags
    if getattr(original, "rmmhunt_memoised", False):
        return
    memo: dict[tuple[int, Any], Any] = {}

    def retrieve_flags(flag_dict: Any, flag_filter: Any) -> Any:
        key = (id(flag_dict), flag_filter)
        if key not in memo:
            memo[key] = original(flag_dict, flag_filter)
        return memo[key]

    retrieve_flags.rmmhunt_memoised = True  # type: ignore[attr-defined]
    pefile.retrieve_flags = retrieve_flags


_memoise_pefile_flags()

# StringFileInfo key -> VersionInfo field
_KEYS = {
    "CompanyName": "company_name",
    "ProductName": "product_name",
    "ProductVersion": "product_version",
    "OriginalFilename": "original_file_name",
    "InternalName": "internal_file_name",
    "FileDescription": "file_description",
}


EMPTY = VersionInfo()


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    text = str(value).replace("\x00", "").strip()
    return text[:MAX_STRING_CHARS]


def parse_string_tables(tables: list[dict[str, str]]) -> VersionInfo:
    """VersionInfo from StringFileInfo tables (pure): the first table that has a key wins for that key."""
    found: dict[str, str] = {}
    for table in tables:
        for key, value in table.items():
            field = _KEYS.get(key)
            if field and field not in found and value:
                found[field] = value
    return VersionInfo(**found)


def _string_tables(pe: pefile.PE) -> list[dict[str, str]]:
    tables: list[dict[str, str]] = []
    for file_info in getattr(pe, "FileInfo", None) or []:
        for entry in file_info if isinstance(file_info, list) else [file_info]:
            if getattr(entry, "Key", b"") not in (b"StringFileInfo", "StringFileInfo"):
                continue
            for table in getattr(entry, "StringTable", None) or []:
                entries = getattr(table, "entries", None) or {}
                tables.append({_text(k): _text(v) for k, v in entries.items()})
    return tables


def parse_pe_version_info(data: bytes | bytearray) -> tuple[VersionInfo, tuple[str, ...]]:
    """Version info of a PE image in memory (pure): (facts, warnings). Never raises."""
    try:
        # Never pe.close(): it runs gc.collect() (~60 ms) and there is no mmap to release.
        pe = pefile.PE(data=data, fast_load=True)
        pe.parse_data_directories(directories=[_RESOURCE])
        info = parse_string_tables(_string_tables(pe))
    except Exception as exc:  # pefile raises PEFormatError and, on hostile input, anything else
        log.debug("version info: pefile failed", exc_info=True)
        return EMPTY, (f"version info not read: {type(exc).__name__}: {exc}",)
    return info, ()


def parse_resource_window(header: bytes, size: int) -> tuple[int, int] | None:
    """(file offset, length) of the section holding the resource directory, from the headers alone
    (pure; a struct walk, since a second pefile parse of the section table would double the cost)."""
    if len(header) < 0x40 or header[:2] != b"MZ":
        raise ValueError("no MZ header")
    e_lfanew = struct.unpack_from("<I", header, 0x3C)[0]
    if e_lfanew + 24 > len(header) or header[e_lfanew : e_lfanew + 4] != b"PE\x00\x00":
        raise ValueError("no PE signature within the headers read")
    sections_count, opt_size = struct.unpack_from("<H12xH", header, e_lfanew + 6)
    opt = e_lfanew + 24
    magic = struct.unpack_from("<H", header, opt)[0] if opt + 2 <= len(header) else 0
    dirs = {0x10B: opt + 96, 0x20B: opt + 112}.get(magic)
    if dirs is None:
        raise ValueError(f"unknown optional header magic {magic:#x}")
    count_at = dirs - 4
    if dirs + 8 * (_RESOURCE + 1) > opt + opt_size or count_at + 4 > len(header):
        return None  # no resource directory entry
    if struct.unpack_from("<I", header, count_at)[0] <= _RESOURCE:
        return None
    rva, dir_size = struct.unpack_from("<II", header, dirs + 8 * _RESOURCE)
    if not rva or not dir_size:
        return None
    table = opt + opt_size
    for index in range(sections_count):
        entry = table + 40 * index
        if entry + 40 > len(header):
            raise ValueError("section table extends past the headers read")
        virtual_size, virtual_address, raw_size, raw_pointer = struct.unpack_from("<IIII", header, entry + 8)
        if virtual_address <= rva < virtual_address + max(virtual_size, raw_size):
            offset = raw_pointer & ~0x1FF  # Windows rounds PointerToRawData down to 512
            return offset, min(raw_size, max(0, size - offset))
    raise ValueError("resource directory lies in no section")


def _read_headers(stream: BinaryIO, size: int) -> bytes:
    """The DOS header, PE headers and section table: exactly those bytes, at most MAX_HEADER_BYTES."""
    stream.seek(0)
    header = stream.read(min(size, 0x40))
    if len(header) < 0x40:
        return header
    e_lfanew = struct.unpack_from("<I", header, 0x3C)[0]
    if e_lfanew + 24 > min(size, MAX_HEADER_BYTES):
        return header
    header += stream.read(e_lfanew + 24 - len(header))
    sections_count, opt_size = struct.unpack_from("<H12xH", header, e_lfanew + 6)
    end = min(size, MAX_HEADER_BYTES, e_lfanew + 24 + opt_size + 40 * sections_count)
    return header + stream.read(max(0, end - len(header)))


def read_pe_version_info(stream: BinaryIO, size: int) -> tuple[VersionInfo, tuple[str, ...]]:
    """Version info of a PE stream, reading only the headers and the resource section. Never raises
    for bad content; an OSError from the stream itself propagates (the caller's file status)."""
    try:
        header = _read_headers(stream, size)
        window = parse_resource_window(header, size)
    except OSError:
        raise
    except Exception as exc:
        return EMPTY, (f"version info not read: {type(exc).__name__}: {exc}",)
    if window is None:
        return EMPTY, ()
    offset, length = window
    if length > MAX_RESOURCE_BYTES:
        return EMPTY, (f"version info not read: resource section of {length} bytes exceeds {MAX_RESOURCE_BYTES}",)
    # A sparse image: headers and the resource section at their file offsets, zeros between
    # (bytearray is calloc'd, so the untouched gap costs no resident memory).
    image = bytearray(offset + length if offset >= len(header) else max(len(header), offset + length))
    image[: len(header)] = header
    stream.seek(offset)
    image[offset : offset + length] = stream.read(length).ljust(length, b"\x00")
    return parse_pe_version_info(image)


# --- MSI -------------------------------------------------------------------------------------------


def parse_msi_version_info(summary: dict[str, str], properties: dict[str, str]) -> VersionInfo:
    """MSI facts (pure): the Property table where it has them, else the summary information
    (Author is the manufacturer, Subject the product name, Title the description)."""
    return VersionInfo(
        company_name=_text(properties.get("Manufacturer") or summary.get("author") or ""),
        product_name=_text(properties.get("ProductName") or summary.get("subject") or ""),
        product_version=_text(properties.get("ProductVersion") or ""),
        file_description=_text(summary.get("title") or ""),
    )


def _decode_msi_stream_name(name: str) -> str:
    """MSI stream names are packed two characters per code point in U+3800..U+4840."""
    out = []
    for ch in name:
        code = ord(ch)
        if 0x3800 <= code < 0x4800:
            code -= 0x3800
            out.append(_MSI_CHARS[code & 0x3F])
            out.append(_MSI_CHARS[code >> 6])
        elif 0x4800 <= code < 0x4840:
            out.append(_MSI_CHARS[code - 0x4800])
        elif code == 0x4840:
            out.append("!")  # table prefix
        else:
            out.append(ch)
    return "".join(out)


_MSI_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz._"
MAX_MSI_STREAM_BYTES = 4 * 1024 * 1024


def _msi_string_pool(ole: Any, streams: dict[str, list[str]]) -> tuple[list[str], bool] | None:
    """The string pool and whether string references are 3 bytes wide (over 64K strings)."""
    pool_path, data_path = streams.get("!_StringPool"), streams.get("!_StringData")
    if pool_path is None or data_path is None:
        return None
    pool = _read_stream(ole, pool_path)
    data = _read_stream(ole, data_path)
    if len(pool) < 4:
        return None
    codepage = struct.unpack_from("<I", pool, 0)[0]
    encoding = _codepage((codepage & 0x7FFFFFFF) if codepage else 0)
    long_refs = bool(codepage & 0x80000000)
    strings = [""]
    pos = 0
    index = 4
    while index + 4 <= len(pool):
        length, _refs = struct.unpack_from("<HH", pool, index)
        index += 4
        if length == 0 and _refs != 0 and index + 4 <= len(pool):  # a string longer than 64 KiB
            length = struct.unpack_from("<I", pool, index)[0]
            index += 4
            strings.append("")  # its extra pool slot
        strings.append(data[pos : pos + length].decode(encoding, errors="replace"))
        pos += length
    return strings, long_refs


def _codepage(value: int) -> str:
    if value in (0, 65001):
        return "utf-8"
    return f"cp{value}"


def _read_stream(ole: Any, path: list[str]) -> bytes:
    stream = ole.openstream(path)
    try:
        data: bytes = stream.read(MAX_MSI_STREAM_BYTES + 1)
    finally:
        stream.close()
    if len(data) > MAX_MSI_STREAM_BYTES:
        raise ValueError(f"MSI stream {'/'.join(path)} exceeds {MAX_MSI_STREAM_BYTES} bytes")
    return data


def _msi_properties(ole: Any) -> dict[str, str]:
    """Manufacturer, ProductName and ProductVersion from the Property table (two string columns)."""
    streams = {_decode_msi_stream_name(entry[-1]): entry for entry in ole.listdir(streams=True, storages=False)}
    table = streams.get("!Property")
    if table is None:
        return {}
    pool = _msi_string_pool(ole, streams)
    if pool is None:
        return {}
    strings, long_refs = pool
    data = _read_stream(ole, table)
    ref = 3 if long_refs else 2
    rows = len(data) // (2 * ref)
    fmt = "<I" if ref == 3 else "<H"

    def at(offset: int) -> int:
        if ref == 3:
            return int.from_bytes(data[offset : offset + 3], "little")
        return int(struct.unpack_from(fmt, data, offset)[0])

    wanted = {"Manufacturer", "ProductName", "ProductVersion"}
    out: dict[str, str] = {}
    for row in range(rows):  # column-major: every key, then every value
        key_ref, value_ref = at(row * ref), at((rows + row) * ref)
        if key_ref < len(strings) and value_ref < len(strings) and strings[key_ref] in wanted:
            out[strings[key_ref]] = strings[value_ref]
    return out


_SUMMARY_STRINGS = {2: "title", 3: "subject", 4: "author"}  # PIDSI_TITLE, PIDSI_SUBJECT, PIDSI_AUTHOR
_VT_LPSTR, _VT_LPWSTR = 30, 31


def _msi_summary(ole: Any) -> dict[str, str]:
    """Title, subject and author from the \\x05SummaryInformation property set (MS-OLEPS).

    Read here, bounded by the stream's length, not with olefile's ``get_metadata``: that parses
    every property, loops over a vector's claimed element count (up to 2**32, with no read to
    check a deadline) and catches BaseException per property, so a mutated MSI hung a scan
    (fuzz seed 1, case 3979). Only the three string properties a row needs are read."""
    if not ole.exists("\x05SummaryInformation"):
        return {}
    data = _read_stream(ole, ["\x05SummaryInformation"])
    if len(data) < 48 or data[:2] != b"\xfe\xff":
        raise ValueError("not a property set stream")
    (section,) = struct.unpack_from("<I", data, 44)
    if section + 8 > len(data):
        raise ValueError("property set section out of range")
    (count,) = struct.unpack_from("<I", data, section + 4)
    count = min(count, (len(data) - section - 8) // 8)  # each entry takes 8 bytes of the stream
    out: dict[str, str] = {}
    for i in range(count):
        pid, offset = struct.unpack_from("<II", data, section + 8 + i * 8)
        key = _SUMMARY_STRINGS.get(pid)
        start = section + offset
        if key is None or start + 8 > len(data):
            continue
        vtype, size = struct.unpack_from("<HxxI", data, start)
        if vtype == _VT_LPSTR:
            raw = data[start + 8 : start + 8 + size]
            out[key] = _text(raw.split(b"\x00", 1)[0])
        elif vtype == _VT_LPWSTR:
            raw = data[start + 8 : start + 8 + 2 * size]
            out[key] = _text(raw.decode("utf-16-le", errors="replace").split("\x00", 1)[0])
    return out


def read_msi_version_info(ole: Any) -> tuple[VersionInfo, tuple[str, ...]]:
    """Version facts of an MSI (an ``olefile.OleFileIO``). Never raises for bad content."""
    warnings: list[str] = []
    summary: dict[str, str] = {}
    properties: dict[str, str] = {}
    try:
        summary = _msi_summary(ole)
    except OSError:
        raise
    except Exception as exc:
        warnings.append(f"MSI summary information not read: {type(exc).__name__}: {exc}")
    try:
        properties = _msi_properties(ole)
    except OSError:
        raise
    except Exception as exc:
        warnings.append(f"MSI Property table not read: {type(exc).__name__}: {exc}")
    return parse_msi_version_info(summary, properties), tuple(warnings)


def read_signed_version_info(signed: Any, kind: str, size: int) -> tuple[VersionInfo, tuple[str, ...]]:
    """Version facts of a file signify opened (``SignedPEFile`` / ``SignedMsiFile``)."""
    if kind == "PE":
        return read_pe_version_info(signed.file, size)
    if kind == "MSI":
        return read_msi_version_info(signed._ole_file)
    return EMPTY, ()

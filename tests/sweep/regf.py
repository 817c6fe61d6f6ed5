"""A minimal Windows registry hive (regf) writer for tests: keys with REG_SZ values, enough for
the SYSTEM and SOFTWARE keys a sweep reads. Written from the format as dissect.regf reads it
(base block, one hbin, nk / li / vk cells); not a general-purpose writer."""

from __future__ import annotations

import struct

HBIN_HEADER = 32
NO_CELL = 0xFFFFFFFF
KEY_HIVE_ENTRY, KEY_COMP_NAME = 0x0004, 0x0020
VALUE_COMP_NAME = 0x0001
REG_SZ, REG_BINARY, REG_DWORD = 1, 3, 4


class _Cells:
    def __init__(self) -> None:
        self.data = bytearray(HBIN_HEADER)  # the hbin header is filled in at the end

    def add(self, payload: bytes) -> int:
        size = (len(payload) + 4 + 7) // 8 * 8
        offset = len(self.data)
        self.data += struct.pack("<i", -size) + payload + b"\x00" * (size - 4 - len(payload))
        return offset

    def patch(self, offset: int, payload: bytes) -> None:
        self.data[offset + 4 : offset + 4 + len(payload)] = payload


def _nk(name: str, parent: int, flags: int, subkeys: int, subkey_list: int, values: int, value_list: int) -> bytes:
    raw = name.encode("ascii")
    return (
        b"nk"
        + struct.pack("<HQII", flags | KEY_COMP_NAME, 0, 0, parent)
        + struct.pack("<II", subkeys, 0)
        + struct.pack("<II", subkey_list, NO_CELL)
        + struct.pack("<II", values, value_list)
        + struct.pack("<II", NO_CELL, NO_CELL)
        + struct.pack("<IIIII", 0, 0, 0, 0, 0)
        + struct.pack("<HH", len(raw), 0)
        + raw
    )


def build_hive(tree: dict[str, dict[str, str | int | bytes]]) -> bytes:
    """``{"Key\\\\Sub": {"Name": "text", 1 or b"raw"}}`` -> hive bytes: str values are REG_SZ, int
    values REG_DWORD, bytes REG_BINARY; intermediate keys are created."""
    keys: dict[str, dict[str, str | int | bytes]] = {"": {}}
    for path, values in tree.items():
        parts = path.split("\\")
        for i in range(1, len(parts) + 1):
            keys.setdefault("\\".join(parts[:i]), {})
        keys[path].update(values)
    children: dict[str, list[str]] = {k: [] for k in keys}
    for k in keys:
        if k:
            children[k.rpartition("\\")[0]].append(k)
    cells = _Cells()
    placeholder = _nk("x", 0, 0, 0, 0, 0, 0)
    offsets: dict[str, int] = {}

    def write(key: str, parent: int) -> int:
        name = key.rpartition("\\")[2] or "ROOT"
        me = cells.add(placeholder[:-1] + b"\x00" * (len(name) + 1))
        offsets[key] = me
        kids = [write(child, me) for child in sorted(children[key], key=str.lower)]
        subkey_list = cells.add(b"li" + struct.pack("<H", len(kids)) + b"".join(struct.pack("<I", o) for o in kids))
        value_cells = []
        for vname, value in keys[key].items():
            raw = vname.encode("ascii")
            if isinstance(value, int):  # small data lives in the value cell itself (high bit of the length)
                vk = struct.pack("<HIIIHH", len(raw), 4 | 0x80000000, value, REG_DWORD, VALUE_COMP_NAME, 0)
            else:
                kind = REG_BINARY if isinstance(value, bytes) else REG_SZ
                data = value if isinstance(value, bytes) else (value + "\x00").encode("utf-16-le")
                vk = struct.pack("<HIIIHH", len(raw), len(data), cells.add(data), kind, VALUE_COMP_NAME, 0)
            value_cells.append(cells.add(b"vk" + vk + raw))
        value_list = cells.add(b"".join(struct.pack("<I", o) for o in value_cells)) if value_cells else NO_CELL
        flags = KEY_HIVE_ENTRY if key == "" else 0
        cells.patch(me, _nk(name, parent, flags, len(kids), subkey_list, len(value_cells), value_list))
        return me

    root = write("", NO_CELL)
    size = (len(cells.data) + 4095) // 4096 * 4096
    free = size - len(cells.data)
    if free:
        cells.data += struct.pack("<i", free) + b"\x00" * (free - 4)
    cells.data[:HBIN_HEADER] = b"hbin" + struct.pack("<III", 0, size, 0) + b"\x00" * (HBIN_HEADER - 16)
    base = bytearray(4096)
    base[:48] = b"regf" + struct.pack("<IIQIIIIIII", 1, 1, 0, 1, 5, 0, 1, root, size, 1)
    checksum = 0
    for (word,) in struct.iter_unpack("<I", bytes(base[:508])):
        checksum ^= word
    base[508:512] = struct.pack("<I", checksum)
    return bytes(base) + bytes(cells.data)

"""Disk images built in the tests from the signed fixtures (never downloaded, never committed):
NTFS volumes with Debian's ntfs-3g tools (mkntfs on a file, ntfscp to copy files in without
mounting), partition tables written here (MBR and GPT), containers with qemu-img (QCOW2,
VHDX, VMDK, VHD) and ewfacquire (E01)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import uuid
import zlib
from pathlib import Path

MKNTFS = shutil.which("mkntfs") or "/usr/sbin/mkntfs"
NTFSCP = shutil.which("ntfscp") or "/usr/sbin/ntfscp"
SECTOR = 512
PART_START = 2048  # sectors: 1 MiB alignment, as partitioning tools do


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)


def ntfs_volume(path: Path, files: dict[str, Path], *, size_mb: int = 8, label: str = "RMMTEST") -> Path:
    """A raw NTFS volume holding ``files`` (name in the volume root -> host file)."""
    with open(path, "wb") as fh:
        fh.truncate(size_mb * 1024 * 1024)
    run(MKNTFS, "-F", "-f", "-q", "-L", label, str(path))
    for name, src in files.items():
        run(NTFSCP, "-q", str(path), str(src), name)
    return path


def mbr_disk(path: Path, volumes: list[Path]) -> Path:
    """A disk with an MBR partition table: one NTFS (type 0x07) partition per volume."""
    entries, data, lba = b"", [], PART_START
    for vol in volumes:
        sectors = vol.stat().st_size // SECTOR
        entries += struct.pack("<B3sB3sII", 0, b"\x00\x02\x00", 0x07, b"\xff\xff\xff", lba, sectors)
        data.append((lba, vol))
        lba += sectors
    mbr = b"\x00" * 440 + struct.pack("<IH", 0x1234ABCD, 0) + entries.ljust(64, b"\x00") + b"\x55\xaa"
    _write_disk(path, mbr, data, (lba + 1) * SECTOR)
    return path


def gpt_disk(path: Path, volumes: list[Path], names: list[str]) -> Path:
    """A disk with a protective MBR and a GPT (Microsoft basic data partitions)."""
    basic_data = uuid.UUID("ebd0a0a2-b9e5-4433-87c0-68b6b9992677").bytes_le
    lba, data, entries = PART_START, [], b""
    for vol, name in zip(volumes, names, strict=True):
        sectors = vol.stat().st_size // SECTOR
        entries += basic_data + uuid.uuid4().bytes_le + struct.pack("<QQQ", lba, lba + sectors - 1, 0)
        entries += name.encode("utf-16-le").ljust(72, b"\x00")
        data.append((lba, vol))
        lba += sectors
    entries = entries.ljust(128 * 128, b"\x00")
    last_usable = lba + 33
    total_sectors = last_usable + 1 + 33
    header = bytearray(
        struct.pack(
            "<8sIIIIQQQQ16sQIII",
            b"EFI PART",
            0x00010000,
            92,
            0,
            0,
            1,
            total_sectors - 1,
            34,
            last_usable,
            uuid.uuid4().bytes_le,
            2,
            128,
            128,
            zlib.crc32(entries),
        )
    )
    header[16:20] = struct.pack("<I", zlib.crc32(bytes(header)))
    protective = struct.pack("<B3sB3sII", 0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1, total_sectors - 1)
    mbr = b"\x00" * 446 + protective.ljust(64, b"\x00") + b"\x55\xaa"
    lba1 = bytes(header).ljust(SECTOR, b"\x00")
    _write_disk(path, mbr + lba1 + entries, data, total_sectors * SECTOR)
    return path


def _write_disk(path: Path, head: bytes, data: list[tuple[int, Path]], size: int) -> None:
    with open(path, "wb") as fh:
        fh.truncate(size)
        fh.write(head)
        for lba, vol in data:  # "dd" each volume in at its partition's offset
            fh.seek(lba * SECTOR)
            with open(vol, "rb") as src:
                shutil.copyfileobj(src, fh)


def convert(raw: Path, fmt: str, out: Path) -> Path:
    """qemu-img convert: qcow2, vhdx, vmdk or vpc (VHD)."""
    run("qemu-img", "convert", "-q", "-f", "raw", "-O", fmt, str(raw), str(out))
    return out


def e01(raw: Path, target_stem: Path) -> Path:
    """An EnCase (E01) image made non-interactively with ewfacquire -u."""
    run("ewfacquire", "-u", "-q", "-t", str(target_stem), "-c", "deflate:fast", "-S", "1GiB", str(raw))
    return target_stem.with_suffix(".E01")


def fuse_available() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("ntfs-3g") is not None and os.geteuid() == 0


def ntfs_volume_with_tree(path: Path, tree: dict[str, bytes | Path], *, size_mb: int = 16, label: str = "OS") -> Path:
    """A raw NTFS volume holding a directory tree (``"Windows/System32/config/SYSTEM"`` -> data).
    ntfscp cannot create directories, so this one is filled through an ntfs-3g (FUSE) mount of
    the volume file, unmounted before it is returned."""
    with open(path, "wb") as fh:
        fh.truncate(size_mb * 1024 * 1024)
    run(MKNTFS, "-F", "-f", "-q", "-L", label, str(path))
    mnt = path.with_name(path.name + ".mnt")
    mnt.mkdir()
    run("ntfs-3g", "-o", "no_def_opts", str(path), str(mnt))
    try:
        for rel, content in tree.items():
            dest = mnt / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(content.read_bytes() if isinstance(content, Path) else content)
    finally:
        subprocess.run(["umount", str(mnt)], check=True, capture_output=True, timeout=60)
        mnt.rmdir()
    return path

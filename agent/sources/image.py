"""Disk images through dissect.target: raw, E01, VMDK, VHD/VHDX and QCOW2 containers, their
partition tables and filesystems (NTFS, FAT, ext...), read without mounting and without
copying anything out. Each file is read as a stream straight from the image.

Paths are the paths inside the image: ``C:\\Program Files\\x.exe`` when the drive letter can
be told (a Windows installation maps its system volume), otherwise ``partition2\\dir\\x.exe``.
Windows volumes (NTFS, FAT, exFAT) use the Windows convention (backslashes).
"""

from __future__ import annotations

import logging
import stat
import struct
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from agent.extract.authenticode import FileFacts, TrustVerifier, extract_stream
from agent.extract.sniff import HEADER_BYTES, classify
from agent.sources.walk import WalkCounters, WalkItem

log = logging.getLogger(__name__)

WINDOWS_FS = frozenset({"ntfs", "fat", "exfat"})
# NTFS metadata files at the volume root: the filesystem's own structures, never user files.
NTFS_METAFILES = frozenset(
    {"$mft", "$mftmirr", "$logfile", "$volume", "$attrdef", "$bitmap", "$boot", "$badclus", "$secure", "$upcase"}
)
NTFS_METADIRS = frozenset({"$extend"})


class ImageError(Exception):
    """The file is not a disk image dissect can open (one line for the CLI)."""


@dataclass(frozen=True)
class SweptVolume:
    index: int  # 1-based, in the order dissect lists the filesystems
    prefix: str  # "C:" or "partition2"
    fs_type: str
    windows: bool
    volume_name: str  # the partition's own name (GPT name), or ""
    offset: int
    size: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "path_prefix": self.prefix,
            "filesystem": self.fs_type,
            "windows": self.windows,
            "volume_name": self.volume_name,
            "offset": self.offset,
            "size": self.size,
        }


Examined = tuple[str, FileFacts | None, str, tuple[int, int, int, int]]


def examine_stream(
    open_stream: Any,
    ident: tuple[int, int, int, int],
    *,
    verifier: TrustVerifier | None,
    max_file_size: int,
    time_budget: float,
    caps: Mapping[str, int] | None = None,
) -> Examined:
    """``examine_path`` for a file that is not a host path: same statuses, same caps and budget.
    ``open_stream()`` returns a seekable binary stream. Never raises for the file's sake."""
    size = ident[2]
    try:
        stream: BinaryIO = open_stream()
    except FileNotFoundError as exc:
        return "VANISHED", None, str(exc) or "not found in the image", ident
    except Exception as exc:  # a damaged record in the image: the file cannot be read
        return "ACCESS_DENIED", None, f"open failed: {exc}", ident
    try:
        if classify(stream.read(HEADER_BYTES)) is None:
            return "NOT_PE", None, "", ident
        if size > max_file_size:
            return "TOO_LARGE", None, f"{size} bytes > cap {max_file_size}", ident
        stream.seek(0)
        facts = extract_stream(stream, size, verifier=verifier, time_budget=time_budget, **(caps or {}))
        return facts.status, facts, facts.detail, ident
    except Exception as exc:  # read errors from the container or the filesystem driver
        return "ACCESS_DENIED", None, f"read failed: {exc}", ident
    finally:
        try:
            stream.close()
        except Exception:  # noqa: BLE001 - closing a read-only stream must not hide the result
            pass


def open_ci(fs: Any, parts: tuple[str, ...]) -> BinaryIO | None:
    """Open ``parts`` on a dissect filesystem, matching each component case-insensitively as
    Windows does; None when absent or unreadable."""
    try:
        entry = fs.get("/")
        for part in parts:
            entry = next((e.get() for e in entry.scandir() if e.name.lower() == part.lower()), None)
            if entry is None:
                return None
        return entry.open()
    except Exception:  # noqa: BLE001 - no such file in this filesystem
        return None


class ImageSource:
    """One disk image opened with dissect.target: its volumes, a walk, and a way to open each file."""

    def __init__(self, path: str) -> None:
        self.path = path
        if not log.isEnabledFor(logging.INFO):  # dissect's notes are noise without -v
            logging.getLogger("dissect").setLevel(logging.ERROR)
        try:
            from dissect.target import Target

            # Containers, partition tables and filesystems only: dissect's OS plugins (which import
            # every plugin, seconds of start-up) are not needed; the registry is read here.
            self.target = Target.open(Path(path), apply=False)
            self.target.disks.apply()
            self.target.volumes.apply()
            self.target.filesystems.apply()
        except Exception as exc:
            first = (str(exc) or type(exc).__name__).splitlines()[0]
            raise ImageError(f"{path}: not a disk image dissect can open: {first}") from exc
        filesystems = list(self.target.filesystems)
        if not filesystems:
            raise ImageError(f"{path}: no filesystem found in the image")
        self.volumes: list[SweptVolume] = []
        self._filesystems: list[Any] = filesystems
        for n, fs in enumerate(filesystems, start=1):
            fs_type = str(getattr(fs, "__type__", "") or "").lower()
            volume = getattr(fs, "volume", None)
            self.volumes.append(
                SweptVolume(
                    index=n,
                    prefix=f"partition{n}",
                    fs_type=fs_type,
                    windows=fs_type in WINDOWS_FS,
                    volume_name=str(getattr(volume, "name", "") or ""),
                    offset=int(getattr(volume, "offset", 0) or 0),
                    size=int(getattr(volume, "size", 0) or 0),
                )
            )
        self._current: tuple[str, Any] | None = None
        self.windows_volume: int | None = None  # index of the volume holding the Windows installation
        self._assign_drive_letters()

    def _assign_drive_letters(self) -> None:
        """Name the volumes of a Windows installation by their drive letters: the system volume
        from SystemRoot (SOFTWARE hive), the others from MountedDevices (SYSTEM hive: an MBR
        disk signature and partition offset, or a GPT partition GUID)."""
        from agent.sweep.identity import SOFTWARE_HIVE, SYSTEM_HIVE, parse_mounted_devices, parse_system_root

        for volume, fs in self.open_filesystems():
            if not volume.windows:
                continue
            software = open_ci(fs, SOFTWARE_HIVE)
            system = open_ci(fs, SYSTEM_HIVE)
            if software is None and system is None:
                continue
            self.windows_volume = volume.index
            letters: dict[int, str] = {}
            try:
                if software is not None:
                    with software:
                        root = parse_system_root(software)
                    if len(root) >= 2 and root[1] == ":":
                        letters[volume.index] = root[:2].upper()
                if system is not None:
                    with system:
                        mounted = parse_mounted_devices(system)
                    for other in self.volumes:
                        key = self._mount_key(other)
                        for letter, value in mounted.items():
                            if key and value == key and other.index not in letters:
                                letters[other.index] = letter
            except Exception as exc:  # noqa: BLE001 - a damaged hive: partitions keep their numbers
                log.warning("cannot read drive letters from %s: %s", self.path, exc)
            letters.setdefault(volume.index, "C:")
            self.volumes = [replace(v, prefix=letters.get(v.index, v.prefix)) for v in self.volumes]
            return

    def _mount_key(self, volume: SweptVolume) -> bytes:
        """The MountedDevices value Windows stores for this volume ("" when it cannot be told)."""
        raw = self._filesystems[volume.index - 1]
        vol = getattr(raw, "volume", None)
        guid = getattr(vol, "guid", None)
        if guid:
            try:
                return b"DMIO:ID:" + uuid.UUID(str(guid)).bytes_le
            except ValueError:
                return b""
        vs = getattr(vol, "vs", None)
        disk = getattr(vs, "fh", None) or (self.target.disks[0] if len(self.target.disks) else None)
        if vs is None or disk is None:
            return b""
        try:
            disk.seek(440)
            signature = disk.read(4)
        except Exception:  # noqa: BLE001
            return b""
        return signature + struct.pack("<Q", volume.offset)

    @property
    def image_type(self) -> str:
        """The container type(s): raw, ewf, vmdk, vhd, vhdx, qcow2..."""
        kinds = [str(getattr(d, "__type__", "") or type(d).__name__).lower() for d in self.target.disks]
        return "+".join(dict.fromkeys(kinds)) or "unknown"

    def open_filesystems(self) -> list[tuple[SweptVolume, Any]]:
        return list(zip(self.volumes, self._filesystems, strict=True))

    def display_path(self, volume: SweptVolume, inner: str) -> str:
        """The path inside the image for a filesystem path ``/a/b``."""
        rel = inner.strip("/")
        if volume.windows:
            return volume.prefix + "\\" + rel.replace("/", "\\")
        return volume.prefix + "/" + rel

    def iter_items(
        self, *, counters: WalkCounters | None = None, errors: list[tuple[str, str]] | None = None
    ) -> Iterator[WalkItem]:
        """One item per non-directory entry of every filesystem in the image. Symlinks and NTFS
        junctions are not followed; NTFS metadata files are not files to sweep."""
        counters = counters if counters is not None else WalkCounters()
        errors = errors if errors is not None else []
        for volume, fs in self.open_filesystems():
            stack = ["/"]
            while stack:
                directory = stack.pop()
                counters.directories += 1
                try:
                    entries = sorted(fs.get(directory).scandir(), key=lambda e: e.name)
                except Exception as exc:  # a damaged directory: record it and go on
                    counters.directory_errors += 1
                    errors.append((self.display_path(volume, directory), f"ACCESS_DENIED: {exc}"))
                    continue
                subdirs = []
                for entry in entries:
                    name = entry.name
                    if name in (".", ".."):
                        continue
                    if directory == "/" and volume.fs_type == "ntfs":
                        low = name.lower()
                        if low in NTFS_METAFILES or low in NTFS_METADIRS:
                            continue
                    inner = directory.rstrip("/") + "/" + name
                    shown = self.display_path(volume, inner)
                    try:
                        if entry.is_symlink() or entry.is_junction():
                            counters.symlinks_skipped += 1
                            continue
                        if entry.is_dir(follow_symlinks=False):
                            subdirs.append(inner)
                            continue
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError as exc:
                        yield WalkItem(shown, status="VANISHED", detail=str(exc) or "entry unreadable")
                        continue
                    except Exception as exc:
                        yield WalkItem(shown, status="ACCESS_DENIED", detail=f"entry unreadable: {exc}")
                        continue
                    if not stat.S_ISREG(st.st_mode):
                        yield WalkItem(shown, status="NOT_PE", detail="special file: not read")
                        continue
                    mtime_ns = int(getattr(st, "st_mtime_ns", 0) or int((st.st_mtime or 0) * 1e9))
                    self._current = (shown, entry)
                    yield WalkItem(
                        shown,
                        st_dev=volume.index,
                        st_ino=int(st.st_ino or 0),
                        size=int(st.st_size or 0),
                        mtime_ns=mtime_ns,
                    )
                stack.extend(reversed(subdirs))

    def examine(
        self,
        item: WalkItem,
        *,
        verifier: TrustVerifier | None,
        max_file_size: int,
        time_budget: float,
        caps: Mapping[str, int] | None = None,
    ) -> Examined:
        """Read one walked item from the image (the Scanner's ``examine`` hook)."""
        ident = (item.st_dev, item.st_ino, item.size, item.mtime_ns)
        current = self._current
        if current is None or current[0] != item.path:
            return "VANISHED", None, "not the entry being walked", ident
        entry = current[1]
        return examine_stream(
            lambda: entry.get().open(),
            ident,
            verifier=verifier,
            max_file_size=max_file_size,
            time_budget=time_budget,
            caps=caps,
        )

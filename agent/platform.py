"""The only module that checks sys.platform: device identity, default roots, state dir, priority."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import socket
import stat
import sys
from pathlib import Path

log = logging.getLogger(__name__)

IS_WINDOWS = sys.platform == "win32"

# Filesystems that hold no files worth scanning (kernel views, virtual, or remote).
PSEUDO_FS = frozenset(
    {
        "proc",
        "sysfs",
        "devtmpfs",
        "devpts",
        "cgroup",
        "cgroup2",
        "securityfs",
        "debugfs",
        "tracefs",
        "pstore",
        "bpf",
        "mqueue",
        "hugetlbfs",
        "configfs",
        "fusectl",
        "binfmt_misc",
        "autofs",
        "efivarfs",
        "rpc_pipefs",
        "nsfs",
        "selinuxfs",
        "ramfs",
        "nfsd",
        "fuse.gvfsd-fuse",
        "fuse.portal",
        # remote filesystems are not "local fixed" ones
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "9p",
        "fuse.sshfs",
        "afs",
        "ceph",
        "glusterfs",
    }
)
PSEUDO_ROOT_DIRS = ("/proc", "/sys", "/dev", "/run")


def machine_identity() -> str:
    """The raw stable machine identity (Linux /etc/machine-id, Windows MachineGuid)."""
    if IS_WINDOWS:
        import winreg

        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"SOFTWARE\Microsoft\Cryptography") as key:  # type: ignore[attr-defined]
            return str(winreg.QueryValueEx(key, "MachineGuid")[0])  # type: ignore[attr-defined]
    for candidate in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            text = Path(candidate).read_text().strip()
        except OSError:
            continue
        if text:
            return text
    # no machine id (minimal container): fall back to the host name, stable enough to group rows
    return "hostname:" + socket.gethostname()


def device_id_from(identity: str) -> str:
    return hashlib.sha1(identity.encode("utf-8")).hexdigest()


def default_device_name() -> str:
    """Lowercase FQDN; the plain host name when the resolver only knows 'localhost'."""
    fqdn = socket.getfqdn().lower()
    if not fqdn or fqdn.startswith("localhost") or fqdn in ("ip6-localhost", "ip6-loopback"):
        fqdn = socket.gethostname().lower()
    return fqdn


def default_state_dir() -> Path:
    if IS_WINDOWS:
        base = os.environ.get("PROGRAMDATA", r"C:\ProgramData")
        return Path(base) / "rmmhunt"
    if os.geteuid() == 0:
        return Path("/var/lib/rmmhunt")
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "rmmhunt"


def _unescape_mount(path: str) -> str:
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def linux_mounts(mountinfo: str | None = None) -> list[tuple[str, str]]:
    """(mount point, fs type) from /proc/self/mountinfo."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return []
    mounts = []
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) >= 5 and rfields:
            mounts.append((_unescape_mount(fields[4]), rfields[0]))
    return mounts


def skipped_mount_points(mounts: list[tuple[str, str]]) -> frozenset[str]:
    return frozenset(point for point, fstype in mounts if fstype in PSEUDO_FS) | frozenset(PSEUDO_ROOT_DIRS)


def default_roots() -> tuple[list[str], frozenset[str]]:
    """(roots to scan, directories never to enter)."""
    if IS_WINDOWS:
        import ctypes

        roots = []
        bitmask = ctypes.windll.kernel32.GetLogicalDrives()  # type: ignore[attr-defined]
        for i in range(26):
            if bitmask & (1 << i):
                drive = f"{chr(65 + i)}:\\"
                if ctypes.windll.kernel32.GetDriveTypeW(drive) == 3:  # type: ignore[attr-defined]  # DRIVE_FIXED
                    roots.append(drive)
        return roots, frozenset()
    return ["/"], skipped_mount_points(linux_mounts())


# openat-style operations: a walk can go deeper than PATH_MAX by opening each directory
# relative to its parent (POSIX). Windows has no dir_fd: it walks and opens by path.
RELATIVE_OPEN = os.open in os.supports_dir_fd and os.scandir in os.supports_fd and os.stat in os.supports_dir_fd

_READ_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def open_directory(name: str, *, dir_fd: int | None = None, follow_symlinks: bool = False) -> int:
    """Open a directory for listing (``name`` relative to ``dir_fd`` when given). A path longer
    than the kernel's PATH_MAX is opened one component at a time."""
    flags = _DIR_FLAGS | (0 if follow_symlinks else _NOFOLLOW)
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG or dir_fd is not None or not RELATIVE_OPEN:
            raise
    parent, base = os.path.split(name)
    parent_fd = _open_long_directory(parent)
    try:
        return os.open(base, flags, dir_fd=parent_fd)
    finally:
        os.close(parent_fd)


def _open_long_directory(path: str) -> int:
    """Open a directory whose path is longer than PATH_MAX, component by component (the
    intermediate components follow symlinks, as the kernel's own lookup would)."""
    fd = os.open(os.sep if os.path.isabs(path) else os.curdir, _DIR_FLAGS)
    try:
        for part in path.split(os.sep):
            if not part or part == os.curdir:
                continue
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular(path: str, *, dir_fd: int | None = None, follow_symlinks: bool = False) -> tuple[int, os.stat_result]:
    """Open a file for reading without ever blocking on a FIFO or device and, unless
    ``follow_symlinks``, without following a final symlink. ``path`` is relative to
    ``dir_fd`` when given; an absolute path longer than PATH_MAX is opened from its directory.
    Returns (fd, fstat).

    Raises ``SpecialFile`` for anything that is not a regular file (the fd is closed):
    a FIFO, device or socket, a symlink that is not followed, a symlink loop. A dangling
    symlink raises FileNotFoundError with the message "dangling symlink"."""
    flags = _READ_FLAGS | getattr(os, "O_NOATIME", 0) | (0 if follow_symlinks else _NOFOLLOW)
    try:
        fd = _open_noatime(path, flags, dir_fd)
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG and dir_fd is None and RELATIVE_OPEN:
            parent, base = os.path.split(path)
            parent_fd = open_directory(parent or os.curdir, follow_symlinks=True)
            try:
                return open_regular(base, dir_fd=parent_fd, follow_symlinks=follow_symlinks)
            finally:
                os.close(parent_fd)
        if exc.errno not in (errno.ELOOP, errno.ENOENT, errno.EMLINK):
            raise
        _raise_for_symlink(path, dir_fd, follow_symlinks, exc)
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise SpecialFile(special_kind(st.st_mode))
    return fd, st


def _open_noatime(path: str, flags: int, dir_fd: int | None) -> int:
    try:
        return os.open(path, flags, dir_fd=dir_fd)
    except PermissionError:
        if not flags & getattr(os, "O_NOATIME", 0):
            raise
        # O_NOATIME is refused on files we do not own unless we are privileged
        return os.open(path, flags & ~os.O_NOATIME, dir_fd=dir_fd)


def _raise_for_symlink(path: str, dir_fd: int | None, follow_symlinks: bool, exc: OSError) -> None:
    """Name the symlink case behind an ELOOP/ENOENT from open(): loop, dangling, not followed."""
    try:
        lst = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return  # the name itself is missing: a plain FileNotFoundError
    if not stat.S_ISLNK(lst.st_mode):
        return
    try:
        os.stat(path, dir_fd=dir_fd, follow_symlinks=True)
    except OSError as target_exc:
        if target_exc.errno == errno.ELOOP:
            raise SymlinkLoop("symlink loop") from exc
        if target_exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise FileNotFoundError(errno.ENOENT, DANGLING_SYMLINK) from exc
        return
    if not follow_symlinks:
        raise SpecialFile("symlink (not followed)") from exc


DANGLING_SYMLINK = "dangling symlink"


class SpecialFile(Exception):
    """Not a regular file (FIFO, socket, device, symlink not followed): never read."""


class SymlinkLoop(SpecialFile):
    """A symlink that resolves to itself (ELOOP): there is no file behind it."""


def special_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISLNK, "symlink"),
    ):
        if test(mode):
            return name
    return "special file"


def lower_priority() -> None:
    """Run the agent at low CPU and I/O priority."""
    try:
        import psutil

        proc = psutil.Process()
        if IS_WINDOWS:
            proc.nice(psutil.BELOW_NORMAL_PRIORITY_CLASS)
        else:
            proc.nice(min(19, proc.nice() + 10))
            if hasattr(proc, "ionice"):
                # lowest best-effort class, not IDLE: idle I/O can starve a scan on a busy disk
                proc.ionice(psutil.IOPRIO_CLASS_BE, value=7)
    except Exception as exc:  # priority is best effort: never fatal
        log.debug("could not lower priority: %s", exc)


def default_config_file() -> Path:
    """The agent's config file when neither --config nor RMMHUNT_CONFIG names one (read if it exists)."""
    if IS_WINDOWS:
        return Path(os.environ.get("PROGRAMDATA", r"C:\ProgramData")) / "rmmhunt" / "agent.toml"
    return Path("/etc/rmmhunt/agent.toml")

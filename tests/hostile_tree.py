"""A tree of hostile and odd file names, generated in a test's tmp_path (never committed).

Names are made from raw bytes (``os.open`` with ``dir_fd``), so they hold exactly what an
attacker could put on a Linux disk: Latin-1 bytes, invalid UTF-8 (encoded lone surrogates),
newline, tab, ESC sequences, bidi overrides, ``%`` (the path escape's own character), a
255-byte name, and a path longer than PATH_MAX (4096 bytes). Copies of the signed Pulseway
fixture sit under hostile names, so a scan must find them and keep their exact paths.

Use it through the ``hostile_tree`` pytest fixture (tests/conftest.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import FIXTURES

RMM_FIXTURE = FIXTURES / "files" / "pulseway.exe"  # signed "MMSoft Design Ltd.": the Pulseway rule fires
RMM_TOOL = "Pulseway"

# Plain files (not PE): names only.
PLAIN_NAMES: tuple[bytes, ...] = (
    b"caf\xe9 latin-1.txt",  # Latin-1 byte: not valid UTF-8
    b"\xff.txt",  # the red-team's one-byte killer
    b"lone \xed\xa0\x80 surrogate.bin",  # UTF-8 of U+D800: invalid, decodes to lone surrogates
    b"new\nline.txt",
    b"tab\there.txt",
    b"esc \x1b[31mred\x1b[0m \x1b]0;title\x07.txt",  # SGR and an OSC title sequence
    b"bidi \xe2\x80\xaetxt.exe",  # U+202E RIGHT-TO-LEFT OVERRIDE
    b"100% %41 percent.txt",
    b"n" * 251 + b".txt",  # 255 bytes: NAME_MAX
    b"\xc3\xa9t\xc3\xa9 valid utf-8.txt",
    b"-=+@ formula.csv",
    b" leading and trailing space ",
    b"\x7f del \xc2\x85 nel.txt",  # DEL and the C1 control NEL (valid UTF-8)
)

# Signed RMM copies: (directory components, file name).
SIGNED: tuple[tuple[tuple[bytes, ...], bytes], ...] = (
    ((), b"\xffpulse\nway\x1b[2J.exe"),
    ((b"d\xe9j\xe0 vu",), b"caf\xe9\t%2F \xed\xb2\x80.exe"),
    ((b"new\nline dir",), b"n" * 251 + b".exe"),
)

# A path longer than PATH_MAX: 21 levels of 200-byte names with an invalid byte in each.
LONG_LEVELS = 21
LONG_COMPONENT = b"\xfe" + b"L" * 199
LONG_FILE = b"deep \xff pulseway.exe"


@dataclass
class HostileTree:
    root: Path
    plain: list[bytes] = field(default_factory=list)  # absolute paths (bytes) of the plain files
    signed: list[bytes] = field(default_factory=list)  # absolute paths (bytes) of the RMM copies
    long_path: bytes = b""  # the signed file past PATH_MAX (also in ``signed``)

    @property
    def files(self) -> list[bytes]:
        return self.plain + self.signed


def _mkdirs(base_fd: int, parts: tuple[bytes, ...]) -> int:
    """mkdir -p relative to ``base_fd``; returns an open fd of the last directory (caller closes)."""
    fd = os.dup(base_fd)
    for part in parts:
        try:
            os.mkdir(part, dir_fd=fd)
        except FileExistsError:
            pass
        nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    return fd


def _write(dir_fd: int, name: bytes, data: bytes) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dir_fd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def make_hostile_tree(base: Path) -> HostileTree:
    root = base / "hostile"
    root.mkdir()
    broot = os.fsencode(root)
    tree = HostileTree(root)
    rmm = RMM_FIXTURE.read_bytes()
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in PLAIN_NAMES:
            _write(root_fd, name, b"not a PE: " + name)
            tree.plain.append(broot + b"/" + name)
        for parts, name in SIGNED:
            fd = _mkdirs(root_fd, parts)
            try:
                _write(fd, name, rmm)
            finally:
                os.close(fd)
            tree.signed.append(b"/".join((broot, *parts, name)))
        parts = (b"long",) + (LONG_COMPONENT,) * LONG_LEVELS
        fd = _mkdirs(root_fd, parts)
        try:
            _write(fd, LONG_FILE, rmm)
            _write(fd, b"plain \xff beside.txt", b"plain")
        finally:
            os.close(fd)
        tree.long_path = b"/".join((broot, *parts, LONG_FILE))
        tree.signed.append(tree.long_path)
        tree.plain.append(b"/".join((broot, *parts, b"plain \xff beside.txt")))
    finally:
        os.close(root_fd)
    assert len(tree.long_path) > 4096
    return tree


def make_deep_chain(base: Path, levels: int, leaf: bytes, data: bytes) -> bytes:
    """``levels`` nested directories named "d" with ``leaf`` at the bottom; returns its path."""
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir(b"d", dir_fd=fd)
            nxt = os.open(b"d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        _write(fd, leaf, data)
    finally:
        os.close(fd)
    return os.fsencode(base) + b"/d" * levels + b"/" + leaf


def remove_deep_chain(base: Path) -> None:
    """Remove a chain made by ``make_deep_chain`` without deep recursion or long paths
    (shutil.rmtree recurses once per level): go down, then climb back with ".." and rmdir."""
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    depth = 0
    try:
        while True:
            try:
                nxt = os.open(b"d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                break
            os.close(fd)
            fd, depth = nxt, depth + 1
        for name in os.listdir(fd):
            os.unlink(name, dir_fd=fd)
        for _ in range(depth):
            parent = os.open(b"..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = parent
            for name in os.listdir(fd):
                if name != "d":
                    os.unlink(name, dir_fd=fd)
            os.rmdir(b"d", dir_fd=fd)
    finally:
        os.close(fd)

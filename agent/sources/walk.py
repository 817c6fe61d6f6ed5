"""Walk directory trees: no directory symlinks followed by default, no loops, special files
reported (never opened), and every problem an item instead of an exception.

Directories are opened relative to their parent (``openat``-style: ``os.open(name, dir_fd=...)``,
``os.scandir(fd)``), so a tree deeper than the kernel's PATH_MAX is walked like any other, and
a directory swapped for a symlink mid-walk is not followed. Only a bounded number of directory
descriptors is kept open (``MAX_OPEN_DIRS``); an evicted one is reopened from its nearest open
ancestor, and its identity (st_dev, st_ino) is checked again.

Paths are ``str`` decoded with surrogateescape (``agent.textenc``): any byte sequence a file
name holds is kept exactly.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from agent.platform import DANGLING_SYMLINK, RELATIVE_OPEN, open_directory, special_kind

log = logging.getLogger(__name__)

MAX_OPEN_DIRS = 32  # directory descriptors held open at once, whatever the depth
BATCH_FILES = 256  # items per batch of iter_batches (one directory's files, at most this many)
StatMany = Callable[[Callable[[str], os.stat_result], list[str]], list[Any]]


class WalkItem(NamedTuple):  # a tuple: one per walked file, so cheap to build
    """A regular file to examine (``status`` empty), or a final status for a path.

    ``dir_fd``/``name`` let the examiner open the file relative to its directory (a path may be
    longer than PATH_MAX). ``dir_fd`` is only valid until the next item is drawn from the walk;
    it is -1 when there is none (Windows, a root that is a file)."""

    path: str
    status: str = ""  # "" | NOT_PE (special file, symlink loop) | ACCESS_DENIED | VANISHED
    detail: str = ""
    st_dev: int = 0
    st_ino: int = 0
    size: int = 0
    mtime_ns: int = 0
    dir_fd: int = -1
    name: str = ""
    follow: bool = False  # a symlink followed under --follow-symlinks: open it following the link


@dataclass
class WalkCounters:
    directories: int = 0
    symlinks_skipped: int = 0
    mounts_skipped: int = 0
    directory_errors: int = 0


def status_of(exc: OSError) -> tuple[str, str]:
    """(file status, detail) for an OSError met while reaching or opening a file."""
    code = exc.errno
    if code == errno.ELOOP:
        return "NOT_PE", "symlink loop: not read"
    if code == errno.ENAMETOOLONG:
        return "ACCESS_DENIED", "path longer than PATH_MAX"
    if isinstance(exc, FileNotFoundError) and exc.strerror == DANGLING_SYMLINK:
        return "VANISHED", DANGLING_SYMLINK
    if isinstance(exc, FileNotFoundError) or code in (errno.ENOENT, errno.ENOTDIR):
        return "VANISHED", exc.strerror or str(exc)
    return "ACCESS_DENIED", exc.strerror or str(exc)


def _status_of(exc: OSError) -> str:
    return status_of(exc)[0]


def _item_from_stat(path: str, st: os.stat_result, dir_fd: int = -1, name: str = "", follow: bool = False) -> WalkItem:
    if stat.S_ISREG(st.st_mode):
        return WalkItem(path, "", "", st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, dir_fd, name or path, follow)
    return WalkItem(path, status="NOT_PE", detail=f"{special_kind(st.st_mode)}: not read", size=0)


class _Dir:
    """A directory to list: its name in its parent, and its identity once opened. The full path
    is only kept until the directory is listed, so a 10,000-level chain holds no quadratic text."""

    __slots__ = ("parent", "name", "path", "dev", "ino", "follow")

    def __init__(self, parent: _Dir | None, name: str, path: str, follow: bool) -> None:
        self.parent = parent
        self.name = name  # the root's name is its whole path
        self.path: str | None = path
        self.dev = self.ino = -1
        self.follow = follow


class _OpenDirs:
    """A bounded LRU of open directory descriptors; reopens an evicted one from its nearest
    open ancestor and checks it is still the same directory."""

    def __init__(self, limit: int = MAX_OPEN_DIRS) -> None:
        self.limit = max(2, limit)
        self.fds: OrderedDict[_Dir, int] = OrderedDict()

    def fd(self, node: _Dir) -> int:
        if node in self.fds:
            self.fds.move_to_end(node)
            return self.fds[node]
        chain = []
        cur: _Dir | None = node
        while cur is not None and cur not in self.fds:
            chain.append(cur)
            cur = cur.parent
        fd = -1
        for step in reversed(chain):
            parent_fd = self.fds[step.parent] if step.parent is not None else None
            fd = open_directory(step.name, dir_fd=parent_fd, follow_symlinks=step.follow or step.parent is None)
            try:
                st = os.fstat(fd)
            except OSError:
                os.close(fd)
                raise
            if step.dev == -1:
                step.dev, step.ino = st.st_dev, st.st_ino
            elif (st.st_dev, st.st_ino) != (step.dev, step.ino):
                os.close(fd)
                raise FileNotFoundError(errno.ENOENT, "directory replaced during the walk")
            self._put(step, fd)
        return fd

    def _put(self, node: _Dir, fd: int) -> None:
        self.fds[node] = fd
        while len(self.fds) > self.limit:
            _old, old_fd = self.fds.popitem(last=False)
            os.close(old_fd)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def iter_files(
    roots: Iterable[str],
    *,
    follow_symlinks: bool = False,
    skip_dirs: frozenset[str] = frozenset(),
    counters: WalkCounters | None = None,
    errors: list[tuple[str, str]] | None = None,
) -> Iterator[WalkItem]:
    """Yield one item per non-directory entry below the roots.

    Directory problems (permission denied, vanished) go to ``errors`` as (path, message);
    they are not files, so they have no file status. With ``follow_symlinks`` each
    directory is entered once per (st_dev, st_ino), so symlink loops end.
    """
    for batch in iter_batches(
        roots, follow_symlinks=follow_symlinks, skip_dirs=skip_dirs, counters=counters, errors=errors
    ):
        yield from batch


def iter_batches(
    roots: Iterable[str],
    *,
    follow_symlinks: bool = False,
    skip_dirs: frozenset[str] = frozenset(),
    counters: WalkCounters | None = None,
    errors: list[tuple[str, str]] | None = None,
    batch_size: int = BATCH_FILES,
    stat_many: StatMany | None = None,
    warm_dirs: Callable[[list[str]], None] | None = None,
) -> Iterator[list[WalkItem]]:
    """``iter_files`` in batches: the items of one directory (at most ``batch_size`` at a time),
    in the same order. Their ``dir_fd`` stays valid until the next batch is drawn, so a
    consumer can look a whole batch up (the file cache) or read it ahead before examining it.

    ``stat_many(fn, entries)`` (``Prefetcher.map_ordered``) runs a directory's per-file stats in
    a thread pool, results in order, and ``warm_dirs(paths)`` (``Prefetcher.warm_dirs``) is told
    the subdirectories about to be walked, next first; the items are the same as without them."""
    counters = counters if counters is not None else WalkCounters()
    errors = errors if errors is not None else []
    visited: set[tuple[int, int]] = set()
    open_dirs = _OpenDirs()
    try:
        for root in roots:
            try:
                st = os.stat(root, follow_symlinks=True)
            except OSError as exc:
                status, detail = status_of(exc)
                errors.append((root, f"{status}: {detail}"))
                continue
            if not stat.S_ISDIR(st.st_mode):
                yield [_item_from_stat(os.path.abspath(root), st, follow=True)]
                continue
            path = os.path.abspath(root)
            yield from _walk_tree(
                _Dir(None, path, path, True),
                open_dirs,
                visited,
                follow_symlinks,
                skip_dirs,
                counters,
                errors,
                max(1, batch_size),
                stat_many,
                warm_dirs,
            )
    finally:
        open_dirs.close()


def _walk_tree(
    root: _Dir,
    open_dirs: _OpenDirs,
    visited: set[tuple[int, int]],
    follow_symlinks: bool,
    skip_dirs: frozenset[str],
    counters: WalkCounters,
    errors: list[tuple[str, str]],
    batch_size: int,
    stat_many: StatMany | None = None,
    warm_dirs: Callable[[list[str]], None] | None = None,
) -> Iterator[list[WalkItem]]:
    stack = [root]
    while stack:
        node = stack.pop()
        directory = node.path
        assert directory is not None
        node.path = None
        counters.directories += 1
        try:
            if RELATIVE_OPEN:
                fd = open_dirs.fd(node)
                if follow_symlinks:  # enter each directory once: symlink loops end
                    if (node.dev, node.ino) in visited:
                        counters.directories -= 1
                        counters.symlinks_skipped += node.follow
                        continue
                    visited.add((node.dev, node.ino))
                with os.scandir(fd) as it:
                    entries = list(it)
            else:  # no dir_fd support (Windows): list and open by path
                fd = -1
                if node is root and follow_symlinks:
                    rst = os.stat(directory)
                    visited.add((rst.st_dev, rst.st_ino))
                with os.scandir(directory) as it:
                    entries = list(it)
        except OSError as exc:
            counters.directory_errors += 1
            status, detail = status_of(exc)
            errors.append((directory, f"{status}: {detail}"))
            continue
        subdirs: list[tuple[str, str, bool]] = []
        batch: list[WalkItem] = []
        stats_ahead: dict[int, Any] = {}
        if stat_many is not None and fd >= 0:  # a cold cache: the pool stats plain files ahead, in order
            plain = [i for i, e in enumerate(entries) if _plain(e)]
            results = stat_many(
                functools.partial(os.stat, dir_fd=fd, follow_symlinks=False), [entries[i].name for i in plain]
            )
            stats_ahead = dict(zip(plain, results, strict=True))
        prefix = directory if directory.endswith(os.sep) else directory + os.sep  # os.path.join, once per directory
        for index, entry in enumerate(entries):
            if len(batch) >= batch_size:
                yield batch
                batch = []
            name = entry.name
            path = prefix + name
            try:
                # d_type answers symlink/directory/regular without a stat; the stat that gives
                # size and mtime for the cache is relative to the open directory.
                if entry.is_symlink():
                    if not follow_symlinks:
                        counters.symlinks_skipped += 1
                        continue
                    est = _stat(entry, fd, follow=True)
                    if stat.S_ISDIR(est.st_mode):  # a followed symlink to a directory
                        if (est.st_dev, est.st_ino) in visited:
                            counters.symlinks_skipped += 1
                            continue
                        subdirs.append((name, path, True))
                        continue
                    batch.append(_item_from_stat(path, est, fd, name, follow=True))
                    continue
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append((name, path, False))
                    continue
                ahead = stats_ahead.pop(index, None)
                if isinstance(ahead, OSError):
                    raise ahead
                est = ahead if isinstance(ahead, os.stat_result) else _stat(entry, fd, follow=False)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR) and entry.is_symlink():
                    exc = FileNotFoundError(errno.ENOENT, DANGLING_SYMLINK)
                status, detail = status_of(exc)
                batch.append(WalkItem(path, status=status, detail=detail))
                continue
            batch.append(_item_from_stat(path, est, fd, name))
        if batch:
            yield batch
        for name, path, follow in sorted(subdirs, reverse=True):
            if path in skip_dirs:
                counters.mounts_skipped += 1
                continue
            if not RELATIVE_OPEN and follow_symlinks:
                try:
                    sst = os.stat(path)
                except OSError:
                    continue
                if (sst.st_dev, sst.st_ino) in visited:
                    continue
                visited.add((sst.st_dev, sst.st_ino))
            stack.append(_Dir(node, name, path, follow))
        if warm_dirs is not None and subdirs:
            warm_dirs([path for _name, path, follow in sorted(subdirs) if not follow and path not in skip_dirs])


def _plain(entry: os.DirEntry[str]) -> bool:
    """A non-symlink, non-directory entry by its d_type (no system call unless unknown)."""
    try:
        return not entry.is_symlink() and not entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _stat(entry: os.DirEntry[str], dir_fd: int, *, follow: bool) -> os.stat_result:
    if dir_fd >= 0:
        return os.stat(entry.name, dir_fd=dir_fd, follow_symlinks=follow)
    return entry.stat(follow_symlinks=follow)

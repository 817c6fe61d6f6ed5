"""Walk directory trees with os.scandir: no directory symlinks followed by default, no loops,
special files reported (never opened), and every problem an item instead of an exception."""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from agent.platform import special_kind

log = logging.getLogger(__name__)


class WalkItem(NamedTuple):  # a tuple: one per walked file, so cheap to build
    """A regular file to examine (``status`` empty), or a final status for a path."""

    path: str
    status: str = ""  # "" | NOT_PE (special file) | ACCESS_DENIED | VANISHED
    detail: str = ""
    st_dev: int = 0
    st_ino: int = 0
    size: int = 0
    mtime_ns: int = 0


@dataclass
class WalkCounters:
    directories: int = 0
    symlinks_skipped: int = 0
    mounts_skipped: int = 0
    directory_errors: int = 0


def _status_of(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError) or exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return "VANISHED"
    return "ACCESS_DENIED"


def _item_from_stat(path: str, st: os.stat_result) -> WalkItem:
    if stat.S_ISREG(st.st_mode):
        return WalkItem(path, st_dev=st.st_dev, st_ino=st.st_ino, size=st.st_size, mtime_ns=st.st_mtime_ns)
    return WalkItem(path, status="NOT_PE", detail=f"{special_kind(st.st_mode)}: not read", size=0)


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
    counters = counters if counters is not None else WalkCounters()
    errors = errors if errors is not None else []
    visited: set[tuple[int, int]] = set()
    for root in roots:
        try:
            st = os.stat(root, follow_symlinks=True)
        except OSError as exc:
            errors.append((root, f"{_status_of(exc)}: {exc.strerror or exc}"))
            continue
        if not stat.S_ISDIR(st.st_mode):
            yield _item_from_stat(os.path.abspath(root), st)
            continue
        stack = [os.path.abspath(root)]
        visited.add((st.st_dev, st.st_ino))
        while stack:
            directory = stack.pop()
            counters.directories += 1
            try:
                with os.scandir(directory) as it:
                    entries = list(it)
            except OSError as exc:
                counters.directory_errors += 1
                errors.append((directory, f"{_status_of(exc)}: {exc.strerror or exc}"))
                continue
            subdirs = []
            for entry in entries:
                try:
                    if entry.is_symlink():
                        if not follow_symlinks:
                            counters.symlinks_skipped += 1
                            continue
                        est = entry.stat(follow_symlinks=True)
                    elif entry.is_dir(follow_symlinks=False):
                        subdirs.append(entry.path)
                        continue
                    else:
                        est = entry.stat(follow_symlinks=False)
                except OSError as exc:
                    yield WalkItem(entry.path, status=_status_of(exc), detail=exc.strerror or str(exc))
                    continue
                if stat.S_ISDIR(est.st_mode):  # a followed symlink to a directory
                    key = (est.st_dev, est.st_ino)
                    if key in visited:
                        counters.symlinks_skipped += 1
                        continue
                    visited.add(key)
                    stack.append(entry.path)
                    continue
                yield _item_from_stat(entry.path, est)
            for sub in reversed(sorted(subdirs)):
                if sub in skip_dirs:
                    counters.mounts_skipped += 1
                    continue
                if follow_symlinks:
                    try:
                        sst = os.stat(sub, follow_symlinks=False)
                    except OSError:
                        continue
                    key = (sst.st_dev, sst.st_ino)
                    if key in visited:
                        continue
                    visited.add(key)
                stack.append(sub)

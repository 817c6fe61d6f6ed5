"""Parallel I/O for cold caches: a small thread pool that stats a directory's entries and warms
each file's first page (open, POSIX_FADV_RANDOM, read 64 bytes, close) ahead of the
single-threaded scanner.

Threads release the GIL in system calls, so eight of them keep the disk busy while the scanner
works. Nothing they do decides anything: the walk still builds its items in directory order
from the stat results (returned in order), and the scanner still opens, reads and classifies
every file itself, so every status and the order of results stay exactly as without the pool.
Warming only touches regular files (fstat checked, never a FIFO or device read), ignores every
error, and finishes before the walk moves on (a batch's ``dir_fd`` is only valid until then).
Work goes to the pool in a few chunks per batch, not one task per file, so a warm cache pays
almost nothing for it.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from agent.sources.walk import WalkItem

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_THREADS = 8
MIN_PARALLEL = 16  # fewer items than this: not worth a hand-off
PROBE = 4  # stats timed in the calling thread per directory
MAX_DIRS_AHEAD = 64  # directories being read ahead at once
COLD_SECONDS = 30e-6  # a stat slower than this came from the disk, not the cache
HEADER_BYTES = 64
_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOATIME", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_FADV_RANDOM = getattr(os, "POSIX_FADV_RANDOM", None)


def _chunks(items: Sequence[T], n: int) -> list[Sequence[T]]:
    size = -(-len(items) // n)
    return [items[i : i + size] for i in range(0, len(items), size)]


def warm(item: WalkItem) -> None:
    """Bring one regular file's inode and first page into the cache; never raises for the file."""
    if item.status:
        return
    flags = _FLAGS | (0 if item.follow else _NOFOLLOW)
    try:
        if item.dir_fd >= 0 and item.name:
            fd = os.open(item.name, flags, dir_fd=item.dir_fd)
        else:
            fd = os.open(item.path, flags)
    except OSError:
        return
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            if _FADV_RANDOM is not None:
                os.posix_fadvise(fd, 0, 0, _FADV_RANDOM)  # one page, not a readahead window
            os.pread(fd, HEADER_BYTES, 0)
    except OSError:
        pass
    finally:
        os.close(fd)


def warm_directory(path: str) -> None:
    """List a directory and lstat its entries: their dentries and inodes come into the cache
    before the walk reaches it. Never follows a symlink, never opens a file; ignores errors."""
    try:
        with os.scandir(path) as it:
            for entry in it:
                try:
                    entry.stat(follow_symlinks=False)
                except OSError:
                    pass
    except OSError:
        pass


def _warm_all(items: Sequence[WalkItem]) -> None:
    for item in items:
        warm(item)


def _each(fn: Callable[[T], R], items: Sequence[T]) -> list[R | BaseException]:
    out: list[R | BaseException] = []
    for item in items:
        try:
            out.append(fn(item))
        except Exception as exc:  # returned in its place: the walk turns it into a status
            out.append(exc)
    return out


class Prefetcher:
    """The pool: ``map_ordered`` for the walk's stats, ``warm_batch`` for the files' first pages."""

    def __init__(self, threads: int = DEFAULT_THREADS) -> None:
        self.threads = max(1, threads)
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="rmmhunt-prefetch")
        self.cold = True  # until a directory's stats say otherwise
        self._dirs_pending: list[Future[Any]] = []

    def map_ordered(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R | BaseException]:
        """fn over items, in the pool when the cache is cold; results (or the exception raised)
        in the items' order. The first few run here, timed, to tell a cold cache from a warm one:
        on a warm one the hand-off to threads (and their fight for the GIL) costs more than it saves."""
        start = time.perf_counter()
        head = _each(fn, items[:PROBE])
        if head:
            self.cold = (time.perf_counter() - start) / len(head) > COLD_SECONDS
        rest = items[PROBE:]
        if not self.cold or len(rest) < MIN_PARALLEL:
            return head + _each(fn, rest)
        futures = [self.pool.submit(_each, fn, chunk) for chunk in _chunks(rest, self.threads)]
        return head + [r for f in futures for r in f.result()]

    def warm_batch(self, batch: Sequence[WalkItem]) -> list[Future[Any]]:
        """Start warming a batch's files when the cache is cold; ``wait`` on the result before
        the walk moves on."""
        todo = [item for item in batch if not item.status]
        if not self.cold or len(todo) < 2:
            return []
        return [self.pool.submit(_warm_all, chunk) for chunk in _chunks(todo[1:], self.threads)]

    def warm_dirs(self, paths: Sequence[str]) -> None:
        """Read directories the walk will list later, when the cache is cold; a bounded number at
        a time (the walk's own order and results do not depend on it)."""
        if not self.cold:
            return
        self._dirs_pending = [f for f in self._dirs_pending if not f.done()]
        room = MAX_DIRS_AHEAD - len(self._dirs_pending)
        for path in paths[:room]:
            self._dirs_pending.append(self.pool.submit(warm_directory, path))

    @staticmethod
    def wait(futures: list[Future[Any]]) -> None:
        for f in futures:
            f.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Running processes as a source: the image of every process and, on Linux, the files each one
has memory-mapped (psutil). A process that vanishes or denies access is a status, not an error."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import psutil

from agent.rows import ProcessContext

log = logging.getLogger(__name__)

#: statuses of one process in a sweep
PROCESS_OK, PROCESS_VANISHED, PROCESS_ACCESS_DENIED = "OK", "VANISHED", "ACCESS_DENIED"

_DELETED = " (deleted)"


@dataclass(frozen=True)
class ProcessFile:
    """One file a running process uses: its image (``role`` image) or a mapped file (``mapped``)."""

    path: str
    role: str
    process: ProcessContext
    create_time: float  # with the pid, identifies the process across sweeps (pids are reused)


@dataclass
class SweepCounters:
    processes: int = 0
    files: int = 0
    statuses: Counter[str] = field(default_factory=Counter)  # per process: OK / VANISHED / ACCESS_DENIED
    map_statuses: Counter[str] = field(default_factory=Counter)  # reading the memory maps

    def as_dict(self) -> dict[str, object]:
        return {
            "processes": self.processes,
            "files": self.files,
            "statuses": dict(self.statuses),
            "map_statuses": dict(self.map_statuses),
        }


def _usable(path: str | None) -> str | None:
    """A real file path from psutil (no pseudo mappings such as [heap], no anonymous memory)."""
    if not path or not os.path.isabs(path):
        return None
    if path.endswith(_DELETED) and not os.path.lexists(path):
        return None  # the file was deleted while mapped: nothing left on disk to examine
    return path


def _context(proc: psutil.Process) -> tuple[ProcessContext, float]:
    with proc.oneshot():
        name = proc.name()
        create_time = proc.create_time()
        try:
            user = proc.username()
        except (psutil.AccessDenied, KeyError):
            user = ""
        try:
            parent = proc.parent()
            parent_name = parent.name() if parent is not None else ""
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            parent_name = ""
    return ProcessContext(pid=proc.pid, name=name, user=user, parent_name=parent_name), create_time


def iter_process_files(
    counters: SweepCounters | None = None, *, mapped_files: bool = True, skip_pids: frozenset[int] = frozenset()
) -> Iterator[ProcessFile]:
    """Yield each running process's image and (where the platform has them) its mapped files,
    each file once per process. Statuses per process go to ``counters``."""
    counters = counters if counters is not None else SweepCounters()
    for proc in psutil.process_iter():
        if proc.pid in skip_pids:
            continue
        counters.processes += 1
        try:
            ctx, created = _context(proc)
            image = _usable(proc.exe())
        except psutil.NoSuchProcess:
            counters.statuses[PROCESS_VANISHED] += 1
            continue
        except psutil.AccessDenied:
            counters.statuses[PROCESS_ACCESS_DENIED] += 1
            continue
        except OSError as exc:  # psutil normally wraps these; be safe
            log.debug("process %s: %s", proc.pid, exc)
            counters.statuses[PROCESS_ACCESS_DENIED] += 1
            continue
        counters.statuses[PROCESS_OK] += 1
        seen: set[str] = set()
        if image:
            seen.add(image)
            counters.files += 1
            yield ProcessFile(image, "image", ctx, created)
        if not mapped_files or not hasattr(proc, "memory_maps"):
            continue
        try:
            maps = proc.memory_maps(grouped=True)
        except psutil.NoSuchProcess:
            counters.map_statuses[PROCESS_VANISHED] += 1
            continue
        except (psutil.AccessDenied, OSError):
            counters.map_statuses[PROCESS_ACCESS_DENIED] += 1
            continue
        counters.map_statuses[PROCESS_OK] += 1
        for m in maps:
            path = _usable(m.path)
            if path is None or path in seen:
                continue
            seen.add(path)
            counters.files += 1
            yield ProcessFile(path, "mapped", ctx, created)

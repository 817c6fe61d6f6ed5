"""Watch directory trees with watchdog and hand over each file once it has settled.

A file is ready when its writer closed it (Linux close-write, watchdog's ``FileClosedEvent``),
when it was moved or renamed into the tree (a rename is atomic: the content is complete), or
otherwise when its size and mtime have not changed for ``settle_seconds``. A file still being
written is therefore not parsed half-way; and should one be (a writer that pauses longer than
the settle time), its next change makes it ready again, so it is never forgotten.

Watch limits are a status, never a crash: when the kernel refuses a watch (inotify ``ENOSPC``:
``fs.inotify.max_user_watches`` reached), the directory is recorded as uncovered, whether it
is a root at start or a directory created later; the runner scans the uncovered subtrees
periodically instead. On Linux the recording happens at the observer boundary, around
``InotifyFD.add_callback``, because watchdog swallows failures below a watched root.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)

from agent import platform

log = logging.getLogger(__name__)

LINUX_WATCH_ROOTS = ("/opt", "/usr/local", "/home", "/root", "/srv", "/tmp", "/var/tmp")


def linux_default_watch_roots(mounted_shares: Iterable[str] = ()) -> list[str]:
    """/opt, /usr/local, /home, /root, /srv, /tmp, /var/tmp and any configured mounted shares."""
    return [*LINUX_WATCH_ROOTS, *mounted_shares]


def windows_default_watch_roots(env: Mapping[str, str], user_profiles: Iterable[str]) -> list[str]:
    """Both Program Files, ProgramData, every user's AppData and Downloads, Windows\\Temp and the
    public desktop. Pure: ``env`` is the environment, ``user_profiles`` the profile directories."""
    system_drive = env.get("SystemDrive", "C:")
    roots = [
        env.get("ProgramFiles", system_drive + "\\Program Files"),
        env.get("ProgramFiles(x86)", system_drive + "\\Program Files (x86)"),
        env.get("ProgramData", system_drive + "\\ProgramData"),
    ]
    for profile in user_profiles:
        roots += [profile + "\\AppData", profile + "\\Downloads"]
    roots += [
        env.get("SystemRoot", system_drive + "\\Windows") + "\\Temp",
        env.get("PUBLIC", system_drive + "\\Users\\Public") + "\\Desktop",
    ]
    return list(dict.fromkeys(roots))


def default_watch_roots() -> list[str]:
    if platform.IS_WINDOWS:
        env = dict(os.environ)
        users = os.path.join(env.get("SystemDrive", "C:") + "\\", "Users")
        profiles = [p for p in glob.glob(os.path.join(users, "*")) if os.path.isdir(p)]
        return windows_default_watch_roots(env, sorted(profiles))
    return linux_default_watch_roots()


@dataclass(frozen=True)
class Uncovered:
    """A subtree no watch covers, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class Ready:
    """A path to hand to the pipeline: a settled file (``kind`` file) or a new directory to walk."""

    path: str
    kind: str  # "file" | "directory"
    why: str  # closed | moved | settled | created


#: the events asked of the kernel (no open/access/close-nowrite: the agent's own reads stay silent)
WATCHED_EVENTS = (
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileClosedEvent,
    DirCreatedEvent,
    DirMovedEvent,
)


class _Handler(FileSystemEventHandler):
    def __init__(self, events: queue.SimpleQueue[tuple[str, str, float]]) -> None:
        self.events = events

    def on_any_event(self, event: FileSystemEvent) -> None:
        now = time.monotonic()
        path = event.dest_path if isinstance(event, FileMovedEvent | DirMovedEvent) else event.src_path
        path = os.fsdecode(path)
        if not path:  # moved out of the tree: nothing left here to examine
            return
        if isinstance(event, DirMovedEvent | DirCreatedEvent):
            self.events.put(("directory", path, now))
        elif isinstance(event, FileMovedEvent):
            self.events.put(("moved", path, now))
        elif isinstance(event, FileClosedEvent):
            self.events.put(("closed", path, now))
        elif isinstance(event, FileCreatedEvent | FileModifiedEvent):
            self.events.put(("changed", path, now))


def _make_observer(record_failure: Callable[[str, OSError], None], record_success: Callable[[str], None]) -> Any:
    """The platform observer; on Linux an inotify one whose watch additions are recorded."""
    try:
        from watchdog.observers.inotify import InotifyObserver
    except ImportError:  # not Linux
        from watchdog.observers import Observer

        return Observer()

    class RecordingInotifyObserver(InotifyObserver):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            # full events: a file moved in from outside the tree is a move (ready at once), not a
            # creation (which would wait to settle)
            super().__init__(generate_full_events=True)
            fd = getattr(self, "_inotify_fd", None)  # watchdog 7's shared inotify instance
            if fd is None:
                log.warning("this watchdog has no InotifyFD: refused watches below a root are not reported")
                return
            add_callback = fd.add_callback

            def recorded_add_callback(path: bytes, *args: Any, **kwargs: Any) -> Any:
                try:
                    wd = add_callback(path, *args, **kwargs)
                except OSError as exc:
                    record_failure(os.fsdecode(path), exc)
                    raise
                record_success(os.fsdecode(path))
                return wd

            fd.add_callback = recorded_add_callback  # type: ignore[method-assign]

    return RecordingInotifyObserver()


def _minimal(paths: Iterable[str]) -> list[str]:
    """Paths without any that lie below another one in the set."""
    out: list[str] = []
    for p in sorted(set(paths)):
        if not any(p == q or p.startswith(os.path.join(q, "")) for q in out):
            out.append(p)
    return out


class Watcher:
    """Recursive watches on ``roots``; ``poll()`` returns what is ready to examine.

    ``ignore`` lists directories whose changes are never reported (the agent's own state
    directory, so that its store writes do not feed back). Thread-safety: watchdog's threads
    only put events into a queue; ``poll`` runs in the caller's thread."""

    def __init__(
        self,
        roots: Iterable[str],
        *,
        settle_seconds: float,
        ignore: Iterable[str] = (),
        observer_factory: Callable[..., Any] | None = None,
    ) -> None:
        self.roots = [os.path.abspath(r) for r in roots]
        self.settle = settle_seconds
        self.ignore = tuple(os.path.join(os.path.abspath(p), "") for p in ignore)
        self._events: queue.SimpleQueue[tuple[str, str, float]] = queue.SimpleQueue()
        self._pending: dict[str, tuple[int, int, float]] = {}  # path -> (size, mtime_ns, last change)
        self._lock = threading.Lock()
        self._failed: dict[str, str] = {}  # directory -> reason its watch was refused
        self._factory = observer_factory or _make_observer
        self._observer: Any = None
        self.watched_roots: list[str] = []

    # --- the observer boundary
    def _record_failure(self, path: str, exc: OSError) -> None:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return  # gone before it could be watched: nothing there to cover
        reason = {
            errno.ENOSPC: "inotify watch limit reached (ENOSPC)",
            errno.EMFILE: "inotify instance limit reached (EMFILE)",
        }.get(exc.errno or 0, exc.strerror or str(exc))
        with self._lock:
            first = path not in self._failed
            self._failed[path] = reason
        if first:
            log.warning("cannot watch %r: %s; it will be scanned periodically instead", path, reason)

    def _record_success(self, path: str) -> None:
        if self._failed:
            with self._lock:
                self._failed.pop(path, None)

    def start(self) -> None:
        try:
            self._observer = self._factory(self._record_failure, self._record_success)
        except OSError as exc:  # no inotify instance left (EMFILE: max_user_instances): nothing is watched
            for root in self.roots:
                self._record_failure(root, exc)
            return
        # started first: a watch scheduled on a running observer is placed at once, so a refused
        # root raises here (on a stopped one it would raise from start(), for all roots at once)
        self._observer.start()
        handler = _Handler(self._events)
        for root in self.roots:
            if not os.path.isdir(root):
                log.info("watch root %r does not exist; not watched", root)
                continue
            try:
                self._observer.schedule(handler, root, recursive=True, event_filter=list(WATCHED_EVENTS))
            except OSError as exc:
                self._record_failure(root, exc)
                continue
            self.watched_roots.append(root)

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=10)
            self._observer = None

    def __enter__(self) -> Watcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def uncovered(self) -> list[Uncovered]:
        """The subtrees no watch covers (the highest refused directory of each)."""
        with self._lock:
            failed = dict(self._failed)
        return [Uncovered(p, failed[p]) for p in _minimal(failed)]

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _ignored(self, path: str) -> bool:
        return path.startswith(self.ignore) if self.ignore else False

    def poll(self, now: float | None = None) -> list[Ready]:
        """Drain the events; return the files that are ready and the new directories to walk."""
        now = time.monotonic() if now is None else now
        ready: dict[str, Ready] = {}
        while True:
            try:
                kind, path, when = self._events.get_nowait()
            except queue.Empty:
                break
            if self._ignored(path):
                continue
            if kind == "directory":
                ready[path] = Ready(path, "directory", "created")
            elif kind in ("closed", "moved"):
                self._pending.pop(path, None)
                ready[path] = Ready(path, "file", kind)
            else:  # created or modified: wait until it settles
                ready.pop(path, None)
                size, mtime = _size_mtime(path)
                self._pending[path] = (size, mtime, when)
        for path, (size, mtime, since) in list(self._pending.items()):
            if path in ready:
                continue
            cur = _size_mtime(path)
            if cur == (-1, -1):
                del self._pending[path]  # vanished (or never a file): nothing to examine
            elif cur != (size, mtime):
                self._pending[path] = (*cur, now)
            elif now - since >= self.settle:
                del self._pending[path]
                ready[path] = Ready(path, "file", "settled")
        return list(ready.values())


def _size_mtime(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return (-1, -1)
    if not stat.S_ISREG(st.st_mode):
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)

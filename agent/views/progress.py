"""The scan's progress line on a terminal (stderr), drawn with rich.

One line, redrawn in place at any width: files done of the total, a bar, the percentage,
the time remaining, the rate and the current directory (shortened in its middle to fit).
It disappears when the scan ends. The caller only creates it when stderr is a TTY.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from typing import Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskProgressColumn, TimeRemainingColumn
from rich.table import Column
from rich.text import Text

from agent.textenc import escape_path
from agent.views.table import shorten_middle

REDRAW_SECONDS = 0.1


def _used_inodes(path: str) -> int | None:
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):
        return None
    used = st.f_files - st.f_ffree
    return used if st.f_files > 0 and used >= 0 else None


def estimate_file_count(roots: Iterable[str], skip_dirs: Iterable[str] = (), mounts: Iterable[str] = ()) -> int | None:
    """A cheap estimate of how many files a scan of ``roots`` will walk, or None (unknown).

    A root that is a whole filesystem (a mount point, such as ``/`` in a full-disk scan) counts
    the used inodes of that filesystem and of every filesystem mounted below it and not skipped
    (``statvfs``: f_files - f_ffree; directories are inodes too, so it errs high). A single file
    counts one. Any other directory makes the total unknown: the bar then only counts."""
    skip = {os.path.normpath(s) for s in skip_dirs}
    total = 0
    seen_devices: set[int] = set()
    for root in roots:
        if os.path.isfile(root):
            total += 1
            continue
        if not os.path.ismount(root):
            return None
        root_n = os.path.normpath(root)
        below = [root_n] + [
            m
            for m in mounts
            if os.path.normpath(m).startswith(os.path.join(root_n, "")) and os.path.normpath(m) not in skip
        ]
        for point in below:
            if any(point == s or point.startswith(os.path.join(s, "")) for s in skip):
                continue
            try:
                dev = os.stat(point).st_dev
            except OSError:
                continue
            if dev in seen_devices:
                continue
            seen_devices.add(dev)
            used = _used_inodes(point)
            if used is None:
                return None
            total += used
    return total


def count_files(roots: Iterable[str], skip_dirs: Iterable[str], stop: threading.Event) -> int | None:
    """The number of non-directory entries under ``roots`` as the walk sees them (directory
    symlinks not followed, ``skip_dirs`` skipped): readdir only, no stat (d_type).
    None when ``stop`` is set before the count is done."""
    skip = {os.path.normpath(s) for s in skip_dirs}
    total = 0
    for root in roots:
        if not os.path.isdir(root) or os.path.islink(root):
            total += 1
            continue
        stack = [root]
        while stack:
            if stop.is_set():
                return None
            directory = stack.pop()
            try:
                with os.scandir(directory) as entries:
                    for entry in entries:
                        try:
                            is_dir = entry.is_dir(follow_symlinks=False)
                        except OSError:
                            is_dir = False
                        if not is_dir:
                            total += 1
                        elif entry.path not in skip:
                            stack.append(entry.path)
            except OSError:
                continue
    return total


class _MiddlePath:
    """A path that shortens itself in its middle to the width it is given."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield Text(shorten_middle(self.text, options.max_width), no_wrap=True, overflow="crop")

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(1, max(1, len(self.text)))


class _CountColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        done = int(task.completed)
        if task.total is None:
            return Text(f"{done:,} files")
        return Text(f"{done:,}/{int(task.total):,}")


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        rate = task.completed / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate:,.0f}/s")


class _DirColumn(ProgressColumn):
    def __init__(self) -> None:
        super().__init__(table_column=Column(ratio=1, no_wrap=True, overflow="crop", min_width=1))

    def render(self, task: Task) -> Any:
        return _MiddlePath(str(task.fields.get("directory", "")))


class ScanProgress:
    """The progress callback of ``Scanner.scan``: ``progress(stats, path)`` after each file."""

    def __init__(self, console: Console, total: int | None) -> None:
        self.console = console
        self.progress = Progress(
            _CountColumn(table_column=Column(no_wrap=True)),
            BarColumn(bar_width=12),
            TaskProgressColumn(table_column=Column(no_wrap=True)),
            TimeRemainingColumn(table_column=Column(no_wrap=True)),
            _RateColumn(table_column=Column(no_wrap=True)),
            _DirColumn(),
            console=console,
            transient=True,
            auto_refresh=False,  # redrawn from the scan loop: no thread
            expand=True,
        )
        self.task = self.progress.add_task("scan", total=total, directory="")
        self.total = total
        self.last = 0.0
        self.started = False
        self._stop = threading.Event()
        self._counter: threading.Thread | None = None
        self._counted: int | None = None

    def count_in_background(self, roots: Iterable[str], skip_dirs: Iterable[str]) -> None:
        """No cheap estimate: count the files beside the scan (a readdir walk, far cheaper than the
        scan's opens and reads); the bar counts only until the total is known."""
        roots, skip_dirs = list(roots), list(skip_dirs)

        def run() -> None:
            self._counted = count_files(roots, skip_dirs, self._stop)

        self._counter = threading.Thread(target=run, name="rmmhunt-count", daemon=True)
        self._counter.start()

    def __call__(self, stats: Any, path: str) -> None:
        now = time.monotonic()
        if now - self.last < REDRAW_SECONDS:
            return
        self.last = now
        if not self.started:
            self.progress.start()
            self.started = True
        done = stats.files
        if self.total is None and self._counted is not None:
            self.total = self._counted
            self.progress.update(self.task, total=self.total)
        if self.total is not None and done > self.total:  # the estimate was low
            self.total = done
            self.progress.update(self.task, total=done)
        self.progress.update(
            self.task, completed=done, directory=escape_path(os.path.dirname(path) or path), refresh=True
        )

    def close(self) -> None:
        """Remove the line (transient): nothing is left on screen."""
        self._stop.set()
        if self._counter is not None:
            self._counter.join(timeout=5)
        if self.started:
            self.progress.stop()
            self.started = False

"""Budgets of the running agent: low priority, a CPU cap enforced by throttling, a memory
ceiling (crash-only), and structured JSON-lines logs with rotation."""

from __future__ import annotations

import datetime as dt
import json
import logging
import logging.handlers
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import psutil

from agent import platform

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- priority

# psutil's Windows constants, with their documented values where psutil does not define them
WINDOWS_BELOW_NORMAL = getattr(psutil, "BELOW_NORMAL_PRIORITY_CLASS", 0x4000)
WINDOWS_IO_VERY_LOW = getattr(psutil, "IOPRIO_VERYLOW", 0)


def lower_priority(*, windows: bool | None = None, proc: Any = None) -> dict[str, str]:
    """Lowest CPU and I/O priority: Linux nice 19 and the idle I/O class; Windows
    BELOW_NORMAL priority with very-low (background) I/O priority. Best effort; returns what was
    set (or why not), for the status file."""
    windows = platform.IS_WINDOWS if windows is None else windows
    proc = proc if proc is not None else psutil.Process()
    done: dict[str, str] = {}
    try:
        if windows:
            proc.nice(WINDOWS_BELOW_NORMAL)
            done["cpu"] = "BELOW_NORMAL"
        else:
            proc.nice(19)
            done["cpu"] = "nice 19"
    except Exception as exc:
        done["cpu"] = f"unchanged: {exc}"
    try:
        if windows:
            proc.ionice(WINDOWS_IO_VERY_LOW)
            done["io"] = "very low (background)"
        elif hasattr(proc, "ionice"):
            proc.ionice(psutil.IOPRIO_CLASS_IDLE)
            done["io"] = "idle"
    except Exception as exc:
        done["io"] = f"unchanged: {exc}"
    log.debug("priority: %s", done)
    return done


# --------------------------------------------------------------------------- CPU cap


class CpuThrottle:
    """Hold this process's CPU use to ``percent`` of one core, measured with psutil.

    ``tick()`` runs in the per-file loop: every ``check_every`` seconds of wall time it reads
    the process's CPU time and, when the share since the window began exceeds the cap, sleeps
    just long enough to bring it back. The window restarts every ``window`` seconds, so a burst
    is paid back promptly rather than averaged away."""

    def __init__(
        self,
        percent: float,
        *,
        window: float = 2.0,
        check_every: float = 0.05,
        proc: Any = None,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        self.share = percent / 100.0
        self.window = window
        self.check_every = check_every
        self.proc = proc if proc is not None else psutil.Process()
        self.sleep = sleep
        self.slept = 0.0
        self._restart()

    def _cpu(self) -> float:
        t = self.proc.cpu_times()
        return float(t.user + t.system)

    def _restart(self) -> None:
        self._t0 = time.monotonic()
        self._c0 = self._cpu() if self.share > 0 else 0.0
        self._next = self._t0 + self.check_every

    def tick(self) -> None:
        if self.share <= 0:
            return
        now = time.monotonic()
        if now < self._next:
            return
        used = self._cpu() - self._c0
        elapsed = now - self._t0
        owed = used / self.share - elapsed  # wall time the window needs for `used` to be within the cap
        if owed > 0:
            self.sleep(owed)
            self.slept += owed
            now = time.monotonic()
        if now - self._t0 >= self.window:
            self._restart()
        else:
            self._next = now + self.check_every


# --------------------------------------------------------------------------- memory ceiling


class MemoryCeilingExceeded(Exception):
    """RSS passed the ceiling: the agent flushes and exits non-zero (the service manager restarts it)."""

    def __init__(self, rss: int, limit: int) -> None:
        super().__init__(f"memory ceiling: RSS {rss // (1024 * 1024)} MiB > memory_limit_mb {limit // (1024 * 1024)}")
        self.rss = rss
        self.limit = limit


class MemoryCeiling:
    """Raise MemoryCeilingExceeded from ``check()`` once RSS passes ``limit_mb`` (0: no ceiling).
    RSS is read at most every ``check_every`` seconds."""

    def __init__(self, limit_mb: int, *, check_every: float = 1.0, proc: Any = None) -> None:
        self.limit = limit_mb * 1024 * 1024
        self.check_every = check_every
        self.proc = proc if proc is not None else psutil.Process()
        self._next = 0.0

    def rss(self) -> int:
        return int(self.proc.memory_info().rss)

    def check(self, *, force: bool = False) -> None:
        if self.limit <= 0:
            return
        now = time.monotonic()
        if not force and now < self._next:
            return
        self._next = now + self.check_every
        rss = self.rss()
        if rss > self.limit:
            raise MemoryCeilingExceeded(rss, self.limit)


# --------------------------------------------------------------------------- structured logs

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, and every ``extra=`` field."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def setup_json_logging(
    log_file: Path | None, *, max_bytes: int, backups: int, level: int = logging.INFO, stream: TextIO | None = None
) -> logging.Handler:
    """Route the root logger to JSON lines on ``stream`` (stderr) or to a rotating ``log_file``.
    Returns the handler (remove it with ``teardown_logging``)."""
    handler: logging.Handler
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            log_file, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
        )
    else:
        handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_rmmhunt_json", False) or isinstance(old, logging.StreamHandler):
            root.removeHandler(old)
    setattr(handler, "_rmmhunt_json", True)  # noqa: B010 - a marker on a stdlib object
    root.addHandler(handler)
    root.setLevel(min(level, root.level) if root.level else level)
    logging.getLogger("watchdog").setLevel(logging.WARNING)
    return handler


def teardown_logging(handler: logging.Handler) -> None:
    logging.getLogger().removeHandler(handler)
    handler.flush()
    handler.close()


def pid_alive(pid: int, create_time: float | None = None) -> bool:
    """The process exists (and, when given, started at ``create_time``: pids are reused)."""
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 1.0:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False

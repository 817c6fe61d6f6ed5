"""The agent's main loop: ``rmmhunt watch`` (foreground) and ``rmmhunt run`` (the service).

One thread does the work (the store is single-threaded); watchdog's threads only queue events.
At start: the configuration is loaded (a bad one is fatal), priority lowered, the watches
placed, then a walk of the roots through the file cache catches what changed while the agent
was down. Then, until stopped: settled files from the watches, new directories, periodic scans
of subtrees no watch covers, and, in ``run``, the full re-scan at ``rescan_interval`` and the
process sweep at ``process_sweep_interval``. SIGHUP (and, in ``run``, a changed config file)
reloads settings, rules and exclusions; a bad reload keeps the last good set and says so.
Crash-only: when RSS passes ``memory_limit_mb`` the loop flushes, logs and exits non-zero.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psutil

from agent import __version__
from agent.scanner import ScanStats
from agent.service.budgets import CpuThrottle, MemoryCeiling, MemoryCeilingExceeded, lower_priority
from agent.service.pipeline import Finding, Loaded, Pipeline, ProcessSweep, load_everything
from agent.service.status import write_status
from agent.settings import Settings
from agent.sources.watch import Watcher, default_watch_roots
from agent.textenc import escape_path

log = logging.getLogger(__name__)
finding_log = logging.getLogger("rmmhunt.finding")

POLL_SECONDS = 0.05
BULK_POLL_SECONDS = 0.25  # how often a scan or sweep looks at the watches
STATUS_EVERY = 2.0
CONFIG_CHECK_EVERY = 2.0
FINDINGS_RECOUNT_EVERY = 5.0


def _iso(t: float | None) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds") if t else ""


def finding_record(f: Finding) -> dict[str, Any]:
    """The fields of one finding's JSON log line (paths escaped as everywhere else)."""
    row = f.row
    return {
        "event": "finding",
        "RuleId": f.rule_id,
        "RuleName": f.rule_name,
        "Tool": f.tool,
        "DeviceId": row.get("DeviceId"),
        "DeviceName": row.get("DeviceName"),
        "ReportId": row.get("ReportId"),
        "Timestamp": row["Timestamp"].isoformat() if row.get("Timestamp") else None,
        "FolderPath": escape_path(row.get("FolderPath") or ""),
        "FileName": escape_path(row.get("FileName") or ""),
        "SHA256": row.get("SHA256"),
        "Signer": row.get("Signer"),
        "SignerHash": row.get("SignerHash"),
        "IsTrusted": row.get("IsTrusted"),
        "Source": row.get("Source"),
        "ProcessId": row.get("ProcessId"),
        "ProcessName": row.get("ProcessName"),
        "ProcessUser": row.get("ProcessUser"),
        "ParentProcessName": row.get("ParentProcessName"),
        "Evidence": list(f.evidence),
    }


def watch_roots_of(settings: Settings, paths: Sequence[str] = ()) -> list[str]:
    if paths:
        return [os.path.abspath(p) for p in paths]
    if settings.watch_roots:
        return [str(p) for p in settings.watch_roots]
    return default_watch_roots()


class Runner:
    """The loop. ``load_settings`` re-reads the configuration (for reloads); ``mode`` is ``run``
    (re-scans, process sweeps) or ``watch`` (watches and catch-up scans only)."""

    def __init__(
        self,
        load_settings: Callable[[], Settings],
        *,
        mode: str = "run",
        paths: Sequence[str] = (),
        stop: threading.Event | None = None,
        observer_factory: Callable[..., Any] | None = None,
        uncovered_scan_interval: float | None = None,
        low_priority: bool = True,
    ) -> None:
        self.load_settings = load_settings
        self.mode = mode
        self.paths = list(paths)
        self.stop_event = stop if stop is not None else threading.Event()
        self.observer_factory = observer_factory
        self._uncovered_interval = uncovered_scan_interval
        self.low_priority = low_priority
        self.reload_requested = threading.Event()
        self.status_requested = threading.Event()  # any thread: write the status file now
        self.pipeline: Pipeline | None = None
        self.watcher: Watcher | None = None
        self.proc = psutil.Process()
        self.started = time.time()
        self.status: dict[str, Any] = {}
        self.findings_by_tool: dict[str, int] = {}
        self._findings_dirty = True
        self._last_recount = 0.0
        self._last_status = 0.0
        self._config_mtime: float | None = None
        self._last_config_check = 0.0
        self.watch_stats = ScanStats()
        self.handled = 0
        self._bulk = False  # a scan or sweep holds the store's transaction
        self._next_bulk_poll = 0.0
        self._deferred: list[Any] = []  # new directories seen during a scan

    # --- configuration
    @property
    def settings(self) -> Settings:
        assert self.pipeline is not None
        return self.pipeline.settings

    def _config_stamp(self, settings: Settings) -> float | None:
        try:
            return settings.config_file.stat().st_mtime if settings.config_file else None
        except OSError:
            return None

    def request_reload(self, *_: Any) -> None:
        self.reload_requested.set()

    def reload(self) -> bool:
        """Reload settings, rules and exclusions; keep the last good set when anything is wrong."""
        assert self.pipeline is not None
        try:
            loaded = load_everything(self.load_settings())
        except Exception as exc:
            message = f"reload failed, keeping the last good configuration: {exc}"
            log.error(message, extra={"event": "reload_failed"})
            self.status["last_error"] = message
            self._write_status(force=True)
            return False
        old_roots = watch_roots_of(self.settings, self.paths)
        self.pipeline.reload(loaded)
        self._apply_budgets(loaded.settings)
        self._config_mtime = self._config_stamp(loaded.settings)
        if watch_roots_of(loaded.settings, self.paths) != old_roots:
            self._restart_watcher()
        log.info(
            "configuration reloaded: %d rules, %d exclusions",
            len(loaded.rules),
            len(loaded.exclusions),
            extra={"event": "reloaded"},
        )
        self._findings_dirty = True
        self._write_status(force=True)
        return True

    def _apply_budgets(self, settings: Settings) -> None:
        # the throttle's sleep ends early on stop, so SIGTERM is prompt even at a low cap
        self.throttle = CpuThrottle(settings.max_cpu_percent, proc=self.proc, sleep=self.stop_event.wait)
        self.memory = MemoryCeiling(settings.memory_limit_mb, proc=self.proc)

    # --- the per-file hook of every scan, sweep and watch
    def per_file(self, _stats: ScanStats | None = None, _path: str = "") -> None:
        if self.stop_event.is_set():
            raise _Stopped
        if self._bulk and time.monotonic() >= self._next_bulk_poll:
            self._watch_during_bulk()
        self.throttle.tick()
        self.memory.check()
        if self.stop_event.is_set():
            raise _Stopped

    def _watch_during_bulk(self) -> None:
        """Files the watches made ready while a scan or sweep holds the store: examined and
        committed now, not when the scan ends. New directories wait for the scan to end."""
        assert self.watcher is not None and self.pipeline is not None
        self._next_bulk_poll = time.monotonic() + BULK_POLL_SECONDS
        for item in self.watcher.poll():
            if item.kind == "directory":
                self._deferred.append(item)
            else:
                self.pipeline.observe_during_bulk(item.path, "watch", self.watch_stats)
                self.handled += 1

    @contextlib.contextmanager
    def _bulk_work(self) -> Iterator[None]:
        self._bulk = True
        try:
            yield
        finally:
            self._bulk = False

    def on_finding(self, f: Finding) -> None:
        finding_log.warning(
            "finding: %s %s", f.tool, escape_path(f.row.get("FolderPath") or ""), extra=finding_record(f)
        )
        self._findings_dirty = True

    # --- watches
    def _start_watcher(self) -> None:
        roots = watch_roots_of(self.settings, self.paths)
        ignore = [str(self.settings.state_dir)]
        if self.settings.log_file:
            ignore.append(str(self.settings.log_file.parent))
        self.watcher = Watcher(
            roots, settle_seconds=self.settings.settle_seconds, ignore=ignore, observer_factory=self.observer_factory
        )
        self.watcher.start()
        uncovered = self.watcher.uncovered()
        log.info(
            "watching %d roots (%d uncovered subtrees)",
            len(self.watcher.watched_roots),
            len(uncovered),
            extra={"event": "watching", "roots": roots},
        )

    def _restart_watcher(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self._start_watcher()

    def handle_ready(self) -> int:
        """Examine what the watches made ready; returns how many paths were handled."""
        assert self.watcher is not None and self.pipeline is not None
        ready, self._deferred = self._deferred + self.watcher.poll(), []
        for item in ready:
            if item.kind == "directory":
                with self._bulk_work():
                    self.pipeline.scan([item.path], source="watch", per_file=self.per_file)
            else:
                self.pipeline.observe_path(item.path, "watch", self.watch_stats)
                self.per_file()
            self.handled += 1
        return len(ready)

    # --- scans and sweeps
    def full_scan(self, why: str) -> ScanStats:
        assert self.watcher is not None and self.pipeline is not None
        roots = [r for r in watch_roots_of(self.settings, self.paths) if os.path.isdir(r)]
        t0 = time.time()
        log.info("full scan (%s) of %d roots", why, len(roots), extra={"event": "scan_started", "why": why})
        with self._bulk_work():
            stats = self.pipeline.scan(roots, source="scan", per_file=self.per_file)
        summary = stats.as_dict()
        self.status["last_full_scan"] = {
            "why": why,
            "started": t0,
            "finished": time.time(),
            "finished_iso": _iso(time.time()),
            "summary": summary,
        }
        log.info("full scan done: %d files, %d findings", stats.files, stats.findings, extra={"event": "scan_done"})
        self._findings_dirty = True
        return stats

    def scan_uncovered(self) -> None:
        assert self.watcher is not None and self.pipeline is not None
        paths = [u.path for u in self.watcher.uncovered() if os.path.isdir(u.path)]
        if not paths:
            return
        with self._bulk_work():
            stats = self.pipeline.scan(paths, source="scan", per_file=self.per_file)
        self.status["last_uncovered_scan"] = {"finished_iso": _iso(time.time()), "files": stats.files}

    def sweep(self) -> None:
        assert self.pipeline is not None
        t0 = time.time()
        with self._bulk_work():
            stats, counters = self._sweeper.run(per_file=self.per_file, skip_pids=frozenset({os.getpid()}))
        self.status["process_sweep"] = {
            "finished": time.time(),
            "finished_iso": _iso(time.time()),
            "seconds": round(time.time() - t0, 3),
            "summary": {**counters.as_dict(), "rows": stats.rows, "findings": stats.findings},
        }
        self._findings_dirty = True

    # --- status
    def _recount_findings(self) -> None:
        from agent.hunt import run_hunt

        assert self.pipeline is not None
        p = self.pipeline
        results = run_hunt(
            p.store.iter_rows(),
            p.loaded.rules,
            now=dt.datetime.now(dt.UTC),
            excluded_for=p.store.excluded_hits(),
            exclusions=p.loaded.exclusions,
        )
        counts: Counter[str] = Counter()
        for r in results:
            counts[r.rule.tool] += len(r.rows)
        self.findings_by_tool = dict(sorted(counts.items()))
        self._findings_dirty = False
        self._last_recount = time.monotonic()

    def _write_status(self, *, force: bool = False, state: str | None = None) -> None:
        now = time.monotonic()
        if not force and now - self._last_status < STATUS_EVERY:
            return
        if self.pipeline is None:
            return
        if self._findings_dirty and (force or now - self._last_recount >= FINDINGS_RECOUNT_EVERY):
            try:
                self._recount_findings()
            except Exception as exc:  # the status must not stop the agent
                log.warning("could not count findings: %s", exc)
        self._last_status = now
        w = self.watcher
        self.status.update(
            {
                "state": state or self.status.get("state", "running"),
                "mode": self.mode,
                "pid": os.getpid(),
                "process_create_time": self.proc.create_time(),
                "version": __version__,
                "started": self.started,
                "started_iso": _iso(self.started),
                "updated_iso": _iso(time.time()),
                "rss": self.proc.memory_info().rss,
                "watched_roots": list(w.watched_roots) if w else [],
                "uncovered": [{"path": escape_path(u.path), "reason": u.reason} for u in w.uncovered()] if w else [],
                "watch": {"handled": self.handled, "pending": w.pending if w else 0, **_small(self.watch_stats)},
                "findings_by_tool": self.findings_by_tool,
                "config_file": str(self.settings.config_file or ""),
            }
        )
        try:
            write_status(self.settings.state_dir, self.status)
        except OSError as exc:
            log.warning("cannot write the status file: %s", exc)

    # --- the loop
    def run(self) -> int:
        """0 when stopped, 2 on a memory-ceiling exit. A bad configuration at start raises ConfigError."""
        settings = self.load_settings()
        loaded: Loaded = load_everything(settings)
        self.pipeline = Pipeline(loaded)
        self.pipeline.on_finding = self.on_finding
        self._sweeper = ProcessSweep(self.pipeline)
        self._apply_budgets(settings)
        self._config_mtime = self._config_stamp(settings)
        self.status = {"state": "starting", "last_error": "", "priority": lower_priority() if self.low_priority else {}}
        installed = self._install_signals()
        try:
            self._start_watcher()
            self._write_status(force=True)
            self.full_scan("start: catch up with changes made while the agent was down")
            self.status["state"] = "running"
            self._write_status(force=True)
            return self._loop()
        except _Stopped:
            return 0
        except MemoryCeilingExceeded as exc:
            log.error("%s: flushing and exiting for the service manager to restart", exc, extra={"event": "memory"})
            self.status["last_error"] = str(exc)
            return 2
        finally:
            self._restore_signals(installed)
            if self.watcher is not None:
                self.watcher.stop()
            try:
                self._write_status(force=True, state="stopped")
            finally:
                self.pipeline.close()
            for handler in logging.getLogger().handlers:
                handler.flush()

    def _loop(self) -> int:
        assert self.watcher is not None
        now = time.monotonic()
        last_full = last_sweep = last_uncovered = now
        if self.mode == "run" and self.settings.process_sweep_interval > 0:
            self.sweep()
            last_sweep = time.monotonic()
        while not self.stop_event.is_set():
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self.reload()
            self.handle_ready()
            now = time.monotonic()
            s = self.settings
            if self.mode == "run" and now - self._last_config_check >= CONFIG_CHECK_EVERY:
                self._last_config_check = now
                stamp = self._config_stamp(s)
                if stamp != self._config_mtime:
                    self._config_mtime = stamp
                    log.info("config file changed; reloading", extra={"event": "config_changed"})
                    self.reload()
            uncovered_every = self._uncovered_interval or max(60.0, min(s.rescan_interval or 300.0, 300.0))
            if self.watcher.uncovered() and now - last_uncovered >= uncovered_every:
                self.scan_uncovered()
                last_uncovered = time.monotonic()
            if self.mode == "run" and s.rescan_interval > 0 and now - last_full >= s.rescan_interval:
                self.full_scan("periodic re-scan")
                last_full = time.monotonic()
            if self.mode == "run" and s.process_sweep_interval > 0 and now - last_sweep >= s.process_sweep_interval:
                self.sweep()
                last_sweep = time.monotonic()
            self.memory.check()
            if self.status_requested.is_set():
                self.status_requested.clear()
                self._write_status(force=True)
            else:
                self._write_status()
            self.stop_event.wait(POLL_SECONDS)
        return 0

    def _install_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        old: dict[int, Any] = {}

        def stop(*_: Any) -> None:
            self.stop_event.set()

        for sig, handler in ((signal.SIGTERM, stop), (signal.SIGINT, stop), (getattr(signal, "SIGHUP", None), None)):
            if sig is None:
                continue
            old[sig] = signal.signal(sig, handler or self.request_reload)
        return old

    @staticmethod
    def _restore_signals(old: dict[int, Any]) -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)


class _Stopped(Exception):
    """Raised from the per-file hook when a stop was asked for in the middle of a scan."""


def _small(stats: ScanStats) -> dict[str, Any]:
    return {"files": stats.files, "rows": stats.rows, "findings": stats.findings, "errors": stats.errors_total}


def run_agent(load_settings: Callable[[], Settings], *, mode: str, paths: Sequence[str] = ()) -> int:
    return Runner(load_settings, mode=mode, paths=paths).run()

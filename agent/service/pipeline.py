"""The one adapter between the runtime (watch, process sweeps, run) and the scan pipeline.

It turns a ``Settings`` into rules, exclusions, device, verifier, store and one ``Scanner``,
and is the only runtime module that calls the scanner API (``Scanner.observe``,
``Scanner.scan``, ``Scanner.flush``), so that a change there is re-pointed here only.
Every finding (a rule hit on a row no exclusion removed) is handed to ``on_finding`` as it
is stored, for the one-JSON-line-per-finding log.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent import platform
from agent.rows import Device, ProcessContext
from agent.scanner import Matcher, ScanStats, scanner_for
from agent.settings import ConfigError, Settings
from agent.sources.walk import WalkItem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finding:
    """One rule hit on a stored row that no exclusion removed."""

    rule_id: str
    rule_name: str
    tool: str
    row: dict[str, Any]
    evidence: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class Loaded:
    """What a config (re)load produces: all of it or nothing."""

    settings: Settings
    rules: tuple[Any, ...]
    exclusions: tuple[Any, ...]
    device: Device
    rule_problems: tuple[str, ...] = field(default=())


def load_device(settings: Settings) -> Device:
    device_id = settings.device_id or platform.device_id_from(platform.machine_identity())
    name = settings.device_name or platform.default_device_name()
    return Device(device_id=device_id.lower(), device_name=name.lower())


def load_everything(settings: Settings) -> Loaded:
    """Rules, exclusions and device for ``settings``; ConfigError naming the problem otherwise."""
    from agent.exclusions import parse_exclusions
    from agent.resources import rule_attribution_file
    from agent.rules.loader import load_rules

    for d in settings.rule_dirs_effective:
        if not d.is_dir():
            raise ConfigError(f"rules directory not found: {d}")
    attribution = rule_attribution_file() if not settings.rules_dirs else None
    if attribution is not None and not attribution.exists():
        attribution = None
    ruleset = load_rules(list(settings.rule_dirs_effective), attribution=attribution)
    if not ruleset.rules:
        raise ConfigError("no usable rules: " + ", ".join(str(d) for d in settings.rule_dirs_effective))
    exclusions: Sequence[Any] = ()
    if settings.exclusions:
        text = settings.config_file.read_text(encoding="utf-8") if settings.config_file else None
        exclusions, problems = parse_exclusions(
            {"exclusions": list(settings.exclusions)}, path=str(settings.config_file), source_text=text
        )
        if problems:
            raise ConfigError("\n".join(str(p) for p in problems))
    return Loaded(
        settings,
        tuple(ruleset.rules),
        tuple(exclusions),
        load_device(settings),
        tuple(str(p) for p in ruleset.problems),
    )


class RecordingMatcher(Matcher):
    """The scanner's matcher, also remembering each non-excluded hit for the finding log.

    The row dicts are the ones the scanner stores, so by the time ``drain`` runs (after the
    file) they carry their ReportId."""

    def __init__(self, rules: Sequence[Any], exclusions: Sequence[Any] = ()) -> None:
        super().__init__(rules, exclusions)
        self.pending: list[Finding] = []

    def match(self, row: dict[str, Any], now: dt.datetime) -> list[tuple[Any, list[dict[str, Any]], str | None]]:
        out = super().match(row, now)
        for rule, evidence, excl in out:
            if excl is None:
                self.pending.append(Finding(rule.id, rule.name, rule.tool, row, tuple(evidence)))
        return out

    def drain(self) -> list[Finding]:
        found, self.pending = self.pending, []
        return found


def walk_item(path: str) -> WalkItem:
    """A WalkItem for one path (lstat: a final symlink is not followed)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError as exc:
        return WalkItem(path, status="VANISHED", detail=exc.strerror or str(exc))
    except OSError as exc:
        return WalkItem(path, status="ACCESS_DENIED", detail=exc.strerror or str(exc))
    if stat.S_ISREG(st.st_mode):
        return WalkItem(path, st_dev=st.st_dev, st_ino=st.st_ino, size=st.st_size, mtime_ns=st.st_mtime_ns)
    return WalkItem(path, status="NOT_PE", detail=f"{platform.special_kind(st.st_mode)}: not read")


FileHook = Callable[[ScanStats, str], None]


class Pipeline:
    """Settings -> a ready scanner over one open store, with live reload of rules and exclusions."""

    def __init__(self, loaded: Loaded, *, store: Any | None = None) -> None:
        from agent.extract.authenticode import TrustVerifier, load_roots
        from agent.store_cli import open_store

        self.loaded = loaded
        settings = loaded.settings
        # the writer: it holds the state directory's lock for as long as the store is open
        self.store = store if store is not None else open_store(settings, write=True, command="run")
        self.matcher = RecordingMatcher(loaded.rules, loaded.exclusions)
        verifier = TrustVerifier(load_roots(settings.trusted_roots)) if settings.verify else None
        self.scanner = scanner_for(settings, self.store, loaded.device, self.matcher, verifier)
        self.on_finding: Callable[[Finding], None] = lambda f: None

    @property
    def settings(self) -> Settings:
        return self.loaded.settings

    def close(self) -> None:
        self.store.close()

    def reload(self, loaded: Loaded) -> None:
        """Swap rules, exclusions and the per-file settings; the store and its cache stay."""
        from agent.extract.authenticode import TrustVerifier, load_roots

        self.loaded = loaded
        s = loaded.settings
        self.matcher = RecordingMatcher(loaded.rules, loaded.exclusions)
        self.scanner.matcher = self.matcher
        self.scanner.device = loaded.device
        self.scanner.verifier = TrustVerifier(load_roots(s.trusted_roots)) if s.verify else None
        self.scanner.max_file_size = s.max_file_size
        self.scanner.file_time_budget = s.file_time_budget
        self.scanner.reobserve = dt.timedelta(seconds=s.reobserve_interval)

    def _report_findings(self) -> int:
        found = self.matcher.drain()
        for finding in found:
            self.on_finding(finding)
        return len(found)

    def observe_path(
        self,
        path: str,
        source: str,
        stats: ScanStats,
        *,
        process: ProcessContext | None = None,
        force: bool = False,
    ) -> list[dict[str, Any]]:
        """One file through the pipeline, committed at once. Never raises for the file's sake."""
        self.scanner.source = source
        self.store.begin()
        try:
            rows = self.scanner.observe(walk_item(path), stats, process=process, force=force)
        except Exception as exc:  # a bug must not end the loop: the file gets a status
            log.exception("internal error on %r", path)
            stats.statuses["PARSE_ERROR"] += 1
            stats.errors_total += 1
            stats.errors.append({"path": path, "status": "PARSE_ERROR", "detail": f"internal: {exc}"})
            rows = []
        finally:
            self.scanner.flush()
            self.scanner.source = "scan"
        self._report_findings()
        return rows

    def observe_during_bulk(self, path: str, source: str, stats: ScanStats) -> None:
        """One file while a scan or sweep holds the store's transaction (from its per-file hook):
        examined with its own source and committed at once, together with what the scan has done."""
        saved = self.scanner.source
        self.scanner.source = source
        try:
            self.scanner.observe(walk_item(path), stats)
        except Exception as exc:  # a bug must not end the scan
            log.exception("internal error on %r", path)
            stats.statuses["PARSE_ERROR"] += 1
            stats.errors_total += 1
            stats.errors.append({"path": path, "status": "PARSE_ERROR", "detail": f"internal: {exc}"})
        finally:
            self.scanner.source = saved
        self.scanner.flush()
        self.store.begin()
        self._report_findings()

    def scan(
        self,
        roots: Iterable[str],
        *,
        source: str = "scan",
        skip_dirs: frozenset[str] = frozenset(),
        per_file: FileHook | None = None,
    ) -> ScanStats:
        """A walk of ``roots`` through the scanner (the file cache skips what did not change)."""

        def progress(stats: ScanStats, path: str) -> None:
            self._report_findings()
            if per_file is not None:
                per_file(stats, path)

        self.scanner.source = source
        try:
            return self.scanner.scan(
                roots, skip_dirs=skip_dirs, follow_symlinks=self.settings.follow_symlinks, progress=progress
            )
        finally:
            self.scanner.source = "scan"
            self._report_findings()


def process_observation_key(path: str, pid: int, create_time: float) -> tuple[str, int, float]:
    return (path, pid, create_time)


class ProcessSweep:
    """Sweeps of the running processes' files through the pipeline, Source ``process``.

    A (file, process) pair seen for the first time is examined with its process columns even
    when the file itself is cached (a signed one re-emits its rows for that process); later
    sweeps leave it to the cache and ``reobserve_interval``, so a long-running process does not
    add rows at every sweep."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.seen: set[tuple[str, int, float]] = set()
        self.last_rows: list[dict[str, Any]] = []  # the rows the last sweep stored

    def run(
        self, *, per_file: FileHook | None = None, skip_pids: frozenset[int] = frozenset()
    ) -> tuple[ScanStats, Any]:
        import time

        from agent.sources.processes import SweepCounters, iter_process_files

        p = self.pipeline
        stats, counters = ScanStats(), SweepCounters()
        seen_now: set[tuple[str, int, float]] = set()
        self.last_rows = []
        p.scanner.source = "process"
        p.store.begin()
        try:
            for n, pf in enumerate(iter_process_files(counters, skip_pids=skip_pids), start=1):
                key = process_observation_key(pf.path, pf.process.pid, pf.create_time)
                seen_now.add(key)
                cached = p.scanner.cache.get(pf.path)
                force = key not in self.seen and (cached is None or bool(cached.facts))
                try:
                    rows = p.scanner.observe(walk_item(pf.path), stats, process=pf.process, force=force)
                    self.last_rows.extend(rows)
                except Exception as exc:  # a bug must not end the sweep
                    log.exception("internal error on %r", pf.path)
                    stats.statuses["PARSE_ERROR"] += 1
                    stats.errors_total += 1
                    stats.errors.append({"path": pf.path, "status": "PARSE_ERROR", "detail": f"internal: {exc}"})
                p._report_findings()
                if n % 500 == 0:
                    p.scanner.flush()
                    p.store.begin()
                if per_file is not None:
                    per_file(stats, pf.path)
        finally:
            p.scanner.flush()
            p.scanner.source = "scan"
            stats.elapsed = time.time() - stats.started
        self.seen = seen_now  # processes that ended are forgotten; a new one with the same pid differs in start time
        return stats, counters

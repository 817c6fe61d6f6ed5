"""The scan pipeline: paths -> facts -> rows -> rule hits -> store, with per-file fault isolation.

Every walked file ends in exactly one status. An unchanged file (same device, inode, size
and mtime as in the file cache) is not opened again; its cached facts re-emit rows at most
once per ``reobserve_interval``.
"""

from __future__ import annotations

import datetime as dt
import errno
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.extract.authenticode import FileFacts, TrustVerifier, extract_stream
from agent.extract.sniff import HEADER_BYTES, classify
from agent.platform import SpecialFile, open_regular
from agent.rows import Device, ProcessContext, build_rows
from agent.rules.loader import Rule
from agent.schema import FILE_STATUSES
from agent.sources.walk import WalkCounters, WalkItem, iter_files
from agent.store import CacheEntry, Store, facts_from_json, facts_to_json

log = logging.getLogger(__name__)

COMMIT_EVERY_FILES = 2000
MAX_ERRORS_KEPT = 10_000


@dataclass
class ScanStats:
    files: int = 0
    pe_files: int = 0
    msi_files: int = 0
    signed_files: int = 0
    rows: int = 0
    findings: int = 0  # rule hits on rows not excluded
    excluded_hits: int = 0
    parsed: int = 0  # files opened and parsed in this scan
    unchanged: int = 0  # files recognised from the cache and not opened
    bytes_read_files: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    walk: WalkCounters = field(default_factory=WalkCounters)
    errors: list[dict[str, str]] = field(default_factory=list)  # per-file problems, capped
    errors_total: int = 0
    started: float = field(default_factory=time.time)
    elapsed: float = 0.0

    @property
    def files_per_second(self) -> float:
        return self.files / self.elapsed if self.elapsed > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "pe_files": self.pe_files,
            "msi_files": self.msi_files,
            "signed_files": self.signed_files,
            "rows": self.rows,
            "findings": self.findings,
            "excluded_hits": self.excluded_hits,
            "parsed": self.parsed,
            "unchanged": self.unchanged,
            "statuses": {s: self.statuses.get(s, 0) for s in FILE_STATUSES},
            "directories": self.walk.directories,
            "symlinks_skipped": self.walk.symlinks_skipped,
            "mounts_skipped": self.walk.mounts_skipped,
            "directory_errors": self.walk.directory_errors,
            "errors_total": self.errors_total,
            "elapsed_seconds": round(self.elapsed, 3),
            "files_per_second": round(self.files_per_second, 1),
        }


Clock = Callable[[], dt.datetime]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Matcher:
    """Streams each new row through every rule's row filter and the exclusions."""

    def __init__(self, rules: Sequence[Rule], exclusions: Sequence[Any] = ()) -> None:
        self.rules = list(rules)
        self.exclusions = list(exclusions)

    def match(self, row: dict[str, Any], now: dt.datetime) -> list[tuple[Rule, list[dict[str, Any]], str | None]]:
        """[(rule, evidence, exclusion id or None)] for every rule the row hits."""
        out = []
        for rule in self.rules:
            evidence = rule.query.filter_row(row, now=now)
            if evidence is None:
                continue
            excl = None
            for exclusion in self.exclusions:
                if exclusion.applies(row, rule.id):
                    excl = exclusion.id
                    break
            out.append((rule, [evidence_dict(e) for e in evidence], excl))
        return out


def evidence_dict(e: Any) -> dict[str, Any]:
    """One Evidence as plain data: the column, its value, the operator and the pattern."""
    return {"column": e.column, "value": e.value, "operator": e.operator, "pattern": e.pattern}


def examine_path(
    path: str,
    ident: tuple[int, int, int, int],
    *,
    verifier: TrustVerifier | None,
    max_file_size: int,
    time_budget: float,
) -> tuple[str, FileFacts | None, str, tuple[int, int, int, int]]:
    """(status, facts or None, detail, (st_dev, st_ino, size, mtime_ns)) for one path.
    Opens without blocking or following a final symlink; never raises for the file's sake."""
    try:
        fd, st = open_regular(path)
    except SpecialFile as exc:
        return "NOT_PE", None, f"{exc}: not read", ident
    except OSError as exc:
        vanished = isinstance(exc, FileNotFoundError) or exc.errno in (errno.ENOENT, errno.ENOTDIR)
        return ("VANISHED" if vanished else "ACCESS_DENIED"), None, exc.strerror or str(exc), ident
    ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    try:
        # Most files are not PE: decide from the first bytes before building a file object.
        # The size cap applies to PE/MSI candidates; a huge archive is simply NOT_PE.
        if classify(os.read(fd, HEADER_BYTES)) is None:
            return "NOT_PE", None, "", ident
        if st.st_size > max_file_size:
            return "TOO_LARGE", None, f"{st.st_size} bytes > cap {max_file_size}", ident
        os.lseek(fd, 0, os.SEEK_SET)
        with os.fdopen(fd, "rb", buffering=65536, closefd=True) as stream:
            fd = -1
            facts = extract_stream(stream, st.st_size, verifier=verifier, time_budget=time_budget)
        return facts.status, facts, facts.detail, ident
    except FileNotFoundError as exc:
        return "VANISHED", None, str(exc), ident
    except OSError as exc:
        return "ACCESS_DENIED", None, f"read failed: {exc.strerror or exc}", ident
    finally:
        if fd >= 0:
            os.close(fd)


class Scanner:
    def __init__(
        self,
        store: Store,
        device: Device,
        matcher: Matcher,
        verifier: TrustVerifier | None,
        *,
        max_file_size: int,
        file_time_budget: float,
        reobserve_interval: float,
        source: str = "scan",
        clock: Clock = utc_now,
    ) -> None:
        self.store = store
        self.device = device
        self.matcher = matcher
        self.verifier = verifier
        self.max_file_size = max_file_size
        self.file_time_budget = file_time_budget
        self.reobserve = dt.timedelta(seconds=reobserve_interval)
        self.source = source
        self.clock = clock
        self._cache: dict[str, CacheEntry] | None = None
        self._pending_cache: list[tuple[str, CacheEntry]] = []

    @property
    def cache(self) -> dict[str, CacheEntry]:
        if self._cache is None:
            self._cache = self.store.load_cache(self.device.device_id)
        return self._cache

    # --- one file
    def _examine(self, item: WalkItem) -> tuple[str, FileFacts | None, str, tuple[int, int, int, int]]:
        return examine_path(
            item.path,
            (item.st_dev, item.st_ino, item.size, item.mtime_ns),
            verifier=self.verifier,
            max_file_size=self.max_file_size,
            time_budget=self.file_time_budget,
        )

    def observe(
        self, item: WalkItem, stats: ScanStats, *, process: ProcessContext | None = None, force: bool = False
    ) -> list[dict[str, Any]]:
        """Take one walked item to its final status; store rows and hits. Returns the new rows."""
        stats.files += 1
        if item.status:  # the walk already knows (special file, stat failed)
            self._record(stats, item.path, item.status, item.detail, "")
            return []
        cached = self.cache.get(item.path)
        if cached is not None and not force and cached.same_file(item.st_dev, item.st_ino, item.size, item.mtime_ns):
            stats.unchanged += 1
            self._record(stats, item.path, cached.status, "", cached.kind)
            if not cached.facts:
                return []
            now = self.clock()
            if not self._due(cached, now):
                return []
            self._remember(item.path, cached._replace(last_emitted=now.isoformat()))
            return self._emit(facts_from_json(cached.facts), item.path, now, stats, process)
        stats.parsed += 1
        status, facts, detail, ident = self._examine(item)
        kind = facts.kind if facts is not None else ""
        self._record(stats, item.path, status, detail, kind)
        signed = facts is not None and status == "OK"
        now = self.clock()
        if status not in ("ACCESS_DENIED", "VANISHED", "TIMEOUT"):  # worth another try next time
            self._remember(
                item.path,
                CacheEntry(
                    *ident,
                    status=status,
                    kind=kind,
                    facts=facts_to_json(facts) if signed and facts else None,
                    last_emitted=now.isoformat() if signed else None,
                ),
            )
        return self._emit(facts, item.path, now, stats, process) if signed and facts else []

    def _due(self, cached: CacheEntry, now: dt.datetime) -> bool:
        return cached.last_emitted is None or now - dt.datetime.fromisoformat(cached.last_emitted) >= self.reobserve

    def _remember(self, path: str, entry: CacheEntry) -> None:
        self.cache[path] = entry
        self._pending_cache.append((path, entry))

    @staticmethod
    def _record(stats: ScanStats, path: str, status: str, detail: str, kind: str) -> None:
        stats.statuses[status] += 1
        if kind == "PE":
            stats.pe_files += 1
        elif kind == "MSI":
            stats.msi_files += 1
        if status == "OK":
            stats.signed_files += 1
        if status not in ("OK", "NOT_PE", "NOT_SIGNED"):
            stats.errors_total += 1
            if len(stats.errors) < MAX_ERRORS_KEPT:
                stats.errors.append({"path": path, "status": status, "detail": detail})

    def _emit(
        self, facts: FileFacts, path: str, now: dt.datetime, stats: ScanStats, process: ProcessContext | None
    ) -> list[dict[str, Any]]:
        rows = build_rows(facts, path, self.device, now, self.source, process)
        self.store_rows(rows, now, stats)
        return rows

    def store_rows(self, rows: list[dict[str, Any]], now: dt.datetime, stats: ScanStats) -> None:
        matches = [self.matcher.match(row, now) for row in rows]
        for row, hits in zip(rows, matches, strict=True):
            if hits and all(excl is not None for _r, _e, excl in hits):
                row["Excluded"], row["ExclusionId"] = True, hits[0][2]
        self.store.insert_rows(rows)  # assigns ReportId
        records = []
        for row, hits in zip(rows, matches, strict=True):
            for rule, evidence, excl in hits:
                records.append((row["DeviceId"], row["ReportId"], rule.id, rule.name, evidence, excl))
                if excl is None:
                    stats.findings += 1
                else:
                    stats.excluded_hits += 1
        self.store.insert_hits(records)
        self.store.queue_outbox(rows, {(r[0], r[1]) for r in records if r[5] is None})  # fleet: same transaction
        stats.rows += len(rows)

    # --- a whole walk
    def scan(
        self,
        roots: Iterable[str],
        *,
        skip_dirs: frozenset[str] = frozenset(),
        follow_symlinks: bool = False,
        progress: Callable[[ScanStats, str], None] | None = None,
    ) -> ScanStats:
        stats = ScanStats()
        dir_errors: list[tuple[str, str]] = []
        self._pending_cache = []
        self.store.begin()
        try:
            for n, item in enumerate(
                iter_files(
                    roots, follow_symlinks=follow_symlinks, skip_dirs=skip_dirs, counters=stats.walk, errors=dir_errors
                ),
                start=1,
            ):
                try:
                    self.observe(item, stats)
                except Exception as exc:  # a bug must not end the scan: the file gets a status
                    log.exception("internal error on %s", item.path)
                    stats.statuses["PARSE_ERROR"] += 1
                    stats.errors_total += 1
                    stats.errors.append({"path": item.path, "status": "PARSE_ERROR", "detail": f"internal: {exc}"})
                if n % COMMIT_EVERY_FILES == 0:
                    self.flush()
                    self.store.begin()
                if progress is not None:
                    progress(stats, item.path)
        finally:
            self.flush()
            stats.elapsed = time.time() - stats.started
        for path, message in dir_errors:
            stats.errors_total += 1
            if len(stats.errors) < MAX_ERRORS_KEPT:
                stats.errors.append({"path": path, "status": "DIRECTORY_ERROR", "detail": message})
        return stats

    def flush(self) -> None:
        if self._pending_cache:
            self.store.put_cache(self.device.device_id, self._pending_cache)
            self._pending_cache = []
        self.store.commit()

"""The scan pipeline: paths -> facts -> rows -> rule hits -> store, with per-file fault isolation.

Every walked file ends in exactly one status. An unchanged file (same device, inode, size
and mtime as in the file cache) is not opened again; its cached facts re-emit rows at most
once per ``reobserve_interval``.

A scan answers for the disk as it is now: ``ScanStats.current`` holds (FolderPath, SHA256) of
every signed file seen in it (cached ones included), and a signed file seen before under a
scanned root that is gone or holds other content is recorded as gone (``Store.record_gone``,
``ScanStats.gone``); its rows stay. Without hashes (``--no-verify``) SHA256 is "", so a
content change at the same path is not told apart.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import logging
import os
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent import filecache
from agent.extract.facts import FileFacts
from agent.extract.sniff import HEADER_BYTES, classify, read_pe_header
from agent.extract.verifier import AnyVerifier, resolve_verifier
from agent.platform import SpecialFile, open_regular
from agent.rows import Device, ProcessContext, build_rows
from agent.rules.index import RuleIndex
from agent.rules.loader import Rule
from agent.schema import FILE_STATUSES
from agent.sources import prefetch
from agent.sources.walk import WalkCounters, WalkItem, iter_batches, status_of
from agent.store import CacheEntry, Store, StoreError, facts_from_json, facts_to_json
from agent.textenc import encodable, escape_path

if TYPE_CHECKING:
    from agent.extract.authenticode import TrustVerifier
    from agent.settings import Settings

log = logging.getLogger(__name__)

# Commit at least this often, so a kill or a fault loses seconds of work, not thousands of files.
COMMIT_EVERY_FILES = 500
COMMIT_EVERY_SECONDS = 1.0
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
    content_hits: int = 0  # candidates whose facts came from an identical file earlier in this scan
    statuses: Counter[str] = field(default_factory=Counter)
    walk: WalkCounters = field(default_factory=WalkCounters)
    errors: list[dict[str, str]] = field(default_factory=list)  # per-file problems, capped
    errors_total: int = 0
    started: float = field(default_factory=time.time)
    elapsed: float = 0.0
    # What is on disk now: (FolderPath, SHA256) of every signed file seen in this scan, cached
    # unchanged files included (SHA256 is "" when it was not computed, e.g. --no-verify).
    # Only signed files: a few thousand entries, never every path.
    current: set[tuple[str, str]] = field(default_factory=set)
    # Signed files seen before under a scanned root and gone (or changed) in this scan:
    # (FolderPath, SHA256, when it was found gone).
    gone: list[tuple[str, str, dt.datetime]] = field(default_factory=list)

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
            "gone": len(self.gone),
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
        self.index = RuleIndex(self.rules)  # only the rules whose terms occur in a row are evaluated

    def match(self, row: dict[str, Any], now: dt.datetime) -> list[tuple[Rule, list[dict[str, Any]], str | None]]:
        """[(rule, evidence, exclusion id or None)] for every rule the row hits."""
        out = []
        for rule in self.index.candidates(row):
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
    """One Evidence as plain data: the column, its value, the operator and the pattern.
    A value holding undecodable bytes (a path) is kept in the path escape: evidence is text."""
    value = e.value
    if isinstance(value, str) and not encodable(value):
        value = escape_path(value)
    return {"column": e.column, "value": value, "operator": e.operator, "pattern": e.pattern}


# perf: the first read takes one page, not just the magic: it holds the PE headers (so an unsigned
# PE is told from a signed one without another read) and, for a small file, the whole content.
PROBE_BYTES = 4096
# A batch record costs a digest, a summary and a row (~70 us of CPU per directory on a first scan);
# a smaller directory is re-scanned file by file instead. /usr/lib (60,263 files in 10,432
# directories), warm first scan, CPU median of 5: 3.18 s before batch records, 4.14 s with every
# batch recorded, 3.60 s with this threshold.
MIN_RECORDED_BATCH = 16
_READ_CHUNK = 1 << 20


class ContentCache:
    """Signer facts of this scan's files by content: (size, SHA-256 of the whole file) -> FileFacts.

    Real trees hold many byte-identical signed files (WinSxS, copies of one application, node_modules,
    per-user caches); parsing and verifying one costs milliseconds, hashing it from the page cache
    microseconds. A hit re-uses the facts, which hold nothing about the path (rows take the path from
    the walk). Bounded in entries and in bytes (the facts' JSON size); least recently used go first.
    Only outcomes that are a function of the bytes are kept: OK, NOT_SIGNED, NOT_PE, never TIMEOUT
    or an error. One cache per scan, so the verifier and the caps are the same for every entry."""

    CACHEABLE = frozenset({"OK", "NOT_SIGNED", "NOT_PE"})

    def __init__(self, max_entries: int = 4096, max_bytes: int = 32 << 20, max_file_size: int = 16 << 20) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_file_size = max_file_size  # files up to this size are read whole (memory per file)
        self._entries: OrderedDict[tuple[int, bytes], tuple[FileFacts, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[int, bytes]) -> FileFacts | None:
        found = self._entries.get(key)
        if found is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return found[0]

    def put(self, key: tuple[int, bytes], facts: FileFacts) -> None:
        if facts.status not in self.CACHEABLE or key in self._entries:
            return
        cost = 256 + (len(facts_to_json(facts)) if facts.signatures else 0)
        if cost > self.max_bytes:
            return
        self._entries[key] = (facts, cost)
        self.bytes += cost
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            _key, (_facts, old) = self._entries.popitem(last=False)
            self.bytes -= old


def _may_be_signed(head: bytes, size: int) -> bool:
    """False when the PE headers within ``head`` show no certificate table (or no PE at all), so
    there is nothing to hash or verify; True when they show one or cannot be read from ``head``
    (then the parser decides)."""
    if head[:2] != b"MZ":
        return True  # OLE: is_msi needs the whole compound file
    (pe_offset,) = struct.unpack_from("<I", head, 0x3C)
    if pe_offset + 24 + 240 > len(head):
        return True
    try:
        pe = read_pe_header(io.BytesIO(head), size, head[:HEADER_BYTES])
    except Exception:  # malformed: the parser reports it
        return True
    return pe is not None and pe.cert_table_size > 0


class _Grew(Exception):
    """The file grew past the size read whole while it was read."""


def _read_rest(fd: int, head: bytes, deadline: float | None, limit: int) -> bytes | None:
    """The whole file from its first bytes already read; None when the time budget ran out.
    Raises ``_Grew`` past ``limit`` bytes (a file being written to)."""
    parts = [head]
    total = len(head)
    while True:
        chunk = os.read(fd, _READ_CHUNK)
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
        total += len(chunk)
        if total > limit:
            raise _Grew
        if deadline is not None and time.monotonic() > deadline:
            return None


def _examine_content(
    fd: int,
    head: bytes,
    size: int,
    kind: str,
    content: ContentCache,
    *,
    verifier: TrustVerifier | None,
    time_budget: float,
    caps: Mapping[str, int] | None,
) -> FileFacts:
    """A candidate read whole and looked up by content; a miss is parsed from memory."""
    from agent.extract.authenticode import extract_stream

    start = time.monotonic()
    deadline = start + time_budget if time_budget else None
    data = _read_rest(fd, head, deadline, content.max_file_size)
    if data is None:
        guess = "PE" if kind == "MZ" else "MSI"
        return FileFacts("TIMEOUT", guess, size, detail="time budget exceeded while reading the file")
    key = (len(data), hashlib.sha256(data).digest())
    facts = content.get(key)
    if facts is not None:
        return facts
    budget = time_budget - (time.monotonic() - start) if time_budget else time_budget
    if time_budget and budget <= 0:
        guess = "PE" if kind == "MZ" else "MSI"
        return FileFacts("TIMEOUT", guess, len(data), detail="time budget exceeded while reading the file")
    facts = extract_stream(io.BytesIO(data), len(data), verifier=verifier, time_budget=budget, **(caps or {}))
    content.put(key, facts)
    return facts


def examine_path(
    path: str,
    ident: tuple[int, int, int, int],
    *,
    verifier: AnyVerifier,
    max_file_size: int,
    time_budget: float,
    dir_fd: int | None = None,
    name: str | None = None,
    follow_symlinks: bool = False,
    caps: Mapping[str, int] | None = None,
    content: ContentCache | None = None,
) -> tuple[str, FileFacts | None, str, tuple[int, int, int, int]]:
    """(status, facts or None, detail, (st_dev, st_ino, size, mtime_ns)) for one path.

    Opens without blocking and, unless ``follow_symlinks``, without following a final symlink.
    With ``dir_fd`` the file is opened as ``name`` relative to that directory (the walk's way,
    which works past PATH_MAX); ``path`` is then only its name for people. Never raises for the
    file's sake: a symlink loop is NOT_PE "symlink loop: not read", a dangling symlink is
    VANISHED "dangling symlink", a symlink not followed is NOT_PE "symlink (not followed): not read".

    With ``content`` (a scan's ``ContentCache``) and a verifier, a candidate that may be signed and is
    at most ``content.max_file_size`` bytes is read whole and its facts looked up by content first."""
    try:
        if dir_fd is not None and dir_fd >= 0:
            fd, st = open_regular(name or os.path.basename(path), dir_fd=dir_fd, follow_symlinks=follow_symlinks)
        else:
            fd, st = open_regular(path, follow_symlinks=follow_symlinks)
    except SpecialFile as exc:
        return "NOT_PE", None, f"{exc}: not read", ident
    except OSError as exc:
        status, detail = status_of(exc)
        return status, None, detail, ident
    size = st.st_size
    ident = (st.st_dev, st.st_ino, size, st.st_mtime_ns)
    try:
        # Most files are not PE: decide from the first bytes before building a file object.
        # The size cap applies to PE/MSI candidates; a huge archive is simply NOT_PE.
        head = os.read(fd, PROBE_BYTES)
        kind = classify(head[:HEADER_BYTES])
        if kind is None:
            return "NOT_PE", None, "", ident
        if size > max_file_size:
            return "TOO_LARGE", None, f"{size} bytes > cap {max_file_size}", ident
        from agent.extract.authenticode import extract_stream  # start-up: signify only once a PE/MSI is met

        verifying = resolve_verifier(verifier)
        facts = None
        # by content only when verifying: reading signers alone (fastder) costs less than reading and
        # hashing the whole file, and --no-verify never reads past the certificate table otherwise
        by_content = content if verifying is not None else None
        if by_content is not None and size <= by_content.max_file_size and _may_be_signed(head, size):
            with contextlib.suppress(_Grew):  # being written to: read as a stream below, like a large file
                facts = _examine_content(
                    fd, head, size, kind, by_content, verifier=verifying, time_budget=time_budget, caps=caps
                )
        if facts is None and len(head) == size:  # the first read holds the whole file: parse it from memory
            facts = extract_stream(io.BytesIO(head), size, verifier=verifying, time_budget=time_budget, **(caps or {}))
        elif facts is None:
            os.lseek(fd, 0, os.SEEK_SET)
            with os.fdopen(fd, "rb", buffering=65536, closefd=True) as stream:
                fd = -1
                facts = extract_stream(stream, size, verifier=verifying, time_budget=time_budget, **(caps or {}))
        return facts.status, facts, facts.detail, ident
    except FileNotFoundError as exc:
        return "VANISHED", None, str(exc), ident
    except OSError as exc:
        return "ACCESS_DENIED", None, f"read failed: {exc.strerror or exc}", ident
    finally:
        if fd >= 0:
            os.close(fd)


# What a path that held a signed file holds after this scan (for "gone" detection).
_SAME, _CHANGED, _MISSING, _UNKNOWN = "same", "changed", "missing", "unknown"
_OUTCOME_OF_STATUS = {
    "NOT_PE": _CHANGED,
    "NOT_SIGNED": _CHANGED,
    "PARSE_ERROR": _CHANGED,
    "VANISHED": _MISSING,
    # ACCESS_DENIED, TOO_LARGE, TIMEOUT without signer facts: the content is not known
}


def _sha256_of(cached: CacheEntry) -> str:
    return str(json.loads(cached.facts or "{}").get("sha256", ""))


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == root or path.startswith(root if root.endswith(os.sep) else root + os.sep) for root in roots)


# sweep seam: (item, *, verifier, max_file_size, time_budget) -> the examine_path result
Examine = Callable[..., tuple[str, FileFacts | None, str, tuple[int, int, int, int]]]


class Scanner:
    def __init__(
        self,
        store: Store,
        device: Device,
        matcher: Matcher,
        verifier: AnyVerifier,
        *,
        max_file_size: int,
        file_time_budget: float,
        reobserve_interval: float,
        source: str = "scan",
        clock: Clock = utc_now,
        caps: Mapping[str, int] | None = None,
        examine: Examine | None = None,
        prefetch_threads: int = prefetch.DEFAULT_THREADS,
    ) -> None:
        self.caps = dict(caps or {})  # certificate-table caps for extract_stream (Settings.extract_caps)
        self.store = store
        self.device = device
        self.matcher = matcher
        self.verifier = verifier
        self.max_file_size = max_file_size
        self.file_time_budget = file_time_budget
        self.reobserve = dt.timedelta(seconds=reobserve_interval)
        self.source = source
        self.clock = clock
        # sweep seam: a source that is not a host path (a disk image) reads its own items
        self.examine_hook = examine
        self.prefetch_threads = prefetch_threads  # perf: parallel I/O ahead of the scan (0: none)
        self._cache: dict[str, CacheEntry] | None = None
        self._pending_cache: list[tuple[str, CacheEntry]] = []
        # perf: the cache is looked up a batch at a time (agent.filecache), never loaded whole
        # (unless something reads ``cache``); entries written but not flushed yet are found here.
        self._pending_by_path: dict[str, CacheEntry] = {}
        self._last_commit = 0.0
        # During a scan: what each previously signed path holds now (bounded by signed files).
        self._outcomes: dict[str, str] | None = None
        self._previous: dict[str, str] = {}  # path -> SHA256 of the signed file cached before this scan
        self._missing: set[str] = set()  # of those, the paths the walk has not reached
        self._returned: set[tuple[str, str]] = set()
        self._content: ContentCache | None = None  # during a scan: facts by content (perf)
        # perf (re-scan): batch records to write / drop at the next flush (agent.filecache.batch_digest)
        self._pending_dirs: list[tuple[str, bytes, str]] = []
        self._dropped_dirs: list[str] = []
        self._batch_entries: dict[str, CacheEntry] | None = None  # cache entries written for the current batch

    @property
    def cache(self) -> dict[str, CacheEntry]:
        if self._cache is None:
            self._cache = self.store.load_cache(self.device.device_id)
        return self._cache

    # --- perf: the file cache looked up per batch instead of loaded whole
    def _lookup(self, paths: Sequence[str]) -> dict[str, CacheEntry]:
        if self._cache is not None:
            cache = self._cache
            return {p: cache[p] for p in paths if p in cache}
        found = filecache.lookup(self.store.db, self.device.device_id, paths)
        for p in paths:
            if p in self._pending_by_path:
                found[p] = self._pending_by_path[p]
        return found

    # --- one file
    def _examine(self, item: WalkItem) -> tuple[str, FileFacts | None, str, tuple[int, int, int, int]]:
        if self.examine_hook is not None:  # sweep seam
            return self.examine_hook(
                item,
                verifier=self.verifier,
                max_file_size=self.max_file_size,
                time_budget=self.file_time_budget,
                caps=self.caps,
            )
        return examine_path(
            item.path,
            (item.st_dev, item.st_ino, item.size, item.mtime_ns),
            verifier=self.verifier,
            max_file_size=self.max_file_size,
            time_budget=self.file_time_budget,
            dir_fd=item.dir_fd if item.dir_fd >= 0 else None,
            name=item.name or None,
            follow_symlinks=item.follow,
            caps=self.caps,
            content=self._content,
        )

    def observe(
        self, item: WalkItem, stats: ScanStats, *, process: ProcessContext | None = None, force: bool = False
    ) -> list[dict[str, Any]]:
        """Take one walked item to its final status; store rows and hits. Returns the new rows."""
        cached = None if item.status else self._lookup([item.path]).get(item.path)
        return self._observe(item, stats, cached, None, process=process, force=force)

    def _observe(
        self,
        item: WalkItem,
        stats: ScanStats,
        cached: CacheEntry | None,
        now: dt.datetime | None,
        *,
        process: ProcessContext | None = None,
        force: bool = False,
    ) -> list[dict[str, Any]]:
        """``observe`` with the cache entry already looked up and, in a scan, one clock read per batch."""
        stats.files += 1
        if item.status:  # the walk already knows (special file, stat failed)
            self._record(stats, item.path, item.status, item.detail, "")
            self._outcome(item.path, _OUTCOME_OF_STATUS.get(item.status, _UNKNOWN))
            return []
        if cached is not None and not force and cached.same_file(item.st_dev, item.st_ino, item.size, item.mtime_ns):
            stats.unchanged += 1
            self._record(stats, item.path, cached.status, "", cached.kind)
            self._outcome(item.path, _SAME)
            if not cached.facts:
                return []
            stats.current.add((item.path, _sha256_of(cached)))
            now = now or self.clock()
            if not self._due(cached, now):
                return []
            self._remember(item.path, cached._replace(last_emitted=now.isoformat()))
            return self._emit(facts_from_json(cached.facts), item.path, now, stats, process)
        stats.parsed += 1
        status, facts, detail, ident = self._examine(item)
        return self.observe_facts(item.path, status, facts, detail, ident, stats, process=process, now=now)

    def observe_facts(
        self,
        path: str,
        status: str,
        facts: FileFacts | None,
        detail: str,
        ident: tuple[int, int, int, int],
        stats: ScanStats,
        *,
        process: ProcessContext | None = None,
        now: dt.datetime | None = None,
    ) -> list[dict[str, Any]]:
        """Record what examining one file gave; store its rows and hits. Rows are emitted
        whenever signer facts exist, whatever the status: a file whose hashing ran out of time
        (TIMEOUT, digest unknown) still has a Signer worth a row."""
        kind = facts.kind if facts is not None else ""
        self._record(stats, path, status, detail, kind)
        has_signers = facts is not None and bool(facts.signatures)
        now = now or self.clock()
        if has_signers and facts is not None:
            key = (path, facts.sha256)
            stats.current.add(key)
            if self._outcomes is not None:  # in a scan: no longer gone, if it was
                self._returned.add(key)
            previous = self._previous.get(path)
            if previous and facts.sha256 and previous != facts.sha256:
                self._outcome(path, _CHANGED)
            else:
                self._outcome(path, _SAME)
        else:
            self._outcome(path, _OUTCOME_OF_STATUS.get(status, _UNKNOWN))
        if status not in ("ACCESS_DENIED", "VANISHED", "TIMEOUT"):  # worth another try next time
            cacheable = has_signers and status == "OK"
            self._remember(
                path,
                CacheEntry(
                    *ident,
                    status=status,
                    kind=kind,
                    facts=facts_to_json(facts) if cacheable and facts else None,
                    last_emitted=now.isoformat() if cacheable else None,
                ),
            )
        return self._emit(facts, path, now, stats, process) if has_signers and facts else []

    def _outcome(self, path: str, outcome: str) -> None:
        if self._outcomes is not None and path in self._outcomes:
            self._outcomes[path] = outcome

    def _due(self, cached: CacheEntry, now: dt.datetime) -> bool:
        return cached.last_emitted is None or now - dt.datetime.fromisoformat(cached.last_emitted) >= self.reobserve

    def _remember(self, path: str, entry: CacheEntry) -> None:
        self._pending_by_path[path] = entry
        if self._batch_entries is not None:
            self._batch_entries[path] = entry
        if self._cache is not None:
            self._cache[path] = entry
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
        excluded: dict[tuple[str, int], dict[str, str]] = {}
        for device_id, report_id, rule_id, _name, _evidence, excl in records:
            if excl is not None:
                excluded.setdefault((device_id, report_id), {})[rule_id] = excl
        hit_keys = {(r[0], r[1]) for r in records if r[5] is None}
        self.store.queue_outbox(rows, hit_keys, excluded)  # fleet: same transaction
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
        roots = list(roots)
        stats = ScanStats()
        dir_errors: list[tuple[str, str]] = []
        self._pending_cache = []
        self._returned = set()
        content = self._content = ContentCache()
        # Signed files already known under the roots: the only ones that can be "gone".
        scanned = [os.path.abspath(r) for r in roots]
        signed = (
            filecache.iter_signed(self.store.db, self.device.device_id)
            if self._cache is None
            else ((p, e) for p, e in self._cache.items() if e.facts)
        )
        self._previous = {p: _sha256_of(e) for p, e in signed if _under(p, scanned)}
        self._outcomes = dict.fromkeys(self._previous, _UNKNOWN)
        self._missing = set(self._previous)
        self.store.begin()
        self._last_commit = time.monotonic()
        completed = False
        n = 0
        ordinal, last_dir = 0, ""
        pool = prefetch.Prefetcher(self.prefetch_threads) if self.prefetch_threads > 0 else None
        try:
            for batch in iter_batches(
                roots,
                follow_symlinks=follow_symlinks,
                skip_dirs=skip_dirs,
                counters=stats.walk,
                errors=dir_errors,
                stat_many=pool.map_ordered if pool is not None else None,
                warm_dirs=pool.warm_dirs if pool is not None else None,
            ):
                # perf: a batch recorded as all NOT_PE/NOT_SIGNED whose walked identities are unchanged
                # is counted from its record: no cache SELECT, no per-file work
                directory = os.path.dirname(batch[0].path)
                ordinal = ordinal + 1 if directory == last_dir else 0
                last_dir = directory
                recorded = self.examine_hook is None and len(batch) >= MIN_RECORDED_BATCH
                key = filecache.batch_key(directory, ordinal) if recorded else ""
                record, digest = None, b""
                if key:
                    digest = filecache.batch_digest(batch)
                    record = filecache.lookup_dir(self.store.db, self.device.device_id, key)
                    if record is not None and record[0] == digest and self._replay(batch, record[1], stats, progress):
                        n += len(batch)
                        continue
                # perf: the pool warms the batch's files while this thread works through them;
                # one cache SELECT and one clock read per batch (one directory's files)
                cached = self._lookup([item.path for item in batch if not item.status])
                warming = []
                if pool is not None:  # only files that will be opened: not the unchanged ones
                    warming = pool.warm_batch([item for item in batch if not _unchanged(cached.get(item.path), item)])
                entries: dict[str, CacheEntry] = {}
                self._batch_entries = entries
                try:
                    self._scan_batch(batch, cached, stats, n, progress)
                finally:
                    self._batch_entries = None
                    prefetch.Prefetcher.wait(warming)  # done before the walk moves on (dir_fd)
                if key:
                    summary = _batch_summary(batch, cached, entries)
                    if summary is not None:
                        self._pending_dirs.append((key, digest, summary))
                    elif record is not None:
                        self._dropped_dirs.append(key)
                n += len(batch)
            completed = True
        finally:
            if pool is not None:
                pool.close()
            if completed:
                self._record_gone(stats)
            self.flush()
            self._outcomes, self._previous, self._missing = None, {}, set()
            self._pending_by_path = {}
            stats.content_hits = content.hits
            self._content = None
            stats.elapsed = time.time() - stats.started
        for path, message in dir_errors:
            stats.errors_total += 1
            if len(stats.errors) < MAX_ERRORS_KEPT:
                stats.errors.append({"path": path, "status": "DIRECTORY_ERROR", "detail": message})
        return stats

    def _scan_batch(
        self,
        batch: list[WalkItem],
        cached: dict[str, CacheEntry],
        stats: ScanStats,
        n: int,
        progress: Callable[[ScanStats, str], None] | None,
    ) -> None:
        now = self.clock()
        for item in batch:
            n += 1
            self._missing.discard(item.path)
            try:
                self._observe(item, stats, cached.get(item.path), now)
            except StoreError:
                raise  # the store itself failed (disk full, damaged, read-only): stop, committed work is kept
            except Exception as exc:  # a bug must not end the scan: the file gets a status
                log.exception("internal error on %s", escape_path(item.path))
                stats.statuses["PARSE_ERROR"] += 1
                stats.errors_total += 1
                stats.errors.append({"path": item.path, "status": "PARSE_ERROR", "detail": f"internal: {exc}"})
            if n % COMMIT_EVERY_FILES == 0 or time.monotonic() - self._last_commit >= COMMIT_EVERY_SECONDS:
                self.flush()
                self.store.begin()
                self._last_commit = time.monotonic()
            if progress is not None:
                progress(stats, item.path)

    def _replay(
        self, batch: list[WalkItem], summary: str, stats: ScanStats, progress: Callable[[ScanStats, str], None] | None
    ) -> bool:
        """Count a batch from its record (see ``_batch_summary``): what the per-file path records for
        unchanged files that are not signed; its signed files (unchanged too: the digest covers them)
        take the per-file path from their cache entries (re-emitted when due, "current" for gone
        detection). False, with nothing counted, when a file that was not signed held a signed one
        before this scan, or a signed one's cache entry is not there any more."""
        unchanged, count, counts, signed_at = json.loads(summary)
        if count != len(batch):
            return False
        signed = [batch[i] for i in signed_at]
        cached = self._lookup([item.path for item in signed]) if signed else {}
        if any(not _unchanged(cached.get(item.path), item) for item in signed):
            return False
        if self._outcomes and not self._outcomes.keys() & {item.path for item in batch} <= {i.path for i in signed}:
            return False
        stats.files += count - len(signed)
        stats.unchanged += unchanged
        for status, kind, k in counts:
            stats.statuses[status] += k
            if kind == "PE":
                stats.pe_files += k
            elif kind == "MSI":
                stats.msi_files += k
        if signed:
            now = self.clock()
            for item in signed:
                self._missing.discard(item.path)
                self._observe(item, stats, cached[item.path], now)
        if progress is not None:
            for item in batch:
                progress(stats, item.path)
        if time.monotonic() - self._last_commit >= COMMIT_EVERY_SECONDS:
            self.flush()
            self.store.begin()
            self._last_commit = time.monotonic()
        return True

    def _record_gone(self, stats: ScanStats) -> None:
        """Signed files known under the scanned roots that are gone now, or hold other content:
        recorded as gone (their rows stay); a missing one's cache entry is dropped, so a file
        that comes back is new again. A file the walk could not reach is gone only when the
        name itself no longer exists (an unreadable directory is not a deletion)."""
        assert self._outcomes is not None
        now = self.clock()
        gone: list[tuple[str, str, dt.datetime]] = []
        dropped: list[str] = []
        for path, outcome in self._outcomes.items():
            if path in self._missing:
                outcome = _MISSING if not _still_exists(path) else _UNKNOWN
            if outcome not in (_CHANGED, _MISSING):
                continue
            gone.append((path, self._previous[path], now))
            if outcome == _MISSING:
                dropped.append(path)
        for path in dropped:
            if self._cache is not None:
                self._cache.pop(path, None)
            self._pending_by_path.pop(path, None)
        if dropped:
            drop = set(dropped)
            self._pending_cache = [(p, e) for p, e in self._pending_cache if p not in drop]
            self.store.drop_cache(self.device.device_id, dropped)
        if gone:
            self.store.record_gone(self.device.device_id, gone)
        if self._returned:
            self.store.clear_gone(self.device.device_id, self._returned)
        stats.gone = gone

    def flush(self) -> None:
        if self._pending_cache:
            self.store.put_cache(self.device.device_id, self._pending_cache)
            self._pending_cache = []
        if self._dropped_dirs:
            self.store.drop_dirs(self.device.device_id, self._dropped_dirs)
            self._dropped_dirs = []
        if self._pending_dirs:
            self.store.put_dirs(self.device.device_id, self._pending_dirs)
            self._pending_dirs = []
        self._pending_by_path = {}
        self.store.commit()


_RECORDABLE = ("NOT_PE", "NOT_SIGNED")


def _batch_summary(batch: list[WalkItem], cached: dict[str, CacheEntry], entries: dict[str, CacheEntry]) -> str | None:
    """What a re-scan of this batch records when nothing in it changed, as JSON
    [unchanged, files, [[status, kind, count], ...], [index of each signed file]]; None unless every
    item ended NOT_PE or NOT_SIGNED, or OK with signer facts, with a cache entry for the walked
    identity (no error, nothing to try again). Signed files are only listed: a re-scan reads their
    cache entries (rows re-emitted when due)."""
    counts: Counter[tuple[str, str]] = Counter()
    unchanged = 0
    signed: list[int] = []
    for index, item in enumerate(batch):
        if item.status:
            if item.status != "NOT_PE":
                return None
            counts[(item.status, "")] += 1
            continue
        entry = entries.get(item.path) or cached.get(item.path)
        if entry is None or not _unchanged(entry, item):
            return None
        if entry.facts is not None and entry.status == "OK":
            signed.append(index)
            continue
        if entry.facts is not None or entry.status not in _RECORDABLE:
            return None
        counts[(entry.status, entry.kind)] += 1
        unchanged += 1
    return json.dumps([unchanged, len(batch), [[s, k, c] for (s, k), c in counts.items()], signed])


def _unchanged(cached: CacheEntry | None, item: WalkItem) -> bool:
    return cached is not None and cached.same_file(item.st_dev, item.st_ino, item.size, item.mtime_ns)


def _still_exists(path: str) -> bool:
    """True unless the name is certainly gone (ENOENT/ENOTDIR); unknown counts as existing."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True
    return True


def scanner_for(
    settings: Settings,
    store: Store,
    device: Device,
    matcher: Matcher,
    verifier: AnyVerifier,
    *,
    source: str = "scan",
    examine: Examine | None = None,
) -> Scanner:
    """The one place a Scanner is assembled from Settings (scan, the service, the sweep): the size
    cap, the per-file budget, the re-observe interval and the certificate-table caps."""
    return Scanner(
        store,
        device,
        matcher,
        verifier,
        max_file_size=settings.max_file_size,
        file_time_budget=settings.file_time_budget,
        reobserve_interval=settings.reobserve_interval,
        source=source,
        caps=settings.extract_caps,
        examine=examine,
    )

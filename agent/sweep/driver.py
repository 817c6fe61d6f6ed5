"""The sweep: one folder, mounted volume or disk image through the scan pipeline (same walk
statuses, caps, budget, extraction, rows and rules as ``scan``), into a temporary SQLite store
that is deleted afterwards. The host's own store and state directory are never opened.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from agent.settings import Settings
from agent.sweep.identity import (
    DeviceIdentity,
    RegistryIdentity,
    explain_registry_identity,
    folder_registry_identity,
    resolve_identity,
)

log = logging.getLogger(__name__)

COMMIT_EVERY_FILES = 2000
#: A sweep's ReportIds start at (sweep start, whole seconds since the epoch) * 2**20, so they
#: never collide with the swept machine's own agent (a counter from 1) nor with another sweep
#: of it, stay below 2**53 (exact in JavaScript), and re-importing one bundle repeats them.
REPORT_ID_SHIFT = 20


def report_id_base(started: dt.datetime) -> int:
    return int(started.timestamp()) << REPORT_ID_SHIFT


class SweepError(Exception):
    """A sweep that cannot start: names the source or setting (one line for the CLI)."""


@dataclass(frozen=True)
class RuleInfo:
    id: str
    name: str
    tool: str
    techniques: tuple[str, ...]
    file: str
    sha256: str


@dataclass
class SweepOutcome:
    source: dict[str, Any]  # path, kind, image type, size, sha256, volumes
    device: DeviceIdentity
    rows: list[dict[str, Any]]
    results: list[Any]  # agent.hunt.HuntResult
    stats: dict[str, Any]
    errors: list[dict[str, str]]
    rules: list[RuleInfo]
    started: dt.datetime
    ended: dt.datetime
    extra: dict[str, Any] = field(default_factory=dict)


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_sweep_rules(settings: Settings) -> tuple[list[Any], list[str]]:
    """(rules, warnings) from the settings' rule directories; SweepError when none is usable."""
    from agent.resources import rule_attribution_file
    from agent.rules.loader import load_rules

    attribution: Path | None = rule_attribution_file() if not settings.rules_dirs else None
    if attribution is not None and not attribution.exists():
        attribution = None
    for d in settings.rule_dirs_effective:
        if not d.is_dir():
            raise SweepError(f"rules directory not found: {d}")
    ruleset = load_rules(list(settings.rule_dirs_effective), attribution=attribution)
    if not ruleset.rules:
        raise SweepError("no usable rules: " + ", ".join(str(d) for d in settings.rule_dirs_effective))
    return list(ruleset.rules), [f"rule skipped: {p}" for p in ruleset.problems]


def load_sweep_exclusions(settings: Settings) -> list[Any]:
    if not settings.exclusions:
        return []
    from agent.exclusions import parse_exclusions

    text = settings.config_file.read_text(encoding="utf-8") if settings.config_file else None
    exclusions, problems = parse_exclusions(
        {"exclusions": list(settings.exclusions)}, path=str(settings.config_file), source_text=text
    )
    if problems:
        raise SweepError("; ".join(str(p) for p in problems))
    return list(exclusions)


def rule_infos(rules: Sequence[Any]) -> list[RuleInfo]:
    out = []
    for rule in rules:
        try:
            digest = sha256_file(rule.path)
        except OSError:
            digest = ""
        out.append(RuleInfo(rule.id, rule.name, rule.tool, tuple(rule.techniques), os.path.basename(rule.path), digest))
    return out


def source_kind(path: str) -> str:
    """``folder`` for a directory (a mounted volume included), ``image`` for a file or block device."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise SweepError(f"{path}: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(st.st_mode):
        return "folder"
    if stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return "image"
    raise SweepError(f"{path}: neither a folder nor a disk image file")


def _image_size(path: str) -> int:
    with open(path, "rb") as fh:
        return fh.seek(0, os.SEEK_END)


def _image_registry(image: Any) -> RegistryIdentity:
    """The identity of the Windows installation found on the image's volumes, if any."""
    from agent.sources.image import open_ci

    for volume, fs in image.open_filesystems():
        if not volume.windows:
            continue
        found = explain_registry_identity(partial(open_ci, fs), f"{volume.prefix} of the image")
        if found.computer_name or found.machine_guid:
            return found
    return RegistryIdentity()


def run_sweep(
    source: str,
    settings: Settings,
    *,
    device_name: str = "",
    device_id: str = "",
    progress: Callable[[Any, str], None] | None = None,
    hash_image: bool = True,
) -> SweepOutcome:
    """Sweep ``source`` and return everything the bundle holds. Raises SweepError on a source
    or setting that makes the sweep impossible; per-file problems are statuses."""
    from agent.extract.authenticode import TrustVerifier, load_roots
    from agent.hunt import run_hunt
    from agent.rows import Device
    from agent.scanner import Matcher, ScanStats, scanner_for
    from agent.sources.walk import iter_files
    from agent.store import Store

    started = dt.datetime.now(dt.UTC)
    kind = source_kind(source)
    rules, warnings = load_sweep_rules(settings)
    exclusions = load_sweep_exclusions(settings)
    abspath = os.path.abspath(source)
    info: dict[str, Any] = {"path": abspath, "kind": kind}
    image = None
    if kind == "image":
        from agent.sources.image import ImageError, ImageSource

        info["size"] = _image_size(abspath)
        if hash_image and os.path.isfile(abspath):
            info["sha256"] = sha256_file(abspath)
        try:
            image = ImageSource(abspath)
        except ImageError as exc:
            raise SweepError(str(exc)) from exc
        info["image_type"] = image.image_type
        info["volumes"] = [v.as_dict() for v in image.volumes]
        needs_registry = not (device_name and device_id)
        registry = _image_registry(image) if needs_registry else None
    else:
        info["image_type"] = "folder"
        registry = folder_registry_identity(abspath) if not (device_name and device_id) else None
    fallback = os.path.basename(abspath.rstrip(os.sep)) or "sweep"
    try:
        identity = resolve_identity(
            device_name=device_name, device_id=device_id, registry=registry, fallback_name=fallback
        )
    except ValueError as exc:
        raise SweepError(str(exc)) from exc
    device = Device(identity.device_id, identity.device_name)
    verifier = TrustVerifier(load_roots(settings.trusted_roots)) if settings.verify else None

    stats = ScanStats()
    dir_errors: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="rmmhunt-sweep-") as tmp:
        with Store(Path(tmp) / "sweep.sqlite3") as store:
            store.raise_report_ids(device.device_id, report_id_base(started))
            scanner = scanner_for(
                settings,
                store,
                device,
                Matcher(rules, exclusions),
                verifier,
                source="sweep",
                examine=image.examine if image is not None else None,
            )
            if image is not None:
                items: Iterable[Any] = image.iter_items(counters=stats.walk, errors=dir_errors)
            else:
                items = iter_files(
                    [abspath], follow_symlinks=settings.follow_symlinks, counters=stats.walk, errors=dir_errors
                )
            _observe_all(scanner, items, stats, progress)
            stats.elapsed = time.time() - stats.started
            now = dt.datetime.now(dt.UTC)
            rows = list(store.iter_rows())
            results = run_hunt(rows, rules, now=now, excluded_for=store.excluded_hits(), exclusions=exclusions)
    for path, message in dir_errors:
        stats.errors_total += 1
        stats.errors.append({"path": path, "status": "DIRECTORY_ERROR", "detail": message})
    summary = stats.as_dict()
    if kind == "folder":
        info["size"] = None
    ended = dt.datetime.now(dt.UTC)
    return SweepOutcome(
        source=info,
        device=identity,
        rows=rows,
        results=results,
        stats=summary,
        errors=list(stats.errors),
        rules=rule_infos(rules),
        started=started,
        ended=ended,
        extra={"warnings": warnings, "bytes_read": stats.bytes_read_files},
    )


def _observe_all(scanner: Any, items: Iterable[Any], stats: Any, progress: Callable[[Any, str], None] | None) -> None:
    """The scan loop over any source's items: per-file fault isolation, periodic commits."""
    scanner.store.begin()
    try:
        for n, item in enumerate(items, start=1):
            try:
                scanner.observe(item, stats)
            except Exception as exc:  # a bug must not end the sweep: the file gets a status
                log.exception("internal error on %s", item.path)
                stats.statuses["PARSE_ERROR"] += 1
                stats.errors_total += 1
                stats.errors.append({"path": item.path, "status": "PARSE_ERROR", "detail": f"internal: {exc}"})
            if n % COMMIT_EVERY_FILES == 0:
                scanner.flush()
                scanner.store.begin()
            if progress is not None:
                progress(stats, item.path)
    finally:
        scanner.flush()

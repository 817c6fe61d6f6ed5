"""`rmmhunt store check [--repair]`, and the one way commands open the store.

Readers (`rows`, `hunt`, `explain`, `status`, `store check`) open it read-only and never wait.
Writers (`scan`, `store check --repair`, and every later writing command) first take the state
directory's lock: a second writer prints one line ("waiting for the scan by pid N to finish...")
and waits up to ``lock_timeout`` seconds (default 60, set in the config's [agent] table), then
gives up with exit 2. See docs/store.md.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.settings import Settings
    from agent.store import Store

EXIT_CLEAN, EXIT_PROBLEMS, EXIT_ERROR = 0, 1, 2


def _say(message: str) -> None:
    print(f"rmmhunt: {message}", file=sys.stderr, flush=True)


def open_store(settings: Settings, *, write: bool, command: str = "scan") -> Store:
    """The store of ``settings.state_dir``: read-only for readers; for writers, with the writer lock
    held until the store is closed. Raises StoreError (one line) on every failure."""
    from agent.store import Store, StoreLock

    if not write:
        return Store(settings.database, readonly=True)
    lock = StoreLock(settings.state_dir, timeout=settings.lock_timeout, command=command, on_wait=_say)
    lock.acquire()
    return Store(settings.database, lock=lock, commit_interval=settings.commit_interval)


def add_parser(subparsers: Any) -> None:
    from agent.cli import _global_options  # the same global options as every command

    p = subparsers.add_parser("store", help="check or repair the local store", description="check or repair the store")
    _global_options(p, suppress=True)
    ssub = p.add_subparsers(dest="store_command", metavar="ACTION")
    ssub.required = True
    check = ssub.add_parser(
        "check",
        help="integrity, duplicate ReportIds, counters (exit 0 ok, 1 problems found, 2 error)",
        description="Check the store: SQLite integrity_check, duplicate ReportIds, repeated observations, "
        "a ReportId counter behind the ReportIds in use, hits without their row. Exit 0 ok, 1 problems, 2 error.",
    )
    _global_options(check, suppress=True)
    check.add_argument(
        "--repair",
        action="store_true",
        help="rebuild from what reads into a fresh store; the old files are moved aside, never deleted",
    )


def run(args: argparse.Namespace) -> int:
    from agent.cli import _settings
    from agent.store_repair import check_store

    settings = _settings(args)
    path = settings.database
    report = check_store(path)
    if not report.exists:
        print(f"{path}: no store yet")
        return EXIT_CLEAN
    if report.ok:
        print(f"{path}: ok (schema {report.schema_version}, {report.rows} rows, {report.hits} rule hits)")
        return EXIT_CLEAN
    for problem in report.problems:
        print(f"{path}: {problem}")
    if not args.repair:
        print(f"{path}: {len(report.problems)} problem(s): `rmmhunt store check --repair` rebuilds the store")
        return EXIT_PROBLEMS
    return _repair(settings)


def _repair(settings: Settings) -> int:
    from agent.store import StoreError, StoreLock
    from agent.store_repair import check_store, repair_store

    path = settings.database
    with StoreLock(settings.state_dir, timeout=settings.lock_timeout, command="store repair", on_wait=_say):
        done = repair_store(path)
    print(f"{path}: the damaged store was moved aside to {done.aside} (kept, never deleted)")
    print(
        f"{path}: rebuilt with {done.rows} rows and {done.hits} rule hits; "
        f"{done.skipped_ranges} unreadable stretch(es) skipped, {done.repeated_dropped} repeated observation(s) "
        f"dropped, {done.reassigned} row(s) given a new ReportId, {done.orphan_hits_dropped} rule hit(s) of lost rows "
        "dropped; file cache dropped (the next scan re-parses)"
    )
    for device_id, value in sorted(done.counters.items()):
        print(f"{path}: ReportId counter of device {device_id} set to {value}")
    if done.counters_lost:
        print(f"{path}: the counters were unreadable: new ReportIds start above {done.report_id_floor}")
    after = check_store(path)
    if not after.ok:
        raise StoreError(f"{path}: still damaged after the rebuild: {after.problems[0]}")
    return EXIT_CLEAN

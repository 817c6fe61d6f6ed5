"""`rmmhunt sweep SOURCE --out BUNDLE.zip` and `rmmhunt sweep --verify BUNDLE.zip`.

Exit codes: sweep 0 no findings, 1 findings, 2 error; verify 0 verified, 1 does not verify
(a member or the manifest changed), 2 cannot be read (not a zip, wrong passphrase).
The bundle passphrase comes from RMMHUNT_BUNDLE_PASSPHRASE or a prompt, never from argv.
"""

from __future__ import annotations

import argparse
import gc
import getpass
import logging
import os
import socket
import sys
import time
from typing import Any, TextIO

from agent.sweep.bundle import PASSPHRASE_ENV, BundleError

log = logging.getLogger(__name__)

EXIT_CLEAN, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from agent.cli import _global_options

    help_text = "offline sweep of a folder, mounted volume or disk image into a verifiable evidence bundle"
    p: argparse.ArgumentParser = subparsers.add_parser("sweep", help=help_text, description=help_text)
    _global_options(p, suppress=True)
    p.add_argument("source", nargs="?", metavar="SOURCE", help="folder, mounted volume, or disk image file")
    p.add_argument("--out", metavar="BUNDLE.zip", help="the bundle to write")
    p.add_argument("--verify", metavar="BUNDLE.zip", help="check a bundle against its manifest and exit")
    p.add_argument("--device-name", default="", help="DeviceName of the swept machine (default: its registry)")
    p.add_argument("--device-id", default="", help="DeviceId (40 hex) of the swept machine (default: its registry)")
    p.add_argument(
        "--encrypt",
        action="store_true",
        help=f"AES-256 encrypt the bundle; passphrase from {PASSPHRASE_ENV} or a prompt (never argv)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress line even on a terminal")
    p.add_argument("--no-verify-signatures", action="store_true", help="read signers only: no hashing, no trust check")
    return p


class SweepProgress:
    """One status line on a terminal (rich), redrawn at most five times a second."""

    def __init__(self, stream: TextIO) -> None:
        from rich.console import Console

        self.console = Console(file=stream, highlight=False)
        self.status = self.console.status("sweeping...")
        self.status.start()
        self.last = 0.0

    def __call__(self, stats: Any, path: str) -> None:
        now = time.monotonic()
        if now - self.last < 0.2:
            return
        self.last = now
        from rich.markup import escape

        from agent.textenc import display

        rate = stats.files / max(time.time() - stats.started, 1e-6)
        shown = display(path)
        shown = shown if len(shown) <= 70 else "…" + shown[-69:]
        self.status.update(
            escape(f"{stats.files} files  {stats.signed_files} signed  {stats.findings} hits  {rate:.0f}/s  {shown}")
        )

    def done(self) -> None:
        self.status.stop()


def _passphrase(*, confirm: bool) -> str:
    env = os.environ.get(PASSPHRASE_ENV)
    if env:
        return env
    if not sys.stdin.isatty():
        raise BundleError(f"a passphrase is needed: set {PASSPHRASE_ENV} or run on a terminal to be prompted")
    first = getpass.getpass("bundle passphrase: ")
    if confirm and getpass.getpass("again: ") != first:
        raise BundleError("the passphrases differ")
    if not first:
        raise BundleError("empty passphrase")
    return first


def _operator_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in this environment
        return str(os.getuid()) if hasattr(os, "getuid") else ""


def run_verify(path: str) -> int:
    from agent.sweep.bundle import check_bundle, is_encrypted

    if not os.path.isfile(path):
        raise BundleError(f"{path}: no such bundle")
    passphrase = _passphrase(confirm=False) if is_encrypted(path) else ""
    check = check_bundle(path, passphrase=passphrase)
    if check.ok:
        manifest = check.manifest
        device = manifest.get("Device", {})
        print(
            f"{path}: verified: {len(manifest.get('Members', {}))} members and the manifest match; "
            f"device {device.get('DeviceName', '')} ({device.get('DeviceId', '')})"
            + (", AES-encrypted" if check.encrypted else ""),
            file=sys.stderr,
        )
        return EXIT_CLEAN
    for problem in check.problems:
        print(f"rmmhunt: verify: {problem}", file=sys.stderr)
    print(f"rmmhunt: error: {path}: bundle does not verify ({len(check.problems)} problem(s))", file=sys.stderr)
    return EXIT_FINDINGS


def run_sweep_command(args: argparse.Namespace) -> int:
    from agent import __version__
    from agent.settings import load_settings
    from agent.sweep.bundle import write_bundle
    from agent.sweep.contents import build_manifest, build_members
    from agent.sweep.driver import run_sweep

    if not args.source or not args.out:
        raise BundleError("sweep needs SOURCE and --out BUNDLE.zip (or --verify BUNDLE.zip)")
    if not os.path.lexists(args.source):
        raise BundleError(f"no such file or directory: {args.source}")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise BundleError(f"--out: no such directory: {out_dir}")
    passphrase = _passphrase(confirm=True) if args.encrypt else ""
    settings = load_settings(
        state_dir=getattr(args, "state_dir", None),
        rules_dirs=getattr(args, "rules", None),
        config_file=getattr(args, "config", None),
        verify=False if args.no_verify_signatures else None,
    )
    progress = None if args.no_progress or not sys.stderr.isatty() else SweepProgress(sys.stderr)
    try:
        outcome = run_sweep(
            args.source, settings, device_name=args.device_name, device_id=args.device_id, progress=progress
        )
    finally:
        if progress is not None:
            progress.done()
    for warning in outcome.extra.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    manifest = build_manifest(
        outcome, version=__version__, operator_host=socket.gethostname(), operator_user=_operator_user()
    )
    members = build_members(outcome, manifest)
    write_bundle(args.out, members, manifest, passphrase=passphrase)
    stats = outcome.stats
    files_found = len({(row["FolderPath"]) for r in outcome.results for row in r.rows})
    print(
        f"swept {stats['files']} files ({stats['signed_files']} signed) from {outcome.source['image_type']} "
        f"{outcome.source['path']} in {stats['elapsed_seconds']:.2f}s as {outcome.device.device_name} "
        f"({outcome.device.device_id}); results {len(outcome.results)}, files found {files_found}, "
        f"errors {stats['errors_total']}\nbundle: {args.out}" + (" (AES-256)" if passphrase else ""),
        file=sys.stderr,
    )
    # dissect's parsed NTFS structures live in instance-level lru_caches (reference cycles);
    # without this the cyclic GC spends seconds on them at interpreter exit (13 s measured
    # after a 3000-file image). Everything is written; nothing needs collecting any more.
    gc.freeze()
    return EXIT_FINDINGS if outcome.results else EXIT_CLEAN


def run(args: argparse.Namespace) -> int:
    """The `sweep` command; errors are one line and exit 2 (with -v the traceback is logged)."""
    from agent.settings import ConfigError
    from agent.sweep.driver import SweepError

    try:
        if args.verify:
            if args.source or args.out:
                raise BundleError("--verify takes only the bundle: rmmhunt sweep --verify BUNDLE.zip")
            return run_verify(args.verify)
        return run_sweep_command(args)
    except (BundleError, SweepError, ConfigError) as exc:
        log.debug("sweep failed", exc_info=True)
        print(f"rmmhunt: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        log.debug("sweep failed", exc_info=True)
        name = getattr(exc, "filename", None) or ""
        print(f"rmmhunt: error: {name + ': ' if name else ''}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR

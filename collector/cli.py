"""``rmmhunt collector serve|import|hunt|devices``: the fleet side of the command line.

Secrets (the enrol secret and the API token) come from the environment
(``RMMHUNT_ENROLL_SECRET``, ``RMMHUNT_API_TOKEN``) or from the ``[collector]`` table of the
config file (``enroll_secret``, ``api_token``), never from argv: every user can read argv.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import tomllib
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EXIT_CLEAN, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2
IMPORT_CHUNK = 5000


class CollectorError(Exception):
    """A bad setting or file: one line, exit 2."""


def add_parser(sub: Any) -> None:
    """``rmmhunt collector ...``. The agent imports this module (importlib, agent.cli
    MODULE_COMMANDS) only when the collector command runs or the whole parser is needed."""
    from agent.cli import _format_options as format_options
    from agent.cli import _global_options as global_options

    p = sub.add_parser("collector", help="the fleet collector: serve, import, hunt, devices")
    global_options(p, suppress=True)
    csub = p.add_subparsers(dest="collector_command", metavar="ACTION")
    csub.required = True

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        q: argparse.ArgumentParser = csub.add_parser(name, help=help_text, description=help_text)
        global_options(q, suppress=True)
        q.add_argument(
            "--database", metavar="URL", help="sqlite:///PATH (default: in the state dir) or postgresql://..."
        )
        return q

    q = add("serve", "run the collector (HTTP API and dashboard)")
    q.add_argument("--listen", default="127.0.0.1:8443", metavar="HOST:PORT")
    q.add_argument("--tls-cert", metavar="FILE", help="PEM certificate chain (HTTPS)")
    q.add_argument("--tls-key", metavar="FILE", help="PEM private key")
    q = add("import", "ingest a JSONL rows file through the idempotent ingest path")
    q.add_argument("file")
    q = add("hunt", "fleet-wide hunt results from the collector's database")
    q.add_argument("--rule", action="append", metavar="ID", help="only this rule id (repeatable)")
    format_options(q, views=True)  # --format, --out, --view and --rows, as the agent's hunt
    q.add_argument("--include-excluded", action="store_true", help="also count hits the agents' exclusions removed")
    q = add("devices", "list devices, or revoke one's node key")
    dsub = q.add_subparsers(dest="devices_command", metavar="ACTION")
    dsub.required = True
    d = dsub.add_parser("list", help="enrolled devices")
    global_options(d, suppress=True)
    format_options(d)
    d = dsub.add_parser("revoke", help="revoke a device's node key")
    global_options(d, suppress=True)
    d.add_argument("device_id")


def load_collector_config(config_file: str | None, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """enroll_secret and api_token from the environment, else the config file's [collector] table."""
    env = os.environ if env is None else env
    values: dict[str, str] = {}
    if config_file:
        path = Path(config_file)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise CollectorError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise CollectorError(f"{path}: {exc}") from exc
        table = data.get("collector", {})
        for key in ("enroll_secret", "api_token"):
            if key in table:
                if not isinstance(table[key], str):
                    raise CollectorError(f"{path}: [collector] {key} must be a string")
                values[key] = table[key]
    for key, var in (("enroll_secret", "RMMHUNT_ENROLL_SECRET"), ("api_token", "RMMHUNT_API_TOKEN")):
        if env.get(var):
            values[key] = env[var]
    return values


def _settings(args: argparse.Namespace) -> Any:
    from agent.settings import load_settings

    # the [collector] table is read by load_collector_config; the agent settings come without it
    return load_settings(state_dir=getattr(args, "state_dir", None), rules_dirs=getattr(args, "rules", None))


def _database(args: argparse.Namespace, settings: Any) -> str:
    url = args.database or os.environ.get("RMMHUNT_COLLECTOR_DATABASE")
    if url:
        if not (
            url.startswith("sqlite:///") or url.split("://", 1)[0] in ("postgresql", "postgres", "postgresql+psycopg")
        ):
            raise CollectorError(
                f"--database: expected sqlite:///PATH or postgresql://..., got {url.split(':', 1)[0]}:"
            )
        return str(url)
    Path(settings.state_dir).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(settings.state_dir) / 'collector.sqlite3'}"


def _rules(settings: Any) -> list[Any]:
    from agent.rules.loader import load_rules

    for d in settings.rule_dirs_effective:
        if not Path(d).is_dir():
            raise CollectorError(f"rules directory not found: {d}")
    ruleset = load_rules(list(settings.rule_dirs_effective))
    for problem in ruleset.problems:
        print(f"warning: rule skipped: {problem}", file=sys.stderr)
    if not ruleset.rules:
        raise CollectorError("no usable rules")
    return list(ruleset.rules)


def _open(args: argparse.Namespace) -> Any:
    import sqlalchemy.exc

    from collector.storage import Collector, SchemaError

    settings = _settings(args)
    url = _database(args, settings)
    try:
        return Collector(url, _rules(settings))
    except (sqlalchemy.exc.SQLAlchemyError, SchemaError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CollectorError(f"--database: {message}") from exc


def _listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CollectorError(f"--listen: expected HOST:PORT, got {value!r}")
    return host, int(port)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from collector.api import Secrets, create_app

    conf = load_collector_config(getattr(args, "config", None))
    for key, var in (("enroll_secret", "RMMHUNT_ENROLL_SECRET"), ("api_token", "RMMHUNT_API_TOKEN")):
        if len(conf.get(key, "")) < 16:
            raise CollectorError(f"{key}: set {var} or [collector] {key} in the config file (16+ characters)")
    host, port = _listen(args.listen)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise CollectorError("--tls-cert and --tls-key go together")
    for f in (args.tls_cert, args.tls_key):
        if f and not Path(f).is_file():
            raise CollectorError(f"no such file: {f}")
    collector = _open(args)
    collector.start(background=True)
    app = create_app(collector, Secrets(conf["enroll_secret"], conf["api_token"]))
    try:
        uvicorn.run(
            app,
            host=host,
            port=port,
            ssl_certfile=args.tls_cert,
            ssl_keyfile=args.tls_key,
            log_level="warning",
            access_log=False,
            server_header=False,
        )
    finally:
        collector.close()
    return EXIT_CLEAN


def cmd_import(args: argparse.Namespace) -> int:
    from collector.wire import Limits, WireError, parse_row

    limits = Limits()
    path = Path(args.file)
    if not path.is_file():
        raise CollectorError(f"no such file: {path}")
    collector = _open(args)
    accepted = duplicates = bad = 0
    try:
        collector.start(background=False)
        chunk: list[dict[str, Any]] = []

        def flush() -> None:
            nonlocal accepted, duplicates
            if chunk:
                result = collector.ingest(chunk)
                accepted += result.accepted
                duplicates += result.duplicates
                chunk.clear()

        if zipfile.is_zipfile(path):  # a sweep bundle: verified whole before any row is read
            from agent.sweep.bundle import BundleError, iter_bundle_rows

            try:
                for row in iter_bundle_rows(path, passphrase=os.environ.get("RMMHUNT_BUNDLE_PASSPHRASE", "")):
                    chunk.append(parse_row(row, limits))
                    if len(chunk) >= IMPORT_CHUNK:
                        flush()
            except BundleError as exc:
                raise CollectorError(f"{path}: refused: {exc}") from exc
            except WireError as exc:
                raise CollectorError(f"{path}: refused: a row of the bundle: {exc.message}") from exc
            flush()
            print(f"imported {accepted} rows ({duplicates} already stored) from bundle {path}", file=sys.stderr)
            return EXIT_CLEAN
        with path.open("rb") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    chunk.append(parse_row(json.loads(line), limits))
                except (ValueError, RecursionError, WireError) as exc:
                    bad += 1
                    message = exc.message if isinstance(exc, WireError) else str(exc)
                    if bad <= 20:
                        print(f"{path}:{number}: {message}", file=sys.stderr)
                    continue
                if len(chunk) >= IMPORT_CHUNK:
                    flush()
            flush()
    finally:
        collector.close()
    print(f"imported {accepted} rows ({duplicates} already stored, {bad} rejected) from {path}", file=sys.stderr)
    return EXIT_ERROR if bad else EXIT_CLEAN


def cmd_hunt(args: argparse.Namespace) -> int:
    from agent.cli import emit_results
    from agent.hunt import HuntResult
    from agent.output import check_out, format_for

    fmt = format_for(args.out, args.format)
    check_out(args.out)

    collector = _open(args)
    try:
        if args.rule:
            unknown = set(args.rule) - {r.id for r in collector.rules}
            if unknown:
                raise CollectorError(f"unknown rule id(s): {', '.join(sorted(unknown))}")
        now = dt.datetime.now(dt.UTC)
        fleet = collector.hunt(now=now, rule_ids=args.rule, include_excluded=args.include_excluded)
        results = []
        rows_of: dict[str, list[dict[str, Any]]] = {}
        for r in fleet:
            behind: tuple[dict[str, Any], ...] = ()
            if args.rows:
                if r.rule.id not in rows_of:
                    rows_of[r.rule.id] = collector.rule_rows(r.rule.id, now=now, include_excluded=args.include_excluded)
                report = r.result.get("Report")
                behind = tuple(
                    row
                    for row in rows_of[r.rule.id]
                    if all(row.get(k) == r.result[k] for k in ("DeviceId", "DeviceName") if k in r.result)
                    and (not isinstance(report, list) or row["ReportId"] in report)
                )
            results.append(HuntResult(r.rule, r.result, behind))
    finally:
        collector.close()
    summary = {"results": len(results), "devices": len({r.result.get("DeviceId") for r in results})}
    emit_results(results, fmt=fmt, out=args.out, summary=summary, with_rows=args.rows, view=args.view)
    return EXIT_FINDINGS if results else EXIT_CLEAN


def cmd_devices(args: argparse.Namespace) -> int:
    from agent.cli import _write
    from agent.output import check_out, format_for, render

    if args.devices_command != "revoke":  # list: --format, else --out's extension, else the table
        fmt = format_for(args.out, args.format)
        check_out(args.out)
    collector = _open(args)
    try:
        if args.devices_command == "revoke":
            if not collector.revoke(args.device_id):
                raise CollectorError(f"unknown device: {args.device_id}")
            print(f"revoked {args.device_id}", file=sys.stderr)
            return EXIT_CLEAN
        _write(render(collector.list_devices(), fmt), args.out)
        return EXIT_CLEAN
    finally:
        collector.close()


def run(args: argparse.Namespace) -> int:
    commands = {"serve": cmd_serve, "import": cmd_import, "hunt": cmd_hunt, "devices": cmd_devices}
    try:
        return commands[args.collector_command](args)
    except CollectorError as exc:
        print(f"rmmhunt: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    """``python -m collector ...``, the same as ``rmmhunt collector ...``."""
    from agent.cli import main as agent_main

    return agent_main(["collector", *(sys.argv[1:] if argv is None else argv)])

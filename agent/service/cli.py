"""Commands of the endpoint runtime: ``watch``, ``run``, ``status``, ``service install|uninstall|status``
and ``scan --processes`` (registered in agent/cli.py)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import platform
from agent.settings import ConfigError, Settings, load_settings

log = logging.getLogger(__name__)

COMMAND_NAMES = ("watch", "run", "status", "service")
STATUS_FORMATS = ("table", "json", "jsonl", "csv")


def add_parser(subparsers: Any, global_options: Callable[..., None]) -> None:
    """Register watch, run, status and service; ``global_options(parser, suppress=True)`` adds the common options."""

    def add(name: str, text: str) -> argparse.ArgumentParser:
        p = subparsers.add_parser(name, help=text, description=text)
        global_options(p, suppress=True)
        return p

    p = add("watch", "watch directories in the foreground; a new RMM binary is reported as it lands")
    p.add_argument("paths", nargs="*", metavar="PATH", help="directories to watch (default: watch_roots)")
    add("run", "the service main loop: watch, periodic re-scans and process sweeps, the status file")
    p = add("status", "the running agent's health, from the status file `run` keeps in the state directory")
    p.add_argument("--format", choices=STATUS_FORMATS, default="table")
    p = add("service", "install, remove or query the agent as a systemd unit / Windows service")
    sub = p.add_subparsers(dest="service_command", metavar="ACTION")
    sub.required = True
    inst = sub.add_parser("install", help="write and enable the systemd unit (Windows: create the service)")
    global_options(inst, suppress=True)
    inst.add_argument("--dry-run", action="store_true", help="print the unit (or the Windows service spec) only")
    inst.add_argument("--unit-dir", type=Path, default=None, help="where the unit goes (default /etc/systemd/system)")
    inst.add_argument("--no-start", action="store_true", help="enable but do not start it")
    for name, text in (("uninstall", "stop and remove the service"), ("status", "the service manager's view")):
        q = sub.add_parser(name, help=text)
        global_options(q, suppress=True)
        q.add_argument("--unit-dir", type=Path, default=None, help=argparse.SUPPRESS)


def _settings_loader(args: argparse.Namespace) -> Callable[[], Settings]:
    def load() -> Settings:
        return load_settings(
            state_dir=getattr(args, "state_dir", None),
            rules_dirs=getattr(args, "rules", None),
            config_file=getattr(args, "config", None),
        )

    return load


def run(args: argparse.Namespace) -> int:
    if args.command in ("watch", "run"):
        return _run_agent(args)
    if args.command == "status":
        return _status(args)
    return _service(args)


# --------------------------------------------------------------------------- watch / run


def _run_agent(args: argparse.Namespace) -> int:
    from agent.service.budgets import setup_json_logging, teardown_logging
    from agent.service.runner import Runner

    loader = _settings_loader(args)
    settings = loader()  # a bad config is fatal before anything starts
    for p in getattr(args, "paths", None) or ():
        if not os.path.isdir(p):
            raise ConfigError(f"not a directory: {p}")
    level = logging.DEBUG if (getattr(args, "verbose", 0) or 0) >= 1 else logging.INFO
    handler = setup_json_logging(
        settings.log_file, max_bytes=settings.log_max_bytes, backups=settings.log_backups, level=level
    )
    try:
        return Runner(loader, mode=args.command, paths=getattr(args, "paths", None) or ()).run()
    except (OSError, sqlite3.Error) as exc:  # the state directory or store cannot be used: one line
        raise ConfigError(f"state directory {settings.state_dir}: {exc}") from exc
    finally:
        teardown_logging(handler)


# --------------------------------------------------------------------------- status


def _status(args: argparse.Namespace) -> int:
    from agent.output import render
    from agent.service.status import explain_status

    settings = _settings_loader(args)()
    record = explain_status(settings.state_dir)
    if args.format == "table":
        sys.stdout.write(status_text(record))
    else:
        sys.stdout.write(render([record], args.format))
    if record.get("Problem") and "Pid" not in record:
        return 2 if "unreadable" in record["Problem"] else 0
    return 1 if record.get("FindingsByTool") else 0


def status_text(record: dict[str, Any]) -> str:
    from agent.textenc import display

    if "Pid" not in record:
        return f"running: no\n{display(record.get('Problem', ''))}\nstatus file: {record['StatusFile']}\n"
    lines = [
        f"running:        {'yes' if record['Running'] else 'no'} ({record['State']})",
        f"pid:            {record['Pid']}",
        f"uptime:         {_duration(record['Uptime']) if record['Uptime'] is not None else '-'}",
        f"version:        {record['Version']}",
        f"last full scan: {record['LastFullScan'] or 'none yet'}",
    ]
    s = record.get("LastFullScanSummary") or {}
    if s:
        lines.append(
            f"                {s.get('files', 0)} files, {s.get('signed_files', 0)} signed, {s.get('rows', 0)} rows, "
            f"{s.get('findings', 0)} findings, {s.get('errors_total', 0)} errors, {s.get('elapsed_seconds', 0)} s"
        )
    lines.append("watched roots:  " + (", ".join(display(r) for r in record["WatchedRoots"]) or "none"))
    uncovered = record.get("UncoveredRoots") or []
    lines.append(
        f"uncovered:      {len(uncovered) or 'none'}" + (" (scanned periodically instead)" if uncovered else "")
    )
    for u in uncovered[:20]:
        lines.append(f"                {display(u['path'])}: {display(u['reason'])}")
    sweep = record.get("ProcessSweep")
    lines.append(
        f"process sweep:  {sweep} ({record.get('ProcessSweepSeconds')} s)" if sweep else "process sweep:  none yet"
    )
    findings = record.get("FindingsByTool") or {}
    lines.append("findings:       " + (", ".join(f"{display(t)} {n}" for t, n in findings.items()) or "none"))
    lines.append(f"last error:     {display(record.get('LastError') or 'none')}")
    lines.append(f"status file:    {record['StatusFile']}")
    return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    return str(dt.timedelta(seconds=int(seconds)))


# --------------------------------------------------------------------------- service


def agent_command() -> list[str]:
    """How the service starts this agent: the frozen binary, else the console script, else python -m."""
    if getattr(sys, "frozen", False):
        return [sys.executable]
    script = Path(sys.executable).parent / ("rmmhunt.exe" if platform.IS_WINDOWS else "rmmhunt")
    if script.exists():
        return [str(script)]
    found = shutil.which("rmmhunt")
    return [found] if found else [sys.executable, "-m", "agent.cli"]


def _config_for_service(settings: Settings) -> Path:
    return settings.config_file or platform.default_config_file()


def _service(args: argparse.Namespace) -> int:
    settings = _settings_loader(args)()
    if platform.IS_WINDOWS:  # pragma: no cover - not run on this branch
        return _service_windows(args, settings)
    from agent.service import linux

    unit_dir = args.unit_dir or linux.UNIT_DIR
    if args.service_command == "install":
        exe = agent_command()
        if len(exe) != 1:
            raise ConfigError("cannot find the rmmhunt executable for ExecStart; install the package first")
        text = linux.render_unit(settings, exe[0], _config_for_service(settings))
        if args.dry_run:
            sys.stdout.write(text)
            return 0
        for line in linux.install_unit(text, unit_dir=unit_dir, start=not args.no_start):
            print(line)
        return 0
    if args.service_command == "uninstall":
        for line in linux.uninstall_unit(unit_dir=unit_dir):
            print(line)
        return 0
    info = linux.unit_status(unit_dir=unit_dir)
    for key, value in info.items():
        print(f"{key}: {value}")
    return 0


def _service_windows(args: argparse.Namespace, settings: Settings) -> int:  # pragma: no cover - Windows only
    from agent.service import windows

    spec = windows.service_spec(agent_command(), str(_config_for_service(settings)), str(settings.state_dir))
    if args.service_command == "install" and args.dry_run:
        print(json.dumps({"name": spec.name, "command_line": spec.command_line, "start_type": spec.start_type}))
        return 0
    scm = windows.Win32ServiceControlManager()
    if args.service_command == "install":
        lines = windows.install_service(scm, spec, start=not args.no_start)
    elif args.service_command == "uninstall":
        lines = windows.uninstall_service(scm)
    else:
        lines = [f"{k}: {v}" for k, v in windows.service_status(scm).items()]
    for line in lines:
        print(line)
    return 0


# --------------------------------------------------------------------------- scan --processes


def scan_processes(args: argparse.Namespace) -> int:
    """``rmmhunt scan --processes``: the images and mapped files of the running processes, through the
    scan pipeline with Source ``process``; the hunt results over the rows this sweep stored."""
    from agent import cli
    from agent.hunt import run_hunt
    from agent.service.budgets import CpuThrottle
    from agent.service.pipeline import Pipeline, ProcessSweep, load_everything

    if args.paths:
        raise ConfigError("scan --processes takes no PATH; scan paths in a separate run")
    settings = load_settings(
        state_dir=getattr(args, "state_dir", None),
        rules_dirs=getattr(args, "rules", None),
        config_file=getattr(args, "config", None),
        verify=False if args.no_verify else None,
    )
    loaded = load_everything(settings)
    for problem in loaded.rule_problems:
        print(f"warning: rule skipped: {problem}", file=sys.stderr)
    pipeline = Pipeline(loaded)
    throttle = CpuThrottle(settings.max_cpu_percent)
    try:
        sweeper = ProcessSweep(pipeline)
        stats, counters = sweeper.run(per_file=lambda _s, _p: throttle.tick(), skip_pids=frozenset({os.getpid()}))
        results = run_hunt(
            sweeper.last_rows,
            loaded.rules,
            now=dt.datetime.now(dt.UTC),
            excluded_for=pipeline.store.excluded_hits(),
            exclusions=loaded.exclusions,
        )
    finally:
        pipeline.close()
    from agent.output import check_out, format_for
    from agent.views.records import error_record, findings_of

    summary = {**stats.as_dict(), "processes": counters.as_dict()}
    c = counters.as_dict()
    sys.stderr.write(
        f"processes {c['processes']} ({', '.join(f'{k}={v}' for k, v in sorted(c['statuses'].items()))}), "
        f"files {c['files']}\n"
    )
    findings = findings_of(results)
    summary.update({"rule_hits": summary["findings"], "findings": len(findings), "results": len(results)})
    fmt = format_for(args.out, args.format)
    check_out(args.out)
    cli.emit_results(
        results,
        fmt=fmt,
        out=args.out,
        summary=summary,
        errors=[error_record(e) for e in stats.errors],
        with_rows=args.rows,
        view=getattr(args, "view", "files"),
        findings=findings,
    )
    return cli.EXIT_FINDINGS if results else cli.EXIT_CLEAN


def with_cpu_cap(progress: Callable[[Any, str], None] | None, max_cpu_percent: float) -> Any:
    """The scan's per-file callback with the ``max_cpu_percent`` throttle in front (None: neither)."""
    if max_cpu_percent <= 0:
        return progress
    from agent.service.budgets import CpuThrottle

    throttle = CpuThrottle(max_cpu_percent)

    def per_file(stats: Any, path: str) -> None:
        throttle.tick()
        if progress is not None:
            progress(stats, path)

    return per_file

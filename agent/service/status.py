"""The status file that ``run`` keeps in the state directory, and what ``rmmhunt status`` makes of it.

The file is JSON, replaced atomically (write a temporary file in the same directory, fsync,
rename), so a reader never sees half of it. Whether the agent is running is not trusted to the
file: the reader checks that its PID is alive and started when the file says it did."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.service.budgets import pid_alive

STATUS_FILE = "status.json"


def status_path(state_dir: Path) -> Path:
    return Path(state_dir) / STATUS_FILE


def write_status(state_dir: Path, status: dict[str, Any]) -> None:
    """Replace the status file atomically (temp + fsync + rename)."""
    path = status_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".status.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(status, f, ensure_ascii=False, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load_status(state_dir: Path) -> dict[str, Any] | None:
    """The status file's content, or None when there is none. A torn or invalid file is an OSError-free
    ValueError for the caller to report."""
    path = status_path(state_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data


def explain_status(state_dir: Path, *, now: float | None = None) -> dict[str, Any]:
    """The agent's health as one record; never raises (a problem is the record's ``Problem``)."""
    now = time.time() if now is None else now
    path = status_path(state_dir)
    try:
        data = load_status(state_dir)
    except (OSError, ValueError) as exc:
        return {"Running": False, "StatusFile": str(path), "Problem": f"unreadable status file: {exc}"}
    if data is None:
        return {"Running": False, "StatusFile": str(path), "Problem": "no status file: the agent has not run here"}
    pid = data.get("pid")
    running = (
        isinstance(pid, int) and data.get("state") != "stopped" and pid_alive(pid, data.get("process_create_time"))
    )
    started = data.get("started")
    full = data.get("last_full_scan") or {}
    sweep = data.get("process_sweep") or {}
    return {
        "Running": running,
        "State": data.get("state", "") if running else "not running",
        "Pid": pid,
        "Uptime": round(now - started, 1) if running and isinstance(started, int | float) else None,
        "Version": data.get("version", ""),
        "Started": data.get("started_iso", ""),
        "Updated": data.get("updated_iso", ""),
        "LastFullScan": full.get("finished_iso", ""),
        "LastFullScanSummary": full.get("summary", {}),
        "WatchedRoots": data.get("watched_roots", []),
        "UncoveredRoots": data.get("uncovered", []),
        "ProcessSweep": sweep.get("finished_iso", ""),
        "ProcessSweepSeconds": sweep.get("seconds"),
        "ProcessSweepSummary": sweep.get("summary", {}),
        "FindingsByTool": data.get("findings_by_tool", {}),
        "LastError": data.get("last_error", ""),
        "Priority": data.get("priority", {}),
        "StatusFile": str(path),
    }

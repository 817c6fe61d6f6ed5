"""The systemd unit: generated from ``build/rmmhunt.service.in`` with values from the config,
installed, removed and queried with systemctl.

``CPUQuota`` is ``max_cpu_percent`` (the agent throttles itself to it as well; systemd's quota
is the hard backstop). ``MemoryMax`` sits a margin above ``memory_limit_mb`` so that the
agent's own crash-only exit (log, flush, exit non-zero, restarted by ``Restart=on-failure``)
happens before the kernel's OOM kill would."""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from agent.resources import data_root
from agent.settings import Settings

log = logging.getLogger(__name__)

UNIT_NAME = "rmmhunt.service"
UNIT_DIR = Path("/etc/systemd/system")
START_LIMIT_INTERVAL = 600
START_LIMIT_BURST = 5
MEMORY_MARGIN_MB = 64


def unit_template_path() -> Path:
    return data_root() / "build" / "rmmhunt.service.in"


def _quoted(path: Path | str) -> str:
    """A path as a systemd command-line word (quoted when it holds spaces; % and $ escaped)."""
    text = str(path).replace("%", "%%").replace("$", "$$")
    return f'"{text}"' if any(c.isspace() for c in text) or '"' in text else text


@dataclass(frozen=True)
class UnitValues:
    exec_path: str
    config_file: str
    state_dir: str
    read_write: tuple[str, ...]
    cpu_quota: str
    memory_max: str


def unit_values(settings: Settings, exec_path: str, config_file: Path) -> UnitValues:
    """Pure: the unit's values from the settings."""
    read_write = [str(settings.state_dir)]
    if settings.log_file is not None and not str(settings.log_file.parent).startswith(str(settings.state_dir)):
        read_write.append(str(settings.log_file.parent))
    cpu = f"{settings.max_cpu_percent:g}%" if settings.max_cpu_percent > 0 else ""
    mem = f"{settings.memory_limit_mb + max(MEMORY_MARGIN_MB, settings.memory_limit_mb // 4)}M"
    return UnitValues(
        exec_path=exec_path,
        config_file=str(config_file),
        state_dir=str(settings.state_dir),
        read_write=tuple(read_write),
        cpu_quota=cpu,
        memory_max=mem if settings.memory_limit_mb > 0 else "infinity",
    )


def parse_unit_template(template: str, values: UnitValues) -> str:
    """Pure: the unit text. An empty CPUQuota= resets it (no quota)."""
    out = template
    for key, value in {
        "@EXEC@": _quoted(values.exec_path),
        "@CONFIG@": _quoted(values.config_file),
        "@STATE_DIR@": _quoted(values.state_dir),
        "@READ_WRITE@": " ".join(_quoted(p) for p in values.read_write),
        "@CPU_QUOTA@": values.cpu_quota,
        "@MEMORY_MAX@": values.memory_max,
        "@INTERVAL@": str(START_LIMIT_INTERVAL),
        "@BURST@": str(START_LIMIT_BURST),
        "@DOC@": str(unit_template_path()),
    }.items():
        out = out.replace(key, value)
    return out


def render_unit(settings: Settings, exec_path: str, config_file: Path) -> str:
    template = unit_template_path().read_text(encoding="utf-8")
    return parse_unit_template(template, unit_values(settings, exec_path, config_file))


def systemd_running() -> bool:
    """systemd is PID 1 here (else systemctl cannot manage units; files are still written)."""
    return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None


def _systemctl(*args: str) -> tuple[int, str]:
    try:
        done = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 1, str(exc)
    return done.returncode, (done.stdout + done.stderr).strip()


def install_unit(text: str, *, unit_dir: Path = UNIT_DIR, start: bool = True) -> list[str]:
    """Write the unit, then daemon-reload, enable and start it when systemd runs. Returns what was done."""
    unit_dir.mkdir(parents=True, exist_ok=True)
    path = unit_dir / UNIT_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(0o644)
    tmp.replace(path)
    done = [f"wrote {path}"]
    if not systemd_running():
        done.append("systemd is not running here: not enabled or started (run `systemctl enable --now rmmhunt`)")
        return done
    for args in (("daemon-reload",), ("enable", "--now", UNIT_NAME) if start else ("enable", UNIT_NAME)):
        rc, out = _systemctl(*args)
        done.append(f"systemctl {' '.join(args)}: {'ok' if rc == 0 else out}")
    return done


def uninstall_unit(*, unit_dir: Path = UNIT_DIR) -> list[str]:
    path = unit_dir / UNIT_NAME
    done = []
    if systemd_running():
        rc, out = _systemctl("disable", "--now", UNIT_NAME)
        done.append(f"systemctl disable --now: {'ok' if rc == 0 else out}")
    if path.exists():
        path.unlink()
        done.append(f"removed {path}")
    else:
        done.append(f"{path}: not installed")
    if systemd_running():
        _systemctl("daemon-reload")
    return done


def unit_status(*, unit_dir: Path = UNIT_DIR) -> dict[str, str]:
    path = unit_dir / UNIT_NAME
    out = {"Manager": "systemd", "Unit": str(path), "Installed": "yes" if path.exists() else "no"}
    if systemd_running():
        _rc, active = _systemctl("is-active", UNIT_NAME)
        _rc, enabled = _systemctl("is-enabled", UNIT_NAME)
        out.update({"Active": active, "Enabled": enabled})
    else:
        out["Active"] = "unknown (systemd is not running here)"
    return out


def verify_unit(path: Path) -> tuple[int, str]:
    """``systemd-analyze verify`` on a unit file: (return code, output)."""
    done = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=120)
    return done.returncode, (done.stdout + done.stderr).strip()

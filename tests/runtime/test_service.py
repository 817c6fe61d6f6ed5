"""The service: a systemd unit checked by systemd-analyze, and the Windows service logic against a
fake service control manager (Windows does not exist here)."""

from __future__ import annotations

import contextlib
import io
from typing import Any

from agent.cli import main
from agent.service import linux, windows
from agent.settings import load_settings
from tests.runtime.conftest import write_config


def _unit(tmp_path, **agent: Any) -> tuple[str, Any]:
    state = tmp_path / "state dir"  # a space: quoted in the unit
    config = write_config(tmp_path / "agent.toml", **agent)
    settings = load_settings(state_dir=str(state), config_file=str(config), env={})
    exe = tmp_path / "bin" / "rmmhunt"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    return linux.render_unit(settings, str(exe), config), settings


def test_generated_unit_passes_systemd_analyze_verify_and_carries_the_config(tmp_path):
    text, settings = _unit(tmp_path, max_cpu_percent=20, memory_limit_mb=256)
    path = tmp_path / "rmmhunt.service"
    path.write_text(text)
    rc, output = linux.verify_unit(path)
    assert rc == 0 and output == "", output  # no warning either (unknown keys, bad values)
    lines = set(text.splitlines())
    for expected in (
        "Restart=on-failure",
        f"StartLimitIntervalSec={linux.START_LIMIT_INTERVAL}",
        f"StartLimitBurst={linux.START_LIMIT_BURST}",
        "ProtectSystem=strict",
        f'ReadWritePaths="{settings.state_dir}"',
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=CAP_DAC_READ_SEARCH CAP_SYS_PTRACE",
        "AmbientCapabilities=CAP_DAC_READ_SEARCH CAP_SYS_PTRACE",
        "Nice=19",
        "IOSchedulingClass=idle",
        "CPUQuota=20%",
        "MemoryMax=320M",  # the agent's own ceiling (256) is reached first
    ):
        assert expected in lines, expected
    exec_line = next(line for line in lines if line.startswith("ExecStart="))
    assert f'run --config {tmp_path / "agent.toml"} --state-dir "{settings.state_dir}"' in exec_line


def test_no_cpu_cap_and_no_memory_ceiling_still_verify(tmp_path):
    text, _ = _unit(tmp_path, max_cpu_percent=0, memory_limit_mb=0)
    assert "CPUQuota=\n" in text and "MemoryMax=infinity\n" in text
    path = tmp_path / "rmmhunt.service"
    path.write_text(text)
    assert linux.verify_unit(path) == (0, "")


def _cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(args))
    return code, out.getvalue()


def test_service_install_dry_run_install_status_uninstall(tmp_path):
    config = write_config(tmp_path / "agent.toml", max_cpu_percent=10)
    common = ["--config", str(config), "--state-dir", str(tmp_path / "state")]
    code, unit = _cli("service", "install", "--dry-run", *common)
    assert code == 0 and "CPUQuota=10%" in unit and "[Install]" in unit
    units = tmp_path / "units"
    code, out = _cli("service", "install", "--unit-dir", str(units), *common)
    assert code == 0 and (units / "rmmhunt.service").read_text() == unit
    assert _cli("service", "status", "--unit-dir", str(units), *common)[1].count("Installed: yes") == 1
    code, out = _cli("service", "uninstall", "--unit-dir", str(units), *common)
    assert code == 0 and not (units / "rmmhunt.service").exists()
    assert "Installed: no" in _cli("service", "status", "--unit-dir", str(units), *common)[1]


class FakeServiceControlManager:
    """A fake of the Windows service control manager (it cannot exist on Linux): the services it
    holds and the calls made to it, so the install logic can be checked."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, Any]] = {}
        self.calls: list[str] = []

    def query(self, name: str) -> dict[str, Any] | None:
        svc = self.services.get(name)
        return None if svc is None else {"state": svc["state"], "start_type": svc["spec"].start_type}

    def create(self, spec: windows.ServiceSpec) -> None:
        self.calls.append("create")
        self.services[spec.name] = {"spec": spec, "state": "stopped", "recovery": None}

    def update(self, spec: windows.ServiceSpec) -> None:
        self.calls.append("update")
        self.services[spec.name]["spec"] = spec

    def set_recovery(self, spec: windows.ServiceSpec) -> None:
        self.calls.append("set_recovery")
        self.services[spec.name]["recovery"] = (spec.recovery, spec.reset_period_s, spec.failure_actions_on_non_crash)

    def start(self, name: str) -> None:
        self.calls.append("start")
        self.services[name]["state"] = "running"

    def stop(self, name: str) -> None:
        self.calls.append("stop")
        self.services[name]["state"] = "stopped"

    def delete(self, name: str) -> None:
        self.calls.append("delete")
        del self.services[name]


def test_windows_service_install_start_type_recovery_and_removal_against_a_fake_scm():
    scm = FakeServiceControlManager()
    exe = [r"C:\Program Files\rmmhunt\rmmhunt.exe"]
    spec = windows.service_spec(exe, r"C:\ProgramData\rmmhunt\agent.toml", r"C:\ProgramData\rmmhunt")
    assert spec.command_line == (
        r'"C:\Program Files\rmmhunt\rmmhunt.exe" run --config C:\ProgramData\rmmhunt\agent.toml '
        r"--state-dir C:\ProgramData\rmmhunt"
    )
    windows.install_service(scm, spec)
    assert scm.calls == ["create", "set_recovery", "start"]
    svc = scm.services["rmmhunt"]
    assert svc["state"] == "running"
    assert svc["spec"].start_type == windows.SERVICE_AUTO_START and svc["spec"].delayed_auto_start
    actions, reset, on_non_crash = svc["recovery"]
    assert [a.kind for a in actions] == [windows.SC_ACTION_RESTART] * 3 and reset == 86_400 and on_non_crash
    assert windows.service_status(scm)["Installed"] == "yes"

    windows.install_service(scm, spec)  # again: updated in place, already running
    assert scm.calls[3:] == ["update", "set_recovery"]
    assert windows.uninstall_service(scm) == ["stopped rmmhunt", "deleted service rmmhunt"]
    assert windows.service_status(scm)["Installed"] == "no"
    assert windows.uninstall_service(scm) == ["service rmmhunt: not installed"]

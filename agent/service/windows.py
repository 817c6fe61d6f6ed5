"""The Windows service, behind a platform shim.

The logic (what to install, with which start type and recovery actions, how to remove it and
report it) is plain Python over a ``ServiceControlManager`` interface. ``Win32ServiceControlManager``
implements it with pywin32 (win32service) and only imports pywin32 when used, so the rest of
the agent imports anywhere. ``service_class()`` builds the pywin32 ``ServiceFramework`` class
whose ``SvcDoRun`` runs the same ``Runner`` as ``rmmhunt run``.

NOT RUN ON WINDOWS: this branch was built and tested on Linux only. The logic is tested against
``FakeServiceControlManager`` in tests/runtime; the pywin32 calls themselves (CreateService,
ChangeServiceConfig2, StartService, the ServiceFramework class) have not been executed. See
build/WINDOWS-SERVICE.md.
"""

from __future__ import annotations

import logging
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)

SERVICE_NAME = "rmmhunt"
DISPLAY_NAME = "rmmhunt endpoint agent"
DESCRIPTION = "Finds remote monitoring and management (RMM) tools by their Authenticode signers."

# start types (winsvc.h)
SERVICE_AUTO_START, SERVICE_DEMAND_START = 2, 3
# SC_ACTION_TYPE
SC_ACTION_NONE, SC_ACTION_RESTART = 0, 1


@dataclass(frozen=True)
class RecoveryAction:
    kind: int  # SC_ACTION_RESTART ...
    delay_ms: int


@dataclass(frozen=True)
class ServiceSpec:
    """Everything the service control manager is told at install."""

    name: str
    display_name: str
    description: str
    command_line: str  # the binary path with arguments, as Windows quotes it
    start_type: int = SERVICE_AUTO_START
    delayed_auto_start: bool = True
    recovery: tuple[RecoveryAction, ...] = field(
        default=(
            RecoveryAction(SC_ACTION_RESTART, 60_000),
            RecoveryAction(SC_ACTION_RESTART, 60_000),
            RecoveryAction(SC_ACTION_RESTART, 300_000),
        )
    )
    reset_period_s: int = 86_400  # failure count resets after a day without failures
    failure_actions_on_non_crash: bool = True  # a non-zero exit (memory ceiling) counts as a failure


class ServiceControlManager(Protocol):
    def query(self, name: str) -> dict[str, Any] | None: ...
    def create(self, spec: ServiceSpec) -> None: ...
    def update(self, spec: ServiceSpec) -> None: ...
    def set_recovery(self, spec: ServiceSpec) -> None: ...
    def start(self, name: str) -> None: ...
    def stop(self, name: str) -> None: ...
    def delete(self, name: str) -> None: ...


def windows_command_line(exe: Sequence[str], config_file: str, state_dir: str) -> str:
    """The service's command line: ``exe... run --config FILE --state-dir DIR``, quoted for Windows."""
    return subprocess.list2cmdline([*exe, "run", "--config", config_file, "--state-dir", state_dir])


def service_spec(
    exe: Sequence[str], config_file: str, state_dir: str, *, start_type: int = SERVICE_AUTO_START
) -> ServiceSpec:
    return ServiceSpec(
        SERVICE_NAME, DISPLAY_NAME, DESCRIPTION, windows_command_line(exe, config_file, state_dir), start_type
    )


def install_service(scm: ServiceControlManager, spec: ServiceSpec, *, start: bool = True) -> list[str]:
    """Create (or update) the service, set its recovery actions, and start it."""
    done = []
    if scm.query(spec.name) is None:
        scm.create(spec)
        done.append(f"created service {spec.name}")
    else:
        scm.update(spec)
        done.append(f"updated service {spec.name}")
    scm.set_recovery(spec)
    done.append("recovery: restart after 1 min, 1 min, 5 min; failure count reset after 1 day")
    if start:
        state = (scm.query(spec.name) or {}).get("state")
        if state != "running":
            scm.start(spec.name)
            done.append(f"started {spec.name}")
    return done


def uninstall_service(scm: ServiceControlManager, name: str = SERVICE_NAME) -> list[str]:
    info = scm.query(name)
    if info is None:
        return [f"service {name}: not installed"]
    done = []
    if info.get("state") not in ("stopped", None):
        scm.stop(name)
        done.append(f"stopped {name}")
    scm.delete(name)
    done.append(f"deleted service {name}")
    return done


def service_status(scm: ServiceControlManager, name: str = SERVICE_NAME) -> dict[str, Any]:
    info = scm.query(name)
    if info is None:
        return {"Manager": "Windows SCM", "Service": name, "Installed": "no"}
    return {"Manager": "Windows SCM", "Service": name, "Installed": "yes", **{k.title(): v for k, v in info.items()}}


class Win32ServiceControlManager:  # pragma: no cover - Windows only, not run on this branch
    """ServiceControlManager through pywin32 (win32service, win32serviceutil)."""

    _STATES = {1: "stopped", 2: "start_pending", 3: "stop_pending", 4: "running", 7: "paused"}

    def __init__(self) -> None:
        import win32service

        self.ws = win32service

    def _scm(self) -> Any:
        return self.ws.OpenSCManager(None, None, self.ws.SC_MANAGER_ALL_ACCESS)

    def query(self, name: str) -> dict[str, Any] | None:
        import pywintypes

        scm = self._scm()
        try:
            h = self.ws.OpenService(scm, name, self.ws.SERVICE_QUERY_STATUS | self.ws.SERVICE_QUERY_CONFIG)
        except pywintypes.error:
            return None
        try:
            status = self.ws.QueryServiceStatus(h)
            config = self.ws.QueryServiceConfig(h)
            return {"state": self._STATES.get(status[1], str(status[1])), "start_type": config[1], "binary": config[3]}
        finally:
            self.ws.CloseServiceHandle(h)
            self.ws.CloseServiceHandle(scm)

    def create(self, spec: ServiceSpec) -> None:
        scm = self._scm()
        try:
            h = self.ws.CreateService(
                scm,
                spec.name,
                spec.display_name,
                self.ws.SERVICE_ALL_ACCESS,
                self.ws.SERVICE_WIN32_OWN_PROCESS,
                spec.start_type,
                self.ws.SERVICE_ERROR_NORMAL,
                spec.command_line,
                None,
                0,
                None,
                None,
                None,
            )
            self._describe(h, spec)
            self.ws.CloseServiceHandle(h)
        finally:
            self.ws.CloseServiceHandle(scm)

    def update(self, spec: ServiceSpec) -> None:
        scm = self._scm()
        try:
            h = self.ws.OpenService(scm, spec.name, self.ws.SERVICE_ALL_ACCESS)
            self.ws.ChangeServiceConfig(
                h,
                self.ws.SERVICE_NO_CHANGE,
                spec.start_type,
                self.ws.SERVICE_NO_CHANGE,
                spec.command_line,
                None,
                0,
                None,
                None,
                None,
                spec.display_name,
            )
            self._describe(h, spec)
            self.ws.CloseServiceHandle(h)
        finally:
            self.ws.CloseServiceHandle(scm)

    def _describe(self, h: Any, spec: ServiceSpec) -> None:
        self.ws.ChangeServiceConfig2(h, self.ws.SERVICE_CONFIG_DESCRIPTION, spec.description)
        self.ws.ChangeServiceConfig2(h, self.ws.SERVICE_CONFIG_DELAYED_AUTO_START_INFO, spec.delayed_auto_start)

    def set_recovery(self, spec: ServiceSpec) -> None:
        scm = self._scm()
        try:
            h = self.ws.OpenService(scm, spec.name, self.ws.SERVICE_ALL_ACCESS)
            actions = {
                "ResetPeriod": spec.reset_period_s,
                "RebootMsg": "",
                "Command": "",
                "Actions": [(a.kind, a.delay_ms) for a in spec.recovery],
            }
            self.ws.ChangeServiceConfig2(h, self.ws.SERVICE_CONFIG_FAILURE_ACTIONS, actions)
            self.ws.ChangeServiceConfig2(
                h, self.ws.SERVICE_CONFIG_FAILURE_ACTIONS_FLAG, spec.failure_actions_on_non_crash
            )
            self.ws.CloseServiceHandle(h)
        finally:
            self.ws.CloseServiceHandle(scm)

    def start(self, name: str) -> None:
        import win32serviceutil

        win32serviceutil.StartService(name)

    def stop(self, name: str) -> None:
        import win32serviceutil

        win32serviceutil.StopService(name)

    def delete(self, name: str) -> None:
        import win32serviceutil

        win32serviceutil.RemoveService(name)


def service_class() -> Any:  # pragma: no cover - Windows only, not run on this branch
    """The pywin32 ServiceFramework class that runs the agent's ``run`` loop."""
    import servicemanager
    import win32service
    import win32serviceutil

    from agent.service.runner import Runner
    from agent.settings import load_settings

    class RmmhuntService(win32serviceutil.ServiceFramework):  # type: ignore[misc]
        _svc_name_ = SERVICE_NAME
        _svc_display_name_ = DISPLAY_NAME
        _svc_description_ = DESCRIPTION

        def __init__(self, args: Any) -> None:
            super().__init__(args)
            self.stop_event = threading.Event()

        def SvcStop(self) -> None:  # noqa: N802 - pywin32's name
            self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING)
            self.stop_event.set()

        def SvcDoRun(self) -> None:  # noqa: N802
            servicemanager.LogInfoMsg(f"{SERVICE_NAME}: starting")
            code = Runner(load_settings, mode="run", stop=self.stop_event).run()
            if code:
                # a non-zero exit (memory ceiling) must look like a failure to the SCM: recovery restarts it
                raise SystemExit(code)

    return RmmhuntService

"""The swept device's identity: from the options, else from the swept Windows installation's
registry hives (computer name, MachineGuid), never from the host running the sweep.

DeviceId is computed exactly as the agent computes it on that machine
(``agent.platform.device_id_from(MachineGuid)``), so the bundle joins the same device in the
fleet view. DeviceName is the lowercase FQDN the agent would report there: the TCP/IP host
name plus its primary DNS suffix (``Tcpip\\Parameters`` Hostname and Domain), else the
NetBIOS ComputerName.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from agent.platform import device_id_from

log = logging.getLogger(__name__)

SYSTEM_HIVE = ("Windows", "System32", "config", "SYSTEM")
SOFTWARE_HIVE = ("Windows", "System32", "config", "SOFTWARE")
DEVICE_ID_RE = re.compile(r"^[0-9a-fA-F]{40}$")


@dataclass(frozen=True)
class DeviceIdentity:
    device_name: str
    device_id: str
    name_source: str  # "options", "registry (...)", "derived from the device name", "source name"
    id_source: str

    def as_dict(self) -> dict[str, str]:
        return {
            "DeviceName": self.device_name,
            "DeviceId": self.device_id,
            "DeviceNameSource": self.name_source,
            "DeviceIdSource": self.id_source,
        }


@dataclass(frozen=True)
class RegistryIdentity:
    computer_name: str = ""  # lowercase FQDN as the agent would report it
    machine_guid: str = ""
    where: str = ""  # which volume/path the hives came from


def _value(hive: Any, key: str, name: str) -> str:
    try:
        value = hive.open(key).value(name).value
    except Exception:  # noqa: BLE001 - a missing key or value is simply not there
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-16-le", "replace").rstrip("\x00")
    return str(value).strip().rstrip("\x00") if value is not None else ""


def parse_system_hive(stream: BinaryIO) -> str:
    """The lowercase FQDN from a SYSTEM hive ("" when it cannot be told)."""
    from dissect.regf import RegistryHive

    hive = RegistryHive(stream)
    current = _value(hive, "Select", "Current") or "1"
    try:
        control_set = f"ControlSet{int(current):03d}"
    except ValueError:
        control_set = "ControlSet001"
    tcpip = f"{control_set}\\Services\\Tcpip\\Parameters"
    host = _value(hive, tcpip, "Hostname") or _value(
        hive, f"{control_set}\\Control\\ComputerName\\ComputerName", "ComputerName"
    )
    domain = _value(hive, tcpip, "Domain") or _value(hive, tcpip, "NV Domain")
    if not host:
        return ""
    return (f"{host}.{domain}" if domain else host).lower()


def parse_software_hive(stream: BinaryIO) -> str:
    """MachineGuid from a SOFTWARE hive ("" when absent)."""
    from dissect.regf import RegistryHive

    return _value(RegistryHive(stream), "Microsoft\\Cryptography", "MachineGuid")


def parse_system_root(stream: BinaryIO) -> str:
    """SystemRoot (``C:\\Windows``) from a SOFTWARE hive: the system volume's drive letter."""
    from dissect.regf import RegistryHive

    return _value(RegistryHive(stream), "Microsoft\\Windows NT\\CurrentVersion", "SystemRoot")


def parse_mounted_devices(stream: BinaryIO) -> dict[str, bytes]:
    """``{"D:": value}`` from a SYSTEM hive's MountedDevices: the value is the MBR disk signature
    and partition offset (12 bytes) or ``DMIO:ID:`` and the GPT partition GUID."""
    from dissect.regf import RegistryHive

    out: dict[str, bytes] = {}
    try:
        key = RegistryHive(stream).open("MountedDevices")
    except Exception:  # noqa: BLE001 - no MountedDevices key
        return out
    for value in key.values():
        name = str(value.name)
        data = value.value
        if name.startswith("\\DosDevices\\") and len(name) == 14 and isinstance(data, bytes):
            out[name[-2:].upper()] = data
    return out


def explain_registry_identity(open_hive: Callable[[tuple[str, ...]], BinaryIO | None], where: str) -> RegistryIdentity:
    """Read both hives through ``open_hive(parts)`` (None when absent); never raises."""
    name = guid = ""
    for parts, parse in ((SYSTEM_HIVE, parse_system_hive), (SOFTWARE_HIVE, parse_software_hive)):
        try:
            stream = open_hive(parts)
            if stream is None:
                continue
            with stream:
                value = parse(stream)
        except Exception as exc:  # noqa: BLE001 - a damaged hive gives no identity, not a failed sweep
            log.warning("cannot read %s hive in %s: %s", parts[-1], where, exc)
            continue
        if parse is parse_system_hive:
            name = value
        else:
            guid = value
    return RegistryIdentity(name, guid, where if (name or guid) else "")


def _ci_join(base: str, parts: tuple[str, ...]) -> str | None:
    """``base/parts...`` matching each component case-insensitively, as Windows does."""
    path = base
    for part in parts:
        try:
            names = os.listdir(path)
        except OSError:
            return None
        match = next((n for n in names if n.lower() == part.lower()), None)
        if match is None:
            return None
        path = os.path.join(path, match)
    return path


def folder_registry_identity(root: str) -> RegistryIdentity:
    """The registry identity of a Windows installation at ``root`` (a mounted volume)."""

    def open_hive(parts: tuple[str, ...]) -> BinaryIO | None:
        path = _ci_join(root, parts)
        return open(path, "rb") if path and os.path.isfile(path) else None

    return explain_registry_identity(open_hive, root)


def resolve_identity(
    *, device_name: str, device_id: str, registry: RegistryIdentity | None, fallback_name: str
) -> DeviceIdentity:
    """Options first, then the registry, then a name-derived id (the agent's own fallback for a
    machine without a machine id: SHA-1 of ``hostname:<name>``). Never the sweeping host."""
    registry = registry or RegistryIdentity()
    where = f"registry ({registry.where})"
    if device_name:
        name, name_source = device_name.lower(), "options"
    elif registry.computer_name:
        name, name_source = registry.computer_name, where
    else:
        name, name_source = fallback_name.lower(), "source name (no --device-name, no registry)"
    if device_id:
        if not DEVICE_ID_RE.match(device_id):
            raise ValueError(f"--device-id must be 40 hex characters, got {device_id!r}")
        did, id_source = device_id.lower(), "options"
    elif registry.machine_guid:
        did, id_source = device_id_from(registry.machine_guid), f"{where}: SHA-1 of MachineGuid"
    else:
        did, id_source = device_id_from("hostname:" + name), "SHA-1 of 'hostname:' + DeviceName"
    return DeviceIdentity(name, did, name_source, id_source)

"""The swept device's identity: options, else the swept installation's registry, never the host."""

from __future__ import annotations

import io
import shutil

import pytest

from agent.platform import device_id_from, machine_identity
from agent.settings import load_settings
from agent.sweep.driver import run_sweep
from agent.sweep.identity import RegistryIdentity, parse_software_hive, parse_system_hive, resolve_identity
from tests.conftest import FIXTURES
from tests.sweep.regf import build_hive

GUID = "0c6f6e2a-7c1d-4f0e-9b9e-3f2d6c1a5b77"


def system_hive(**tcpip: str) -> bytes:
    return build_hive(
        {
            "Select": {"Current": 2},
            "ControlSet002\\Control\\ComputerName\\ComputerName": {"ComputerName": "FILESRV01"},
            "ControlSet002\\Services\\Tcpip\\Parameters": dict(tcpip),
            "ControlSet001\\Control\\ComputerName\\ComputerName": {"ComputerName": "STALE"},
        }
    )


def test_system_hive_gives_the_fqdn_of_the_current_control_set():
    assert parse_system_hive(io.BytesIO(system_hive())) == "filesrv01"
    assert parse_system_hive(io.BytesIO(system_hive(Hostname="FileSrv01", Domain="ad.example"))) == (
        "filesrv01.ad.example"
    )
    soft = build_hive({"Microsoft\\Cryptography": {"MachineGuid": GUID}})
    assert parse_software_hive(io.BytesIO(soft)) == GUID


def test_options_win_then_registry_then_a_name_derived_id_never_the_host():
    reg = RegistryIdentity("filesrv01", GUID, "x")
    both = resolve_identity(device_name="", device_id="", registry=reg, fallback_name="img")
    assert (both.device_name, both.device_id) == ("filesrv01", device_id_from(GUID))
    named = resolve_identity(device_name="IR-1", device_id="", registry=reg, fallback_name="img")
    assert (named.device_name, named.device_id, named.name_source) == ("ir-1", device_id_from(GUID), "options")
    bare = resolve_identity(device_name="", device_id="", registry=None, fallback_name="Evidence.E01")
    assert bare.device_name == "evidence.e01" and bare.device_id == device_id_from("hostname:evidence.e01")
    assert bare.device_id != device_id_from(machine_identity())
    with pytest.raises(ValueError):
        resolve_identity(device_name="", device_id="xyz", registry=None, fallback_name="a")


def test_mounted_windows_volume_folder_takes_its_identity_from_its_hives(tmp_path):
    root = tmp_path / "mnt"
    config = root / "WINDOWS" / "system32" / "Config"  # matched case-insensitively, as on Windows
    config.mkdir(parents=True)
    (config / "SYSTEM").write_bytes(system_hive(Hostname="FileSrv01", Domain="ad.example"))
    (config / "software").write_bytes(build_hive({"Microsoft\\Cryptography": {"MachineGuid": GUID}}))
    shutil.copy(FIXTURES / "files" / "pulseway.exe", root / "pulseway.exe")
    outcome = run_sweep(str(root), load_settings(state_dir=str(tmp_path / "state")))
    assert outcome.device.device_name == "filesrv01.ad.example"
    assert outcome.device.device_id == device_id_from(GUID)
    assert outcome.rows and {r["DeviceId"] for r in outcome.rows} == {device_id_from(GUID)}


def test_a_damaged_hive_gives_no_identity_not_a_failed_sweep(tmp_path):
    root = tmp_path / "mnt"
    config = root / "Windows" / "System32" / "config"
    config.mkdir(parents=True)
    (config / "SYSTEM").write_bytes(b"regf" + b"\xff" * 5000)
    outcome = run_sweep(str(root), load_settings(state_dir=str(tmp_path / "state")))
    assert outcome.device.device_name == "mnt" and outcome.device.name_source.startswith("source name")


def test_sweep_report_ids_never_collide_with_the_agents_own_counter(tmp_path):
    from agent.sweep.driver import REPORT_ID_SHIFT

    tree = tmp_path / "tree"
    tree.mkdir()
    shutil.copy(FIXTURES / "files" / "pulseway.exe", tree / "pulseway.exe")
    outcome = run_sweep(str(tree), load_settings(state_dir=str(tmp_path / "state")), device_name="ir-host-01")
    ids = [r["ReportId"] for r in outcome.rows]
    base = int(outcome.started.timestamp()) << REPORT_ID_SHIFT
    assert ids and all(base < i < base + (1 << REPORT_ID_SHIFT) for i in ids) and max(ids) < 2**53
    assert len(set(ids)) == len(ids)

"""Sweeping disk images with dissect.target: images generated here from the signed fixtures
(ntfs-3g tools, hand-written MBR/GPT, qemu-img, ewfacquire), read without mounting."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from agent.platform import device_id_from
from agent.settings import load_settings
from agent.sweep.driver import run_sweep
from tests.conftest import FIXTURES, ROOT
from tests.sweep import images
from tests.sweep.regf import build_hive

FILES = FIXTURES / "files"
PULSEWAY = "6192b741-4540-4416-8dbb-ce0405166d0a"
DWSERVICE = "642b39b7-18eb-46eb-ba1f-bf70befae05e"
MACHINE_GUID = "4c4c4544-0042-3510-8052-b7c04f4e4b31"


def findings_key(results) -> set[tuple[str, str, str]]:
    """(RuleId, file name, SHA-256) of every row behind every result: the findings, path-free."""
    out = set()
    for r in results:
        for row in r.rows:
            name = row["FolderPath"].replace("\\", "/").rsplit("/", 1)[-1]
            out.add((r.rule.id, name, row["SHA256"]))
    return out


def top_level_files() -> dict[str, Path]:
    """The fixtures directly in tests/fixtures/files (the images are built flat from them)."""
    return {p.name: p for p in sorted(FILES.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    vol = images.ntfs_volume(d / "fixtures.ntfs", top_level_files())
    small = images.ntfs_volume(d / "second.ntfs", {"dwservice.exe": FILES / "dwservice.exe"}, size_mb=4)
    mbr = images.mbr_disk(d / "mbr.raw", [vol, small])
    gpt = images.gpt_disk(d / "gpt.raw", [vol], ["Basic data partition"])
    return {
        "dir": d,
        "volume": vol,
        "qcow2": images.convert(vol, "qcow2", d / "fixtures.qcow2"),
        "vhdx": images.convert(vol, "vhdx", d / "fixtures.vhdx"),
        "vhd": images.convert(vol, "vpc", d / "fixtures.vhd"),
        "mbr_vhdx": images.convert(mbr, "vhdx", d / "mbr.vhdx"),
        "gpt_vmdk": images.convert(gpt, "vmdk", d / "gpt.vmdk"),
        "gpt_e01": images.e01(gpt, d / "gpt"),
    }


@pytest.fixture(scope="module")
def folder_findings(tmp_path_factory):
    settings = load_settings(state_dir=str(tmp_path_factory.mktemp("state")))
    folder = tmp_path_factory.mktemp("top")  # the same files as the images hold: the top-level fixtures
    for name, path in top_level_files().items():
        shutil.copyfile(path, folder / name)
    return findings_key(run_sweep(str(folder), settings, device_name="ir-host-01").results)


def test_acceptance_qcow2_of_ntfs_gives_the_folder_findings_with_paths_inside_the_image(
    built, folder_findings, tmp_path
):
    bundle = tmp_path / "qcow2.zip"
    state = tmp_path / "state"
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "sweep", str(built["qcow2"]), "--out", str(bundle),
         "--device-name", "ir-host-01", "--state-dir", str(state)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert not state.exists()
    assert (
        subprocess.run(
            [sys.executable, "-m", "agent.cli", "sweep", "--verify", str(bundle)], cwd=ROOT, capture_output=True
        ).returncode
        == 0
    )
    with zipfile.ZipFile(bundle) as zf:
        findings = json.loads(zf.read("findings.json"))
        manifest = json.loads(zf.read("manifest.json"))
    got = {(row["RuleId"], row["FileName"], row["SHA256"]) for row in findings["Rows"]}
    assert got == folder_findings and {PULSEWAY, DWSERVICE} <= {k[0] for k in got}
    paths = {row["FolderPath"] for row in findings["Rows"]}
    assert "partition1\\pulseway.exe" in paths and all(p.startswith("partition1\\") for p in paths)
    assert {row["Source"] for row in findings["Rows"]} == {"sweep"}
    assert manifest["Source"]["ImageType"] == "qcow2" and manifest["Source"]["Kind"] == "image"
    assert manifest["Source"]["SHA256"] == __import__("hashlib").sha256(built["qcow2"].read_bytes()).hexdigest()
    assert manifest["Source"]["Size"] == built["qcow2"].stat().st_size
    assert manifest["Source"]["Volumes"][0]["filesystem"] == "ntfs"


@pytest.mark.parametrize(
    ("key", "image_type"),
    [("volume", "raw"), ("vhdx", "vhdx"), ("vhd", "vhd"), ("gpt_vmdk", "vmdk"), ("gpt_e01", "ewf")],
)
def test_every_container_and_partition_table_gives_the_same_findings(built, folder_findings, tmp_path, key, image_type):
    settings = load_settings(state_dir=str(tmp_path / "state"))
    outcome = run_sweep(str(built[key]), settings, device_name="ir-host-01")
    assert outcome.source["image_type"] == image_type
    assert findings_key(outcome.results) == folder_findings
    assert all(r["FolderPath"].startswith("partition1\\") for r in outcome.rows)
    assert not (tmp_path / "state").exists()


def test_every_partition_of_an_mbr_disk_is_swept(built, tmp_path):
    settings = load_settings(state_dir=str(tmp_path / "state"))
    outcome = run_sweep(str(built["mbr_vhdx"]), settings, device_name="ir-host-01")
    assert [v["path_prefix"] for v in outcome.source["volumes"]] == ["partition1", "partition2"]
    dws = {row["FolderPath"] for r in outcome.results if r.rule.id == DWSERVICE for row in r.rows}
    assert {"partition1\\dwservice.exe", "partition2\\dwservice.exe"} <= dws
    # NTFS metadata files are the filesystem's own, never swept as files
    assert outcome.stats["files"] == len(top_level_files()) + 1


def test_same_caps_as_scan_too_large_in_an_image(built, tmp_path):
    settings = load_settings(state_dir=str(tmp_path / "state"), max_file_size=1024)
    outcome = run_sweep(str(built["qcow2"]), settings, device_name="ir-host-01")
    assert outcome.stats["statuses"]["TOO_LARGE"] > 0 and not outcome.results
    assert any(e["status"] == "TOO_LARGE" and e["path"].startswith("partition1\\") for e in outcome.errors)


def test_a_file_that_is_no_image_is_one_line_exit_2(tmp_path):
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"\x00junk" * 1000)
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "sweep", str(junk), "--out", str(tmp_path / "b.zip")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and out.stderr.startswith("rmmhunt: error:") and out.stderr.count("\n") == 1
    assert "junk.img" in out.stderr and not (tmp_path / "b.zip").exists()


@pytest.fixture(scope="module")
def windows_disk(tmp_path_factory):
    """A Windows installation on an MBR disk: C: holds the hives and Program Files, D: a second
    partition that MountedDevices maps by disk signature and offset."""
    if not images.fuse_available():
        pytest.skip("building a directory tree in NTFS needs ntfs-3g over FUSE (root and /dev/fuse)")
    d = tmp_path_factory.mktemp("windows")
    software = build_hive(
        {
            "Microsoft\\Cryptography": {"MachineGuid": MACHINE_GUID},
            "Microsoft\\Windows NT\\CurrentVersion": {"SystemRoot": "C:\\Windows"},
        }
    )
    data = images.ntfs_volume(d / "data.ntfs", {"dwservice.exe": FILES / "dwservice.exe"}, size_mb=4, label="DATA")
    # D: is the second partition: MBR signature 0x1234ABCD (mbr_disk) and its byte offset
    c_sectors = 16 * 1024 * 1024 // 512
    d_key = (0x1234ABCD).to_bytes(4, "little") + ((images.PART_START + c_sectors) * 512).to_bytes(8, "little")
    system = build_hive(
        {
            "Select": {"Current": 1},
            "ControlSet001\\Control\\ComputerName\\ComputerName": {"ComputerName": "VICTIM-PC"},
            "ControlSet001\\Services\\Tcpip\\Parameters": {"Hostname": "Victim-PC", "Domain": "corp.example"},
            "MountedDevices": {"\\DosDevices\\D:": d_key},
        }
    )
    os_volume = images.ntfs_volume_with_tree(
        d / "os.ntfs",
        {
            "Windows/System32/config/SYSTEM": system,
            "Windows/System32/config/SOFTWARE": software,
            "Program Files/Pulseway/pulseway.exe": FILES / "pulseway.exe",
        },
    )
    return images.convert(images.mbr_disk(d / "win.raw", [os_volume, data]), "qcow2", d / "win.qcow2")


def test_windows_image_identity_from_its_registry_and_drive_letter_paths(windows_disk, tmp_path):
    settings = load_settings(state_dir=str(tmp_path / "state"))
    outcome = run_sweep(str(windows_disk), settings)
    assert outcome.device.device_name == "victim-pc.corp.example"
    assert outcome.device.device_id == device_id_from(MACHINE_GUID)  # what the agent computes on that machine
    assert outcome.device.name_source.startswith("registry") and "MachineGuid" in outcome.device.id_source
    paths = {row["FolderPath"] for row in outcome.rows}
    assert "C:\\Program Files\\Pulseway\\pulseway.exe" in paths
    assert "D:\\dwservice.exe" in paths
    assert {row["FileName"] for row in outcome.rows} == {"pulseway.exe", "dwservice.exe"}
    assert {row["DeviceId"] for row in outcome.rows} == {device_id_from(MACHINE_GUID)}
    # the options win over the registry
    named = run_sweep(str(windows_disk), settings, device_name="ir-host-01")
    assert named.device.device_name == "ir-host-01" and named.device.device_id == device_id_from(MACHINE_GUID)

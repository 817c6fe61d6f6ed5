"""Smoke test of the PyInstaller one-file binary (build/rmmhunt.spec): --version, rules list,
scan, and sweep of a folder and of a disk image, run with an environment whose PATH holds no
Python. The binary is built once and cached under a key of the sources it is built from
(RMMHUNT_BUILD_CACHE, default ~/.cache/rmmhunt-build), so the suite pays the build (about
1-3 minutes on this machine) only when the agent, its data or the spec changed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, ROOT
from tests.sweep import images

pytestmark = pytest.mark.build

PULSEWAY = "6192b741-4540-4416-8dbb-ce0405166d0a"
DWSERVICE = "642b39b7-18eb-46eb-ba1f-bf70befae05e"


def source_key() -> str:
    digest = hashlib.sha256()
    import PyInstaller

    digest.update(f"{sys.version}|{PyInstaller.__version__}".encode())
    paths = [ROOT / "pyproject.toml", ROOT / "build" / "rmmhunt.spec", ROOT / "build" / "rmmhunt_entry.py"]
    paths += sorted((ROOT / "agent").rglob("*.py")) + sorted(p for p in (ROOT / "config").rglob("*") if p.is_file())
    for path in paths:
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:20]


@pytest.fixture(scope="session")
def binary() -> Path:
    from filelock import FileLock

    cache = Path(os.environ.get("RMMHUNT_BUILD_CACHE") or Path.home() / ".cache" / "rmmhunt-build")
    target = cache / source_key()
    exe = target / "dist" / "rmmhunt"
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / ".lock"), timeout=1200):
        if not exe.is_file():
            work = target / "work"
            out = subprocess.run(
                [sys.executable, "-m", "PyInstaller", "--noconfirm", "--clean", "--log-level", "WARN",
                 "--distpath", str(target / "dist"), "--workpath", str(work), str(ROOT / "build" / "rmmhunt.spec")],
                cwd=ROOT, capture_output=True, text=True, timeout=1200,
            )  # fmt: skip
            assert out.returncode == 0, out.stderr[-4000:]
            shutil.rmtree(work, ignore_errors=True)
    return exe


@pytest.fixture(scope="module")
def no_python_env(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("nopython")
    (d / "bin").mkdir()
    env = {"PATH": str(d / "bin"), "HOME": str(d / "home"), "LANG": "C.UTF-8", "RMMHUNT_STATE_DIR": str(d / "state")}
    assert shutil.which("python3", path=env["PATH"]) is None and shutil.which("python", path=env["PATH"]) is None
    return env


def run(binary: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(binary), *args], env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )


def test_frozen_version_and_rules_list(binary, no_python_env):
    out = run(binary, no_python_env, "--version")
    assert out.returncode == 0 and out.stdout.strip() == f"rmmhunt {__import__('agent').__version__}"
    rules = run(binary, no_python_env, "rules", "list", "--format", "json")
    assert rules.returncode == 0, rules.stderr
    ids = {r["RuleId"] for r in json.loads(rules.stdout)["results"]}
    assert {PULSEWAY, DWSERVICE} <= ids and len(ids) > 100


def test_frozen_every_command_module_loads(binary, no_python_env, tmp_path):
    """agent.cli imports each command's module by name when it runs (start-up): the spec must bundle them."""
    from agent.cli import MODULE_COMMANDS

    for names in MODULE_COMMANDS.values():
        for name in names:
            out = run(binary, no_python_env, name, "--help")
            assert out.returncode == 0 and f"rmmhunt {name}" in out.stdout, (name, out.stderr[-2000:])
    out = run(binary, no_python_env, "config", "show", "--format", "json", "--state-dir", str(tmp_path / "s"))
    assert out.returncode == 0 and json.loads(out.stdout)["results"], out.stderr


def test_frozen_scan_of_the_fixtures(binary, no_python_env, tmp_path):
    out = run(binary, no_python_env, "scan", str(FIXTURES), "--format", "json", "--state-dir", str(tmp_path / "s"))
    assert out.returncode == 1, out.stderr
    payload = json.loads(out.stdout)
    assert {PULSEWAY, DWSERVICE} <= {r["RuleId"] for r in payload["results"]}
    # signify verified the signatures (oscrypto loaded through the import hook from source)
    assert payload["summary"]["statuses"]["OK"] >= 10


def test_frozen_sweep_of_a_folder_and_of_a_qcow2_image(binary, no_python_env, tmp_path):
    folder = tmp_path / "folder.zip"
    out = run(
        binary, no_python_env, "sweep", str(FIXTURES / "files"), "--out", str(folder), "--device-name", "ir-host-01"
    )
    assert out.returncode == 1, out.stderr
    top = {p.name: p for p in sorted((FIXTURES / "files").iterdir()) if p.is_file()}  # the image holds these
    volume = images.ntfs_volume(tmp_path / "vol.ntfs", top)
    qcow2 = images.convert(volume, "qcow2", tmp_path / "vol.qcow2")
    image = tmp_path / "image.zip"
    out = run(binary, no_python_env, "sweep", str(qcow2), "--out", str(image), "--device-name", "ir-host-01")
    assert out.returncode == 1, out.stderr
    for bundle in (folder, image):
        assert run(binary, no_python_env, "sweep", "--verify", str(bundle)).returncode == 0
    top_hashes = {hashlib.sha256(p.read_bytes()).hexdigest() for p in top.values()}
    keys = []
    for bundle in (folder, image):
        with zipfile.ZipFile(bundle) as zf:
            rows = json.loads(zf.read("findings.json"))["Rows"]
        keys.append({(r["RuleId"], r["FileName"], r["SHA256"]) for r in rows if r["SHA256"] in top_hashes})
        if bundle is image:
            assert all(r["FolderPath"].startswith("partition1\\") for r in rows)
    assert keys[0] == keys[1] and {PULSEWAY, DWSERVICE} <= {k[0] for k in keys[1]}

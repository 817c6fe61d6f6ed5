"""`rmmhunt sweep` of a folder end to end: the bundle, its manifest, --verify, encryption and
iter_bundle_rows. Real files, real signify, real SQLite, the real console entry point."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from agent.platform import device_id_from
from agent.sweep import BundleError, check_bundle, iter_bundle_rows
from agent.sweep.bundle import MANIFEST, MEMBERS, PASSPHRASE_ENV
from tests.conftest import FIXTURES, ROOT

PULSEWAY = "6192b741-4540-4416-8dbb-ce0405166d0a"
DWSERVICE = "642b39b7-18eb-46eb-ba1f-bf70befae05e"
RESULT_KEYS = {"DeviceId", "DeviceName", "FirstSeen", "LastSeen", "Report", "Count"}


def rmmhunt(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != PASSPHRASE_ENV}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One sweep of tests/fixtures as ir-host-01, shared by the tests of this module."""
    tmp = tmp_path_factory.mktemp("sweep")
    state = tmp / "host-state"
    bundle = tmp / "ir-host-01.zip"
    out = rmmhunt(
        "sweep",
        str(FIXTURES),
        "--out",
        str(bundle),
        "--device-name",
        "ir-host-01",
        "--state-dir",
        str(state),
        env={"RMMHUNT_STATE_DIR": str(tmp / "env-state")},
    )
    return tmp, bundle, state, out


def members_of(bundle: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(bundle) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def rezip(members: dict[str, bytes], path: Path) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_acceptance_folder_sweep_verifies_and_holds_pulseway_and_dwservice_for_ir_host_01(swept):
    tmp, bundle, state, out = swept
    assert out.returncode == 1, out.stderr  # findings
    assert not state.exists() and not (tmp / "env-state").exists(), "the host's store must never be touched"
    verify = rmmhunt("sweep", "--verify", str(bundle))
    assert verify.returncode == 0, verify.stderr
    members = members_of(bundle)
    assert set(members) == set(MEMBERS) | {MANIFEST}
    findings = json.loads(members["findings.json"])
    by_rule = {r["RuleId"]: r for r in findings["Results"]}
    assert {PULSEWAY, DWSERVICE} <= set(by_rule)
    expected_id = device_id_from("hostname:ir-host-01")
    for rule_id in (PULSEWAY, DWSERVICE):
        result = by_rule[rule_id]
        assert RESULT_KEYS <= set(result)
        assert result["DeviceName"] == "ir-host-01" and result["DeviceId"] == expected_id
        assert result["Count"] == len(result["Report"])
        assert result["Techniques"] == ["T1219"]
    files = {f["FileName"]: f for f in findings["Files"]}
    assert "Pulseway" in files["pulseway.exe"]["Tools"] and "DWService" in files["dwservice.exe"]["Tools"]
    assert files["pulseway.exe"]["Running"] is False and files["pulseway.exe"]["Trust"]
    rows = [json.loads(line) for line in members["rows.jsonl"].splitlines()]
    assert rows and {r["Source"] for r in rows} == {"sweep"}
    assert {r["DeviceName"] for r in rows} == {"ir-host-01"}


def test_manifest_and_stats_carry_what_the_spec_lists(swept):
    _tmp, bundle, _state, _out = swept
    members = members_of(bundle)
    manifest = json.loads(members[MANIFEST])
    assert manifest["Tool"]["Name"] == "rmmhunt" and manifest["Tool"]["Version"]
    assert manifest["Source"]["Kind"] == "folder" and manifest["Source"]["Path"] == str(FIXTURES)
    assert manifest["Device"]["DeviceName"] == "ir-host-01" and manifest["Device"]["DeviceNameSource"] == "options"
    assert manifest["Started"] <= manifest["Ended"]
    assert manifest["Operator"]["Host"] and manifest["Operator"]["User"]
    for name in MEMBERS:
        assert manifest["Members"][name]["SHA256"] == hashlib.sha256(members[name]).hexdigest()
    stats = json.loads(members["stats.json"])
    assert stats["files"] == sum(stats["statuses"].values()) > 0
    rule = next(r for r in stats["rules"] if r["id"] == PULSEWAY)
    rule_file = ROOT / "config" / "rules" / rule["file"]
    assert rule["sha256"] == hashlib.sha256(rule_file.read_bytes()).hexdigest()
    errors = [json.loads(line) for line in members["errors.jsonl"].splitlines()]
    assert any(e["status"] == "PARSE_ERROR" and e["path"].endswith("truncated_certtable.exe") for e in errors)


@pytest.mark.parametrize("member", [*MEMBERS, MANIFEST])
def test_flipping_one_byte_of_any_member_fails_verify(swept, tmp_path, member):
    _tmp, bundle, _state, _out = swept
    members = members_of(bundle)
    data = bytearray(members[member])
    pos = len(data) // 2 if data else 0
    if not data:  # an empty member: one added byte is the smallest change
        data = bytearray(b"x")
    else:
        data[pos] ^= 0x01
    members[member] = bytes(data)
    tampered = rezip(members, tmp_path / "tampered.zip")  # a valid zip: only the manifest can tell
    assert not check_bundle(tampered).ok
    out = rmmhunt("sweep", "--verify", str(tampered))
    assert out.returncode == 1, out.stderr
    assert "does not verify" in out.stderr


def test_flipping_a_byte_of_the_zip_file_itself_fails_verify(swept, tmp_path):
    _tmp, bundle, _state, _out = swept
    raw = bytearray(bundle.read_bytes())
    with zipfile.ZipFile(bundle) as zf:
        info = zf.getinfo("rows.jsonl")
    raw[info.header_offset + 30 + len(info.filename) + 10] ^= 0xFF  # inside the compressed data
    broken = tmp_path / "broken.zip"
    broken.write_bytes(bytes(raw))
    out = rmmhunt("sweep", "--verify", str(broken))
    assert out.returncode != 0


def test_extra_or_missing_member_fails_verify(swept, tmp_path):
    _tmp, bundle, _state, _out = swept
    members = members_of(bundle)
    assert not check_bundle(rezip({**members, "extra.txt": b"planted"}, tmp_path / "extra.zip")).ok
    del members["errors.jsonl"]
    assert not check_bundle(rezip(members, tmp_path / "missing.zip")).ok


def test_iter_bundle_rows_yields_rows_and_refuses_a_tampered_bundle(swept, tmp_path):
    _tmp, bundle, _state, _out = swept
    rows = list(iter_bundle_rows(bundle))
    assert rows and all(r["DeviceName"] == "ir-host-01" and r["ReportId"] for r in rows)
    members = members_of(bundle)
    members["rows.jsonl"] = members["rows.jsonl"].replace(b"ir-host-01", b"ir-host-02", 1)
    with pytest.raises(BundleError, match="does not verify"):
        next(iter_bundle_rows(rezip(members, tmp_path / "t.zip")))


def test_encrypted_bundle_passphrase_from_environment_never_argv(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "pulseway.exe").write_bytes((FIXTURES / "files" / "pulseway.exe").read_bytes())
    bundle = tmp_path / "enc.zip"
    secret = {PASSPHRASE_ENV: "correct horse battery staple"}
    out = rmmhunt("sweep", str(tree), "--out", str(bundle), "--device-name", "ir-host-01", "--encrypt", env=secret)
    assert out.returncode == 1, out.stderr
    with zipfile.ZipFile(bundle) as zf:
        assert all(info.flag_bits & 0x1 for info in zf.infolist())
        with pytest.raises(RuntimeError):
            zf.read("rows.jsonl")  # stdlib zipfile cannot read AES members without the key
    assert rmmhunt("sweep", "--verify", str(bundle), env=secret).returncode == 0
    assert len(list(iter_bundle_rows(bundle, passphrase=secret[PASSPHRASE_ENV]))) >= 1
    wrong = rmmhunt("sweep", "--verify", str(bundle), env={PASSPHRASE_ENV: "wrong"})
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1 and "rmmhunt: error:" in wrong.stderr
    none = rmmhunt("sweep", "--verify", str(bundle))  # no env, no terminal: refuses, never hangs
    assert none.returncode == 2 and PASSPHRASE_ENV in none.stderr
    unencrypted_needs = rmmhunt("sweep", str(tree), "--out", str(tmp_path / "x.zip"), "--encrypt")
    assert unencrypted_needs.returncode == 2 and not (tmp_path / "x.zip").exists()
    helptext = rmmhunt("sweep", "--help").stdout
    assert "--passphrase" not in helptext and "--password" not in helptext


def test_device_id_option_and_bad_values_are_one_line_errors(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "dwservice.exe").write_bytes((FIXTURES / "files" / "dwservice.exe").read_bytes())
    bundle = tmp_path / "b.zip"
    did = "ab" * 20
    out = rmmhunt("sweep", str(tree), "--out", str(bundle), "--device-name", "IR-Host-01", "--device-id", did.upper())
    assert out.returncode == 1, out.stderr
    rows = list(iter_bundle_rows(bundle))
    assert {(r["DeviceName"], r["DeviceId"]) for r in rows} == {("ir-host-01", did)}
    bad = rmmhunt("sweep", str(tree), "--out", str(tmp_path / "c.zip"), "--device-id", "nothex")
    assert bad.returncode == 2 and bad.stderr.startswith("rmmhunt: error:") and bad.stderr.count("\n") == 1
    missing = rmmhunt("sweep", str(tmp_path / "nope"), "--out", str(tmp_path / "d.zip"))
    assert missing.returncode == 2 and "nope" in missing.stderr and "Traceback" not in missing.stderr
    garbage = tmp_path / "garbage.zip"
    garbage.write_bytes(b"not a zip")
    assert rmmhunt("sweep", "--verify", str(garbage)).returncode == 2


def test_progress_is_shown_on_a_terminal_and_not_otherwise(tmp_path):
    import pty

    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "pulseway.exe").write_bytes((FIXTURES / "files" / "pulseway.exe").read_bytes())
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "agent.cli", "sweep", str(tree), "--out", str(tmp_path / "t.zip")],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, timeout=120,
        )  # fmt: skip
        os.close(slave)
        slave = -1
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not data:
                break
            chunks.append(data)
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    shown = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 1
    assert "sweeping" in shown and "swept 1 files" in shown
    piped = rmmhunt("sweep", str(tree), "--out", str(tmp_path / "p.zip"))
    assert "sweeping" not in piped.stderr and "\r" not in piped.stderr

"""`rmmhunt config show|check`, and bad config values through the real console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, ROOT, TEST_ROOT_CA

PULSEWAY_EXE = FIXTURES / "files" / "pulseway.exe"


def run(*args: str, state: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter with no RMMHUNT_* variables but the ones given."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RMMHUNT_")}
    cmd = [sys.executable, "-m", "agent.cli", *args, "--state-dir", str(state)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env={**clean, **(env or {})})


# Each of these made main scan with a broken setting (exit 0 or 1) or crash with a traceback.
BAD_SCAN_CONFIGS = [
    ('max_file_size = "big"', "max_file_size: expected an integer (bytes)"),
    ('file_time_budget = "fast"', "file_time_budget: expected a number (seconds)"),
    ('verify = "no"', "verify: expected true or false"),
    ("max_file_size = -1", "max_file_size: must be >= 1"),
    ('trusted_roots = ["missing.pem"]', "trusted_roots:"),
    ('trusted_roots = ["garbage.pem"]', "trusted_roots:"),
    ("follow_symlinks = []", "follow_symlinks: expected true or false, got array"),
]


@pytest.fixture
def cli(monkeypatch, capsys):
    """The CLI's main() in this process (no interpreter start-up), with a clean RMMHUNT_* environment."""
    from agent.cli import main

    for name in [k for k in os.environ if k.startswith("RMMHUNT_")]:
        monkeypatch.delenv(name)

    def call(*args: str, state: Path, env: dict[str, str] | None = None):
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        code = main([*args, "--state-dir", str(state)])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return call


@pytest.mark.parametrize(("line", "message"), BAD_SCAN_CONFIGS)
def test_scan_with_a_bad_config_value_exits_2_with_one_line(cli, tmp_path: Path, line: str, message: str):
    (tmp_path / "garbage.pem").write_bytes(b"\x30\x82\xff\xffnot DER at all")
    config = tmp_path / "bad.toml"
    config.write_text(f"# test\n[agent]\n{line}\n", encoding="utf-8")
    out = cli("scan", "--config", str(config), str(FIXTURES / "files"), state=tmp_path / "s")
    assert out.returncode == 2, out
    assert out.stdout == ""
    assert out.stderr.startswith(f"rmmhunt: error: {config}:3: {message}"), out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert not (tmp_path / "s" / "rmmhunt.sqlite3").exists()  # refused before any work


def test_the_console_script_refuses_a_bad_config_in_one_line(tmp_path: Path):
    """The same through a real process: one line on stderr, exit 2, no traceback, nothing scanned."""
    (tmp_path / "garbage.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    config = tmp_path / "bad.toml"
    config.write_text('[agent]\ntrusted_roots = ["garbage.pem"]\n', encoding="utf-8")
    out = run("scan", "--config", str(config), str(PULSEWAY_EXE), state=tmp_path / "s")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith(f"rmmhunt: error: {config}:2: trusted_roots: {tmp_path / 'garbage.pem'}: not a PEM")
    assert out.stderr.count("\n") == 1, out.stderr


def test_a_missing_explicit_config_is_an_error_and_the_env_variable_names_one(cli, tmp_path: Path):
    out = cli("scan", "--config", str(tmp_path / "nope.toml"), str(PULSEWAY_EXE), state=tmp_path / "s")
    assert (
        out.returncode == 2
        and out.stderr == f"rmmhunt: error: {tmp_path / 'nope.toml'}: cannot read: No such file or directory\n"
    )
    config = tmp_path / "env.toml"
    config.write_text('[agent]\nverify = "no"\n', encoding="utf-8")
    out = cli("hunt", state=tmp_path / "s", env={"RMMHUNT_CONFIG": str(config)})
    assert out.returncode == 2 and out.stderr.startswith(f"rmmhunt: error: {config}:2: verify: "), out.stderr


def test_config_show_lists_every_setting_with_its_source(cli, tmp_path: Path):
    config = tmp_path / "agent.toml"
    config.write_text(
        "[agent]\n"
        "max_file_size = 1000\n"
        f'trusted_roots = ["{TEST_ROOT_CA}"]\n'
        "[collector]\n"
        'url = "https://collector.example"\n'
        'enroll_secret = "s3cret-value"\n'
        "[[exclusions]]\n"
        'id = "x"\n'
        "expression = 'signer has \"Dell\"'\n",
        encoding="utf-8",
    )
    env = {"RMMHUNT_SETTLE_SECONDS": "2.5"}
    out = run("config", "show", "--format", "json", "--config", str(config), state=tmp_path / "s", env=env)
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    by_key = {r["Setting"]: r for r in payload["results"]}
    from agent.settings import OPTIONS

    assert [r["Name"] for r in payload["results"]] == [o.name for o in OPTIONS]
    assert by_key["max_file_size"]["Value"] == 1000 and by_key["max_file_size"]["Source"] == f"file:{config}:2"
    assert by_key["trusted_roots"]["Value"] == [str(TEST_ROOT_CA)]
    assert (
        by_key["settle_seconds"]["Value"] == 2.5 and by_key["settle_seconds"]["Source"] == "env:RMMHUNT_SETTLE_SECONDS"
    )
    assert by_key["state_dir"]["Value"] == str(tmp_path / "s") and by_key["state_dir"]["Source"] == "flag"
    assert by_key["verify"] == {**by_key["verify"], "Value": True, "Source": "default", "Type": "bool"}
    assert by_key["collector.url"]["Source"] == f"file:{config}:5"
    assert by_key["collector.forward"]["Value"] == "hits" and "one of hits, all" in by_key["collector.forward"]["Type"]
    assert by_key["collector.enroll_secret"]["Value"] == "********" and "s3cret" not in out.stdout
    assert by_key["max_cert_table_size"]["Default"] == 8 * 1024 * 1024 and by_key["lock_timeout"]["Help"]
    assert payload["summary"]["ConfigFile"] == str(config) and payload["summary"]["ConfigSource"] == "flag"
    assert payload["summary"]["Exclusions"] == 1 and payload["errors"] == []

    table = cli("config", "show", "--config", str(config), state=tmp_path / "s", env=env)
    assert table.returncode == 0, table.stderr
    assert f"config file: {config} (flag)" in table.stdout and "s3cret" not in table.stdout
    lines = table.stdout.splitlines()
    row = next(line for line in lines if line.startswith("max_file_size "))
    assert row.split() == ["max_file_size", "1000", f"file:{config}:2"]
    assert any(line.split()[:3] == ["settle_seconds", "2.5", "env:RMMHUNT_SETTLE_SECONDS"] for line in lines)
    words = " ".join(table.stdout.split())
    assert "largest Authenticode certificate table" in words and "env RMMHUNT_MAX_CERT_TABLE_SIZE" in words


def test_config_show_reads_the_config_named_by_the_environment(cli, tmp_path: Path):
    config = tmp_path / "env.toml"
    config.write_text("[agent]\n\nlock_timeout = 5\n", encoding="utf-8")
    out = cli("config", "show", "--format", "json", state=tmp_path / "s", env={"RMMHUNT_CONFIG": str(config)})
    payload = json.loads(out.stdout)
    assert payload["summary"]["ConfigSource"] == "env:RMMHUNT_CONFIG"
    lock = next(r for r in payload["results"] if r["Setting"] == "lock_timeout")
    assert lock["Value"] == 5.0 and lock["Source"] == f"file:{config}:3"


def test_config_check_validates_without_running(cli, tmp_path: Path):
    good = tmp_path / "good.toml"
    good.write_text('[agent]\nverify = false\n[collector]\nforward = "all"\n', encoding="utf-8")
    out = cli("config", "check", str(good), state=tmp_path / "s")
    assert out.returncode == 0 and out.stdout == "" and out.stderr == f"{good}: ok\n"
    assert not (tmp_path / "s").exists()

    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[agent]\nmax_file_size = "big"\nverify = "no"\n\n[collector]\nforward = "some"\n'
        "[[exclusions]]\nid = 'e1'\nexpression = 'no.such.field == \"x\"'\n",
        encoding="utf-8",
    )
    out = cli("config", "check", str(bad), state=tmp_path / "s")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    problems = out.stdout.splitlines()
    assert [p.split(": ")[0] for p in problems[:3]] == [f"{bad}:2", f"{bad}:3", f"{bad}:6"]
    assert problems[0] == f'{bad}:2: max_file_size: expected an integer (bytes), got string "big"'
    assert len(problems) == 4 and problems[3].startswith(f"{bad}:9") and "no.such.field" in problems[3]
    assert out.stderr == f"{bad}: 4 problem(s)\n"

    # the example config is valid as a whole; with no FILE, the config in effect is checked
    assert cli("config", "check", str(ROOT / "config" / "agent.example.toml"), state=tmp_path / "s").returncode == 0
    out = cli("config", "check", state=tmp_path / "s", env={"RMMHUNT_CONFIG": str(bad)})
    assert out.returncode == 2 and len(out.stdout.splitlines()) == 4

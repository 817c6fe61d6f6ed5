"""End to end through the console script: real files, real SQLite, real rules."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import FIXTURES, ROOT

PULSEWAY = "6192b741-4540-4416-8dbb-ce0405166d0a"
DWSERVICE = "642b39b7-18eb-46eb-ba1f-bf70befae05e"
RESULT_KEYS = {"RuleId", "RuleName", "Tool", "DeviceId", "DeviceName", "FirstSeen", "LastSeen", "Report", "Count"}


def rmmhunt(
    *args: str, state, timeout: float = 300, extra_env: dict | None = None, process: bool = False
) -> subprocess.CompletedProcess:
    """Run the CLI as the console script does: ``agent.cli.main`` with stdout and stderr on strict
    UTF-8 streams (not terminals), in this process (fast: the imports are paid once), or in a
    child process with ``process=True``."""
    cmd = [*args, "--state-dir", str(state)]
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env.update(extra_env or {})
    if process:
        full = [sys.executable, "-m", "agent.cli", *cmd]
        return subprocess.run(full, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    return _in_process(cmd, env)


def _in_process(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    import contextlib
    import io
    import logging

    from agent.cli import main

    def stream() -> io.TextIOWrapper:
        return io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)

    out, err = stream(), stream()
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(cmd)
            except SystemExit as exc:  # argparse: --help, usage errors
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        root = logging.getLogger()
        for handler in root.handlers[:]:  # main() configures logging for a process: undo it
            handler.close()
            root.removeHandler(handler)
    texts = [s.buffer.getvalue().decode("utf-8") for s in (out, err)]  # type: ignore[attr-defined]
    return subprocess.CompletedProcess(["rmmhunt", *cmd], code, texts[0], texts[1])


def test_scan_fixtures_reports_pulseway_and_dwservice(tmp_path):
    out = rmmhunt("scan", str(FIXTURES), "--format", "json", "--rows", state=tmp_path / "s")
    assert out.returncode == 1, out.stderr
    payload = json.loads(out.stdout)
    by_rule = {r["RuleId"]: r for r in payload["results"]}
    assert {PULSEWAY, DWSERVICE} <= set(by_rule)
    for rule_id in (PULSEWAY, DWSERVICE):
        result = by_rule[rule_id]
        assert RESULT_KEYS <= set(result)
        assert len(result["DeviceId"]) == 40 and result["DeviceName"]
        assert result["FirstSeen"] <= result["LastSeen"]
        assert result["Count"] == len(result["Report"])
    rows = [row for result in payload["results"] for row in result["Rows"]]
    pulse_files = {os.path.basename(r["FolderPath"]) for r in rows if r["RuleId"] == PULSEWAY}
    # nested signature, MSI, content sniffing, PE32+, tampered copy: all carry the signer
    assert {
        "pulseway.exe",
        "dual_signed.exe",
        "signed.msi",
        "content_sniff.dat",
        "pe64.exe",
        "flipped_byte.exe",
    } <= pulse_files
    assert "nearmiss.exe" not in pulse_files
    dws_files = {os.path.basename(r["FolderPath"]) for r in rows if r["RuleId"] == DWSERVICE}
    assert {"dwservice.exe", "timestamped.exe"} <= dws_files
    assert all(r["RuleName"] for r in rows)
    statuses = {os.path.basename(e["Path"]): e["Status"] for e in payload["errors"]}
    assert statuses["truncated_certtable.exe"] == "PARSE_ERROR"
    assert payload["summary"]["files"] == sum(payload["summary"]["statuses"].values())


def test_a_tree_without_rmm_signers_exits_zero(tmp_path):
    tree = tmp_path / "clean"
    tree.mkdir()
    for name in ("benign.exe", "nearmiss.exe", "unsigned.exe", "text.exe"):
        shutil.copy(FIXTURES / "files" / name, tree / name)
    out = rmmhunt("scan", str(tree), state=tmp_path / "s")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "(no RMM tool found)" in out.stdout


def test_second_scan_reparses_nothing(tmp_path):
    state = tmp_path / "s"
    first = rmmhunt("scan", str(FIXTURES), "--format", "json", state=state)
    second = rmmhunt("scan", str(FIXTURES), "--format", "json", state=state)
    s1, s2 = json.loads(first.stdout)["summary"], json.loads(second.stdout)["summary"]
    assert s1["parsed"] == s1["files"] and s1["unchanged"] == 0
    assert s2["parsed"] == 0 and s2["unchanged"] == s1["files"]
    assert s2["statuses"] == s1["statuses"]
    assert second.returncode == 1  # the files are still on disk: still found
    assert json.loads(second.stdout)["results"] == json.loads(first.stdout)["results"]
    assert s2["findings"] == s1["findings"] > 0  # findings count the files found now, not new hits


def test_fifo_in_the_tree_does_not_block_the_scan(tmp_path):
    tree = tmp_path / "t"
    tree.mkdir()
    shutil.copy(FIXTURES / "files" / "pulseway.exe", tree / "p.exe")
    os.mkfifo(tree / "evil.exe")
    out = rmmhunt("scan", str(tree), "--format", "json", state=tmp_path / "s", timeout=120)
    assert out.returncode == 1, out.stderr
    summary = json.loads(out.stdout)["summary"]
    assert summary["files"] == 2 and summary["statuses"]["NOT_PE"] == 1


@pytest.mark.parametrize("fmt", ["table", "json", "jsonl", "csv"])
def test_every_format_for_hunt_and_rows(tmp_path, fmt):
    state = tmp_path / "s"
    rmmhunt("scan", str(FIXTURES / "files" / "pulseway.exe"), state=state)
    hunt = rmmhunt("hunt", "--format", fmt, state=state)
    rows = rmmhunt("rows", "--format", fmt, state=state)
    assert hunt.returncode == 1 and rows.returncode == 0
    assert PULSEWAY in hunt.stdout
    assert "MMSoft Design Ltd." in rows.stdout
    if fmt == "csv":
        assert rows.stdout.splitlines()[0].startswith("Timestamp,DeviceId,DeviceName,SHA1,IsSigned")
    if fmt == "jsonl":
        assert json.loads(rows.stdout.splitlines()[0])["Signer"] == "MMSoft Design Ltd."


def test_hunt_rows_carry_rule_id_and_name(tmp_path):
    state = tmp_path / "s"
    rmmhunt("scan", str(FIXTURES / "files"), state=state)
    out = rmmhunt("hunt", "--rule", DWSERVICE, "--rows", "--format", "jsonl", state=state)
    assert out.returncode == 1
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert records and all(r["RuleId"] == DWSERVICE and "DWService" in r["RuleName"] for r in records)
    assert {r["Signer"] for r in records} == {"DWSNET OÜ"}


def test_out_file_and_unknown_rule(tmp_path):
    state = tmp_path / "s"
    target = tmp_path / "report.csv"
    out = rmmhunt(
        "scan", str(FIXTURES / "files" / "dwservice.exe"), "--format", "csv", "--out", str(target), state=state
    )
    assert out.returncode == 1 and out.stdout == ""
    assert DWSERVICE in target.read_text(encoding="utf-8")
    bad = rmmhunt("hunt", "--rule", "no-such-rule", state=state)
    assert bad.returncode == 2 and "unknown rule id" in bad.stderr


def test_explain_shows_facts_and_why(tmp_path):
    out = rmmhunt("explain", str(FIXTURES / "files" / "flipped_byte.exe"), state=tmp_path / "s")
    assert out.returncode == 1
    assert "signature broken" in out.stdout and "INVALID_DIGEST" in out.stdout
    assert "FIRES" in out.stdout and "MMSoft Design" in out.stdout
    near = rmmhunt("explain", str(FIXTURES / "files" / "nearmiss.exe"), "--format", "json", state=tmp_path / "s")
    assert near.returncode == 0
    report = json.loads(near.stdout)
    assert report["status"] == "OK" and not any(r["fires"] for r in report["rules"])
    pulse = next(r for r in report["rules"] if r["rule_id"] == PULSEWAY)
    assert "XMMSoft Designer Ltd." in pulse["why"] and "MMSoft Design" in pulse["why"]


def test_bad_rule_file_is_named_and_other_rules_keep_working(tmp_path):
    rules = tmp_path / "rules"
    rules.mkdir()
    ref = ROOT.parent / "shared" / "reference" / "sentinel_rules"
    shutil.copy(ref / "azure-sentinel" / "rmm_Pulseway_filesig.yaml", rules)
    shutil.copy(ref / "jischell-msft" / "rmm_AnyDesk_filesig.yaml", rules)  # not valid YAML
    out = rmmhunt("scan", str(FIXTURES / "files" / "pulseway.exe"), "--rules", str(rules), state=tmp_path / "s")
    assert out.returncode == 1
    assert "rmm_AnyDesk_filesig.yaml:" in out.stderr and PULSEWAY in out.stdout


def test_missing_path_is_an_error(tmp_path):
    out = rmmhunt("scan", str(tmp_path / "nope"), state=tmp_path / "s")
    assert out.returncode == 2 and "no such file" in out.stderr


def test_example_config_loads_and_excluded_rows_are_kept_and_flagged(tmp_path):
    """The shipped example config is valid as a whole; an exclusion flags rows without losing them."""
    from agent.settings import load_settings

    settings = load_settings(config_file=str(ROOT / "config" / "agent.example.toml"), env={})
    assert settings.max_file_size == 268435456 and len(settings.exclusions) >= 5
    config = tmp_path / "agent.toml"
    config.write_text(
        "[agent]\nreobserve_interval = 3600.0\n\n"
        '[[exclusions]]\nid = "lab-dws"\nexpression = \'signer has "DWSNET"\'\n',
        encoding="utf-8",
    )
    state = tmp_path / "s"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "scan",
            str(FIXTURES / "files" / "dwservice.exe"),
            "--config",
            str(config),
            "--state-dir",
            str(state),
            "--format",
            "json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr  # the only hit is excluded: no finding
    assert json.loads(out.stdout)["summary"]["excluded_hits"] >= 1
    rows = rmmhunt("rows", "--excluded", "--format", "json", state=state)
    flagged = json.loads(rows.stdout)["results"]
    assert [r["ExclusionId"] for r in flagged] == ["lab-dws"] and flagged[0]["Excluded"] is True
    shown = rmmhunt("hunt", "--include-excluded", "--config", str(config), state=state)
    assert shown.returncode == 1 and DWSERVICE in shown.stdout


def test_bad_config_is_a_clear_error(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[[exclusions]]\nid = "x"\nexpression = \'process.name == "a" && event_id == "b"\'\n')
    out = rmmhunt("scan", str(FIXTURES / "files" / "unsigned.exe"), "--config", str(config), state=tmp_path / "s")
    assert out.returncode == 2
    assert "bad.toml:3" in out.stderr and "event_id" in out.stderr and "file.name" in out.stderr


def test_drill_down_rows_carry_their_evidence(tmp_path):
    state = tmp_path / "s"
    rmmhunt("scan", str(FIXTURES / "files" / "dwservice.exe"), state=state)
    out = rmmhunt("hunt", "--rows", "--format", "jsonl", "--rule", DWSERVICE, state=state)
    (record,) = [json.loads(line) for line in out.stdout.splitlines()]
    signer_evidence = [e for e in record["Evidence"] if e["Column"] == "Signer"]
    assert signer_evidence == [{"Column": "Signer", "Value": "DWSNET OÜ", "Operator": "has", "Pattern": "DWSNET OÜ"}]


def test_exclusions_in_force_apply_to_a_later_hunt_and_shared_signers_say_so(tmp_path):
    state = tmp_path / "s"
    rmmhunt("scan", str(FIXTURES / "files" / "kaseya_pulseway.exe"), state=state)
    out = rmmhunt("hunt", "--format", "json", state=state)
    results = json.loads(out.stdout)["results"]
    kaseya = next(r for r in results if r["Tool"] == "Kaseya")
    assert "Pulseway" in kaseya["SharedWith"]  # the Kaseya signer is shared with Pulseway
    config = tmp_path / "c.toml"
    config.write_text('[[exclusions]]\nid = "kaseya-lab"\nexpression = \'signer has "Kaseya Holdings"\'\n')
    quiet = rmmhunt("hunt", "--config", str(config), state=state)
    assert quiet.returncode == 0 and "(no RMM tool found)" in quiet.stdout
    loud = rmmhunt("hunt", "--config", str(config), "--include-excluded", state=state)
    assert loud.returncode == 1


def test_explain_never_blocks_or_crashes_on_odd_paths(tmp_path):
    fifo = tmp_path / "pipe.exe"
    os.mkfifo(fifo)
    out = rmmhunt("explain", str(fifo), "--format", "json", state=tmp_path / "s", timeout=60)
    assert out.returncode == 0 and json.loads(out.stdout)["status"] == "NOT_PE"
    gone = rmmhunt("explain", str(tmp_path / "gone.exe"), "--format", "json", state=tmp_path / "s")
    assert gone.returncode == 2 and gone.stdout == ""
    assert (
        gone.stderr.startswith("rmmhunt: error: ") and "gone.exe" in gone.stderr and len(gone.stderr.splitlines()) == 1
    )
    text = rmmhunt("explain", str(FIXTURES / "files" / "truncated_certtable.exe"), state=tmp_path / "s")
    assert text.returncode == 0 and "PARSE_ERROR" in text.stdout and "none can fire" in text.stdout


def test_a_per_rule_exclusion_recorded_at_scan_time_holds_for_later_hunts(tmp_path):
    kaseya_rule = "732033dd-039b-426e-844f-1de2a67362fa"
    config = tmp_path / "c.toml"
    config.write_text(f'[[exclusions]]\nid = "k"\nrules = ["{kaseya_rule}"]\nexpression = \'signer has "Kaseya"\'\n')
    state = tmp_path / "s"
    scan = rmmhunt("scan", str(FIXTURES / "files" / "kaseya_pulseway.exe"), "--config", str(config), state=state)
    assert scan.returncode == 1  # the Pulseway rule still fires
    hunt = json.loads(rmmhunt("hunt", "--format", "json", state=state).stdout)["results"]  # no config this time
    assert {r["Tool"] for r in hunt} == {"Pulseway"}
    rows = json.loads(rmmhunt("rows", "--excluded", "--format", "json", state=state).stdout)["results"]
    assert rows == []  # excluded for one rule only: the row itself is not flagged
    everything = json.loads(rmmhunt("hunt", "--include-excluded", "--format", "json", state=state).stdout)["results"]
    assert {r["Tool"] for r in everything} == {"Kaseya", "Pulseway"}

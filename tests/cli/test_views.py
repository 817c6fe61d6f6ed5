"""Issue 7 end to end through the CLI: what the scan reports, how people and machines read it,
exit codes and --out. Real fixtures, real SQLite, real rules, real subprocesses."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess

from tests.cli.test_scan_cli import DWSERVICE, PULSEWAY, rmmhunt
from tests.conftest import FIXTURES, ROOT, TEST_ROOT_CA

FILES = FIXTURES / "files"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _tree(tmp_path, *names: str):
    tree = tmp_path / "tree"
    tree.mkdir(exist_ok=True)
    for name in names:
        shutil.copy(FILES / name, tree / name)
    return tree


# --- finding 1: scan answers for the disk as it is now


def test_a_removed_tool_is_not_reported_by_the_next_scan(tmp_path):
    tree = _tree(tmp_path, "pulseway.exe", "benign.exe")
    state = tmp_path / "s"
    first = rmmhunt("scan", str(tree), "--format", "json", state=state)
    assert first.returncode == 1 and json.loads(first.stdout)["summary"]["findings"] == 1
    (tree / "pulseway.exe").unlink()
    second = rmmhunt("scan", str(tree), "--format", "json", state=state)
    payload = json.loads(second.stdout)
    assert second.returncode == 0, second.stdout
    assert payload["results"] == [] and payload["summary"]["findings"] == 0
    # the history keeps it: hunt still shows the row inside the rule's window
    hunt = rmmhunt("hunt", "--format", "json", state=state)
    assert hunt.returncode == 1 and {r["RuleId"] for r in json.loads(hunt.stdout)["results"]} == {PULSEWAY}


def test_a_file_replaced_by_other_content_is_not_a_current_finding(tmp_path):
    tree = _tree(tmp_path, "dwservice.exe")
    state = tmp_path / "s"
    assert rmmhunt("scan", str(tree), state=state).returncode == 1
    shutil.copy(FILES / "benign.exe", tree / "dwservice.exe")  # same path, other content
    again = rmmhunt("scan", str(tree), "--format", "json", state=state)
    assert again.returncode == 0 and json.loads(again.stdout)["results"] == []


def test_help_says_scan_is_the_disk_and_hunt_is_the_history(tmp_path):
    scan_help = rmmhunt("scan", "--help", state=tmp_path).stdout
    hunt_help = rmmhunt("hunt", "--help", state=tmp_path).stdout
    assert "disk as it is now" in scan_help and "history" in scan_help
    assert "history" in hunt_help and "time window" in hunt_help


# --- finding 2: the default view answers "what is it, where is it, is it genuine?"


def _trusting_config(tmp_path):
    config = tmp_path / "trust.toml"
    config.write_text(f'[agent]\ntrusted_roots = ["{TEST_ROOT_CA}"]\n', encoding="utf-8")
    return config


def test_default_table_shows_tool_technique_signer_verdict_time_and_full_path(tmp_path):
    tree = _tree(tmp_path, "pulseway.exe", "flipped_byte.exe", "timestamped.exe")
    out = rmmhunt("scan", str(tree), state=tmp_path / "s")
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    header = lines[0].split()
    assert header[:6] == ["Tool", "ATT&CK", "Signer", "Trust", "Signed", "Rules"] and header[-1] == "Path"
    by_file = {line.split()[-1]: line for line in lines if line.startswith(("Pulseway", "DWService"))}
    pulse = by_file[str(tree / "pulseway.exe")]
    assert "T1219" in pulse and "MMSoft Design Ltd." in pulse and "untrusted chain" in pulse
    assert "signature broken" in by_file[str(tree / "flipped_byte.exe")]
    assert "2025-01-15" in by_file[str(tree / "timestamped.exe")]  # the countersignature time
    # no 40-hex DeviceId, no microsecond timestamps in the people view
    assert not re.search(r"\b[0-9a-f]{40}\b", out.stdout) and not re.search(r"\d\d:\d\d:\d\d\.\d{6}", out.stdout)
    trusted = rmmhunt("scan", str(tree), "--config", str(_trusting_config(tmp_path)), state=tmp_path / "t")
    assert "trusted" in trusted.stdout and "untrusted chain" not in trusted.stdout
    unverified = rmmhunt("scan", str(tree / "pulseway.exe"), "--no-verify", state=tmp_path / "u")
    assert "not verified" in unverified.stdout


def test_one_line_per_tool_and_file_with_every_rule_that_fired(tmp_path):
    rules = tmp_path / "rules"
    rules.mkdir()
    ref = ROOT.parent / "shared" / "reference" / "sentinel_rules" / "azure-sentinel"
    shutil.copy(ref / "rmm_Pulseway_filesig.yaml", rules)
    (rules / "pulseway_supplementary.yaml").write_text(
        "id: 0d6f0ad1-0000-4000-8000-000000000001\n"
        "name: rmmhunt supplementary - Pulseway - File Signature\n"
        "description: a second rule for the same tool\n"
        "tactics: [CommandAndControl]\n"
        "relevantTechniques: [T1219]\n"
        "query: |\n"
        "  DeviceFileCertificateInfo\n"
        "  | where Signer has 'MMSoft'\n"
        "  | summarize FirstSeen=min(Timestamp), LastSeen=max(Timestamp), Report=make_set(ReportId), Count=count()"
        " by DeviceId, DeviceName\n"
        "rmmhunt:\n  source: rmmhunt\n  tool: Pulseway\n",
        encoding="utf-8",
    )
    tree = _tree(tmp_path, "pulseway.exe")
    out = rmmhunt("scan", str(tree), "--rules", str(rules), state=tmp_path / "s")
    assert out.returncode == 1, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("Pulseway")]
    assert len(lines) == 1 and lines[0].split()[-2] == "1,2"  # both rules on the one line
    assert PULSEWAY in out.stdout and "0d6f0ad1-0000-4000-8000-000000000001" in out.stdout
    summary = rmmhunt("hunt", "--view", "summary", "--rules", str(rules), state=tmp_path / "s")
    header = summary.stdout.splitlines()[0].split()
    assert header == [
        "RuleId",
        "RuleName",
        "Tool",
        "DeviceId",
        "DeviceName",
        "FirstSeen",
        "LastSeen",
        "Report",
        "Count",
    ]


def test_rows_tables_never_truncate_a_hash(tmp_path):
    state = tmp_path / "s"
    rmmhunt("scan", str(FILES / "dwservice.exe"), state=state)
    sha256 = json.loads(rmmhunt("rows", "--format", "json", state=state).stdout)["results"][0]["SHA256"]
    assert len(sha256) == 64
    for args in (("rows",), ("hunt", "--rows")):
        table = rmmhunt(*args, state=state, extra_env={"COLUMNS": "80"}).stdout
        assert sha256 in re.sub(r"\s+", "", table)  # folded onto lines if need be, never cut
        assert "…" not in table.split(sha256[:8])[1][:80]


def test_the_summary_on_stderr_counts_tools_verdicts_statuses_and_names_unread_files(tmp_path):
    tree = _tree(tmp_path, "pulseway.exe", "flipped_byte.exe", "truncated_certtable.exe", "benign.exe")
    out = rmmhunt("scan", str(tree), state=tmp_path / "s")
    err = out.stderr
    assert "found 2 file(s) with an RMM signer: Pulseway 2" in err
    assert "signature broken 1" in err and "untrusted chain 1" in err
    assert "PARSE_ERROR 1" in err and "OK 3" in err
    assert "truncated_certtable.exe" in err and "MalformedPE" in err
    assert "truncated_certtable" not in out.stdout  # stdout is the report only


# --- finding 3: terminal handling


def test_the_table_fits_80_columns_and_shortens_paths_in_the_middle(tmp_path):
    deep = tmp_path / ("a-very-long-directory-name-" * 3) / "and-another-level" / "x"
    deep.mkdir(parents=True)
    shutil.copy(FILES / "pulseway.exe", deep / "pulseway-agent-installer.exe")
    shutil.copy(FILES / "dwservice.exe", deep / "dwservice.exe")
    out = rmmhunt("scan", str(tmp_path), state=tmp_path / "s")
    wide_lines = out.stdout.splitlines()
    assert any(len(line) > 80 for line in wide_lines)  # not a terminal: whole lines
    narrow = rmmhunt("scan", str(tmp_path), state=tmp_path / "s", extra_env={"COLUMNS": "80"})
    lines = narrow.stdout.splitlines()
    assert lines and all(len(line.rstrip()) <= 80 for line in lines), "\n".join(lines)
    shortened = [line.rstrip() for line in lines if "…" in line and line.rstrip().endswith("installer.exe")]
    assert shortened, "\n".join(lines)  # cut in the middle: the end is kept
    assert str(tmp_path)[:8] in shortened[0]  # and so is the start


def test_no_colour_or_control_sequences_when_not_a_terminal(tmp_path):
    out = rmmhunt("scan", str(FILES / "pulseway.exe"), state=tmp_path / "s")
    assert not ANSI.search(out.stdout) and not ANSI.search(out.stderr) and "\r" not in out.stderr


def test_quiet_and_log_file(tmp_path):
    log = tmp_path / "scan.log"
    tree = _tree(tmp_path, "pulseway.exe", "truncated_certtable.exe")
    out = rmmhunt("scan", str(tree), "--quiet", "--log-file", str(log), state=tmp_path / "s")
    assert out.returncode == 1 and out.stderr == "" and "Pulseway" in out.stdout
    text = log.read_text(encoding="utf-8")
    assert "PARSE_ERROR" in text and "truncated_certtable.exe" in text


# --- finding 4: exit codes and output files


def test_out_is_checked_before_the_scan_and_its_extension_picks_the_format(tmp_path):
    state = tmp_path / "s"
    missing_dir = rmmhunt("scan", str(FILES), "--out", str(tmp_path / "nope" / "r.json"), state=state)
    assert missing_dir.returncode == 2 and missing_dir.stdout == ""
    assert missing_dir.stderr.startswith("rmmhunt: error: --out ") and len(missing_dir.stderr.splitlines()) == 1
    assert not state.exists()  # refused before any work: no store was even opened
    is_dir = rmmhunt("scan", str(FILES), "--out", str(tmp_path), state=state)
    assert is_dir.returncode == 2 and "is a directory" in is_dir.stderr and "Traceback" not in is_dir.stderr
    for name, check in (
        ("r.json", lambda t: set(json.loads(t)) == {"summary", "results", "errors"}),
        ("r.jsonl", lambda t: all(json.loads(line)["RuleId"] for line in t.splitlines())),
        ("r.csv", lambda t: t.startswith("RuleId,RuleName,Tool,")),
        ("r.txt", lambda t: t.startswith("Tool")),
    ):
        target = tmp_path / name
        out = rmmhunt("scan", str(FILES / "dwservice.exe"), "--out", str(target), state=state)
        assert out.returncode == 1 and out.stdout == ""
        assert check(target.read_text(encoding="utf-8")), name
    forced = tmp_path / "forced.json"
    rmmhunt("hunt", "--out", str(forced), "--format", "csv", state=state)
    assert forced.read_text(encoding="utf-8").startswith("RuleId,")


def test_internal_failures_exit_2_with_one_line_and_a_traceback_only_with_v(tmp_path):
    not_a_dir = tmp_path / "state-is-a-file"
    not_a_dir.write_text("x")
    for args in (("scan", str(FILES / "pulseway.exe")), ("hunt",), ("rows",)):
        out = rmmhunt(*args, state=not_a_dir)
        assert out.returncode == 2, (args, out.stderr)
        assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith("rmmhunt: error: ")
        assert "state-is-a-file" in out.stderr and "Traceback" not in out.stderr
    verbose = rmmhunt("rows", "-v", state=not_a_dir)
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr


def test_explain_on_a_missing_file_exits_2(tmp_path):
    out = rmmhunt("explain", str(tmp_path / "missing.exe"), state=tmp_path / "s")
    assert out.returncode == 2 and out.stderr.startswith("rmmhunt: error: ") and "missing.exe" in out.stderr
    folder = rmmhunt("explain", str(tmp_path), state=tmp_path / "s")
    assert folder.returncode == 2 and "directory" in folder.stderr


def _small_cap_config(tmp_path):
    config = tmp_path / "cap.toml"
    config.write_text("[agent]\nmax_file_size = 3000\n", encoding="utf-8")  # every fixture PE is larger
    return config


def test_an_incomplete_scan_says_so_and_strict_makes_it_an_error(tmp_path):
    tree = _tree(tmp_path, "benign.exe", "text.exe")
    config = _small_cap_config(tmp_path)
    out = rmmhunt("scan", str(tree), "--config", str(config), "--format", "json", state=tmp_path / "s")
    payload = json.loads(out.stdout)
    assert out.returncode == 0  # clean, but
    assert payload["summary"]["incomplete"] is True
    assert any("TOO_LARGE" in reason for reason in payload["summary"]["incomplete_reasons"])
    assert "INCOMPLETE" in out.stderr and "benign.exe" in out.stderr  # named without -v
    strict = rmmhunt("scan", str(tree), "--config", str(config), "--strict", state=tmp_path / "s")
    assert strict.returncode == 2 and "incomplete" in strict.stderr.splitlines()[-1]
    complete = rmmhunt("scan", str(tree), "--strict", "--format", "json", state=tmp_path / "t")
    assert complete.returncode == 0 and json.loads(complete.stdout)["summary"]["incomplete"] is False
    # findings still exit 1 when the scan is incomplete, also with --strict
    shutil.copy(FILES / "pulseway.exe", tree / "p.exe")
    (tree / "big.exe").write_bytes((FILES / "pulseway.exe").read_bytes() + b"\0" * 4000)
    found = rmmhunt("scan", str(tree), "--config", str(_cap(tmp_path, 4500)), "--strict", state=tmp_path / "u")
    assert found.returncode == 1 and "INCOMPLETE" in found.stderr


def _cap(tmp_path, size: int):
    config = tmp_path / f"cap{size}.toml"
    config.write_text(f"[agent]\nmax_file_size = {size}\n", encoding="utf-8")
    return config


def test_make_scan_keeps_stdout_clean_and_returns_the_scans_verdict(tmp_path):
    stamp = tmp_path / "installed"  # newer than pyproject.toml: the install step has nothing to do
    stamp.touch()

    def make(*scan_args: str) -> subprocess.CompletedProcess:
        args = " ".join([*scan_args, "--state-dir", str(tmp_path / "s"), "--format", "json"])
        return subprocess.run(
            ["make", "--no-print-directory", "scan", f"STAMP={stamp}", f"SCAN_ARGS={args}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    clean = make(str(FILES / "benign.exe"))
    assert clean.returncode == 0, clean.stderr
    assert set(json.loads(clean.stdout)) == {"summary", "results", "errors"}  # no recipe echo on stdout
    found = make(str(FILES / "pulseway.exe"))
    assert found.returncode != 0 and json.loads(found.stdout)["results"]
    assert "exit 1 (findings)" in found.stderr
    failed = make(str(tmp_path / "missing"))
    assert failed.returncode != 0 and failed.stdout == "" and "exit 2 (error)" in failed.stderr
    # a failing install is shown, on stderr; a working one is not (the runs above printed none of it)
    broken = subprocess.run(
        ["make", "--no-print-directory", "scan", f"VENV={tmp_path / 'venv'}", "PYTHON=false"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert broken.returncode != 0 and broken.stdout == ""
    assert "install failed" in broken.stderr and "false -m venv" in broken.stderr
    assert "pip" not in clean.stderr and "installed:" not in clean.stderr


# --- finding 5: one shape for machine output


def test_every_listing_command_gives_one_json_object(tmp_path):
    state = tmp_path / "s"
    scan = rmmhunt("scan", str(FILES), "--format", "json", state=state)
    for args in (("hunt",), ("rows",), ("rules", "list")):
        out = rmmhunt(*args, "--format", "json", state=state)
        payload = json.loads(out.stdout)
        assert set(payload) == {"summary", "results", "errors"}, args
        assert isinstance(payload["results"], list) and payload["results"], args
    payload = json.loads(scan.stdout)
    assert set(payload) == {"summary", "results", "errors"}


def test_keys_are_pascal_case_and_identical_on_every_record(tmp_path):
    state = tmp_path / "s"
    payload = json.loads(rmmhunt("scan", str(FILES), "--format", "json", "--rows", state=state).stdout)
    results = payload["results"]
    assert len({tuple(r) for r in results}) == 1
    assert "rmmFileSigName" not in results[0]
    rows = [row for r in results for row in r["Rows"]]
    assert len({tuple(r) for r in rows}) == 1
    for record in results + rows + payload["errors"]:
        assert all(key[0].isupper() for key in record), record.keys()
    for fmt in ("jsonl", "csv"):
        text = rmmhunt("hunt", "--rows", "--format", fmt, state=state).stdout
        records = (
            [json.loads(line) for line in text.splitlines()]
            if fmt == "jsonl"
            else list(csv.DictReader(io.StringIO(text)))
        )
        assert records and all(r["RuleId"] and r["Tool"] and r["FolderPath"] for r in records)
        assert len({tuple(r) for r in records}) == 1


def test_json_types_urls_booleans_and_not_checked(tmp_path):
    state = tmp_path / "s"
    rmmhunt("scan", str(FILES / "pulseway.exe"), state=state)
    (row,) = json.loads(rmmhunt("rows", "--format", "json", state=state).stdout)["results"]
    assert row["CrlDistributionPointUrls"] == ["http://crl.rmmhunt.invalid/code-signing-ca.crl"]
    assert row["IsTrusted"] is False and row["DigestValid"] is True and row["IsSigned"] is True
    csv_row = next(csv.DictReader(io.StringIO(rmmhunt("rows", "--format", "csv", state=state).stdout)))
    assert json.loads(csv_row["CrlDistributionPointUrls"]) == row["CrlDistributionPointUrls"]
    rmmhunt("scan", str(FILES / "dwservice.exe"), "--no-verify", state=tmp_path / "nv")
    (unchecked,) = json.loads(rmmhunt("rows", "--format", "json", state=tmp_path / "nv").stdout)["results"]
    assert unchecked["IsTrusted"] is None and unchecked["DigestValid"] is None
    assert unchecked["VerificationStatus"] == "NOT_VERIFIED"


def test_summary_findings_agree_with_results_and_rescans_keep_error_details(tmp_path):
    state = tmp_path / "s"
    rmmhunt("scan", str(FILES), state=state)
    again = json.loads(rmmhunt("scan", str(FILES), "--format", "json", state=state).stdout)
    assert again["summary"]["unchanged"] == again["summary"]["files"]
    assert again["summary"]["results"] == len(again["results"]) > 0
    files_found = {
        (row["FolderPath"], r["Tool"])
        for r in json.loads(rmmhunt("scan", str(FILES), "--format", "json", "--rows", state=state).stdout)["results"]
        for row in r["Rows"]
    }
    assert again["summary"]["findings"] == len(files_found)
    details = {os.path.basename(e["Path"]): e["Detail"] for e in again["errors"]}
    assert "certificate table" in details["truncated_certtable.exe"]
    assert all(details.values())


# --- finding 6: explain fits on a screen


def test_explain_is_short_shows_the_chain_evidence_as_text_and_warns(tmp_path):
    out = rmmhunt("explain", str(FILES / "pulseway.exe"), state=tmp_path / "s")
    assert out.returncode == 1
    text = out.stdout
    assert len(text.splitlines()) <= 40, text
    assert "datetime.datetime" not in text and "{'" not in text
    assert "chain" in text and "rmmhunt Test Code Signing CA" in text and "rmmhunt Test Root CA" in text
    assert "untrusted chain" in text and "cannot be taken at face value" in text
    assert re.search(r"rules: 1 of \d+ fire; \d+ do not", text)
    assert 'Signer has "MMSoft Design" (value "MMSoft Design Ltd.")' in text
    every = rmmhunt("explain", str(FILES / "pulseway.exe"), "--all", state=tmp_path / "s")
    assert DWSERVICE in every.stdout and len(every.stdout.splitlines()) > 100
    trusted = rmmhunt(
        "explain", str(FILES / "pulseway.exe"), "--config", str(_trusting_config(tmp_path)), state=tmp_path / "s"
    )
    assert "Trust     trusted" in trusted.stdout and "face value" not in trusted.stdout
    assert "root: trusted root rmmhunt Test Root CA" in trusted.stdout


def _on_a_terminal(args: list[str], state, env_extra: dict[str, str], columns: int = 100) -> str:
    """Run rmmhunt with stdout and stderr on a real pseudo-terminal; return what it drew."""
    import fcntl
    import pty
    import struct
    import sys
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR", "TERM")}
    env.update({"TERM": "xterm-256color", **env_extra})
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", *args, "--state-dir", str(state)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        env=env,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=120)
    os.close(master)
    return b"".join(chunks).decode("utf-8", "replace")


def test_colour_on_a_terminal_and_no_colour_with_no_color(tmp_path):
    args = ["scan", str(FILES / "flipped_byte.exe")]
    coloured = _on_a_terminal(args, tmp_path / "s", {})
    plain = _on_a_terminal(args, tmp_path / "s", {"NO_COLOR": "1"})
    assert "signature broken" in coloured and "signature broken" in plain
    assert _colours(coloured) and not _colours(plain)  # bold may stay: NO_COLOR is about colour


def _colours(text: str) -> set[str]:
    """The colour parameters (30-49, 90-107, 38;5;n...) of the SGR sequences in ``text``."""
    found = set()
    for params in re.findall(r"\x1b\[([0-9;]*)m", text):
        for p in params.split(";"):
            if p.isdigit() and (30 <= int(p) <= 49 or 90 <= int(p) <= 107):
                found.add(p)
    return found

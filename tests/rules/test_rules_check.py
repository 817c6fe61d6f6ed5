"""`rmmhunt rules check` and loading: warnings for exclusions that can never match a real path or name an
unknown rule id (issue 7 item 8, issue 6 item 7); errors still exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from agent.cli import main

ROOT = Path(__file__).resolve().parents[2]
PULSEWAY = "6192b741-4540-4416-8dbb-ce0405166d0a"

TRAP = """
[[exclusions]]
id = "deploy"
expression = 'file.directory startswith "D:\\SoftwareDeployment" && is_trusted'

[[exclusions]]
id = "tools"
expression = 'file.directory == "C:\\Tools"'

[[exclusions]]
id = "typo-rule"
rules = ["6192b741-4540-4416-8dbb-ce0405166d0b", "PULSEWAY"]
expression = 'signer has "x"'
""".replace("PULSEWAY", PULSEWAY)


def check(capsys, tmp_path: Path, *paths: str) -> tuple[int, str, str]:
    code = main(["rules", "check", *paths, "--state-dir", str(tmp_path / "state")])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_rules_check_warns_about_never_matching_exclusions_and_unknown_rule_ids(capsys, tmp_path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(TRAP, encoding="utf-8")
    code, out, err = check(capsys, tmp_path, str(config))
    assert code == 0, out + err  # warnings only
    lines = out.splitlines()
    assert len(lines) == 3, out
    assert lines[0].startswith(f"{config}:4:27: warning: exclusion 'deploy': ") and "sibling folders" in lines[0]
    assert lines[1].startswith(f"{config}:8:19: warning: exclusion 'tools': ") and "separator" in lines[1]
    assert lines[2] == (
        f"{config}:12:0: warning: exclusion 'typo-rule': no loaded rule has the id "
        "'6192b741-4540-4416-8dbb-ce0405166d0b', so this exclusion never applies to it"
    )
    assert "ok, 3 warning(s)" in err


def test_rules_check_checks_rule_ids_against_the_rule_dirs_given(capsys, tmp_path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "one.yaml").write_text(
        "id: only-rule\nname: x\nquery: DeviceFileCertificateInfo | where Signer has 'x'\n", encoding="utf-8"
    )
    config = tmp_path / "agent.toml"
    config.write_text(f"[[exclusions]]\nid = 'p'\nrules = ['{PULSEWAY}']\nexpression = 'signer has \"x\"'\n")
    code, out, _ = check(capsys, tmp_path, str(rules), str(config))
    assert code == 0 and f"no loaded rule has the id '{PULSEWAY}'" in out
    code, out, _ = check(capsys, tmp_path, str(config))  # the shipped catalog has the Pulseway rule
    assert code == 0 and out == ""


def test_errors_still_fail_and_are_listed_before_warnings(capsys, tmp_path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(TRAP + "\n[[exclusions]]\nid = 'bad'\nexpression = 'file.nam == \"x\"'\n", encoding="utf-8")
    code, out, err = check(capsys, tmp_path, str(config))
    assert code == 2
    assert "unknown field 'file.nam'" in out.splitlines()[0] and len(out.splitlines()) == 4
    assert "1 problem(s), 3 warning(s)" in err


def test_rules_check_on_hostile_toml_is_one_clean_error(capsys, tmp_path) -> None:
    deep = tmp_path / "deep.toml"
    deep.write_text("a = " + "[" * 5000 + "]" * 5000 + "\n", encoding="utf-8")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe[[exclusions]]\n")
    code, out, _ = check(capsys, tmp_path, str(deep), str(binary))
    assert code == 2
    lines = out.splitlines()
    assert [line for line in lines if line.startswith(f"{deep}:")] == [
        f"{deep}:1: invalid TOML: arrays or tables nested too deeply"
    ]
    assert len([line for line in lines if line.startswith(f"{binary}:")]) == 1, out  # one line, whatever reports it


def test_unknown_rule_id_and_never_matching_exclusion_are_warned_about_at_load(tmp_path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(TRAP, encoding="utf-8")
    empty = tmp_path / "empty"
    empty.mkdir()
    cmd = [sys.executable, "-m", "agent.cli", "scan", str(empty), "--config", str(config)]
    out = subprocess.run(cmd + ["--state-dir", str(tmp_path / "s")], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    warnings = [line for line in out.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 3, out.stderr
    assert warnings[2].startswith(f"rmmhunt: {config}:12:0: warning: exclusion 'typo-rule': no loaded rule")


def test_rules_check_warns_about_a_rule_narrowed_only_by_an_attacker_controlled_column(tmp_path, capsys):
    rule = tmp_path / "renamable.yaml"
    rule.write_text(
        "id: 11111111-2222-3333-4444-555555555555\n"
        "name: Renamable\n"
        "description: a broad signer narrowed by the file name only\n"
        "tactics: [CommandAndControl]\n"
        "relevantTechniques: [T1219]\n"
        "query: |\n"
        "  DeviceFileCertificateInfo\n"
        "  | where Signer has 'Broad Vendor Inc' and FileName =~ 'agent.exe'\n",
        encoding="utf-8",
    )
    from agent.cli import main

    assert main(["rules", "check", str(tmp_path)]) == 0  # a warning, not an error
    out = capsys.readouterr()
    text = out.out + out.err
    assert f"{rule}:1:1: warning: rule 11111111-2222-3333-4444-555555555555" in text

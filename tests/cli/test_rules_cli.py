"""`rmmhunt rules list|check` through the console entry point."""

from __future__ import annotations

import json
import re
import shutil

from tests.cli.test_scan_cli import DWSERVICE, PULSEWAY, rmmhunt
from tests.conftest import REFERENCE, ROOT


def test_rules_list_shows_the_catalog(tmp_path):
    out = rmmhunt("rules", "list", "--format", "json", state=tmp_path)
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    assert set(payload) == {"summary", "results", "errors"}
    rules = payload["results"]
    assert len(rules) >= 61 and payload["summary"]["rules"] == len(rules)
    by_id = {r["RuleId"]: r for r in rules}
    assert {PULSEWAY, DWSERVICE} <= set(by_id)
    assert by_id[PULSEWAY]["Tool"] == "Pulseway" and by_id[PULSEWAY]["Source"] == "published"
    assert by_id[PULSEWAY]["Patterns"] == ["Signer has MMSoft Design"]
    assert by_id[PULSEWAY]["Techniques"] == ["T1219"]
    assert {r["Source"] for r in rules} == {"published", "rmmhunt"}
    assert len({tuple(r) for r in rules}) == 1  # the same PascalCase keys on every record
    table = rmmhunt("rules", "list", state=tmp_path)
    assert PULSEWAY in table.stdout and "Source" in table.stdout.splitlines()[0]


def test_rules_check_reports_file_line_col_and_fails(tmp_path):
    bad = REFERENCE / "sentinel_rules" / "jischell-msft" / "rmm_AnyDesk_filesig.yaml"
    out = rmmhunt("rules", "check", str(bad), state=tmp_path)
    assert out.returncode == 2
    assert re.search(r"rmm_AnyDesk_filesig\.yaml:\d+:\d+: invalid YAML", out.stdout), out.stdout
    rules = tmp_path / "rules"
    rules.mkdir()
    shutil.copy(ROOT / "config" / "rules" / "rmm_Pulseway_filesig.yaml", rules / "a.yaml")
    shutil.copy(ROOT / "config" / "rules" / "rmm_Pulseway_filesig.yaml", rules / "b.yaml")
    (rules / "c.yaml").write_text("id: x\nname: y\nquery: |\n  DeviceFileCertificateInfo\n  | sample 10\n")
    dup = rmmhunt("rules", "check", str(rules), state=tmp_path)
    assert dup.returncode == 2
    assert "b.yaml:1:" in dup.stdout and "duplicate rule id" in dup.stdout
    assert re.search(r"c\.yaml:5:\d+: .*sample", dup.stdout), dup.stdout


def test_rules_check_of_the_shipped_catalog_and_example_config_is_clean(tmp_path):
    out = rmmhunt(
        "rules", "check", str(ROOT / "config" / "rules"), str(ROOT / "config" / "agent.example.toml"), state=tmp_path
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout == ""


def test_rules_check_validates_exclusions_in_a_config(tmp_path):
    config = tmp_path / "x.toml"
    config.write_text('[[exclusions]]\nid = "a"\nexpression = \'file.nam == "x"\'\n')
    out = rmmhunt("rules", "check", str(config), state=tmp_path)
    assert out.returncode == 2 and "x.toml:3:" in out.stdout and "file.name" in out.stdout

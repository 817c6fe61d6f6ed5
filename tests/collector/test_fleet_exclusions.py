"""Exclusions forwarded by the agents, on the collector side: `collector hunt --include-excluded`
through `collector import`, and re-evaluation under a new rule set keeping them."""

from __future__ import annotations

import json
import subprocess
import sys

from agent.transport.outbox import wire_row
from collector.storage import Collector
from tests.collector.fleetdata import make_row

PULSEWAY = "6192b741-4540-4416-8dbb-ce0405166d0a"


def test_collector_hunt_command_include_excluded(tmp_path, capsys, shipped_rules, now):
    """`rmmhunt collector hunt` leaves excluded hits out unless --include-excluded (through import)."""
    rows = [
        make_row(1, 1, "MMSoft Design Ltd.", now),
        make_row(1, 2, "MMSoft Design Ltd.", now, RuleExclusions={"6192b741-4540-4416-8dbb-ce0405166d0a": "ok"}),
        make_row(1, 3, "MMSoft Design Ltd.", now, Excluded=True, ExclusionId="whole-row"),
    ]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(wire_row(r, r.get("RuleExclusions"))) + "\n" for r in rows), encoding="utf-8")
    db = f"sqlite:///{tmp_path}/c.db"
    base = [sys.executable, "-m", "collector"]
    assert subprocess.run([*base, "import", str(jsonl), "--database", db], capture_output=True).returncode == 0

    def reports(*extra: str) -> list:
        out = subprocess.run(
            [
                *base,
                "hunt",
                "--database",
                db,
                "--format",
                "json",
                "--rule",
                "6192b741-4540-4416-8dbb-ce0405166d0a",
                *extra,
            ],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 1, out.stderr
        return [r["Report"] for r in json.loads(out.stdout)["results"]]

    assert reports() == [[1]]
    assert reports("--include-excluded") == [[1, 2, 3]]


def test_reevaluation_keeps_the_forwarded_exclusions(tmp_path, shipped_rules, now):
    url = f"sqlite:///{tmp_path}/c.db"
    rows = [
        make_row(1, 1, "MMSoft Design Ltd.", now),
        make_row(1, 2, "MMSoft Design Ltd.", now, RuleExclusions={PULSEWAY: "ok"}),
        make_row(2, 1, "MMSoft Design Ltd.", now, RuleExclusions={PULSEWAY: "ok2"}),
    ]
    first = Collector(url, shipped_rules)
    first.start(background=False)
    assert first.ingest(rows).hits == 3
    first.close()
    second = Collector(url, shipped_rules[1:] + shipped_rules[:1])  # another order: hits are re-evaluated
    second.ruleset = "changed"
    try:
        second.start(background=False)
        assert second.hits_ruleset() == "changed"
        default = [r.result for r in second.hunt(now=now, rule_ids=[PULSEWAY])]
        everything = [r.result for r in second.hunt(now=now, rule_ids=[PULSEWAY], include_excluded=True)]
        assert [(r["DeviceId"], r["Report"]) for r in default] == [(rows[0]["DeviceId"], [1])]
        assert sorted((r["DeviceId"], r["Report"]) for r in everything) == sorted(
            [(rows[0]["DeviceId"], [1, 2]), (rows[2]["DeviceId"], [1])]
        )
        excluded_by = {
            (r["DeviceId"], r["ReportId"]): r["ExcludedBy"] for r in second.rule_rows(PULSEWAY, include_excluded=True)
        }
        assert excluded_by == {
            (rows[0]["DeviceId"], 1): None,
            (rows[0]["DeviceId"], 2): "ok",
            (rows[2]["DeviceId"], 1): "ok2",
        }
    finally:
        second.close()

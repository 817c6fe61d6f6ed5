"""The agent's exclusions reach the collector: a real scan of the signed fixtures with a global and a
per-rule exclusion, `rmmhunt forward` to a real collector process, and the fleet hunts equal the
agent's own `hunt` (and `hunt --include-excluded`)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from agent.cli import main as rmmhunt_main
from agent.store import Store
from tests.collector.conftest import free_port
from tests.collector.fleetdata import device_id
from tests.collector.live import LiveCollector
from tests.transport.test_forward import AUTH, forward_cmd, forward_env

ROOT = Path(__file__).resolve().parents[2]
KASEYA = "732033dd-039b-426e-844f-1de2a67362fa"  # one of the two rules kaseya_pulseway.exe hits
DWSERVICE = "642b39b7-18eb-46eb-ba1f-bf70befae05e"

CONFIG = f"""[agent]
device_id = "{device_id(1)}"
device_name = "agent-excl"

[[exclusions]]
id = "dwservice-known-good"
expression = 'file.name == "dwservice.exe"'

[[exclusions]]
id = "kaseya-only-here"
rules = ["{KASEYA}"]
expression = 'file.name == "kaseya_pulseway.exe"'
"""


def _canon(results: list[dict]) -> list[tuple]:
    return sorted((r["RuleId"], r.get("DeviceId"), tuple(r.get("Report") or ()), r.get("Count")) for r in results)


def _agent_hunt(state: Path, config: Path, capsys, *extra: str) -> list[dict]:
    rmmhunt_main(["--state-dir", str(state), "--config", str(config), "hunt", "--format", "json", *extra])
    return json.loads(capsys.readouterr().out)["results"]


def test_excluded_hits_are_forwarded_and_left_out_of_fleet_hunts(tmp_path, capsys):
    state = tmp_path / "agent"
    state.mkdir()
    config = tmp_path / "agent.toml"
    config.write_text(CONFIG, encoding="utf-8")
    with Store(state / "rmmhunt.sqlite3") as store:
        store.set_outbox_policy("hits", 0)  # queued by the scan itself, in its transaction
    fixtures = str(ROOT / "tests" / "fixtures" / "files")
    assert rmmhunt_main(["--state-dir", str(state), "--config", str(config), "scan", fixtures, "--no-progress"]) == 1
    capsys.readouterr()
    with Store(state / "rmmhunt.sqlite3") as store:
        excluded = store.excluded_hits()
        payloads = [json.loads(p) for (p,) in store.db.execute("SELECT payload FROM outbox")]
    by_name = {p["FileName"]: p for p in payloads}
    # the whole-row exclusion and the per-rule one are both queued, each with its pairs
    assert by_name["dwservice.exe"]["Excluded"] is True
    assert by_name["dwservice.exe"]["RuleExclusions"] == {DWSERVICE: "dwservice-known-good"}
    assert by_name["kaseya_pulseway.exe"]["Excluded"] is False
    assert by_name["kaseya_pulseway.exe"]["RuleExclusions"] == {KASEYA: "kaseya-only-here"}
    assert "RuleExclusions" not in by_name["pulseway.exe"]
    assert len(excluded) == 2

    agent_default = _agent_hunt(state, config, capsys)
    agent_all = _agent_hunt(state, config, capsys, "--include-excluded")
    assert _canon(agent_default) != _canon(agent_all)

    with LiveCollector(tmp_path / "collector", free_port()) as live:
        env = forward_env(live.url)
        env["RMMHUNT_COLLECTOR_FORWARD"] = "hits"
        done = subprocess.run(
            [*forward_cmd(state, config, "--once")], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        with live.client() as c:
            fleet = c.get("/api/v1/hunts", headers=AUTH).json()
            fleet_all = c.get("/api/v1/hunts", params={"include_excluded": "true"}, headers=AUTH).json()
            drill = c.get(f"/api/v1/hunts/{KASEYA}", params={"include_excluded": "true"}, headers=AUTH).json()
            drill_default = c.get(f"/api/v1/hunts/{KASEYA}", headers=AUTH).json()
    assert fleet["include_excluded"] is False and fleet_all["include_excluded"] is True
    assert _canon(fleet["results"]) == _canon(agent_default)
    assert _canon(fleet_all["results"]) == _canon(agent_all)
    # the per-rule exclusion removed one rule's hit, not the row: its other rule still counts it
    assert KASEYA not in {r["RuleId"] for r in fleet["results"]}
    kaseya_row = by_name["kaseya_pulseway.exe"]["ReportId"]
    others = [r for r in fleet["results"] if kaseya_row in (r.get("Report") or ()) and r["RuleId"] != KASEYA]
    assert others
    assert drill_default["results"] == []
    rows = [row for r in drill["results"] for row in r["Rows"]]
    assert [(row["ReportId"], row["ExcludedBy"]) for row in rows] == [(kaseya_row, "kaseya-only-here")]

"""Migrations, re-evaluation when the rule set changes, and the collector's command line."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import time

import sqlalchemy as sa

from agent.cli import main as rmmhunt_main
from agent.hunt import run_hunt
from agent.resources import shipped_rules_dir
from agent.rules.loader import load_rules
from agent.transport.outbox import wire_row
from collector import storage
from collector.storage import Collector, SchemaError, migrate
from tests.collector.fleetdata import fleet_rows, make_row


def _canon(results):
    return sorted((r.rule.id, repr(sorted(r.result.items()))) for r in results)


def test_migrations_are_versioned_and_a_new_column_is_a_new_migration(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path}/a.db"
    latest = migrate(storage.make_engine(url))
    assert latest == max(v for v, _step in storage.migrations())
    with storage.make_engine(url).connect() as conn:
        names = set(sa.inspect(conn).get_table_names())
        assert {"row_exclusions", "excluded_hits"} <= names  # migration 2: the forwarded exclusions
        assert "cert_rows_hit_rows" in {i["name"] for i in sa.inspect(conn).get_indexes("cert_rows")}  # 3
    # a later column (here: pretend ExclusionId came later) is an ALTER TABLE in the next migration
    monkeypatch.setattr(storage, "ADDED_ROW_COLUMNS", {latest + 1: ("ExclusionId",)})
    assert migrate(storage.make_engine(url)) == latest + 1  # an existing database: the column is already there
    fresh = storage.make_engine(f"sqlite:///{tmp_path}/b.db")
    assert migrate(fresh) == latest + 1
    with fresh.connect() as conn:
        assert sorted(conn.execute(sa.text("SELECT version FROM schema_version")).scalars()) == list(
            range(1, latest + 2)
        )
    # two migrations under one version refuse to start
    monkeypatch.setattr(storage, "ADDED_ROW_COLUMNS", {2: ("ExclusionId",)})
    try:
        migrate(storage.make_engine(f"sqlite:///{tmp_path}/d.db"))
    except SchemaError as exc:
        assert "used twice" in str(exc)
    else:
        raise AssertionError("a migration version used twice must refuse to start")
    # a schema column without a migration refuses to start
    monkeypatch.setattr(storage, "migrations", lambda: [(1, storage._migration_1)])
    broken = storage.make_engine(f"sqlite:///{tmp_path}/c.db")
    try:
        migrate(broken)
    except SchemaError as exc:
        assert "ExclusionId" in str(exc)
    else:
        raise AssertionError("a missing migration must refuse to start")


def test_rule_set_change_reevaluates_stored_rows_in_the_background(tmp_path, shipped_rules, now):
    rules_dir = tmp_path / "rules"
    shutil.copytree(shipped_rules_dir(), rules_dir)
    pulseway = [p for p in rules_dir.iterdir() if "Pulseway" in p.name]
    kept = {p.name: p.read_bytes() for p in pulseway}
    for p in pulseway:
        p.unlink()
    old_rules = list(load_rules([rules_dir]).rules)
    url = f"sqlite:///{tmp_path}/c.db"
    rows = fleet_rows(shipped_rules, now, devices=3, per_device=100)
    first = Collector(url, old_rules)
    first.start(background=False)
    first.ingest(rows)
    old_version = first.ruleset
    assert "Pulseway" not in {r.rule.tool for r in first.hunt(now=now)}
    first.close()
    for name, data in kept.items():
        (rules_dir / name).write_bytes(data)
    new_rules = list(load_rules([rules_dir]).rules)
    second = Collector(url, new_rules)
    try:
        assert second.ruleset != old_version and second.hits_ruleset() == old_version
        second.start(background=True)
        deadline = time.monotonic() + 60
        while second.reevaluating and time.monotonic() < deadline:
            time.sleep(0.05)
        assert second.hits_ruleset() == second.ruleset
        assert _canon(second.hunt(now=now)) == _canon(run_hunt([dict(r) for r in rows], new_rules, now=now))
        assert "Pulseway" in {r.rule.tool for r in second.hunt(now=now)}
    finally:
        second.close()


def test_collector_import_and_hunt_commands(tmp_path, capsys, shipped_rules, now):
    rows = [make_row(1, i, "MMSoft Design Ltd.", now - dt.timedelta(hours=i)) for i in range(1, 4)]
    rows.append(make_row(1, 4, "Microsoft Corporation", now))
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(wire_row(r)) + "\n" for r in rows), encoding="utf-8")
    state = ["--state-dir", str(tmp_path / "c")]
    assert rmmhunt_main([*state, "collector", "import", str(jsonl)]) == 0
    assert "imported 4 rows (0 already stored, 0 rejected)" in capsys.readouterr().err
    assert rmmhunt_main([*state, "collector", "import", str(jsonl)]) == 0  # idempotent
    assert "imported 0 rows (4 already stored" in capsys.readouterr().err
    assert rmmhunt_main([*state, "collector", "hunt", "--format", "json"]) == 1
    results = json.loads(capsys.readouterr().out)["results"]
    assert [(r["Tool"], r["Count"], r["Report"]) for r in results] == [("Pulseway", 3, [1, 2, 3])]
    assert rmmhunt_main([*state, "collector", "hunt", "--rows"]) == 1
    assert "MMSoft Design Ltd." in capsys.readouterr().out
    assert rmmhunt_main([*state, "collector", "devices", "list"]) == 0  # the default format is the table
    assert capsys.readouterr().out == "(none)\n"  # imported rows enrol no device
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(wire_row(rows[0])) + "\n{oops\n", encoding="utf-8")
    assert rmmhunt_main([*state, "collector", "import", str(bad)]) == 2
    assert f"{bad}:2:" in capsys.readouterr().err


def test_collector_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RMMHUNT_ENROLL_SECRET", raising=False)
    monkeypatch.delenv("RMMHUNT_API_TOKEN", raising=False)
    state = ["--state-dir", str(tmp_path)]
    assert rmmhunt_main([*state, "collector", "serve", "--listen", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rmmhunt: error: enroll_secret: set RMMHUNT_ENROLL_SECRET") and err.count("\n") == 1
    assert rmmhunt_main([*state, "collector", "hunt", "--database", "mysql://x"]) == 2
    assert "rmmhunt: error: --database" in capsys.readouterr().err
    monkeypatch.delenv("RMMHUNT_COLLECTOR_URL", raising=False)
    assert rmmhunt_main([*state, "forward", "--once"]) == 2
    assert "rmmhunt: error: collector url: not set" in capsys.readouterr().err
    monkeypatch.setenv("RMMHUNT_COLLECTOR_URL", "http://collector.example.org")
    assert rmmhunt_main([*state, "forward", "--once"]) == 2
    assert "collector_url: plain http is allowed only to localhost" in capsys.readouterr().err


def test_collector_imports_a_sweep_bundle_once_and_refuses_a_tampered_one(tmp_path, capsys):
    import zipfile

    from tests.conftest import FIXTURES

    bundle = tmp_path / "ir.zip"
    code = rmmhunt_main(
        [
            "--state-dir",
            str(tmp_path / "sweeper"),
            "sweep",
            str(FIXTURES / "files"),
            "--out",
            str(bundle),
            "--device-name",
            "ir-host-01",
        ]
    )
    assert code == 1 and bundle.is_file()
    capsys.readouterr()
    state = ["--state-dir", str(tmp_path / "c")]
    assert rmmhunt_main([*state, "collector", "import", str(bundle)]) == 0
    first = capsys.readouterr().err
    assert "imported" in first and " 0 rows" not in first
    assert rmmhunt_main([*state, "collector", "import", str(bundle)]) == 0  # idempotent
    assert "imported 0 rows" in capsys.readouterr().err
    assert rmmhunt_main([*state, "collector", "hunt", "--format", "json"]) == 1
    results = json.loads(capsys.readouterr().out)["results"]
    assert {"Pulseway", "DWService"} <= {r["Tool"] for r in results if r["DeviceName"] == "ir-host-01"}
    # one byte changed in a member: the whole bundle is refused, nothing is read from it
    tampered = tmp_path / "tampered.zip"
    with zipfile.ZipFile(bundle) as src, zipfile.ZipFile(tampered, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == "rows.jsonl":
                data = data.replace(b"ir-host-01", b"ir-host-02", 1)
            dst.writestr(info, data)
    assert rmmhunt_main(["--state-dir", str(tmp_path / "c2"), "collector", "import", str(tampered)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rmmhunt: error:") and "refused" in err and err.count("\n") == 1


def test_an_imported_bundle_shows_its_device_in_the_live_api(tmp_path, capsys):
    """Issue 10's acceptance through HTTP: `collector import BUNDLE.zip` into the database a live
    collector serves, then GET /api/v1/hunts lists the swept device."""
    from tests.collector.conftest import free_port
    from tests.collector.live import API_TOKEN, LiveCollector
    from tests.conftest import FIXTURES

    bundle = tmp_path / "ir.zip"
    sweep = ["--state-dir", str(tmp_path / "sweeper"), "sweep", str(FIXTURES / "files"), "--out", str(bundle)]
    assert rmmhunt_main([*sweep, "--device-name", "ir-host-01"]) == 1
    database = f"sqlite:///{tmp_path / 'fleet.sqlite3'}"
    with LiveCollector(tmp_path / "collector", free_port(), database=database) as live:
        assert (
            rmmhunt_main(
                ["--state-dir", str(tmp_path / "c"), "collector", "import", str(bundle), "--database", database]
            )
            == 0
        )
        with live.client() as c:
            hunts = c.get("/api/v1/hunts", headers={"Authorization": f"Bearer {API_TOKEN}"}).json()
    capsys.readouterr()
    text = json.dumps(hunts)
    assert "ir-host-01" in text and "Pulseway" in text and "DWService" in text

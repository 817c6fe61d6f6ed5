"""The collector's API against a real collector process: enrolment, ingest limits, auth, hostile
strings, the query API and revocation."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import subprocess
import sys

import psutil
import pytest

from agent.output import plain
from collector.wire import Limits
from tests.collector.conftest import free_port
from tests.collector.fleetdata import device_id, make_row
from tests.collector.live import API_TOKEN, ENROLL_SECRET, LiveCollector, collector_env

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    base = tmp_path_factory.mktemp("collector")
    collector = LiveCollector(base / "state", free_port()).start()
    yield collector
    collector.stop()


def _enroll(client, n: int) -> str:
    r = client.post(
        "/api/v1/enroll", json={"enroll_secret": ENROLL_SECRET, "device_id": device_id(n), "device_name": f"host-{n}"}
    )
    assert r.status_code == 200, r.text
    return r.json()["node_key"]


def _batch(node_key: str, rows, batch_id: str = "b1", **extra) -> bytes:
    body = {"node_key": node_key, "batch_id": batch_id, "rows": plain(rows), **extra}
    return gzip.compress(json.dumps(body).encode())


def _post(client, data: bytes, gz: bool = True):
    headers = {"Content-Type": "application/json"}
    if gz:
        headers["Content-Encoding"] = "gzip"
    return client.post("/api/v1/rows", content=data, headers=headers)


def test_enrol_ingest_idempotent_and_hunts(live):
    now = dt.datetime.now(dt.UTC)
    with live.client() as c:
        assert c.post("/api/v1/enroll", json={"enroll_secret": "wrong", "device_id": device_id(1)}).status_code == 401
        key = _enroll(c, 1)
        rows = [make_row(1, i, "MMSoft Design Ltd.", now - dt.timedelta(hours=i)) for i in range(1, 6)]
        r = _post(c, _batch(key, rows, dropped_total=7))
        assert r.status_code == 200 and r.json()["accepted"] == 5
        r = _post(c, _batch(key, rows))  # a retry never double-counts
        assert r.json() == {"batch_id": "b1", "accepted": 0, "duplicates": 5, "hits": 0}
        # the enrol secret and node keys read nothing
        for token in (key, ENROLL_SECRET, "-", "x" * 40):
            assert c.get("/api/v1/hunts", headers={"Authorization": f"Bearer {token}"}).status_code == 401
            assert c.get("/api/v1/rows", headers={"Authorization": f"Bearer {token}"}).status_code == 401
        hunts = c.get("/api/v1/hunts", headers=AUTH).json()
        assert hunts["ruleset_version"] and hunts["reevaluating"] is False
        pulseway = [h for h in hunts["results"] if h["DeviceId"] == device_id(1) and h["Tool"] == "Pulseway"]
        assert pulseway and pulseway[0]["Count"] == 5 and pulseway[0]["Report"] == [1, 2, 3, 4, 5]
        assert set(pulseway[0]) >= {"DeviceId", "DeviceName", "FirstSeen", "LastSeen", "Report", "Count"}
        drill = c.get(f"/api/v1/hunts/{pulseway[0]['RuleId']}", headers=AUTH).json()
        mine = [x for x in drill["results"] if x["DeviceId"] == device_id(1)][0]
        assert sorted(row["ReportId"] for row in mine["Rows"]) == [1, 2, 3, 4, 5]
        devices = {d["DeviceId"]: d for d in c.get("/api/v1/devices", headers=AUTH).json()["devices"]}
        assert devices[device_id(1)]["DroppedRows"] == 7 and devices[device_id(1)]["RowsReceived"] == 5
        lines = c.get("/api/v1/rows", params={"since": (now - dt.timedelta(hours=3)).isoformat()}, headers=AUTH).text
        got = [json.loads(line) for line in lines.splitlines()]
        assert {g["ReportId"] for g in got if g["DeviceId"] == device_id(1)} == {1, 2, 3}
        assert list(got[0]) == list(json.loads(json.dumps(plain(rows[0]))))  # DeviceFileCertificateInfo columns
        assert "paths" in c.get("/openapi.json").json()


def test_refusals_are_4xx_and_memory_stays_bounded(live):
    now = dt.datetime.now(dt.UTC)
    with live.client() as c:
        key = _enroll(c, 2)
        other = make_row(3, 1, "x", now)
        assert _post(c, _batch(key, [other])).status_code == 403  # only its own device's rows
        assert _post(c, _batch("not-a-key", [make_row(2, 1, "x", now)])).status_code == 401
        assert _post(c, b"\x1f\x8b garbage").status_code == 400
        assert _post(c, b"{not json", gz=False).status_code == 400
        assert _post(c, gzip.compress(b"[1, 2]")).status_code == 422
        long_row = make_row(2, 2, "x" * (Limits().max_field_chars + 1), now)
        assert _post(c, _batch(key, [long_row])).status_code == 422
        assert _post(c, _batch(key, [{**plain(make_row(2, 3, "x", now)), "Evil": 1}])).status_code == 422
        assert (
            _post(c, _batch(key, [{**plain(make_row(2, 3, "x", now)), "ReportId": "1; DROP TABLE"}])).status_code == 422
        )
        too_many = [{"DeviceId": device_id(2)}] * (Limits().max_rows_per_batch + 1)
        assert _post(c, _batch(key, too_many)).status_code == 413
        assert _post(c, b"0" * (Limits().max_request_bytes + 10), gz=False).status_code == 413
        rss_before = psutil.Process(live.proc.pid).memory_info().rss
        bomb = gzip.compress(b"\0" * (256 * 1024 * 1024), compresslevel=9)  # 256 MiB in ~250 KiB
        assert len(bomb) < 1024 * 1024
        assert _post(c, bomb).status_code == 413
        growth = psutil.Process(live.proc.pid).memory_info().rss - rss_before
        assert growth < 128 * 1024 * 1024, growth  # the cap (64 MiB) bounds it, not the bomb's 256 MiB


def test_hostile_strings_are_stored_literally(live):
    now = dt.datetime.now(dt.UTC)
    hostile = "<script>alert(1)</script>' OR 1=1; DROP TABLE cert_rows;-- \x1b[31m\u202e\r\n\"}%00"
    with live.client() as c:
        key = _enroll(c, 4)
        row = make_row(4, 1, hostile, now, FolderPath="C:\\x\\%FF%0Aevil.exe", IssuerSubject=hostile)
        assert _post(c, _batch(key, [row])).status_code == 200
        # NUL and lone surrogates are not text: the agent escapes them; a raw one is refused, not a 5xx
        nul = {**plain(make_row(4, 2, "a\x00b", now))}
        assert _post(c, _batch(key, [nul])).status_code == 422
        raw = json.dumps({"node_key": key, "batch_id": "s", "rows": [{**plain(make_row(4, 3, "x", now))}]})
        raw = raw.replace('"Signer": "x"', '"Signer": "\\udcff"')
        assert _post(c, gzip.compress(raw.encode())).status_code == 422
        stored = c.get(f"/api/v1/devices/{device_id(4)}/rows", headers=AUTH).json()["rows"]
        assert [(s["Signer"], s["IssuerSubject"], s["FolderPath"]) for s in stored] == [
            (hostile, hostile, "C:\\x\\%FF%0Aevil.exe")
        ]


def test_revoked_device_cannot_send_and_secrets_never_in_argv(live):
    now = dt.datetime.now(dt.UTC)
    with live.client() as c:
        key = _enroll(c, 5)
        rc = subprocess.run(
            [
                sys.executable,
                "-m",
                "agent.cli",
                "--state-dir",
                str(live.state_dir),
                "collector",
                "devices",
                "revoke",
                device_id(5),
            ],
            env=collector_env(),
            capture_output=True,
            text=True,
        )
        assert rc.returncode == 0, rc.stderr
        assert _post(c, _batch(key, [make_row(5, 1, "x", now)])).status_code == 401
        assert (
            c.post("/api/v1/enroll", json={"enroll_secret": ENROLL_SECRET, "device_id": device_id(5)}).status_code
            == 403
        )
    cmdline = " ".join(psutil.Process(live.proc.pid).cmdline())
    assert ENROLL_SECRET not in cmdline and API_TOKEN not in cmdline

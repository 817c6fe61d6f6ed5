"""Forwarding with real processes: the agent's `rmmhunt forward` against a real collector.
kill -9 of the agent mid-forwarding, a collector that is down then back, a collector killed
mid-batch, TLS with a throwaway CA, and the byte-bounded outbox."""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.cli import main as rmmhunt_main
from agent.store import Store
from agent.transport.sender import ForwardError, backoff_delay, check_url
from tests.collector.conftest import free_port
from tests.collector.fleetdata import device_id, make_row
from tests.collector.live import API_TOKEN, ENROLL_SECRET, LiveCollector

ROOT = Path(__file__).resolve().parents[2]
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


def agent_dir(tmp_path: Path, n: int = 1) -> tuple[Path, Path]:
    state = tmp_path / f"agent{n}"
    state.mkdir()
    config = tmp_path / f"agent{n}.toml"
    config.write_text(f'[agent]\ndevice_id = "{device_id(n)}"\ndevice_name = "agent-{n}"\n', encoding="utf-8")
    return state, config


def fill_outbox(
    state: Path, n_rows: int, *, device: int = 1, max_bytes: int = 0, signer: str = "MMSoft Design Ltd."
) -> list[int]:
    now = dt.datetime.now(dt.UTC)
    # distinct observations (the store keeps one row per observation): one file each
    rows = [make_row(device, i, signer, now, ReportId=None) for i in range(1, n_rows + 1)]
    with Store(state / "rmmhunt.sqlite3") as store:
        store.set_outbox_policy("all", max_bytes)
        store.begin()
        store.insert_rows(rows)
        store.queue_outbox(rows, set())
        store.commit()
    return [r["ReportId"] for r in rows]


def forward_cmd(state: Path, config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "agent.cli", "--state-dir", str(state), "--config", str(config), "forward", *extra]


def forward_env(url: str, ca_file: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RMMHUNT_COLLECTOR_URL=url, RMMHUNT_ENROLL_SECRET=ENROLL_SECRET, RMMHUNT_COLLECTOR_FORWARD="all")
    env.pop("RMMHUNT_COLLECTOR_CA_FILE", None)
    if ca_file:
        env["RMMHUNT_COLLECTOR_CA_FILE"] = str(ca_file)
    return env


def outbox(state: Path) -> dict[str, int]:
    with Store(state / "rmmhunt.sqlite3") as store:
        return store.outbox_stats()


def collector_report_ids(live: LiveCollector, device: int = 1) -> list[int]:
    with live.client() as c:
        lines = c.get("/api/v1/rows", headers=AUTH).text.splitlines()
    return [json.loads(x)["ReportId"] for x in lines if json.loads(x)["DeviceId"] == device_id(device)]


def device_info(live: LiveCollector, device: int = 1) -> dict:
    with live.client() as c:
        return {d["DeviceId"]: d for d in c.get("/api/v1/devices", headers=AUTH).json()["devices"]}[device_id(device)]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_kill_9_during_forwarding_loses_and_duplicates_nothing(tmp_path):
    state, config = agent_dir(tmp_path)
    ids = fill_outbox(state, 3000)
    rnd = random.Random(9)
    with LiveCollector(tmp_path / "collector", free_port()) as live:
        env = forward_env(live.url)
        kills = 0
        for _ in range(6):
            queued = outbox(state)["queued"]
            if queued == 0:
                break
            # kill -9 at a random point of the drain: once a random share of what is queued has gone
            target = int(queued * rnd.uniform(0.1, 0.9))
            proc = subprocess.Popen(
                forward_cmd(state, config, "--once"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            while proc.poll() is None and outbox(state)["queued"] > target:
                time.sleep(0.005)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(10)
        assert kills >= 1
        done = subprocess.run(
            forward_cmd(state, config, "--once"), env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        got = collector_report_ids(live)
        assert sorted(got) == sorted(ids)  # 0 lost, 0 duplicated
        assert device_info(live)["RowsReceived"] == len(ids)  # no batch was ever counted twice
        assert outbox(state) == {"queued": 0, "bytes": 0, "dropped": 0}
        assert (state / "collector.json").stat().st_mode & 0o777 == 0o600


def test_collector_down_then_back_and_killed_mid_batch(tmp_path):
    state, config = agent_dir(tmp_path)
    ids = fill_outbox(state, 4000)
    port = free_port()
    live = LiveCollector(tmp_path / "collector", port)
    proc = subprocess.Popen(
        forward_cmd(state, config, "--max-backoff", "0.5", "--poll", "0.2"),
        env=forward_env(live.url),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(2.0)  # the collector is down: rows stay buffered
        assert outbox(state)["queued"] == len(ids)
        live.start()
        wait_for(lambda: outbox(state)["queued"] < len(ids), 30, "the first acknowledged batch")
        live.kill()  # in the middle of the stream of batches
        assert outbox(state)["queued"] > 0
        time.sleep(1.0)
        live.start()
        wait_for(lambda: outbox(state)["queued"] == 0, 60, "the outbox to drain")
        assert sorted(collector_report_ids(live)) == sorted(ids)
        assert device_info(live)["RowsReceived"] == len(ids)
    finally:
        proc.terminate()
        proc.wait(10)
        live.stop()


def _throwaway_pki(tmp_path: Path) -> tuple[Path, Path, Path]:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rmmhunt test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return ca_file, cert_file, key_file


def test_tls_with_a_throwaway_ca_and_bounded_outbox_reports_drops(tmp_path):
    ca_file, cert_file, key_file = _throwaway_pki(tmp_path)
    state, config = agent_dir(tmp_path)
    fill_outbox(state, 10)
    entry = outbox(state)["bytes"] // 10
    ids = fill_outbox(state, 30, max_bytes=entry * 12)  # room for about 12 rows: the oldest go
    stats = outbox(state)
    assert stats["bytes"] <= entry * 12 + entry and stats["dropped"] >= 25
    assert stats["queued"] + stats["dropped"] == 40
    # a row the collector refuses (a field over its limit) is found by halving the batch and
    # counted as dropped; the rows around it still arrive
    fill_outbox(state, 1, signer="MMSoft Design " + "x" * 40000)
    ids += fill_outbox(state, 5)
    port = free_port()
    with LiveCollector(tmp_path / "collector", port, tls=(cert_file, key_file), ca_file=ca_file) as live:
        # verification is on by default: without the CA the agent refuses the server
        refused = subprocess.run(
            forward_cmd(state, config, "--once"), env=forward_env(live.url), capture_output=True, text=True, timeout=60
        )
        assert refused.returncode == 2 and "rmmhunt: error:" in refused.stderr and "Traceback" not in refused.stderr
        ok = subprocess.run(
            forward_cmd(state, config, "--once"),
            env=forward_env(live.url, ca_file),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ok.returncode == 0, ok.stderr
        got = collector_report_ids(live)
        assert got and set(got) <= set(ids) and max(got) == max(ids)  # the newest rows survived
        assert set(ids[-5:]) <= set(got)
        assert outbox(state)["queued"] == 0
        assert device_info(live)["DroppedRows"] == stats["dropped"] + 1  # shown per device


def test_plain_http_only_to_loopback_and_backoff_has_jitter():
    assert check_url("http://127.0.0.1:8080/") == "http://127.0.0.1:8080"
    assert check_url("http://[::1]:8080") == "http://[::1]:8080"
    assert check_url("https://collector.example.org")
    for bad in ("http://collector.example.org", "http://10.0.0.1:80", "ftp://x", "collector"):
        with pytest.raises(ForwardError):
            check_url(bad)
    rnd = random.Random(1)
    delays = [backoff_delay(a, base=1, cap=60, rnd=rnd) for a in range(12)]
    assert all(0 <= d <= min(60, 2**a) for a, d in enumerate(delays))
    assert len({round(d, 6) for d in delays}) == len(delays)


def test_scan_queues_rule_hits_in_the_same_transaction(tmp_path, capsys):
    state, config = agent_dir(tmp_path)
    with Store(state / "rmmhunt.sqlite3") as store:
        store.set_outbox_policy("hits", 0)
    rc = rmmhunt_main(
        ["--state-dir", str(state), "--config", str(config), "scan", str(ROOT / "tests" / "fixtures"), "--no-progress"]
    )
    assert rc == 1
    capsys.readouterr()
    with Store(state / "rmmhunt.sqlite3") as store:
        hit_keys = {
            tuple(k)
            for k in store.db.execute("SELECT DISTINCT device_id, report_id FROM hits WHERE excluded_by IS NULL")
        }
        queued = {tuple(k) for k in store.db.execute("SELECT device_id, report_id FROM outbox")}
        all_rows = store.db.execute("SELECT COUNT(*) FROM cert_rows").fetchone()[0]
    assert queued == hit_keys and 0 < len(queued) < all_rows

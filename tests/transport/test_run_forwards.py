"""`rmmhunt run` forwards continuously: a real agent process watching a real directory and a real
collector process on loopback. A signed RMM binary dropped into the watched tree reaches the
collector without any `rmmhunt forward` command."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

from agent.service.status import load_status
from tests.collector.conftest import free_port
from tests.collector.live import API_TOKEN, ENROLL_SECRET, LiveCollector
from tests.conftest import FIXTURES, ROOT
from tests.runtime.conftest import wait_for, write_config

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


def test_run_forwards_a_watched_finding_to_the_collector(tmp_path):
    watched, state = tmp_path / "w", tmp_path / "state"
    watched.mkdir()
    config = write_config(
        tmp_path / "agent.toml",
        watch_roots=[str(watched)],
        settle_seconds=0.2,
        rescan_interval=0,
        process_sweep_interval=0,
        device_name="forwarding-host",
    )
    with LiveCollector(tmp_path / "collector", free_port()) as live:
        env = {
            **os.environ,
            "RMMHUNT_COLLECTOR_URL": live.url,
            "RMMHUNT_ENROLL_SECRET": ENROLL_SECRET,
        }
        cmd = [sys.executable, "-m", "agent.cli", "run", "--config", str(config), "--state-dir", str(state)]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: (load_status(state) or {}).get("state") == "running", 30)
            shutil.copy(FIXTURES / "files" / "pulseway.exe", watched / "dropped.exe")

            def at_collector() -> list[dict]:
                with live.client() as c:
                    lines = c.get("/api/v1/rows", headers=AUTH).text.splitlines()
                rows = [json.loads(line) for line in lines]
                return [r for r in rows if r["DeviceName"] == "forwarding-host" and "dropped.exe" in r["FolderPath"]]

            rows = wait_for(at_collector, 30)
            assert rows[0]["Signer"] == "MMSoft Design Ltd."
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)

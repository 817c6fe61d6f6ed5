"""A real collector process (``rmmhunt collector serve``, uvicorn) on a free loopback port."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx

ENROLL_SECRET = "enroll-secret-for-tests-0123456789"
API_TOKEN = "api-token-for-tests-0123456789abcdef"


def collector_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(RMMHUNT_ENROLL_SECRET=ENROLL_SECRET, RMMHUNT_API_TOKEN=API_TOKEN)
    return env


class LiveCollector:
    def __init__(
        self,
        state_dir: Path,
        port: int,
        database: str | None = None,
        tls: tuple[Path, Path] | None = None,
        ca_file: Path | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.port = port
        self.database = database
        self.tls = tls
        self.ca_file = ca_file
        self.proc: subprocess.Popen[bytes] | None = None
        scheme = "https" if tls else "http"
        host = "localhost" if tls else "127.0.0.1"
        self.url = f"{scheme}://{host}:{port}"

    def start(self, timeout: float = 30.0) -> LiveCollector:
        cmd = [
            sys.executable,
            "-m",
            "agent.cli",
            "--state-dir",
            str(self.state_dir),
            "collector",
            "serve",
            "--listen",
            f"127.0.0.1:{self.port}",
        ]
        if self.database:
            cmd += ["--database", self.database]
        if self.tls:
            cmd += ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])]
        self.log = open(self.state_dir.parent / f"collector-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, env=collector_env(), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        verify = self._verify()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"collector exited: {self.proc.returncode}")
            try:
                httpx.get(self.url + "/openapi.json", timeout=1, verify=verify)
                return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("collector did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "log", None):
            self.log.close()

    def _verify(self) -> ssl.SSLContext | bool:
        return ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else True

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, verify=self._verify())

    def __enter__(self) -> LiveCollector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

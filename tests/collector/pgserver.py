"""A throwaway PostgreSQL server (Debian's binaries) in a temporary directory on a free loopback
port, run as an unprivileged user when we are root (postgres refuses to run as root).
Used by the collector tests and by bench/collector.py."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

PG_USER = "rmmhunt-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pg_bindir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


def _as_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", PG_USER, "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass
class PgServer:
    bindir: Path
    base: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql://rmmhunt@127.0.0.1:{self.port}/rmmhunt"

    def stop(self) -> None:
        subprocess.run(
            _as_user([str(self.bindir / "pg_ctl"), "-D", str(self.base / "data"), "-m", "immediate", "stop"]),
            capture_output=True,
        )
        shutil.rmtree(self.base, ignore_errors=True)


def start_pg() -> PgServer:
    bindir = pg_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed: `make test` installs the Debian package postgresql")
    if os.geteuid() == 0 and subprocess.run(["id", "-u", PG_USER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER], check=True)
    base = Path(tempfile.mkdtemp(prefix="rmmhunt-pg-"))
    os.chmod(base, 0o755)
    if os.geteuid() == 0:
        shutil.chown(base, PG_USER)
    port = free_port()
    data = base / "data"
    initdb = [
        str(bindir / "initdb"),
        "-D",
        str(data),
        "-U",
        "rmmhunt",
        "--auth=trust",
        "-E",
        "UTF8",
        "--no-sync",
        "--locale=C.UTF-8",
    ]
    subprocess.run(_as_user(initdb), check=True, capture_output=True)
    opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
    start = [str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(base / "log"), "-w", "start"]
    subprocess.run(_as_user(start), check=True, capture_output=True)
    server = PgServer(bindir, base, port)
    try:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={port} user=rmmhunt dbname=postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE rmmhunt")
    except Exception:
        server.stop()
        raise
    return server

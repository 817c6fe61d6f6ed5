from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.resources import shipped_rules_dir
from agent.rules.loader import Rule, load_rules

PG_USER = "rmmhunt-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        pytest.fail("PostgreSQL is not installed: `make test` installs the Debian package postgresql")
    return found[-1].parent


def _as_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", PG_USER, "--", *cmd]


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL in a temporary directory on a free loopback port, run as an unprivileged
    user (postgres refuses root)."""
    bindir = _pg_bin()
    if os.geteuid() == 0:
        if subprocess.run(["id", "-u", PG_USER], capture_output=True).returncode != 0:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER], check=True
            )
    base = Path(tempfile.mkdtemp(prefix="rmmhunt-pg-"))
    os.chmod(base, 0o755)
    data = base / "data"
    if os.geteuid() == 0:
        shutil.chown(base, PG_USER)
    port = free_port()
    subprocess.run(
        _as_user(
            [
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
        ),
        check=True,
        capture_output=True,
    )
    opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
    subprocess.run(
        _as_user([str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(base / "log"), "-w", "start"]),
        check=True,
        capture_output=True,
    )
    try:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={port} user=rmmhunt dbname=postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE rmmhunt")
        yield f"postgresql://rmmhunt@127.0.0.1:{port}/rmmhunt"
    finally:
        subprocess.run(
            _as_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]), capture_output=True
        )
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def fresh_pg(postgres_url: str) -> str:
    """The shared server with empty collector tables."""
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    return postgres_url


@pytest.fixture(scope="session")
def shipped_rules() -> list[Rule]:
    return list(load_rules([shipped_rules_dir()]).rules)


@pytest.fixture
def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)

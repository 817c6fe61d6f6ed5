from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest

from agent.resources import shipped_rules_dir
from agent.rules.loader import Rule, load_rules
from tests.collector.pgserver import free_port, pg_bindir, start_pg

__all__ = ["free_port"]


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL in a temporary directory on a free loopback port, run as an unprivileged
    user (postgres refuses root)."""
    if pg_bindir() is None:
        pytest.fail("PostgreSQL is not installed: `make test` installs the Debian package postgresql")
    server = start_pg()
    try:
        yield server.url
    finally:
        server.stop()


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

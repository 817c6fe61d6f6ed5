"""Property-based run of the collector's own OpenAPI schema against the live process: no 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.collector.conftest import free_port
from tests.collector.live import API_TOKEN, LiveCollector

EXAMPLES_PER_OPERATION = 15


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    collector = LiveCollector(tmp_path_factory.mktemp("fuzz") / "state", free_port()).start()
    yield collector
    collector.stop()


def test_schemathesis_finds_no_server_error(live, capsys):
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json")
    schema.config.base_url = live.url
    total = 0
    failures = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/api/v1/enroll", "/api/v1/rows", "/api/v1/hunts", "/api/v1/devices"}

    def check(operation, headers):
        @settings(
            max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(case=operation.as_strategy())
        def run(case):
            nonlocal total
            total += 1
            response = case.call(headers=headers, timeout=30)
            if response.status_code >= 500:
                failures.append((case.method, case.formatted_path, response.status_code, response.text[:200]))

        run()

    for operation in operations:
        for headers in ({}, {"Authorization": f"Bearer {API_TOKEN}"}):
            check(operation, headers)
    with capsys.disabled():
        print(f"\nschemathesis: {total} cases over {len(operations)} operations, {len(failures)} server errors")
    assert failures == []
    assert total >= 100

"""A bounded schemathesis run over the OpenAPI spec against a live server (torch backend, aim-debug): whatever
the generated bodies, headers and content types, no answer is a 5xx."""

from __future__ import annotations

from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from service.settings import Settings
from tests.service.conftest import serve

EXAMPLES_PER_OPERATION = 50


def test_no_server_errors_on_generated_requests(debug_checkpoint: Path, live: list) -> None:
    server = serve(Settings(model=str(debug_checkpoint), max_batch_size=4, max_wait_ms=1))
    live.append(server)
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/embed", "/classify", "/info", "/metrics", "/readyz", "/healthz"}
    calls: list[int] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def check(case: schemathesis.Case) -> None:
            response = case.call_and_validate(base_url=server.url, checks=[not_a_server_error], timeout=30)
            calls.append(response.status_code)

        check()
    assert len(calls) >= len(operations) and all(code < 500 for code in calls)

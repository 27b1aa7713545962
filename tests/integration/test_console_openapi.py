"""The console answers as its OpenAPI document says, for requests schemathesis generates.

The console runs as ``saga console`` in a process of its own (schemathesis calls it
synchronously), over a populated PostgreSQL store and a RabbitMQ virtual host with a parked
message. Every operation gets generated paths, queries and bodies, valid and not; every answer
must be one the document declares, with a body that matches its schema, and never a 5xx.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance

from orchestrator.console.api import ROUTES
from orchestrator.stores import open_store
from tests.integration.console_support import park_a_bad_start_request, populate

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq, pytest.mark.timeout(600)]


@pytest.fixture
async def console_url(database_url: str, vhost_url: str) -> AsyncIterator[str]:
    """``saga console`` on a free port, over a populated store and a parked message."""
    store = open_store(database_url)
    await store.setup()
    await populate(store)
    await store.close()
    await park_a_bad_start_request(vhost_url)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    env = {
        **clean,
        "SAGA_STORE_URL": database_url,
        "SAGA_AMQP_URL": vhost_url,
        "SAGA_APP": "examples.order_fulfillment:app",
        "SAGA_LOG_LEVEL": "error",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestrator.cli",
        "console",
        "--port",
        "0",
        "--apply-here",  # no daemon runs here: the console applies actions itself
        env=env,
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(60):
            line = (await process.stdout.readline()).decode()
        assert line.startswith("console on http://"), line
        yield line.split()[2].rstrip("/")
    finally:
        process.terminate()
        async with asyncio.timeout(30):
            await process.wait()


def test_every_operation_answers_as_documented(console_url: str) -> None:
    schema = schemathesis.openapi.from_url(console_url + "/openapi.json")
    schema.config.update(base_url=console_url)
    checked = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=15,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        def answers_as_documented(case: schemathesis.Case) -> None:
            # A cursor is opaque: one the console never gave out is refused (400) although
            # no schema can tell it from a real one.
            opaque = bool((case.query or {}).get("cursor"))
            excluded = [positive_data_acceptance] if opaque else []
            case.call_and_validate(timeout=30, excluded_checks=excluded)

        answers_as_documented()
        checked.append(operation.label)
    # Every operation but the document itself (test_console_api checks that one).
    documented = {f"{route.method} {route.path}" for route in ROUTES}
    assert set(checked) == documented - {"GET /openapi.json"}

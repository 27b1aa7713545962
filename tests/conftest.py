"""Shared fixtures: real services when they run here, and a check that no test leaks a task.

Tests that need RabbitMQ or PostgreSQL skip when the server is absent on a developer machine,
but fail in CI, where ``SAGA_REQUIRE_SERVICES=1`` (set by ``.ci/run``) says they must run.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import NoReturn
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from plumbing.logs import configure_logging

# Private RabbitMQ nodes (and a cluster of them) for tests that kill or restart a broker.
pytest_plugins = ("tests.support.rabbit_nodes",)

AMQP_URL = os.environ.get("SAGA_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
POSTGRES_URL = os.environ.get("SAGA_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
MONGO_URL = os.environ.get("SAGA_TEST_MONGO_URL")
REQUIRED = os.environ.get("SAGA_REQUIRE_SERVICES") == "1"


def unavailable(what: str, why: str) -> NoReturn:
    """Skip (locally) or fail (in CI) a test whose service is missing."""
    message = f"{what} is not available: {why}"
    if REQUIRED:
        pytest.fail(message + " (SAGA_REQUIRE_SERVICES=1 requires it)")
    pytest.skip(message)


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 2
        ):
            return True
    except OSError:
        return False


@pytest.fixture(autouse=True, scope="session")
def quiet_logs() -> None:
    """Only warnings and errors from structlog while tests run."""
    configure_logging("warning", json=False)


@pytest.fixture
def amqp_url() -> str:
    """The RabbitMQ URL of the server on this machine."""
    if not _reachable(AMQP_URL, 5672):
        unavailable("RabbitMQ", f"nothing listens at {urlsplit(AMQP_URL).netloc}")
    return AMQP_URL


@pytest.fixture
def postgres_url() -> str:
    """The PostgreSQL URL of the server on this machine."""
    if not _reachable(POSTGRES_URL, 5432):
        unavailable("PostgreSQL", f"nothing listens at {urlsplit(POSTGRES_URL).netloc}")
    return POSTGRES_URL


@pytest.fixture
def unique() -> str:
    """A short unique suffix for names that must not collide between tests and runs."""
    return uuid.uuid4().hex[:10]


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves a task running behind it."""
    before = set(asyncio.all_tasks())
    yield
    await asyncio.sleep(0)
    leaked = [
        task
        for task in asyncio.all_tasks() - before
        if task is not asyncio.current_task() and not task.done()
    ]
    for task in leaked:
        task.cancel()
    if leaked:
        pytest.fail(f"test leaked {len(leaked)} task(s): {[t.get_name() for t in leaked]}")


@pytest.fixture
def vhost_url(amqp_url: str) -> Iterator[str]:
    """An AMQP URL on a virtual host of its own, deleted afterwards."""
    from tests.integration.rabbit_support import temporary_vhost, with_vhost

    with temporary_vhost(amqp_url) as vhost:
        yield with_vhost(amqp_url, vhost)


@pytest.fixture
async def database_url(postgres_url: str) -> AsyncIterator[str]:
    """A PostgreSQL URL on a database of its own, dropped afterwards."""
    name = f"saga_e2e_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(postgres_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        parts = urlsplit(postgres_url)
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()

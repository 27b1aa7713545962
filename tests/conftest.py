"""Shared fixtures: real services when they run here, and a check that no test leaks a task.

Tests that need RabbitMQ, PostgreSQL or MongoDB skip when the server is absent on a developer
machine, but fail in CI, where ``SAGA_REQUIRE_SERVICES=1`` (set by ``.ci/run``) says they must
run. The MongoDB-compatible server is the one ``SAGA_TEST_MONGO_URL`` names: ``.ci/run`` starts
SecantusDB and sets it; the hosted workflow sets it to a real MongoDB replica set.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import NoReturn
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import structlog
from pymongo import AsyncMongoClient

from plumbing.logs import configure_logging

# Private RabbitMQ nodes (and a cluster of them) for tests that kill or restart a broker.
pytest_plugins = ("tests.support.rabbit_nodes",)

AMQP_URL = os.environ.get("SAGA_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
POSTGRES_URL = os.environ.get("SAGA_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
MONGO_URL = os.environ.get("SAGA_TEST_MONGO_URL") or None
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


def _first_mongo_host(url: str) -> str:
    """The first seed of a ``mongodb://`` URL as a URL of its own (a seed list has several)."""
    hosts = urlsplit(url).netloc.rpartition("@")[2]
    return f"mongodb://{hosts.split(',')[0]}"


def with_database(url: str, name: str) -> str:
    """MongoDB ``url`` naming the database ``name``, keeping hosts, credentials and options."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(autouse=True, scope="session")
def quiet_logs() -> None:
    """Only warnings and errors from structlog while tests run."""
    configure_logging("warning", json=False)


@pytest.fixture(autouse=True)
def logging_restored() -> Iterator[None]:
    """Put logging back as it was after a test that ran ``main()``: the CLI configures
    structlog and the root logger to write to the ``sys.stderr`` of that moment, which
    ``capsys`` closes when the test ends, so every later log line would raise."""
    config = structlog.get_config()
    root = logging.getLogger()
    handlers, level, hook = root.handlers[:], root.level, sys.excepthook
    yield
    structlog.configure(**config)
    root.handlers = handlers
    root.setLevel(level)
    sys.excepthook = hook


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
def mongo_url() -> str:
    """The URL of the MongoDB-compatible server named by ``SAGA_TEST_MONGO_URL``."""
    if MONGO_URL is None:
        unavailable("MongoDB", "SAGA_TEST_MONGO_URL is not set (.ci/run starts SecantusDB)")
    seed = _first_mongo_host(MONGO_URL)
    # An SRV URL names no port to try; the driver finds out soon enough.
    if not MONGO_URL.startswith("mongodb+srv://") and not _reachable(seed, 27017):
        unavailable("MongoDB", f"nothing listens at {urlsplit(seed).netloc}")
    return MONGO_URL


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


@pytest.fixture
async def mongo_database_url(mongo_url: str) -> AsyncIterator[str]:
    """A MongoDB URL on a database of its own, dropped afterwards."""
    url = with_database(mongo_url, f"saga_e2e_{uuid.uuid4().hex[:10]}")
    try:
        yield url
    finally:
        client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(
            url, serverSelectionTimeoutMS=10_000
        )
        try:
            await client.drop_database(client.get_default_database().name)
        finally:
            await client.close()


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.postgres), "mongo"])
def store_url(request: pytest.FixtureRequest) -> str:
    """A saga store URL on an empty database of its own, on each durable store in turn."""
    fixture = "database_url" if request.param == "postgres" else "mongo_database_url"
    url: str = request.getfixturevalue(fixture)
    return url

"""Fixtures for end-to-end runs: a fresh PostgreSQL database and a fresh RabbitMQ vhost."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tests.integration.rabbit_support import temporary_vhost, with_vhost


@pytest.fixture
def vhost_url(amqp_url: str) -> Iterator[str]:
    """An AMQP URL on a virtual host of its own, deleted afterwards."""
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

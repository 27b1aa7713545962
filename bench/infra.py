"""The shared servers, used without disturbing anyone: a fresh vhost and database per run.

The machine's RabbitMQ and PostgreSQL are shared with other engineers, so a run never stops,
restarts or reconfigures them. Each run gets its own RabbitMQ virtual host (``rabbitmqctl
add_vhost``, deleted with everything in it afterwards), its own PostgreSQL database (dropped
afterwards) and, when a MongoDB-wire URL is given, its own MongoDB database.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

RABBITMQCTL_TIMEOUT = 60.0


@dataclass(frozen=True)
class Servers:
    """Where the shared servers are."""

    amqp_url: str
    """A URL of the broker; its vhost is replaced per run."""
    pg_admin_url: str
    """A URL of a database the harness may connect to in order to create and drop others."""
    mongo_url: str | None
    """A MongoDB-wire URL, or ``None`` to skip the MongoDB rows."""
    rabbitmqctl: tuple[str, ...] = ("rabbitmqctl",)


def unique_name(prefix: str) -> str:
    """A name nobody else uses: ``prefix`` plus ten random hex digits."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def with_path(url: str, path: str) -> str:
    """``url`` with its path (vhost or database name) replaced by ``path``."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + quote(path, safe="")))


async def rabbitmqctl(servers: Servers, *arguments: str) -> str:
    """Run ``rabbitmqctl -q ARGUMENTS`` and return its standard output."""
    command = [*servers.rabbitmqctl, "-q", *arguments]

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, capture_output=True, text=True, timeout=RABBITMQCTL_TIMEOUT, check=False
        )

    result = await asyncio.to_thread(run)
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed: {result.stderr.strip()}")
    return result.stdout


@contextlib.asynccontextmanager
async def fresh_vhost(servers: Servers) -> AsyncIterator[str]:
    """A new virtual host the URL's user may use; yields its URL, deletes it afterwards."""
    name = unique_name("saga-bench-")
    user = urlsplit(servers.amqp_url).username or "guest"
    await rabbitmqctl(servers, "add_vhost", name)
    try:
        await rabbitmqctl(servers, "set_permissions", "-p", name, user, ".*", ".*", ".*")
        yield with_path(servers.amqp_url, name)
    finally:
        await rabbitmqctl(servers, "delete_vhost", name)


@contextlib.asynccontextmanager
async def fresh_database(servers: Servers) -> AsyncIterator[tuple[str, str]]:
    """A new PostgreSQL database; yields ``(url, name)`` and drops it afterwards."""
    name = unique_name("saga_bench_")
    admin = await asyncpg.connect(servers.pg_admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield with_path(servers.pg_admin_url, name), name
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def fresh_mongo_database(servers: Servers) -> AsyncIterator[str]:
    """A new MongoDB database on the given server; yields its URL and drops it afterwards."""
    from pymongo import AsyncMongoClient

    assert servers.mongo_url is not None
    name = unique_name("saga_bench_")
    url = with_path(servers.mongo_url, name)
    try:
        yield url
    finally:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(servers.mongo_url)
        try:
            await client.drop_database(name)
        finally:
            await client.close()


class PgStats:
    """Reads a database's counters from ``pg_stat_database`` over an admin connection.

    The admin connection goes to another database, so reading the counters never adds to
    them. Backends publish their counters at most once a second, so callers wait a moment
    after a run before the final reading.
    """

    def __init__(self, admin: asyncpg.Connection, database: str) -> None:
        self.admin = admin
        self.database = database

    @classmethod
    async def connect(cls, servers: Servers, database: str) -> PgStats:
        """An admin connection watching ``database``."""
        return cls(await asyncpg.connect(servers.pg_admin_url), database)

    async def counters(self) -> dict[str, int]:
        """Committed and rolled-back transactions and row counters of the database."""
        await self.admin.execute("SELECT pg_stat_clear_snapshot()")
        row = await self.admin.fetchrow(
            "SELECT xact_commit, xact_rollback, tup_returned, tup_fetched, tup_inserted, "
            "tup_updated, tup_deleted, blks_hit, blks_read FROM pg_stat_database "
            "WHERE datname = $1",
            self.database,
        )
        return {key: int(value) for key, value in dict(row or {}).items()}

    async def backend_pids(self) -> list[int]:
        """The server processes connected to the database right now."""
        rows = await self.admin.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1", self.database
        )
        return [int(row["pid"]) for row in rows]

    async def close(self) -> None:
        """Close the admin connection."""
        await self.admin.close()


async def server_versions(servers: Servers) -> dict[str, str]:
    """The versions of RabbitMQ and PostgreSQL the run uses."""
    versions: dict[str, str] = {}
    try:
        text = await rabbitmqctl(servers, "version")
        versions["rabbitmq"] = text.strip()
    except (RuntimeError, OSError) as e:
        versions["rabbitmq"] = f"unknown ({e})"
    try:
        admin = await asyncpg.connect(servers.pg_admin_url)
        try:
            versions["postgresql"] = str(await admin.fetchval("SHOW server_version"))
            preload = str(await admin.fetchval("SHOW shared_preload_libraries"))
            versions["pg_stat_statements"] = (
                "loaded" if "pg_stat_statements" in preload else "not loaded"
            )
        finally:
            await admin.close()
    except (OSError, asyncpg.PostgresError) as e:
        versions["postgresql"] = f"unknown ({e})"
    return versions

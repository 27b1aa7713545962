"""PostgreSQL plumbing shared by the saga store and the participants' idempotency store.

:class:`PostgresPool` is an asyncpg pool created on first use that reports connection trouble
as one :class:`~plumbing.errors.StoreUnavailable` line naming the redacted URL, runs numbered
migrations under an advisory lock (recorded per table in ``saga_schema_versions``, so replicas
that start together migrate once), and deletes in small batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any, Final

import asyncpg  # type: ignore[import-untyped, unused-ignore]

from plumbing.errors import ConfigError, StoreUnavailable
from plumbing.stores import store_unavailable
from plumbing.urls import redact_url

_SCHEMA_VERSIONS_SQL: Final = {
    "create": """
        CREATE TABLE IF NOT EXISTS saga_schema_versions (
            table_name  text PRIMARY KEY,
            version     integer NOT NULL,
            migrated_at timestamptz NOT NULL DEFAULT now())
    """,
    "get": "SELECT version FROM saga_schema_versions WHERE table_name = $1",
    "set": """
        INSERT INTO saga_schema_versions (table_name, version) VALUES ($1, $2)
        ON CONFLICT (table_name) DO UPDATE SET version = EXCLUDED.version, migrated_at = now()
    """,
    "forget": "DELETE FROM saga_schema_versions WHERE table_name = $1",
}


# Any constant works; one key serialises the migrations of every table, which is cheap.
_MIGRATION_LOCK: Final = 0x5A6A_0001
_PURGE_BATCH: Final = 1000  # small deletes keep locks and WAL bursts short


_TABLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,39}")  # 40 leaves room for index name suffixes

# Connection trouble, as opposed to a bad statement (a bug, which must propagate as itself).
_UNAVAILABLE: Final[tuple[type[BaseException], ...]] = (
    OSError,  # refused, unreachable, reset, name resolution
    TimeoutError,
    asyncpg.PostgresConnectionError,  # SQLSTATE class 08, including a connection lost mid-query
    asyncpg.InvalidAuthorizationSpecificationError,  # class 28: wrong user or password
    asyncpg.InvalidCatalogNameError,  # the database does not exist
    asyncpg.OperatorInterventionError,  # class 57: shutting down, starting up, cancelled
    asyncpg.InsufficientResourcesError,  # class 53: too many connections, disk full
    asyncpg.ReadOnlySQLTransactionError,  # a failover left the URL pointing at a standby
)


def table_name(name: str) -> str:
    """``name`` if it is a plain lowercase SQL identifier of at most 40 characters.

    Raises:
        ConfigError: it is not; table names are spliced into SQL, so nothing else is allowed.
    """
    if not _TABLE_NAME.fullmatch(name):
        raise ConfigError(
            f"table name {name!r} is not allowed; use lowercase letters, digits and "
            "underscores, starting with a letter or underscore, at most 40 characters"
        )
    return name


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


async def _register_json(connection: Any) -> None:
    """Let JSON columns take and give Python objects (asyncpg's default is text)."""
    for type_name in ("json", "jsonb"):
        await connection.set_type_codec(
            type_name, encoder=_dumps, decoder=json.loads, schema="pg_catalog"
        )


async def _end_open_transaction(connection: Any) -> None:
    """What a connection needs when it returns to the pool: no transaction left open.

    asyncpg's default reset also runs ``RESET ALL``, ``UNLISTEN *``, ``CLOSE ALL`` and
    releases advisory locks: a round trip per checkout for things we never leave behind (our
    only advisory lock is transaction-scoped), measured at 8% of the daemon's time.
    """
    if connection.is_in_transaction():
        await connection.execute("ROLLBACK")


def row_count(status: str) -> int:
    """The number of rows a command touched, from asyncpg's status tag (``"DELETE 3"``)."""
    return int(status.rsplit(" ", 1)[-1])


class PostgresPool:
    """An asyncpg pool, created on first use, that reports connection trouble as one line.

    Every failure to reach the server, authenticate or stay connected surfaces as
    ``StoreUnavailable`` naming the redacted URL, within ``connect_timeout`` seconds for a
    server that does not answer. Shared by the saga store and the participant idempotency
    store.

    Args:
        what: how the server is named in errors ("PostgreSQL").
        command_timeout: seconds any one statement may take before it is abandoned.
    """

    def __init__(
        self,
        url: str,
        *,
        what: str = "PostgreSQL",
        connect_timeout: float = 5.0,
        command_timeout: float = 30.0,
        min_size: int = 1,
        max_size: int = 10,
    ) -> None:
        self.url = url
        self.safe_url = redact_url(url)
        self.what = what
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.min_size = min_size
        self.max_size = max_size
        self._pool: Any = None
        self._lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """A pooled connection (an ``asyncpg.Connection``), for one or a few statements.

        Raises:
            StoreUnavailable: the server cannot be reached, refused us, or went away.
        """
        pool = await self._ready()
        try:
            async with pool.acquire(timeout=self.connect_timeout) as connection:
                yield connection
        except _UNAVAILABLE as e:
            raise self._unavailable(e) from e

    def _unavailable(self, error: BaseException) -> StoreUnavailable:
        return store_unavailable(self.what, self.safe_url, error, timeout=self.connect_timeout)

    async def _ready(self) -> Any:
        if self._pool is None:
            async with self._lock:
                if self._pool is None:
                    self._pool = await self._create()
        return self._pool

    async def _create(self) -> Any:
        try:
            # asyncpg's own timeout is per address tried; this one bounds the whole attempt.
            async with asyncio.timeout(self.connect_timeout):
                return await asyncpg.create_pool(
                    self.url,
                    min_size=self.min_size,
                    max_size=self.max_size,
                    timeout=self.connect_timeout,
                    command_timeout=self.command_timeout,
                    init=_register_json,
                    reset=_end_open_transaction,
                )
        except _UNAVAILABLE as e:
            raise self._unavailable(e) from e
        except ValueError as e:  # asyncpg's DSN parser: bad port, bad option, bad brackets
            raise ConfigError(f"{self.what} URL {self.safe_url} is invalid: {e}") from e

    async def migrate(self, table: str, migrations: Sequence[str], **parameters: str) -> None:
        """Bring ``table`` to the last of ``migrations``, each a template over ``{table}`` and
        ``parameters``.

        Raises:
            ConfigError: the table was migrated by a newer release than this one.
        """
        async with self.connection() as connection, connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await connection.execute(_SCHEMA_VERSIONS_SQL["create"])
            found = await connection.fetchval(_SCHEMA_VERSIONS_SQL["get"], table)
            current = int(found or 0)
            if current > len(migrations):
                raise ConfigError(
                    f"table {table} is at schema version {current}, but this release only "
                    f"knows versions up to {len(migrations)}; upgrade saga-orchestrator"
                )
            for migration in migrations[current:]:
                await connection.execute(migration.format(table=table, **parameters))
            if current < len(migrations):
                await connection.execute(_SCHEMA_VERSIONS_SQL["set"], table, len(migrations))

    async def delete_in_batches(self, statement: str, cutoff: datetime) -> int:
        """Run a ``DELETE ... LIMIT $2`` statement until it deletes less than a batch.

        Small deletes keep locks and WAL bursts short; returns how many rows went.
        """
        deleted_total = 0
        async with self.connection() as connection:
            while True:
                status: str = await connection.execute(statement, cutoff, _PURGE_BATCH)
                deleted = row_count(status)
                deleted_total += deleted
                if deleted < _PURGE_BATCH:
                    return deleted_total

    async def drop(self, table: str) -> None:
        """Delete ``table`` and its schema record (for tests and uninstalling)."""
        async with self.connection() as connection, connection.transaction():
            await connection.execute(f'DROP TABLE IF EXISTS "{table_name(table)}"')
            with contextlib.suppress(asyncpg.UndefinedTableError):
                async with connection.transaction():  # a savepoint: the lookup may fail
                    await connection.execute(_SCHEMA_VERSIONS_SQL["forget"], table)

    async def close(self) -> None:
        """Close every connection (waiting for those in use to be released)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
